//! An agent connection's send queue: bounded, and small while empty.
//!
//! A tokio `mpsc` channel allocates a block of 32 slots up front, over a kilobyte per
//! connection whether or not anything is ever queued; at thousands of idle agents that was a
//! tenth of the operator's memory. This queue is a `VecDeque` that allocates only while frames
//! wait. The [`Sender`] lives in the agent's slot, the [`Receiver`] in its connection's task;
//! dropping the sender (the connection was replaced, or the gateway let go of the agent) ends
//! the receiver once the queued frames are taken.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

struct Shared {
    state: Mutex<State>,
    ready: Notify,
}

struct State {
    frames: VecDeque<Utf8Bytes>,
    capacity: usize,
    closed: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A queue of at most `capacity` frames.
pub(crate) fn outbox(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { frames: VecDeque::new(), capacity, closed: false }),
        ready: Notify::new(),
    });
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The queue holds `capacity` frames already.
    Full,
    /// The receiving connection has ended.
    Closed,
}

/// The queueing end.
pub(crate) struct Sender(Arc<Shared>);

impl Sender {
    /// Queues `frame` unless the queue is full or its connection gone.
    pub(crate) fn try_send(&self, frame: Utf8Bytes) -> Result<(), SendError> {
        {
            let mut state = self.0.state();
            if state.closed {
                return Err(SendError::Closed);
            }
            if state.frames.len() >= state.capacity {
                return Err(SendError::Full);
            }
            state.frames.push_back(frame);
        }
        self.0.ready.notify_one();
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.state().closed = true;
        self.0.ready.notify_one();
    }
}

/// The connection's end.
pub(crate) struct Receiver(Arc<Shared>);

impl Receiver {
    /// The next frame; `None` once the sender is gone and every queued frame taken.
    /// Cancel-safe: a frame is taken only when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Utf8Bytes> {
        loop {
            {
                let mut state = self.0.state();
                if let Some(frame) = state.frames.pop_front() {
                    if state.frames.is_empty() {
                        // Give back what a burst grew, so an idle agent holds nothing here.
                        state.frames = VecDeque::new();
                    }
                    return Some(frame);
                }
                if state.closed {
                    return None;
                }
            }
            // `notify_one` stores a permit when no one waits, so a frame queued between the
            // check above and this wait is not missed.
            self.0.ready.notified().await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.closed = true;
        state.frames = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_arrive_in_order_up_to_the_capacity() {
        let (sender, mut receiver) = outbox(2);
        assert_eq!(sender.try_send("a".into()), Ok(()));
        assert_eq!(sender.try_send("b".into()), Ok(()));
        assert_eq!(sender.try_send("c".into()), Err(SendError::Full));
        assert_eq!(receiver.recv().await.as_deref(), Some("a"));
        assert_eq!(sender.try_send("c".into()), Ok(()), "room again once one is taken");
        assert_eq!(receiver.recv().await.as_deref(), Some("b"));
        assert_eq!(receiver.recv().await.as_deref(), Some("c"));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_frame() {
        let (sender, mut receiver) = outbox(4);
        let waiting = tokio::spawn(async move { receiver.recv().await });
        tokio::task::yield_now().await;
        sender.try_send("late".into()).unwrap();
        assert_eq!(waiting.await.unwrap().as_deref(), Some("late"));
    }

    #[tokio::test]
    async fn dropping_the_sender_ends_the_receiver_after_the_queued_frames() {
        let (sender, mut receiver) = outbox(4);
        sender.try_send("last".into()).unwrap();
        drop(sender);
        assert_eq!(receiver.recv().await.as_deref(), Some("last"));
        assert_eq!(receiver.recv().await, None);
    }

    #[tokio::test]
    async fn a_gone_receiver_refuses_frames() {
        let (sender, receiver) = outbox(4);
        drop(receiver);
        assert_eq!(sender.try_send("x".into()), Err(SendError::Closed));
    }
}
