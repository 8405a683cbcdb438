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

/// `stagely-testenv up DIR` with redis-server and the registry (as `make demo` runs it): every
/// process outlives the command, the registry asks for tokens from the given realm, and
/// `stagely-testenv down DIR` stops them all and removes DIR.
#[test]
fn up_with_redis_and_registry_then_down_leaves_nothing() {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (redis, registry) = (free(), free());
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("demo");
    let realm = "http://127.0.0.1:9/v1/registry/token";
    let bin = env!("CARGO_BIN_EXE_stagely-testenv");
    let out = std::process::Command::new(bin)
        .arg("up")
        .arg(&dir)
        .args(["--redis-port", &redis.to_string(), "--registry-port", &registry.to_string()])
        .args(["--registry-realm", realm])
        .output()
        .unwrap();
    assert!(out.status.success(), "up: {}", String::from_utf8_lossy(&out.stderr));
    let pids: Vec<u32> =
        std::fs::read_to_string(dir.join("pids")).unwrap().lines().map(|line| line.parse().unwrap()).collect();
    assert_eq!(pids.len(), 5, "etcd, kube-apiserver, kube-controller-manager, redis-server, registry");
    assert!(pids.iter().all(|&pid| process_running(pid)), "every process outlives `up`");

    let ping = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", redis)).unwrap();
        stream.write_all(b"PING\r\n").unwrap();
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).unwrap();
        answer
    };
    assert_eq!(&ping, b"+PONG\r\n");
    let challenge = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", registry)).unwrap();
        write!(stream, "GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    assert!(challenge.starts_with("HTTP/1.0 401"), "{challenge}");
    assert!(challenge.contains(&format!("realm=\"{realm}\"")), "{challenge}");
    let key = dir.join("registry/token.key");
    assert!(key.exists() && dir.join("registry/token.crt").exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    let out = std::process::Command::new(bin).arg("down").arg(&dir).output().unwrap();
    assert!(out.status.success(), "down: {}", String::from_utf8_lossy(&out.stderr));
    assert_all_gone(&pids);
    assert!(!dir.exists(), "{dir:?} left behind");
    let out = std::process::Command::new(bin).arg("down").arg(&dir).output().unwrap();
    assert!(out.status.success(), "a second down does nothing: {}", String::from_utf8_lossy(&out.stderr));
}
