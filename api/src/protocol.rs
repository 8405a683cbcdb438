//! The agent wire protocol: JSON messages over the one WebSocket between an agent on a VM and
//! the operator's agent gateway.
//!
//! Every frame is one [`Message`], `{"type": "BUILD", "payload": {…}}`. The agent opens with
//! HELLO, listing the optional commands it understands in `capabilities` (e.g.
//! [`CAPABILITY_TEST`]); the gateway answers HELLO_ACK or ERROR. Commands (BUILD, DEPLOY,
//! TERMINATE, TEST) carry a `job_id`; an agent that already knows a job id answers with that
//! job's current STATUS instead of running it again, so the gateway may resend commands after a
//! reconnect. A frame the agent does not understand is answered with an ERROR (carrying the
//! frame's job id when it has one). The agent sends a HEARTBEAT every
//! [`HEARTBEAT_INTERVAL_SECS`] seconds and the gateway echoes it back as the ack.
//!
//! Secret values travel only inside [`Sensitive`], whose `Debug` never prints them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::v1alpha1::Platform;

/// The path of the gateway's WebSocket endpoint.
pub const CONNECT_PATH: &str = "/v1/agent/connect";

/// Seconds between heartbeats.
pub const HEARTBEAT_INTERVAL_SECS: u32 = 30;

/// Seconds without the gateway after which an agent shuts its VM down.
pub const DISCONNECT_SHUTDOWN_SECS: u32 = 15 * 60;

/// The HELLO capability of an agent that runs TEST commands. Agents older than TEST do not list
/// it, and would drop a TEST without an answer.
pub const CAPABILITY_TEST: &str = "test";

/// The environment variable that carries the preview's URL into each TEST command.
pub const PREVIEW_URL_ENV: &str = "STAGELY_PREVIEW_URL";

/// One protocol frame.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", content = "payload", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Message {
    /// Agent → gateway, first frame: who the agent is and its credential.
    Hello(Hello),
    /// Gateway → agent: the HELLO was accepted.
    HelloAck(HelloAck),
    /// Gateway → agent: build and push an image.
    Build(Build),
    /// Gateway → agent: run the app with compose.
    Deploy(Deploy),
    /// Gateway → agent: stop the app and remove its secrets.
    Terminate(Terminate),
    /// Gateway → agent: run end-to-end test commands against the preview (agents that list
    /// [`CAPABILITY_TEST`]).
    Test(TestRun),
    /// Agent → gateway: output of a job's commands (already masked).
    Log(Log),
    /// Agent → gateway: where a job is.
    Status(Status),
    /// Agent → gateway every 30 s; the gateway echoes it back as the ack.
    Heartbeat(Heartbeat),
    /// Either way: something was refused or went wrong.
    Error(ErrorMessage),
}

/// The wire name of every message type, as [`Message::type_name`] gives them: a frame whose
/// `type` is not among them comes from a newer peer.
pub const MESSAGE_TYPES: [&str; 10] =
    ["HELLO", "HELLO_ACK", "BUILD", "DEPLOY", "TERMINATE", "TEST", "LOG", "STATUS", "HEARTBEAT", "ERROR"];

impl Message {
    /// The wire name of the message type, e.g. `HELLO_ACK` (for logs and metrics).
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::HelloAck(_) => "HELLO_ACK",
            Message::Build(_) => "BUILD",
            Message::Deploy(_) => "DEPLOY",
            Message::Terminate(_) => "TERMINATE",
            Message::Test(_) => "TEST",
            Message::Log(_) => "LOG",
            Message::Status(_) => "STATUS",
            Message::Heartbeat(_) => "HEARTBEAT",
            Message::Error(_) => "ERROR",
        }
    }

    /// The job a command, log line or status belongs to.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            Message::Build(m) => Some(&m.job_id),
            Message::Deploy(m) => Some(&m.job_id),
            Message::Terminate(m) => Some(&m.job_id),
            Message::Test(m) => Some(&m.job_id),
            Message::Log(m) => Some(&m.job_id),
            Message::Status(m) => Some(&m.job_id),
            Message::Error(m) => m.job_id.as_deref(),
            Message::Hello(_) | Message::HelloAck(_) | Message::Heartbeat(_) => None,
        }
    }
}

