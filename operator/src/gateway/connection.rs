//! One agent connection: the HELLO handshake, then one task that writes the agent's queue and
//! reads its frames (heartbeats, logs, statuses), and renews the agent's session token.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures_util::future::BoxFuture;
use stagely_api::protocol::{ErrorCode, ErrorMessage, Hello, HelloAck, JobState, Message, Scope, ScopeKind, Status};

use super::logs::Masker;
use super::outbox::{self, Receiver};
use super::token::{AgentClaims, TokenError, TokenKind};
use super::{Connection, Inner};

/// Close code: refused at HELLO (policy violation).
const CLOSE_REFUSED: u16 = 1008;
/// Close code: the gateway is shutting down.
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: a newer connection of the same agent took over, or the gateway let go of the
/// agent (its queue overflowed, or its object is gone).
pub(crate) const CLOSE_REPLACED: u16 = 4000;

/// Counts the connection as open until dropped.
struct Active(Arc<Inner>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// Runs an upgraded connection to its end.
pub(crate) async fn run(inner: Arc<Inner>, mut socket: WebSocket, peer: SocketAddr) {
    inner.active.fetch_add(1, Ordering::AcqRel);
    let _active = Active(Arc::clone(&inner));
    let mut shutdown = inner.shutdown.subscribe();
    if *shutdown.borrow_and_update() {
        close(&mut socket, CLOSE_GOING_AWAY, "the gateway is shutting down").await;
        return;
    }

    // The handshake is boxed, as the frame handler and every write are: a connection's task is
    // as large as the largest future it awaits inline, and holds that size for its whole, mostly
    // idle, life.
    let Some(Admitted { scope, agent_id, id, mut queue, ack, resend, masker }) =
        Box::pin(handshake(&inner, &mut socket, peer)).await
    else {
        return;
    };
    let mut open = send(&inner, &mut socket, ack).await;
    for frame in resend {
        if !open {
            break;
        }
        open = send(&inner, &mut socket, frame).await;
    }
    let renewal = inner.settings.renewal_interval();
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renewal, renewal);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Jobs whose lines this connection refused, each answered with one ERROR.
    let mut refused = HashSet::new();

    while open {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                close(&mut socket, CLOSE_GOING_AWAY, "the gateway is shutting down").await;
                break;
            }
            _ = renew.tick() => {
                // A fresh session token before the last one expires; agents that predate
                // renewal ignore a second HELLO_ACK.
                match inner.tokens.mint_session(&scope, &agent_id, inner.settings.session_ttl) {
                    Ok(token) => {
                        if let Some(ack) = hello_ack(&inner, &scope, token) {
                            open = send(&inner, &mut socket, ack).await;
                        }
                    }
                    Err(err) => tracing::warn!(%agent_id, error = %err, "failed to renew an agent's session token"),
                }
            }
            frame = queue.recv() => match frame {
                Some(frame) => open = send(&inner, &mut socket, frame).await,
                None => {
                    close(&mut socket, CLOSE_REPLACED, "replaced by a newer connection, or disconnected").await;
                    break;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Text(text))) => {
                    open = Box::pin(handle(&inner, &mut socket, &scope, &masker, &mut refused, text)).await;
                }
                Some(Ok(WsMessage::Binary(_))) => {
                    open = send_error(&inner, &mut socket, ErrorCode::BadMessage, "frames are JSON text").await;
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
            },
        }
    }

    let mut agents = inner.agents();
    if let Some(slot) = agents.get_mut(&*scope)
        && slot.connection.as_ref().is_some_and(|connection| connection.id == id)
    {
        slot.connection = None;
    }
    drop(agents);
    tracing::info!(%agent_id, namespace = %scope.namespace, name = %scope.name, "agent disconnected");
}

/// What an admitted agent's connection goes on with.
struct Admitted {
    scope: Arc<Scope>,
    agent_id: String,
    id: u64,
    queue: Receiver,
    /// The HELLO_ACK, sent first.
    ack: Utf8Bytes,
    /// Pending commands to send again, after the HELLO_ACK.
    resend: Vec<Utf8Bytes>,
    masker: Arc<RwLock<Masker>>,
}

