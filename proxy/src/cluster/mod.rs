//! Upstream clusters: the endpoints a route or TCP handler sends to, how one is chosen, and the connections to it.
//!
//! A [`Cluster`] keeps per-endpoint state — operator health, active health (health checks), outlier ejection,
//! outstanding requests, a latency estimate, counters — and a connection pool per endpoint: a stack of idle
//! HTTP/1.1 connections, or one multiplexed HTTP/2 connection. [`Cluster::update`] swaps the configuration in
//! place; endpoints whose address stays keep their state and pools.
//!
//! An endpoint takes new requests only when it is operator-healthy, actively healthy and not ejected. When none
//! is, requests fail with [`UpstreamError::NoHealthyEndpoint`]: there is no Envoy-style panic mode that would send
//! to unhealthy endpoints anyway, because a shared proxy must not turn one tenant's outage into load on endpoints
//! known to be failing.
//!
//! Balancing: smooth weighted round robin, power-of-two-choices least request (`(active + 1) × latency EWMA /
//! weight`), a ketama ring keyed by endpoint address (hashing the configured header's first value or the source
//! address; a request without the header is balanced by weighted random), or weighted random.
//!
//! Active health checks start from "healthy": a freshly configured cluster serves at once, and an endpoint goes out
//! of rotation after `unhealthy_threshold` failed checks (Envoy starts endpoints unhealthy instead, so a new
//! cluster would serve nothing until the first round completes).

mod breaker;
mod connect;
mod health;
mod lb;
mod outlier;
mod pool;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::Body;
use crate::model::{
    ClusterSpec, Endpoint, EndpointHealth, HashOn, HealthCheck, OutlierDetection, RetryPolicy, UpstreamProtocol,
};

pub use breaker::RetryPermit;
pub use connect::UpstreamStream;

use breaker::{Breaker, Resource};
use lb::{Balancer, Members};
use outlier::{Outcome, OutlierState};

/// Endpoints a failed L4 connect tries in all (the first pick and up to two others).
const CONNECT_ATTEMPTS: usize = 3;
/// Weight of a new sample in the latency moving average.
const EWMA_ALPHA: f64 = 0.3;
/// Why connections of a cluster whose TLS client configuration is missing fail.
const TLS_MISSING: &str = "the cluster requires TLS but has no client configuration; refusing to connect in plaintext";

/// A set of endpoints with load balancing, connection pools, circuit breaking, outlier detection and active health
/// checking. Shared as `Arc<Cluster>`; background tasks stop when it is dropped.
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<Tasks>,
}

/// The background tasks of a cluster, with the configuration each was started for.
#[derive(Debug, Default)]
struct Tasks {
    health: Option<(HealthCheck, JoinHandle<()>)>,
    reaper: Option<(Duration, JoinHandle<()>)>,
}

/// What the cluster's requests, connections and background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    id: String,
    config: ArcSwap<Config>,
    breaker: Arc<Breaker>,
    health_check_failures: AtomicU64,
    /// Serialises ejection decisions, so concurrent failures cannot exceed `max_ejection_percent` together.
    eject_lock: Mutex<()>,
}

/// One configuration of the cluster; replaced whole by `update`.
#[derive(Debug)]
pub(crate) struct Config {
    protocol: UpstreamProtocol,
    members: Vec<Member>,
    balancer: Balancer,
    /// The config as given (compared on update) and the one used, with the protocol's ALPN.
    tls_given: Option<Arc<rustls::ClientConfig>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The spec asks for TLS but no client config was supplied: connections fail rather than go out in plaintext.
    tls_missing: bool,
    sni: String,
    /// Hand sessions to the kernel under this policy ([`crate::ktls`]); `None`: userspace records.
    kernel_tls: Option<dpu_crypto::policy::Policy>,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    outlier: Option<OutlierDetection>,
    health_check: Option<HealthCheck>,
}

#[derive(Debug)]
pub(crate) struct Member {
    spec: Endpoint,
    state: Arc<EndpointState>,
}

