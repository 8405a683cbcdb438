//! The agent gateway on loopback, driven by real WebSocket clients: the HELLO handshake and its
//! refusals, session reconnects, command delivery and resend, heartbeats recorded on a real
//! Environment (stagely-testenv's kube-apiserver), slow agents, logs masked into a real
//! redis-server, and `wss://` with a generated CA, its certificate renewed in place.

#[path = "support/logs.rs"]
mod logs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use stagely_api::protocol::*;
use stagely_api::tls::CertStore;
use stagely_api::v1alpha1::{Environment, EnvironmentSpec, LocalObjectRef, Platform, PullRequest};
use stagely_operator::gateway::objects::KubeObjects;
use stagely_operator::gateway::token::{AgentClaims, SigningKey};
use stagely_operator::gateway::{Gateway, GatewayBuilder, GatewayError, RunningGateway, Settings};
use stagely_testenv::pki::TestCa;
use stagely_testenv::server::{Server, eventually};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws = WebSocketStream<TcpStream>;

const WAIT: Duration = Duration::from_secs(20);

// ---- harness ----

fn builder() -> GatewayBuilder {
    logs::capture();
    Gateway::builder().settings(Settings { token_leeway: Duration::ZERO, ..Settings::default() })
}

async fn start(builder: GatewayBuilder) -> RunningGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    builder.serve(listener).await.expect("gateway starts")
}

fn scope(name: &str) -> Scope {
    Scope { kind: ScopeKind::BuildJob, namespace: "team-a".into(), name: name.into(), uid: format!("uid-{name}") }
}

async fn connect(gateway: &RunningGateway) -> Ws {
    let tcp = TcpStream::connect(gateway.addr()).await.expect("tcp connect");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(gateway.connect_url(), tcp))
        .await
        .expect("connect in time")
        .expect("websocket handshake");
    ws
}

fn hello(agent_id: &str, token: &Sensitive, jobs: Vec<JobSummary>) -> Message {
    Message::Hello(Hello {
        agent_id: agent_id.into(),
        token: token.clone(),
        version: "test".into(),
        system_info: SystemInfo::default(),
        jobs,
        capabilities: vec![],
    })
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, message: &Message) {
    ws.send(WsMessage::text(serde_json::to_string(message).unwrap())).await.expect("send");
}