/// A secret value: serialized as a plain string for the wire, never shown by `Debug`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Sensitive(pub String);

impl Sensitive {
    /// The secret value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sensitive(<redacted>)")
    }
}

impl From<&str> for Sensitive {
    fn from(value: &str) -> Self {
        Sensitive(value.to_owned())
    }
}

/// Agent → gateway, the first frame on a connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hello {
    /// Stable id of this agent (and its VM).
    pub agent_id: String,
    /// The single-use enrollment JWT from the VM's user data, or on reconnect the session
    /// credential from HELLO_ACK.
    pub token: Sensitive,
    /// Agent version.
    pub version: String,
    /// What the VM is.
    pub system_info: SystemInfo,
    /// Jobs the agent knows, so the gateway resends only what is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobSummary>,
    /// Optional commands this agent understands, e.g. [`CAPABILITY_TEST`]; absent from the HELLO
    /// of agents that predate them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// What the VM is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SystemInfo {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub arch: String,
    /// Host name.
    pub hostname: String,
    /// Number of CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// A job an agent knows, and where it is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobSummary {
    /// The job.
    pub job_id: String,
    /// Where it is.
    pub state: JobState,
}

/// Gateway → agent: the HELLO was accepted. Sent again on a long connection, before the
/// session token expires, with a fresh one; the agent keeps the newest (on disk, so that it is
/// let back in after a restart). Agents that predate renewal ignore the repeat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HelloAck {
    /// Credential for reconnecting; the enrollment token cannot be used twice.
    pub session_token: Sensitive,
    /// Seconds between heartbeats.
    pub heartbeat_interval_seconds: u32,
    /// The object this agent works for.
    pub scope: Scope,
}

/// The one object an agent works for: it never sees another's commands or secrets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    /// `Environment` or `BuildJob`.
    pub kind: ScopeKind,
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// UID of the object.
    pub uid: String,
}

/// The kind of object an agent works for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    /// A preview VM.
    Environment,
    /// A builder VM.
    BuildJob,
}

/// Credentials for the image registry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RegistryAuth {
    /// Registry host (and port).
    pub server: String,
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: Sensitive,
}

/// Gateway → agent: build an image and push it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Build {
    /// The job (the BuildJob's UID and run).
    pub job_id: String,
    /// Git URL to clone.
    pub clone_url: String,
    /// Short-lived token for the clone, if the repository is private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_token: Option<Sensitive>,
    /// Commit to check out.
    pub commit: String,
    /// Build context, relative to the repository root.
    pub context: String,
    /// Dockerfile, relative to the context.
    pub dockerfile: String,
    /// Platform to build for.
    pub platform: Platform,
    /// Build arguments.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// Images to use as layer caches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_from: Vec<String>,
    /// Image to push the layer cache to, for the next build (older agents ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_to: Option<String>,
    /// Image reference to push, with tag.
    pub image: String,
    /// Credentials for pushing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Seconds the build may take.
    pub timeout_seconds: u64,
}

/// Gateway → agent: run the app with compose.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Deploy {
    /// The job (the Environment's UID and run).
    pub job_id: String,
    /// Name of the compose project.
    pub project: String,
    /// Git URL to clone for the compose file.
    pub clone_url: String,
    /// Short-lived token for the clone, if the repository is private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_token: Option<Sensitive>,
    /// Commit to check out.
    pub commit: String,
    /// The compose file, relative to the repository root.
    pub compose_file: String,
    /// The image each built service runs, by service name.
    pub images: BTreeMap<String, String>,
    /// Secrets to inject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretValue>,
    /// Commands to run once the services are up.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Credentials for pulling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
}

/// The scope value that gives a secret to every service.
pub const GLOBAL_SCOPE: &str = "global";

/// One secret key and its value, and where it goes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretValue {
    /// Environment variable name, or file name for file secrets.
    pub key: String,
    /// The value.
    pub value: Sensitive,
    /// [`GLOBAL_SCOPE`] for every service, or the name of one service.
    pub scope: String,
    /// Environment variable or file.
    #[serde(default)]
    pub kind: SecretKind,
    /// For files: the directory in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For files: the file mode (default 0o600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl SecretValue {
    /// Whether `service` receives this secret.
    pub fn applies_to(&self, service: &str) -> bool {
        self.scope == GLOBAL_SCOPE || self.scope == service
    }
}

