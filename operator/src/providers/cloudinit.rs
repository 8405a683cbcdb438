//! cloud-init user data for builder and preview VMs: installs Docker with the compose plugin,
//! fetches and checks the agent, writes its configuration, and runs it under systemd.
//!
//! The only credential in the user data is the agent's short-lived, single-use enrollment token:
//! user data is readable from the VM's metadata service, so nothing else may be put there.
//! Secrets reach the VM later, over the agent's authenticated connection.

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
            agent_url: agent_url.to_owned(),
            agent_sha256: agent_sha256.to_owned(),
        }
    }
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

/// The `#cloud-config` document for a VM.
pub fn render(bootstrap: &AgentBootstrap) -> String {
    let config = serde_json::to_string(bootstrap).expect("bootstrap serializes");
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let check = format!(
        "echo {} | sha256sum -c -",
        quote(&format!("{}  /usr/local/bin/stagely-agent", bootstrap.agent_sha256))
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
    content: |
      {config}
  - path: /etc/systemd/system/stagely-agent.service
    owner: root:root
    permissions: "0644"
    content: |
      [Unit]
      Description=Stagely agent
      After=network-online.target docker.service
      Wants=network-online.target docker.service
      [Service]
      ExecStart=/usr/local/bin/stagely-agent --config {AGENT_CONFIG_PATH}
      Restart=always
      RestartSec=2
      [Install]
      WantedBy=multi-user.target
runcmd:
  - [systemctl, enable, --now, docker]
  - [curl, -fsSL, --retry, "5", -o, /usr/local/bin/stagely-agent, {agent_url}]
  - [sh, -c, {check}]
  - [chmod, "0755", /usr/local/bin/stagely-agent]
  - [systemctl, daemon-reload]
  - [systemctl, enable, --now, stagely-agent]
"#,
        agent_url = quote(&bootstrap.agent_url),
        check = quote(&check),
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

        let runcmd = serde_yaml::to_string(&doc["runcmd"]).unwrap();
        assert!(runcmd.contains("https://agents.example.com/v1/agent/binary/arm64"));
        assert!(
            runcmd.contains(&format!("{}  /usr/local/bin/stagely-agent", "a".repeat(64))),
            "checksum checked: {runcmd}"
        );
        assert!(runcmd.contains("stagely-agent") && runcmd.contains("--now"));
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
    fn hostile_values_cannot_break_out_of_their_fields() {
        let mut evil = bootstrap();
        evil.agent_url = "https://x/\"]\n  - [rm, -rf, /]".into();
        evil.agent_id = "a\"\n  - path: /etc/evil".into();
        let doc: serde_yaml::Value = serde_yaml::from_str(&render(&evil)).expect("still valid YAML");
        assert_eq!(doc["write_files"].as_sequence().unwrap().len(), 2);
        assert_eq!(doc["runcmd"].as_sequence().unwrap().len(), 6);
    }
}
