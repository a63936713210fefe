//! Sources of cluster state: a folder of manifests, or the Kubernetes API.
//!
//! A source keeps a *complete view* of the cluster ([`Source::state`]): the Services and
//! EndpointSlices it has read, converted to the model, bad objects left out (and logged, by
//! namespace and name). [`Source::changed`] waits until the view has changed and says which
//! objects changed, so that the agent re-translates only those. Whenever it returns, the view
//! is complete: a source never hands out a half-read folder or a half-done relist, so the
//! agent can apply every view it gets without flushing anything that is still true.

#![deny(missing_docs)]

pub mod kube;
pub mod manifests;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    time::Instant,
};

use crate::model::{ClusterState, ObjectRef};

/// What changed in a source's view since the previous [`Source::changed`].
#[derive(Clone, Debug)]
pub struct Changes {
    /// Services added, modified or removed.
    pub services: BTreeSet<ObjectRef>,
    /// EndpointSlices added, modified or removed.
    pub slices: BTreeSet<ObjectRef>,
    /// Whether [`Source::node`] changed.
    pub node: bool,
    /// When the source saw the first event behind these changes.
    pub since: Instant,
}

impl Changes {
    /// No change, first seen at `since`.
    pub fn none(since: Instant) -> Self {
        Changes {
            services: BTreeSet::new(),
            slices: BTreeSet::new(),
            node: false,
            since,
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty() && !self.node
    }

    /// The objects that differ between two views.
    pub fn between(old: &ClusterState, new: &ClusterState, since: Instant) -> Self {
        Changes {
            services: differing(&old.services, &new.services),
            slices: differing(&old.slices, &new.slices),
            node: false,
            since,
        }
    }
}

/// The keys whose values differ between two maps (present in one only, or unequal).
fn differing<V: PartialEq>(
    old: &BTreeMap<ObjectRef, V>,
    new: &BTreeMap<ObjectRef, V>,
) -> BTreeSet<ObjectRef> {
    old.keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

pub use crate::model::NodeFacts;

/// A source of complete views of the cluster.
pub trait Source {
    /// Waits until the view has changed (the first time: until there is a complete view),
    /// and says what changed. Cancel-safe: progress is kept in the source. An error means
    /// the source cannot go on at all.
    fn changed(&mut self) -> impl Future<Output = anyhow::Result<Changes>> + Send;

    /// The current view.
    fn state(&self) -> &ClusterState;

    /// What the source knows about this node, if anything.
    fn node(&self) -> Option<&NodeFacts>;
}

/// Sleeps until `deadline`, forever without one; returns at once when it has passed (tokio's
/// timer would round a past deadline up to its next millisecond tick). The sources and the
/// agent's loop wait for their next deadline with it.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) if deadline > Instant::now() => {
            tokio::time::sleep_until(deadline.into()).await;
        }
        Some(_) => {}
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::state;

    const A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
    const B2: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 81}]}\n";
    const S: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [10.1.0.1]}]\n";

    #[test]
    fn changes_between_views_name_added_modified_and_removed_objects() {
        let now = Instant::now();
        let old = state(&format!("{A}---\n{B}"));
        let new = state(&format!("{B2}---\n{S}"));
        let c = Changes::between(&old, &new, now);
        let names = |s: &BTreeSet<ObjectRef>| s.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&c.services), ["default/a", "default/b"]);
        assert_eq!(names(&c.slices), ["default/a-1"]);
        assert!(!c.is_empty());
        assert!(Changes::between(&new, &new.clone(), now).is_empty());
    }
}
