//! The webhook receiver benchmark (`make bench-webhook`, driven by
//! `webhook-receiver/bench/webhook.sh`).
//!
//! `webhook-bench --receiver-bin PATH` starts testenv's control plane (etcd, kube-apiserver),
//! creates a Project and its credentials Secret, starts the receiver binary (a release build)
//! against it, and sends signed `pull_request` `synchronize` deliveries over kept-alive
//! HTTP/1.1 connections about `--pull-requests` pull requests, each delivery a new commit (a new
//! delivery id, head sha and `updated_at`, so none is a duplicate):
//!
//! 1. **Throughput, back to back**: `--connections` connections send back to back for
//!    `--seconds` (after a warm-up). With 64 deliveries always waiting, the receiver may read
//!    and answer them in batches, cheaper per delivery than deliveries that come one at a time,
//!    as GitHub's do: an upper bound, not a rate the receiver is shown to keep up with.
//! 2. **Maximum rate**: the highest rate the receiver keeps up with when the same connections
//!    send on a fixed schedule, found by bisection between a quarter of that throughput and all
//!    of it, one `--trial-seconds` trial per step: a rate is kept up with when the last answer
//!    comes at most 2% of the trial after the schedule's end (a receiver that falls behind by
//!    more than 2% of the rate ends that much later, its backlog growing all along).
//! 3. **Held rate**: the same connections (so the receiver's background writes are the same)
//!    send on a fixed schedule at `--fraction` (70%) of the maximum rate for `--seconds`. A
//!    delivery's ack latency runs to the end of its answer from the moment the schedule says it
//!    is sent when the receiver was still busy with the connection's previous delivery then (so
//!    a slow answer counts for every delivery it held up: no coordinated omission), else from
//!    the moment it was written (so this driver waking late on the shared cores is not counted
//!    as the receiver's).
//!
//! Everything runs on this machine's cores: the receiver, the apiserver and etcd (which the
//! receiver's workers keep writing Environments to, in the background, as they would in a
//! cluster) and this load generator. Prints, last:
//!
//! ```text
//! webhook_max_rps=… webhook_ack_p99_ms=…
//! ```
//!
//! Target (ARCHITECTURE.md): p99 ≤ 10 ms at 70% of the maximum rate.

#[path = "../tests/support/http.rs"]
mod http;
#[path = "../tests/support/payloads.rs"]
mod payloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use stagely_api::v1alpha1::Project;
use stagely_testenv::{ControlPlane, Options};
use stagely_webhook_receiver::github::sign;
use stagely_webhook_receiver::server::WEBHOOK_PATH;

use crate::http::Connection;
use crate::payloads::Pr;

const SECRET: &str = "bench-webhook-secret";
const REPOSITORY: &str = "acme/bench";
/// Stand-ins in the payload template, replaced in place for every delivery.
const SHA_MARK: &str = "feedc0defeedc0defeedc0defeedc0defeedc0de";
const UPDATED_MARK: i64 = 123_456_789;

