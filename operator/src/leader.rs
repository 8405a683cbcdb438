//! Leader election: operator replicas share one `coordination.k8s.io` Lease, and only its holder
//! acts.
//!
//! The holder reconciles, reaps, sweeps, writes routes and serves agents; the others (followers)
//! only serve `/healthz`, `/metrics` and a `/readyz` that answers 503, so that a Service sends
//! agents to the leader alone, and wait to take the Lease over. The Lease is taken and renewed
//! through `kube-lease-manager`; what this module adds is what the operator must do around it:
//! followers look again every retry period (the manager alone would sleep until the expiry it
//! last read, so a released Lease would wait that long), every Lease request has a deadline
//! shorter than the renewal margin, and a leader that cannot renew stops acting at once (see
//! [`Leadership::lost`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError, LeaseParams};
use prometheus_client::metrics::gauge::Gauge;
use stagely_api::ops;

/// How the operator's replicas elect their leader.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaderConfig {
    /// Elect a leader through a Lease, so that of several replicas only one acts (reconciles,
    /// reaps, sweeps, serves agents) and the others stand by, not ready, to take over. `false`:
    /// this replica acts at once, and must be the only one.
    #[arg(long, env = "STAGELY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// The Lease's name.
    #[arg(long, env = "STAGELY_LEASE_NAME", default_value = "stagely-operator")]
    pub lease_name: String,

    /// The Lease's namespace (default: `POD_NAMESPACE`, else the client's namespace: in a pod its
    /// service account's, else the kubeconfig context's, else `default`).
    #[arg(long, env = "STAGELY_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: `POD_NAME`, else `<hostname>-<pid>`); unique
    /// among the replicas.
    #[arg(long, env = "STAGELY_LEASE_HOLDER")]
    pub lease_holder: Option<String>,

    /// Seconds the Lease stays the leader's after its last renewal: how long a crashed leader's
    /// replicas wait before one takes over.
    #[arg(long, env = "STAGELY_LEASE_DURATION_SECS", default_value_t = 15)]
    pub lease_duration_secs: u64,

    /// Seconds from one renewal to the next; less than the duration, the rest being the margin in
    /// which a failed renewal is noticed (the leader then stops) before the Lease can pass on.
    #[arg(long, env = "STAGELY_LEASE_RENEW_SECS", default_value_t = 10)]
    pub lease_renew_secs: u64,

    /// Seconds between a follower's looks at the Lease (a released Lease is taken within this).
    #[arg(long, env = "STAGELY_LEASE_RETRY_SECS", default_value_t = 2)]
    pub lease_retry_secs: u64,
}

/// Why leader election failed, or why the leader stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The timings cannot work.
    #[error(
        "invalid Lease timings: --lease-renew-secs ({renew}) must be at least 1 and less than --lease-duration-secs ({duration})"
    )]
    Timings {
        /// The renewal period.
        renew: u64,
        /// The Lease duration.
        duration: u64,
    },
    /// No client for the Lease.
    #[error("failed to create a Kubernetes client for the Lease: {0}")]
    Client(#[source] kube::Error),
    /// The leader's renewal failed: it cannot know the Lease is still its own.
    #[error("failed to renew the Lease {lease}; stopping, since another replica may take it over: {source}")]
    Renew {
        /// `namespace/name`.
        lease: String,
        /// The cause.
        source: LeaseManagerError,
    },
    /// Another replica holds the Lease now.
    #[error("lost the Lease {lease} to another replica; stopping")]
    Lost {
        /// `namespace/name`.
        lease: String,
    },
}

/// This replica's part in the election: follower until [`Election::acquire`] returns.
pub struct Election {
    lease: Option<Lease>,
    leading: Arc<AtomicBool>,
    gauge: Gauge,
}

struct Lease {
    client: kube::Client,
    name: String,
    namespace: String,
    params: LeaseParams,
    retry: Duration,
}

impl Lease {
    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn manager(&self) -> Result<LeaseManager, LeaseManagerError> {
        LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_parameters(self.params.clone())
            .build()
            .await
    }
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("lease", &self.lease.as_ref().map(Lease::describe))
            .field("leading", &self.leading.load(Ordering::Acquire))
            .finish()
    }
}

