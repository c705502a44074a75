//! What a watch's re-listing has seen so far, per scope, and at its end which of the keys the
//! scope held were not listed again (they were deleted while the watch was away). One catalogue
//! for every watch that keeps something by key: the RegistryAccess scopes' merge, the Secret index
//! and the ServiceAccount index. Pure bookkeeping: it holds keys, never objects.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use crate::watch::index::Key;

/// The keys listed so far in each scope's current re-listing.
#[derive(Debug)]
pub struct Relist<S> {
    listing: HashMap<S, HashSet<Key>>,
}

impl<S> Default for Relist<S> {
    fn default() -> Self {
        Self { listing: HashMap::new() }
    }
}

impl<S: Hash + Eq + Clone> Relist<S> {
    /// The watch of `scope` starts listing (again).
    pub fn begin(&mut self, scope: S) {
        self.listing.insert(scope, HashSet::new());
    }

    /// `key` was listed by the watch of `scope` (nothing to do outside a listing).
    pub fn seen(&mut self, scope: &S, key: &Key) {
        if let Some(seen) = self.listing.get_mut(scope) {
            seen.insert(key.clone());
        }
    }

    /// `key` was listed by a watch whose scope `covers` it: every listing in progress of such a
    /// scope records it.
    pub fn seen_where(&mut self, key: &Key, covers: impl Fn(&S, &Key) -> bool) {
        for (scope, seen) in self.listing.iter_mut() {
            if covers(scope, key) {
                seen.insert(key.clone());
            }
        }
    }

    /// The watch of `scope` finished listing: of the keys it held (`held`), those it did not list
    /// are gone. Empty when no listing of `scope` was in progress.
    pub fn end<'a>(&mut self, scope: &S, held: impl IntoIterator<Item = &'a Key>) -> Vec<Key> {
        let Some(seen) = self.listing.remove(scope) else { return Vec::new() };
        held.into_iter().filter(|k| !seen.contains(*k)).cloned().collect()
    }
}

/// Whether a namespace scope (`None`: the whole cluster) covers a namespaced key.
pub fn in_scope(scope: &Option<String>, key: &Key) -> bool {
    scope.as_deref().is_none_or(|ns| ns == key.namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_listing_did_not_show_again_is_gone() {
        let held = [Key::new("a", "1"), Key::new("a", "2"), Key::new("b", "3")];
        let mut r = Relist::<Option<String>>::default();
        r.seen_where(&Key::new("a", "1"), in_scope);
        assert!(r.end(&Some("a".into()), &held).is_empty(), "no listing in progress: nothing is gone");
        r.begin(Some("a".into()));
        r.begin(None);
        r.seen_where(&Key::new("a", "1"), in_scope);
        r.seen_where(&Key::new("b", "3"), in_scope);
        let in_a: Vec<&Key> = held.iter().filter(|k| in_scope(&Some("a".into()), k)).collect();
        assert_eq!(r.end(&Some("a".into()), in_a), vec![Key::new("a", "2")]);
        assert_eq!(r.end(&None, &held), vec![Key::new("a", "2")]);
    }

    #[test]
    fn scopes_by_number_record_only_their_own_listing() {
        let mut r = Relist::<usize>::default();
        r.begin(0);
        r.seen(&1, &Key::new("a", "1"));
        r.seen(&0, &Key::new("a", "2"));
        assert_eq!(r.end(&0, &[Key::new("a", "1"), Key::new("a", "2")]), vec![Key::new("a", "1")]);
    }
}
