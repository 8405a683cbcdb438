//! Shared VM capacity: a CloudProvider's `maxInstances`, first come first served.
//!
//! Every VM started through a CloudProvider (builder VMs now, preview VMs too) holds one slot of
//! that provider's `maxInstances` from before it is created until it is terminated. A request
//! that finds no free slot waits in a queue ordered by when its object was queued (its creation
//! time, so the order survives an operator restart); when a slot frees, the holders at the head of
//! the queue are announced on [`Capacity::subscribe`], and their controllers reconcile them again.
//!
//! The ledger lives in the operator's memory. After a restart each controller re-registers the
//! VMs that already exist with [`Capacity::hold`] before anything new is granted.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use k8s_openapi::jiff::Timestamp;
use tokio::sync::broadcast;

/// Wake-ups buffered per subscriber; one that falls further behind misses some and relies on
/// its periodic requeue.
const WAKE_BUFFER: usize = 1024;

/// The answer to [`Capacity::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The holder has a slot (it may have had it already).
    Granted,
    /// No slot for it yet; it keeps its place in the queue.
    Waiting {
        /// Slots held now.
        in_use: usize,
        /// The provider's `maxInstances`.
        max: usize,
        /// Holders queued before this one.
        ahead: usize,
    },
}

/// One CloudProvider's slots.
#[derive(Debug, Default)]
struct Pool {
    holders: HashSet<String>,
    /// Ordered by (queued since, holder UID): first come first served, ties broken stably.
    waiters: BTreeSet<(Timestamp, String)>,
    /// The last `maxInstances` a request was made with.
    max: Option<usize>,
}

impl Pool {
    fn free(&self) -> usize {
        self.max.map_or(1, |max| max.saturating_sub(self.holders.len()))
    }

    fn remove_waiter(&mut self, holder: &str) -> bool {
        let found = self.waiters.iter().find(|(_, uid)| uid == holder).cloned();
        found.is_some_and(|entry| self.waiters.remove(&entry))
    }
}

/// The slots of every CloudProvider, keyed by `<namespace>/<name>`, held by object UIDs.
#[derive(Debug)]
pub struct Capacity {
    pools: Mutex<HashMap<String, Pool>>,
    wake: broadcast::Sender<String>,
}

impl Default for Capacity {
    fn default() -> Self {
        Self::new()
    }
}

impl Capacity {
    /// An empty ledger.
    pub fn new() -> Self {
        Self { pools: Mutex::new(HashMap::new()), wake: broadcast::channel(WAKE_BUFFER).0 }
    }

    fn pools(&self) -> MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks for a slot of `provider` (at most `max` held at once) for `holder`, queued since
    /// `queued_since`. Granted when fewer holders are queued before it than slots are free;
    /// otherwise it keeps its place in the queue and is woken when its turn may have come.
    pub fn acquire(&self, provider: &str, holder: &str, queued_since: Timestamp, max: usize) -> Grant {
        let mut pools = self.pools();
        let pool = pools.entry(provider.to_owned()).or_default();
        pool.max = Some(max);
        if pool.holders.contains(holder) {
            return Grant::Granted;
        }
        let entry = match pool.waiters.iter().find(|(_, uid)| uid == holder) {
            Some(entry) => entry.clone(),
            None => {
                let entry = (queued_since, holder.to_owned());
                pool.waiters.insert(entry.clone());
                entry
            }
        };
        let ahead = pool.waiters.range(..&entry).count();
        if ahead < pool.free() {
            pool.waiters.remove(&entry);
            pool.holders.insert(holder.to_owned());
            return Grant::Granted;
        }
        Grant::Waiting { in_use: pool.holders.len(), max, ahead }
    }

    /// Records that `holder` already has a VM through `provider` (after a restart), whatever the
    /// limit says now.
    pub fn hold(&self, provider: &str, holder: &str) {
        let mut pools = self.pools();
        let pool = pools.entry(provider.to_owned()).or_default();
        pool.remove_waiter(holder);
        pool.holders.insert(holder.to_owned());
    }

    /// Gives back `holder`'s slot of `provider`, or its place in the queue, and wakes the
    /// holders whose turn it may now be. Releasing twice is harmless.
    pub fn release(&self, provider: &str, holder: &str) {
        let mut pools = self.pools();
        let Some(pool) = pools.get_mut(provider) else { return };
        let held = pool.holders.remove(holder);
        let waited = pool.remove_waiter(holder);
        if held || waited {
            self.wake_next(pool);
        }
        if pool.holders.is_empty() && pool.waiters.is_empty() {
            pools.remove(provider);
        }
    }

    /// Gives back whatever `holder` has with any provider (its provider can no longer be
    /// named, e.g. its Project is gone).
    pub fn release_everywhere(&self, holder: &str) {
        let providers: Vec<String> = self
            .pools()
            .iter()
            .filter(|(_, pool)| pool.holders.contains(holder) || pool.waiters.iter().any(|(_, uid)| uid == holder))
            .map(|(provider, _)| provider.clone())
            .collect();
        for provider in providers {
            self.release(&provider, holder);
        }
    }

    fn wake_next(&self, pool: &Pool) {
        for (_, holder) in pool.waiters.iter().take(pool.free()) {
            // No subscriber: nobody to wake.
            let _ = self.wake.send(holder.clone());
        }
    }

