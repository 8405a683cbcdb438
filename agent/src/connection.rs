//! The one WebSocket to the gateway: HELLO with the enrollment token (then the session token
//! from HELLO_ACK, kept on disk so that a restarted agent is let back in, and replaced by each
//! renewal the gateway sends), heartbeats, commands in, logs and statuses out, and reconnection
//! with exponential backoff and jitter. A frame the agent does not understand (a newer gateway's
//! command, a malformed payload) is answered with an ERROR naming its job when it has one, so the
//! gateway fails that job instead of waiting for it. Also the watchdog that shuts the VM down
//! when the gateway has been gone too long.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use stagely_api::backoff::Backoff;
use stagely_api::protocol::{
    CAPABILITY_TEST, CONNECT_PATH, ErrorCode, ErrorMessage, HEARTBEAT_INTERVAL_SECS, Heartbeat, Hello, MESSAGE_TYPES,
    Message, Sensitive, SystemInfo,
};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite;

use crate::config::AgentConfig;
use crate::executor::{Executor, now_ms};
use crate::mask::Masker;
use crate::outbox::Outbox;
use crate::session::SessionStore;

/// The optional commands this agent runs, for its HELLO.
pub const CAPABILITIES: [&str; 1] = [CAPABILITY_TEST];

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The gateway did not answer in time.
    #[error("the gateway did not answer within {0:?}")]
    Timeout(Duration),
    /// The gateway refused the HELLO.
    #[error("the gateway refused the agent ({code:?}): {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The gateway's explanation.
        message: String,
    },
    /// The gateway broke the protocol.
    #[error("unexpected from the gateway: {0}")]
    Protocol(String),
    /// The gateway closed the connection.
    #[error("the gateway closed the connection")]
    Closed,
    /// The TLS configuration could not be built.
    #[error("failed to set up TLS: {0}")]
    Tls(String),
    /// The TLS handshake with the gateway failed, e.g. its certificate is not signed by a trusted CA.
    #[error("failed the TLS handshake with the gateway, {trusting}: {source}")]
    Handshake {
        /// Which CAs the agent trusts.
        trusting: &'static str,
        /// The cause.
        source: rustls::Error,
    },
}

/// What the VM is.
pub fn system_info() -> SystemInfo {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    SystemInfo {
        os: std::env::consts::OS.to_owned(),
        arch: arch.to_owned(),
        hostname,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_mib,
    }
}

/// The URL to connect to: the configured one, with the connect path when it names none.
pub fn connect_url(gateway_url: &str) -> String {
    let after_scheme = gateway_url.split_once("://").map_or(gateway_url, |(_, rest)| rest);
    if after_scheme.trim_end_matches('/').contains('/') {
        gateway_url.to_owned()
    } else {
        format!("{}{CONNECT_PATH}", gateway_url.trim_end_matches('/'))
    }
}

/// The TLS client of a `wss://` gateway (none for `ws://`, which the configuration allows only
/// when it says `insecure`): it trusts only the configured CA when there is one, else the
/// system's roots.
fn tls_connector(config: &AgentConfig) -> Result<Option<tokio_tungstenite::Connector>, ConnectionError> {
    if !config.gateway_url.starts_with("wss://") {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &config.gateway_ca {
        Some(pinned) => {
            for cert in pinned {
                roots.add(cert.clone()).map_err(|err| ConnectionError::Tls(format!("the gateway's CA: {err}")))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|err| ConnectionError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls))))
}

/// The TLS error behind a failed connection, if that is why it failed (tokio-tungstenite
/// reports a rustls handshake failure as an I/O error wrapping it).
fn tls_failure(err: &tungstenite::Error) -> Option<rustls::Error> {
    match err {
        tungstenite::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>().cloned(),
        tungstenite::Error::Tls(tungstenite::error::TlsError::Rustls(tls)) => Some((**tls).clone()),
        _ => None,
    }
}

/// The agent's side of the protocol, across connections.
pub struct Connection {
    config: Arc<AgentConfig>,
    executor: Executor,
    outbox: Outbox,
    session: SessionStore,
    session_token: Option<Sensitive>,
    connected: watch::Sender<bool>,
}

