//! The deliveries the receiver accepted lately, by `X-GitHub-Delivery`: a redelivery of one of
//! them is answered without doing the work again. Bounded: the oldest are forgotten first (the
//! Environment records the delivery that last applied it, which catches a redelivery after that,
//! or after a restart).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// The set of recent delivery ids; see the module documentation.
pub struct Deliveries {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<String>,
    order: VecDeque<String>,
}

impl Deliveries {
    /// Remembers at most `capacity` deliveries.
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::default(), capacity: capacity.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `id`; false if it was recorded already.
    pub fn insert(&self, id: &str) -> bool {
        let mut inner = self.lock();
        if inner.seen.contains(id) {
            return false;
        }
        if inner.order.len() >= self.capacity
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.seen.remove(&oldest);
        }
        inner.seen.insert(id.to_owned());
        inner.order.push_back(id.to_owned());
        true
    }

    /// Forgets `id`, whose work failed for good: a redelivery of it is done again.
    pub fn forget(&self, id: &str) {
        let mut inner = self.lock();
        if inner.seen.remove(id) {
            inner.order.retain(|seen| seen != id);
        }
    }

    /// How many deliveries are remembered.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_is_new_once_until_forgotten() {
        let deliveries = Deliveries::new(10);
        assert!(deliveries.insert("a"));
        assert!(!deliveries.insert("a"));
        deliveries.forget("a");
        assert!(deliveries.insert("a"));
    }

    #[test]
    fn the_oldest_are_forgotten_first() {
        let deliveries = Deliveries::new(2);
        assert!(deliveries.insert("a") && deliveries.insert("b") && deliveries.insert("c"));
        assert_eq!(deliveries.len(), 2);
        assert!(!deliveries.insert("c") && !deliveries.insert("b"));
        assert!(deliveries.insert("a"), "a was forgotten to make room for c");
    }
}
