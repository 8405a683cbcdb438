//! The test node runs a pod: an image built here with podman (`FROM scratch`, busybox's httpd)
//! and imported into the node's containerd runs as a Deployment's pod, which becomes Ready with
//! a ServiceAccount token mounted, and answers over its pod IP and over its Service's ClusterIP
//! (kube-proxy), and from inside the pod by its Service's name (CoreDNS). Stopping the plane
//! leaves no process, mount or bridge behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenReview};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use stagely_testenv::server::eventually;
use stagely_testenv::{ControlPlane, Options, node, process_running};

const BODY: &str = "hello from a pod on the stagely test node\n";

/// Fails unless `tool` is on the PATH, naming what installs it.
fn assert_installed(tool: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success();
    assert!(found, "{tool} is not installed: run scripts/install-deps.sh (make deps)");
}

/// Podman with its own configuration and storage under `dir` (the host's storage and other
/// tests' stay untouched), as the agent's tests run it.
fn podman(dir: &Path) -> impl Fn(&[&str]) -> String {
    let root = dir.join("podman");
    std::fs::create_dir_all(&root).unwrap();
    let conf = root.join("containers.conf");
    let engine = format!(
        "[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\ntmp_dir = \"{}\"\n",
        root.join("tmp").display()
    );
    std::fs::write(&conf, engine).unwrap();
    let storage = root.join("storage.conf");
    let graph = format!(
        "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
        root.join("graph").display(),
        root.join("run").display()
    );
    std::fs::write(&storage, graph).unwrap();
    move |args: &[&str]| {
        let output = Command::new("podman")
            .env("CONTAINERS_CONF", &conf)
            .env("CONTAINERS_STORAGE_CONF", &storage)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The DER bytes of the first certificate in `pem`.
fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let text = String::from_utf8_lossy(pem);
    let body: String = text.lines().filter(|line| !line.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).expect("a PEM certificate")
}

/// `GET path` on `addr` (HTTP/1.0): the status and the body, if it answered.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    // A CGI script's own header lines may end in a bare newline.
    let (_, body) = response.split_once("\r\n\r\n").or_else(|| response.split_once("\n\n"))?;
    Some((status, body.to_owned()))
}

/// Held by each test for as long as its node runs: the machine's node lock would keep two nodes
/// apart anyway, but a test checking that its node left nothing machine-wide (the bridge, the
/// nftables tables) must not see the next one starting.
fn one_node_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    NODE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn a_deployment_runs_and_answers_over_its_pod_ip_and_service() {
    let _alone = one_node_at_a_time();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(a_deployment_runs_and_answers());
}

