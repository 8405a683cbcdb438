//! cloud-init user data for builder and preview VMs: installs Docker with the compose plugin,
//! fetches and checks the agent, writes its configuration, and runs it under systemd.
//!
//! The only credential in the user data is the agent's short-lived, single-use enrollment token:
//! user data is readable from the VM's metadata service, so nothing else may be put there.
//! Secrets reach the VM later, over the agent's authenticated connection. The gateway's CA
//! certificate, when the operator has one, goes into the agent's configuration too (public, and
//! only its certificates: [`read_gateway_ca`]), and the agent then trusts no other CA.

use std::path::{Path, PathBuf};

use serde::Serialize;
use stagely_api::v1alpha1::ProviderType;

use super::{ProviderError, Role};

/// What the agent on a new VM needs to find and join the gateway.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AgentBootstrap {
    /// WebSocket URL of the gateway, e.g. `wss://agents.stagely.example.com/v1/agent/connect`.
    pub gateway_url: String,
    /// The agent's id.
    pub agent_id: String,
    /// The enrollment token (JWT), valid once and briefly.
    pub token: String,
    /// Builder or preview.
    pub role: &'static str,
    /// The CA certificates (PEM) the gateway's certificate must chain to; the agent trusts only
    /// these when they are given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Where to download the agent binary for this VM's architecture.
    #[serde(skip)]
    pub agent_url: String,
    /// Its SHA-256, checked before it runs.
    #[serde(skip)]
    pub agent_sha256: String,
}

impl AgentBootstrap {
    /// Bootstrap data for a VM of `role`.
    pub fn new(
        gateway_url: &str,
        agent_id: &str,
        token: &str,
        role: Role,
        agent_url: &str,
        agent_sha256: &str,
    ) -> Self {
        Self {
            gateway_url: gateway_url.to_owned(),
            agent_id: agent_id.to_owned(),
            token: token.to_owned(),
            role: role.as_str(),
            ca_pem: None,
            agent_url: agent_url.to_owned(),
            agent_sha256: agent_sha256.to_owned(),
        }
    }

    /// Pins the agent to the gateway CA `ca_pem` (from [`read_gateway_ca`]).
    pub fn with_gateway_ca(mut self, ca_pem: Option<String>) -> Self {
        self.ca_pem = ca_pem;
        self
    }
}

/// Why the gateway's CA cannot be handed to agents.
#[derive(Debug, thiserror::Error)]
#[error("failed to read the agents' gateway CA {path}: {reason}")]
pub struct GatewayCaError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// The CA certificates in the PEM file `path`, as PEM again, for agents' cloud-init. Only the
/// certificates are kept; a file holding a private key is refused outright, since user data is
/// readable from the VM's metadata service.
pub fn read_gateway_ca(path: &Path) -> Result<String, GatewayCaError> {
    let error = |reason: String| GatewayCaError { path: path.to_owned(), reason };
    let text = std::fs::read(path).map_err(|err| error(err.to_string()))?;
    let blocks = pem::parse_many(&text).map_err(|err| error(format!("not PEM: {err}")))?;
    if blocks.iter().any(|block| block.tag().contains("PRIVATE KEY")) {
        return Err(error("it holds a private key; give only the CA's certificate (e.g. ca.crt)".into()));
    }
    let certificates: Vec<pem::Pem> = blocks.into_iter().filter(|block| block.tag() == "CERTIFICATE").collect();
    if certificates.is_empty() {
        return Err(error("no CERTIFICATE block".into()));
    }
    Ok(pem::encode_many_config(&certificates, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF)))
}

/// Where the agent's configuration is written on the VM (mode 0600).
pub const AGENT_CONFIG_PATH: &str = "/etc/stagely/agent.json";

/// The largest user data each provider accepts, in bytes.
pub fn user_data_limit(provider: ProviderType) -> usize {
    match provider {
        ProviderType::Aws => 16 * 1024,
        ProviderType::Digitalocean => 64 * 1024,
        ProviderType::Hetzner => 32 * 1024,
        ProviderType::Local => usize::MAX,
    }
}

/// Where the agent binary is installed on the VM.
pub const AGENT_BIN_PATH: &str = "/usr/local/bin/stagely-agent";
/// Where the install script is written on the VM.
pub const INSTALL_SCRIPT_PATH: &str = "/usr/local/lib/stagely/install-agent.sh";

