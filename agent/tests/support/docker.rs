//! Docker as production VMs run it, confined to one test: Debian's `docker.io` daemon
//! (`dockerd --iptables=false --storage-driver=vfs`) with its own data root, exec root, socket
//! and daemon configuration, and `docker compose` from the Compose v2 plugin that
//! `scripts/install-deps.sh` builds from its Go module.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The /16s of 10.0.0.0/8 that test daemons take their networks from, one each: `10.<n>.0.0`.
const SUBNETS: std::ops::Range<u8> = 200..250;

/// How long a daemon may take to answer, and to stop.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// A private dockerd for one test, stopped (its containers and networks removed first) and its
/// directories removed when dropped; it dies with the test process however that ends.
///
/// Its default bridge is a bridge of its own and its networks come from a /16 no other test's
/// daemon holds (a lock file per /16, held while the daemon runs, and no host route in it), so
/// daemons of tests running side by side, podman's networks and the host's never overlap.
/// Registries on loopback are reached over plain HTTP, as docker allows by default.
pub struct Docker {
    /// Environment for every docker command the test and its agent run: the daemon's socket.
    pub env: Vec<(String, String)>,
    /// A docker configuration directory whose `cli-plugins/` holds the compose plugin: given to
    /// the agent as its user's `DOCKER_CONFIG`, and used by [`Docker::command`].
    pub config_dir: PathBuf,
    daemon: Child,
    root: PathBuf,
    bridge: String,
    /// Socket paths under the exec root must stay short: it is not under the test's tempdir.
    exec_root: tempfile::TempDir,
    _subnet: File,
}

impl Docker {
    /// Starts a daemon with its files under `dir` and waits until it answers. Fails loudly when
    /// docker, dockerd, `ip` or the compose plugin is missing: `scripts/install-deps.sh`
    /// installs them.
    pub fn new(dir: &Path) -> Self {
        super::assert_installed(&["dockerd", "docker", "ip", "git"]);
        let cache = std::env::var_os("STAGELY_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/stagely"));
        let plugin = cache.join("docker/cli-plugins/docker-compose");
        assert!(
            plugin.is_file(),
            "the docker compose plugin is not built ({} is missing): run scripts/install-deps.sh (make deps)",
            plugin.display()
        );

