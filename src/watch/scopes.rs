//! One event stream for one store, from the watches of several scopes (namespaces, or the whole
//! cluster): the first listing of every scope fills the store at once, later re-listings become
//! plain changes, and objects that vanished while a watch was away come out as deletions, so
//! that whatever the operator remembers of them is forgotten.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::stream::{self, BoxStream, Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};

use crate::watch::index::Key;
use crate::watch::relist::Relist;

/// The state that turns the events of several scopes into one store's events.
pub struct Merger<K> {
    scopes: usize,
    /// Objects that exist, per scope, as far as its watch said.
    known: Vec<HashSet<Key>>,
    /// Objects listed so far in each scope's current re-listing.
    relist: Relist<usize>,
    /// Scopes that have finished their first listing.
    synced: HashSet<usize>,
    /// All scopes have: the store is filled and events pass as changes.
    live: bool,
    /// Before that, objects deleted after they were listed (to delete after the fill).
    deleted_early: HashMap<Key, K>,
    /// Objects that vanished in a re-listing before the fill: deleted, read back from the store,
    /// with the first event after it (the store is filled by then). Only keys are kept, so the
    /// first listing holds no second copy of every object.
    vanished_early: Vec<Key>,
}

impl<K: Resource + Clone> Merger<K> {
    pub fn new(scopes: usize) -> Self {
        Self {
            scopes,
            known: vec![HashSet::new(); scopes],
            relist: Relist::default(),
            synced: HashSet::new(),
            live: false,
            deleted_early: HashMap::new(),
            vanished_early: Vec::new(),
        }
    }

    /// The store events for one event of scope `i`; `stored` finds an object in the store.
    pub fn step(&mut self, i: usize, event: Event<K>, stored: impl Fn(&Key) -> Option<K>) -> Vec<Event<K>> {
        let mut out = Vec::new();
        if self.live && !self.vanished_early.is_empty() {
            let still_gone: Vec<Key> = std::mem::take(&mut self.vanished_early)
                .into_iter()
                .filter(|k| !self.known.iter().any(|known| known.contains(k)))
                .collect();
            out.extend(still_gone.iter().filter_map(&stored).map(Event::Delete));
        }
        out.extend(self.event(i, event, stored));
        out
    }

    fn event(&mut self, i: usize, event: Event<K>, stored: impl Fn(&Key) -> Option<K>) -> Vec<Event<K>> {
        match event {
            Event::Init => {
                self.relist.begin(i);
                Vec::new()
            }
            Event::InitApply(obj) | Event::Apply(obj) => {
                let k = Key::of(&obj);
                self.relist.seen(&i, &k);
                self.known[i].insert(k.clone());
                if self.live {
                    vec![Event::Apply(obj)]
                } else {
                    self.deleted_early.remove(&k);
                    vec![Event::InitApply(obj)]
                }
            }
            Event::Delete(obj) => {
                let k = Key::of(&obj);
                self.known[i].remove(&k);
                if self.live {
                    vec![Event::Delete(obj)]
                } else {
                    self.deleted_early.insert(k, obj);
                    Vec::new()
                }
            }
            Event::InitDone => {
                let vanished = self.relist.end(&i, &self.known[i]);
                let mut out = Vec::new();
                for k in vanished {
                    self.known[i].remove(&k);
                    if self.live {
                        out.extend(stored(&k).map(Event::Delete));
                    } else {
                        self.vanished_early.push(k);
                    }
                }
                self.synced.insert(i);
                if !self.live && self.synced.len() == self.scopes {
                    self.live = true;
                    out.push(Event::InitDone);
                    out.extend(self.deleted_early.drain().map(|(_, obj)| Event::Delete(obj)));
                }
                out
            }
        }
    }
}

