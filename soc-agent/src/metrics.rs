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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Volume {
    volume: String,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    api_requests: Family<MethodRole, Counter>,
    api_denied: Family<Method, Counter>,
    reconcile_passes: Family<Subsystem, Gauge>,
    reconcile_changes: Family<Subsystem, Gauge>,
    reconcile_errors: Family<Subsystem, Gauge>,
    /// Per-volume I/O counters of the storage target, read from its statistics at scrape time.
    volume_ops: Family<VolumeOp, Gauge>,
    volume_bytes: Family<VolumeOp, Gauge>,
    volume_errors: Family<Volume, Gauge>,
    /// The image chunk cache, and per-image fetch counters, read at scrape time.
    image_cache: Family<CacheCounter, Gauge>,
    image_fetch: Family<ImageCounter, Gauge>,
    image_fetch_seconds: Family<Image, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Bytes each encrypted volume's cipher processed, labelled with the engine that did it.
    crypto_volume_bytes: Family<CryptoVolume, Gauge>,
    ipsec_bytes: Family<IpsecSa, Gauge>,
    ipsec_packets: Family<IpsecSa, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IpsecSa {
    tunnel: String,
    direction: &'static str,
    engine: String,
    hardware: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CryptoVolume {
    volume: String,
    engine: &'static str,
    hardware: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheCounter {
    counter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageCounter {
    image: String,
    counter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Image {
    image: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeOp {
    volume: String,
    op: &'static str,
}

/// Handle to the agent's metric families; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// Registers every family. `start_time` is the process start in seconds since the epoch.
    pub fn new(start_time: f64) -> Self {
        Self::with_data_paths(start_time, |_| {})
    }

    /// Registers the agent's families (prefixed `dpu_`) and lets data paths register theirs in the same
    /// registry under their own names (the proxy's follow Istio's, unprefixed).
    pub fn with_data_paths(start_time: f64, register: impl FnOnce(&mut Registry)) -> Self {
        let mut root = Registry::default();
        register(&mut root);
        let registry = root.sub_registry_with_prefix("dpu");
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
        let volume_ops = Family::<VolumeOp, Gauge>::default();
        registry.register("storage_volume_ops", "I/O commands completed per volume since start", volume_ops.clone());
        let volume_bytes = Family::<VolumeOp, Gauge>::default();
        registry.register("storage_volume_bytes", "Bytes read or written per volume since start", volume_bytes.clone());
        let crypto_volume_bytes = Family::<CryptoVolume, Gauge>::default();
        registry.register(
            "crypto_volume_bytes",
            "Bytes encrypted or decrypted per encrypted volume, by the engine that did it (hardware: an offload engine)",
            crypto_volume_bytes.clone(),
        );
        let ipsec_bytes = Family::<IpsecSa, Gauge>::default();
        registry.register(
            "ipsec_sa_bytes",
            "Bytes through each IPsec tunnel's ESP state per direction, as the kernel counts them, by the engine",
            ipsec_bytes.clone(),
        );
        let ipsec_packets = Family::<IpsecSa, Gauge>::default();
        registry.register(
            "ipsec_sa_packets",
            "Packets through each IPsec tunnel's ESP state per direction, as the kernel counts them",
            ipsec_packets.clone(),
        );
        let volume_errors = Family::<Volume, Gauge>::default();
        registry.register("storage_volume_errors", "Failed I/O commands per volume since start", volume_errors.clone());
        let image_cache = Family::<CacheCounter, Gauge>::default();
        registry.register(
            "image_cache",
            "Image chunk cache: hits, misses, evicted and corrupt chunks since start; chunks, used_bytes, capacity_bytes now",
            image_cache.clone(),
        );
        let image_fetch = Family::<ImageCounter, Gauge>::default();
        registry.register(
            "image_fetch",
            "Per image since start: registry requests (fetches), bytes fetched, failed requests, corrupt chunks, reads failed to the host",
            image_fetch.clone(),
        );
        let image_fetch_seconds = Family::<Image, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "image_fetch_seconds",
            "Per image: total latency of successful registry requests (divide by fetches for the mean)",
            image_fetch_seconds.clone(),
        );
        Self(Arc::new(Inner {
            registry: root,
            api_requests,
            api_denied,
            reconcile_passes,
            reconcile_changes,
            reconcile_errors,
            volume_ops,
            volume_bytes,
            volume_errors,
            crypto_volume_bytes,
            ipsec_bytes,
            ipsec_packets,
            image_cache,
            image_fetch,
            image_fetch_seconds,
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

    /// Publishes one volume's I/O counters.
    pub fn storage_volume(&self, volume: &str, stats: &dpu_storage::bdev::VolumeStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let op = |op| VolumeOp { volume: volume.to_owned(), op };
        for (name, count) in
            [("read", &stats.reads), ("write", &stats.writes), ("flush", &stats.flushes), ("discard", &stats.discards)]
        {
            self.0.volume_ops.get_or_create(&op(name)).set(gauge(count.load(Relaxed)));
        }
        self.0.volume_bytes.get_or_create(&op("read")).set(gauge(stats.read_bytes.load(Relaxed)));
        self.0.volume_bytes.get_or_create(&op("write")).set(gauge(stats.written_bytes.load(Relaxed)));
        self.0
            .volume_errors
            .get_or_create(&Volume { volume: volume.to_owned() })
            .set(gauge(stats.errors.load(Relaxed)));
    }

    /// Publishes the encrypted volumes' cipher counters.
    pub fn crypto_volumes(&self, volumes: &dpu_storage::bdev::EncryptedVolumes) {
        for (volume, engine, encrypted, decrypted) in volumes.snapshot() {
            for (direction, bytes) in [("encrypt", encrypted), ("decrypt", decrypted)] {
                let labels =
                    CryptoVolume { volume: volume.clone(), engine: engine.name(), hardware: "false", direction };
                self.0.crypto_volume_bytes.get_or_create(&labels).set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
    }

    /// Publishes the IPsec tunnels' ESP state counters (an xfrm dump; blocking).
    pub fn ipsec_tunnels(&self, tunnels: &dpu_fabric::ipsec::Tunnels) {
        let counters = match tunnels.counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "reading the xfrm states for metrics failed");
                return;
            }
        };
        for (tunnel, direction, bytes, packets) in counters {
            let placement = tunnels.get(&tunnel).map(|t| t.placement);
            let labels = IpsecSa {
                tunnel,
                direction,
                engine: placement.as_ref().map(|p| p.engine.clone()).unwrap_or_default(),
                hardware: if placement.is_some_and(|p| p.hardware) { "true" } else { "false" },
            };
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.0.ipsec_bytes.get_or_create(&labels).set(gauge(bytes));
            self.0.ipsec_packets.get_or_create(&labels).set(gauge(packets));
        }
    }

    /// Publishes the image chunk cache's counters.
    pub fn image_cache(&self, cache: &dpu_storage::image::cache::ChunkCache) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = cache.stats();
        for (counter, value) in [
            ("hits", stats.hits.load(Relaxed)),
            ("misses", stats.misses.load(Relaxed)),
            ("evicted", stats.evicted.load(Relaxed)),
            ("corrupt", stats.corrupt.load(Relaxed)),
            ("inserted_bytes", stats.inserted_bytes.load(Relaxed)),
            ("chunks", cache.len() as u64),
            ("used_bytes", cache.used_bytes()),
            ("capacity_bytes", cache.capacity_bytes()),
        ] {
            self.0.image_cache.get_or_create(&CacheCounter { counter }).set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// Publishes one image's fetch counters, summed over its layers.
    pub fn image_fetches(&self, image: &str, layers: &[dpu_storage::image::reconcile::ResolvedLayer]) {
        use std::sync::atomic::Ordering::Relaxed;
        let sum = |f: fn(&dpu_storage::image::lazy::LazyStats) -> &std::sync::atomic::AtomicU64| {
            layers.iter().map(|l| f(l.volume.stats()).load(Relaxed)).sum::<u64>()
        };
        for (counter, value) in [
            ("fetches", sum(|s| &s.fetches)),
            ("fetched_bytes", sum(|s| &s.fetched_bytes)),
            ("fetch_errors", sum(|s| &s.fetch_errors)),
            ("corrupt_chunks", sum(|s| &s.corrupt_chunks)),
            ("failed_reads", sum(|s| &s.failed_reads)),
            ("chunk_hits", sum(|s| &s.chunk_hits)),
            ("chunk_misses", sum(|s| &s.chunk_misses)),
        ] {
            let key = ImageCounter { image: image.to_owned(), counter };
            self.0.image_fetch.get_or_create(&key).set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let seconds = sum(|s| &s.fetch_micros) as f64 / 1e6;
        self.0.image_fetch_seconds.get_or_create(&Image { image: image.to_owned() }).set(seconds);
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
        let stats = dpu_storage::bdev::VolumeStats::default();
        stats.record(dpu_storage::bdev::IoKind::Read, 4096, 10, true);
        metrics.storage_volume("images", &stats);
        let text = metrics.encode();
        assert!(text.contains("dpu_storage_volume_ops{volume=\"images\",op=\"read\"} 1"), "{text}");
        assert!(text.contains("dpu_storage_volume_bytes{volume=\"images\",op=\"read\"} 4096"), "{text}");
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
