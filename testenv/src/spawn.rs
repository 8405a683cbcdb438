//! Starting child processes that cannot outlive the test process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, and
//! every Rust test runs on a thread of its own. So children are forked from one spawner thread
//! that lives as long as the process: they die with the process, and only with it.

use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts `cmd`. Unless `detach`, the child gets SIGKILL when this process exits; detached
/// children start a session of their own and outlive it.
pub(crate) fn spawn(mut cmd: Command, detach: bool) -> std::io::Result<Child> {
    if detach {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        return cmd.spawn();
    }
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (cmd, reply) in rx {
                    let _ = reply.send(spawn_with_parent_death_signal(cmd));
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (reply, result) = mpsc::channel();
    spawner.lock().expect("spawner lock").send((cmd, reply)).expect("spawner thread is alive");
    result.recv().expect("spawner thread replies")
}

#[allow(unsafe_code)]
fn spawn_with_parent_death_signal(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only prctl and getppid,
    // which are async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}