/// Reads the HELLO, admits the agent and registers its connection; refuses it (and answers
/// `None`) when it cannot be admitted.
async fn handshake(inner: &Inner, socket: &mut WebSocket, peer: SocketAddr) -> Option<Admitted> {
    let hello = match tokio::time::timeout(inner.settings.hello_timeout, socket.recv()).await {
        Ok(Some(Ok(WsMessage::Text(text)))) => match serde_json::from_str::<Message>(&text) {
            Ok(Message::Hello(hello)) => hello,
            _ => return refused(socket, ErrorCode::BadMessage, "the first frame must be a HELLO").await,
        },
        Ok(Some(Ok(_))) => return refused(socket, ErrorCode::BadMessage, "the first frame must be a HELLO").await,
        Ok(_) => return None,
        Err(_) => return refused(socket, ErrorCode::BadMessage, "no HELLO in time").await,
    };
    let (scope, session_token) = match admit(inner, &hello).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            tracing::info!(%peer, agent_id = %hello.agent_id, code = ?refusal.0, "agent refused");
            return refused(socket, refusal.0, refusal.1).await;
        }
    };
    let Some(ack) = hello_ack(inner, &scope, session_token) else {
        return refused(socket, ErrorCode::Internal, "failed to answer the HELLO").await;
    };
    let (id, queue, resend, masker) = register(inner, &scope, &hello);
    tracing::info!(
        %peer, agent_id = %hello.agent_id, kind = ?scope.kind, namespace = %scope.namespace, name = %scope.name,
        version = %hello.version, capabilities = ?hello.capabilities, resent = resend.len(), "agent connected"
    );
    // Only the agent id is kept; the rest of the HELLO (its token) goes.
    Some(Admitted { scope, agent_id: hello.agent_id, id, queue, ack, resend, masker })
}

/// The HELLO_ACK frame carrying `session_token`.
fn hello_ack(inner: &Inner, scope: &Scope, session_token: stagely_api::protocol::Sensitive) -> Option<Utf8Bytes> {
    let ack = Message::HelloAck(HelloAck {
        session_token,
        heartbeat_interval_seconds: inner.settings.heartbeat_interval_secs,
        scope: scope.clone(),
    });
    serde_json::to_string(&ack).ok().map(Utf8Bytes::from)
}

/// Checks a HELLO's token and scope; returns the scope and a fresh session token.
async fn admit(
    inner: &Inner,
    hello: &Hello,
) -> Result<(Arc<Scope>, stagely_api::protocol::Sensitive), (ErrorCode, &'static str)> {
    let refusal = |err: TokenError| {
        let message = match err {
            TokenError::Invalid => "the token is not valid",
            TokenError::Expired => "the token has expired",
            TokenError::Replayed => "the enrollment token was already used",
            TokenError::WrongScope => "the token was minted for another agent",
            _ => "failed to check the token",
        };
        (err.code(), message)
    };
    let (claims, kind) = inner.tokens.verify_agent(hello.token.expose(), &hello.agent_id).map_err(refusal)?;
    match inner.objects.is_current(&claims.scope).await {
        Ok(true) => {}
        Ok(false) => return Err((ErrorCode::WrongScope, "the token's object no longer exists")),
        Err(err) => {
            tracing::warn!(error = %err, "failed to check an agent's scope");
            return Err((ErrorCode::Internal, "failed to check the token's object; retry"));
        }
    }
    if kind == TokenKind::Enrollment {
        inner.tokens.consume(&claims).map_err(refusal)?;
        // With Redis, "used" outlives this process: a restarted operator still refuses a replay.
        if let Some(logs) = &inner.logs {
            match logs.claim_enrollment(&claims.jti, claims.exp.saturating_add(86_400)).await {
                Ok(true) => {}
                Ok(false) => return Err(refusal(TokenError::Replayed)),
                Err(err) => {
                    tracing::warn!(error = %err, "failed to record an enrollment token as used");
                    inner.tokens.release(&claims);
                    return Err((ErrorCode::Internal, "failed to record the enrollment token; retry"));
                }
            }
        }
    }
    let session = inner
        .tokens
        .mint_session(&claims.scope, &hello.agent_id, inner.settings.session_ttl)
        .map_err(|_| (ErrorCode::Internal, "failed to issue a session token"))?;
    if kind == TokenKind::Enrollment {
        observe_provisioning(inner, &claims);
    }
    // One allocation shared by the slot, the heartbeat recorder and this connection.
    let scope = {
        let agents = inner.agents();
        agents.get_key_value(&claims.scope).map(|(key, _)| Arc::clone(key))
    };
    Ok((scope.unwrap_or_else(|| Arc::new(claims.scope)), session))
}

