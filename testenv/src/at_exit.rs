//! Clean-up that runs when the test process exits, however it exits.
//!
//! Test binaries keep their shared servers in statics, and statics are never dropped: their
//! temporary directories, and containers a test's podman left running, would outlive every run
//! (a container's published port stays forwarded on the host, refusing connections to that port
//! until something removes it). So the first [`run_at_exit`] starts a guard, `sh` in a session
//! of its own, reading shell lines from a pipe only this process holds; the kernel closes the
//! pipe when the process ends, even on SIGKILL, and the guard then runs each line in order.

use std::io::Write;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Runs the shell `line` once this process has exited (errors ignored; output discarded).
pub fn run_at_exit(line: &str) {
    static GUARD: OnceLock<Mutex<Option<ChildStdin>>> = OnceLock::new();
    let guard = GUARD.get_or_init(|| Mutex::new(start()));
    let mut guard = guard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(stdin) = guard.as_mut() {
        // One write per line, each far below the pipe's buffer: the guard never sees half of one.
        let _ = stdin.write_all(format!("{}\n", line.replace('\n', " ")).as_bytes());
    }
}

/// Empties the directory tree `path` once this process has exited, but for its `*.log` files:
/// a failed test's message names the logs to read.
pub fn remove_at_exit(path: &Path) {
    let path = quote(&path.to_string_lossy());
    run_at_exit(&format!("find {path} -depth \\( -type d -empty -o ! -type d ! -name '*.log' \\) -delete"));
}

/// `value` as one shell word.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn start() -> Option<ChildStdin> {
    use std::os::unix::process::CommandExt;
    // `cat` returns at end of file, when the last holder of the pipe (this process) is gone;
    // signals a terminal sends the test's process group do not reach the guard's session.
    let script = "trap '' INT HUP TERM; lines=$(cat); eval \"$lines\"";
    let child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match child {
        Ok(mut child) => child.stdin.take(),
        Err(err) => {
            eprintln!("stagely-testenv: cannot start the clean-up guard ({err}); temporary files will be left behind");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_a_value_one_word() {
        assert_eq!(quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