/// How a secret reaches a service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecretKind {
    /// An environment variable.
    #[default]
    Env,
    /// A file.
    File,
}

/// Lifecycle hooks of a deployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Lifecycle {
    /// Run in their service once every service is up, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_start: Vec<Hook>,
}

/// A command run in a service's container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hook {
    /// The compose service.
    pub service: String,
    /// The shell command.
    pub command: String,
}

/// Gateway → agent: stop the app and delete its secret files.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Terminate {
    /// The job.
    pub job_id: String,
    /// Why, e.g. `pr_closed`, `expired`, `superseded`.
    pub reason: String,
    /// Seconds the services get to stop before they are killed.
    pub grace_period_seconds: u32,
}

/// Gateway → agent: run end-to-end tests against a running preview. Each command runs in order
/// in a fresh container of `image` on the host network, as `sh -c <command>` with
/// [`PREVIEW_URL_ENV`] set to `preview_url`; the first that fails ends the job failed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TestRun {
    /// The job (the Environment's UID and run).
    pub job_id: String,
    /// The image the commands run in.
    pub image: String,
    /// Shell commands, run in order.
    pub commands: Vec<String>,
    /// The URL the tests check, as the VM reaches the preview.
    pub preview_url: String,
    /// Seconds all the commands together may take; then the running one is killed.
    pub timeout_seconds: u64,
    /// Credentials for pulling the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
}

/// Which output a log line came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// A command's standard output.
    Stdout,
    /// A command's standard error.
    Stderr,
    /// The agent's own account of what it does.
    System,
}

/// Agent → gateway: output of a job's commands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Log {
    /// The job.
    pub job_id: String,
    /// Which output.
    pub stream: LogStream,
    /// Sequence number within the job's run on the agent, from 0. The gateway keeps it for
    /// readers and drops a line resent after a reconnect, but orders lines itself.
    pub seq: u64,
    /// When the line was written, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The text, with known secret values masked; a line longer than 16 KiB is cut there by
    /// the agent, with a marker saying so.
    pub data: String,
}

/// Where a job is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Received, not started.
    Accepted,
    /// Running.
    Running,
    /// Finished well: built and pushed, deployed and healthy, or terminated.
    Succeeded,
    /// Finished badly; `message` says why.
    Failed,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// Agent → gateway: where a job is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Status {
    /// The job.
    pub job_id: String,
    /// Where it is.
    pub state: JobState,
    /// Exit code of the failing or last command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Seconds the job took, once final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// A human-readable summary; on failure, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// BUILD: digest of the pushed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// DEPLOY: each service's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
}

/// A compose service's state, from compose's JSON status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServiceStatus {
    /// The service.
    pub name: String,
    /// Container state, e.g. `running`, `exited`.
    pub state: String,
    /// Health, where the service has a health check: `healthy`, `unhealthy`, `starting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
}

/// A container port published on the VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    /// Port inside the container.
    pub container_port: u16,
    /// Port on the VM.
    pub published_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// Agent → gateway every 30 s; echoed back unchanged as the ack.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Increases by one per heartbeat on a connection.
    pub seq: u64,
    /// When the agent sent it, in milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
}

