//! Job logs: masking known secret values out of LOG lines (with the one masker, from `api/`),
//! storing them capped per job in a Redis stream (`stagely:logs:<job_id>`), and reading them back.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamMaxlen, StreamRangeReply};
use serde::{Deserialize, Serialize};
use stagely_api::protocol::{Log, LogStream};

pub use stagely_api::mask::{MASK, Masker, secret_values};

/// The Redis key of a job's log stream.
pub fn log_key(job_id: &str) -> String {
    format!("stagely:logs:{job_id}")
}

/// One stored log line, as the HTTP endpoint returns it (one JSON object per line).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StoredLine {
    /// Sequence number within the job.
    pub seq: u64,
    /// Which output.
    pub stream: LogStream,
    /// When the agent saw it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The text, masked.
    pub data: String,
}

/// Why logs could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Redis failed.
    #[error("failed to {action} the logs of job {job_id} in redis: {source}")]
    Redis {
        /// What was attempted.
        action: &'static str,
        /// The job.
        job_id: String,
        /// The cause.
        source: redis::RedisError,
    },
    /// Redis could not be reached.
    #[error("failed to connect to redis: {0}")]
    Connect(#[source] redis::RedisError),
}

/// Job logs in Redis streams, capped at about `max_len` lines per job and expiring after
/// `retention` without new lines.
#[derive(Clone)]
pub struct LogStore {
    conn: ConnectionManager,
    max_len: usize,
    retention: Duration,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("max_len", &self.max_len).field("retention", &self.retention).finish()
    }
}

impl LogStore {
    /// Connects to the Redis at `url` (reconnecting as needed afterwards).
    pub async fn connect(url: &str, max_len: usize, retention: Duration) -> Result<Self, LogError> {
        let client = redis::Client::open(url).map_err(LogError::Connect)?;
        let conn = ConnectionManager::new(client).await.map_err(LogError::Connect)?;
        Ok(Self { conn, max_len, retention })
    }

    /// Records that the enrollment token `jti` was used, until `keep_until` (Unix seconds);
    /// `false` if it was recorded before, by this operator or an earlier one.
    pub async fn claim_enrollment(&self, jti: &str, keep_until: u64) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("stagely:enrollment:{jti}"))
            .arg(1)
            .arg("NX")
            .arg("EXAT")
            .arg(keep_until)
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    /// Records that `job_id` was sent to the agent of the scope with `uid`, until
    /// `retention` after the last job sent to it, so that a restarted operator still takes that
    /// agent's lines for it.
    pub async fn record_job(&self, uid: &str, job_id: &str) -> Result<(), LogError> {
        let key = jobs_key(uid);
        let mut pipe = redis::pipe();
        pipe.atomic().sadd(&key, job_id).ignore().expire(&key, self.retention_secs()).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(|source| LogError::Redis {
            action: "record the job of",
            job_id: job_id.to_owned(),
            source,
        })
    }

    /// Whether `job_id` was sent to the agent of the scope with `uid` (by this operator or an
    /// earlier one).
    pub async fn job_was_sent(&self, uid: &str, job_id: &str) -> Result<bool, LogError> {
        let mut conn = self.conn.clone();
        redis::cmd("SISMEMBER")
            .arg(jobs_key(uid))
            .arg(job_id)
            .query_async(&mut conn)
            .await
            .map_err(|source| LogError::Redis { action: "look up the job of", job_id: job_id.to_owned(), source })
    }

    fn retention_secs(&self) -> i64 {
        self.retention.as_secs().try_into().unwrap_or(i64::MAX)
    }

    /// Appends a line (already masked). Redis numbers the entry: what the agent says (`seq`)
    /// is kept as a field, never trusted as the stream's order, so a bogus or restarted
    /// sequence cannot hide later lines.
    pub async fn append(&self, log: &Log) -> Result<(), LogError> {
        let key = log_key(&log.job_id);
        let stream = match log.stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        };
        let mut pipe = redis::pipe();
        pipe.atomic()
            .xadd_maxlen(
                &key,
                StreamMaxlen::Approx(self.max_len),
                "*",
                &[
                    ("stream", stream),
                    ("seq", &log.seq.to_string()),
                    ("ts", &log.timestamp_ms.to_string()),
                    ("data", &log.data),
                ],
            )
            .ignore()
            .expire(&key, self.retention_secs())
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(|source| LogError::Redis {
            action: "append to",
            job_id: log.job_id.clone(),
            source,
        })
    }

    /// Up to `count` stored lines of `job_id`, oldest first, after the entry `after` (from the
    /// start without one); with the id to continue from when there may be more.
    pub async fn read_page(
        &self,
        job_id: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<(Vec<StoredLine>, Option<String>), LogError> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let reply = self.range("XRANGE", job_id, &start, "+", count).await?;
        let next = reply.ids.last().filter(|_| reply.ids.len() >= count).map(|entry| entry.id.clone());
        Ok((reply.ids.iter().filter_map(stored_line).collect(), next))
    }

    /// The last `count` stored lines of `job_id`, oldest first.
    pub async fn tail(&self, job_id: &str, count: usize) -> Result<Vec<StoredLine>, LogError> {
        let reply = self.range("XREVRANGE", job_id, "+", "-", count).await?;
        Ok(reply.ids.iter().rev().filter_map(stored_line).collect())
    }

    /// `command` (XRANGE or XREVRANGE) over `job_id`'s stream from `from` to `to`, `count` at most.
    async fn range(
        &self,
        command: &str,
        job_id: &str,
        from: &str,
        to: &str,
        count: usize,
    ) -> Result<StreamRangeReply, LogError> {
        let mut conn = self.conn.clone();
        redis::cmd(command)
            .arg(log_key(job_id))
            .arg(from)
            .arg(to)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(|source| LogError::Redis { action: "read", job_id: job_id.to_owned(), source })
    }
}

/// The Redis key of the job ids sent to the agent of the scope with `uid`.
fn jobs_key(uid: &str) -> String {
    format!("stagely:jobs:{uid}")
}

/// A stream entry as a line; entries written before `seq` was a field carry it in their id.
fn stored_line(entry: &redis::streams::StreamId) -> Option<StoredLine> {
    let seq = match entry.get::<u64>("seq") {
        Some(seq) => seq,
        None => entry.id.split_once('-')?.1.parse::<u64>().ok()?.checked_sub(1)?,
    };
    let stream = match entry.get::<String>("stream")?.as_str() {
        "stdout" => LogStream::Stdout,
        "stderr" => LogStream::Stderr,
        _ => LogStream::System,
    };
    Some(StoredLine {
        seq,
        stream,
        timestamp_ms: entry.get::<u64>("ts").unwrap_or(0),
        data: entry.get::<String>("data").unwrap_or_default(),
    })
}