/// Observes the provisioning time of the VM whose agent just enrolled: from the minting of its
/// enrollment token, just before the VM was created, to now (the token's time is whole seconds:
/// up to a second more). Tokens minted for no VM (tests) name no provider and are not observed.
fn observe_provisioning(inner: &Inner, claims: &AgentClaims) {
    let (Some(histogram), Some(provider)) = (inner.provisioning.get(), &claims.provider) else { return };
    let seconds = std::time::SystemTime::now().duration_since(claims.issued_at()).unwrap_or_default();
    let role = match claims.scope.kind {
        ScopeKind::BuildJob => "builder",
        ScopeKind::Environment => "preview",
    };
    let labels = crate::metrics::VmLabels { provider: provider.clone(), role: role.to_owned() };
    histogram.get_or_create(&labels).observe(seconds.as_secs_f64());
}

type Registered = (u64, Receiver, Vec<Utf8Bytes>, Arc<RwLock<Masker>>);

/// Makes this connection the scope's one (closing any older one) and picks the pending
/// commands to resend: every one the HELLO does not list as accepted or running.
fn register(inner: &Inner, scope: &Arc<Scope>, hello: &Hello) -> Registered {
    let id = inner.next_connection.fetch_add(1, Ordering::Relaxed);
    let (queue, receiver) = outbox::outbox(inner.settings.queue_capacity);
    let mut agents = inner.agents();
    let slot = agents.entry(Arc::clone(scope)).or_default();
    // Dropping the old sender ends the old connection with a close frame.
    slot.connection =
        Some(Connection { id, agent_id: hello.agent_id.clone(), capabilities: hello.capabilities.clone(), queue });
    let resend = slot
        .pending
        .iter()
        .filter(|(job_id, _)| {
            // A job the agent knows as finished is resent too: it answers with the job's STATUS.
            !hello.jobs.iter().any(|known| &known.job_id == *job_id && !known.state.is_final())
        })
        .map(|(_, pending)| pending.frame.clone())
        .collect();
    (id, receiver, resend, Arc::clone(&slot.masker))
}

/// Handles one frame from the agent; false once the connection is lost.
async fn handle(
    inner: &Inner,
    socket: &mut WebSocket,
    scope: &Arc<Scope>,
    masker: &RwLock<Masker>,
    refused: &mut HashSet<String>,
    text: Utf8Bytes,
) -> bool {
    let message = match serde_json::from_str::<Message>(&text) {
        Ok(message) => message,
        Err(_) => return send_error(inner, socket, ErrorCode::BadMessage, "not a valid message").await,
    };
    match message {
        Message::Heartbeat(_) => {
            inner.heartbeats.touch(scope);
            // The ack is the heartbeat itself, echoed unchanged.
            send(inner, socket, text).await
        }
        Message::Log(mut log) => {
            let Some(logs) = &inner.logs else { return true };
            let mut check = check_log(inner, scope, &log);
            if check == LogCheck::Unknown && !refused.contains(&log.job_id) && refused.len() < REFUSED_KEPT {
                // Sent before this operator started, perhaps.
                match logs.job_was_sent(&scope.uid, &log.job_id).await {
                    Ok(true) => {
                        if let Some(slot) = inner.agents().get_mut(scope) {
                            slot.remember(&log.job_id);
                        }
                        check = check_log(inner, scope, &log);
                    }
                    Ok(false) => {}
                    Err(err) => tracing::warn!(error = %err, "failed to look up the job of a log line"),
                }
            }
            match check {
                LogCheck::Store => {}
                LogCheck::Resent => return true,
                LogCheck::Unknown => {
                    if refused.len() >= REFUSED_KEPT || !refused.insert(log.job_id.clone()) {
                        return true;
                    }
                    // The agent chose this id: only so much of it goes into the operator's log.
                    let job_id: String = log.job_id.chars().take(128).collect();
                    tracing::warn!(
                        namespace = %scope.namespace, name = %scope.name, job_id,
                        "refusing log lines for a job this agent was not sent"
                    );
                    let message = format!("job {job_id} was not sent to this agent: its log lines are refused");
                    return send_error(inner, socket, ErrorCode::UnknownJob, &message).await;
                }
            }
            {
                let masker = masker.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let std::borrow::Cow::Owned(masked) = masker.mask(&log.data) {
                    log.data = masked;
                }
            }
            if let Err(err) = logs.append(&log).await {
                tracing::warn!(error = %err, "failed to store a log line");
            }
            true
        }
        Message::Status(mut status) => {
            if let Some(message) = &status.message {
                let masker = masker.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let std::borrow::Cow::Owned(masked) = masker.mask(message) {
                    status.message = Some(masked);
                }
            }
            record_status(inner, scope, status);
            true
        }
        Message::Error(error) => {
            let text = {
                let masker = masker.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                masker.mask(&error.message).into_owned()
            };
            tracing::warn!(
                namespace = %scope.namespace, name = %scope.name, code = ?error.code, job_id = ?error.job_id,
                message = %text, "agent reported an error"
            );
            // An error about a job ends it: the agent will send nothing more for it (it did not
            // understand the command), and a caller waiting for its STATUS would wait forever.
            if let Some(job_id) = error.job_id {
                record_status(inner, scope, failed(job_id, text));
            }
            true
        }
        other => {
            let _ = other;
            send_error(inner, socket, ErrorCode::BadMessage, "agents send HEARTBEAT, LOG, STATUS or ERROR").await
        }
    }
}

