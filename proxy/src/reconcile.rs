//! The mesh reconciler: reads every mesh object from the intent store, hands the whole configuration to the
//! proxy as the `intent` source, and reports each object ready or in error (with the field and reason).

use std::collections::BTreeMap;

use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler};
use dpu_intent::{Resource, Store};
use tokio::sync::Mutex;

use crate::model::{CertificateSpec, ClusterSpec, ListenerSpec, MeshSpecs, PolicySpec, RouteTableSpec, WorkloadSpec};
use crate::proxy::{ApplyReport, Proxy};

/// Status-board and tracing name of the mesh data path.
pub const SUBSYSTEM: &str = "mesh";

/// Name of the configuration source the intent store feeds.
pub const SOURCE: &str = "intent";

/// (kind, id) of a mesh object with its generation.
type Generations = Vec<((&'static str, String), u64)>;

/// Reads the whole mesh configuration from the store.
pub fn load_specs(store: &Store) -> Result<MeshSpecs, dpu_intent::Error> {
    load(store).map(|(specs, _)| specs)
}

/// Reads the whole mesh configuration and every object's generation in one pass over the store.
fn load(store: &Store) -> Result<(MeshSpecs, Generations), dpu_intent::Error> {
    fn all<T: Resource>(
        store: &Store,
        generations: &mut Generations,
    ) -> Result<BTreeMap<String, T>, dpu_intent::Error> {
        let stored = store.list_all::<T>()?;
        generations.extend(stored.iter().map(|s| ((T::KIND, s.id.clone()), s.meta.generation)));
        Ok(stored.into_iter().map(|s| (s.id, s.spec)).collect())
    }
    let mut generations = Vec::new();
    let specs = MeshSpecs {
        workloads: all::<WorkloadSpec>(store, &mut generations)?,
        certificates: all::<CertificateSpec>(store, &mut generations)?,
        clusters: all::<ClusterSpec>(store, &mut generations)?,
        route_tables: all::<RouteTableSpec>(store, &mut generations)?,
        listeners: all::<ListenerSpec>(store, &mut generations)?,
        policies: all::<PolicySpec>(store, &mut generations)?,
    };
    Ok((specs, generations))
}

/// Converges the proxy towards the mesh intent.
#[derive(Debug)]
pub struct MeshReconciler {
    proxy: Proxy,
    /// What was applied last and what the proxy said about it.
    last: Mutex<Option<(MeshSpecs, ApplyReport)>>,
}

impl MeshReconciler {
    pub fn new(proxy: Proxy) -> Self {
        MeshReconciler { proxy, last: Mutex::new(None) }
    }
}

impl Reconciler for MeshReconciler {
    fn name(&self) -> &'static str {
        SUBSYSTEM
    }

    async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
        let (specs, generations) = load(store)?;
        let mut last = self.last.lock().await;
        // Unchanged intent that applied cleanly needs nothing; errors (a port in use, a dangling reference that
        // may now resolve) are retried on every pass.
        let changes = match last.as_ref() {
            Some((applied, report)) if *applied == specs && report.errors.is_empty() => 0,
            _ => {
                let report = self.proxy.apply(SOURCE, specs.clone()).await;
                if !report.errors.is_empty() {
                    tracing::warn!(errors = report.errors.len(), "mesh objects not applied");
                }
                *last = Some((specs, report));
                1
            }
        };
        let (applied, report) = last.as_ref().expect("set above");
        // A listener's or cluster's kernel TLS setting: what this kernel makes of it, in the object's status.
        let kernel_tls = |kind: &str, id: &str| match kind {
            ListenerSpec::KIND => applied.listeners.get(id)?.tls.as_ref()?.kernel_tls,
            ClusterSpec::KIND => applied.clusters.get(id)?.tls.as_ref()?.kernel_tls,
            _ => None,
        };
        let statuses = generations
            .into_iter()
            .map(|((kind, id), generation)| {
                let error = report.errors.iter().find(|e| e.kind == kind && e.id == id);
                let status = match error {
                    None => ObjectStatus {
                        state: ObjectState::Ready,
                        reason: kernel_tls(kind, &id).map(crate::ktls::status_text).unwrap_or_default(),
                        observed_generation: generation,
                    },
                    Some(e) => ObjectStatus {
                        state: ObjectState::Error,
                        reason: format!("{}: {}", e.field, e.message),
                        observed_generation: generation,
                    },
                };
                (ObjectKey { kind: kind.into(), id }, status)
            })
            .collect();
        Ok(Pass { changes, statuses })
    }
}