/// The next protocol message (skipping pings), or a panic naming what came instead.
async fn recv<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Message {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time");
        match frame {
            Some(Ok(WsMessage::Text(text))) => return serde_json::from_str(&text).expect("a protocol message"),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Waits for the close frame and returns its code; panics on anything but a close.
async fn expect_close(ws: &mut Ws) -> u16 {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("a close in time");
        match frame {
            Some(Ok(WsMessage::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Connects and completes the HELLO; returns the socket and the HELLO_ACK.
async fn enroll(gateway: &RunningGateway, agent_id: &str, token: &Sensitive, jobs: Vec<JobSummary>) -> (Ws, HelloAck) {
    let mut ws = connect(gateway).await;
    send(&mut ws, &hello(agent_id, token, jobs)).await;
    match recv(&mut ws).await {
        Message::HelloAck(ack) => (ws, ack),
        other => panic!("expected HELLO_ACK, got {other:?}"),
    }
}

/// Sends a HELLO and asserts it is refused with `code` and the socket closed.
async fn assert_refused(gateway: &RunningGateway, agent_id: &str, token: &Sensitive, code: ErrorCode) {
    let mut ws = connect(gateway).await;
    send(&mut ws, &hello(agent_id, token, vec![])).await;
    match recv(&mut ws).await {
        Message::Error(error) => assert_eq!(error.code, code, "{}", error.message),
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    }
    assert_eq!(expect_close(&mut ws).await, 1008);
}

fn mint(gateway: &RunningGateway, scope: &Scope, agent_id: &str) -> Sensitive {
    gateway.gateway().mint_enrollment_token(scope, agent_id, Duration::from_secs(600)).unwrap()
}

fn build(job_id: &str, git_token: Option<&str>) -> Message {
    Message::Build(Build {
        job_id: job_id.into(),
        clone_url: "https://github.com/acme/shop.git".into(),
        git_token: git_token.map(Sensitive::from),
        commit: "a".repeat(40),
        context: ".".into(),
        dockerfile: "Dockerfile".into(),
        platform: Platform::LinuxAmd64,
        build_args: BTreeMap::new(),
        cache_from: vec![],
        cache_to: None,
        image: "registry.stagely:5000/shop/api:pr-1".into(),
        registry_auth: None,
        timeout_seconds: 600,
    })
}

fn status(job_id: &str, state: JobState, message: Option<&str>) -> Message {
    Message::Status(Status {
        job_id: job_id.into(),
        state,
        exit_code: None,
        duration_seconds: None,
        message: message.map(str::to_owned),
        image_digest: None,
        services: vec![],
    })
}

// ---- handshake ----

#[tokio::test]
async fn a_good_enrollment_token_is_accepted_once() {
    let gateway = start(builder()).await;
    let scope = scope("handshake");
    let token = mint(&gateway, &scope, "agent-1");
    let (_ws, ack) = enroll(&gateway, "agent-1", &token, vec![]).await;
    assert_eq!(ack.scope, scope);
    assert_eq!(ack.heartbeat_interval_seconds, HEARTBEAT_INTERVAL_SECS);
    assert_ne!(ack.session_token, token);
    assert!(gateway.gateway().is_connected(&scope));

    // The same enrollment token a second time.
    assert_refused(&gateway, "agent-1", &token, ErrorCode::TokenReplayed).await;
}

#[tokio::test]
async fn a_vms_provisioning_is_observed_once_as_its_agent_enrolls_and_agents_are_counted_by_role() {
    use stagely_operator::gateway::ConnectedAgents;
    use stagely_operator::metrics::Metrics;
    let gateway = start(builder()).await;
    let metrics = Metrics::default();
    metrics.count_agents(gateway.gateway());
    let count = |provider: &str, role: &str| {
        let text = metrics.register("0").encode();
        let sample =
            format!("stagely_operator_vm_provisioning_seconds_count{{provider=\"{provider}\",role=\"{role}\"}} ");
        text.lines().find_map(|line| line.strip_prefix(&sample)?.parse::<u64>().ok()).unwrap_or_default()
    };
    assert_eq!(gateway.gateway().connected_agents(), ConnectedAgents::default());

    // A builder VM's agent enrolls: one provisioning, for its provider and role.
    let builder_scope = scope("provisioned");
    let token = gateway
        .gateway()
        .mint_vm_enrollment_token(&builder_scope, "agent-b", Duration::from_secs(600), "hetzner")
        .unwrap();
    let (first, ack) = enroll(&gateway, "agent-b", &token, vec![]).await;
    assert_eq!(count("hetzner", "builder"), 1);
    assert_eq!(gateway.gateway().connected_agents(), ConnectedAgents { builders: 1, previews: 0 });

    // Its reconnect with the session token is no new VM.
    drop(first);
    let (_again, _) = enroll(&gateway, "agent-b", &ack.session_token, vec![]).await;
    assert_eq!(count("hetzner", "builder"), 1);

    // A preview's agent, and an agent whose token names no provider (not a VM the operator made).
    let preview_scope = Scope { kind: ScopeKind::Environment, ..scope("preview") };
    let token =
        gateway.gateway().mint_vm_enrollment_token(&preview_scope, "agent-p", Duration::from_secs(600), "aws").unwrap();
    let (_preview, _) = enroll(&gateway, "agent-p", &token, vec![]).await;
    let (_plain, _) = enroll(&gateway, "agent-x", &mint(&gateway, &scope("plain"), "agent-x"), vec![]).await;
    assert_eq!(count("aws", "preview"), 1);
    assert_eq!(gateway.gateway().connected_agents(), ConnectedAgents { builders: 2, previews: 1 });
    let text = metrics.register("0").encode();
    assert!(text.contains(r#"stagely_operator_connected_agents{role="builder"} 2"#), "{text}");
    assert!(text.contains(r#"stagely_operator_connected_agents{role="preview"} 1"#), "{text}");
}

#[tokio::test]
async fn bad_signature_expired_and_foreign_tokens_are_refused() {
    let gateway = start(builder()).await;
    let scope = scope("refusals");

    let other = Gateway::builder().signing_key(SigningKey::generate().unwrap()).build().await.unwrap();
    let forged = other.mint_enrollment_token(&scope, "agent-1", Duration::from_secs(600)).unwrap();
    assert_refused(&gateway, "agent-1", &forged, ErrorCode::InvalidToken).await;
    assert_refused(&gateway, "agent-1", &Sensitive::from("not-a-jwt"), ErrorCode::InvalidToken).await;

    let mut claims = AgentClaims::enrollment(&scope, "agent-1", Duration::ZERO).unwrap();
    claims.exp -= 60;
    let expired = gateway.gateway().tokens().sign(&claims).unwrap();
    assert_refused(&gateway, "agent-1", &expired, ErrorCode::ExpiredToken).await;

    // Minted for agent-1, presented by agent-2: refused, and not used up by the attempt.
    let token = mint(&gateway, &scope, "agent-1");
    assert_refused(&gateway, "agent-2", &token, ErrorCode::WrongScope).await;
    let log_token = gateway.gateway().mint_log_token("job-1", Duration::from_secs(60)).unwrap();
    assert_refused(&gateway, "agent-1", &log_token, ErrorCode::InvalidToken).await;
    enroll(&gateway, "agent-1", &token, vec![]).await;

    // A first frame that is not a HELLO.
    let mut ws = connect(&gateway).await;
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 0, sent_at_ms: 0 })).await;
    assert!(matches!(recv(&mut ws).await, Message::Error(ErrorMessage { code: ErrorCode::BadMessage, .. })));
    assert_eq!(expect_close(&mut ws).await, 1008);
}

#[tokio::test]
async fn the_session_token_reconnects_and_a_second_connection_replaces_the_first() {
    let gateway = start(builder()).await;
    let scope = scope("session");
    let (mut first, ack) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;

    // The session token works again and again, and only for its agent.
    assert_refused(&gateway, "agent-9", &ack.session_token, ErrorCode::WrongScope).await;
    let (mut second, again) = enroll(&gateway, "agent-1", &ack.session_token, vec![]).await;
    assert_eq!(again.scope, scope);
    assert_eq!(expect_close(&mut first).await, 4000, "the older connection is closed");

    // Commands go to the newer connection.
    let job = gateway.gateway().send(&scope, build("job-session", None)).unwrap();
    assert_eq!(recv(&mut second).await.job_id(), Some("job-session"));
    send(&mut second, &status("job-session", JobState::Succeeded, None)).await;
    assert_eq!(job.finished().await.unwrap().state, JobState::Succeeded);

    let (_third, _) = enroll(&gateway, "agent-1", &again.session_token, vec![]).await;
    assert_eq!(expect_close(&mut second).await, 4000);
}

#[tokio::test]
async fn a_long_connection_is_sent_a_fresh_session_token_before_the_last_expires() {
    let settings = Settings {
        session_ttl: Duration::from_secs(30),
        session_renewal: Duration::from_millis(200),
        token_leeway: Duration::ZERO,
        ..Settings::default()
    };
    let gateway = start(builder().settings(settings)).await;
    let scope = scope("renewal");
    let (mut ws, first) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;
    let Message::HelloAck(renewed) = recv(&mut ws).await else { panic!("expected a renewing HELLO_ACK") };
    assert_ne!(renewed.session_token, first.session_token);
    assert_eq!(renewed.scope, scope);
    let (claims, _) = gateway.gateway().tokens().verify_agent(renewed.session_token.expose(), "agent-1").unwrap();
    let (old, _) = gateway.gateway().tokens().verify_agent(first.session_token.expose(), "agent-1").unwrap();
    assert!(claims.exp >= old.exp, "the renewal lasts at least as long");
    // The renewed token lets the agent back in.
    drop(ws);
    enroll(&gateway, "agent-1", &renewed.session_token, vec![]).await;
}

// ---- commands ----

#[tokio::test]
async fn a_command_is_resent_after_a_reconnect_and_its_status_resolves_the_caller() {
    let gateway = start(builder()).await;
    let scope = scope("resend");

    // Sent before the agent connects: delivered on HELLO.
    let controller = tokio::spawn({
        let gateway = gateway.gateway().clone();
        let scope = scope.clone();
        async move { gateway.command(&scope, build("job-1", None)).await }
    });
    // Sending a pending job id again only subscribes to it (whichever of the two comes first).
    let mut job = gateway.gateway().send(&scope, build("job-1", None)).unwrap();
    let (mut ws, ack) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;
    assert_eq!(recv(&mut ws).await, build("job-1", None));
    send(&mut ws, &status("job-1", JobState::Accepted, None)).await;
    assert_eq!(job.next_status().await.unwrap().state, JobState::Accepted);

    // The agent drops off without finishing; on reconnect the job comes again, same job id.
    drop(ws);
    eventually("the gateway to see the disconnect", WAIT, || {
        let connected = gateway.gateway().is_connected(&scope);
        async move { (!connected).then_some(()) }
    })
    .await;
    let (mut ws, ack) = enroll(&gateway, "agent-1", &ack.session_token, vec![]).await;
    assert_eq!(recv(&mut ws).await, build("job-1", None));

    // Listed as running in the HELLO: not resent.
    drop(ws);
    let running = vec![JobSummary { job_id: "job-1".into(), state: JobState::Running }];
    let (mut ws, _) = enroll(&gateway, "agent-1", &ack.session_token, running).await;
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 7 })).await;
    assert_eq!(recv(&mut ws).await, Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 7 }), "no resend first");

    send(&mut ws, &status("job-1", JobState::Running, None)).await;
    send(&mut ws, &status("job-1", JobState::Succeeded, Some("built"))).await;
    let done = tokio::time::timeout(WAIT, controller).await.expect("resolved in time").unwrap().unwrap();
    assert_eq!((done.state, done.message.as_deref()), (JobState::Succeeded, Some("built")));

    // Not pending any more: a later reconnect does not bring it back.
    drop(ws);
    let (mut ws, _) = enroll(&gateway, "agent-1", &ack.session_token, vec![]).await;
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 2, sent_at_ms: 8 })).await;
    assert!(matches!(recv(&mut ws).await, Message::Heartbeat(_)));

    assert!(matches!(
        gateway.gateway().send(&scope, Message::Heartbeat(Heartbeat { seq: 0, sent_at_ms: 0 })),
        Err(GatewayError::NotACommand("HEARTBEAT"))
    ));
    gateway.gateway().forget(&scope);
    let forgotten = gateway.gateway().send(&scope, build("job-2", None)).unwrap();
    gateway.gateway().forget(&scope);
    assert!(matches!(forgotten.finished().await, Err(GatewayError::Forgotten(_))));
}

