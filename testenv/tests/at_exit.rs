//! `run_at_exit` runs its lines once the process is gone, even when it is SIGKILLed (what a
//! test binary's statics, never dropped, rely on to leave nothing behind).

use std::process::Command;
use std::time::{Duration, Instant};

use stagely_testenv::at_exit::{quote, remove_at_exit, run_at_exit};

const CHILD: &str = "STAGELY_AT_EXIT_MARKER";

#[test]
fn lines_run_after_the_process_is_killed_and_not_before() {
    if let Ok(marker) = std::env::var(CHILD) {
        // The child: registers two lines, checks that nothing ran yet, and dies without unwinding.
        run_at_exit(&format!("echo one > {}", quote(&marker)));
        run_at_exit(&format!("echo two >> {}", quote(&marker)));
        let files = std::path::Path::new(&marker).with_file_name("files");
        remove_at_exit(&files);
        assert!(!std::path::Path::new(&marker).exists(), "a line ran while the process was alive");
        // SAFETY: kill(2) on this process's own pid touches no memory.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        unreachable!("SIGKILL ends the process");
    }
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let files = dir.path().join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    for file in ["server.log", "data", "sub/more", "sub/sub.log"] {
        std::fs::write(files.join(file), file).unwrap();
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lines_run_after_the_process_is_killed_and_not_before", "--nocapture"])
        .env(CHILD, &marker)
        .status()
        .unwrap();
    assert!(!status.success(), "the child is killed, so it cannot succeed: {status}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&marker)
            && text == "one\ntwo\n"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guard did not run both lines in order: {:?}",
            std::fs::read_to_string(&marker)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The clean-up registered after them leaves nothing but the logs.
    let left = |dir: &std::path::Path| -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    stack.push(entry.path());
                } else {
                    found.push(entry.path().strip_prefix(&files).unwrap().display().to_string());
                }
            }
        }
        found.sort();
        found
    };
    loop {
        if left(&files) == ["server.log", "sub/sub.log"] {
            break;
        }
        assert!(Instant::now() < deadline, "only the logs should be left: {:?}", left(&files));
        std::thread::sleep(Duration::from_millis(50));
    }
}