#[derive(Parser)]
struct Args {
    /// The receiver binary.
    #[arg(long)]
    receiver_bin: PathBuf,
    /// Seconds of each measurement.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Connections, in both measurements.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Pull requests the deliveries are about (connection `i` sends about pull request
    /// `i % pull_requests`): the receiver writes each one's Environment at most once a second.
    #[arg(long, default_value_t = 16)]
    pull_requests: usize,
    /// The held rate, as a fraction of the maximum.
    #[arg(long, default_value_t = 0.7)]
    fraction: f64,
    /// Seconds of each trial of the search for the maximum rate.
    #[arg(long, default_value_t = 5)]
    trial_seconds: u64,
    /// Keep the receiver's log here.
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plane = ControlPlane::start(Options { crds: stagely_api::crds(), ..Options::default() }).await?;
    setup(&plane).await?;
    let dir = tempfile::tempdir()?;
    let log_dir = args.keep.clone().unwrap_or_else(|| dir.path().to_owned());
    std::fs::create_dir_all(&log_dir)?;
    let log = std::fs::File::create(log_dir.join("webhook-receiver.log"))?;
    let (addr, ops) = (free_addr()?, free_addr()?);
    // With RECEIVER_CPUS (e.g. `0`), the receiver runs on those cores only (`taskset`), apart
    // from this driver and the control plane, which webhook.sh then pins to the others.
    let mut receiver = match std::env::var("RECEIVER_CPUS").ok().filter(|cpus| !cpus.is_empty()) {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.args(["-c", &cpus]).arg(&args.receiver_bin);
            command
        }
        None => Command::new(&args.receiver_bin),
    };
    receiver
        .env("KUBECONFIG", plane.kubeconfig())
        .env("RUST_LOG", "info")
        .args(["--listen-addr", &addr.to_string(), "--ops-addr", &ops.to_string(), "--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut receiver = stagely_testenv::spawn_tied(receiver).context("the receiver starts")?;
    wait_ready(ops).await?;
    eprintln!("receiver ready at {addr} (pid {})", receiver.id());

    let deliveries = Arc::new(Deliveries::new());
    // Warm up (connections, caches, the apiserver's first writes), then measure.
    let load = Load { addr, connections: args.connections, pull_requests: args.pull_requests.max(1) };
    closed_loop(&load, &deliveries, Duration::from_secs(3)).await?;
    let cpu_before = cpu_seconds(receiver.id())?;
    let (answered, errors) = closed_loop(&load, &deliveries, Duration::from_secs(args.seconds)).await?;
    let back_to_back = answered as f64 / args.seconds as f64;
    let cpu = cpu_seconds(receiver.id())? - cpu_before;
    eprintln!(
        "back to back: {answered} deliveries in {}s over {} connections = {back_to_back:.0}/s ({errors} not 202); \
         receiver CPU {:.0}%",
        args.seconds,
        args.connections,
        cpu / args.seconds as f64 * 100.0
    );
    let max_rps = maximum_rate(&load, &deliveries, back_to_back, Duration::from_secs(args.trial_seconds)).await?;
    eprintln!(
        "maximum rate kept up with on a schedule: {max_rps:.0}/s ({:.0}% of the back-to-back throughput)",
        max_rps / back_to_back * 100.0
    );

    let rate = max_rps * args.fraction;
    let buckets_before = ack_buckets(ops).await;
    let cpu_before = cpu_seconds(receiver.id())?;
    let driver_cpu_before = cpu_seconds(std::process::id())?;
    let plane_cpu = || plane.pids().into_iter().map(|pid| cpu_seconds(pid).unwrap_or_default()).sum::<f64>();
    let plane_cpu_before = plane_cpu();
    let mut latencies = open_loop(&load, &deliveries, rate, Duration::from_secs(args.seconds)).await?.latencies;
    latencies.sort();
    anyhow::ensure!(!latencies.is_empty(), "no delivery was answered at the held rate");
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1000.0
    };
    eprintln!(
        "held {rate:.0}/s ({:.0}% of the maximum) for {}s over {} connections about {} pull requests: {} answered, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        args.fraction * 100.0,
        args.seconds,
        args.connections,
        args.pull_requests,
        latencies.len(),
        percentile(0.5),
        percentile(0.99),
        percentile(1.0),
    );
    let cpu = cpu_seconds(receiver.id())? - cpu_before;
    let driver_cpu = cpu_seconds(std::process::id())? - driver_cpu_before;
    let plane_cpu = plane_cpu() - plane_cpu_before;
    // The receiver's own view: from the request's head to its answer, without the network and
    // this driver's scheduling.
    let buckets: Vec<(f64, f64)> = ack_buckets(ops)
        .await
        .iter()
        .zip(&buckets_before)
        .map(|((le, after), (_, before))| (*le, after - before))
        .collect();
    let total = buckets.last().map_or(0.0, |(_, n)| *n);
    let inside = buckets.iter().find(|(_, n)| *n >= total * 0.99).map_or(f64::INFINITY, |(le, _)| *le);
    eprintln!(
        "at the held rate: receiver CPU {:.0}%, 99% of its answers within {:.3} ms by its own histogram; this \
         driver's CPU {:.0}%, etcd's and kube-apiserver's {:.0}%",
        cpu / args.seconds as f64 * 100.0,
        inside * 1000.0,
        driver_cpu / args.seconds as f64 * 100.0,
        plane_cpu / args.seconds as f64 * 100.0,
    );
    for line in metrics(ops).await.lines().filter(|l| l.starts_with("stagely_webhook_environment_writes_total")) {
        eprintln!("receiver: {line}");
    }
    eprintln!("receiver RSS {:.1} MiB", rss_kib(receiver.id())? as f64 / 1024.0);
    let _ = receiver.kill();
    let _ = receiver.wait();
    println!("webhook_max_rps={max_rps:.0} webhook_ack_p99_ms={:.3}", percentile(0.99));
    Ok(())
}

