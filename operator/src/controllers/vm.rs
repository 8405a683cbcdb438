//! Stagely's VMs as the controllers start and stop them, the same way for builder VMs and
//! preview VMs: a name and an idempotency key derived from the owning object, cloud-init that
//! starts the agent with a fresh single-use enrollment token scoped to that object, Stagely's
//! tags, and termination of everything tagged with the owner's UID.

use std::path::PathBuf;
use std::time::Duration;

use kube::ResourceExt;
use stagely_api::keys::cloud_tags;
use stagely_api::protocol::Scope;
use stagely_api::v1alpha1::{CloudProvider as CloudProviderObject, Platform, ProviderType, Size, VmStatus};

use crate::gateway::{Gateway, GatewayError};
use crate::providers::cloudinit::{self, AgentBootstrap};
use crate::providers::{CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError, Role, stagely_tags};

/// How new VMs find and fetch their agent: the operator's configuration.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// The WebSocket URL agents connect to (`wss://…/v1/agent/connect`).
    pub gateway_url: String,
    /// Where VMs download the agent binary, when set (one binary for every platform); else from
    /// the gateway, which serves [`served`](Self::served).
    pub agent_url: String,
    /// The SHA-256 (hex) of the binary at `agent_url`, checked before it runs.
    pub agent_sha256: String,
    /// The binaries the operator carries and serves over the gateway's address, per platform.
    pub served: std::sync::Arc<crate::agents::AgentBinaries>,
    /// How long a VM's enrollment token stays valid: long enough for the VM to boot.
    pub enrollment_ttl: Duration,
    /// The PEM file of the CA certificates agents pin the gateway to; read for each VM, so a
    /// renewed file reaches the next VMs without a restart. Without it, agents trust their
    /// system's root CAs.
    pub gateway_ca_file: Option<PathBuf>,
}

/// Why a VM's request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The enrollment token could not be minted.
    #[error("failed to mint the enrollment token of VM {name}: {source}")]
    Token {
        /// The instance name.
        name: String,
        /// The cause.
        source: GatewayError,
    },
    /// No agent binary can be handed to a VM of this platform.
    #[error(
        "no agent binary for {platform}: the operator carries [{carried}] in --agent-bin-dir and no \
         --agent-download-url is set"
    )]
    NoAgentBinary {
        /// The VM's platform.
        platform: &'static str,
        /// The platforms the operator has binaries for.
        carried: String,
    },
    /// The CloudProvider lacks its region.
    #[error("CloudProvider {0} has no region")]
    NoRegion(String),
    /// A cloud VM's agent would be sent to a plain `ws://` gateway, which it refuses.
    #[error(
        "the agent gateway URL {url} is plain ws://, which the agents of CloudProvider {provider} refuse: \
         serve the gateway with TLS (--gateway-tls-cert, --gateway-tls-key) and give a wss:// \
         --agent-gateway-url"
    )]
    PlainGateway {
        /// The configured URL.
        url: String,
        /// The CloudProvider.
        provider: String,
    },
    /// The gateway's CA could not be read for the VM's cloud-init.
    #[error(transparent)]
    GatewayCa(#[from] cloudinit::GatewayCaError),
    /// The provider refused (including user data over its limit).
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// Characters of the owning object's name kept in an instance name.
const NAME_PART: usize = 44;

/// The instance name of `role`'s VM for object `name` with `uid`: `stagely-b-<name>-<uid>` for
/// a builder (`p` for a preview), at most 63 lowercase letters, digits and '-', as every provider
/// accepts; the name is trimmed, the first 8 characters of the UID keep it apart from another
/// object of the same name.
pub fn instance_name(role: Role, name: &str, uid: &str) -> String {
    let role = match role {
        Role::Builder => 'b',
        Role::Preview => 'p',
    };
    let mut part = String::with_capacity(name.len());
    for c in name.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
        if !(c == '-' && (part.is_empty() || part.ends_with('-'))) {
            part.push(c);
        }
    }
    part.truncate(NAME_PART);
    let part = part.trim_end_matches('-');
    let uid: String = uid.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).take(8).collect();
    [format!("stagely-{role}"), part.to_owned(), uid]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// The idempotency key of `role`'s VM for the object with `uid`: a retried create returns the
/// VM the first one made.
pub fn idempotency_key(role: Role, uid: &str) -> String {
    format!("stagely-{}-{uid}", role.as_str())
}

