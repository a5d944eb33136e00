//! Validated mesh intent (`dpu-mesh`): what the API (or an xDS control plane) asked the proxy to do. Every type here is plain
//! data — serde for the intent store, `validate` naming the offending field — and carries no runtime state.
//! Cross-references between objects (a listener naming a route table, a route naming a cluster) are checked when
//! a snapshot is assembled by the proxy, because objects arrive one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

pub use dpu_crypto::policy::Policy;
use dpu_intent::{Invalid, Resource, invalid};
use serde::{Deserialize, Serialize};

/// The limits of header names and values we accept in intent (matches, rewrites); far above anything sane.
const MAX_HEADER_VALUE: usize = 8 * 1024;

// ---------------------------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------------------------

/// A SPIFFE ID of the Istio shape `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, String> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| format!("{s:?} does not start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(format!("{s:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"));
        };
        // SPIFFE: trust domain is lowercase letters, digits, '.', '-', '_'; path segments are
        // letters, digits, '.', '-', '_' and not '.' or '..'.
        let td_ok = !td.is_empty()
            && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
        if !td_ok {
            return Err(format!("trust domain {td:?} must be lowercase letters, digits, '.', '-' or '_'"));
        }
        for seg in [ns, sa] {
            let ok = !seg.is_empty()
                && *seg != "."
                && *seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err(format!("path segment {seg:?} must be letters, digits, '.', '-' or '_'"));
            }
        }
        if s.len() > 2048 {
            return Err("longer than 2048 bytes".into());
        }
        Ok(SpiffeId { trust_domain: (*td).into(), namespace: (*ns).into(), service_account: (*sa).into() })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

// Defaults for fields a spec file may leave out.
fn one() -> u32 {
    1
}
fn default_connect_timeout_ms() -> u32 {
    1000
}
fn default_budget_percent() -> u32 {
    20
}
fn default_min_retry_concurrency() -> u32 {
    3
}
fn default_max_request_headers_bytes() -> u32 {
    64 * 1024
}

// ---------------------------------------------------------------------------------------------------------------
// Workloads (tenants)
// ---------------------------------------------------------------------------------------------------------------

/// `meshWorkloads/{id}`: one pod whose traffic the shared proxy carries.
///
/// A workload is recognised by where its traffic enters — the VF port, which the fabric tags with a packet mark
/// that accepted sockets inherit (`net.ipv4.tcp_fwmark_accept`) — together with its source address. A connection
/// whose source address belongs to a workload but arrives with another port's mark is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// The port (VF attachment) the pod's traffic enters through, as named by the fabric.
    pub port: String,
    /// The packet mark the fabric puts on traffic from that port; `0` trusts the source address alone (hosts
    /// without a fabric, tests).
    #[serde(default)]
    pub port_mark: u32,
    /// The pod's addresses; no two workloads share one.
    pub addresses: Vec<IpAddr>,
    pub identity: SpiffeId,
    /// Certificate (`meshCertificates/{id}`) presented for this workload's outbound mTLS; empty: none.
    #[serde(default)]
    pub certificate: String,
    #[serde(default)]
    pub limits: WorkloadLimits,
}

/// Per-workload admission limits; `0` means unlimited. They keep one noisy pod from starving the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadLimits {
    /// Concurrent downstream connections.
    pub max_connections: u32,
    /// New downstream connections per second (token bucket, burst = one second's worth).
    pub connections_per_second: u32,
    /// HTTP requests per second (token bucket, burst = one second's worth).
    pub requests_per_second: u32,
}

impl Resource for WorkloadSpec {
    const KIND: &'static str = "meshWorkloads";
}

impl WorkloadSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.port.is_empty() || self.port.len() > 64 {
            return invalid("workload.port", "must be 1 to 64 characters");
        }
        if self.addresses.is_empty() {
            return invalid("workload.addresses", "must name at least one address");
        }
        let mut seen = BTreeSet::new();
        for (i, a) in self.addresses.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() {
                return invalid(format!("workload.addresses[{i}]"), format!("{a} is not a unicast address"));
            }
            if !seen.insert(a) {
                return invalid(format!("workload.addresses[{i}]"), format!("{a} is listed twice"));
            }
        }
        if !self.certificate.is_empty() {
            validate_ref("workload.certificate", &self.certificate)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------------------------

/// `meshCertificates/{id}`: an identity's certificate chain and key plus the trust bundle its peers are checked
/// against. Updating it rotates the identity: new handshakes use the new pair, established connections stay.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateSpec {
    /// PEM, leaf first. The leaf must carry a `spiffe://` URI SAN.
    pub certificate_chain_pem: String,
    /// PEM (PKCS#8, SEC1 or PKCS#1).
    pub private_key_pem: String,
    /// PEM CA certificates peers must chain to.
    pub trust_bundle_pem: String,
}