type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// Merges the watch streams of several scopes into the events of one store, read back through
/// `store` when an object vanished during a re-listing.
pub fn merge<K>(scopes: Vec<Events<K>>, store: Store<K>) -> impl Stream<Item = Result<Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let merger = Arc::new(Mutex::new(Merger::<K>::new(scopes.len())));
    let tagged = stream::select_all(scopes.into_iter().enumerate().map(|(i, s)| s.map(move |e| (i, e)).boxed()));
    stream::once(async { Ok(Event::Init) }).chain(tagged.flat_map(move |(i, event)| {
        let out: Vec<Result<Event<K>, watcher::Error>> = match event {
            Err(e) => vec![Err(e)],
            Ok(event) => {
                let stored = |k: &Key| store.get(&ObjectRef::new(&k.name).within(&k.namespace)).map(|o| (*o).clone());
                let mut merger = merger.lock().unwrap_or_else(|p| p.into_inner());
                merger.step(i, event, stored).into_iter().map(Ok).collect()
            }
        };
        stream::iter(out)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn obj(ns: &str, name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some(ns.into());
        cm.metadata.name = Some(name.into());
        cm
    }

    fn names(events: &[Event<ConfigMap>]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Init => "init".to_owned(),
                Event::InitDone => "done".to_owned(),
                Event::InitApply(o) => format!("list {}", o.metadata.name.as_deref().unwrap()),
                Event::Apply(o) => format!("apply {}", o.metadata.name.as_deref().unwrap()),
                Event::Delete(o) => format!("delete {}", o.metadata.name.as_deref().unwrap()),
            })
            .collect()
    }

    fn none(_: &Key) -> Option<ConfigMap> {
        None
    }

    #[test]
    fn the_store_is_filled_once_every_scope_has_listed() {
        let mut m = Merger::new(2);
        let mut out = Vec::new();
        out.extend(m.step(0, Event::Init, none));
        out.extend(m.step(0, Event::InitApply(obj("a", "one")), none));
        out.extend(m.step(0, Event::InitDone, none));
        out.extend(m.step(0, Event::Apply(obj("a", "two")), none));
        out.extend(m.step(1, Event::Init, none));
        out.extend(m.step(1, Event::InitApply(obj("b", "three")), none));
        out.extend(m.step(1, Event::InitDone, none));
        out.extend(m.step(1, Event::Apply(obj("b", "four")), none));
        assert_eq!(names(&out), ["list one", "list two", "list three", "done", "apply four"]);
    }

    #[test]
    fn an_object_deleted_before_the_fill_is_deleted_after_it() {
        let mut m = Merger::new(2);
        let mut out = Vec::new();
        out.extend(m.step(0, Event::Init, none));
        out.extend(m.step(0, Event::InitApply(obj("a", "short-lived")), none));
        out.extend(m.step(0, Event::InitDone, none));
        out.extend(m.step(0, Event::Delete(obj("a", "short-lived")), none));
        out.extend(m.step(1, Event::Init, none));
        out.extend(m.step(1, Event::InitDone, none));
        assert_eq!(names(&out), ["list short-lived", "done", "delete short-lived"]);
    }

    #[test]
    fn an_object_gone_from_an_early_relisting_is_deleted_once_the_store_is_filled() {
        let mut m = Merger::new(2);
        let stored = |k: &Key| Some(obj(&k.namespace, &k.name));
        m.step(0, Event::Init, stored);
        m.step(0, Event::InitApply(obj("a", "gone")), stored);
        m.step(0, Event::InitDone, stored);
        // Scope 0 lists again before scope 1 finished its first listing.
        m.step(0, Event::Init, stored);
        m.step(0, Event::InitDone, stored);
        m.step(1, Event::Init, stored);
        let fill = m.step(1, Event::InitDone, stored);
        assert_eq!(names(&fill), ["done"]);
        let next = m.step(1, Event::Apply(obj("b", "new")), stored);
        assert_eq!(names(&next), ["delete gone", "apply new"]);
    }

    #[test]
    fn a_relist_turns_vanished_objects_into_deletions_in_its_scope_only() {
        let mut m = Merger::new(2);
        m.step(0, Event::Init, none);
        m.step(1, Event::Init, none);
        for (i, ns, name) in [(0, "a", "kept"), (0, "a", "gone"), (1, "b", "other")] {
            m.step(i, Event::InitApply(obj(ns, name)), none);
        }
        m.step(0, Event::InitDone, none);
        m.step(1, Event::InitDone, none);
        let stored = |k: &Key| Some(obj(&k.namespace, &k.name));
        let mut out = Vec::new();
        out.extend(m.step(0, Event::Init, stored));
        out.extend(m.step(0, Event::InitApply(obj("a", "kept")), stored));
        out.extend(m.step(0, Event::InitDone, stored));
        assert_eq!(names(&out), ["apply kept", "delete gone"]);
    }
}
