//! The agent gateway benchmark (`make bench-gateway`, driven by `operator/bench/gateway.sh`).
//!
//! `gateway-bench serve --key-file K` runs the gateway alone (no apiserver: scopes are not
//! checked, heartbeats not recorded) and prints its address. `gateway-bench load --pid P --url
//! U --key-file K` opens N idle agents against it, measures the gateway's RSS before and after,
//! then sends heartbeats at a steady total rate and measures heartbeat→ack latency.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use stagely_api::protocol::{Heartbeat, Hello, Message, Scope, ScopeKind, SystemInfo};
use stagely_operator::gateway::Gateway;
use stagely_operator::gateway::token::{SigningKey, TokenKeys};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve the gateway until killed.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Signing key file (shared with `load`).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Open idle agents, then measure heartbeat acks.
    Load {
        /// The gateway's process id (for its RSS).
        #[arg(long)]
        pid: u32,
        /// The gateway's address.
        #[arg(long)]
        addr: SocketAddr,
        /// Signing key file (shared with `serve`).
        #[arg(long)]
        key_file: PathBuf,
        /// Idle agents to open.
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Loopback source addresses to spread connections over (127.0.0.2 and up).
        #[arg(long, default_value_t = 4)]
        sources: u8,
        /// Heartbeats per second across all agents.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Seconds of heartbeats.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.command {
        Mode::Serve { addr, key_file } => runtime.block_on(serve(addr, key_file)),
        Mode::Load { pid, addr, key_file, agents, sources, rate, seconds } => {
            runtime.block_on(load(pid, addr, key_file, agents, sources, rate, seconds))
        }
    }
}

async fn serve(addr: SocketAddr, key_file: PathBuf) -> anyhow::Result<()> {
    let key = SigningKey::from_bytes(std::fs::read(key_file)?)?;
    let gateway = Gateway::builder().signing_key(key).build().await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("{}", listener.local_addr()?);
    gateway.serve(listener, stagely_api::ops::shutdown_signal()).await?;
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

type Ws = WebSocketStream<TcpStream>;

async fn open_agent(addr: SocketAddr, source: IpAddr, token: String, index: usize) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{addr}{}", stagely_api::protocol::CONNECT_PATH);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    let hello = Message::Hello(Hello {
        agent_id: format!("bench-{index}"),
        token: token.as_str().into(),
        version: "bench".into(),
        system_info: SystemInfo::default(),
        jobs: vec![],
        // As a current agent's HELLO, so the measured memory includes what it costs.
        capabilities: vec![stagely_api::protocol::CAPABILITY_TEST.into()],
    });
    ws.send(WsMessage::text(serde_json::to_string(&hello)?)).await?;
    match ws.next().await {
        Some(Ok(WsMessage::Text(text))) if text.contains("\"HELLO_ACK\"") => Ok(ws),
        other => anyhow::bail!("agent {index}: no HELLO_ACK: {other:?}"),
    }
}

async fn load(
    pid: u32,
    addr: SocketAddr,
    key_file: PathBuf,
    agents: usize,
    sources: u8,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    let keys = TokenKeys::new(&SigningKey::from_bytes(std::fs::read(key_file)?)?, Duration::from_secs(5));
    let before = rss_kib(pid)?;
    eprintln!("gateway RSS before: {before} KiB; opening {agents} agents");

    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(200));
    let mut opening = tokio::task::JoinSet::new();
    for index in 0..agents {
        let scope = Scope {
            kind: ScopeKind::Environment,
            namespace: "bench".into(),
            name: format!("env-{index}"),
            uid: format!("uid-{index}"),
        };
        let token = keys.mint_enrollment(&scope, &format!("bench-{index}"), Duration::from_secs(3600))?.0;
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(sources.max(1))) as u8));
        let limit = Arc::clone(&limit);
        opening.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (index, open_agent(addr, source, token, index).await)
        });
    }
    let mut sockets: Vec<Option<Ws>> = (0..agents).map(|_| None).collect();
    while let Some(joined) = opening.join_next().await {
        let (index, ws) = joined?;
        sockets[index] = Some(ws?);
    }
    eprintln!("{agents} agents connected in {:.1} s", started.elapsed().as_secs_f64());
    // Let the gateway finish whatever the handshakes left behind before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    eprintln!("gateway RSS with {agents} idle agents: {after} KiB");

    // Each agent sends on its own slot so the total rate is steady.
    let period = Duration::from_secs_f64(agents as f64 / rate.max(1) as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(500);
    let end = start + Duration::from_secs(seconds);
    let mut running = tokio::task::JoinSet::new();
    for (index, ws) in sockets.into_iter().enumerate() {
        let mut ws = ws.expect("every agent connected");
        let offset = Duration::from_secs_f64(index as f64 / rate.max(1) as f64);
        running.spawn(async move {
            let mut latencies = Vec::new();
            let mut next = start + offset;
            let mut seq = 0u64;
            while next < end {
                tokio::time::sleep_until(next).await;
                seq += 1;
                let frame = serde_json::to_string(&Message::Heartbeat(Heartbeat { seq, sent_at_ms: 0 })).unwrap();
                let sent = Instant::now();
                if ws.send(WsMessage::text(frame)).await.is_err() {
                    break;
                }
                match ws.next().await {
                    Some(Ok(WsMessage::Text(_))) => latencies.push(sent.elapsed()),
                    _ => break,
                }
                next += period;
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(joined) = running.join_next().await {
        latencies.extend(joined?);
    }
    latencies.sort();
    anyhow::ensure!(!latencies.is_empty(), "no heartbeat was acknowledged");
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1000.0
    };
    eprintln!("{} heartbeats acknowledged at {rate}/s", latencies.len());
    println!("gateway_rss_kib_per_conn={:.2}", after.saturating_sub(before) as f64 / agents as f64);
    println!("gateway_heartbeat_ack_p50_ms={:.3}", percentile(0.50));
    println!("gateway_heartbeat_ack_p99_ms={:.3}", percentile(0.99));
    Ok(())
}