impl Connection {
    /// A connection for `executor`, whose messages wait in `outbox`; `connected` says whether
    /// the gateway has accepted the agent. A session token kept by an earlier run of the agent
    /// is presented first.
    pub fn new(config: Arc<AgentConfig>, executor: Executor, outbox: Outbox, connected: watch::Sender<bool>) -> Self {
        let session = SessionStore::new(&config.session_file, &config.agent_id);
        let session_token = session.load();
        if session_token.is_some() {
            tracing::info!(path = %session.path().display(), "reconnecting with the kept session credential");
        }
        Self { config, executor, outbox, session, session_token, connected }
    }

    /// Takes a session token from a HELLO_ACK and keeps it for the next connection and the
    /// next start.
    fn keep_session(&mut self, token: Sensitive) {
        if let Err(err) = self.session.save(&token) {
            // Still good for reconnects while this process lives.
            tracing::error!(%err, "the session credential is not kept; a restart of the agent will need a new VM");
        }
        self.session_token = Some(token);
    }

    /// Connects, serves, and reconnects, forever.
    pub async fn run(mut self) -> Result<(), ConnectionError> {
        let connector = tls_connector(&self.config)?;
        let url = connect_url(&self.config.gateway_url);
        let mut backoff = Backoff::new(self.config.reconnect_initial, self.config.reconnect_max);
        loop {
            let result = self.session(&url, connector.clone(), &mut backoff).await;
            self.connected.send_replace(false);
            let delay = backoff.next_delay();
            match result {
                Ok(()) => tracing::warn!(?delay, "disconnected from the gateway; reconnecting"),
                Err(err) => tracing::warn!(%err, ?delay, "no connection to the gateway; retrying"),
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn session(
        &mut self,
        url: &str,
        connector: Option<tokio_tungstenite::Connector>,
        backoff: &mut Backoff,
    ) -> Result<(), ConnectionError> {
        const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
        let connected = tokio::time::timeout(
            ANSWER_TIMEOUT,
            tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector),
        )
        .await
        .map_err(|_| ConnectionError::Timeout(ANSWER_TIMEOUT))?;
        let (mut ws, _) = connected.map_err(|err| match tls_failure(&err) {
            Some(source) => ConnectionError::Handshake {
                trusting: if self.config.gateway_ca.is_some() {
                    "trusting only the CA in the agent's configuration"
                } else {
                    "trusting the system's root CAs"
                },
                source,
            },
            None => err.into(),
        })?;
        let using_session = self.session_token.is_some();
        let token = self.session_token.clone().unwrap_or_else(|| self.config.token.clone());
        let hello = Message::Hello(Hello {
            agent_id: self.config.agent_id.clone(),
            token,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            system_info: system_info(),
            jobs: self.executor.summaries(),
            capabilities: CAPABILITIES.iter().map(|c| (*c).to_owned()).collect(),
        });
        ws.send(frame(&hello)).await?;
        let ack = loop {
            let next = tokio::time::timeout(ANSWER_TIMEOUT, ws.next())
                .await
                .map_err(|_| ConnectionError::Timeout(ANSWER_TIMEOUT))?;
            match next {
                None => return Err(ConnectionError::Closed),
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(tungstenite::Message::Text(text))) => match serde_json::from_str::<Message>(&text) {
                    Ok(Message::HelloAck(ack)) => break ack,
                    Ok(Message::Error(error)) => {
                        if using_session
                            && matches!(
                                error.code,
                                ErrorCode::InvalidToken | ErrorCode::ExpiredToken | ErrorCode::WrongScope
                            )
                        {
                            // Next time, the enrollment token (which the gateway may still take).
                            self.session_token = None;
                            self.session.clear();
                        }
                        return Err(ConnectionError::Refused { code: error.code, message: error.message });
                    }
                    Ok(other) => {
                        return Err(ConnectionError::Protocol(format!("{} before HELLO_ACK", other.type_name())));
                    }
                    Err(err) => return Err(ConnectionError::Protocol(err.to_string())),
                },
                Some(Ok(tungstenite::Message::Close(_))) => return Err(ConnectionError::Closed),
                Some(Ok(_)) => {}
            }
        };
        self.keep_session(ack.session_token);
        backoff.reset();
        self.connected.send_replace(true);
        let interval = Duration::from_secs(u64::from(if ack.heartbeat_interval_seconds == 0 {
            HEARTBEAT_INTERVAL_SECS
        } else {
            ack.heartbeat_interval_seconds
        }));
        tracing::info!(scope = ?ack.scope, ?interval, "connected to the gateway");

        // Every job's latest status first: the gateway may have missed a final one while the
        // agent was away. What the jobs sent meanwhile waits in the outbox.
        for status in self.executor.statuses() {
            ws.send(frame(&Message::Status(status))).await?;
        }

        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // A connection silent for three heartbeats is dead, even if TCP has not noticed.
        let silence_limit = interval * 3;
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return Err(ConnectionError::Timeout(silence_limit));
                    }
                    seq += 1;
                    ws.send(frame(&Message::Heartbeat(Heartbeat { seq, sent_at_ms: now_ms() }))).await?;
                }
                message = self.outbox.recv() => {
                    if let Err(err) = ws.send(frame(&message)).await {
                        self.outbox.put_back(message);
                        return Err(err.into());
                    }
                }
                incoming = ws.next() => {
                    last_heard = tokio::time::Instant::now();
                    match incoming {
                        None => return Ok(()),
                        Some(Err(err)) => return Err(err.into()),
                        Some(Ok(tungstenite::Message::Text(text))) => self.receive(&text),
                        Some(Ok(tungstenite::Message::Binary(_))) => {
                            self.refuse(ErrorMessage {
                                code: ErrorCode::BadMessage,
                                message: "frames are JSON text, not binary".into(),
                                job_id: None,
                            });
                        }
                        Some(Ok(tungstenite::Message::Close(_))) => return Ok(()),
                        Some(Ok(_)) => {}
                    }
                }
            }
        }
    }

    fn receive(&mut self, text: &str) {
        match serde_json::from_str::<Message>(text) {
            Ok(Message::Heartbeat(ack)) => tracing::trace!(seq = ack.seq, "heartbeat acknowledged"),
            Ok(Message::Error(error)) => {
                tracing::warn!(code = ?error.code, job_id = error.job_id.as_deref().unwrap_or(""), "gateway error: {}", error.message)
            }
            Ok(message @ (Message::Build(_) | Message::Deploy(_) | Message::Terminate(_) | Message::Test(_))) => {
                tracing::info!(kind = message.type_name(), job_id = message.job_id().unwrap_or(""), "command received");
                self.executor.handle(message);
            }
            // On a long connection the gateway renews the session before it expires.
            Ok(Message::HelloAck(ack)) => {
                tracing::debug!("session renewed");
                self.keep_session(ack.session_token);
            }
            Ok(other) => self.refuse(ErrorMessage {
                code: ErrorCode::BadMessage,
                message: format!("an agent does not take {} messages", other.type_name()),
                job_id: other.job_id().map(str::to_owned),
            }),
            Err(err) => self.refuse(not_understood(text, &err, &self.executor.context().masker)),
        }
    }

    /// Answers a frame the agent cannot act on with `error`.
    fn refuse(&self, error: ErrorMessage) {
        tracing::warn!(job_id = error.job_id.as_deref().unwrap_or(""), "refusing a frame: {}", error.message);
        self.executor.context().outbox.send(Message::Error(error));
    }
}

