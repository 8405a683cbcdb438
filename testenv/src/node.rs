//! The test node ([`Options::node`](crate::Options::node)): containerd (Debian's, with its CRI
//! plugin and Debian's CNI plugins), kubelet and kube-proxy on this machine, registered as one
//! Node of a [`ControlPlane`](crate::ControlPlane), so pods run and Services answer.
//!
//! What a node touches outside its directory is the machine's: the bridge [`BRIDGE`] (the pods'
//! network, [`POD_CIDR`]), kube-proxy's nftables tables and the `kubepods` cgroups. So one node
//! runs at a time on a machine: starting one waits for a lock (`$TMPDIR/stagely-node.lock`) that
//! the node holds until it is stopped and cleaned up. Everything else (containerd's root, state,
//! socket and runc root, the network namespaces, the kubelet's directory and pod logs, the CNI
//! configuration and address leases) lives in the node's own directory, apart from podman's and
//! Docker's.
//!
//! A container outlives containerd (its shim is a daemon) and kubelet's volume mounts outlive
//! kubelet, so stopping the processes is not enough: `cleanup.sh`, written into the node's
//! directory, kills the shims and containers, unmounts what is mounted below the directory, and
//! removes the bridge, kube-proxy's tables and the cgroups. The plane runs it when it stops, and
//! the [`at_exit`](crate::at_exit) guard runs it again once the test process has exited, however
//! it exited (a plane in a static is never dropped).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The node's name.
pub const NODE_NAME: &str = "stagely-testenv-node";
/// The bridge the pods' network interfaces hang on; the node's address is on it.
pub const BRIDGE: &str = "stagely-node0";
/// The node's address, on [`BRIDGE`]: pods reach the apiserver (and the host) there.
pub const BRIDGE_IP: &str = "10.244.0.1";
/// The pods' addresses.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The Services' cluster IPs (the apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The `kubernetes` Service's cluster IP: the first of [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";
/// The sandbox image, built by `testenv/build.sh` (`pause.tar` beside the binaries) and imported
/// into containerd when the node starts.
pub const PAUSE_IMAGE: &str = "stagely.dev/testenv/pause:1";
/// The cluster's DNS domain: a Service is `<name>.<namespace>.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Where pods ask for names: CoreDNS on the node's bridge address, port 53 (the kubelet's
/// `clusterDNS`; a cluster runs it as a Service, the test node as a process of the plane).
pub const CLUSTER_DNS_IP: &str = BRIDGE_IP;
/// The containerd namespace the CRI plugin (and so kubelet) uses.
const CRI_NAMESPACE: &str = "k8s.io";
/// The CNI network's name (the files libcni caches under `/var/lib/cni` carry it).
const CNI_NETWORK: &str = "stagely-testenv";

/// A started node's files and the machine-wide lock it holds.
pub(crate) struct Node {
    pub(crate) dir: PathBuf,
    pub(crate) socket: PathBuf,
    cleanup: PathBuf,
    /// Held while the node runs (and until its cleanup is done): one node per machine.
    _lock: File,
}

/// The files a node's processes are started with.
pub(crate) struct Files {
    pub(crate) containerd_config: PathBuf,
    pub(crate) kubelet_config: PathBuf,
    pub(crate) kube_proxy_config: PathBuf,
    pub(crate) kubelet_dir: PathBuf,
    pub(crate) corefile: PathBuf,
}

/// Ports the node's servers listen on (on the node's address or loopback).
pub(crate) struct Ports {
    /// CoreDNS's `ready` endpoint (200 once its Kubernetes watches have synced).
    pub(crate) dns_ready: u16,
    pub(crate) kubelet: u16,
    pub(crate) kubelet_healthz: u16,
    pub(crate) kube_proxy_healthz: u16,
    pub(crate) kube_proxy_metrics: u16,
}