        let root = dir.join("docker");
        let config_dir = root.join("config");
        std::fs::create_dir_all(config_dir.join("cli-plugins")).unwrap();
        std::os::unix::fs::symlink(&plugin, config_dir.join("cli-plugins/docker-compose")).unwrap();
        let daemon_json = root.join("daemon.json");
        // Its own (empty) configuration: never the machine's /etc/docker/daemon.json.
        std::fs::write(&daemon_json, "{}\n").unwrap();
        let exec_root = tempfile::Builder::new().prefix("stagely-dx").tempdir().unwrap();
        let (n, subnet) = claim_subnet();
        let bridge = format!("stagely-d{n}");
        ip(&["link", "add", "name", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.{n}.0.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);

        let socket = root.join("docker.sock");
        let log_path = root.join("dockerd.log");
        let log = File::create(&log_path).unwrap();
        let mut command = Command::new("dockerd");
        command
            .arg("--config-file")
            .arg(&daemon_json)
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(exec_root.path())
            .arg("--pidfile")
            .arg(root.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--iptables=false", "--storage-driver=vfs", "--shutdown-timeout=2"])
            .arg(format!("--bridge={bridge}"))
            .arg(format!("--default-address-pool=base=10.{n}.0.0/16,size=24"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let daemon = stagely_testenv::spawn_tied(command).expect("dockerd starts");
        let env = vec![("DOCKER_HOST".to_owned(), format!("unix://{}", socket.display()))];
        let mut docker = Self { env, config_dir, daemon, root, bridge, exec_root, _subnet: subnet };

        let deadline = Instant::now() + DAEMON_TIMEOUT;
        while !pings(&socket) {
            let tail = || {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            if let Ok(Some(status)) = docker.daemon.try_wait() {
                panic!("dockerd exited with {status}; the end of {}:\n{}", log_path.display(), tail());
            }
            assert!(Instant::now() < deadline, "dockerd did not answer within {DAEMON_TIMEOUT:?}:\n{}", tail());
            std::thread::sleep(Duration::from_millis(100));
        }
        let version = docker.command().args(["compose", "version"]).output().unwrap();
        assert!(
            version.status.success(),
            "`docker compose version` fails with the plugin {}: {}",
            plugin.display(),
            String::from_utf8_lossy(&version.stderr)
        );
        docker
    }

    /// A docker command against this daemon, finding the compose plugin.
    pub fn command(&self) -> Command {
        let mut command = Command::new("docker");
        command.envs(self.env.iter().map(|(k, v)| (k, v))).env("DOCKER_CONFIG", &self.config_dir);
        command
    }

    /// Runs docker with `args` and returns its standard output; panics on failure.
    pub fn run(&self, args: &[&str]) -> String {
        super::output_of(self.command(), args)
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // What a failed test left, then the networks: their bridges and routes would outlive
        // the daemon and keep its /16 from the next test.
        if let Ok(ids) = self.command().args(["ps", "-aq"]).output() {
            let ids = String::from_utf8_lossy(&ids.stdout).split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            if !ids.is_empty() {
                let _ = self.command().args(["rm", "-f"]).args(&ids).output();
            }
        }
        let _ = self.command().args(["network", "prune", "-f"]).output();
        let _ = Command::new("kill").args(["-TERM", &self.daemon.id().to_string()]).status();
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        while matches!(self.daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        unmount_under(self.exec_root.path());
        unmount_under(&self.root);
        let _ = Command::new("ip").args(["link", "delete", &self.bridge]).output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Unmounts what a stopped daemon left mounted under `dir`, deepest first: it keeps the host
/// network's namespace mounted under its exec root (`netns/default`) once a container ran on
/// the host network, and the directory could not be removed.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        let _ = Command::new("umount").arg(point).output();
    }
}

/// Whether the daemon on `socket` answers its ping.
fn pings(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut response = String::new();
    stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.split_whitespace().nth(1) == Some("200")
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Takes the first /16 of [`SUBNETS`] whose lock no other process holds and that no host route
/// overlaps, and its lock: held until dropped, and let go by the kernel when the process dies.
fn claim_subnet() -> (u8, File) {
    let locks = std::env::temp_dir().join("stagely-docker-subnets");
    std::fs::create_dir_all(&locks).unwrap();
    for n in SUBNETS {
        let lock =
            File::options().create(true).truncate(false).write(true).open(locks.join(format!("10.{n}"))).unwrap();
        if lock.try_lock().is_err() {
            continue;
        }
        // Its lock was free, so a bridge of that name is left from a test process that died.
        let _ = Command::new("ip").args(["link", "delete", &format!("stagely-d{n}")]).output();
        if !routed(u32::from_be_bytes([10, n, 0, 0]), 0xffff_0000) {
            return (n, lock);
        }
    }
    panic!("no subnet of 10.{}.0.0/16 to 10.{}.0.0/16 is free for a test's dockerd", SUBNETS.start, SUBNETS.end - 1);
}

/// Whether a route of the host's main table other than the default overlaps `network`/`mask`.
fn routed(network: u32, mask: u32) -> bool {
    let table = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Addresses are in the kernel's (little-endian) byte order.
        let hex = |i: usize| fields.get(i).and_then(|f| u32::from_str_radix(f, 16).ok()).map(u32::from_be);
        match (hex(1), hex(7)) {
            (Some(destination), Some(route_mask)) if route_mask != 0 => {
                let common = route_mask & mask;
                destination & common == network & common
            }
            _ => false,
        }
    })
}