#[tokio::test]
async fn capabilities_are_those_of_the_connected_agents_hello() {
    let gateway = start(builder()).await;
    let (current, older) = (scope("capable"), scope("older-agent"));
    assert_eq!(gateway.gateway().capabilities(&current), None, "no agent connected yet");

    let mut ws = connect(&gateway).await;
    let mut message = hello("agent-1", &mint(&gateway, &current, "agent-1"), vec![]);
    if let Message::Hello(hello) = &mut message {
        hello.capabilities = vec![CAPABILITY_TEST.into()];
    }
    send(&mut ws, &message).await;
    assert!(matches!(recv(&mut ws).await, Message::HelloAck(_)));
    assert_eq!(gateway.gateway().capabilities(&current), Some(vec!["test".to_owned()]));

    // An agent that predates capabilities writes no such field: connected, capable of nothing
    // more than the basic commands.
    let mut old = connect(&gateway).await;
    let token = mint(&gateway, &older, "agent-2");
    let frame = serde_json::json!({"type": "HELLO", "payload": {
        "agent_id": "agent-2", "token": token.expose(), "version": "0.1.0",
        "system_info": {"os": "linux", "arch": "amd64", "hostname": "vm", "cpus": 1, "memory_mib": 512}}});
    old.send(WsMessage::text(frame.to_string())).await.unwrap();
    assert!(matches!(recv(&mut old).await, Message::HelloAck(_)));
    assert_eq!(gateway.gateway().capabilities(&older), Some(vec![]));

    // Gone again: unknown.
    drop(ws);
    eventually("the capable agent's disconnect", WAIT, || {
        let capabilities = gateway.gateway().capabilities(&current);
        async move { capabilities.is_none().then_some(()) }
    })
    .await;
    assert_eq!(gateway.gateway().capabilities(&older), Some(vec![]));
}