/// Something was refused or went wrong.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorMessage {
    /// What kind of failure.
    pub code: ErrorCode,
    /// A human-readable explanation (never containing a credential).
    pub message: String,
    /// The job concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// Kinds of protocol failure.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The token's signature or format is wrong.
    InvalidToken,
    /// The token has expired.
    ExpiredToken,
    /// The enrollment token was already used.
    TokenReplayed,
    /// The token is for another object or agent.
    WrongScope,
    /// The frame was not a valid message, or not expected now.
    BadMessage,
    /// A job id the receiver does not know.
    UnknownJob,
    /// The receiver failed; retrying may help.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) -> serde_json::Value {
        let json = serde_json::to_string(&message).unwrap();
        let back: Message = serde_json::from_str(&json).unwrap();
        assert_eq!(back, message, "{json}");
        serde_json::from_str(&json).unwrap()
    }

    fn every_message() -> Vec<Message> {
        let scope = Scope {
            kind: ScopeKind::Environment,
            namespace: "team-a".into(),
            name: "shop-pr-42".into(),
            uid: "0b7c6f0e-1111-2222-3333-444455556666".into(),
        };
        let auth = RegistryAuth {
            server: "registry.stagely:5000".into(),
            username: "push".into(),
            password: "hunter2".into(),
        };
        vec![
            Message::Hello(Hello {
                agent_id: "agent-1".into(),
                token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
                version: "0.1.0".into(),
                system_info: SystemInfo {
                    os: "linux".into(),
                    arch: "arm64".into(),
                    hostname: "vm-1".into(),
                    cpus: 2,
                    memory_mib: 4096,
                },
                jobs: vec![JobSummary { job_id: "build-1".into(), state: JobState::Running }],
                capabilities: vec![CAPABILITY_TEST.into()],
            }),
            Message::HelloAck(HelloAck { session_token: "s3ss10n-cred".into(), heartbeat_interval_seconds: 30, scope }),
            Message::Build(Build {
                job_id: "build-1".into(),
                clone_url: "https://github.com/acme/shop.git".into(),
                git_token: Some("ghs_token".into()),
                commit: "a".repeat(40),
                context: "./api".into(),
                dockerfile: "Dockerfile".into(),
                platform: Platform::LinuxArm64,
                build_args: BTreeMap::from([("NODE_ENV".into(), "production".into())]),
                cache_from: vec!["registry.stagely:5000/shop/api:cache".into()],
                cache_to: None,
                image: "registry.stagely:5000/shop/api:pr-42-arm64".into(),
                registry_auth: Some(auth.clone()),
                timeout_seconds: 1800,
            }),
            Message::Deploy(Deploy {
                job_id: "deploy-1".into(),
                project: "shop-pr-42".into(),
                clone_url: "https://github.com/acme/shop.git".into(),
                git_token: None,
                commit: "b".repeat(40),
                compose_file: "docker-compose.yml".into(),
                images: BTreeMap::from([("api".into(), "registry.stagely:5000/shop/api@sha256:00".into())]),
                secrets: vec![
                    SecretValue {
                        key: "DATABASE_URL".into(),
                        value: "postgres://u:p@db/x".into(),
                        scope: GLOBAL_SCOPE.into(),
                        kind: SecretKind::Env,
                        path: None,
                        mode: None,
                    },
                    SecretValue {
                        key: "tls.key".into(),
                        value: "KEY".into(),
                        scope: "api".into(),
                        kind: SecretKind::File,
                        path: Some("/run/secrets".into()),
                        mode: Some(0o600),
                    },
                ],
                lifecycle: Lifecycle {
                    on_start: vec![Hook { service: "api".into(), command: "npm run db:migrate".into() }],
                },
                registry_auth: Some(auth),
            }),
            Message::Terminate(Terminate {
                job_id: "term-1".into(),
                reason: "pr_closed".into(),
                grace_period_seconds: 30,
            }),
            Message::Test(TestRun {
                job_id: "test-1".into(),
                image: "registry.stagely:5000/shop/e2e:pr-42".into(),
                commands: vec!["npm ci".into(), "curl -f $STAGELY_PREVIEW_URL/health".into()],
                preview_url: "https://k3x9.preview.example.com".into(),
                timeout_seconds: 900,
                registry_auth: Some(RegistryAuth {
                    server: "registry.stagely:5000".into(),
                    username: "pull".into(),
                    password: "hunter2".into(),
                }),
            }),
            Message::Log(Log {
                job_id: "build-1".into(),
                stream: LogStream::Stderr,
                seq: 7,
                timestamp_ms: 1_700_000_000_000,
                data: "Step 1/3\n".into(),
            }),
            Message::Status(Status {
                job_id: "deploy-1".into(),
                state: JobState::Succeeded,
                exit_code: Some(0),
                duration_seconds: Some(12.5),
                message: None,
                image_digest: None,
                services: vec![ServiceStatus {
                    name: "api".into(),
                    state: "running".into(),
                    health: Some("healthy".into()),
                    ports: vec![PortMapping { container_port: 80, published_port: 8080, protocol: "tcp".into() }],
                }],
            }),
            Message::Heartbeat(Heartbeat { seq: 3, sent_at_ms: 1_700_000_000_000 }),
            Message::Error(ErrorMessage {
                code: ErrorCode::TokenReplayed,
                message: "enrollment token already used".into(),
                job_id: None,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_with_its_wire_type() {
        for message in every_message() {
            let name = message.type_name();
            let value = round_trip(message);
            assert_eq!(value["type"], name);
            assert!(value["payload"].is_object(), "{value}");
        }
    }

    #[test]
    fn wire_names_match_the_protocol() {
        let names: Vec<_> = every_message().iter().map(Message::type_name).collect();
        assert_eq!(
            names,
            ["HELLO", "HELLO_ACK", "BUILD", "DEPLOY", "TERMINATE", "TEST", "LOG", "STATUS", "HEARTBEAT", "ERROR"]
        );
        assert_eq!(names, MESSAGE_TYPES);
        let value = round_trip(Message::Error(ErrorMessage {
            code: ErrorCode::WrongScope,
            message: "x".into(),
            job_id: Some("j".into()),
        }));
        assert_eq!(value["payload"]["code"], "wrong_scope");
    }

    #[test]
    fn a_hand_written_frame_parses() {
        let frame = r#"{"type":"HEARTBEAT","payload":{"seq":1,"sent_at_ms":5}}"#;
        assert_eq!(
            serde_json::from_str::<Message>(frame).unwrap(),
            Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 5 })
        );
        let unknown = r#"{"type":"REBOOT","payload":{}}"#;
        assert!(serde_json::from_str::<Message>(unknown).is_err());
    }

    #[test]
    fn debug_output_never_shows_secret_values() {
        for message in every_message() {
            let debug = format!("{message:?}");
            for secret in ["hunter2", "ghs_token", "postgres://u:p@db/x", "eyJhbGciOiJIUzI1NiJ9", "s3ss10n-cred"] {
                assert!(!debug.contains(secret), "{} leaks {secret}: {debug}", message.type_name());
            }
        }
    }

    #[test]
    fn job_ids_and_scopes() {
        let messages = every_message();
        assert_eq!(messages[2].job_id(), Some("build-1"));
        assert_eq!(messages[0].job_id(), None);
        assert_eq!(messages[5].job_id(), Some("test-1"));
        let Message::Deploy(deploy) = &messages[3] else { unreachable!() };
        assert!(deploy.secrets[0].applies_to("web") && deploy.secrets[0].applies_to("api"));
        assert!(deploy.secrets[1].applies_to("api") && !deploy.secrets[1].applies_to("web"));
    }

    #[test]
    fn a_test_command_has_its_wire_form() {
        let frame = r#"{"type":"TEST","payload":{"job_id":"t-1","image":"busybox","commands":["wget -q -O- $STAGELY_PREVIEW_URL"],"preview_url":"http://127.0.0.1:8080","timeout_seconds":60}}"#;
        let message: Message = serde_json::from_str(frame).unwrap();
        assert_eq!(
            message,
            Message::Test(TestRun {
                job_id: "t-1".into(),
                image: "busybox".into(),
                commands: vec!["wget -q -O- $STAGELY_PREVIEW_URL".into()],
                preview_url: "http://127.0.0.1:8080".into(),
                timeout_seconds: 60,
                registry_auth: None,
            })
        );
        // Written back the same way: no `registry_auth: null`.
        assert_eq!(serde_json::to_value(&message).unwrap(), serde_json::from_str::<serde_json::Value>(frame).unwrap());
    }

    #[test]
    fn an_older_agents_hello_without_capabilities_still_parses() {
        let frame = r#"{"type":"HELLO","payload":{"agent_id":"a","token":"t","version":"0.1.0",
            "system_info":{"os":"linux","arch":"amd64","hostname":"h","cpus":1,"memory_mib":512}}}"#;
        let Message::Hello(hello) = serde_json::from_str(frame).unwrap() else { panic!("a HELLO") };
        assert!(hello.capabilities.is_empty() && hello.jobs.is_empty());

        // And none are written when there are none, so an older gateway sees the HELLO it knows.
        let value = serde_json::to_value(Message::Hello(hello)).unwrap();
        assert!(value["payload"].get("capabilities").is_none(), "{value}");
        let Message::Hello(hello) = &every_message()[0] else { unreachable!() };
        let value = serde_json::to_value(Message::Hello(hello.clone())).unwrap();
        assert_eq!(value["payload"]["capabilities"], serde_json::json!(["test"]));
    }
}
