//! A real Kubernetes control plane for Stagely's tests and demo: etcd, kube-apiserver and
//! (optionally) kube-controller-manager, built from Go modules by `testenv/build.sh` and started
//! on free loopback ports in a temporary directory; optionally with a node (kube-scheduler,
//! containerd, kubelet and kube-proxy: see [`node`]) that runs pods.
//!
//! The apiserver encrypts Secrets at rest (an `EncryptionConfiguration` with `secretbox` and a
//! random key per control plane, `identity` only to read what was written before), as a
//! production cluster should: a Secret's value is never in etcd's data files in clear text.
//!
//! A [`ControlPlane`] stops every process it started when it is dropped, including while a
//! test panics. The processes also get `PR_SET_PDEATHSIG`, so they die with the test process
//! even when it is killed before any destructor can run.

pub mod at_exit;
pub mod node;
pub mod pki;
pub mod registry;
pub mod scan;
pub mod server;
mod spawn;
pub mod tap;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

/// What can go wrong while starting or using the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `testenv/build.sh` failed.
    #[error("failed to build the control plane binaries: {0}")]
    Build(String),
    /// Files in the working directory could not be written.
    #[error("failed to prepare {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("failed to start {name}: {source}")]
    Spawn {
        /// The binary.
        name: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A process exited or did not become ready in time.
    #[error("{name} did not become ready: {reason}\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        /// The binary.
        name: &'static str,
        /// Why.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Certificates or keys could not be generated.
    #[error("failed to generate certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// The Kubernetes client failed.
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be loaded.
    #[error("failed to load the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// A CRD did not become Established in time.
    #[error("CRD {0} did not become Established")]
    CrdNotEstablished(String),
    /// A command failed.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// The control plane was started without a node.
    #[error("the control plane has no node (start it with `Options {{ node: true, .. }}`)")]
    NoNode,
    /// A node cannot run detached.
    #[error("a node cannot be left running (`Options::detach`): its cleanup needs the test process")]
    DetachedNode,
}

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long each component may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// What to start.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also start kube-controller-manager with the garbage collector (owner-reference cascade).
    pub controller_manager: bool,
    /// Also run a node (see [`node`]): kube-scheduler, containerd, kubelet and kube-proxy, with
    /// the controller manager running every default controller (service accounts and their
    /// tokens, node lifecycle, deployments, replica sets, endpoints, the garbage collector...).
    /// The apiserver then also listens on the node's address, where pods reach it through the
    /// `kubernetes` Service. One node runs at a time on a machine: a second waits for the first
    /// to stop.
    pub node: bool,
    /// CRDs to install (and wait for) before the controller manager starts, so its garbage
    /// collector watches them from its first discovery.
    pub crds: Vec<CustomResourceDefinition>,
    /// Where to keep data, logs and the kubeconfig. When `None`, a temporary directory that is
    /// removed on drop.
    pub dir: Option<PathBuf>,
    /// Leave the processes running when the [`ControlPlane`] is dropped (for `make demo`);
    /// their pids are written to `<dir>/pids`.
    pub detach: bool,
}

