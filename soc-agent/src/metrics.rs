//! Prometheus metrics of the agent, served by the admin listener. Names are prefixed `dpu_` and labelled by
//! subsystem; data paths register their own families in the same registry.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::auth::Role;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodRole {
    method: String,
    role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
    revision: &'static str,
    target: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Subsystem {
    subsystem: &'static str,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    api_requests: Family<MethodRole, Counter>,
    api_denied: Family<Method, Counter>,
    reconcile_passes: Family<Subsystem, Gauge>,
    reconcile_changes: Family<Subsystem, Gauge>,
    reconcile_errors: Family<Subsystem, Gauge>,
}

/// Handle to the agent's metric families; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// Registers every family. `start_time` is the process start in seconds since the epoch.
    pub fn new(start_time: f64) -> Self {
        let mut registry = Registry::with_prefix("dpu");
        let build = Family::<Build, Gauge>::default();
        build
            .get_or_create(&Build { version: crate::VERSION, revision: crate::GIT_REVISION, target: crate::TARGET })
            .set(1);
        registry.register("agent_build_info", "Build of the running agent", build);
        let start = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start.set(start_time);
        registry.register("agent_start_time_seconds", "Start of the agent process, seconds since the epoch", start);

        let api_requests = Family::<MethodRole, Counter>::default();
        registry.register("api_requests", "Authorized gRPC requests by method and caller role", api_requests.clone());
        let api_denied = Family::<Method, Counter>::default();
        registry.register("api_denied", "gRPC requests refused for lack of a role", api_denied.clone());
        let reconcile_passes = Family::<Subsystem, Gauge>::default();
        registry.register("reconcile_passes", "Reconcile passes run since start", reconcile_passes.clone());
        let reconcile_changes = Family::<Subsystem, Gauge>::default();
        registry.register(
            "reconcile_changes",
            "Changes applied by reconcile passes since start",
            reconcile_changes.clone(),
        );
        let reconcile_errors = Family::<Subsystem, Gauge>::default();
        registry.register("reconcile_errors", "Reconcile passes that failed since start", reconcile_errors.clone());
        Self(Arc::new(Inner {
            registry,
            api_requests,
            api_denied,
            reconcile_passes,
            reconcile_changes,
            reconcile_errors,
        }))
    }

    pub(crate) fn api_request(&self, method: &str, role: Role) {
        self.0.api_requests.get_or_create(&MethodRole { method: method.to_owned(), role: role.as_str() }).inc();
    }

    pub(crate) fn api_denied(&self, method: &str) {
        self.0.api_denied.get_or_create(&Method { method: method.to_owned() }).inc();
    }

    /// Publishes a reconciler's totals (read from its status board).
    pub fn reconcile_totals(&self, subsystem: &'static str, passes: u64, changes: u64, errors: u64) {
        let key = Subsystem { subsystem };
        let set = |family: &Family<Subsystem, Gauge>, v: u64| {
            family.get_or_create(&key).set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.0.reconcile_passes, passes);
        set(&self.0.reconcile_changes, changes);
        set(&self.0.reconcile_errors, errors);
    }

    /// The OpenMetrics text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.0.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_build_info_and_counters() {
        let metrics = Metrics::new(1.5);
        metrics.api_request("/dpu.v1.AgentService/GetAgentInfo", Role::Viewer);
        metrics.api_denied("/dpu.v1.AgentService/UpdateAgentSettings");
        metrics.reconcile_totals("settings", 3, 1, 0);
        let text = metrics.encode();
        assert!(text.contains("dpu_agent_build_info{"), "{text}");
        assert!(
            text.contains("dpu_api_requests_total{method=\"/dpu.v1.AgentService/GetAgentInfo\",role=\"viewer\"} 1"),
            "{text}"
        );
        assert!(text.contains("dpu_api_denied_total{method=\"/dpu.v1.AgentService/UpdateAgentSettings\"} 1"), "{text}");
        assert!(text.contains("dpu_reconcile_passes{subsystem=\"settings\"} 3"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
