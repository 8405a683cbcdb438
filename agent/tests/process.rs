//! The real `stagely-agent` process: the shutdown after losing the gateway, reconnection with
//! the session token against a gateway that appears late and drops the connection, the ERROR
//! answering a frame it does not understand, and a plain `ws://` gateway refused unless the
//! configuration says `insecure`.

mod support;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use stagely_api::protocol::{
    CONNECT_PATH, ErrorCode, ErrorMessage, HelloAck, JobState, Message, Scope, ScopeKind, Terminate,
};
use support::{agent_command, agent_command_with, free_port, wait_for};
use tokio_tungstenite::tungstenite;

/// The agent process, killed when dropped; its log lines arrive on `lines`.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    /// Starts the agent with a config file as cloud-init writes it, plus `env`.
    fn start(dir: &Path, gateway_url: &str, env: &[(&str, &str)]) -> Self {
        let bin = Path::new(env!("CARGO_BIN_EXE_stagely-agent"));
        let mut command = agent_command(bin, dir, gateway_url, "enrollment-jwt");
        command
            .env("STAGELY_RECONNECT_MAX_MS", "200")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            // tracing writes to standard output.
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// Waits for a log line containing `text`.
    fn wait_log(&self, text: &str) {
        wait_for(&format!("the agent to log {text:?}"), Duration::from_secs(30), || {
            self.lines.try_recv().ok().filter(|line| line.contains(text))
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_vm_shuts_down_when_the_gateway_stays_away() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("shutdown-ran");
    let url = format!("ws://127.0.0.1:{}{CONNECT_PATH}", free_port());
    let command = format!("touch {}", marker.display());
    let mut agent = Agent::start(
        dir.path(),
        &url,
        &[("STAGELY_DISCONNECT_SHUTDOWN_SECONDS", "1"), ("STAGELY_SHUTDOWN_COMMAND", &command)],
    );
    wait_for("the shutdown command's marker file", Duration::from_secs(30), || marker.exists().then_some(()));
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent keeps trying to reconnect");
}

#[test]
fn a_plain_ws_gateway_without_insecure_stops_the_agent_with_a_config_error_before_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}{CONNECT_PATH}", gateway.local_addr().unwrap());
    let config = serde_json::json!({"gateway_url": url, "agent_id": "agent-1", "token": "t", "role": "preview"});
    let bin = Path::new(env!("CARGO_BIN_EXE_stagely-agent"));
    let mut child = agent_command_with(bin, dir.path(), &config.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the agent to exit", Duration::from_secs(30), || child.try_wait().unwrap());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the agent must refuse to start: {stderr}");
    assert!(
        stderr.contains("invalid agent configuration") && stderr.contains("plain ws://") && stderr.contains("insecure"),
        "{stderr}"
    );
    gateway.set_nonblocking(true).unwrap();
    let attempt = gateway.accept();
    assert!(
        matches!(&attempt, Err(err) if err.kind() == std::io::ErrorKind::WouldBlock),
        "the agent connected to the gateway: {attempt:?}"
    );
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("the agent sends within 30 s")
            .expect("the connection is open")
            .unwrap();
        if let tungstenite::Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn send(ws: &mut Ws, message: &Message) {
    ws.send(tungstenite::Message::Text(serde_json::to_string(message).unwrap().into())).await.unwrap();
}

async fn next_status(ws: &mut Ws, job_id: &str) -> stagely_api::protocol::Status {
    loop {
        if let Message::Status(status) = next_message(ws).await
            && status.job_id == job_id
        {
            return status;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_with_backoff_and_its_session_token_and_runs_a_resent_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(dir.path(), &format!("ws://127.0.0.1:{port}"), &[]);
    // Nobody listens yet: the agent fails and retries.
    agent.wait_log("no connection to the gateway");
    agent.wait_log("no connection to the gateway");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    let Message::Hello(hello) = next_message(&mut ws).await else { panic!("HELLO first") };
    assert_eq!((hello.agent_id.as_str(), hello.token.expose()), ("agent-1", "enrollment-jwt"));
    assert!(hello.jobs.is_empty());
    let scope = Scope { kind: ScopeKind::Environment, namespace: "t".into(), name: "e".into(), uid: "u".into() };
    let ack = HelloAck { session_token: "session-1".into(), heartbeat_interval_seconds: 1, scope };
    send(&mut ws, &Message::HelloAck(ack.clone())).await;
    loop {
        if let Message::Heartbeat(_) = next_message(&mut ws).await {
            break;
        }
    }
    // A job (nothing is deployed, so TERMINATE needs no engine) runs and succeeds.
    let terminate =
        Message::Terminate(Terminate { job_id: "t-1".into(), reason: "test".into(), grace_period_seconds: 1 });
    send(&mut ws, &terminate).await;
    assert_eq!(next_status(&mut ws, "t-1").await.state, JobState::Accepted);
    while !next_status(&mut ws, "t-1").await.state.is_final() {}

    // The gateway goes away; the agent comes back with the session token and its jobs.
    drop(ws);
    let (stream, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    let Message::Hello(hello) = next_message(&mut ws).await else { panic!("HELLO first") };
    assert_eq!(hello.token.expose(), "session-1", "reconnects with the session token");
    assert_eq!(hello.jobs.len(), 1);
    assert_eq!((hello.jobs[0].job_id.as_str(), hello.jobs[0].state), ("t-1", JobState::Succeeded));
    send(&mut ws, &Message::HelloAck(ack)).await;
    // Resent, it is answered with its final status and not run again (no ACCEPTED).
    send(&mut ws, &terminate).await;
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        statuses.push(next_status(&mut ws, "t-1").await.state);
    }
    // One is the status resent on reconnect, one the answer to the resent command.
    assert_eq!(statuses, [JobState::Succeeded, JobState::Succeeded]);
}

/// The next ERROR the agent sends, skipping its heartbeats.
async fn next_error(ws: &mut Ws) -> ErrorMessage {
    loop {
        match next_message(ws).await {
            Message::Error(error) => return error,
            Message::Heartbeat(_) => {}
            other => panic!("expected an ERROR, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn frames_the_agent_does_not_understand_are_answered_with_an_error_and_it_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _agent = Agent::start(dir.path(), &format!("ws://127.0.0.1:{port}"), &[]);
    let (stream, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    let Message::Hello(hello) = next_message(&mut ws).await else { panic!("HELLO first") };
    assert_eq!(hello.capabilities, ["test"], "the agent says it runs TEST");
    let scope = Scope { kind: ScopeKind::Environment, namespace: "t".into(), name: "e".into(), uid: "u".into() };
    let ack = HelloAck { session_token: "session-1".into(), heartbeat_interval_seconds: 1, scope };
    send(&mut ws, &Message::HelloAck(ack)).await;

    // A command from a newer gateway: refused, naming its job, so that job can fail.
    let text = |frame: &str| tungstenite::Message::Text(frame.to_owned().into());
    ws.send(text(r#"{"type":"SNAPSHOT","payload":{"job_id":"snap-1","volume":"db"}}"#)).await.unwrap();
    let error = next_error(&mut ws).await;
    assert_eq!((error.code, error.job_id.as_deref()), (ErrorCode::BadMessage, Some("snap-1")));
    assert!(error.message.starts_with("unknown message type `SNAPSHOT`"), "{}", error.message);

    // A known command whose payload this agent cannot read.
    ws.send(text(r#"{"type":"TEST","payload":{"job_id":"test-1","image":"busybox"}}"#)).await.unwrap();
    let error = next_error(&mut ws).await;
    assert_eq!(error.job_id.as_deref(), Some("test-1"));
    assert!(error.message.starts_with("invalid TEST message: missing field"), "{}", error.message);

    // Not JSON, binary, and a message only agents send: refused without a job id.
    ws.send(text("reboot now")).await.unwrap();
    let error = next_error(&mut ws).await;
    assert_eq!(error.job_id, None);
    assert!(error.message.starts_with("not a protocol message"), "{}", error.message);
    ws.send(tungstenite::Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next_error(&mut ws).await.message, "frames are JSON text, not binary");
    // A heartbeat's echo is expected and answered with nothing; a STATUS is not.
    send(&mut ws, &Message::Heartbeat(stagely_api::protocol::Heartbeat { seq: 1, sent_at_ms: 1 })).await;
    let status = Message::Status(stagely_api::protocol::Status {
        job_id: "s-1".into(),
        state: JobState::Running,
        exit_code: None,
        duration_seconds: None,
        message: None,
        image_digest: None,
        services: vec![],
    });
    send(&mut ws, &status).await;
    let error = next_error(&mut ws).await;
    assert_eq!(
        (error.job_id.as_deref(), error.message.as_str()),
        (Some("s-1"), "an agent does not take STATUS messages")
    );

    // Still connected, still working.
    let terminate =
        Message::Terminate(Terminate { job_id: "t-1".into(), reason: "test".into(), grace_period_seconds: 1 });
    send(&mut ws, &terminate).await;
    while !next_status(&mut ws, "t-1").await.state.is_final() {}
}