#[tokio::test]
async fn an_agent_error_about_a_pending_job_fails_it_with_the_message_masked() {
    let gateway = start(builder()).await;
    let scope = scope("agent-errors");
    let (mut ws, _) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;
    let password = "pull-pa55word-for-tests";
    let test = Message::Test(TestRun {
        job_id: "test-1".into(),
        image: "registry.stagely:5000/shop/e2e:pr-1".into(),
        commands: vec!["wget -q -O- $STAGELY_PREVIEW_URL".into()],
        preview_url: "http://127.0.0.1:8080".into(),
        timeout_seconds: 60,
        registry_auth: Some(RegistryAuth {
            server: "registry".into(),
            username: "pull".into(),
            password: password.into(),
        }),
    });
    let job = gateway.gateway().send(&scope, test.clone()).unwrap();
    assert_eq!(recv(&mut ws).await, test, "TEST is delivered as sent");

    // An ERROR naming no job ends none (the heartbeat's echo shows the ERROR was handled).
    let unrelated = ErrorMessage { code: ErrorCode::Internal, message: "disk full".into(), job_id: None };
    send(&mut ws, &Message::Error(unrelated)).await;
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 1 })).await;
    assert!(matches!(recv(&mut ws).await, Message::Heartbeat(_)));
    assert_eq!(job.latest(), None, "still waiting");

    // An ERROR naming the job fails it with its message, secrets masked.
    let error = ErrorMessage {
        code: ErrorCode::BadMessage,
        message: format!("failed to read the TEST command (login with {password})"),
        job_id: Some("test-1".into()),
    };
    send(&mut ws, &Message::Error(error)).await;
    let failed = tokio::time::timeout(WAIT, job.finished()).await.expect("resolved in time").unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.message.as_deref(), Some("failed to read the TEST command (login with ***)"));

    // A job that has finished stays as it finished.
    let mut first = gateway.gateway().send(&scope, build("build-1", None)).unwrap();
    let second = gateway.gateway().send(&scope, build("build-1", None)).unwrap();
    assert_eq!(recv(&mut ws).await.job_id(), Some("build-1"));
    send(&mut ws, &status("build-1", JobState::Succeeded, Some("built"))).await;
    assert_eq!(first.next_status().await.unwrap().state, JobState::Succeeded);
    let late = ErrorMessage { code: ErrorCode::Internal, message: "late".into(), job_id: Some("build-1".into()) };
    send(&mut ws, &Message::Error(late)).await;
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 2, sent_at_ms: 2 })).await;
    assert!(matches!(recv(&mut ws).await, Message::Heartbeat(_)));
    let done = second.finished().await.unwrap();
    assert_eq!((done.state, done.message.as_deref()), (JobState::Succeeded, Some("built")));
}

#[tokio::test]
async fn a_slow_agent_does_not_stall_commands_to_another() {
    let settings = Settings { queue_capacity: 4, token_leeway: Duration::ZERO, ..Settings::default() };
    let gateway = start(builder().settings(settings)).await;
    let (slow_scope, fast_scope) = (scope("slow"), scope("fast"));
    // The slow agent says HELLO and then never reads again.
    let (_slow, _) = enroll(&gateway, "slow", &mint(&gateway, &slow_scope, "slow"), vec![]).await;
    let (mut fast, _) = enroll(&gateway, "fast", &mint(&gateway, &fast_scope, "fast"), vec![]).await;

    // Big commands fill the socket buffers, then the queue; sending never waits on it.
    let mut big = build("x", None);
    if let Message::Build(b) = &mut big {
        b.build_args.insert("PADDING".into(), "p".repeat(256 * 1024));
    }
    let mut sent = 0;
    let refused = loop {
        let mut command = big.clone();
        if let Message::Build(b) = &mut command {
            b.job_id = format!("slow-{sent}");
        }
        match gateway.gateway().send(&slow_scope, command) {
            Ok(_) => sent += 1,
            Err(err) => break err,
        }
        assert!(sent < 10_000, "the slow agent's queue never filled");
        tokio::task::yield_now().await;
    };
    assert!(matches!(refused, GatewayError::QueueFull { .. }), "{refused}");
    assert!(!gateway.gateway().is_connected(&slow_scope), "the slow agent is let go");

    let job = gateway.gateway().send(&fast_scope, build("fast-1", None)).unwrap();
    assert_eq!(recv(&mut fast).await.job_id(), Some("fast-1"));
    send(&mut fast, &status("fast-1", JobState::Failed, Some("exit 1"))).await;
    assert_eq!(job.finished().await.unwrap().state, JobState::Failed);
}

#[tokio::test]
async fn shutdown_closes_agents_with_a_close_frame() {
    let gateway = start(builder()).await;
    let scope = scope("shutdown");
    let (mut ws, _) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;
    let addr = gateway.addr();
    let stopping = tokio::spawn(gateway.shutdown());
    assert_eq!(expect_close(&mut ws).await, 1001);
    tokio::time::timeout(WAIT, stopping).await.expect("drained in time").unwrap().unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

// ---- heartbeats on a real Environment ----

fn plane() -> &'static stagely_testenv::ControlPlane {
    stagely_testenv::shared(|| stagely_testenv::Options { crds: stagely_api::crds(), ..Default::default() })
}

