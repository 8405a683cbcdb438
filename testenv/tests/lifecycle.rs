//! The control plane's own promises: it starts, answers, and leaves no process behind when it
//! is dropped, whether the test ends well or panics.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use stagely_testenv::{ControlPlane, Options, process_running};

fn assert_all_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&pid| process_running(pid)) {
        assert!(
            Instant::now() < deadline,
            "processes still running: {:?}",
            pids.iter().filter(|&&p| process_running(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_serves_and_stops_everything_on_drop() {
    let plane = ControlPlane::start(Options { controller_manager: true, ..Options::default() }).await.expect("start");
    let pids = plane.pids();
    assert_eq!(pids.len(), 3, "etcd, kube-apiserver and kube-controller-manager");
    assert!(pids.iter().all(|&pid| process_running(pid)));
    let dir = plane.dir().to_owned();

    let client = plane.client().await.unwrap();
    let namespaces = Api::<Namespace>::all(client).list(&ListParams::default()).await.unwrap();
    assert!(namespaces.items.iter().any(|ns| ns.metadata.name.as_deref() == Some("default")));

    let out = plane.kubectl().args(["get", "--raw", "/readyz"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{}", String::from_utf8_lossy(&out.stderr));

    drop(plane);
    assert_all_gone(&pids);
    assert!(!Path::new(&dir).exists(), "temporary directory {dir:?} left behind");
}

#[test]
fn a_panicking_test_leaves_no_process_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plane = runtime.block_on(ControlPlane::start(Options::default())).expect("start");
        tx.send(plane.pids()).unwrap();
        panic!("the test fails while the control plane runs");
    })
    .join();
    assert!(outcome.is_err(), "the thread panicked");
    let pids = rx.recv().unwrap();
    assert_eq!(pids.len(), 2);
    assert_all_gone(&pids);
}

#[test]
fn killing_the_test_process_kills_the_control_plane() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "holds_a_control_plane_until_killed", "--ignored", "--nocapture", "--test-threads=1"])
        .env("STAGELY_TESTENV_HOLDER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let pids: Vec<u32> = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split_once("PIDS ").map(|(_, p)| p.split(' ').map(|pid| pid.parse().unwrap()).collect()))
        .expect("the holder printed its pids");
    assert!(pids.iter().all(|&pid| process_running(pid)));
    child.kill().unwrap(); // SIGKILL: no destructor runs in the holder.
    child.wait().unwrap();
    assert_all_gone(&pids);
}

#[test]
#[ignore = "the process that killing_the_test_process_kills_the_control_plane starts and kills"]
fn holds_a_control_plane_until_killed() {
    assert!(
        std::env::var_os("STAGELY_TESTENV_HOLDER").is_some(),
        "run only by killing_the_test_process_kills_the_control_plane"
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let plane = runtime.block_on(ControlPlane::start(Options::default())).expect("start");
    let pids: Vec<String> = plane.pids().iter().map(u32::to_string).collect();
    println!("PIDS {}", pids.join(" "));
    loop {
        std::thread::park();
    }
}