impl fmt::Debug for CertificateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateSpec")
            .field("certificate_chain_pem", &format_args!("{} bytes", self.certificate_chain_pem.len()))
            .field("private_key_pem", &"<redacted>")
            .field("trust_bundle_pem", &format_args!("{} bytes", self.trust_bundle_pem.len()))
            .finish()
    }
}

impl Resource for CertificateSpec {
    const KIND: &'static str = "meshCertificates";
}

impl CertificateSpec {
    /// Shape only; The proxy parses the PEM and checks that key and leaf match when the snapshot is built.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (field, pem, what) in [
            ("certificate.certificate_chain_pem", &self.certificate_chain_pem, "CERTIFICATE"),
            ("certificate.private_key_pem", &self.private_key_pem, "PRIVATE KEY"),
            ("certificate.trust_bundle_pem", &self.trust_bundle_pem, "CERTIFICATE"),
        ] {
            if !pem.contains("-----BEGIN ") || !pem.contains(what) {
                return invalid(field, format!("must hold a PEM {what} block"));
            }
            if pem.len() > 256 * 1024 {
                return invalid(field, "longer than 256 KiB");
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Clusters (upstreams)
// ---------------------------------------------------------------------------------------------------------------

/// `meshClusters/{id}`: a set of endpoints requests and connections are balanced over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// How we speak to the endpoints. `Tcp` clusters serve only L4 handlers.
    pub protocol: UpstreamProtocol,
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u32,
    /// Pooled upstream connections idle longer than this are closed; `0`: never.
    #[serde(default)]
    pub idle_timeout_ms: u32,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Tcp,
    Http1,
    /// HTTP/2: h2c in the clear, ALPN `h2` with TLS. gRPC clusters are HTTP/2.
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Relative weight, 1..=128.
    #[serde(default = "one")]
    pub weight: u32,
    /// `region/zone/subzone`, free form; reported in metrics and the config dump.
    #[serde(default)]
    pub locality: String,
    /// Operator-set health: unhealthy and draining endpoints get no new requests; draining ones keep their
    /// established connections.
    #[serde(default)]
    pub health: EndpointHealth,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointHealth {
    #[default]
    Healthy,
    Unhealthy,
    Draining,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two choices over outstanding requests weighted by an EWMA of latency.
    LeastRequest,
    /// Consistent hashing (ketama ring) on a request header or the downstream source address.
    RingHash {
        hash_on: HashOn,
    },
    Random,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HashOn {
    Header { name: String },
    SourceIp,
}

/// Limits on what the proxy sends one cluster at a time; `0` means unlimited. Beyond them requests fail fast
/// with 503 and the `overflow` reason instead of queueing without bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive failures that mark an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark it healthy again.
    pub healthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HealthCheckKind {
    /// A TCP connect that succeeds within the timeout.
    Tcp,
    /// `GET path` answered with a 2xx status (HTTP/1.1, or the cluster's HTTP/2).
    Http { path: String, host: String },
}

/// Passive health: endpoints that keep failing are ejected for `base_ejection_ms × times ejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses; `0` disables.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors (502, 503, 504, connect failures, resets); `0` disables.
    pub consecutive_gateway_errors: u32,
    pub base_ejection_ms: u32,
    /// Upper bound on the share of a cluster's endpoints ejected at once.
    pub max_ejection_percent: u32,
}

/// mTLS towards the endpoints (another proxy, an Envoy sidecar): present `certificate`, accept a server whose
/// SPIFFE ID is one of `server_identities` (any ID in the trust bundle when empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamTls {
    /// `meshCertificates/{id}` presented as the client certificate; also supplies the trust bundle.
    pub certificate: String,
    #[serde(default)]
    pub server_identities: Vec<SpiffeId>,
    /// SNI sent; empty: none.
    #[serde(default)]
    pub sni: String,
    /// Hand the record layer to the kernel (kTLS) once the handshake is done, placed by this policy; unset:
    /// records stay in userspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_tls: Option<Policy>,
}

impl Resource for ClusterSpec {
    const KIND: &'static str = "meshClusters";
}

impl ClusterSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.endpoints.len() > 4096 {
            return invalid("cluster.endpoints", "more than 4096 endpoints");
        }
        let mut seen = BTreeSet::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let field = |f: &str| format!("cluster.endpoints[{i}].{f}");
            if ep.address.port() == 0 || ep.address.ip().is_unspecified() {
                return invalid(field("address"), format!("{} is not a connectable address", ep.address));
            }
            if !seen.insert(ep.address) {
                return invalid(field("address"), format!("{} is listed twice", ep.address));
            }
            if !(1..=128).contains(&ep.weight) {
                return invalid(field("weight"), format!("{} is not in 1..=128", ep.weight));
            }
            if ep.locality.len() > 256 {
                return invalid(field("locality"), "longer than 256 bytes");
            }
        }
        if let LbPolicy::RingHash { hash_on: HashOn::Header { name } } = &self.lb {
            validate_header_name("cluster.lb.hash_on.name", name)?;
        }
        if !(1..=600_000).contains(&self.connect_timeout_ms) {
            return invalid("cluster.connect_timeout_ms", "must be 1 to 600000");
        }
        if let Some(hc) = &self.health_check {
            if !(100..=3_600_000).contains(&hc.interval_ms) {
                return invalid("cluster.health_check.interval_ms", "must be 100 to 3600000");
            }
            if hc.timeout_ms == 0 || hc.timeout_ms > hc.interval_ms {
                return invalid("cluster.health_check.timeout_ms", "must be positive and at most the interval");
            }
            if hc.unhealthy_threshold == 0 || hc.healthy_threshold == 0 {
                return invalid("cluster.health_check", "thresholds must be positive");
            }
            if let HealthCheckKind::Http { path, host } = &hc.kind {
                if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return invalid("cluster.health_check.path", format!("{path:?} is not an absolute path"));
                }
                validate_header_value("cluster.health_check.host", host)?;
            }
            if self.protocol == UpstreamProtocol::Tcp && matches!(hc.kind, HealthCheckKind::Http { .. }) {
                return invalid("cluster.health_check.kind", "HTTP health checks need an HTTP cluster");
            }
        }
        if let Some(od) = &self.outlier_detection {
            if od.base_ejection_ms == 0 {
                return invalid("cluster.outlier_detection.base_ejection_ms", "must be positive");
            }
            if od.max_ejection_percent > 100 {
                return invalid("cluster.outlier_detection.max_ejection_percent", "must be at most 100");
            }
        }
        if let Some(tls) = &self.tls {
            validate_ref("cluster.tls.certificate", &tls.certificate)?;
            validate_header_value("cluster.tls.sni", &tls.sni)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------------------------

/// `meshRouteTables/{id}`: virtual hosts and their ordered routes, referenced by HTTP handlers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTableSpec {
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualHost {
    pub name: String,
    /// Host (`:authority`) values, port ignored: exact `api.example`, suffix `*.example`, prefix `api.*`, or `*`.
    /// Exact beats suffix beats prefix beats `*`; longer wildcard matches win.
    pub domains: Vec<String>,
    /// First match wins.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: RouteAction,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValue>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValue>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// All must match.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// RE2-style syntax (Rust `regex`), anchored: it must match the whole path (query excluded).
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lowercase header name; pseudo-headers `:method`, `:authority`, `:scheme` are matchable.
    pub name: String,
    pub value: StringMatch,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Anchored, whole value.
    Regex(String),
    Present,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
    /// Append to an existing value instead of replacing it.
    #[serde(default)]
    pub append: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RouteAction {
    Forward(Forward),
    Redirect(Redirect),
    DirectResponse { status: u16, body: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// One or more clusters with weights (a canary split); weights need not sum to anything.
    pub clusters: Vec<WeightedCluster>,
    /// Whole-request deadline including retries; `0`: none. A gRPC `grpc-timeout` shorter than this wins.
    #[serde(default)]
    pub timeout_ms: u32,
    /// Replaces the matched path prefix (prefix matches only); `None` leaves the path alone.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Replaces the Host / `:authority`; `None` keeps it.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedCluster {
    /// `meshClusters/{id}`.
    pub cluster: String,
    #[serde(default = "one")]
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// `0`: the route timeout bounds each try.
    #[serde(default)]
    pub per_try_timeout_ms: u32,
    pub retry_on: BTreeSet<RetryOn>,
    /// Retries may be at most this percentage of a cluster's active requests (a retry budget; the circuit
    /// breaker's `max_retries` applies on top).
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// Retries always allowed regardless of the budget, so a quiet cluster can still retry.
    #[serde(default = "default_min_retry_concurrency")]
    pub min_retry_concurrency: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    /// Connection refused or timed out before the request was sent.
    ConnectFailure,
    /// The upstream reset or closed the connection before responding.
    Reset,
    /// gRPC status UNAVAILABLE.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// `None` keeps the request's.
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

impl Resource for RouteTableSpec {
    const KIND: &'static str = "meshRouteTables";
}

impl RouteTableSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut domains = BTreeSet::new();
        for (v, vh) in self.virtual_hosts.iter().enumerate() {
            let vfield = format!("route_table.virtual_hosts[{v}]");
            if vh.domains.is_empty() {
                return invalid(format!("{vfield}.domains"), "must name at least one domain");
            }
            for (d, domain) in vh.domains.iter().enumerate() {
                let field = format!("{vfield}.domains[{d}]");
                validate_domain(&field, domain)?;
                if !domains.insert(domain.to_ascii_lowercase()) {
                    return invalid(field, format!("{domain:?} is claimed by two virtual hosts"));
                }
            }
            for (r, route) in vh.routes.iter().enumerate() {
                route.validate(&format!("{vfield}.routes[{r}]"))?;
            }
        }
        Ok(())
    }
}

impl Route {
    fn validate(&self, field: &str) -> Result<(), Invalid> {
        match &self.matcher.path {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => {
                if !p.starts_with('/') {
                    return invalid(format!("{field}.match.path"), format!("{p:?} does not start with '/'"));
                }
            }
            PathMatch::Regex(re) => validate_regex(&format!("{field}.match.path"), re)?,
        }
        for (h, m) in self.matcher.headers.iter().enumerate() {
            let hfield = format!("{field}.match.headers[{h}]");
            validate_matched_header_name(&format!("{hfield}.name"), &m.name)?;
            match &m.value {
                StringMatch::Exact(v) | StringMatch::Prefix(v) => validate_header_value(&format!("{hfield}.value"), v)?,
                StringMatch::Regex(re) => validate_regex(&format!("{hfield}.value"), re)?,
                StringMatch::Present => {}
            }
        }
        for (list, what) in [(&self.request_headers_to_add, "request"), (&self.response_headers_to_add, "response")] {
            for (i, hv) in list.iter().enumerate() {
                let hfield = format!("{field}.{what}_headers_to_add[{i}]");
                validate_header_name(&format!("{hfield}.name"), &hv.name)?;
                validate_header_value(&format!("{hfield}.value"), &hv.value)?;
                if is_hop_by_hop(&hv.name) {
                    return invalid(format!("{hfield}.name"), format!("{} is a hop-by-hop header", hv.name));
                }
            }
        }
        for (list, what) in
            [(&self.request_headers_to_remove, "request"), (&self.response_headers_to_remove, "response")]
        {
            for (i, name) in list.iter().enumerate() {
                validate_header_name(&format!("{field}.{what}_headers_to_remove[{i}]"), name)?;
            }
        }
        match &self.action {
            RouteAction::Forward(fwd) => {
                if fwd.clusters.is_empty() {
                    return invalid(format!("{field}.action.clusters"), "must name at least one cluster");
                }
                for (c, wc) in fwd.clusters.iter().enumerate() {
                    validate_ref(&format!("{field}.action.clusters[{c}].cluster"), &wc.cluster)?;
                    if fwd.clusters.len() > 1 && wc.weight == 0 {
                        return invalid(format!("{field}.action.clusters[{c}].weight"), "must be positive in a split");
                    }
                }
                if let Some(p) = &fwd.prefix_rewrite {
                    if !matches!(self.matcher.path, PathMatch::Prefix(_)) {
                        return invalid(format!("{field}.action.prefix_rewrite"), "needs a prefix path match");
                    }
                    if !p.starts_with('/') {
                        return invalid(format!("{field}.action.prefix_rewrite"), "must start with '/'");
                    }
                }
                if let Some(h) = &fwd.host_rewrite {
                    validate_header_value(&format!("{field}.action.host_rewrite"), h)?;
                    if h.is_empty() {
                        return invalid(format!("{field}.action.host_rewrite"), "must not be empty");
                    }
                }
                if let Some(retry) = &fwd.retry {
                    if retry.attempts > 10 {
                        return invalid(format!("{field}.action.retry.attempts"), "at most 10");
                    }
                    if retry.attempts > 0 && retry.retry_on.is_empty() {
                        return invalid(format!("{field}.action.retry.retry_on"), "must name a condition");
                    }
                    if retry.budget_percent > 100 {
                        return invalid(format!("{field}.action.retry.budget_percent"), "at most 100");
                    }
                }
            }
            RouteAction::Redirect(r) => {
                if !matches!(r.status, 301 | 302 | 303 | 307 | 308) {
                    return invalid(format!("{field}.action.status"), format!("{} is not a redirect status", r.status));
                }
                if let Some(s) = &r.scheme
                    && !matches!(s.as_str(), "http" | "https")
                {
                    return invalid(format!("{field}.action.scheme"), format!("{s:?} is not http or https"));
                }
                if let Some(h) = &r.host {
                    validate_header_value(&format!("{field}.action.host"), h)?;
                }
                if let Some(p) = &r.path
                    && !p.starts_with('/')
                {
                    return invalid(format!("{field}.action.path"), "must start with '/'");
                }
            }
            RouteAction::DirectResponse { status, body } => {
                if !(200..=599).contains(status) {
                    return invalid(format!("{field}.action.status"), format!("{status} is not 200..=599"));
                }
                if body.len() > 64 * 1024 {
                    return invalid(format!("{field}.action.body"), "longer than 64 KiB");
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------------------------------------------

/// `meshListeners/{id}`: a socket the proxy accepts on.
///
/// A *transparent* listener receives pod traffic captured by TPROXY (`IP_TRANSPARENT`); the connection's local
/// address is the destination the pod dialled. An explicit listener serves inbound traffic and Services. Both pick
/// a handler by the (original) destination: the first `destinations` entry whose prefix and port match, else
/// `default`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSpec {
    pub address: SocketAddr,
    #[serde(default)]
    pub transparent: bool,
    #[serde(default)]
    pub destinations: Vec<Destination>,
    pub default: Handler,
    /// Terminate TLS (mTLS when `require_client_certificate`).
    #[serde(default)]
    pub tls: Option<DownstreamTls>,
    /// `meshPolicies/{id}` applied in order; a connection or request must pass all of them.
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub timeouts: ListenerTimeouts,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    #[serde(default = "default_max_request_headers_bytes")]
    pub max_request_headers_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// `None`: any address.
    #[serde(default)]
    pub prefix: Option<IpPrefix>,
    /// `0`: any port.
    #[serde(default)]
    pub port: u16,
    pub handler: Handler,
}

/// What a connection is handed to; the protocol is configured, never sniffed (server-first protocols would
/// stall).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Handler {
    /// Opaque TCP to a cluster.
    Tcp { cluster: String },
    /// Opaque TCP to the original destination (capture passthrough).
    Passthrough,
    /// HTTP routed by a route table. `codec` picks HTTP/1.1, HTTP/2 (h2c prior knowledge) or either (the HTTP/2
    /// preface is recognised — HTTP is client-first, so this never stalls); with TLS, ALPN decides.
    Http { route_table: String, codec: HttpCodec },
    /// Close the connection.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpCodec {
    Http1,
    Http2,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownstreamTls {
    /// `meshCertificates/{id}` presented to clients; its trust bundle checks client certificates.
    pub certificate: String,
    #[serde(default)]
    pub require_client_certificate: bool,
    /// Hand the record layer to the kernel (kTLS) once the handshake is done, placed by this policy; unset:
    /// records stay in userspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_tls: Option<Policy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerTimeouts {
    /// Time to receive a complete request head (slowloris bound); `0`: none.
    pub request_headers_ms: u32,
    /// A connection with nothing in flight is closed after this; `0`: never.
    pub idle_ms: u32,
    /// How long a removed listener lets its connections finish.
    pub drain_ms: u32,
}

impl Default for ListenerTimeouts {
    fn default() -> Self {
        ListenerTimeouts { request_headers_ms: 10_000, idle_ms: 300_000, drain_ms: 5_000 }
    }
}

/// An address prefix such as `10.96.0.0/12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpPrefix {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not address/length"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let len: u8 = len.parse().map_err(|_| format!("{len:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} exceeds {max}"));
        }
        Ok(IpPrefix { addr, len })
    }
}

impl TryFrom<String> for IpPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<IpPrefix> for String {
    fn from(p: IpPrefix) -> String {
        p.to_string()
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Resource for ListenerSpec {
    const KIND: &'static str = "meshListeners";
}

impl ListenerSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.address.port() == 0 {
            return invalid("listener.address", "must name a port");
        }
        for (i, d) in self.destinations.iter().enumerate() {
            validate_handler(&format!("listener.destinations[{i}].handler"), &d.handler)?;
        }
        validate_handler("listener.default", &self.default)?;
        if !self.transparent
            && (matches!(self.default, Handler::Passthrough)
                || self.destinations.iter().any(|d| d.handler == Handler::Passthrough))
        {
            return invalid("listener.default", "passthrough needs a transparent listener");
        }
        if let Some(tls) = &self.tls {
            validate_ref("listener.tls.certificate", &tls.certificate)?;
        }
        for (i, p) in self.policies.iter().enumerate() {
            validate_ref(&format!("listener.policies[{i}]"), p)?;
        }
        if !(1024..=1024 * 1024).contains(&self.max_request_headers_bytes) {
            return invalid("listener.max_request_headers_bytes", "must be 1024 to 1048576");
        }
        Ok(())
    }
}

fn validate_handler(field: &str, handler: &Handler) -> Result<(), Invalid> {
    match handler {
        Handler::Tcp { cluster } => validate_ref(&format!("{field}.cluster"), cluster),
        Handler::Http { route_table, .. } => validate_ref(&format!("{field}.route_table"), route_table),
        Handler::Passthrough | Handler::Reject => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------------------------------------------

/// `meshPolicies/{id}`: L4 and L7 authorization, Istio `AuthorizationPolicy` semantics: a request is denied if any
/// `Deny` policy matches; otherwise, if any `Allow` policy applies, one of them must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub action: PolicyAction,
    /// Any rule matching makes the policy match; a policy without rules matches nothing.
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// Each non-empty list must match (one of its entries); empty lists match anything. `methods`, `paths` and
/// `headers` are L7 and make the rule apply to HTTP only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyRule {
    /// Source SPIFFE IDs: exact, or `*` / `prefix*` / `*suffix` patterns.
    pub principals: Vec<String>,
    /// Source namespaces (from the SPIFFE ID).
    pub namespaces: Vec<String>,
    /// Source address prefixes.
    pub source_prefixes: Vec<IpPrefix>,
    /// Destination ports.
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    /// Exact, or `prefix*` / `*suffix`.
    pub paths: Vec<String>,
    pub headers: Vec<HeaderMatch>,
}

impl Resource for PolicySpec {
    const KIND: &'static str = "meshPolicies";
}

impl PolicySpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (r, rule) in self.rules.iter().enumerate() {
            let field = format!("policy.rules[{r}]");
            for (i, m) in rule.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return invalid(format!("{field}.methods[{i}]"), format!("{m:?} is not an HTTP method"));
                }
            }
            for (i, p) in rule.paths.iter().enumerate() {
                if p.is_empty()
                    || p.matches('*').count() > 1
                    || (p.contains('*') && !p.starts_with('*') && !p.ends_with('*'))
                {
                    return invalid(format!("{field}.paths[{i}]"), format!("{p:?} is not exact, prefix* or *suffix"));
                }
            }
            for (i, p) in rule.principals.iter().enumerate() {
                if p.is_empty()
                    || p.matches('*').count() > 1
                    || (p.contains('*') && !p.starts_with('*') && !p.ends_with('*'))
                {
                    return invalid(
                        format!("{field}.principals[{i}]"),
                        format!("{p:?} is not exact, *, prefix* or *suffix"),
                    );
                }
            }
            for (h, m) in rule.headers.iter().enumerate() {
                validate_matched_header_name(&format!("{field}.headers[{h}].name"), &m.name)?;
                if let StringMatch::Regex(re) = &m.value {
                    validate_regex(&format!("{field}.headers[{h}].value"), re)?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A whole configuration
// ---------------------------------------------------------------------------------------------------------------

/// Everything one configuration source wants the proxy to run: the intent store (API), or an xDS control plane.
/// References (listener → route table → cluster → certificate) resolve within one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshSpecs {
    pub workloads: BTreeMap<String, WorkloadSpec>,
    pub certificates: BTreeMap<String, CertificateSpec>,
    pub clusters: BTreeMap<String, ClusterSpec>,
    pub route_tables: BTreeMap<String, RouteTableSpec>,
    pub listeners: BTreeMap<String, ListenerSpec>,
    pub policies: BTreeMap<String, PolicySpec>,
}

/// One object naming another: `from` (kind, id) refers to `to` (kind, id) through `field`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference {
    pub from: (&'static str, String),
    pub field: String,
    pub to: (&'static str, String),
}

impl MeshSpecs {
    /// Every reference between objects of this configuration, resolved or not.
    pub fn references(&self) -> Vec<Reference> {
        let mut refs = Vec::new();
        let mut add = |from: (&'static str, &str), field: String, to: (&'static str, &str)| {
            refs.push(Reference { from: (from.0, from.1.to_owned()), field, to: (to.0, to.1.to_owned()) });
        };
        for (id, w) in &self.workloads {
            if !w.certificate.is_empty() {
                add((WorkloadSpec::KIND, id), "workload.certificate".into(), (CertificateSpec::KIND, &w.certificate));
            }
        }
        for (id, c) in &self.clusters {
            if let Some(tls) = &c.tls {
                add(
                    (ClusterSpec::KIND, id),
                    "cluster.tls.certificate".into(),
                    (CertificateSpec::KIND, &tls.certificate),
                );
            }
        }
        for (id, t) in &self.route_tables {
            for (v, vh) in t.virtual_hosts.iter().enumerate() {
                for (r, route) in vh.routes.iter().enumerate() {
                    if let RouteAction::Forward(fwd) = &route.action {
                        for (c, wc) in fwd.clusters.iter().enumerate() {
                            add(
                                (RouteTableSpec::KIND, id),
                                format!("route_table.virtual_hosts[{v}].routes[{r}].action.clusters[{c}].cluster"),
                                (ClusterSpec::KIND, &wc.cluster),
                            );
                        }
                    }
                }
            }
        }
        for (id, l) in &self.listeners {
            let handlers = l
                .destinations
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("listener.destinations[{i}].handler"), &d.handler))
                .chain(std::iter::once(("listener.default".to_owned(), &l.default)));
            for (field, handler) in handlers {
                match handler {
                    Handler::Tcp { cluster } => {
                        add((ListenerSpec::KIND, id), format!("{field}.cluster"), (ClusterSpec::KIND, cluster));
                    }
                    Handler::Http { route_table, .. } => add(
                        (ListenerSpec::KIND, id),
                        format!("{field}.route_table"),
                        (RouteTableSpec::KIND, route_table),
                    ),
                    Handler::Passthrough | Handler::Reject => {}
                }
            }
            if let Some(tls) = &l.tls {
                add(
                    (ListenerSpec::KIND, id),
                    "listener.tls.certificate".into(),
                    (CertificateSpec::KIND, &tls.certificate),
                );
            }
            for (i, p) in l.policies.iter().enumerate() {
                add((ListenerSpec::KIND, id), format!("listener.policies[{i}]"), (PolicySpec::KIND, p));
            }
        }
        refs
    }

    /// True when an object of `kind` with `id` exists.
    pub fn contains(&self, kind: &str, id: &str) -> bool {
        match kind {
            WorkloadSpec::KIND => self.workloads.contains_key(id),
            CertificateSpec::KIND => self.certificates.contains_key(id),
            ClusterSpec::KIND => self.clusters.contains_key(id),
            RouteTableSpec::KIND => self.route_tables.contains_key(id),
            ListenerSpec::KIND => self.listeners.contains_key(id),
            PolicySpec::KIND => self.policies.contains_key(id),
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Shared rules
// ---------------------------------------------------------------------------------------------------------------

/// A reference to another mesh object by id. Ids written through the API follow the intent store's AIP rules; ids
/// from an xDS control plane are Envoy resource names (`outbound|80||web.default.svc.cluster.local`), so a
/// reference only needs to be printable ASCII without spaces, 1 to 255 bytes.
pub fn validate_ref(field: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return invalid(field, format!("{id:?} is not an object id (1 to 255 printable characters, no spaces)"));
    }
    Ok(())
}

/// RFC 9110 token, lowercase (HTTP/2 requires lowercase names).
pub fn validate_header_name(field: &str, name: &str) -> Result<(), Invalid> {
    let tchar = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > 256 || !name.bytes().all(tchar) {
        return invalid(field, format!("{name:?} is not a lowercase header name"));
    }
    Ok(())
}

/// A header name a match may test: a lowercase header name or one of the pseudo-headers `:method`,
/// `:authority`, `:scheme`, `:path`.
fn validate_matched_header_name(field: &str, name: &str) -> Result<(), Invalid> {
    if name.starts_with(':') {
        if !matches!(name, ":method" | ":authority" | ":scheme" | ":path") {
            return invalid(field, format!("{name} is not a matchable pseudo-header"));
        }
        return Ok(());
    }
    validate_header_name(field, name)
}

/// Visible ASCII, spaces and tabs; no CR/LF (header injection).
pub fn validate_header_value(field: &str, value: &str) -> Result<(), Invalid> {
    if value.len() > MAX_HEADER_VALUE || !value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        return invalid(field, "must be printable ASCII without line breaks, at most 8 KiB");
    }
    Ok(())
}

fn validate_regex(field: &str, re: &str) -> Result<(), Invalid> {
    if re.len() > 4096 {
        return invalid(field, "regex longer than 4096 bytes");
    }
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map(drop)
        .map_err(|e| Invalid { field: field.into(), message: format!("bad regex: {e}") })
}

fn validate_domain(field: &str, domain: &str) -> Result<(), Invalid> {
    if domain == "*" {
        return Ok(());
    }
    let core = domain.strip_prefix("*.").or_else(|| domain.strip_suffix(".*")).unwrap_or(domain);
    let ok = !core.is_empty()
        && core.len() <= 253
        && core.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        return invalid(field, format!("{domain:?} is not a host name, *.suffix, prefix.* or *"));
    }
    Ok(())
}

/// Headers that describe one connection and are never forwarded or set by routes.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_strictly() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), ("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/default/sa/web\"");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x/ns/a\"").is_err());
    }

    #[test]
    fn prefixes_contain_what_they_should() {
        let p: IpPrefix = "10.96.0.0/12".parse().unwrap();
        assert!(p.contains("10.100.1.2".parse().unwrap()));
        assert!(!p.contains("10.112.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn route_errors_name_the_field() {
        let table = RouteTableSpec {
            virtual_hosts: vec![VirtualHost {
                name: "web".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: "r".into(),
                    matcher: RouteMatch { path: PathMatch::Regex("(".into()), headers: vec![] },
                    action: RouteAction::DirectResponse { status: 200, body: String::new() },
                    request_headers_to_add: vec![],
                    request_headers_to_remove: vec![],
                    response_headers_to_add: vec![],
                    response_headers_to_remove: vec![],
                }],
            }],
        };
        let err = table.validate().unwrap_err();
        assert_eq!(err.field, "route_table.virtual_hosts[0].routes[0].match.path");
    }

    #[test]
    fn spec_files_may_leave_defaults_out() {
        let specs: MeshSpecs = serde_json::from_str(
            r#"{"clusters": {"web": {"protocol": "http1", "endpoints": [{"address": "127.0.0.1:8080"}]}},
                "listeners": {"in": {"address": "127.0.0.1:15006",
                                     "default": {"kind": "http", "route_table": "web", "codec": "auto"}}}}"#,
        )
        .unwrap();
        let web = &specs.clusters["web"];
        assert_eq!((web.endpoints[0].weight, web.connect_timeout_ms, &web.lb), (1, 1000, &LbPolicy::RoundRobin));
        web.validate().unwrap();
        let listener = &specs.listeners["in"];
        assert_eq!(listener.timeouts, ListenerTimeouts::default());
        listener.validate().unwrap();
    }

    #[test]
    fn header_values_refuse_line_breaks() {
        assert!(validate_header_value("f", "a\r\nx-injected: 1").is_err());
        assert!(validate_header_value("f", "ok value\t1").is_ok());
        assert!(validate_header_name("f", "X-Upper").is_err());
    }
}