fn environment(name: &str) -> Environment {
    Environment::new(
        name,
        EnvironmentSpec {
            project_ref: LocalObjectRef::new("shop"),
            pull_request: PullRequest {
                number: 7,
                head_sha: "9f2c1e0b7a6d5c4b3a29180f7e6d5c4b3a291807".into(),
                head_ref: "feature".into(),
                base_ref: "main".into(),
                author: None,
                url: None,
            },
            overrides: None,
        },
    )
}

#[tokio::test]
async fn heartbeats_land_on_the_environment_and_stale_scopes_are_refused() {
    let client = plane().client().await.expect("client");
    let namespace = "gateway-heartbeat";
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    let envs = Api::<Environment>::namespaced(client.clone(), namespace);
    let env = envs.create(&PostParams::default(), &environment("shop-pr-7")).await.expect("create environment");
    let scope = Scope {
        kind: ScopeKind::Environment,
        namespace: namespace.into(),
        name: "shop-pr-7".into(),
        uid: env.metadata.uid.clone().unwrap(),
    };

    let gateway =
        start(builder().objects(KubeObjects::new(client.clone())).heartbeat_write_interval(Duration::from_millis(200)))
            .await;
    let (mut ws, ack) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 1 })).await;
    assert_eq!(recv(&mut ws).await, Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 1 }), "echoed as the ack");
    let recorded = eventually("status.lastHeartbeat", WAIT, || {
        let envs = envs.clone();
        async move { envs.get_status("shop-pr-7").await.ok()?.status?.last_heartbeat }
    })
    .await;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(recorded.0);
    assert!(age.as_secs() < 600, "a recent time: {recorded:?}");

    // A token for an object that no longer matches (deleted and recreated: a new UID).
    let gone = Scope { uid: "0b7c6f0e-0000-0000-0000-000000000000".into(), ..scope.clone() };
    assert_refused(&gateway, "agent-2", &mint(&gateway, &gone, "agent-2"), ErrorCode::WrongScope).await;
    let missing = Scope { name: "no-such-env".into(), ..scope.clone() };
    assert_refused(&gateway, "agent-3", &mint(&gateway, &missing, "agent-3"), ErrorCode::WrongScope).await;

    // Once the Environment is gone, even the session token is refused.
    envs.delete("shop-pr-7", &DeleteParams::default()).await.unwrap();
    eventually("the environment to be deleted", WAIT, || {
        let envs = envs.clone();
        async move { envs.get_opt("shop-pr-7").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert_refused(&gateway, "agent-1", &ack.session_token, ErrorCode::WrongScope).await;
}

// ---- logs ----

/// A real redis-server (from testenv), with what these tests read from it.
struct Redis(Server);

impl Redis {
    async fn start() -> Self {
        Self(Server::redis().expect("redis-server is installed (scripts/install-deps.sh installs it)"))
    }

    fn url(&self) -> String {
        self.0.url()
    }

    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url()).ok()?.get_multiplexed_async_connection().await.ok()
    }

    async fn stream_len(&self, job_id: &str) -> u64 {
        let mut conn = self.conn().await.unwrap();
        redis::cmd("XLEN").arg(format!("stagely:logs:{job_id}")).query_async(&mut conn).await.unwrap()
    }

    /// Every value stored under every key, as one string.
    async fn dump(&self) -> String {
        let mut conn = self.conn().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
        let mut all = String::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
            let read = match kind.as_str() {
                "stream" => redis::cmd("XRANGE").arg(&key).arg("-").arg("+").clone(),
                "set" => redis::cmd("SMEMBERS").arg(&key).clone(),
                _ => redis::cmd("GET").arg(&key).clone(),
            };
            let entries: redis::Value = read.query_async(&mut conn).await.unwrap();
            all.push_str(&format!("{key} {entries:?}\n"));
        }
        all
    }
}

fn log(job_id: &str, seq: u64, data: &str) -> Message {
    Message::Log(Log {
        job_id: job_id.into(),
        stream: LogStream::Stdout,
        seq,
        timestamp_ms: seq.saturating_add(1_000),
        data: data.into(),
    })
}

/// GET over plain HTTP/1.1 on loopback; returns (status code, body).
async fn http_get(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let (code, _, body) = http_response(addr, path, bearer).await;
    (code, body)
}

/// GET over plain HTTP/1.1 on loopback; returns the status code, the headers (lowercase) and
/// the body (de-chunked).
async fn http_response(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.expect("response in time").unwrap();
    let code = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let head = head.to_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    (code, head, body)
}

/// The data of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut data = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hexadecimal chunk size");
        if size == 0 {
            return data;
        }
        data.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The lines of `job_id` read through the log endpoint, once there are at least `count`.
