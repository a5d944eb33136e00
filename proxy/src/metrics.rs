//! The proxy's metric families: Istio-compatible request and TCP metrics (unprefixed names, Istio labels) and
//! `dpu_proxy_*` families for admission, configuration and per-cluster state. Cluster state is read from
//! [`crate::cluster::Cluster::stats`] at scrape time by a [`Collector`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::snapshot::Snapshot;

/// Labels of `istio_requests_total` and `istio_request_duration_milliseconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// Labels of the `istio_tcp_*` families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub connection_security_policy: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectionLabels {
    pub workload: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub workload: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConfigErrorLabels {
    pub source: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClusterLabels {
    source: String,
    cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    source: String,
    cluster: String,
    endpoint: String,
    locality: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(1.0, 2.0, 17))
}

/// Every family the proxy updates.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub rejections: Family<RejectionLabels, Counter>,
    pub active_connections: Family<WorkloadLabels, Gauge>,
    pub config_applies: Family<SourceLabels, Counter>,
    pub config_errors: Family<ConfigErrorLabels, Counter>,
    /// Downstream HTTP/1.1 connections holding codec buffers now (idle keep-alive connections release theirs).
    pub http1_codecs: Gauge,
    /// Seconds the runtime's workers stayed awake in poll mode, summed over workers ([`crate::poll`]).
    pub poll_awake: Counter<f64>,
}

impl Metrics {
    /// Registers every family, and the scrape-time cluster collector over `snapshot`, in `registry`.
    pub fn register(registry: &mut Registry, snapshot: Arc<ArcSwap<Snapshot>>) -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            rejections: Family::default(),
            active_connections: Family::default(),
            config_applies: Family::default(),
            config_errors: Family::default(),
            http1_codecs: Gauge::default(),
            poll_awake: Counter::default(),
        };
        registry.register("istio_requests", "Requests handled by the proxy", m.requests.clone());
        registry.register(
            "dpu_proxy_tls_connections",
            "TLS connections by where their records are encrypted (engine: rustls, ktls-sw, ktls-hw, none) and why",
            crate::ktls::connections().clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from request start to the end of the response, in milliseconds",
            m.request_duration.clone(),
        );
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.tcp_closed.clone());
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream during TCP connections",
            m.tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream during TCP connections",
            m.tcp_received_bytes.clone(),
        );
        registry.register(
            "dpu_proxy_workload_rejections",
            "Connections and requests refused by workload admission",
            m.rejections.clone(),
        );
        registry.register(
            "dpu_proxy_workload_active_connections",
            "Open downstream connections per workload",
            m.active_connections.clone(),
        );
        registry.register("dpu_proxy_config_applies", "Configuration applies per source", m.config_applies.clone());
        registry.register(
            "dpu_proxy_config_errors",
            "Objects left out of a configuration apply, per source and kind",
            m.config_errors.clone(),
        );
        registry.register(
            "dpu_proxy_http1_codecs",
            "Downstream HTTP/1.1 connections holding codec buffers (idle keep-alive connections hold none)",
            m.http1_codecs.clone(),
        );
        registry.register(
            "dpu_proxy_poll_awake_seconds",
            "Seconds the runtime's workers stayed awake in poll mode instead of sleeping, summed over workers",
            m.poll_awake.clone(),
        );
        registry.register_collector(Box::new(ClusterCollector { snapshot }));
        m
    }

    /// Counts a refused connection or request.
    pub fn rejected(&self, workload: &str, reason: &'static str) {
        self.rejections.get_or_create(&RejectionLabels { workload: workload.to_string(), reason }).inc();
    }
}

/// Reads every live cluster's stats at scrape time.
#[derive(Debug)]
struct ClusterCollector {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.load();
        let overflows = Family::<ClusterLabels, Counter>::default();
        let retries = Family::<ClusterLabels, Counter>::default();
        let retry_overflows = Family::<ClusterLabels, Counter>::default();
        let hc_failures = Family::<ClusterLabels, Counter>::default();
        let ep_requests = Family::<EndpointLabels, Counter>::default();
        let ep_failures = Family::<EndpointLabels, Counter>::default();
        let ep_connections = Family::<EndpointLabels, Counter>::default();
        let ep_ejections = Family::<EndpointLabels, Counter>::default();
        let ep_active = Family::<EndpointLabels, Gauge>::default();
        let ep_healthy = Family::<EndpointLabels, Gauge>::default();
        let ep_ejected = Family::<EndpointLabels, Gauge>::default();
        for (source, id, cluster) in snapshot.clusters() {
            let stats = cluster.stats();
            let cl = ClusterLabels { source: source.to_string(), cluster: id.to_string() };
            overflows.get_or_create(&cl).inc_by(stats.overflows);
            retries.get_or_create(&cl).inc_by(stats.retries);
            retry_overflows.get_or_create(&cl).inc_by(stats.retry_overflows);
            hc_failures.get_or_create(&cl).inc_by(stats.health_check_failures);
            for ep in &stats.endpoints {
                let el = EndpointLabels {
                    source: source.to_string(),
                    cluster: id.to_string(),
                    endpoint: ep.address.to_string(),
                    locality: ep.locality.to_string(),
                };
                ep_requests.get_or_create(&el).inc_by(ep.requests);
                ep_failures.get_or_create(&el).inc_by(ep.failures);
                ep_connections.get_or_create(&el).inc_by(ep.connections);
                ep_ejections.get_or_create(&el).inc_by(ep.ejections);
                ep_active.get_or_create(&el).set(i64::try_from(ep.active_requests).unwrap_or(i64::MAX));
                ep_healthy.get_or_create(&el).set(i64::from(ep.active_health));
                ep_ejected.get_or_create(&el).set(i64::from(ep.ejected));
            }
        }
        encode(&mut encoder, "dpu_proxy_cluster_overflows", "Requests refused by a circuit breaker", &overflows)?;
        encode(&mut encoder, "dpu_proxy_cluster_retries", "Retries sent", &retries)?;
        encode(&mut encoder, "dpu_proxy_cluster_retry_overflows", "Retries refused by the budget", &retry_overflows)?;
        encode(&mut encoder, "dpu_proxy_cluster_health_check_failures", "Failed active health checks", &hc_failures)?;
        encode(&mut encoder, "dpu_proxy_endpoint_requests", "Requests sent to an endpoint", &ep_requests)?;
        encode(&mut encoder, "dpu_proxy_endpoint_failures", "Failed requests to an endpoint", &ep_failures)?;
        encode(&mut encoder, "dpu_proxy_endpoint_connections", "Connections opened to an endpoint", &ep_connections)?;
        encode(&mut encoder, "dpu_proxy_endpoint_ejections", "Outlier ejections of an endpoint", &ep_ejections)?;
        encode(&mut encoder, "dpu_proxy_endpoint_active_requests", "Requests in flight", &ep_active)?;
        encode(&mut encoder, "dpu_proxy_endpoint_healthy", "1 when active health checking passes", &ep_healthy)?;
        encode(&mut encoder, "dpu_proxy_endpoint_ejected", "1 while ejected by outlier detection", &ep_ejected)?;
        Ok(())
    }
}

fn encode(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    family: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
    family.encode(metric)
}