impl Election {
    /// The election `config` describes; `gauge` shows 1 while this replica leads. Off, this
    /// replica leads from the start.
    pub async fn new(config: &LeaderConfig, gauge: Gauge) -> Result<Self, LeaderError> {
        let leading = Arc::new(AtomicBool::new(false));
        if !config.leader_election {
            tracing::info!("leader election is off (--leader-election false): this replica acts alone");
            return Ok(Self { lease: None, leading, gauge });
        }
        let (duration, renew) = (config.lease_duration_secs, config.lease_renew_secs);
        if renew == 0 || renew >= duration {
            return Err(LeaderError::Timings { renew, duration });
        }
        let grace = duration - renew;
        let client = lease_client(Duration::from_millis(grace * 1000 / 2).max(Duration::from_secs(1))).await?;
        let namespace = config
            .lease_namespace
            .clone()
            .or_else(|| non_empty_env("POD_NAMESPACE"))
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let identity = config.lease_holder.clone().unwrap_or_else(default_identity);
        tracing::info!(lease = %format!("{namespace}/{}", config.lease_name), %identity, "leader election is on");
        let lease = Lease {
            client,
            name: config.lease_name.clone(),
            namespace,
            params: LeaseParams::new(identity, duration, grace),
            retry: Duration::from_secs(config.lease_retry_secs.max(1)),
        };
        Ok(Self { lease: Some(lease), leading, gauge })
    }

    /// `/readyz`: ready while this replica leads (and serves agents).
    pub fn readiness(&self) -> ops::Readiness {
        let leading = Arc::clone(&self.leading);
        let why = match &self.lease {
            Some(lease) => format!("a follower: another replica holds the Lease {}", lease.describe()),
            None => "starting".to_owned(),
        };
        ops::Readiness::when(move || if leading.load(Ordering::Acquire) { Ok(()) } else { Err(why.clone()) })
    }

    /// Waits until this replica holds the Lease (at once when election is off or the Lease is
    /// free); `None` when `shutdown` completes first.
    pub async fn acquire(&self, shutdown: impl Future<Output = ()>) -> Option<Leadership<'_>> {
        let Some(lease) = &self.lease else {
            return Some(Leadership { election: self, manager: None });
        };
        tokio::pin!(shutdown);
        loop {
            // A fresh manager reads the Lease now; an old one would sleep until the expiry it read.
            let attempt = async {
                let manager = lease.manager().await?;
                match tokio::time::timeout(lease.retry, manager.changed()).await {
                    Ok(Ok(true)) => Ok(Some(manager)),
                    Ok(Ok(false)) | Err(_) => Ok(None),
                    Ok(Err(err)) => Err(err),
                }
            };
            tokio::select! {
                () = &mut shutdown => return None,
                attempt = attempt => match attempt {
                    Ok(Some(manager)) => {
                        tracing::info!(lease = %lease.describe(), "this replica leads now");
                        return Some(Leadership { election: self, manager: Some(manager) });
                    }
                    Ok(None) => {
                        tracing::debug!(lease = %lease.describe(), "another replica holds the Lease; looking again");
                        continue;
                    }
                    Err(err) => tracing::warn!(lease = %lease.describe(), error = %err, "failed to read or take the Lease"),
                },
            }
            tokio::select! {
                () = &mut shutdown => return None,
                () = tokio::time::sleep(lease.retry) => {}
            }
        }
    }
}

/// The Lease held: renewed while [`Leadership::lost`] is polled, released by
/// [`Leadership::release`].
pub struct Leadership<'a> {
    election: &'a Election,
    manager: Option<LeaseManager>,
}