/// Where a VM of `platform` downloads its agent, and its SHA-256: the configured URL if any,
/// else the binary the operator serves for that platform. `local` VMs download nothing (they run
/// `--local-agent-bin`).
fn agent_download(
    agents: &AgentSettings,
    provider: &CloudProviderObject,
    platform: Platform,
) -> Result<(String, String), VmError> {
    if !agents.agent_url.is_empty() {
        return Ok((agents.agent_url.clone(), agents.agent_sha256.clone()));
    }
    if provider.spec.type_ == ProviderType::Local {
        return Ok((String::new(), String::new()));
    }
    let url = crate::agents::download_url(&agents.gateway_url, platform);
    match (agents.served.get(platform), url) {
        (Some(binary), Some(url)) => Ok((url, binary.sha256.clone())),
        _ => Err(VmError::NoAgentBinary { platform: platform.as_str(), carried: agents.served.platforms().join(", ") }),
    }
}

/// What to start for `scope`'s VM of `role` through `provider`: the agent's cloud-init carries a
/// fresh enrollment token for this scope only, valid for `agents.enrollment_ttl`, and the
/// gateway's CA when there is one. Only `local` agents (on the operator's host) are sent to a
/// plain `ws://` gateway.
pub fn instance_spec(
    gateway: &Gateway,
    agents: &AgentSettings,
    provider: &CloudProviderObject,
    role: Role,
    scope: &Scope,
    size: Size,
    platform: Platform,
) -> Result<InstanceSpec, VmError> {
    let name = instance_name(role, &scope.name, &scope.uid);
    let region = match provider.spec.type_ {
        ProviderType::Local => "local".to_owned(),
        _ if agents.gateway_url.starts_with("ws://") => {
            return Err(VmError::PlainGateway { url: agents.gateway_url.clone(), provider: provider.name_any() });
        }
        _ => provider.spec.region.clone().ok_or_else(|| VmError::NoRegion(provider.name_any()))?,
    };
    let gateway_ca = agents.gateway_ca_file.as_deref().map(cloudinit::read_gateway_ca).transpose()?;
    let token = gateway
        .mint_vm_enrollment_token(scope, &name, agents.enrollment_ttl, provider.spec.type_.as_str())
        .map_err(|source| VmError::Token { name: name.clone(), source })?;
    let (agent_url, agent_sha256) = agent_download(agents, provider, platform)?;
    let bootstrap = AgentBootstrap::new(&agents.gateway_url, &name, token.expose(), role, &agent_url, &agent_sha256)
        .with_gateway_ca(gateway_ca);
    let user_data = cloudinit::render(&bootstrap);
    cloudinit::check_size(&user_data, provider.spec.type_)?;
    Ok(InstanceSpec {
        name,
        size,
        platform,
        region,
        user_data,
        tags: stagely_tags(&scope.uid, &scope.namespace, role),
        // Spot capacity can vanish mid-job: a builder's job is short and retried by a new run,
        // a preview should stay up.
        spot: role == Role::Builder && provider.spec.defaults.spot,
        idempotency_key: idempotency_key(role, &scope.uid),
    })
}

/// Terminates every instance tagged as owned by `owner_uid`, found with `provider.list_owned()`,
/// so nothing is left even when the operator died between creating a VM and recording it.
/// Returns the ids terminated.
pub async fn terminate_all(provider: &dyn CloudProvider, owner_uid: &str) -> Result<Vec<String>, ProviderError> {
    let mut terminated = Vec::new();
    for instance in provider.list_owned(owner_uid).await? {
        if instance.tags.get(cloud_tags::OWNER_UID).map(String::as_str) == Some(owner_uid) {
            provider.terminate(&instance.id).await?;
            terminated.push(instance.id);
        }
    }
    Ok(terminated)
}

/// The state's name in `status.vm.state`.
pub fn state_name(state: &InstanceState) -> &str {
    match state {
        InstanceState::Pending => "pending",
        InstanceState::Running => "running",
        InstanceState::Stopping => "stopping",
        InstanceState::Terminated => "terminated",
        InstanceState::Other(other) => other,
    }
}