/// The ERROR answering `text`, which did not parse as a message (`err`): its job id, when the
/// frame has one, and why. Secret values the payload carries are masked first, since serde's
/// message may quote a value.
pub fn not_understood(text: &str, err: &serde_json::Error, masker: &Masker) -> ErrorMessage {
    let frame: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let kind = frame.as_ref().and_then(|f| f.get("type")).and_then(|t| t.as_str());
    let payload = frame.as_ref().and_then(|f| f.get("payload"));
    let job_id = payload.and_then(|p| p.get("job_id")).and_then(|j| j.as_str()).map(str::to_owned);
    if let Some(payload) = payload {
        let mut secrets: Vec<&serde_json::Value> = vec![&payload["git_token"], &payload["token"]];
        secrets.push(&payload["registry_auth"]["password"]);
        if let Some(list) = payload["secrets"].as_array() {
            secrets.extend(list.iter().map(|secret| &secret["value"]));
        }
        for secret in secrets.into_iter().filter_map(|s| s.as_str()) {
            masker.add(secret);
        }
    }
    let message = match kind {
        Some(kind) if !MESSAGE_TYPES.contains(&kind) => format!(
            "unknown message type `{kind}`: agent {} takes {}",
            env!("CARGO_PKG_VERSION"),
            "BUILD, DEPLOY, TERMINATE and TEST"
        ),
        Some(kind) => format!("invalid {kind} message: {}", masker.mask(&err.to_string())),
        None => format!("not a protocol message: {err}"),
    };
    ErrorMessage { code: ErrorCode::BadMessage, message, job_id }
}