/// A running etcd + kube-apiserver (+ kube-controller-manager).
pub struct ControlPlane {
    dir: PathBuf,
    tempdir_guard: Option<tempfile::TempDir>,
    children: Vec<(&'static str, Child)>,
    kubeconfig: PathBuf,
    server: String,
    detach: bool,
    /// Set once `start` succeeded: a detached plane that failed to start is still stopped.
    started: bool,
    /// The node, when one was asked for.
    node: Option<node::Node>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("dir", &self.dir).field("server", &self.server).finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts the control plane and waits until the apiserver is ready (and the CRDs in
    /// `options` are Established).
    pub async fn start(options: Options) -> Result<Self> {
        if options.node && options.detach {
            return Err(Error::DetachedNode);
        }
        let bin = binaries()?;
        let (dir, tempdir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
                // Absolute, because the kubeconfig names files in it and may be read from anywhere.
                let dir = std::fs::canonicalize(dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
                (dir, None)
            }
            None => {
                sweep_stale_dirs();
                let tmp = tempfile::Builder::new()
                    .prefix("stagely-testenv-")
                    .tempdir()
                    .map_err(|source| Error::Io { path: std::env::temp_dir(), source })?;
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let owner = dir.join("owner.pid");
        std::fs::write(&owner, std::process::id().to_string()).map_err(|source| Error::Io { path: owner, source })?;
        let pki = pki::write(&dir)?;
        let encryption = write_encryption_config(&dir)?;
        let mut plane = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            server: String::new(),
            dir,
            tempdir_guard: tempdir,
            children: Vec::new(),
            detach: options.detach,
            started: false,
            node: None,
        };

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args(["--name", "default", "--log-level", "warn", "--unsafe-no-fsync"])
            .arg("--data-dir")
            .arg(plane.dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")]);
        plane.spawn("etcd", etcd)?;

        let api_port = free_port()?;
        plane.server = format!("https://127.0.0.1:{api_port}");
        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver.arg(format!("--etcd-servers={etcd_url}")).arg(format!("--secure-port={api_port}"));
        if options.node {
            // Pods reach the apiserver through the `kubernetes` Service, whose endpoint is the
            // node's address on the pods' bridge.
            apiserver
                .args(["--bind-address=0.0.0.0", &format!("--advertise-address={}", node::BRIDGE_IP)])
                // The node's name resolves nowhere; its InternalIP is the bridge address.
                .arg("--kubelet-preferred-address-types=InternalIP")
                .arg(format!("--kubelet-client-certificate={}", pki.kubelet_client_cert.display()))
                .arg(format!("--kubelet-client-key={}", pki.kubelet_client_key.display()));
        } else {
            apiserver.args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
            ]);
        }
        apiserver
            .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", pki.serving_key.display()))
            .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
            .arg(format!("--token-auth-file={}", pki.tokens.display()))
            .args(["--authorization-mode=RBAC", &format!("--service-cluster-ip-range={}", node::SERVICE_CIDR)])
            .args(["--service-account-issuer=https://kubernetes.default.svc.cluster.local"])
            .arg(format!("--service-account-key-file={}", pki.sa_public.display()))
            .arg(format!("--service-account-signing-key-file={}", pki.sa_private.display()))
            .arg(format!("--encryption-provider-config={}", encryption.display()))
            .arg("--v=1");
        plane.spawn("kube-apiserver", apiserver)?;
        write_kubeconfig(&plane.kubeconfig, &plane.server, &pki)?;
        plane.wait_ready().await?;

        if !options.crds.is_empty() {
            plane.install_crds(&options.crds).await?;
        }
        if options.controller_manager || options.node {
            let mut kcm = Command::new(bin.join("kube-controller-manager"));
            kcm.arg(format!("--kubeconfig={}", plane.kubeconfig.display())).args([
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
            ]);
            if options.node {
                // Every default controller; service account tokens are signed with the apiserver's
                // key, and pods trust the CA in the `kube-root-ca.crt` ConfigMaps.
                kcm.arg("--controllers=*")
                    .arg(format!("--service-account-private-key-file={}", pki.sa_private.display()))
                    .arg(format!("--root-ca-file={}", pki.ca_cert.display()))
                    .args(["--node-monitor-period=2s", "--node-startup-grace-period=20s"]);
            } else {
                kcm.arg("--controllers=garbagecollector");
            }
            kcm.arg("--v=1");
            plane.spawn("kube-controller-manager", kcm)?;
        }
        if options.node {
            plane.start_node(&bin, &pki).await?;
        }
        if plane.detach {
            let pids: Vec<String> = plane.children.iter().map(|(_, c)| c.id().to_string()).collect();
            let path = plane.dir.join("pids");
            std::fs::write(&path, pids.join("\n") + "\n").map_err(|source| Error::Io { path, source })?;
        }
        plane.started = true;
        Ok(plane)
    }

    /// The directory holding data, logs (`<name>.log`) and the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kubeconfig file (cluster-admin, via a static token).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Process ids of the running components, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, child)| child.id()).collect()
    }

    /// A new client for this control plane, bound to the calling tokio runtime.
    pub async fn client(&self) -> Result<kube::Client> {
        // The operator's AWS SDK brings rustls's aws-lc-rs backend next to kube's ring one; with
        // both compiled in, rustls cannot pick on its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A `kubectl` command (the one built with the control plane, so its version matches)
    /// pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let kubectl = binaries().map(|dir| dir.join("kubectl")).unwrap_or_else(|_| PathBuf::from("kubectl"));
        let mut cmd = Command::new(kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Imports the images in `archive` (`podman save`'s archive, or an OCI archive) into the
    /// node's containerd, where pods find them: give their containers `imagePullPolicy: Never`
    /// or `IfNotPresent` (the node pulls from no registry).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        self.node.as_ref().ok_or(Error::NoNode)?.import(archive)
    }

    /// A `ctr` command on the node's containerd, in the namespace the kubelet uses.
    pub fn ctr(&self) -> Result<Command> {
        Ok(self.node.as_ref().ok_or(Error::NoNode)?.ctr())
    }

    /// Starts kube-scheduler, containerd (with the sandbox image imported), kubelet, kube-proxy and
    /// CoreDNS, and waits until the node is Ready and schedulable, kube-proxy has synced and
    /// CoreDNS answers for the cluster's names.
    async fn start_node(&mut self, bin: &Path, pki: &pki::Files) -> Result<()> {
        for file in ["kube-scheduler", "kubelet", "kube-proxy", "pause.tar", "coredns"] {
            if !bin.join(file).exists() {
                return Err(Error::Build(format!(
                    "{} has no {file}: it was built before testenv had a node; point STAGELY_TESTENV_BIN at \
                     what `testenv/build.sh` prints now",
                    bin.display()
                )));
            }
        }
        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler.arg(format!("--kubeconfig={}", self.kubeconfig.display())).args([
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--v=1",
        ]);
        self.spawn("kube-scheduler", scheduler)?;

        let node = node::Node::prepare(self.dir.join("node"), bin).await?;
        let ports = node::Ports {
            dns_ready: free_port()?,
            kubelet: free_port()?,
            kubelet_healthz: free_port()?,
            kube_proxy_healthz: free_port()?,
            kube_proxy_metrics: free_port()?,
        };
        let files = node.write_configs(&self.kubeconfig, &pki.ca_cert, &ports)?;
        let socket = node.socket.clone();
        self.node = Some(node);

        let mut containerd = Command::new("containerd");
        node::with_system_path(&mut containerd).arg("--config").arg(&files.containerd_config);
        self.spawn("containerd", containerd)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let answered =
                socket.exists() && self.ctr()?.arg("version").output().map(|out| out.status.success()).unwrap_or(false);
            if answered {
                break;
            }
            if Instant::now() > deadline {
                return Err(
                    self.not_ready("containerd", format!("`ctr version` still failing after {READY_TIMEOUT:?}"))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.import_image(&bin.join("pause.tar"))?;

        let mut kubelet = Command::new(bin.join("kubelet"));
        node::with_system_path(&mut kubelet)
            .arg(format!("--config={}", files.kubelet_config.display()))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--root-dir={}", files.kubelet_dir.display()))
            .arg(format!("--cert-dir={}", files.kubelet_dir.join("pki").display()))
            .arg(format!("--hostname-override={}", node::NODE_NAME))
            .arg(format!("--node-ip={}", node::BRIDGE_IP))
            .arg("--v=1");
        self.spawn("kubelet", kubelet)?;
        let mut kube_proxy = Command::new(bin.join("kube-proxy"));
        node::with_system_path(&mut kube_proxy)
            .arg(format!("--config={}", files.kube_proxy_config.display()))
            .arg("--v=1");
        self.spawn("kube-proxy", kube_proxy)?;
        let mut coredns = Command::new(bin.join("coredns"));
        coredns.arg("-conf").arg(&files.corefile);
        self.spawn("coredns", coredns)?;

        let client = self.client().await?;
        let nodes: Api<Node> = Api::all(client);
        loop {
            self.check_alive()?;
            let node = nodes.get_opt(node::NODE_NAME).await?;
            let ready = node.as_ref().is_some_and(|node| {
                let status = node.status.as_ref();
                let conditions = status.and_then(|status| status.conditions.as_deref()).unwrap_or_default();
                let taints = node.spec.as_ref().and_then(|spec| spec.taints.as_deref()).unwrap_or_default();
                conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    && !taints.iter().any(|taint| taint.key == "node.kubernetes.io/not-ready")
            });
            let proxy_synced = registry::get_status(ports.kube_proxy_healthz, "/healthz") == Some(200);
            let dns_ready = registry::get_status(ports.dns_ready, "/ready") == Some(200);
            if ready && proxy_synced && dns_ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                let (name, what) = if !ready {
                    ("kubelet", "the node not Ready and untainted")
                } else if !proxy_synced {
                    ("kube-proxy", "/healthz not 200")
                } else {
                    ("coredns", "/ready not 200")
                };
                return Err(self.not_ready(name, format!("{what} after {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Applies CRDs (server-side) and waits until each is Established.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> Result<()> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let params = PatchParams::apply("stagely-testenv").force();
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &Patch::Apply(crd)).await?;
        }
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            match tokio::time::timeout(READY_TIMEOUT, established).await {
                Ok(Ok(_)) => {}
                _ => return Err(Error::CrdNotEstablished(name)),
            }
        }
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Io { path: log_path.clone(), source })?;
        let err = log.try_clone().map_err(|source| Error::Io { path: log_path, source })?;
        cmd.current_dir(&self.dir).stdin(Stdio::null()).stdout(log).stderr(err);
        let child = spawn::spawn(cmd, self.detach).map_err(|source| Error::Spawn { name, source })?;
        self.children.push((name, child));
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let request = http::Request::get("/readyz").body(Vec::new()).expect("static request");
            let last = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(err) => err.to_string(),
            };
            if Instant::now() > deadline {
                return Err(
                    self.not_ready("kube-apiserver", format!("/readyz still failing after {READY_TIMEOUT:?}: {last}"))
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        let exited = self
            .children
            .iter_mut()
            .find_map(|(name, child)| child.try_wait().ok().flatten().map(|status| (*name, status)));
        match exited {
            Some((name, status)) => Err(self.not_ready(name, format!("exited early with {status}"))),
            None => Ok(()),
        }
    }

    fn not_ready(&self, name: &'static str, reason: String) -> Error {
        let log = self.dir.join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        Error::NotReady { name, reason, log, tail }
    }

    /// Stops every process (newest first) and waits for each to exit; then removes what the
    /// node's left behind (containers, mounts, its bridge and rules) and lets another node start.
    pub fn stop(&mut self) {
        while let Some((_, mut child)) = self.children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(node) = self.node.take() {
            node.clean_up();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.detach && self.started {
            // The children outlive us on purpose; `stagely-testenv down` stops them.
            self.children.clear();
            if let Some(tmp) = self.tempdir_guard.take() {
                let _ = tmp.keep();
            }
        } else {
            self.stop();
        }
    }
}

/// One control plane shared by every test of a test binary, started on first use with the
/// options `init` returns. Its processes die with the test process (parent-death signal); its
/// temporary directory is removed by the next run's sweep.
pub fn shared(init: impl FnOnce() -> Options) -> &'static ControlPlane {
    static SHARED: OnceLock<ControlPlane> = OnceLock::new();
    SHARED.get_or_init(|| {
        let options = init();
        // Each #[tokio::test] has its own runtime; start on a runtime of our own so the plane
        // does not depend on whichever test came first.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            let mut plane = runtime.block_on(ControlPlane::start(options)).unwrap_or_else(|err| panic!("{err}"));
            // Statics are never dropped: keep the directory, and rely on the parent-death signal.
            if let Some(tmp) = plane.tempdir_guard.take() {
                let _ = tmp.keep();
            }
            plane
        })
        .join()
        .expect("control plane start panicked")
    })
}

/// The directory holding etcd, kube-apiserver, kube-controller-manager, kubectl and the node's
/// kube-scheduler, kubelet, kube-proxy and `pause.tar`: `$STAGELY_TESTENV_BIN`
/// if set, else the output of `testenv/build.sh` (which builds them once per machine).
pub fn binaries() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = std::env::var_os("STAGELY_TESTENV_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|err| format!("{}: {err}", script.display()))?;
        if !output.status.success() {
            return Err(format!("{} exited with {}", script.display(), output.status));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout.lines().last().map(PathBuf::from).ok_or_else(|| format!("{} printed no directory", script.display()))
    })
    .clone()
    .map_err(Error::Build)
}

fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io { path: "127.0.0.1:0".into(), source })?;
    let port = listener.local_addr().map_err(|source| Error::Io { path: "127.0.0.1:0".into(), source })?.port();
    Ok(port)
}

fn write_kubeconfig(path: &Path, server: &str, pki: &pki::Files) -> Result<()> {
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stagely-testenv", "cluster": {
            "server": server,
            "certificate-authority": pki.ca_cert,
        }}],
        "users": [{"name": "admin", "user": {"token": pki.token}}],
        "contexts": [{"name": "stagely-testenv", "context": {"cluster": "stagely-testenv", "user": "admin", "namespace": "default"}}],
        "current-context": "stagely-testenv",
    });
    let yaml = serde_yaml::to_string(&kubeconfig).expect("kubeconfig serializes");
    std::fs::write(path, yaml).map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// The file holding the apiserver's `EncryptionConfiguration` in a control plane's directory.