/// `status.vm` for `instance`, started with `size`.
pub fn vm_status(instance: &Instance, size: Size) -> VmStatus {
    VmStatus {
        provider_id: Some(instance.id.clone()),
        ip: instance.public_ip.map(|ip| ip.to_string()),
        state: Some(state_name(&instance.state).to_owned()),
        size: Some(size),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use stagely_api::protocol::ScopeKind;
    use stagely_api::v1alpha1::CloudProviderSpec;

    use super::*;
    use crate::providers::BoxFuture;

    const UID: &str = "7f3a9c2e-1b4d-4e5f-8a6b-0c1d2e3f4a5b";

    #[test]
    fn names_fit_every_provider_and_differ_by_uid() {
        assert_eq!(
            instance_name(Role::Builder, "shop-pr-7-web-amd64-abc1234", UID),
            "stagely-b-shop-pr-7-web-amd64-abc1234-7f3a9c2e"
        );
        assert_eq!(instance_name(Role::Preview, "Shop.PR_7", UID), "stagely-p-shop-pr-7-7f3a9c2e");
        let long = "a-".repeat(120);
        for name in [long.as_str(), "x".repeat(253).as_str(), "..--..", "", "web.example.com"] {
            let got = instance_name(Role::Builder, name, UID);
            assert!(got.len() <= 63, "{got}");
            assert!(got.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{got}");
            assert!(!got.ends_with('-') && !got.contains("--"), "{got}");
            assert!(got.ends_with("-7f3a9c2e"), "{got}");
        }
        assert_ne!(
            instance_name(Role::Builder, "web", UID),
            instance_name(Role::Builder, "web", "0b7c6f0e-1111-2222-3333-444455556666")
        );
        assert_eq!(idempotency_key(Role::Builder, UID), format!("stagely-builder-{UID}"));
    }

    #[tokio::test]
    async fn without_a_download_url_vms_fetch_the_binary_the_gateway_serves_for_their_platform() {
        let gateway = Gateway::builder().build().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stagely-agent-linux-amd64"), b"amd64 agent").unwrap();
        let served = std::sync::Arc::new(crate::agents::AgentBinaries::load(dir.path()).unwrap());
        let agents = AgentSettings {
            gateway_url: "wss://agents.example.com:8443/v1/agent/connect".into(),
            agent_url: String::new(),
            agent_sha256: String::new(),
            served: std::sync::Arc::clone(&served),
            enrollment_ttl: Duration::from_secs(600),
            gateway_ca_file: None,
        };
        let scope =
            Scope { kind: ScopeKind::BuildJob, namespace: "team-a".into(), name: "web".into(), uid: UID.into() };
        let spec = serde_json::json!({"type": "hetzner", "region": "fsn1"});
        let provider = CloudProviderObject::new("hetzner", serde_json::from_value(spec).unwrap());
        let built =
            instance_spec(&gateway, &agents, &provider, Role::Builder, &scope, Size::Small, Platform::LinuxAmd64)
                .unwrap();
        let sha = &served.get(Platform::LinuxAmd64).unwrap().sha256;
        assert!(built.user_data.contains("https://agents.example.com:8443/v1/agent/download/linux-amd64"));
        assert!(built.user_data.contains(&format!("{sha}  ")), "the served binary's checksum is checked");
        let err = instance_spec(&gateway, &agents, &provider, Role::Builder, &scope, Size::Small, Platform::LinuxArm64)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no agent binary for linux/arm64: the operator carries [linux/amd64] in --agent-bin-dir and no \
             --agent-download-url is set"
        );
    }

    #[tokio::test]
    async fn the_spec_carries_a_scoped_token_tags_and_the_provider_defaults() {
        let gateway = Gateway::builder().build().await.unwrap();
        let agents = AgentSettings {
            gateway_url: "wss://agents.example.com/v1/agent/connect".into(),
            agent_url: "https://agents.example.com/agent".into(),
            agent_sha256: "a".repeat(64),
            served: Default::default(),
            enrollment_ttl: Duration::from_secs(600),
            gateway_ca_file: None,
        };
        let scope =
            Scope { kind: ScopeKind::BuildJob, namespace: "team-a".into(), name: "web-amd64".into(), uid: UID.into() };
        let spec: CloudProviderSpec = serde_json::from_value(
            serde_json::json!({"type": "hetzner", "region": "fsn1", "defaults": {"spot": true}}),
        )
        .unwrap();
        let provider = CloudProviderObject::new("hetzner", spec);
        let built =
            instance_spec(&gateway, &agents, &provider, Role::Builder, &scope, Size::Large, Platform::LinuxArm64)
                .unwrap();
        assert_eq!(built.name, "stagely-b-web-amd64-7f3a9c2e");
        assert_eq!(
            (built.region.as_str(), built.size, built.platform, built.spot),
            ("fsn1", Size::Large, Platform::LinuxArm64, true)
        );
        assert_eq!(built.tags[cloud_tags::OWNER_UID], UID);
        assert_eq!(built.tags[cloud_tags::ROLE], "builder");
        assert_eq!(built.tags[cloud_tags::NAMESPACE], "team-a");
        assert_eq!(built.idempotency_key, idempotency_key(Role::Builder, UID));

        let config: serde_json::Value =
            serde_json::from_str(&crate::providers::local::agent_config(&built.user_data).unwrap()).unwrap();
        assert_eq!(config["agent_id"], built.name);
        assert_eq!(config["gateway_url"], agents.gateway_url);
        let token = config["token"].as_str().unwrap();
        let (claims, _) = gateway.tokens().verify_agent(token, &built.name).unwrap();
        assert_eq!(claims.scope, scope, "the token is scoped to this object");

        // A preview is never on spot; the local type has no region.
        let local =
            CloudProviderObject::new("here", serde_json::from_value(serde_json::json!({"type": "local"})).unwrap());
        let preview =
            instance_spec(&gateway, &agents, &local, Role::Preview, &scope, Size::Small, Platform::LinuxAmd64).unwrap();
        assert_eq!((preview.region.as_str(), preview.spot), ("local", false));
        assert!(preview.name.starts_with("stagely-p-"));

        let missing =
            CloudProviderObject::new("aws", serde_json::from_value(serde_json::json!({"type": "aws"})).unwrap());
        let err = instance_spec(&gateway, &agents, &missing, Role::Builder, &scope, Size::Small, Platform::LinuxAmd64)
            .unwrap_err();
        assert_eq!(err.to_string(), "CloudProvider aws has no region");

        // A cloud VM's agent is never sent to a plain gateway; a local one is.
        let plain = AgentSettings { gateway_url: "ws://10.0.0.1:8443/v1/agent/connect".into(), ..agents.clone() };
        let err = instance_spec(&gateway, &plain, &provider, Role::Builder, &scope, Size::Small, Platform::LinuxAmd64)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ws://10.0.0.1:8443") && err.contains("hetzner") && err.contains("--gateway-tls-cert"),
            "{err}"
        );
        instance_spec(&gateway, &plain, &local, Role::Preview, &scope, Size::Small, Platform::LinuxAmd64).unwrap();

        // The gateway's CA file is read for each VM: a renewed one reaches the next VM.
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        let pinned = AgentSettings { gateway_ca_file: Some(ca_file.clone()), ..agents.clone() };
        let ca_in = |spec: &InstanceSpec| {
            let config = crate::providers::local::agent_config(&spec.user_data).unwrap();
            serde_json::from_str::<serde_json::Value>(&config).unwrap()["ca_pem"].as_str().map(str::to_owned)
        };
        for name in ["first CA", "renewed CA"] {
            std::fs::write(&ca_file, stagely_testenv::pki::TestCa::new(name).unwrap().pem()).unwrap();
            let built =
                instance_spec(&gateway, &pinned, &provider, Role::Builder, &scope, Size::Small, Platform::LinuxAmd64)
                    .unwrap();
            assert_eq!(ca_in(&built), Some(cloudinit::read_gateway_ca(&ca_file).unwrap()), "{name}");
        }
        assert_eq!(ca_in(&built), None, "no CA file: the agent trusts its system's roots");
        std::fs::remove_file(&ca_file).unwrap();
        let err = instance_spec(&gateway, &pinned, &provider, Role::Builder, &scope, Size::Small, Platform::LinuxAmd64)
            .unwrap_err();
        assert!(matches!(err, VmError::GatewayCa(_)), "{err}");
    }

    /// A provider that only lists and records terminations.
    struct Listed(Vec<Instance>, std::sync::Mutex<Vec<String>>);

    impl CloudProvider for Listed {
        fn create<'a>(&'a self, _spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance, ProviderError>> {
            unreachable!()
        }
        fn get<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
            unreachable!()
        }
        fn terminate<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
            self.1.lock().unwrap().push(id.to_owned());
            Box::pin(async { Ok(()) })
        }
        fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
            Box::pin(async { Ok(self.0.clone()) })
        }
        fn validate_credentials(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
            unreachable!()
        }
        fn hourly_price(&self, _size: Size, _platform: Platform) -> BoxFuture<'_, Result<Option<f64>, ProviderError>> {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn terminate_all_stops_only_the_owners_instances() {
        let instance = |id: &str, owner: &str| Instance {
            id: id.into(),
            state: InstanceState::Running,
            public_ip: None,
            private_ip: None,
            launched_at: None,
            tags: stagely_tags(owner, "team-a", Role::Builder),
        };
        let provider = Arc::new(Listed(
            vec![instance("i-1", UID), instance("i-2", "other"), instance("i-3", UID)],
            Default::default(),
        ));
        let terminated = terminate_all(provider.as_ref(), UID).await.unwrap();
        assert_eq!(terminated, ["i-1", "i-3"]);
        assert_eq!(*provider.1.lock().unwrap(), ["i-1", "i-3"]);
        assert_eq!(vm_status(&provider.0[0], Size::Small).state.as_deref(), Some("running"));
    }
}
