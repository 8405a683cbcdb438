//! Watches shared by controllers: one watch and one cache of a kind that several controllers
//! read, instead of one each. The BuildJobs are read by the BuildJob controller (its own objects)
//! and the Environment controller (their owners' fan-in); one copy of each BuildJob is a few
//! kilobytes less per Environment, which at thousands of Environments is much of the operator's
//! memory.
//!
//! Each reader gets the cache and a stream of the objects that changed, in the order the cache
//! took them: a reader woken by a change finds at least that change in the cache. Deletions are
//! not in the stream (only in the cache); readers that wait for an object to go poll for it.

use std::future::Future;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use crate::controllers::strip;

/// How many changes a reader may lag behind before the watch waits for it.
const BUFFER: usize = 1024;

/// One reader's view of a shared watch.
pub struct Reader<K: Resource<DynamicType = ()> + Clone + 'static> {
    /// The cache.
    pub store: Store<K>,
    /// The objects as they change.
    pub changes: ReflectHandle<K>,
}

impl<K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static> Reader<K> {
    /// The changes as a fallible stream, as kube's triggers take them.
    pub fn changes(self) -> (Store<K>, impl Stream<Item = Result<Arc<K>, watcher::Error>> + Send + 'static) {
        (self.store, self.changes.map(Ok))
    }
}

/// Watches every `K` that `api` reaches (without `managedFields`) for `readers` readers. The
/// returned future runs the watch until `shutdown` resolves; each reader must be polled, or the
/// watch waits for it.
pub fn watch<K>(
    api: Api<K>,
    readers: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Vec<Reader<K>>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store_shared::<K>(BUFFER);
    let readers = (0..readers)
        .map(|_| Reader {
            store: store.clone(),
            changes: writer.subscribe().expect("a shared store's writer has subscribers"),
        })
        .collect();
    let kind = K::kind(&());
    let run = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect_shared(writer)
        .take_until(shutdown)
        .for_each(move |event| {
            if let Err(err) = event {
                tracing::warn!(%kind, error = %err, "shared watch failed; retrying");
            }
            std::future::ready(())
        });
    (readers, run)
}