impl Node {
    /// Takes the machine's node lock (waiting for another test's node to be cleaned up), cleans up
    /// after a node whose process died without its guard, and prepares `dir`.
    pub(crate) async fn prepare(dir: PathBuf, bin: &Path) -> Result<Self> {
        let lock = lock().await?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        // A node whose guard never ran (the machine stopped, say) left its cleanup script.
        let current = lock_path().with_extension("current");
        if let Ok(previous) = std::fs::read_to_string(&current)
            && Path::new(previous.trim()).exists()
        {
            let _ = with_system_path(&mut Command::new("sh")).arg(previous.trim()).output();
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let cleanup = dir.join("cleanup.sh");
        std::fs::write(&cleanup, cleanup_script(&dir, bin)).map_err(io(&cleanup))?;
        std::fs::write(&current, cleanup.to_string_lossy().as_bytes()).map_err(io(&current))?;
        // Once the test process has exited: under the lock, which the process held until then.
        crate::at_exit::run_at_exit(&format!(
            "flock {} sh {}",
            crate::at_exit::quote(&lock_path().to_string_lossy()),
            crate::at_exit::quote(&cleanup.to_string_lossy())
        ));
        let node = Node { socket: dir.join("containerd.sock"), dir, cleanup, _lock: lock };
        // What an earlier node left (its bridge, if its cleanup did not run) goes first.
        let _ = with_system_path(&mut Command::new("ip")).args(["link", "del", BRIDGE]).output();
        run("ip", Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
        run("ip", Command::new("ip").args(["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", BRIDGE]))?;
        run("ip", Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
        Ok(node)
    }

    /// Writes containerd's, the CNI's, kubelet's and kube-proxy's configuration.
    pub(crate) fn write_configs(&self, kubeconfig: &Path, ca_cert: &Path, ports: &Ports) -> Result<Files> {
        let dir = &self.dir;
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
            Ok(path)
        };
        let cni_dir = dir.join("cni");
        std::fs::create_dir_all(&cni_dir).map_err(|source| Error::Io { path: cni_dir.clone(), source })?;
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    // No masquerading: pods talk to the host and to each other only, and a rule
                    // per pod would be one more thing to clean up.
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        write("cni/10-stagely.conflist", serde_json::to_string_pretty(&conflist).expect("the conflist serializes"))?;

        // Debian's containerd 1.6; its defaults put everything under /var/lib/containerd and
        // /run/containerd, which podman's and Docker's tests do not use but another node would.
        let containerd_config = write(
            "containerd.toml",
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine's processes lack CAP_SYS_RESOURCE: a negative oom_score_adj is refused, and runc
  # then fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{runc}"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni}"
"#,
                root = dir.join("containerd/root").display(),
                state = dir.join("containerd/state").display(),
                socket = self.socket.display(),
                opt = dir.join("containerd/opt").display(),
                runc = dir.join("runc").display(),
                cni = cni_dir.display(),
            ),
        )?;

        let kubelet_dir = dir.join("kubelet");
        let kubelet = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": BRIDGE_IP,
            "port": ports.kubelet,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": ports.kubelet_healthz,
            "containerRuntimeEndpoint": format!("unix://{}", self.socket.display()),
            // These machines have a hybrid cgroup v1 hierarchy, no systemd, and swap is not
            // kubelet's business here.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": false,
            "failSwapOn": false,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": ca_cert},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": dir.join("pod-logs"),
            "serializeImagePulls": false,
            // A test node on a shared disk: evicting pods or removing images (the sandbox image
            // cannot be pulled back) because the disk fills would only make tests fail oddly.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "10s",
            "clusterDNS": [CLUSTER_DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
        });
        let kubelet_config =
            write("kubelet.yaml", serde_yaml::to_string(&kubelet).expect("the kubelet config serializes"))?;

        let kube_proxy = serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": kubeconfig},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": format!("127.0.0.1:{}", ports.kube_proxy_healthz),
            "metricsBindAddress": format!("127.0.0.1:{}", ports.kube_proxy_metrics),
            // Zero leaves the machine's conntrack sysctls as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        });
        let kube_proxy_config =
            write("kube-proxy.yaml", serde_yaml::to_string(&kube_proxy).expect("the kube-proxy config serializes"))?;
        // Services' and pods' names from the apiserver, every other name from the machine's
        // resolvers; on the bridge address only, so the machine's own port 53 stays free.
        let corefile = write(
            "Corefile",
            format!(
                ".:53 {{\n    bind {CLUSTER_DNS_IP}\n    errors\n    ready 127.0.0.1:{ready}\n    cache 5\n    \
                 kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n        kubeconfig {kubeconfig}\n        \
                 pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 5\n    }}\n    \
                 forward . /etc/resolv.conf\n}}\n",
                ready = ports.dns_ready,
                kubeconfig = kubeconfig.display(),
            ),
        )?;
        Ok(Files { containerd_config, kubelet_config, kube_proxy_config, kubelet_dir, corefile })
    }

    /// A `ctr` command on this node's containerd, in the CRI plugin's namespace.
    pub(crate) fn ctr(&self) -> Command {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address").arg(&self.socket).args(["--namespace", CRI_NAMESPACE]);
        ctr
    }

    /// Imports the images in `archive` (`podman save`'s or `docker save`'s archive, or an OCI
    /// archive) into containerd, where the kubelet finds them.
    pub(crate) fn import(&self, archive: &Path) -> Result<()> {
        run("ctr", self.ctr().args(["images", "import"]).arg(archive))
    }

    /// Runs the cleanup script (the node's processes must be stopped first).
    pub(crate) fn clean_up(&self) {
        let _ = with_system_path(&mut Command::new("sh")).arg(&self.cleanup).output();
    }
}