/// `value` quoted for a POSIX shell: one argument, whatever it holds.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The script that installs and starts the agent. It stops at the first failure (`set -eu`):
/// an agent whose download fails or whose SHA-256 does not match is never made executable,
/// installed or started. Every value is quoted for the shell.
pub fn install_script(bootstrap: &AgentBootstrap) -> String {
    let download = format!("{AGENT_BIN_PATH}.download");
    format!(
        r#"#!/bin/sh
# Installs the Stagely agent: download, check its SHA-256, install, start. Stops at the first
# failure, so an agent that does not match its checksum never runs.
set -eu
systemctl enable --now docker
rm -f {download}
curl -fsSL --retry 5 -o {download} {url}
echo {sum} | sha256sum -c -
chmod 0755 {download}
mv -f {download} {bin}
systemctl daemon-reload
systemctl enable --now stagely-agent
"#,
        download = shell_quote(&download),
        url = shell_quote(&bootstrap.agent_url),
        sum = shell_quote(&format!("{}  {download}", bootstrap.agent_sha256)),
        bin = shell_quote(AGENT_BIN_PATH),
    )
}

/// The `#cloud-config` document for a VM: the agent's configuration, its systemd unit and its
/// install script as files (each value JSON-quoted, which YAML reads as a double-quoted string,
/// so no value can end its field), and one `runcmd` entry running the script.
pub fn render(bootstrap: &AgentBootstrap) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let config = serde_json::to_string(bootstrap).expect("bootstrap serializes");
    let unit = format!(
        "[Unit]\nDescription=Stagely agent\nAfter=network-online.target docker.service\n\
         Wants=network-online.target docker.service\n[Service]\n\
         ExecStart={AGENT_BIN_PATH} --config {AGENT_CONFIG_PATH}\nRestart=always\nRestartSec=2\n\
         [Install]\nWantedBy=multi-user.target\n"
    );
    format!(
        r#"#cloud-config
package_update: true
packages:
  - docker.io
  - docker-compose-v2
  - git
  - curl
write_files:
  - path: {AGENT_CONFIG_PATH}
    owner: root:root
    permissions: "0600"
    content: {config}
  - path: /etc/systemd/system/stagely-agent.service
    owner: root:root
    permissions: "0644"
    content: {unit}
  - path: {INSTALL_SCRIPT_PATH}
    owner: root:root
    permissions: "0700"
    content: {script}
runcmd:
  - [/bin/sh, {INSTALL_SCRIPT_PATH}]
"#,
        config = quote(&config),
        unit = quote(&unit),
        script = quote(&install_script(bootstrap)),
    )
}

