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

    /// Appends a line (already masked). The stream entry id is `0-<seq+1>`, so a line the agent
    /// resends is refused by Redis and stored once.
    pub async fn append(&self, log: &Log) -> Result<(), LogError> {
        let key = log_key(&log.job_id);
        let id = format!("0-{}", log.seq.saturating_add(1));
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
                &id,
                &[("stream", stream), ("ts", &log.timestamp_ms.to_string()), ("data", &log.data)],
            )
            .ignore()
            .expire(&key, self.retention.as_secs().try_into().unwrap_or(i64::MAX))
            .ignore();
        let mut conn = self.conn.clone();
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => Ok(()),
            // A resent line: its id is not above the stream's last one.
            Err(err) if err.to_string().contains("equal or smaller") => Ok(()),
            Err(source) => Err(LogError::Redis { action: "append to", job_id: log.job_id.clone(), source }),
        }
    }

    /// Every stored line of `job_id`, oldest first.
    pub async fn read(&self, job_id: &str) -> Result<Vec<StoredLine>, LogError> {
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(log_key(job_id))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(|source| LogError::Redis { action: "read", job_id: job_id.to_owned(), source })?;
        Ok(reply
            .ids
            .into_iter()
            .filter_map(|entry| {
                let seq = entry.id.split_once('-')?.1.parse::<u64>().ok()?.checked_sub(1)?;
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
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_whole_values_longest_first_and_lines_of_multi_line_values() {
        let mut masker = Masker::default();
        masker.add("hunter2");
        masker.add("hunter2-extended");
        masker.add("-----BEGIN KEY-----\nMIIEpAIBAAKCAQEA\n=\n-----END KEY-----\n");
        assert_eq!(masker.mask("pw=hunter2-extended and hunter2"), "pw=*** and ***");
        assert_eq!(masker.mask("  MIIEpAIBAAKCAQEA\n"), "  ***\n");
        assert_eq!(masker.mask("a = b"), "a = b");
        assert!(matches!(masker.mask("nothing here"), Cow::Borrowed(_)));
        assert!(!format!("{masker:?}").contains("hunter2"));
    }
}