async fn logged(gateway: &RunningGateway, job_id: &str, count: usize) -> Vec<serde_json::Value> {
    let token = gateway.gateway().mint_log_token(job_id, Duration::from_secs(60)).unwrap();
    let (addr, path) = (gateway.addr(), format!("/v1/jobs/{job_id}/logs"));
    let body = eventually(&format!("{count} lines of {job_id}"), WAIT, || {
        let (token, path) = (token.clone(), path.clone());
        async move {
            let (_, body) = http_get(addr, &path, Some(token.expose())).await;
            (body.lines().count() >= count).then_some(body)
        }
    })
    .await;
    body.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

#[tokio::test]
async fn logs_are_masked_capped_and_readable_and_secrets_never_reach_the_gateway_log() {
    let redis = Redis::start().await;
    let gateway = start(builder().redis(redis.url()).log_max_len(100)).await;
    let scope = scope("logs");
    let (git_token, password, database_url) = ("ghs_s3cr3tT0ken", "hunter2-registry", "postgres://u:pw-9f8e@db/x");
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----";
    let (mut ws, ack) = enroll(&gateway, "agent-1", &mint(&gateway, &scope, "agent-1"), vec![]).await;

    let mut command = build("build-logs", Some(git_token));
    if let Message::Build(b) = &mut command {
        b.registry_auth =
            Some(RegistryAuth { server: "registry".into(), username: "push".into(), password: password.into() });
    }
    let job = gateway.gateway().send(&scope, command).unwrap();
    let deploy = Message::Deploy(Deploy {
        job_id: "deploy-logs".into(),
        project: "shop".into(),
        clone_url: "https://github.com/acme/shop.git".into(),
        git_token: None,
        commit: "b".repeat(40),
        compose_file: "docker-compose.yml".into(),
        images: BTreeMap::new(),
        secrets: [("DATABASE_URL", database_url), ("tls.key", pem)]
            .into_iter()
            .map(|(key, value)| SecretValue {
                key: key.into(),
                value: value.into(),
                scope: GLOBAL_SCOPE.into(),
                kind: SecretKind::Env,
                path: None,
                mode: None,
            })
            .collect(),
        lifecycle: Lifecycle::default(),
        registry_auth: None,
    });
    let _deploy = gateway.gateway().send(&scope, deploy).unwrap();
    assert_eq!(recv(&mut ws).await.job_id(), Some("build-logs"));
    assert_eq!(recv(&mut ws).await.job_id(), Some("deploy-logs"));

    // Secrets in log lines, whole or a line of a multi-line one, and in a failing status.
    send(&mut ws, &log("build-logs", 0, &format!("cloning with {git_token}"))).await;
    send(&mut ws, &log("build-logs", 1, &format!("login push:{password} ok; db={database_url}"))).await;
    send(&mut ws, &log("build-logs", 2, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC")).await;
    // The last line again, as an agent resends it after a reconnect: stored once.
    send(&mut ws, &log("build-logs", 2, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC")).await;
    for seq in 3..1000 {
        send(&mut ws, &log("build-logs", seq, &format!("line {seq}"))).await;
    }
    send(&mut ws, &status("build-logs", JobState::Failed, Some(&format!("push failed for {password}")))).await;
    send(&mut ws, &Message::Error(ErrorMessage { code: ErrorCode::Internal, message: git_token.into(), job_id: None }))
        .await;
    let failed = job.finished().await.unwrap();
    assert_eq!(failed.message.as_deref(), Some("push failed for ***"), "status messages are masked");

    // Capped: about 100 lines kept (MAXLEN ~ trims whole nodes), the newest among them.
    let len = redis.stream_len("build-logs").await;
    assert!((100..=300).contains(&len), "{len} lines kept");

    let addr = gateway.addr();
    let path = "/v1/jobs/build-logs/logs";
    assert_eq!(http_get(addr, path, None).await.0, 401);
    assert_eq!(http_get(addr, path, Some(ack.session_token.expose())).await.0, 401);
    let other = gateway.gateway().mint_log_token("deploy-logs", Duration::from_secs(60)).unwrap();
    assert_eq!(http_get(addr, path, Some(other.expose())).await.0, 403);
    let token = gateway.gateway().mint_log_token("build-logs", Duration::from_secs(60)).unwrap();
    let (code, head, body) = http_response(addr, path, Some(token.expose())).await;
    assert_eq!(code, 200, "{body}");
    assert!(head.contains("transfer-encoding: chunked"), "streamed, not built whole: {head}");
    let lines: Vec<serde_json::Value> = body.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len() as u64, len);
    assert_eq!(lines.last().unwrap()["data"], "line 999");
    assert_eq!(lines.last().unwrap()["seq"], 999);
    assert!(lines.iter().all(|line| line["data"] != "line 3"), "the oldest lines are trimmed");

    // A short job read in full: each masked line stored once.
    let _short = gateway.gateway().send(&scope, build("short", None)).unwrap();
    assert_eq!(recv(&mut ws).await.job_id(), Some("short"));
    send(&mut ws, &log("short", 0, &format!("token {git_token} then {password}"))).await;
    send(&mut ws, &log("short", 1, database_url)).await;
    send(&mut ws, &log("short", 2, "  MIIEvQIBADANBgkqhkiG9w0BAQEFAASC  ")).await;
    send(&mut ws, &log("short", 2, "  MIIEvQIBADANBgkqhkiG9w0BAQEFAASC  ")).await;
    let data: Vec<String> =
        logged(&gateway, "short", 3).await.iter().map(|line| line["data"].as_str().unwrap().to_owned()).collect();
    assert_eq!(data, ["token *** then ***", "***", "  ***  "]);

    let stored = redis.dump().await;
    let printed = logs::text();
    assert!(printed.contains("agent connected"), "the capture works: {printed}");
    for secret in [git_token, password, database_url, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", ack.session_token.expose()] {
        assert!(!stored.contains(secret), "{secret} reached redis");
        assert!(!printed.contains(secret), "{secret} reached the gateway's log");
    }
}

#[tokio::test]
async fn an_agent_writes_only_the_logs_of_its_own_jobs_and_cannot_silence_them() {
    let redis = Redis::start().await;
    let gateway = start(builder().redis(redis.url())).await;
    let (mine, theirs) = (scope("log-owner"), scope("log-other"));
    let (mut ws, _) = enroll(&gateway, "agent-1", &mint(&gateway, &mine, "agent-1"), vec![]).await;
    let (mut other, _) = enroll(&gateway, "agent-2", &mint(&gateway, &theirs, "agent-2"), vec![]).await;
    let first_run = gateway.gateway().send(&mine, build("job-mine", None)).unwrap();
    let _theirs = gateway.gateway().send(&theirs, build("job-theirs", None)).unwrap();
    assert_eq!(recv(&mut ws).await.job_id(), Some("job-mine"));
    assert_eq!(recv(&mut other).await.job_id(), Some("job-theirs"));

    // Lines for another agent's job, or for a job no one sent: refused, once per job.
    for job in ["job-theirs", "never-sent"] {
        send(&mut ws, &log(job, 0, "forged line")).await;
        send(&mut ws, &log(job, 1, "forged line")).await;
        match recv(&mut ws).await {
            Message::Error(error) => {
                assert_eq!(error.code, ErrorCode::UnknownJob, "{}", error.message);
                assert!(error.message.contains(job), "{}", error.message);
            }
            unexpected => panic!("expected an ERROR, got {unexpected:?}"),
        }
    }
    send(&mut ws, &Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 1 })).await;
    assert!(matches!(recv(&mut ws).await, Message::Heartbeat(_)), "one ERROR per job, then nothing");
    assert_eq!(redis.stream_len("job-theirs").await, 0);
    assert_eq!(redis.stream_len("never-sent").await, 0);

    // A huge sequence number does not silence the lines after it.
    send(&mut ws, &log("job-mine", u64::MAX - 1, "huge seq")).await;
    send(&mut ws, &log("job-mine", 1, "after the huge one")).await;
    // The job runs again under the same id (the agent restarted): its lines start at 0 again,
    // and the first run's are kept.
    send(&mut ws, &status("job-mine", JobState::Succeeded, None)).await;
    tokio::time::timeout(WAIT, first_run.finished()).await.expect("the first run ends").unwrap();
    let _again = gateway.gateway().send(&mine, build("job-mine", None)).unwrap();
    assert_eq!(recv(&mut ws).await.job_id(), Some("job-mine"));
    send(&mut ws, &log("job-mine", 0, "second run, line 0")).await;
    send(&mut ws, &log("job-mine", 1, "second run, line 1")).await;
    let lines: Vec<(u64, String)> = logged(&gateway, "job-mine", 4)
        .await
        .iter()
        .map(|line| (line["seq"].as_u64().unwrap(), line["data"].as_str().unwrap().to_owned()))
        .collect();
    let expected =
        [(u64::MAX - 1, "huge seq"), (1, "after the huge one"), (0, "second run, line 0"), (1, "second run, line 1")]
            .map(|(seq, data)| (seq, data.to_owned()));
    assert_eq!(lines, expected);

    // A log longer than a page of the endpoint's reads comes whole and in order.
    let _long = gateway.gateway().send(&mine, build("job-long", None)).unwrap();
    assert_eq!(recv(&mut ws).await.job_id(), Some("job-long"));
    for seq in 0..1234 {
        send(&mut ws, &log("job-long", seq, &format!("line {seq}"))).await;
    }
    let seqs: Vec<u64> = logged(&gateway, "job-long", 1234).await.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..1234).collect::<Vec<u64>>());
}