async fn a_deployment_runs_and_answers() {
    assert_installed("podman");
    let started = Instant::now();
    let plane = ControlPlane::start(Options { node: true, ..Options::default() }).await.expect("start");
    let node_started = started.elapsed();
    let client = plane.client().await.unwrap();

    // The image: busybox's httpd serving a file, and the pod's ServiceAccount token by a link
    // into where the kubelet mounts it, so the test reads the token the container sees.
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir_all(context.join("www")).unwrap();
    std::fs::copy("/bin/busybox", context.join("busybox")).unwrap();
    std::fs::write(context.join("www/index.html"), BODY).unwrap();
    std::os::unix::fs::symlink("/var/run/secrets/kubernetes.io/serviceaccount/token", context.join("www/token"))
        .unwrap();
    // And a CGI script that sends the apiserver's port, through the `kubernetes` Service, a plain
    // HTTP request: the answer is Go's HTTPS server's to it. (busybox's TLS and the apiserver's
    // have no handshake in common, so the token is shown to work at that address from the host.)
    std::fs::create_dir_all(context.join("www/cgi-bin")).unwrap();
    let script = context.join("www/cgi-bin/apiserver");
    std::fs::write(
        &script,
        format!(
            "#!/bin/busybox sh\n\
             echo 'Content-Type: text/plain'\n\
             echo\n\
             echo 'GET / HTTP/1.0' | /bin/busybox nc -w 5 {} 443 2>&1\n",
            node::KUBERNETES_SERVICE_IP
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // And one that looks up the pod's own Service by its DNS name, and by its short name (the
    // pod's resolv.conf, which the kubelet writes, has the search domains). By nslookup: the
    // static busybox's wget cannot resolve (glibc's resolver, linked statically, crashes).
    let script = context.join("www/cgi-bin/dns");
    std::fs::write(
        &script,
        format!(
            "#!/bin/busybox sh\n\
             echo 'Content-Type: text/plain'\n\
             echo\n\
             /bin/busybox nslookup httpd.node-test.svc.{} 2>&1\n\
             /bin/busybox nslookup httpd 2>&1\n",
            node::CLUSTER_DOMAIN
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n\
         ENTRYPOINT [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    let podman = podman(work.path());
    let image = "localhost/stagely-testenv-httpd:1";
    podman(&["build", "-q", "-t", image, &context.to_string_lossy()]);
    let archive = work.path().join("httpd.tar");
    podman(&["save", "-q", "-o", &archive.to_string_lossy(), image]);
    podman(&["system", "reset", "-f"]);
    plane.import_image(&archive).expect("import the image");

    let namespace = "node-test";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .unwrap();
    let labels = serde_json::json!({"app": "httpd"});
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "httpd"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "httpd",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                }]},
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), namespace).create(&PostParams::default(), &deployment).await.unwrap();
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "httpd"},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let service =
        Api::<Service>::namespaced(client.clone(), namespace).create(&PostParams::default(), &service).await.unwrap();

    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod = eventually("the httpd pod to be Ready", Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels("app=httpd")).await.ok()?;
        list.items.into_iter().find(|pod| {
            let conditions = pod.status.as_ref().and_then(|status| status.conditions.as_deref()).unwrap_or_default();
            conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;
    let pod_ready = started.elapsed();
    let status = pod.status.as_ref().unwrap();
    let pod_ip = status.pod_ip.clone().expect("the pod has an IP");
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(node::NODE_NAME));
    assert_eq!(status.host_ip.as_deref(), Some(node::BRIDGE_IP));

    // Over the pod IP, from the host through the node's bridge.
    assert_eq!(get(&format!("{pod_ip}:8080"), "/"), Some((200, BODY.to_owned())));

    // The ServiceAccount token the kubelet mounted, as the container reads it: the apiserver
    // knows it as the namespace's default ServiceAccount, bound to this pod.
    let (code, token) = get(&format!("{pod_ip}:8080"), "/token").expect("the pod answers /token");
    assert_eq!(code, 200, "{token}");
    let review: TokenReview = serde_json::from_value(serde_json::json!({"spec": {"token": token.trim()}})).unwrap();
    let review = Api::<TokenReview>::all(client.clone()).create(&PostParams::default(), &review).await.unwrap();
    let review = review.status.expect("the review has a status");
    assert_eq!(review.authenticated, Some(true), "{review:?}");
    let user = review.user.expect("the review names the user");
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:node-test:default"));
    let extra = user.extra.unwrap_or_default();
    let pod_name = pod.metadata.name.clone().unwrap();
    assert_eq!(extra.get("authentication.kubernetes.io/pod-name"), Some(&vec![pod_name]), "{extra:?}");

    // From the pod, the apiserver through the `kubernetes` Service (kube-proxy's rules, to the
    // apiserver's address on the node's bridge); from the host, the same address serves a
    // certificate for it and knows the pod's token: what the operator's pods will use.
    let (code, answer) = get(&format!("{pod_ip}:8080"), "/cgi-bin/apiserver").expect("the pod answers");
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains("Client sent an HTTP request to an HTTPS server"), "{answer}");
    let ca = std::fs::read(plane.dir().join("pki/ca.crt")).unwrap();
    let mut config = kube::Config::new(format!("https://{}:443", node::KUBERNETES_SERVICE_IP).parse().unwrap());
    config.root_cert = Some(vec![pem_to_der(&ca)]);
    config.auth_info.token = Some(token.trim().to_owned().into());
    let as_pod = kube::Client::try_from(config).unwrap();
    let review: SelfSubjectReview = serde_json::from_value(serde_json::json!({})).unwrap();
    let review = Api::<SelfSubjectReview>::all(as_pod).create(&PostParams::default(), &review).await.unwrap();
    let user = review.status.and_then(|status| status.user_info).expect("the review names the user");
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:node-test:default"));

    // The apiserver reaches the kubelet (`kubectl logs`).
    let logs = plane.kubectl().args(["logs", "-n", namespace, "deployment/httpd"]).output().unwrap();
    assert!(logs.status.success(), "kubectl logs: {}", String::from_utf8_lossy(&logs.stderr));

    // Over the Service's ClusterIP: kube-proxy's rules send it to the pod once the endpoints
    // are in.
    let cluster_ip = service.spec.unwrap().cluster_ip.expect("the Service has a ClusterIP");
    assert!(cluster_ip.starts_with("10.0.0."), "{cluster_ip} in {}", node::SERVICE_CIDR);
    let answer = eventually("the Service's ClusterIP to answer", Duration::from_secs(30), || async {
        get(&format!("{cluster_ip}:80"), "/")
    })
    .await;
    assert_eq!(answer, (200, BODY.to_owned()));

    // Cluster DNS: from the pod, its Service's name and short name resolve to the ClusterIP
    // (CoreDNS, asked at the kubelet's clusterDNS).
    let (code, answer) = get(&format!("{pod_ip}:8080"), "/cgi-bin/dns").expect("the pod answers /cgi-bin/dns");
    assert_eq!(code, 200, "{answer}");
    let found = answer.matches(&format!("Address: {cluster_ip}")).count();
    assert_eq!(found, 2, "the Service's full and short names did not both resolve to {cluster_ip}:\n{answer}");
    let answered = started.elapsed();

    // Stopping the plane: every process, container, mount and the bridge go.
    let pids = plane.pids();
    let dir = plane.dir().to_owned();
    // containerd's shims (they name the node's socket) and the containers (in the pods' cgroups).
    let node_processes: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) || cgroup.contains("/kubepods/")
        })
        .collect();
    assert!(node_processes.len() >= 4, "a shim, the sandbox and httpd at least: {node_processes:?}");
    drop(plane);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let still: Vec<u32> = pids.iter().chain(&node_processes).copied().filter(|&pid| process_running(pid)).collect();
        if still.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left running: {still:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<&str> = mountinfo.lines().filter(|line| line.contains(&*dir.to_string_lossy())).collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
    assert!(!dir.exists(), "{dir:?} left behind");
    let links = node::with_system_path(&mut Command::new("ip")).args(["-br", "link"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains(node::BRIDGE), "the bridge is left");
    let tables = node::with_system_path(&mut Command::new("nft")).args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("kube-proxy"), "kube-proxy's nftables tables are left");
    let rules = node::with_system_path(&mut Command::new("iptables-save")).output().unwrap();
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("KUBE-"), "the kubelet's iptables chains are left");
    let cni_results = std::fs::read_dir("/var/lib/cni/results").into_iter().flatten().flatten();
    let cached: Vec<_> = cni_results
        .filter(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default().contains(&*dir.to_string_lossy()))
        .collect();
    assert!(cached.is_empty(), "libcni's cache is left: {cached:?}");
    let stopped = started.elapsed();
    eprintln!(
        "node ready after {node_started:?}, pod Ready after {pod_ready:?}, Service answered after {answered:?}, \
         everything stopped after {stopped:?}"
    );
}