pub const ENCRYPTION_CONFIG: &str = "encryption-config.yaml";

/// The resource key prefix that Secrets encrypted at rest carry in etcd (`k8s:enc:<provider>:v1:<key name>:`).
pub const ENCRYPTED_PREFIX: &str = "k8s:enc:secretbox:v1:testenv:";

/// Writes the `EncryptionConfiguration` (0600: it holds the key) that makes the apiserver encrypt
/// Secrets at rest with `secretbox` (XSalsa20-Poly1305) and a new random 32-byte key, unless `dir`
/// has one already; `identity` comes last, so only what was stored before encryption was on is
/// read in clear.
fn write_encryption_config(dir: &Path) -> Result<PathBuf> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(ENCRYPTION_CONFIG);
    // A directory given again (`make demo`) may hold etcd data encrypted with the key it holds.
    if path.exists() {
        return Ok(path);
    }
    let io = |source| Error::Io { path: path.clone(), source };
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|err| io(std::io::Error::other(err)))?;
    let config = serde_json::json!({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{
            "resources": ["secrets"],
            "providers": [
                {"secretbox": {"keys": [{"name": "testenv", "secret": base64::engine::general_purpose::STANDARD.encode(key)}]}},
                {"identity": {}},
            ],
        }],
    });
    let yaml = serde_yaml::to_string(&config).expect("the encryption configuration serializes");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| file.write_all(yaml.as_bytes()))
        .map_err(io)?;
    Ok(path)
}

/// Removes temporary directories left by earlier test processes (a shared plane's directory
/// outlives its process) once their owner has exited.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("stagely-testenv-") {
            continue;
        }
        let owner = std::fs::read_to_string(path.join("owner.pid")).ok().and_then(|pid| pid.trim().parse::<u32>().ok());
        if let Some(pid) = owner
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Whether process `pid` is running: it exists and is not a zombie waiting to be reaped.
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// Starts `command` so that it dies with this process (SIGKILL when the test process exits,
/// however it exits): for the operator and other servers a test runs as child processes.
pub fn spawn_tied(command: Command) -> std::io::Result<Child> {
    spawn::spawn(command, false)
}