/// The namespace, credentials Secret and Project the deliveries are for.
async fn setup(plane: &ControlPlane) -> anyhow::Result<()> {
    let client = plane.client().await?;
    let pp = PostParams::default();
    let ns =
        Namespace { metadata: ObjectMeta { name: Some("bench".into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&pp, &ns).await?;
    let secret = Secret {
        metadata: ObjectMeta { name: Some("bench-github".into()), ..Default::default() },
        string_data: Some([("webhookSecret".to_owned(), SECRET.to_owned())].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), "bench").create(&pp, &secret).await?;
    let project: Project = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "repository": REPOSITORY, "cloudProviderRef": {"name": "local"}, "previewDomain": "preview.example.com",
            "github": {"credentialsSecretRef": {"name": "bench-github"}},
        },
    }))?;
    Api::<Project>::namespaced(client, "bench").create(&pp, &project).await?;
    Ok(())
}

/// Makes the deliveries: each a new commit of its connection's pull request.
struct Deliveries {
    next: AtomicU64,
}

/// One pull request's `synchronize` payload, with where its head sha and `updated_at` go.
struct Template {
    body: Vec<u8>,
    sha_at: Vec<usize>,
    updated_at: usize,
}

impl Deliveries {
    fn new() -> Self {
        Self { next: AtomicU64::new(1) }
    }

    fn template(number: i64) -> Template {
        let pr = Pr { sha: SHA_MARK.into(), updated: UPDATED_MARK, ..Pr::new(REPOSITORY, number) };
        let body = payloads::pull_request("synchronize", &pr).to_string().into_bytes();
        let find = |mark: &str| -> Vec<usize> {
            body.windows(mark.len()).enumerate().filter(|(_, w)| *w == mark.as_bytes()).map(|(i, _)| i).collect()
        };
        let updated = find(&pr.updated_at());
        assert_eq!(updated.len(), 1, "updated_at appears once in the payload");
        Template { sha_at: find(SHA_MARK), updated_at: updated[0], body }
    }

    /// The next delivery of `template`'s pull request, as a whole request.
    fn request(&self, template: &Template) -> Vec<u8> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut body = template.body.clone();
        let sha = format!("{n:040x}");
        for &at in &template.sha_at {
            body[at..at + 40].copy_from_slice(sha.as_bytes());
        }
        // One second per delivery, from a moment every run starts after: always newer.
        let updated = Timestamp::from_second(1_800_000_000 + n as i64).expect("in range").to_string();
        body[template.updated_at..template.updated_at + updated.len()].copy_from_slice(updated.as_bytes());
        let delivery = format!("bench-{n:032x}");
        let signature = sign(SECRET.as_bytes(), &body);
        let mut request = format!(
            "POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n\
             X-GitHub-Event: pull_request\r\nX-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: {signature}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        request
    }
}

/// Where the deliveries go, over how many connections, about how many pull requests.
struct Load {
    addr: SocketAddr,
    connections: usize,
    pull_requests: usize,
}

impl Load {
    /// The payload template of connection `index`'s pull request.
    fn template(&self, index: usize) -> Template {
        Deliveries::template(1000 + (index % self.pull_requests) as i64)
    }
}

/// The connections sending back to back for `duration`: deliveries answered 202, and those
/// answered otherwise.
async fn closed_loop(load: &Load, deliveries: &Arc<Deliveries>, duration: Duration) -> anyhow::Result<(u64, u64)> {
    let end = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..load.connections {
        let (deliveries, template, addr) = (deliveries.clone(), load.template(index), load.addr);
        tasks.spawn(async move {
            let mut connection = Connection::open(addr).await?;
            let (mut ok, mut other) = (0u64, 0u64);
            while Instant::now() < end {
                let request = deliveries.request(&template);
                match connection.send(&request).await? {
                    202 => ok += 1,
                    _ => other += 1,
                }
            }
            anyhow::Ok((ok, other))
        });
    }
    let (mut ok, mut other) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (o, e) = joined??;
        ok += o;
        other += e;
    }
    Ok((ok, other))
}