impl Leadership<'_> {
    /// Marks this replica ready and the gauge 1: call once it serves agents.
    pub fn serving(&self) {
        self.election.leading.store(true, Ordering::Release);
        self.election.gauge.set(1);
    }

    /// Renews the Lease for as long as it is polled; completes only when the Lease is lost to
    /// another replica or a renewal fails (never without election).
    ///
    /// A leader that cannot renew must stop acting before another replica may take over, and
    /// kube-rs controllers cannot be stopped and started again cleanly inside one process; so the
    /// caller ends the operator with this error, its work dropped mid-flight, and the process
    /// exits non-zero for Kubernetes to restart it, as a follower. Every Lease request has a
    /// deadline of half the renewal margin, so a renewal that hangs fails (and the leader stops)
    /// before the Lease expires.
    pub async fn lost(&self) -> LeaderError {
        let (Some(manager), Some(lease)) = (&self.manager, &self.election.lease) else {
            return std::future::pending().await;
        };
        loop {
            match manager.changed().await {
                Ok(true) => continue,
                Ok(false) => return LeaderError::Lost { lease: lease.describe() },
                Err(source) => return LeaderError::Renew { lease: lease.describe(), source },
            }
        }
    }

    /// Gives the Lease up, after a clean stop, so that a follower takes over within its retry
    /// period instead of waiting out the Lease.
    pub async fn release(self) {
        self.election.leading.store(false, Ordering::Release);
        self.election.gauge.set(0);
        let (Some(manager), Some(lease)) = (&self.manager, &self.election.lease) else { return };
        match manager.release().await {
            Ok(()) => tracing::info!(lease = %lease.describe(), "released the Lease"),
            Err(err) => {
                tracing::warn!(lease = %lease.describe(), error = %err, "failed to release the Lease; it expires instead")
            }
        }
    }
}

/// A client whose every request to the apiserver ends within `deadline`.
async fn lease_client(deadline: Duration) -> Result<kube::Client, LeaderError> {
    let mut config = kube::Config::infer().await.map_err(|err| LeaderError::Client(kube::Error::InferConfig(err)))?;
    config.connect_timeout = Some(deadline);
    config.read_timeout = Some(deadline);
    config.write_timeout = Some(deadline);
    // The read deadline counts from each request, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    kube::Client::try_from(config).map_err(LeaderError::Client)
}

/// `POD_NAME`, else `<hostname>-<pid>`: unique among replicas, on one host too.
fn default_identity() -> String {
    identity(non_empty_env("POD_NAME"), hostname(), std::process::id())
}

fn identity(pod_name: Option<String>, hostname: Option<String>, pid: u32) -> String {
    pod_name.unwrap_or_else(|| format!("{}-{pid}", hostname.as_deref().unwrap_or("stagely-operator")))
}

fn hostname() -> Option<String> {
    non_empty_env("HOSTNAME").or_else(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
        Some(name.trim().to_owned()).filter(|name| !name.is_empty())
    })
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|value| value.trim().to_owned()).filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        leader: LeaderConfig,
    }

    #[test]
    fn election_is_on_by_default_with_a_fifteen_second_lease() {
        let config = Cli::try_parse_from(["x"]).unwrap().leader;
        assert!(config.leader_election);
        assert_eq!(
            (config.lease_name.as_str(), config.lease_duration_secs, config.lease_renew_secs),
            ("stagely-operator", 15, 10)
        );
        let config = Cli::try_parse_from(["x", "--leader-election", "false"]).unwrap().leader;
        assert!(!config.leader_election);
    }

    #[test]
    fn the_identity_is_the_pod_name_else_the_host_and_process() {
        assert_eq!(identity(Some("operator-7d9f".into()), Some("node-1".into()), 42), "operator-7d9f");
        assert_eq!(identity(None, Some("node-1".into()), 42), "node-1-42");
        assert_eq!(identity(None, None, 42), "stagely-operator-42");
    }

    #[tokio::test]
    async fn a_renewal_period_not_shorter_than_the_lease_is_refused() {
        for (duration, renew) in [(15, 15), (15, 20), (15, 0)] {
            let config = Cli::try_parse_from([
                "x",
                "--lease-duration-secs",
                &duration.to_string(),
                "--lease-renew-secs",
                &renew.to_string(),
            ])
            .unwrap()
            .leader;
            let err = Election::new(&config, Gauge::default()).await.unwrap_err();
            assert!(matches!(err, LeaderError::Timings { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn without_election_this_replica_leads_at_once_and_is_ready_once_serving() {
        let config = Cli::try_parse_from(["x", "--leader-election", "false"]).unwrap().leader;
        let gauge = Gauge::default();
        let election = Election::new(&config, gauge.clone()).await.unwrap();
        let readiness = election.readiness();
        assert!(readiness.check().is_err(), "not ready before it serves");
        let leadership = election.acquire(std::future::pending()).await.expect("leads at once");
        leadership.serving();
        assert_eq!((readiness.check(), gauge.get()), (Ok(()), 1));
        leadership.release().await;
        assert_eq!(gauge.get(), 0);
    }
}
