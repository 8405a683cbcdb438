//! `stagely-testenv up DIR` starts a local control plane that keeps running (for `make demo`),
//! optionally with redis-server and the image registry (token auth, with a signing key and
//! certificate generated into `DIR/registry/`); `stagely-testenv down DIR` stops every process
//! `DIR/pids` lists and removes DIR.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use stagely_testenv::registry::{Registry, TokenAuth, TokenKey};
use stagely_testenv::server::Server;
use stagely_testenv::{ControlPlane, Options, process_running};

const USAGE: &str = "usage: stagely-testenv up DIR [--redis-port PORT] [--registry-port PORT --registry-realm URL] \
                     | stagely-testenv down DIR";

/// What `up` starts besides the control plane.
#[derive(Default)]
struct Extras {
    redis_port: Option<u16>,
    registry_port: Option<u16>,
    registry_realm: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["up", dir, rest @ ..] => match extras(rest) {
            Ok(extras) => up(PathBuf::from(dir), extras).await,
            Err(err) => Err(format!("{err}\n{USAGE}")),
        },
        ["down", dir] => down(PathBuf::from(dir)),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stagely-testenv: {err}");
            ExitCode::FAILURE
        }
    }
}

fn extras(args: &[&str]) -> Result<Extras, String> {
    let mut extras = Extras::default();
    let mut args = args.iter();
    while let Some(&flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let port = || value.parse::<u16>().map_err(|_| format!("{flag}: {value:?} is not a port"));
        match flag {
            "--redis-port" => extras.redis_port = Some(port()?),
            "--registry-port" => extras.registry_port = Some(port()?),
            "--registry-realm" => extras.registry_realm = Some((*value).to_owned()),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if extras.registry_port.is_some() != extras.registry_realm.is_some() {
        return Err("--registry-port and --registry-realm go together".to_owned());
    }
    Ok(extras)
}

async fn up(dir: PathBuf, extras: Extras) -> Result<(), String> {
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
    // Each server's pid joins the control plane's in DIR/pids as soon as it runs, so `down`
    // stops whatever started even when a later step fails.
    let dir = plane.dir().to_owned();
    if let Some(port) = extras.redis_port {
        let redis = Server::redis_detached(port, &dir.join("redis")).map_err(|err| err.to_string())?;
        record_pid(&dir, redis.pid())?;
        println!("redis-server running at {}", redis.url());
    }
    if let (Some(port), Some(realm)) = (extras.registry_port, extras.registry_realm) {
        let registry_dir = dir.join("registry");
        let key = TokenKey::generate().map_err(|err| err.to_string())?;
        write_file(&registry_dir.join("token.key"), &key.key_pem, 0o600)?;
        write_file(&registry_dir.join("token.crt"), &key.cert_pem, 0o644)?;
        let auth = TokenAuth {
            realm,
            service: "stagely-registry".to_owned(),
            issuer: "stagely".to_owned(),
            root_cert_pem: key.cert_pem.clone(),
        };
        let registry = Registry::start_detached(&auth, port, &registry_dir).map_err(|err| err.to_string())?;
        record_pid(&dir, registry.pid())?;
        println!(
            "registry running at {} (token auth: realm {}, service {}, issuer {}; signing key and certificate in {})",
            registry.url(),
            auth.realm,
            auth.service,
            auth.issuer,
            registry_dir.display()
        );
    }
    Ok(())
}

fn record_pid(dir: &Path, pid: u32) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join("pids");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{pid}"))
        .map_err(|err| format!("failed to record pid {pid} in {}: {err}", path.display()))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |err: std::io::Error| format!("failed to write {}: {err}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(fail)
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