/// Live state of one endpoint, kept across updates while its address stays in the cluster.
#[derive(Debug)]
pub(crate) struct EndpointState {
    address: SocketAddr,
    active_healthy: AtomicBool,
    health: Mutex<health::Counters>,
    /// Milliseconds on [`now_ms`]'s clock until which the endpoint is ejected; `0`: never ejected.
    ejected_until: AtomicU64,
    outlier: Mutex<OutlierState>,
    ejections: AtomicU64,
    active_requests: AtomicU64,
    /// Latency moving average in microseconds, as `f64` bits; `0.0`: no sample yet.
    ewma_us: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    connections: AtomicU64,
    pool: pool::Pool,
}

/// Response extension naming the endpoint that answered (for access logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamEndpoint(pub SocketAddr);

/// Inputs of load balancing for one request or connection.
#[derive(Debug, Clone, Copy)]
pub struct LbContext<'a> {
    /// The downstream peer's address (ring hash on `source_ip`).
    pub source: IpAddr,
    /// The request's headers (ring hash on a header); `None` for L4.
    pub headers: Option<&'a http::HeaderMap>,
}

/// Why an upstream request or connection failed, with the Envoy response flag it maps to.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the cluster's {limit} circuit breaker is open")]
    Overflow { limit: &'static str },
    #[error("the cluster has no healthy endpoint")]
    NoHealthyEndpoint,
    #[error("connecting to {endpoint} failed")]
    ConnectFailure { endpoint: SocketAddr, source: std::io::Error },
    #[error("connecting to {endpoint} timed out")]
    ConnectTimeout { endpoint: SocketAddr },
    #[error("TLS with {endpoint} failed: {message}")]
    Tls { endpoint: SocketAddr, message: String },
    #[error("{endpoint} closed or reset the connection before responding: {message}")]
    Reset { endpoint: SocketAddr, message: String },
}

impl UpstreamError {
    /// Envoy's response flag: `UO` (overflow), `UH` (no healthy upstream), `UF` (connection failure), `UR` (reset).
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::Overflow { .. } => "UO",
            UpstreamError::NoHealthyEndpoint => "UH",
            UpstreamError::ConnectFailure { .. } | UpstreamError::ConnectTimeout { .. } | UpstreamError::Tls { .. } => {
                "UF"
            }
            UpstreamError::Reset { .. } => "UR",
        }
    }

    /// The connection to an endpoint could not be established, so nothing of the request was sent: retrying is
    /// safe for any method. (Overflow and no-healthy-endpoint also sent nothing, but retrying them adds load where
    /// the cluster has none to give, so they are not connect failures.)
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectFailure { .. } | UpstreamError::ConnectTimeout { .. } | UpstreamError::Tls { .. }
        )
    }

    /// The endpoint involved, when one was chosen.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            UpstreamError::Overflow { .. } | UpstreamError::NoHealthyEndpoint => None,
            UpstreamError::ConnectFailure { endpoint, .. }
            | UpstreamError::ConnectTimeout { endpoint }
            | UpstreamError::Tls { endpoint, .. }
            | UpstreamError::Reset { endpoint, .. } => Some(*endpoint),
        }
    }
}

/// Counters and state of a cluster, for the config dump and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterStats {
    pub endpoints: Vec<EndpointStats>,
    /// Requests and connections refused by a circuit-breaker limit.
    pub overflows: u64,
    /// Retries admitted by [`Cluster::admit_retry`].
    pub retries: u64,
    /// Retries refused by the retry budget or `max_retries`.
    pub retry_overflows: u64,
    pub health_check_failures: u64,
    /// Open upstream connections.
    pub active_connections: u64,
    /// Requests waiting for a connection.
    pub pending_requests: u64,
    /// Requests whose response has not finished.
    pub active_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointStats {
    pub address: SocketAddr,
    pub locality: String,
    pub admin_health: EndpointHealth,
    pub active_health: bool,
    pub ejected: bool,
    /// Times ejected by outlier detection.
    pub ejections: u64,
    /// HTTP requests whose response has not finished, plus open L4 streams.
    pub active_requests: u64,
    /// HTTP requests sent and L4 streams opened.
    pub requests: u64,
    /// Connect failures, resets and 5xx responses.
    pub failures: u64,
    /// Connections opened.
    pub connections: u64,
}

/// Counts one request (or L4 stream) as active on an endpoint until dropped.
#[derive(Debug)]
pub(crate) struct ActiveRequest {
    endpoint: Arc<EndpointState>,
}