/// Fails when `user_data` is larger than `provider` accepts.
pub fn check_size(user_data: &str, provider: ProviderType) -> Result<(), ProviderError> {
    let limit = user_data_limit(provider);
    if user_data.len() > limit {
        return Err(ProviderError::Unsupported(format!(
            "the VM's user data is {} bytes; {} accepts at most {limit}",
            user_data.len(),
            provider.as_str()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagely_api::v1alpha1::Platform;

    fn bootstrap() -> AgentBootstrap {
        AgentBootstrap::new(
            "wss://agents.example.com/v1/agent/connect",
            "bj-7f3a",
            "eyJhbGciOiJFUzI1NiJ9.enrol.sig",
            Role::Builder,
            "https://agents.example.com/v1/agent/binary/arm64",
            &"a".repeat(64),
        )
    }

    #[test]
    fn renders_valid_cloud_config_that_installs_and_starts_the_agent() {
        let text = render(&bootstrap());
        assert!(text.starts_with("#cloud-config\n"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
        let packages: Vec<&str> = doc["packages"].as_sequence().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert!(packages.contains(&"docker.io") && packages.contains(&"docker-compose-v2"), "{packages:?}");

        let files = doc["write_files"].as_sequence().unwrap();
        let config = files.iter().find(|f| f["path"] == AGENT_CONFIG_PATH).unwrap();
        assert_eq!(config["permissions"], "0600");
        let json: serde_json::Value = serde_json::from_str(config["content"].as_str().unwrap().trim()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "gateway_url": "wss://agents.example.com/v1/agent/connect",
                "agent_id": "bj-7f3a",
                "token": "eyJhbGciOiJFUzI1NiJ9.enrol.sig",
                "role": "builder",
            }),
            "the enrollment token is the only credential"
        );

        let unit = files.iter().find(|f| f["path"] == "/etc/systemd/system/stagely-agent.service").unwrap();
        assert!(unit["content"].as_str().unwrap().contains(&format!("ExecStart={AGENT_BIN_PATH} --config")));
        let script = files.iter().find(|f| f["path"] == INSTALL_SCRIPT_PATH).unwrap();
        assert_eq!(script["permissions"], "0700");
        assert_eq!(script["content"].as_str().unwrap(), install_script(&bootstrap()));
        let runcmd = doc["runcmd"].as_sequence().unwrap();
        assert_eq!(runcmd.len(), 1, "one script, so a failure stops it: {runcmd:?}");
        assert_eq!(serde_yaml::to_string(&runcmd[0]).unwrap().trim(), format!("- /bin/sh\n- {INSTALL_SCRIPT_PATH}"));
    }

    /// What running the install script in a throwaway root did.
    struct Installed {
        succeeded: bool,
        systemctl: String,
        agent_installed: bool,
        /// Whether `/pwned` or `/pwned2` appeared (what the hostile values below try).
        injected: bool,
        output: String,
    }

    const AGENT_BYTES: &str = "the agent binary\n";

    /// Runs the install script for `bootstrap` in a fresh root (chroot) holding busybox for the
    /// shell and its tools, a `curl` that "downloads" [`AGENT_BYTES`] and a `systemctl` that
    /// only records its arguments: the script itself, as cloud-init would run it.
    fn install(bootstrap: &AgentBootstrap) -> Installed {
        let fake_download = format!(
            r#"while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out=$2; fi; shift; done; printf '{}' > "$out""#,
            AGENT_BYTES.replace('\n', "\\n")
        );
        install_with(bootstrap, &fake_download)
    }

    /// [`install`], with `curl` doing what `curl_body` says.
    fn install_with(bootstrap: &AgentBootstrap, curl_body: &str) -> Installed {
        let busybox = std::path::Path::new("/bin/busybox");
        assert!(busybox.exists(), "/bin/busybox is missing: run scripts/install-deps.sh (busybox-static)");
        let root = tempfile::tempdir().unwrap();
        let path = |p: &str| root.path().join(p.trim_start_matches('/'));
        for dir in ["/bin", "/usr/local/bin", "/usr/local/lib/stagely", "/tmp"] {
            std::fs::create_dir_all(path(dir)).unwrap();
        }
        std::fs::copy(busybox, path("/bin/busybox")).unwrap();
        for applet in ["sh", "sha256sum", "chmod", "mv", "rm", "cat", "touch", "wget"] {
            std::os::unix::fs::symlink("busybox", path(&format!("/bin/{applet}"))).unwrap();
        }
        let stub = |name: &str, body: &str| {
            std::fs::write(path(&format!("/bin/{name}")), format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(
                path(&format!("/bin/{name}")),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
        };
        stub("systemctl", r#"echo "$*" >> /systemctl.log"#);
        stub("curl", curl_body);
        std::fs::write(path(INSTALL_SCRIPT_PATH), install_script(bootstrap)).unwrap();
        // Found here: the child's PATH below is the root's.
        let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chroot (coreutils) is installed");
        let run = std::process::Command::new(chroot)
            .arg(root.path())
            .args(["/bin/sh", INSTALL_SCRIPT_PATH])
            .env_clear()
            .env("PATH", "/bin")
            .output()
            .expect("chroot runs (the tests run as root)");
        Installed {
            succeeded: run.status.success(),
            systemctl: std::fs::read_to_string(path("/systemctl.log")).unwrap_or_default(),
            agent_installed: path(AGENT_BIN_PATH).exists(),
            injected: path("/pwned").exists() || path("/pwned2").exists(),
            output: format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr)),
        }
    }

    fn sha256_hex(data: &[u8]) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_install_script_installs_and_starts_an_agent_that_matches_its_checksum() {
        let mut good = bootstrap();
        good.agent_sha256 = sha256_hex(AGENT_BYTES.as_bytes());
        let installed = install(&good);
        assert!(installed.succeeded, "{}", installed.output);
        assert!(installed.agent_installed);
        assert!(installed.systemctl.ends_with("enable --now stagely-agent\n"), "{}", installed.systemctl);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_install_script_downloads_and_checks_the_binary_the_gateway_serves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stagely-agent-linux-amd64"), AGENT_BYTES).unwrap();
        let served = std::sync::Arc::new(crate::agents::AgentBinaries::load(dir.path()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_url = format!("ws://{}/v1/agent/connect", listener.local_addr().unwrap());
        tokio::spawn({
            let served = std::sync::Arc::clone(&served);
            async move { axum::serve(listener, served.router()).await }
        });
        let mut bootstrap = bootstrap();
        bootstrap.agent_url = crate::agents::download_url(&gateway_url, Platform::LinuxAmd64).unwrap();
        bootstrap.agent_sha256 = served.get(Platform::LinuxAmd64).unwrap().sha256.clone();
        // A real download over HTTP from the operator's route (busybox's wget standing in for curl).
        let wget = r#"while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out=$2; shift; fi; url=$1; shift; done; wget -q -O "$out" "$url""#;
        let installed = tokio::task::spawn_blocking(move || install_with(&bootstrap, wget)).await.unwrap();
        assert!(installed.succeeded, "{}", installed.output);
        assert!(installed.agent_installed);
        assert!(installed.systemctl.ends_with("enable --now stagely-agent\n"), "{}", installed.systemctl);
    }

    #[test]
    fn an_agent_that_does_not_match_its_checksum_is_never_installed_or_started() {
        let installed = install(&bootstrap());
        assert!(!installed.succeeded, "the script must fail: {}", installed.output);
        assert!(!installed.agent_installed, "a binary that failed its check was installed");
        assert!(!installed.systemctl.contains("stagely-agent"), "the agent was started: {}", installed.systemctl);
        assert!(
            installed.systemctl.contains("enable --now docker"),
            "the script ran up to the check: {}",
            installed.systemctl
        );
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        let mut evil = bootstrap();
        evil.agent_url = "https://x/'$(touch /pwned)'; touch /pwned2 #".into();
        evil.agent_sha256 = sha256_hex(AGENT_BYTES.as_bytes());
        let installed = install(&evil);
        assert!(installed.succeeded, "{}", installed.output);
        assert!(!installed.injected, "a value ran as a command: {}", installed.output);
        let script = install_script(&evil);
        assert!(script.contains(r"'https://x/'\''$(touch /pwned)'\''; touch /pwned2 #'"), "{script}");
    }

    #[test]
    fn fits_every_provider_and_oversize_is_refused() {
        let text = render(&bootstrap());
        for provider in [ProviderType::Aws, ProviderType::Digitalocean, ProviderType::Hetzner] {
            check_size(&text, provider).unwrap();
        }
        let err = check_size(&"x".repeat(20_000), ProviderType::Aws).unwrap_err();
        assert_eq!(err.to_string(), "the VM's user data is 20000 bytes; aws accepts at most 16384");
        check_size(&"x".repeat(20_000), ProviderType::Hetzner).unwrap();
    }

    #[test]
    fn the_gateway_ca_goes_into_the_agents_configuration_and_nothing_else_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = stagely_testenv::pki::TestCa::new("gateway CA").unwrap();
        let ca_pem = ca.pem();
        let other_pem = stagely_testenv::pki::TestCa::new("next gateway CA").unwrap().pem();
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, format!("# the current CA, then the next\n{ca_pem}{other_pem}")).unwrap();
        let read = read_gateway_ca(&file).unwrap();
        let certificates = pem::parse_many(&read).unwrap();
        assert_eq!(certificates.len(), 2);
        assert_eq!(certificates[0], pem::parse(&ca_pem).unwrap());
        assert!(!read.contains('#'), "only the certificates: {read}");

        let text = render(&bootstrap().with_gateway_ca(Some(read.clone())));
        check_size(&text, ProviderType::Aws).unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let files = doc["write_files"].as_sequence().unwrap();
        let config = files.iter().find(|f| f["path"] == AGENT_CONFIG_PATH).unwrap();
        let json: serde_json::Value = serde_json::from_str(config["content"].as_str().unwrap()).unwrap();
        assert_eq!(json["ca_pem"], read.as_str(), "the agent reads its pinned CA from `ca_pem`");
        assert_eq!(json["gateway_url"], "wss://agents.example.com/v1/agent/connect");
        assert!(json.get("insecure").is_none(), "cloud VMs never allow a plain gateway");

        // A key next to a certificate (a whole TLS Secret mounted as one file) never goes out.
        let (cert, key) = ca.serving(&["agents.example.com"]).unwrap();
        std::fs::write(&file, format!("{ca_pem}{cert}{key}")).unwrap();
        let err = read_gateway_ca(&file).unwrap_err().to_string();
        assert!(err.contains("holds a private key") && err.contains("ca.crt"), "{err}");
        std::fs::write(&file, "").unwrap();
        assert!(read_gateway_ca(&file).unwrap_err().to_string().ends_with("no CERTIFICATE block"));
        let err = read_gateway_ca(&dir.path().join("missing.crt")).unwrap_err().to_string();
        assert!(err.starts_with("failed to read the agents' gateway CA ") && err.contains("missing.crt"), "{err}");
    }

    #[test]
    fn hostile_values_cannot_break_out_of_their_fields() {
        let mut evil = bootstrap();
        evil.agent_url = "https://x/\"]\n  - [rm, -rf, /]".into();
        evil.agent_id = "a\"\n  - path: /etc/evil".into();
        let doc: serde_yaml::Value = serde_yaml::from_str(&render(&evil)).expect("still valid YAML");
        assert_eq!(doc["write_files"].as_sequence().unwrap().len(), 3);
        assert_eq!(doc["runcmd"].as_sequence().unwrap().len(), 1);
    }
}
