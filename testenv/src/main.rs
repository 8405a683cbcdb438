//! `stagely-testenv up DIR` starts a local control plane that keeps running (for `make demo`);
//! `stagely-testenv down DIR` stops it and removes DIR.

use std::path::PathBuf;
use std::process::ExitCode;

use stagely_testenv::{ControlPlane, Options, process_running};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["up", dir] => up(PathBuf::from(dir)).await,
        ["down", dir] => down(PathBuf::from(dir)),
        _ => Err("usage: stagely-testenv up DIR | stagely-testenv down DIR".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stagely-testenv: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn up(dir: PathBuf) -> Result<(), String> {
    if dir.join("pids").exists() {
        return Err(format!(
            "a control plane already runs from {} (stop it with `stagely-testenv down {}`)",
            dir.display(),
            dir.display()
        ));
    }
    let options = Options { controller_manager: true, dir: Some(dir.clone()), detach: true, ..Options::default() };
    let plane = ControlPlane::start(options).await.map_err(|err| err.to_string())?;
    println!("control plane running at {} (kubeconfig: {})", plane.server(), plane.kubeconfig().display());
    Ok(())
}

fn down(dir: PathBuf) -> Result<(), String> {
    let pids = match std::fs::read_to_string(dir.join("pids")) {
        Ok(pids) => pids,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            println!("no control plane runs from {}", dir.display());
            return Ok(());
        }
        Err(err) => return Err(format!("failed to read {}: {err}", dir.join("pids").display())),
    };
    let pids: Vec<u32> = pids.lines().filter_map(|line| line.trim().parse().ok()).collect();
    // Ask politely, then insist: kube-apiserver can hang in its graceful shutdown once etcd is
    // gone. etcd writes into DIR until it exits, so wait for every process before removing it.
    for signal in ["-TERM", "-KILL"] {
        for pid in pids.iter().filter(|&&pid| process_running(pid)) {
            // Ignore failures: the process may have exited meanwhile.
            let _ = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pids.iter().any(|&pid| process_running(pid)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    if let Some(pid) = pids.iter().find(|&&pid| process_running(pid)) {
        return Err(format!("process {pid} did not exit"));
    }
    std::fs::remove_dir_all(&dir).map_err(|err| format!("failed to remove {}: {err}", dir.display()))?;
    println!("control plane stopped");
    Ok(())
}