impl ActiveRequest {
    fn new(endpoint: &Arc<EndpointState>) -> ActiveRequest {
        endpoint.active_requests.fetch_add(1, Ordering::AcqRel);
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        ActiveRequest { endpoint: Arc::clone(endpoint) }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.endpoint.active_requests.fetch_sub(1, Ordering::AcqRel);
        self.endpoint.pool.touch();
    }
}

/// Milliseconds since the first call, never `0` (which marks "not ejected").
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

impl Cluster {
    /// Needs a tokio runtime: spawns active health checking when configured (task ends when the Cluster drops).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn new(id: &str, spec: &ClusterSpec, tls: Option<Arc<rustls::ClientConfig>>) -> Arc<Cluster> {
        let config = Config::build(spec, tls, &HashMap::new());
        config.warn_if_tls_missing(id);
        let shared = Arc::new(Shared {
            id: id.to_owned(),
            config: ArcSwap::from_pointee(config),
            breaker: Breaker::new(&spec.circuit_breaker),
            health_check_failures: AtomicU64::new(0),
            eject_lock: Mutex::new(()),
        });
        let cluster = Cluster { shared, runtime: tokio::runtime::Handle::current(), tasks: Mutex::default() };
        cluster.sync_tasks();
        Arc::new(cluster)
    }

    /// Applies a changed spec in place: endpoints kept (same address) keep pools, health and outlier state.
    ///
    /// Pools are emptied when the protocol or the TLS settings change (connections in use finish on the old
    /// settings); removing the health check or outlier detection puts every endpoint back in rotation.
    pub fn update(&self, spec: &ClusterSpec, tls: Option<Arc<rustls::ClientConfig>>) {
        let old = self.shared.config.load_full();
        let kept: HashMap<SocketAddr, Arc<EndpointState>> =
            old.members.iter().map(|m| (m.spec.address, Arc::clone(&m.state))).collect();
        let config = Config::build(spec, tls, &kept);
        config.warn_if_tls_missing(&self.shared.id);
        let transport_changed = old.protocol != config.protocol
            || old.sni != config.sni
            || old.kernel_tls != config.kernel_tls
            || match (&old.tls_given, &config.tls_given) {
                (None, None) => false,
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                _ => true,
            };
        for member in &config.members {
            if transport_changed {
                member.state.pool.clear();
            }
            if config.health_check.is_none() {
                member.state.active_healthy.store(true, Ordering::Relaxed);
            }
            if config.outlier.is_none() {
                member.state.ejected_until.store(0, Ordering::Relaxed);
            }
        }
        self.shared.breaker.set_limits(&spec.circuit_breaker);
        self.shared.config.store(Arc::new(config));
        self.sync_tasks();
        tracing::debug!(cluster = %self.shared.id, endpoints = spec.endpoints.len(), "cluster updated");
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.shared.config.load().protocol
    }

    /// L4: pick an endpoint and connect (connect timeout, max_connections, SO_MARK=UPSTREAM_MARK, TLS if set).
    /// A failed connect feeds outlier detection and tries up to 2 other endpoints before giving up.
    ///
    /// The stream counts as an active request on its endpoint (least-request balancing) and holds a
    /// `max_connections` slot until dropped.
    pub async fn connect(&self, ctx: &LbContext<'_>) -> Result<UpstreamStream, UpstreamError> {
        let cfg = self.shared.config.load_full();
        let mut tried = Vec::with_capacity(CONNECT_ATTEMPTS);
        let mut last_error = None;
        for _ in 0..CONNECT_ATTEMPTS {
            let Some(index) = self.shared.pick(&cfg, ctx, &tried) else { break };
            if cfg.tls_missing {
                return Err(UpstreamError::Tls {
                    endpoint: cfg.members[index].spec.address,
                    message: TLS_MISSING.into(),
                });
            }
            let slot = self.shared.breaker.acquire(Resource::Connections)?;
            let member = &cfg.members[index];
            let span =
                tracing::debug_span!("upstream_connect", cluster = %self.shared.id, endpoint = %member.spec.address);
            match self.shared.open(&cfg, &member.state).instrument(span).await {
                Ok(stream) => {
                    self.shared.report(&cfg, index, Outcome::Success);
                    return Ok(stream.hold(Some(slot), Some(ActiveRequest::new(&member.state))));
                }
                Err(e) => {
                    tracing::debug!(cluster = %self.shared.id, error = %e, "upstream connect failed");
                    self.shared.report(&cfg, index, Outcome::LocalFailure);
                    tried.push(index);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or(UpstreamError::NoHealthyEndpoint))
    }

    /// L7, one try: pick an endpoint, send on a pooled connection (HTTP/1.1 keep-alive pool or one multiplexed
    /// HTTP/2 connection per endpoint), resolve at response headers. Enforces max_pending_requests,
    /// max_requests, max_connections; records latency and status for load balancing and outlier detection.
    /// The request's headers go out as given (Host / :authority preserved — for HTTP/2 the URI authority is set
    /// from the Host header); the response body is wrapped so the connection returns to the pool, and the
    /// request stops counting as active, when the body ends or is dropped.
    ///
    /// A `Tcp` cluster is spoken to as HTTP/1.1.
    pub async fn send(
        &self,
        req: http::Request<Body>,
        ctx: &LbContext<'_>,
    ) -> Result<http::Response<Body>, UpstreamError> {
        let shared = &self.shared;
        let cfg = shared.config.load_full();
        let request_slot = shared.breaker.acquire(Resource::Requests)?;
        let index = shared.pick(&cfg, ctx, &[]).ok_or(UpstreamError::NoHealthyEndpoint)?;
        let endpoint = Arc::clone(&cfg.members[index].state);
        if cfg.tls_missing {
            return Err(UpstreamError::Tls { endpoint: endpoint.address, message: TLS_MISSING.into() });
        }
        let active = ActiveRequest::new(&endpoint);
        let span = tracing::debug_span!("upstream_request", cluster = %shared.id, endpoint = %endpoint.address);
        let started = Instant::now();
        let sent = match cfg.protocol {
            UpstreamProtocol::Http2 => pool::send_http2(shared, &cfg, &endpoint, req).instrument(span).await,
            UpstreamProtocol::Http1 | UpstreamProtocol::Tcp => {
                pool::send_http1(shared, &cfg, &endpoint, req).instrument(span).await
            }
        };
        match sent {
            Ok((response, reuse)) => {
                endpoint.record_latency(started.elapsed());
                shared.report(&cfg, index, Outcome::Status(response.status().as_u16()));
                let mut response = pool::wrap_response(response, request_slot, active, reuse);
                response.extensions_mut().insert(UpstreamEndpoint(endpoint.address));
                Ok(response)
            }
            Err(e) => {
                if e.endpoint().is_some() {
                    shared.report(&cfg, index, Outcome::LocalFailure);
                }
                Err(e)
            }
        }
    }

    /// Retry admission: `Some` when the retry budget (percent of active requests, min concurrency) and
    /// circuit_breaker.max_retries allow; hold the permit while the retry is outstanding.
    pub fn admit_retry(&self, policy: &RetryPolicy) -> Option<RetryPermit> {
        self.shared.breaker.admit_retry(policy)
    }

    pub fn stats(&self) -> ClusterStats {
        let cfg = self.shared.config.load();
        let now = now_ms();
        let breaker = &self.shared.breaker;
        ClusterStats {
            endpoints: cfg
                .members
                .iter()
                .map(|m| {
                    let s = &m.state;
                    EndpointStats {
                        address: m.spec.address,
                        locality: m.spec.locality.clone(),
                        admin_health: m.spec.health,
                        active_health: s.active_healthy.load(Ordering::Relaxed),
                        ejected: s.ejected_until.load(Ordering::Relaxed) > now,
                        ejections: s.ejections.load(Ordering::Relaxed),
                        active_requests: s.active_requests.load(Ordering::Relaxed),
                        requests: s.requests.load(Ordering::Relaxed),
                        failures: s.failures.load(Ordering::Relaxed),
                        connections: s.connections.load(Ordering::Relaxed),
                    }
                })
                .collect(),
            overflows: breaker.overflows.load(Ordering::Relaxed),
            retries: breaker.retries.load(Ordering::Relaxed),
            retry_overflows: breaker.retry_overflows.load(Ordering::Relaxed),
            health_check_failures: self.shared.health_check_failures.load(Ordering::Relaxed),
            active_connections: breaker.active(Resource::Connections),
            pending_requests: breaker.active(Resource::Pending),
            active_requests: breaker.active(Resource::Requests),
        }
    }

    /// Starts, restarts or stops the health checker and the idle-connection reaper to match the configuration.
    fn sync_tasks(&self) {
        let cfg = self.shared.config.load_full();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.health.as_ref().map(|(hc, _)| hc) != cfg.health_check.as_ref() {
            if let Some((_, task)) = tasks.health.take() {
                task.abort();
            }
            if let Some(hc) = &cfg.health_check {
                let task = self.runtime.spawn(health::run(Arc::clone(&self.shared), hc.clone()));
                tasks.health = Some((hc.clone(), task));
            }
        }
        if tasks.reaper.as_ref().map(|(idle, _)| *idle) != cfg.idle_timeout {
            if let Some((_, task)) = tasks.reaper.take() {
                task.abort();
            }
            if let Some(idle) = cfg.idle_timeout {
                let task = self.runtime.spawn(pool::reap_idle(Arc::clone(&self.shared), idle));
                tasks.reaper = Some((idle, task));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in [tasks.health.take().map(|t| t.1), tasks.reaper.take().map(|t| t.1)].into_iter().flatten() {
            task.abort();
        }
    }
}

impl Config {
    /// Compiles a spec; endpoints found in `kept` reuse that state.
    fn build(
        spec: &ClusterSpec,
        tls: Option<Arc<rustls::ClientConfig>>,
        kept: &HashMap<SocketAddr, Arc<EndpointState>>,
    ) -> Config {
        let members: Vec<Member> = spec
            .endpoints
            .iter()
            .map(|ep| Member {
                spec: ep.clone(),
                state: kept.get(&ep.address).cloned().unwrap_or_else(|| Arc::new(EndpointState::new(ep.address))),
            })
            .collect();
        let weights: Vec<(SocketAddr, u32)> = members.iter().map(|m| (m.spec.address, m.spec.weight)).collect();
        Config {
            protocol: spec.protocol,
            balancer: Balancer::new(&spec.lb, &weights),
            members,
            tls: tls.as_ref().map(|config| with_alpn(config, spec.protocol)),
            tls_missing: spec.tls.is_some() && tls.is_none(),
            tls_given: tls,
            sni: spec.tls.as_ref().map(|t| t.sni.clone()).unwrap_or_default(),
            kernel_tls: spec.tls.as_ref().and_then(|t| t.kernel_tls),
            connect_timeout: Duration::from_millis(u64::from(spec.connect_timeout_ms.max(1))),
            idle_timeout: (spec.idle_timeout_ms != 0).then(|| Duration::from_millis(u64::from(spec.idle_timeout_ms))),
            outlier: spec.outlier_detection,
            health_check: spec.health_check.clone(),
        }
    }
}

impl Config {
    fn warn_if_tls_missing(&self, cluster: &str) {
        if self.tls_missing {
            tracing::warn!(%cluster, "{TLS_MISSING}");
        }
    }
}

/// The client config with the ALPN list of the cluster's protocol (`h2` or `http/1.1`); TCP clusters keep what
/// they were given. Cloning keeps the verifier and certificate resolver, so rotation still applies.
fn with_alpn(config: &Arc<rustls::ClientConfig>, protocol: UpstreamProtocol) -> Arc<rustls::ClientConfig> {
    let alpn: &[u8] = match protocol {
        UpstreamProtocol::Tcp => return Arc::clone(config),
        UpstreamProtocol::Http1 => b"http/1.1",
        UpstreamProtocol::Http2 => b"h2",
    };
    if config.alpn_protocols.len() == 1 && config.alpn_protocols[0] == alpn {
        return Arc::clone(config);
    }
    let mut config = (**config).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

impl EndpointState {
    fn new(address: SocketAddr) -> EndpointState {
        EndpointState {
            address,
            active_healthy: AtomicBool::new(true),
            health: Mutex::default(),
            ejected_until: AtomicU64::new(0),
            outlier: Mutex::default(),
            ejections: AtomicU64::new(0),
            active_requests: AtomicU64::new(0),
            ewma_us: AtomicU64::new(0f64.to_bits()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            pool: pool::Pool::default(),
        }
    }

    fn record_latency(&self, latency: Duration) {
        let sample = latency.as_secs_f64() * 1e6;
        let old = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let new = if old <= 0.0 { sample } else { old + EWMA_ALPHA * (sample - old) };
        self.ewma_us.store(new.to_bits(), Ordering::Relaxed);
    }

    /// `(active + 1) × latency`; an endpoint without samples counts as 1 µs, so new endpoints are tried early.
    fn load(&self) -> f64 {
        let active = self.active_requests.load(Ordering::Relaxed) as f64;
        (active + 1.0) * f64::from_bits(self.ewma_us.load(Ordering::Relaxed)).max(1.0)
    }
}

/// The balancer's view of a configuration's members at one instant.
struct View<'a> {
    members: &'a [Member],
    now: u64,
    exclude: &'a [usize],
}

impl Members for View<'_> {
    fn len(&self) -> usize {
        self.members.len()
    }
    fn weight(&self, i: usize) -> u32 {
        self.members[i].spec.weight
    }
    fn available(&self, i: usize) -> bool {
        let m = &self.members[i];
        m.spec.health == EndpointHealth::Healthy
            && m.state.active_healthy.load(Ordering::Relaxed)
            && m.state.ejected_until.load(Ordering::Relaxed) <= self.now
            && !self.exclude.contains(&i)
    }
    fn load(&self, i: usize) -> f64 {
        self.members[i].state.load()
    }
}

impl Shared {
    fn pick(&self, cfg: &Config, ctx: &LbContext<'_>, exclude: &[usize]) -> Option<usize> {
        let key = cfg.balancer.hash_on().and_then(|hash_on| match hash_on {
            HashOn::SourceIp => Some(match ctx.source {
                IpAddr::V4(ip) => lb::hash_bytes(&ip.octets()),
                IpAddr::V6(ip) => lb::hash_bytes(&ip.octets()),
            }),
            HashOn::Header { name } => ctx.headers?.get(name.as_str()).map(|v| lb::hash_bytes(v.as_bytes())),
        });
        cfg.balancer.pick(&View { members: &cfg.members, now: now_ms(), exclude }, key)
    }

    /// Opens a connection to an endpoint: TCP, then TLS when configured. Counts it on the endpoint.
    async fn open(&self, cfg: &Config, endpoint: &EndpointState) -> Result<UpstreamStream, UpstreamError> {
        let address = endpoint.address;
        if cfg.tls_missing {
            return Err(UpstreamError::Tls { endpoint: address, message: TLS_MISSING.into() });
        }
        let tcp = connect::tcp(address, cfg.connect_timeout).await?;
        endpoint.connections.fetch_add(1, Ordering::Relaxed);
        match &cfg.tls {
            None => Ok(UpstreamStream::plain(address, tcp)),
            Some(tls) => {
                let for_kernel = cfg.kernel_tls.is_some();
                let stream =
                    connect::tls(tcp, address, Arc::clone(tls), &cfg.sni, cfg.connect_timeout, for_kernel).await?;
                UpstreamStream::handover(address, stream, &self.id, cfg.kernel_tls)
            }
        }
    }

    /// Feeds an outcome to the endpoint's counters and outlier detection; ejects when a threshold is reached and
    /// `max_ejection_percent` allows.
    fn report(&self, cfg: &Config, index: usize, outcome: Outcome) {
        let state = &cfg.members[index].state;
        if outcome.is_failure() {
            state.failures.fetch_add(1, Ordering::Relaxed);
        }
        let Some(od) = &cfg.outlier else { return };
        let tripped = state.outlier.lock().unwrap_or_else(|e| e.into_inner()).record(outcome, od);
        if !tripped {
            return;
        }
        let _decision = self.eject_lock.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        if state.ejected_until.load(Ordering::Relaxed) > now {
            return;
        }
        let ejected = cfg.members.iter().filter(|m| m.state.ejected_until.load(Ordering::Relaxed) > now).count();
        let allowed = outlier::max_ejected(cfg.members.len(), od.max_ejection_percent);
        if ejected >= allowed {
            tracing::debug!(
                cluster = %self.id, endpoint = %state.address, ejected, allowed,
                "endpoint keeps failing but max_ejection_percent is reached; not ejecting"
            );
            return;
        }
        let duration = state.outlier.lock().unwrap_or_else(|e| e.into_inner()).eject(od, now);
        let until = now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        state.ejected_until.store(until, Ordering::Relaxed);
        let ejections = state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            cluster = %self.id, endpoint = %state.address, ejection_ms = duration.as_millis() as u64, ejections,
            "endpoint ejected after consecutive failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::model::{CircuitBreaker, LbPolicy};

    /// An HTTP/1.1 backend answering every request with 64 KiB.
    async fn backend() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(vec![b'x'; 64 << 10]))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn spec(addr: SocketAddr) -> ClusterSpec {
        ClusterSpec {
            protocol: UpstreamProtocol::Http1,
            endpoints: vec![Endpoint {
                address: addr,
                weight: 1,
                locality: String::new(),
                health: EndpointHealth::Healthy,
            }],
            lb: LbPolicy::LeastRequest,
            connect_timeout_ms: 1000,
            idle_timeout_ms: 0,
            circuit_breaker: CircuitBreaker::default(),
            health_check: None,
            outlier_detection: None,
            tls: None,
        }
    }

    fn request() -> http::Request<Body> {
        let body = http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
        http::Request::get("/").header("host", "web.example").body(body).unwrap()
    }

    fn idle(cluster: &Cluster) -> usize {
        cluster.shared.config.load().members[0].state.pool.idle_len()
    }

    fn ctx() -> LbContext<'static> {
        LbContext { source: IpAddr::from([127, 0, 0, 1]), headers: None }
    }

    #[tokio::test]
    async fn connections_return_to_the_pool_only_when_the_body_ends() {
        let cluster = Cluster::new("web", &spec(backend().await), None);
        let response = cluster.send(request(), &ctx()).await.unwrap();
        assert_eq!(idle(&cluster), 0, "in use while the body is unread");
        response.into_body().collect().await.unwrap();
        assert_eq!(idle(&cluster), 1);

        let mut body = cluster.send(request(), &ctx()).await.unwrap().into_body();
        assert_eq!(idle(&cluster), 0);
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(idle(&cluster), 0, "a body dropped early does not give its connection back");
    }

    #[tokio::test]
    async fn a_transport_change_empties_the_pool() {
        let addr = backend().await;
        let cluster = Cluster::new("web", &spec(addr), None);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(cluster.send(request(), &ctx()).await.unwrap());
        }
        for response in held.drain(..1) {
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(idle(&cluster), 1);
        // Same transport: the pool stays.
        cluster.update(&spec(addr), None);
        assert_eq!(idle(&cluster), 1);
        let mut h2 = spec(addr);
        h2.protocol = UpstreamProtocol::Http2;
        cluster.update(&h2, None);
        assert_eq!(idle(&cluster), 0);
        // Connections of the old generation finishing now are not pooled.
        for response in held {
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(idle(&cluster), 0);
    }

    #[test]
    fn clusters_and_their_futures_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<Cluster>();
        send_sync::<UpstreamStream>();
        send_sync::<RetryPermit>();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _guard = runtime.enter();
        let cluster = Cluster::new("web", &spec("127.0.0.1:9".parse().unwrap()), None);
        let headers = http::HeaderMap::new();
        let ctx = LbContext { source: IpAddr::from([127, 0, 0, 1]), headers: Some(&headers) };
        send(&cluster.send(request(), &ctx));
        send(&cluster.connect(&ctx));
    }

    #[tokio::test]
    async fn removing_outlier_detection_readmits_ejected_endpoints() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut s = spec(addr);
        s.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: 1,
            consecutive_gateway_errors: 0,
            base_ejection_ms: 60_000,
            max_ejection_percent: 100,
        });
        let cluster = Cluster::new("web", &s, None);
        let cfg = cluster.shared.config.load_full();
        cluster.shared.report(&cfg, 0, Outcome::Status(500));
        assert!(cluster.stats().endpoints[0].ejected);
        cluster.update(&spec(addr), None);
        assert!(!cluster.stats().endpoints[0].ejected);
    }

    #[test]
    fn latency_average_moves_towards_samples() {
        let ep = EndpointState::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(ep.load(), 1.0, "no sample: optimistic");
        ep.record_latency(Duration::from_millis(10));
        assert_eq!(ep.load(), 10_000.0);
        ep.record_latency(Duration::from_millis(20));
        assert!((ep.load() - 13_000.0).abs() < 1e-6);
        ep.active_requests.store(3, Ordering::Relaxed);
        assert!((ep.load() - 52_000.0).abs() < 1e-6);
    }
}
