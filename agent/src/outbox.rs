//! The agent's messages to the gateway, held while the gateway is away. A job keeps running
//! while the agent is disconnected, so the queue is bounded: past [`MAX_LOG_BYTES`] of held log
//! text the oldest log lines are dropped first; statuses and errors, which the gateway needs to
//! finish its jobs, are always kept (there are a handful per job).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use stagely_api::protocol::Message;
use tokio::sync::Notify;

/// Log text held for the gateway at most, in bytes.
pub const MAX_LOG_BYTES: usize = 16 << 20;

/// The queue; cheap to clone, clones share it. Sending never waits.
#[derive(Clone, Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
    max_log_bytes: usize,
}

#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Message>,
    log_bytes: usize,
    dropped: u64,
}

fn log_size(message: &Message) -> Option<usize> {
    match message {
        // The line and what frames it, so that many empty lines count too.
        Message::Log(log) => Some(log.data.len() + log.job_id.len() + 64),
        _ => None,
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(MAX_LOG_BYTES)
    }
}

impl Outbox {
    /// A queue holding at most `max_log_bytes` of log lines.
    pub fn new(max_log_bytes: usize) -> Self {
        let shared = Shared { queue: Mutex::default(), ready: Notify::new(), max_log_bytes };
        Self { shared: Arc::new(shared) }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `message`, dropping the oldest log lines when too many are held.
    pub fn send(&self, message: Message) {
        let mut queue = self.queue();
        if let Some(size) = log_size(&message) {
            queue.log_bytes += size;
            while queue.log_bytes > self.shared.max_log_bytes {
                let Some(oldest) = queue.messages.iter().position(|m| matches!(m, Message::Log(_))) else { break };
                let removed = queue.messages.remove(oldest).and_then(|m| log_size(&m)).unwrap_or(0);
                queue.log_bytes -= removed;
                if queue.dropped == 0 {
                    tracing::warn!("the gateway is not taking log lines; dropping the oldest");
                }
                queue.dropped += 1;
            }
            if queue.log_bytes > self.shared.max_log_bytes {
                // A single line larger than the whole budget (lines are capped well below it).
                queue.log_bytes -= size;
                queue.dropped += 1;
                return;
            }
        }
        queue.messages.push_back(message);
        drop(queue);
        self.shared.ready.notify_one();
    }

    /// Puts back a message that could not be sent, to go first next time.
    pub fn put_back(&self, message: Message) {
        let mut queue = self.queue();
        queue.log_bytes += log_size(&message).unwrap_or(0);
        queue.messages.push_front(message);
        drop(queue);
        self.shared.ready.notify_one();
    }

    /// The oldest message, if any.
    pub fn try_recv(&self) -> Option<Message> {
        let mut queue = self.queue();
        let message = queue.messages.pop_front()?;
        queue.log_bytes -= log_size(&message).unwrap_or(0);
        Some(message)
    }

    /// Waits for the oldest message. Cancel-safe: a message is taken only when returned.
    pub async fn recv(&self) -> Message {
        loop {
            if let Some(message) = self.try_recv() {
                return message;
            }
            self.shared.ready.notified().await;
        }
    }

    /// How many log lines were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.queue().dropped
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.queue().messages.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use stagely_api::protocol::{JobState, Log, LogStream, Status};

    use super::*;

    fn log(seq: u64) -> Message {
        Message::Log(Log { job_id: "j".into(), stream: LogStream::Stdout, seq, timestamp_ms: 0, data: "x".repeat(100) })
    }

    fn status(state: JobState) -> Message {
        Message::Status(Status {
            job_id: "j".into(),
            state,
            exit_code: None,
            duration_seconds: None,
            message: None,
            image_digest: None,
            services: vec![],
        })
    }

    #[tokio::test]
    async fn while_disconnected_the_oldest_log_lines_go_first_and_statuses_stay() {
        // Room for three lines of this size.
        let outbox = Outbox::new(3 * (100 + 1 + 64));
        outbox.send(status(JobState::Accepted));
        for seq in 0..10 {
            outbox.send(log(seq));
        }
        outbox.send(status(JobState::Succeeded));
        assert_eq!(outbox.dropped(), 7);
        let held: Vec<Message> = std::iter::from_fn(|| outbox.try_recv()).collect();
        assert_eq!(held, [status(JobState::Accepted), log(7), log(8), log(9), status(JobState::Succeeded)]);

        // Statuses are never dropped, however many.
        for _ in 0..1000 {
            outbox.send(status(JobState::Running));
        }
        assert_eq!(outbox.len(), 1000);
        outbox.put_back(log(1));
        assert_eq!(outbox.recv().await, log(1), "a message put back goes first");
    }
}