    /// The UIDs of holders whose turn may have come, as slots free.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.wake.subscribe()
    }

    /// Slots of `provider` held now.
    pub fn in_use(&self, provider: &str) -> usize {
        self.pools().get(provider).map_or(0, |pool| pool.holders.len())
    }

    /// Holders waiting for a slot of `provider`.
    pub fn waiting(&self, provider: &str) -> usize {
        self.pools().get(provider).map_or(0, |pool| pool.waiters.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).unwrap()
    }

    fn woken(receiver: &mut broadcast::Receiver<String>) -> Vec<String> {
        std::iter::from_fn(|| receiver.try_recv().ok()).collect()
    }

    #[test]
    fn first_come_first_served() {
        let capacity = Capacity::new();
        assert_eq!(capacity.acquire("ns/cp", "a", at(1), 2), Grant::Granted);
        assert_eq!(capacity.acquire("ns/cp", "b", at(2), 2), Grant::Granted);
        // d asks first but was queued after c: c is ahead of it.
        assert_eq!(capacity.acquire("ns/cp", "d", at(4), 2), Grant::Waiting { in_use: 2, max: 2, ahead: 0 });
        assert_eq!(capacity.acquire("ns/cp", "c", at(3), 2), Grant::Waiting { in_use: 2, max: 2, ahead: 0 });
        assert_eq!(capacity.acquire("ns/cp", "d", at(4), 2), Grant::Waiting { in_use: 2, max: 2, ahead: 1 });
        assert_eq!(capacity.waiting("ns/cp"), 2);

        capacity.release("ns/cp", "a");
        // One slot free, c first in line: d still waits behind it.
        assert_eq!(capacity.acquire("ns/cp", "d", at(4), 2), Grant::Waiting { in_use: 1, max: 2, ahead: 1 });
        assert_eq!(capacity.acquire("ns/cp", "c", at(3), 2), Grant::Granted);
        assert_eq!(capacity.acquire("ns/cp", "d", at(4), 2), Grant::Waiting { in_use: 2, max: 2, ahead: 0 });
        // Asking again keeps the slot.
        assert_eq!(capacity.acquire("ns/cp", "c", at(3), 2), Grant::Granted);
        assert_eq!(capacity.in_use("ns/cp"), 2);
    }

    #[test]
    fn a_release_wakes_the_next_in_line() {
        let capacity = Capacity::new();
        let mut wakes = capacity.subscribe();
        capacity.acquire("ns/cp", "a", at(1), 1);
        capacity.acquire("ns/cp", "c", at(3), 1);
        capacity.acquire("ns/cp", "b", at(2), 1);
        assert!(woken(&mut wakes).is_empty());

        capacity.release("ns/cp", "a");
        assert_eq!(woken(&mut wakes), ["b"]);
        capacity.release("ns/cp", "a");
        assert!(woken(&mut wakes).is_empty(), "a second release frees nothing");

        // b gave up its place before its turn: c is next.
        capacity.release("ns/cp", "b");
        assert_eq!(woken(&mut wakes), ["c"]);
        assert_eq!(capacity.acquire("ns/cp", "c", at(3), 1), Grant::Granted);
    }

    #[test]
    fn a_larger_limit_lets_several_in() {
        let capacity = Capacity::new();
        capacity.acquire("ns/cp", "a", at(1), 1);
        capacity.acquire("ns/cp", "b", at(2), 1);
        capacity.acquire("ns/cp", "c", at(3), 1);
        assert_eq!(capacity.acquire("ns/cp", "c", at(3), 3), Grant::Granted, "two free slots, one ahead");
        assert_eq!(capacity.acquire("ns/cp", "b", at(2), 3), Grant::Granted);
    }

    #[test]
    fn held_vms_count_against_the_limit() {
        let capacity = Capacity::new();
        capacity.hold("ns/cp", "old-1");
        capacity.hold("ns/cp", "old-2");
        capacity.hold("ns/cp", "old-2");
        assert_eq!(capacity.in_use("ns/cp"), 2);
        assert_eq!(capacity.acquire("ns/cp", "new", at(9), 2), Grant::Waiting { in_use: 2, max: 2, ahead: 0 });
        // Over the limit after it was lowered: nothing new until enough are gone.
        assert_eq!(capacity.acquire("ns/cp", "new", at(9), 1), Grant::Waiting { in_use: 2, max: 1, ahead: 0 });
        capacity.release("ns/cp", "old-1");
        assert_eq!(capacity.acquire("ns/cp", "new", at(9), 1), Grant::Waiting { in_use: 1, max: 1, ahead: 0 });
        capacity.release("ns/cp", "old-2");
        assert_eq!(capacity.acquire("ns/cp", "new", at(9), 1), Grant::Granted);
    }

    #[test]
    fn providers_are_separate_and_release_everywhere_finds_the_holder() {
        let capacity = Capacity::new();
        capacity.acquire("ns/one", "a", at(1), 1);
        assert_eq!(capacity.acquire("ns/two", "b", at(2), 1), Grant::Granted);
        assert_eq!(capacity.acquire("ns/one", "c", at(3), 1), Grant::Waiting { in_use: 1, max: 1, ahead: 0 });
        let mut wakes = capacity.subscribe();
        capacity.release_everywhere("a");
        assert_eq!(woken(&mut wakes), ["c"]);
        assert_eq!((capacity.in_use("ns/one"), capacity.in_use("ns/two")), (0, 1));
    }
}