// ---- TLS ----

/// Writes a serving certificate for 127.0.0.1 signed by `ca`, and its key, to `dir` as a
/// mounted Secret holds them; returns their paths.
fn write_certificate(dir: &Path, ca: &TestCa) -> (PathBuf, PathBuf) {
    let (cert, key) = ca.serving(&["127.0.0.1"]).unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    // The key first: until the certificate follows, the pair does not match and is not taken.
    std::fs::write(&key_path, key).unwrap();
    std::fs::write(&cert_path, cert).unwrap();
    (cert_path, key_path)
}

type Wss = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A `wss://` connection to `gateway` by a client that trusts only `ca`, or why it failed.
async fn connect_tls(gateway: &RunningGateway, ca: &TestCa) -> Result<Wss, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca.der().to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gateway.addr()).await.expect("tcp connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    let tls = tokio::time::timeout(WAIT, handshake).await.expect("a handshake in time").map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(gateway.connect_url(), tls).await.map_err(|e| e.to_string())?;
    Ok(ws)
}

#[tokio::test]
async fn over_tls_a_renewed_certificate_reaches_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (first_ca, second_ca) = (TestCa::new("first gateway CA").unwrap(), TestCa::new("second gateway CA").unwrap());
    let (cert, key) = write_certificate(dir.path(), &first_ca);
    let settings = Settings {
        token_leeway: Duration::ZERO,
        tls_reload_interval: Duration::from_millis(50),
        ..Settings::default()
    };
    let gateway = start(builder().settings(settings).tls(CertStore::load(&cert, &key).unwrap())).await;
    assert!(gateway.connect_url().starts_with("wss://127.0.0.1:"), "{}", gateway.connect_url());

    // TLS only: a plain WebSocket client is not answered.
    let tcp = TcpStream::connect(gateway.addr()).await.unwrap();
    let plain = format!("ws://{}{CONNECT_PATH}", gateway.addr());
    let answer = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(plain, tcp)).await.expect("in time");
    assert!(answer.is_err(), "a plain WebSocket was served");

    let first = scope("tls-first");
    let mut before = connect_tls(&gateway, &first_ca).await.expect("the first CA's certificate is served");
    send(&mut before, &hello("agent-1", &mint(&gateway, &first, "agent-1"), vec![])).await;
    assert!(matches!(recv(&mut before).await, Message::HelloAck(_)), "enrolled over wss://");
    let err = connect_tls(&gateway, &second_ca).await.expect_err("a client of the second CA refuses it");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // The Secret is renewed, by another CA: the files change under the running gateway.
    write_certificate(dir.path(), &second_ca);
    let mut after = eventually("new connections to get the renewed certificate", WAIT, || async {
        connect_tls(&gateway, &second_ca).await.ok()
    })
    .await;
    let second = scope("tls-second");
    send(&mut after, &hello("agent-2", &mint(&gateway, &second, "agent-2"), vec![])).await;
    assert!(matches!(recv(&mut after).await, Message::HelloAck(_)), "enrolled with the renewed certificate");
    let err = connect_tls(&gateway, &first_ca).await.expect_err("the old certificate is no longer served");
    assert!(err.contains("UnknownIssuer"), "{err}");
    // The connection made before the renewal carries on.
    send(&mut before, &Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 1 })).await;
    assert_eq!(recv(&mut before).await, Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 1 }));
    assert!(gateway.gateway().is_connected(&first) && gateway.gateway().is_connected(&second));
}