fn frame(message: &Message) -> tungstenite::Message {
    tungstenite::Message::Text(serde_json::to_string(message).expect("messages serialize").into())
}

/// Runs `shutdown_command` once the gateway has been unreachable for `after` (counting from
/// start when it has never been reached); once per disconnection.
pub async fn shutdown_watchdog(mut connected: watch::Receiver<bool>, after: Duration, shutdown_command: String) {
    loop {
        if connected.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let reconnected = tokio::time::timeout(after, connected.wait_for(|c| *c)).await.map(|r| r.is_ok());
        match reconnected {
            Ok(true) => continue,
            Ok(false) => return,
            Err(_) => {
                tracing::warn!(?after, command = %shutdown_command, "no gateway for too long; shutting the VM down");
                match tokio::process::Command::new("sh").arg("-c").arg(&shutdown_command).status().await {
                    Ok(status) if status.success() => {}
                    Ok(status) => tracing::error!(%status, "the shutdown command failed"),
                    Err(err) => tracing::error!(%err, "failed to run the shutdown command"),
                }
                // Once per disconnection: wait for the gateway before counting again.
                if connected.wait_for(|c| *c).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_urls_get_the_path_when_they_name_none() {
        assert_eq!(connect_url("ws://127.0.0.1:9"), "ws://127.0.0.1:9/v1/agent/connect");
        assert_eq!(connect_url("wss://gw.example.com/"), "wss://gw.example.com/v1/agent/connect");
        assert_eq!(connect_url("wss://gw.example.com/v1/agent/connect"), "wss://gw.example.com/v1/agent/connect");
    }

    #[test]
    fn frames_not_understood_are_answered_with_their_job_id() {
        let refuse = |text: &str| {
            let err = serde_json::from_str::<Message>(text).unwrap_err();
            not_understood(text, &err, &Masker::new())
        };
        let error = refuse(r#"{"type":"REBOOT","payload":{"job_id":"r-1","when":"now"}}"#);
        assert_eq!(error.code, ErrorCode::BadMessage);
        assert_eq!(error.job_id.as_deref(), Some("r-1"));
        assert!(error.message.starts_with("unknown message type `REBOOT`: agent "), "{}", error.message);

        let error = refuse(r#"{"type":"TEST","payload":{"job_id":"t-1","image":"x"}}"#);
        assert_eq!(error.job_id.as_deref(), Some("t-1"));
        assert!(error.message.starts_with("invalid TEST message: missing field"), "{}", error.message);

        let error = refuse("{not json");
        assert_eq!(error.job_id, None);
        assert!(error.message.starts_with("not a protocol message"), "{}", error.message);
        assert_eq!(refuse(r#"{"payload":{"job_id":7}}"#).job_id, None);
    }

    #[test]
    fn a_refused_frames_secrets_stay_out_of_the_error() {
        // serde quotes a string it did not expect; here that string is a secret's value.
        let text = r#"{"type":"DEPLOY","payload":{"job_id":"d-1","git_token":"ghs_secret-token-1",
            "secrets":[{"key":"K","value":"v-secret-2","scope":"global"}],"lifecycle":"v-secret-2"}}"#;
        let err = serde_json::from_str::<Message>(text).unwrap_err();
        assert!(err.to_string().contains("v-secret-2"), "the case this guards against: {err}");
        let masker = Masker::new();
        let error = not_understood(text, &err, &masker);
        assert_eq!(error.job_id.as_deref(), Some("d-1"));
        assert!(error.message.starts_with("invalid DEPLOY message: invalid type: string \"***\""), "{}", error.message);
        assert_eq!(masker.mask("ghs_secret-token-1"), "***", "the payload's secrets are masked from now on");
    }

    #[test]
    fn system_info_names_the_architecture_as_providers_do() {
        let info = system_info();
        assert_eq!(info.os, "linux");
        assert!(["amd64", "arm64"].contains(&info.arch.as_str()) || !info.arch.is_empty());
        assert!(info.cpus >= 1);
    }
}