/// `command` with the system directories on its PATH: runc, ip, iptables and nft are in
/// /usr/sbin, which a user's PATH may lack.
pub fn with_system_path(command: &mut Command) -> &mut Command {
    let path = std::env::var("PATH").unwrap_or_default();
    command.env("PATH", format!("{path}:/usr/sbin:/sbin"))
}

/// Runs `command`, failing with its output unless it succeeds.
fn run(what: &'static str, command: &mut Command) -> Result<()> {
    let output = with_system_path(command).output().map_err(|source| Error::Spawn { name: what, source })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: format!("{command:?}"),
        output: format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    })
}

fn lock_path() -> PathBuf {
    std::env::temp_dir().join("stagely-node.lock")
}

/// The machine's node lock, waited for (a second test's node starts once the first's is cleaned
/// up).
async fn lock() -> Result<File> {
    let path = lock_path();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("stagely-testenv: waiting for {} (another test's node is running)", path.display());
        }
        Err(std::fs::TryLockError::Error(source)) => return Err(Error::Io { path, source }),
    }
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .expect("the lock task does not panic")
        .map_err(|source| Error::Io { path, source })
}

/// The shell script that removes what the node's processes leave behind once they are gone.
/// Idempotent; only the node's own files, processes and mounts, and the machine-wide things
/// (bridge, nftables tables, cgroups) only while it is the machine's current node.
fn cleanup_script(dir: &Path, bin: &Path) -> String {
    let q = |path: &Path| crate::at_exit::quote(&path.to_string_lossy());
    format!(
        r#"# Written by stagely-testenv: removes what the test node in this directory leaves behind.
PATH="$PATH:/usr/sbin:/sbin"
node={node}
socket={socket}
runc_root={runc}
current={current}
# Containers: runc kills each and removes its state and cgroup (the shim keeps a runc root per
# containerd namespace).
for root in "$runc_root"/*; do
  [ -d "$root" ] || continue
  for id in $(runc --root "$root" list -q 2>/dev/null); do runc --root "$root" delete --force "$id" >/dev/null 2>&1; done
done
# containerd's shims (daemons: they outlive containerd), found by the socket they were given.
for proc in /proc/[0-9]*; do
  if tr '\0' ' ' <"$proc/cmdline" 2>/dev/null | grep -qF -- "-address $socket "; then
    id=$(tr '\0' '\n' <"$proc/cmdline" | sed -n '/^-id$/{{n;p;}}')
    kill -9 "${{proc#/proc/}}" 2>/dev/null
    [ -n "$id" ] && rm -f "/run/containerd/s/$(printf '%s' "$socket/{ns}/$id" | sha256sum | cut -c1-64)"
  fi
done
# Mounts below the directory (container root filesystems, volumes, network namespaces), deepest first.
awk -v dir="$node/" 'index($5, dir) == 1 {{print $5}}' /proc/self/mountinfo | sort -r | while read -r mount; do
  umount -l "$mount" 2>/dev/null
done
# libcni's cache of the pods' networks (this node's, and containerd's loopback), which names the
# network namespaces below the directory.
grep -lsF "$node/" /var/lib/cni/results/* | while read -r result; do rm -f "$result"; done
rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
if [ "$(cat "$current" 2>/dev/null)" = "$node/cleanup.sh" ]; then
  ip link del {bridge} 2>/dev/null
  {kube_proxy} --cleanup >/dev/null 2>&1
  # The kubelet's own chains: the canaries, the iptables hint and the localnet firewall.
  for iptables in iptables ip6tables; do
    $iptables -w -D INPUT -j KUBE-FIREWALL 2>/dev/null
    $iptables -w -D OUTPUT -j KUBE-FIREWALL 2>/dev/null
    $iptables -w -F KUBE-FIREWALL 2>/dev/null && $iptables -w -X KUBE-FIREWALL
    for table in mangle nat filter; do
      $iptables -w -t $table -F KUBE-KUBELET-CANARY 2>/dev/null && $iptables -w -t $table -X KUBE-KUBELET-CANARY
    done
    $iptables -w -t mangle -X KUBE-IPTABLES-HINT 2>/dev/null
  done
  # The device plugin socket is the one path the kubelet keeps under /var/lib/kubelet whatever
  # its root directory.
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null
  for cgroup in /sys/fs/cgroup/*/kubepods; do
    [ -d "$cgroup" ] && find "$cgroup" -depth -type d -exec rmdir {{}} \; 2>/dev/null
  done
  rm -f "$current"
fi
exit 0
"#,
        node = q(dir),
        socket = q(&dir.join("containerd.sock")),
        runc = q(&dir.join("runc")),
        current = q(&lock_path().with_extension("current")),
        ns = CRI_NAMESPACE,
        bridge = BRIDGE,
        kube_proxy = q(&bin.join("kube-proxy")),
    )
}