/// Jobs whose refusal one connection remembers (and answers once each); past them, lines of
/// unknown jobs are dropped without an answer.
const REFUSED_KEPT: usize = 1024;

/// What to do with a LOG line.
#[derive(Debug, PartialEq, Eq)]
enum LogCheck {
    /// Store it.
    Store,
    /// The line stored last for its job, sent again after a reconnect: drop it.
    Resent,
    /// Its job was not sent to this agent (as far as this process knows).
    Unknown,
}

/// Whether `log`'s job was sent to `scope`'s agent, and if so records the line as the last.
fn check_log(inner: &Inner, scope: &Scope, log: &stagely_api::protocol::Log) -> LogCheck {
    let mut agents = inner.agents();
    let Some(last) = agents.get_mut(scope).and_then(|slot| slot.last_line(&log.job_id)) else {
        return LogCheck::Unknown;
    };
    if *last == Some(log.seq) {
        return LogCheck::Resent;
    }
    *last = Some(log.seq);
    LogCheck::Store
}

/// A failed STATUS for `job_id` saying `message`.
fn failed(job_id: String, message: String) -> Status {
    Status {
        job_id,
        state: JobState::Failed,
        exit_code: None,
        duration_seconds: None,
        message: Some(message),
        image_digest: None,
        services: Vec::new(),
    }
}

/// Hands a STATUS to whoever waits for its job; a final one ends the job. A job already ended
/// (or never sent) is left alone.
fn record_status(inner: &Inner, scope: &Scope, status: Status) {
    let mut agents = inner.agents();
    let Some(slot) = agents.get_mut(scope) else { return };
    let finished = status.state.is_final();
    let job_id = status.job_id.clone();
    tracing::debug!(namespace = %scope.namespace, name = %scope.name, job_id, state = ?status.state, "job status");
    let Some(pending) = slot.pending.get(&job_id) else {
        // A job finished before, or sent before an operator restart: no one waits for it.
        tracing::debug!(job_id, "status of a job no one waits for");
        return;
    };
    pending.status.send_replace(Some(status));
    if finished {
        slot.pending.remove(&job_id);
    }
}

// The writes below return boxed futures, as the handshake and the frame handler are: a
// connection's task is as large as the largest future it ever awaits inline, and it holds that
// size for its whole, mostly idle, life; boxed, a write costs its size only while it runs.

/// Writes one frame; false if the agent is gone or too slow.
fn send<'a>(inner: &'a Inner, socket: &'a mut WebSocket, frame: Utf8Bytes) -> BoxFuture<'a, bool> {
    Box::pin(async move {
        let write = socket.send(WsMessage::Text(frame));
        matches!(tokio::time::timeout(inner.settings.write_timeout, write).await, Ok(Ok(())))
    })
}

fn send_error<'a>(inner: &'a Inner, socket: &'a mut WebSocket, code: ErrorCode, message: &str) -> BoxFuture<'a, bool> {
    let frame = Message::Error(ErrorMessage { code, message: message.to_owned(), job_id: None });
    match serde_json::to_string(&frame) {
        Ok(frame) => send(inner, socket, Utf8Bytes::from(frame)),
        Err(_) => Box::pin(std::future::ready(true)),
    }
}

/// Refuses the connection in the handshake: sends an ERROR and closes; no connection to go on
/// with.
async fn refused(socket: &mut WebSocket, code: ErrorCode, message: &str) -> Option<Admitted> {
    let frame = Message::Error(ErrorMessage { code, message: message.to_owned(), job_id: None });
    if let Ok(frame) = serde_json::to_string(&frame) {
        let send = socket.send(WsMessage::Text(Utf8Bytes::from(frame)));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send).await;
    }
    close(socket, CLOSE_REFUSED, message).await;
    None
}

fn close<'a>(socket: &'a mut WebSocket, code: u16, reason: &str) -> BoxFuture<'a, ()> {
    let frame = CloseFrame { code, reason: Utf8Bytes::from(reason.to_owned()) };
    Box::pin(async move {
        let close = socket.send(WsMessage::Close(Some(frame)));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
    })
}