/// Bisection steps of the search for the maximum rate: its resolution is 3/4 of the back-to-back
/// throughput over 2^STEPS, about 1%.
const STEPS: usize = 6;

/// The highest rate the receiver keeps up with on a fixed schedule, between a quarter of the
/// back-to-back throughput `upper` and `upper` (see the module documentation).
async fn maximum_rate(load: &Load, deliveries: &Arc<Deliveries>, upper: f64, trial: Duration) -> anyhow::Result<f64> {
    let allowed = trial.mul_f64(0.02);
    let kept_up = |rate: f64| async move {
        let held = open_loop(load, deliveries, rate, trial).await?;
        let kept_up = held.behind <= allowed;
        eprintln!(
            "  {rate:.0}/s for {trial:?}: {} answered, the last {:.0} ms after the schedule ended: {}",
            held.latencies.len(),
            held.behind.as_secs_f64() * 1000.0,
            if kept_up { "kept up" } else { "fell behind" }
        );
        anyhow::Ok(kept_up)
    };
    let (mut low, mut high, mut confirmed) = (upper / 4.0, upper, false);
    for _ in 0..STEPS {
        let rate = (low + high) / 2.0;
        if kept_up(rate).await? {
            (low, confirmed) = (rate, true);
        } else {
            high = rate;
        }
    }
    anyhow::ensure!(
        confirmed || kept_up(low).await?,
        "the receiver kept up with no rate tried, down to {low:.0}/s (a quarter of its back-to-back throughput)"
    );
    Ok(low)
}

/// What a run on a fixed schedule measured.
struct Held {
    /// The ack latency of each delivery (see the module documentation).
    latencies: Vec<Duration>,
    /// How long after the schedule's end the last answer came.
    behind: Duration,
}

/// `rate` deliveries per second for `duration`, shared by the connections on a fixed schedule.
async fn open_loop(load: &Load, deliveries: &Arc<Deliveries>, rate: f64, duration: Duration) -> anyhow::Result<Held> {
    let period = Duration::from_secs_f64(load.connections as f64 / rate.max(1.0));
    let start = tokio::time::Instant::now() + Duration::from_millis(500);
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..load.connections {
        let (deliveries, template, addr) = (deliveries.clone(), load.template(index), load.addr);
        let offset = Duration::from_secs_f64(index as f64 / rate.max(1.0));
        tasks.spawn(async move {
            let mut connection = Connection::open(addr).await?;
            let mut latencies = Vec::new();
            let mut next = start + offset;
            let mut previous_answer = tokio::time::Instant::now();
            while next < end {
                let request = deliveries.request(&template);
                tokio::time::sleep_until(next).await;
                let from = if previous_answer > next { next } else { tokio::time::Instant::now() };
                let status = connection.send(&request).await?;
                anyhow::ensure!(status == 202, "a delivery was answered {status} at the held rate");
                previous_answer = tokio::time::Instant::now();
                latencies.push(previous_answer - from);
                next += period;
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined??);
    }
    Ok(Held { latencies, behind: tokio::time::Instant::now().saturating_duration_since(end) })
}

async fn metrics(ops: SocketAddr) -> String {
    http::exchange(ops, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", false)
        .await
        .map(|answer| answer.body)
        .unwrap_or_default()
}

/// The receiver's ack latency histogram: (upper bound in seconds, cumulative count), ascending.
async fn ack_buckets(ops: SocketAddr) -> Vec<(f64, f64)> {
    metrics(ops)
        .await
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("stagely_webhook_ack_duration_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, count.parse().ok()?))
        })
        .collect()
}

async fn wait_ready(ops: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http::exchange(ops, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", false).await;
        if ready.is_some_and(|answer| answer.status == 200) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the receiver was not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// User and system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(") ").context("malformed stat")?.1.split(' ').collect();
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the command.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((ticks(11) + ticks(12)) / 100.0)
}