/// A test process killed while its node runs (no destructor runs) leaves nothing behind either:
/// its processes die with it, and once it has exited its guard kills the containers, unmounts,
/// and removes the bridge.
#[test]
fn killing_the_test_process_cleans_up_its_node() {
    use std::io::BufRead;
    let _alone = one_node_at_a_time();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "holds_a_node_with_a_pod_until_killed", "--ignored", "--nocapture", "--test-threads=1"])
        .env("STAGELY_TESTENV_HOLDER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // libtest prints the test's name first, on the same line.
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.split_once("HOLDING ").map(|(_, rest)| rest.to_owned()))
        .expect("the holder's node");
    let mut words = line.split(' ');
    let dir = words.next().unwrap().to_owned();
    let pids: Vec<u32> = words.map(|pid| pid.parse().unwrap()).collect();
    assert!(pids.iter().all(|&pid| process_running(pid)));
    child.kill().unwrap(); // SIGKILL: no destructor runs in the holder.
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: Vec<u32> = pids.iter().copied().filter(|&pid| process_running(pid)).collect();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounted = mountinfo.lines().filter(|line| line.contains(&dir)).count();
        let links = node::with_system_path(&mut Command::new("ip")).args(["-br", "link"]).output().unwrap();
        let bridge = String::from_utf8_lossy(&links.stdout).contains(node::BRIDGE);
        if running.is_empty() && mounted == 0 && !bridge {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left after the holder was killed: processes {running:?}, {mounted} mounts, bridge {bridge}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "the process that killing_the_test_process_cleans_up_its_node starts and kills"]
fn holds_a_node_with_a_pod_until_killed() {
    assert!(
        std::env::var_os("STAGELY_TESTENV_HOLDER").is_some(),
        "run only by killing_the_test_process_cleans_up_its_node"
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let plane = ControlPlane::start(Options { node: true, ..Options::default() }).await.expect("start");
        let client = plane.client().await.unwrap();
        // A pod of the sandbox image alone: no image to build, and a shim, a container and
        // mounts to clean up.
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pause"},
            "spec": {"containers": [{"name": "pause", "image": node::PAUSE_IMAGE, "imagePullPolicy": "Never"}]},
        }))
        .unwrap();
        let pods = Api::<Pod>::namespaced(client, "default");
        pods.create(&PostParams::default(), &pod).await.unwrap();
        eventually("the pause pod to run", Duration::from_secs(60), || async {
            let pod = pods.get("pause").await.ok()?;
            (pod.status?.phase.as_deref() == Some("Running")).then_some(())
        })
        .await;
        // The node's processes, and its containers' (in the pods' cgroups) and their shims.
        let dir = plane.dir().to_string_lossy().into_owned();
        let mut pids = plane.pids();
        pids.extend(std::fs::read_dir("/proc").unwrap().flatten().filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            (String::from_utf8_lossy(&cmdline).contains(&dir) || cgroup.contains("/kubepods/")).then_some(pid)
        }));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        println!("HOLDING {dir} {}", pids.join(" "));
        std::future::pending::<()>().await;
    });
}