// ---- configuration ----

#[test]
fn the_gateway_config_has_defaults_and_reads_its_key_file() {
    use clap::Parser;
    let config = stagely_operator::Config::try_parse_from(["stagely-operator"]).unwrap();
    assert_eq!(config.gateway.gateway_addr.to_string(), "0.0.0.0:8443");
    assert!(config.gateway.gateway_signing_key_file.is_none());

    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "too-short").unwrap();
    let path = short.to_str().unwrap();
    let config =
        stagely_operator::Config::try_parse_from(["stagely-operator", "--gateway-signing-key-file", path]).unwrap();
    let err = config.gateway.signing_key().unwrap_err().to_string();
    assert!(err.contains("signing key is 9 bytes; at least 32"), "{err}");

    let args = ["stagely-operator", "--gateway-signing-key", "0123456789abcdef0123456789abcdef-secret"];
    let config = stagely_operator::Config::try_parse_from(args).unwrap();
    assert!(config.gateway.signing_key().is_ok());
    assert!(!format!("{config:?}").contains("-secret"), "the key never shows in Debug");
}

#[test]
fn tls_flags_load_the_certificate_advertise_wss_and_check_the_ca_handed_to_agents() {
    use clap::Parser;
    let parse = |args: &[&str]| stagely_operator::Config::try_parse_from(["stagely-operator"].iter().chain(args));
    let config = parse(&[]).unwrap();
    assert!(config.gateway.certificate().unwrap().is_none());
    assert_eq!(config.agent_settings().unwrap().gateway_url, "ws://127.0.0.1:8443/v1/agent/connect");

    let err = parse(&["--gateway-tls-cert", "/tls/tls.crt"]).unwrap_err().to_string();
    assert!(err.contains("--gateway-tls-key"), "{err}");
    let config = parse(&["--gateway-tls-cert", "/nonexistent/tls.crt", "--gateway-tls-key", "/nonexistent/tls.key"]);
    let err = config.unwrap().gateway.certificate().unwrap_err().to_string();
    assert_eq!(
        err,
        "failed to load the gateway's TLS certificate: failed to read /nonexistent/tls.crt: No such file or directory (os error 2)"
    );

    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("gateway CA").unwrap();
    let (cert, key) = write_certificate(dir.path(), &ca);
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key, ca_path) = (cert.to_str().unwrap(), key.to_str().unwrap(), ca_file.to_str().unwrap());
    let config = parse(&["--gateway-tls-cert", cert, "--gateway-tls-key", key, "--agent-gateway-ca-file", ca_path]);
    let config = config.unwrap();
    assert!(config.gateway.certificate().unwrap().is_some());
    let agents = config.agent_settings().unwrap();
    assert_eq!(agents.gateway_url, "wss://127.0.0.1:8443/v1/agent/connect", "TLS on: the default URL is wss://");
    assert_eq!(agents.gateway_ca_file.as_deref(), Some(ca_file.as_path()));

    // The CA file goes into user data: one holding a key stops the operator at startup.
    std::fs::write(&ca_file, format!("{}{}", ca.pem(), std::fs::read_to_string(key).unwrap())).unwrap();
    let err = config.agent_settings().unwrap_err().to_string();
    assert!(err.contains("ca.crt") && err.contains("holds a private key"), "{err}");
}

#[tokio::test]
async fn a_restarted_gateway_still_refuses_a_used_enrollment_token() {
    let redis = Redis::start().await;
    let key = [7u8; 32];
    let first = start(builder().signing_key(SigningKey::from_bytes(key).unwrap()).redis(redis.url())).await;
    let scope = scope("restart-replay");
    let token = mint(&first, &scope, "agent-1");
    let (ws, _) = enroll(&first, "agent-1", &token, vec![]).await;
    drop(ws);
    first.shutdown().await.unwrap();

    // A new operator process: same key, same Redis, nothing in memory.
    let second = start(builder().signing_key(SigningKey::from_bytes(key).unwrap()).redis(redis.url())).await;
    assert_refused(&second, "agent-1", &token, ErrorCode::TokenReplayed).await;
    // A token it has not seen is still welcome.
    let fresh = mint(&second, &scope, "agent-1");
    enroll(&second, "agent-1", &fresh, vec![]).await;
}
