//! Job logs: masking known secret values out of LOG lines, storing them capped per job in a
//! Redis stream (`stagely:logs:<job_id>`), and reading them back.

use std::borrow::Cow;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamMaxlen, StreamRangeReply};
use serde::{Deserialize, Serialize};
use stagely_api::protocol::{Log, LogStream, Message};

/// What replaces a secret value.
pub const MASK: &str = "***";

/// The Redis key of a job's log stream.
pub fn log_key(job_id: &str) -> String {
    format!("stagely:logs:{job_id}")
}

/// Known secret values of one scope, and how to blot them out of text.
#[derive(Default, Clone)]
pub struct Masker {
    /// Longest first, so that a secret containing another is masked whole.
    needles: Vec<String>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker").field("values", &self.needles.len()).finish()
    }
}

/// Lines of a multi-line secret shorter than this are not masked on their own (a PEM key's
/// closing `=` would otherwise blot out every `=` in the logs).
const MIN_LINE_LEN: usize = 6;

impl Masker {
    /// Adds a secret value: the whole value, and for a multi-line value each of its lines, since
    /// the agent sends output line by line.
    pub fn add(&mut self, secret: &str) {
        let mut add = |needle: &str| {
            if !needle.is_empty() && !self.needles.iter().any(|n| n == needle) {
                self.needles.push(needle.to_owned());
            }
        };
        add(secret);
        if secret.contains('\n') {
            for line in secret.lines().map(str::trim).filter(|line| line.len() >= MIN_LINE_LEN) {
                add(line);
            }
        }
        self.needles.sort_by_key(|needle| std::cmp::Reverse(needle.len()));
    }

    /// Adds every secret value `command` carries.
    pub fn add_from(&mut self, command: &Message) {
        for secret in secret_values(command) {
            self.add(secret);
        }
    }

    /// Whether no value is known.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` with every known value replaced by [`MASK`].
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut text = Cow::Borrowed(text);
        for needle in &self.needles {
            if text.contains(needle.as_str()) {
                text = Cow::Owned(text.replace(needle.as_str(), MASK));
            }
        }
        text
    }
}

/// The secret values a command carries.
pub fn secret_values(command: &Message) -> Vec<&str> {
    let mut values = Vec::new();
    match command {
        Message::Build(build) => {
            values.extend(build.git_token.as_ref().map(|t| t.expose()));
            values.extend(build.registry_auth.as_ref().map(|a| a.password.expose()));
        }
        Message::Deploy(deploy) => {
            values.extend(deploy.git_token.as_ref().map(|t| t.expose()));
            values.extend(deploy.registry_auth.as_ref().map(|a| a.password.expose()));
            values.extend(deploy.secrets.iter().map(|s| s.value.expose()));
        }
        Message::Test(test) => {
            values.extend(test.registry_auth.as_ref().map(|a| a.password.expose()));
        }
        _ => {}
    }
    values
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
