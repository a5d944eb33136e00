//! Envoy v3 resources → mesh model. Every function here is pure: it reads one decoded xDS resource and returns
//! the model object it means, or an [`Invalid`] naming the xDS field (`listener[web].filter_chains[0]…`) that
//! the proxy cannot honour without changing what the control plane asked for. Nothing that narrows or widens a
//! match is ever dropped silently; settings that only tune Envoy internals (stats, buffer sizes) are ignored.
//!
//! Cross-resource assembly (which secrets pair into a certificate, which objects are still waiting for the
//! resources they name) lives in [`assemble`].

// Control planes still send deprecated fields (Istio sets several); honouring them is part of converting faithfully.
#![allow(deprecated)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use dpu_intent::{Invalid, invalid};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as XdsLb};
use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, HeaderValueOption, HealthStatus, TransportSocket, address, data_source,
    header_value_option::HeaderAppendAction, health_check, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter, listener_filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RedirectAction, RetryPolicy as XdsRetry, Route as XdsRoute, RouteAction as XdsRouteAction,
    RouteConfiguration, header_matcher::HeaderMatchSpecifier, redirect_action, route, route_action,
    route_match::PathSpecifier, virtual_host::TlsRequirementType,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::CodecType, http_connection_manager::RouteSpecifier, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, Secret, SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context::ValidationContextType, secret, subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options::UpstreamProtocolOptions,
    http_protocol_options::explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Any, Duration};

use crate::model::{
    CertificateSpec, CircuitBreaker, ClusterSpec, Destination, DownstreamTls, Endpoint, EndpointHealth, Forward,
    Handler, HeaderMatch, HeaderValue, HealthCheck, HealthCheckKind, HttpCodec, IpPrefix, LbPolicy, ListenerSpec,
    ListenerTimeouts, MeshSpecs, OutlierDetection, PathMatch, Redirect, RetryOn, RetryPolicy, Route, RouteAction,
    RouteMatch, RouteTableSpec, SpiffeId, StringMatch, UpstreamProtocol, UpstreamTls, VirtualHost, WeightedCluster,
    validate_ref,
};

/// Type URL of LDS resources.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of CDS resources.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of RDS resources.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of EDS resources.
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of SDS resources.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Envoy's defaults where a field is absent, so an omitted field means what it means to Envoy.
const ENVOY_CONNECT_TIMEOUT_MS: u32 = 5_000;
const ENVOY_ROUTE_TIMEOUT_MS: u32 = 15_000;
const ENVOY_UPSTREAM_IDLE_MS: u32 = 3_600_000;
/// HCM `common_http_protocol_options.idle_timeout` and `tcp_proxy.idle_timeout`.
const ENVOY_IDLE_MS: u32 = 3_600_000;
const ENVOY_MAX_REQUEST_HEADERS_KB: u32 = 60;
const ENVOY_CIRCUIT_BREAKER: CircuitBreaker =
    CircuitBreaker { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 };

// ---------------------------------------------------------------------------------------------------------------
// Converted resources
// ---------------------------------------------------------------------------------------------------------------

/// The SDS secrets a TLS context names: the certificate presented and the validation context (trust bundle).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TlsSecrets {
    pub certificate: String,
    pub validation: String,
}

/// An LDS `Listener`: the listener spec plus what it references and may still be waiting for.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsListener {
    pub spec: ListenerSpec,
    /// RDS route configurations named by `http_connection_manager.rds`.
    pub rds: BTreeSet<String>,
    /// Route configurations carried inline by `http_connection_manager.route_config`, by table id.
    pub inline_routes: BTreeMap<String, RouteTableSpec>,
    pub tls: Option<TlsSecrets>,
}

/// A CDS `Cluster`. `spec.endpoints` holds the inline `load_assignment` of STATIC clusters; EDS clusters get
/// theirs from the `ClusterLoadAssignment` named `eds_service`.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsCluster {
    pub spec: ClusterSpec,
    pub eds_service: Option<String>,
    pub tls: Option<TlsSecrets>,
}

/// An SDS `Secret`.
#[derive(Clone, PartialEq, Eq)]
pub enum XdsSecret {
    /// `tls_certificate`: PEM chain (leaf first) and PEM private key.
    Certificate { chain_pem: String, key_pem: String },
    /// `validation_context.trusted_ca`: PEM CA bundle.
    TrustBundle { pem: String },
}

impl std::fmt::Debug for XdsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XdsSecret::Certificate { chain_pem, .. } => f
                .debug_struct("Certificate")
                .field("chain_pem", &format_args!("{} bytes", chain_pem.len()))
                .field("key_pem", &"<redacted>")
                .finish(),
            XdsSecret::TrustBundle { pem } => {
                f.debug_struct("TrustBundle").field("pem", &format_args!("{} bytes", pem.len())).finish()
            }
        }
    }
}

/// The accepted resources of every type, by xDS resource name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsResources {
    pub listeners: BTreeMap<String, XdsListener>,
    pub clusters: BTreeMap<String, XdsCluster>,
    pub route_tables: BTreeMap<String, RouteTableSpec>,
    /// `ClusterLoadAssignment`s by `cluster_name` (the EDS service name).
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
    pub secrets: BTreeMap<String, XdsSecret>,
}

/// The model built from [`XdsResources`], and the objects held back because something they name has not arrived
/// yet (Envoy's warming): `"listener/NAME"`, `"route_table/NAME"`, `"cluster/NAME"`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assembled {
    pub specs: MeshSpecs,
    pub warming: Vec<String>,
}

/// One decoded and converted xDS resource, with its name.
#[derive(Debug, Clone, PartialEq)]
pub enum Converted {
    Listener(String, XdsListener),
    Cluster(String, XdsCluster),
    RouteTable(String, RouteTableSpec),
    /// Keyed by `cluster_name`, the EDS service name.
    Endpoints(String, Vec<Endpoint>),
    Secret(String, XdsSecret),
}

impl Converted {
    pub fn name(&self) -> &str {
        match self {
            Converted::Listener(n, _)
            | Converted::Cluster(n, _)
            | Converted::RouteTable(n, _)
            | Converted::Endpoints(n, _)
            | Converted::Secret(n, _) => n,
        }
    }
}

/// Decodes the protobuf `bytes` of a resource of `type_url` (one of the `*_TYPE` constants) and converts it.
/// `field` names the resource in errors about its encoding.
pub fn resource(type_url: &str, bytes: &[u8], field: &str) -> Result<Converted, Invalid> {
    fn decode<T: prost::Message + Default>(bytes: &[u8], field: &str) -> Result<T, Invalid> {
        T::decode(bytes).map_err(|e| Invalid { field: field.into(), message: format!("undecodable: {e}") })
    }
    match type_url {
        LISTENER_TYPE => {
            let l: Listener = decode(bytes, field)?;
            Ok(Converted::Listener(l.name.clone(), listener(&l)?))
        }
        CLUSTER_TYPE => {
            let c: Cluster = decode(bytes, field)?;
            Ok(Converted::Cluster(c.name.clone(), cluster(&c)?))
        }
        ROUTE_TYPE => {
            let r: RouteConfiguration = decode(bytes, field)?;
            Ok(Converted::RouteTable(r.name.clone(), route_table(&r)?))
        }
        ENDPOINT_TYPE => {
            let cla: ClusterLoadAssignment = decode(bytes, field)?;
            Ok(Converted::Endpoints(cla.cluster_name.clone(), endpoints(&cla)?))
        }
        SECRET_TYPE => {
            let s: Secret = decode(bytes, field)?;
            Ok(Converted::Secret(s.name.clone(), secret(&s)?))
        }
        other => bad(field, format!("type {other:?} is not supported")),
    }
}

impl XdsResources {
    /// Adds or replaces one converted resource.
    pub fn insert(&mut self, converted: Converted) {
        match converted {
            Converted::Listener(n, l) => drop(self.listeners.insert(n, l)),
            Converted::Cluster(n, c) => drop(self.clusters.insert(n, c)),
            Converted::RouteTable(n, r) => drop(self.route_tables.insert(n, r)),
            Converted::Endpoints(n, e) => drop(self.endpoints.insert(n, e)),
            Converted::Secret(n, s) => drop(self.secrets.insert(n, s)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

fn bad<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    invalid(field, message)
}

/// Decodes an `Any` holding `T`, checking the type URL.
pub fn unpack<T: prost::Message + prost::Name + Default>(any: &Any, field: &str) -> Result<T, Invalid> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != T::full_name() {
        return bad(field, format!("holds {:?}, expected {}", any.type_url, T::full_name()));
    }
    T::decode(any.value.as_slice()).map_err(|e| Invalid { field: field.into(), message: format!("undecodable: {e}") })
}

/// Milliseconds of a protobuf duration, rounded up so that a positive duration never becomes "none".
fn millis(d: &Duration, field: &str) -> Result<u32, Invalid> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return bad(field, "is not a valid non-negative duration");
    }
    let ms = d.seconds.saturating_mul(1000).saturating_add((i64::from(d.nanos) + 999_999) / 1_000_000);
    u32::try_from(ms).map_err(|_| Invalid { field: field.into(), message: "is longer than 49 days".into() })
}

fn opt_millis(d: &Option<Duration>, field: &str) -> Result<Option<u32>, Invalid> {
    d.as_ref().map(|d| millis(d, field)).transpose()
}

fn data_source(ds: &Option<DataSource>, field: &str) -> Result<String, Invalid> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
            .map_err(|_| Invalid { field: field.into(), message: "inline_bytes are not UTF-8 text".into() }),
        Some(data_source::Specifier::Filename(_) | data_source::Specifier::EnvironmentVariable(_)) => {
            bad(field, "only inline_bytes or inline_string are supported")
        }
        None => bad(field, "must be set"),
    }
}

fn socket_address(addr: &Option<Address>, field: &str) -> Result<SocketAddr, Invalid> {
    let Some(address::Address::SocketAddress(sa)) = addr.as_ref().and_then(|a| a.address.as_ref()) else {
        return bad(field, "must be a socket_address");
    };
    if sa.protocol != 0 {
        return bad(format!("{field}.protocol"), "only TCP is supported");
    }
    if !sa.resolver_name.is_empty() {
        return bad(format!("{field}.resolver_name"), "custom resolvers are not supported");
    }
    let ip: IpAddr = sa.address.parse().map_err(|_| Invalid {
        field: format!("{field}.address"),
        message: format!("{:?} is not an IP", sa.address),
    })?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p)
            .map_err(|_| Invalid { field: format!("{field}.port_value"), message: format!("{p} is not a port") })?,
        Some(socket_address::PortSpecifier::NamedPort(_)) => {
            return bad(format!("{field}.named_port"), "named ports are not supported");
        }
        None => return bad(format!("{field}.port_value"), "must be set"),
    };
    Ok(SocketAddr::new(ip, port))
}

fn string_match(m: &StringMatcher, field: &str) -> Result<StringMatch, Invalid> {
    if m.ignore_case {
        return bad(format!("{field}.ignore_case"), "case-insensitive matching is not supported");
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchPattern::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchPattern::Suffix(s)) => Ok(StringMatch::Regex(format!(".*{}", regex::escape(s)))),
        Some(MatchPattern::Contains(s)) => Ok(StringMatch::Regex(format!(".*{}.*", regex::escape(s)))),
        Some(MatchPattern::SafeRegex(r)) => Ok(StringMatch::Regex(r.regex.clone())),
        Some(MatchPattern::Custom(_)) => bad(format!("{field}.custom"), "custom matchers are not supported"),
        None => bad(field, "must name a match pattern"),
    }
}

/// Re-roots a model validation error under an xDS resource: `cluster.lb` → `cluster[NAME].lb`.
fn reroot(kind: &str, name: &str, e: Invalid) -> Invalid {
    let rest = e.field.strip_prefix(kind).unwrap_or(&e.field).trim_start_matches('.');
    Invalid { field: format!("{kind}[{name}].{rest}"), message: e.message }
}

// ---------------------------------------------------------------------------------------------------------------
// LDS
// ---------------------------------------------------------------------------------------------------------------

/// What one filter chain carries.
struct Chain {
    handler: Handler,
    /// Idle timeout of the connection (`tcp_proxy.idle_timeout`, HCM `idle_timeout`); `0`: none.
    idle_ms: u32,
    tls: Option<(TlsSecrets, bool)>,
    http: Option<HcmSettings>,
    rds: Option<String>,
    inline: Option<(String, RouteTableSpec)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HcmSettings {
    request_headers_ms: u32,
    max_request_headers_bytes: u32,
}

/// Converts an LDS `Listener`.
pub fn listener(l: &Listener) -> Result<XdsListener, Invalid> {
    let root = format!("listener[{}]", l.name);
    validate_ref(&format!("{root}.name"), &l.name)?;
    let address = socket_address(&l.address, &format!("{root}.address"))?;
    if !l.additional_addresses.is_empty() {
        return bad(format!("{root}.additional_addresses"), "extra listen addresses are not supported");
    }
    if l.filter_chain_matcher.is_some() {
        return bad(format!("{root}.filter_chain_matcher"), "matcher-based chain selection is not supported");
    }
    if l.fcds_config.is_some() {
        return bad(format!("{root}.fcds_config"), "filter chain discovery is not supported");
    }
    if l.bind_to_port.as_ref().is_some_and(|b| !b.value) {
        // Such listeners only receive connections handed over by a `use_original_dst` listener.
        return bad(format!("{root}.bind_to_port"), "listeners that do not bind are not supported");
    }
    if l.api_listener.is_some() || l.udp_listener_config.is_some() {
        return bad(format!("{root}.api_listener"), "only TCP listeners are supported");
    }
    let mut transparent =
        l.use_original_dst.as_ref().is_some_and(|b| b.value) || l.transparent.as_ref().is_some_and(|b| b.value);
    for (i, lf) in l.listener_filters.iter().enumerate() {
        let field = format!("{root}.listener_filters[{i}]");
        if lf.filter_disabled.is_some() {
            return bad(format!("{field}.filter_disabled"), "conditional listener filters are not supported");
        }
        if let Some(listener_filter::ConfigType::ConfigDiscovery(_)) = lf.config_type {
            return bad(format!("{field}.config_discovery"), "discovered listener filters are not supported");
        }
        match lf.name.as_str() {
            "envoy.filters.listener.original_dst" => transparent = true,
            // Inspectors only feed chain matching on SNI / ALPN / transport, which is refused below.
            "envoy.filters.listener.tls_inspector" | "envoy.filters.listener.http_inspector" => {}
            other => return bad(format!("{field}.name"), format!("listener filter {other:?} is not supported")),
        }
    }

    let mut rds = BTreeSet::new();
    let mut inline_routes = BTreeMap::new();
    let mut tls: Option<(TlsSecrets, bool)> = None;
    let mut http: Option<HcmSettings> = None;
    let mut idle: Option<u32> = None;
    let mut tls_seen = false;
    let mut plain_seen = false;
    let mut take = |chain: &Chain, field: &str| -> Result<(), Invalid> {
        match &chain.tls {
            Some(t) => {
                if plain_seen || tls.as_ref().is_some_and(|seen| seen != t) {
                    return bad(format!("{field}.transport_socket"), "all filter chains must share one TLS setting");
                }
                tls_seen = true;
                tls = Some(t.clone());
            }
            None => {
                if tls_seen {
                    return bad(format!("{field}.transport_socket"), "all filter chains must share one TLS setting");
                }
                plain_seen = true;
            }
        }
        if idle.is_some_and(|seen| seen != chain.idle_ms) {
            return bad(format!("{field}.filters"), "all filter chains of a listener must share one idle timeout");
        }
        idle = Some(chain.idle_ms);
        if let Some(h) = chain.http {
            if http.is_some_and(|seen| seen != h) {
                return bad(
                    format!("{field}.filters"),
                    "all HTTP connection managers of a listener must share timeouts and header limits",
                );
            }
            http = Some(h);
        }
        if let Some(r) = &chain.rds {
            rds.insert(r.clone());
        }
        if let Some((id, table)) = &chain.inline
            && inline_routes.insert(id.clone(), table.clone()).is_some_and(|prev| &prev != table)
        {
            return bad(format!("{field}.filters"), format!("two inline route configurations are named {id:?}"));
        }
        Ok(())
    };

    // Envoy picks the chain with the most specific destination: an exact port beats no port, then the longest
    // matching prefix. The model takes the first match, so destinations are ordered by that specificity.
    let mut destinations: Vec<(u16, Option<IpPrefix>, Handler, String)> = Vec::new();
    for (c, fc) in l.filter_chains.iter().enumerate() {
        let field = format!("{root}.filter_chains[{c}]");
        let chain = filter_chain(fc, &field)?;
        take(&chain, &field)?;
        let (port, prefixes) = chain_match(fc, &field)?;
        for prefix in prefixes {
            if let Some((.., other)) = destinations.iter().find(|(p, pre, ..)| *p == port && *pre == prefix) {
                return bad(format!("{field}.filter_chain_match"), format!("matches the same as {other}"));
            }
            destinations.push((port, prefix, chain.handler.clone(), field.clone()));
        }
    }
    let default = match &l.default_filter_chain {
        Some(fc) => {
            let field = format!("{root}.default_filter_chain");
            if fc.filter_chain_match.is_some() {
                return bad(format!("{field}.filter_chain_match"), "the default chain cannot have a match");
            }
            let chain = filter_chain(fc, &field)?;
            take(&chain, &field)?;
            chain.handler
        }
        None => Handler::Reject,
    };
    // A port with chains but none covering every address: Envoy does not fall back to port-less chains there,
    // it uses the default chain.
    let ports: BTreeSet<u16> = destinations.iter().map(|d| d.0).filter(|p| *p != 0).collect();
    for port in ports {
        let covered = destinations.iter().any(|(p, pre, ..)| *p == port && pre.is_none_or(|pre| pre.len == 0));
        let portless = destinations.iter().any(|(p, ..)| *p == 0);
        if !covered && portless {
            destinations.push((port, None, default.clone(), "default_filter_chain".into()));
        }
    }
    destinations.sort_by_key(|(port, prefix, ..)| (*port == 0, std::cmp::Reverse(prefix.map_or(0, |p| p.len + 1))));

    let settings = http.unwrap_or(HcmSettings {
        request_headers_ms: ListenerTimeouts::default().request_headers_ms,
        max_request_headers_bytes: ENVOY_MAX_REQUEST_HEADERS_KB * 1024,
    });
    let defaults = ListenerTimeouts::default();
    let spec = ListenerSpec {
        address,
        transparent,
        destinations: destinations
            .into_iter()
            .map(|(port, prefix, handler, _)| Destination { prefix, port, handler })
            .collect(),
        default,
        tls: tls.as_ref().map(|(t, require)| DownstreamTls {
            certificate: t.certificate.clone(),
            require_client_certificate: *require,
            // Envoy's API has no kernel TLS setting: xDS listeners keep their records in userspace.
            kernel_tls: None,
        }),
        policies: Vec::new(),
        timeouts: ListenerTimeouts {
            request_headers_ms: settings.request_headers_ms,
            idle_ms: idle.unwrap_or(ENVOY_IDLE_MS),
            drain_ms: defaults.drain_ms,
        },
        max_request_headers_bytes: settings.max_request_headers_bytes,
    };
    spec.validate().map_err(|e| reroot("listener", &l.name, e))?;
    Ok(XdsListener { spec, rds, inline_routes, tls: tls.map(|(t, _)| t) })
}

/// The destination port (`0`: any) and prefixes (`None`: any) a chain matches.
fn chain_match(fc: &FilterChain, field: &str) -> Result<(u16, Vec<Option<IpPrefix>>), Invalid> {
    let Some(m) = &fc.filter_chain_match else {
        return Ok((0, vec![None]));
    };
    let field = format!("{field}.filter_chain_match");
    let unsupported = [
        ("address_suffix", !m.address_suffix.is_empty() || m.suffix_len.is_some()),
        ("direct_source_prefix_ranges", !m.direct_source_prefix_ranges.is_empty()),
        ("source_type", m.source_type != 0),
        ("source_prefix_ranges", !m.source_prefix_ranges.is_empty()),
        ("source_ports", !m.source_ports.is_empty()),
        ("server_names", !m.server_names.is_empty()),
        ("application_protocols", !m.application_protocols.is_empty()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{field}.{name}"), "matching on it is not supported");
    }
    let tls_chain = fc.transport_socket.is_some();
    match m.transport_protocol.as_str() {
        "" => {}
        "tls" if tls_chain => {}
        "raw_buffer" if !tls_chain => {}
        other => return bad(format!("{field}.transport_protocol"), format!("matching on {other:?} is not supported")),
    }
    let port = match &m.destination_port {
        None => 0,
        Some(p) => match u16::try_from(p.value) {
            Ok(p) if p != 0 => p,
            _ => return bad(format!("{field}.destination_port"), format!("{} is not a port", p.value)),
        },
    };
    if m.prefix_ranges.is_empty() {
        return Ok((port, vec![None]));
    }
    let mut prefixes = Vec::new();
    for (i, r) in m.prefix_ranges.iter().enumerate() {
        let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
        let text = format!("{}/{len}", r.address_prefix);
        let prefix: IpPrefix =
            text.parse().map_err(|e: String| Invalid { field: format!("{field}.prefix_ranges[{i}]"), message: e })?;
        prefixes.push(Some(prefix));
    }
    Ok((port, prefixes))
}

fn filter_chain(fc: &FilterChain, field: &str) -> Result<Chain, Invalid> {
    if fc.use_proxy_proto.as_ref().is_some_and(|b| b.value) {
        return bad(format!("{field}.use_proxy_proto"), "PROXY protocol is not supported");
    }
    let tls =
        fc.transport_socket.as_ref().map(|ts| downstream_tls(ts, &format!("{field}.transport_socket"))).transpose()?;
    let Some((last, rest)) = fc.filters.split_last() else {
        return bad(format!("{field}.filters"), "must end in tcp_proxy or http_connection_manager");
    };
    if let Some((i, f)) = rest.iter().enumerate().next() {
        return bad(format!("{field}.filters[{i}]"), format!("network filter {:?} is not supported", f.name));
    }
    let ffield = format!("{field}.filters[{}]", rest.len());
    let any = match &last.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        _ => return bad(format!("{ffield}.typed_config"), "must be set"),
    };
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    if last.name == TCP_PROXY || type_name == "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" {
        let tp: TcpProxy = unpack(any, &format!("{ffield}.typed_config"))?;
        let cluster = match &tp.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => c.clone(),
            Some(tcp_proxy::ClusterSpecifier::WeightedClusters(_)) => {
                return bad(format!("{ffield}.weighted_clusters"), "weighted TCP clusters are not supported");
            }
            None => return bad(format!("{ffield}.cluster"), "must be set"),
        };
        if tp.tunneling_config.is_some() {
            return bad(format!("{ffield}.tunneling_config"), "tunneling is not supported");
        }
        if tp.metadata_match.is_some() {
            return bad(format!("{ffield}.metadata_match"), "subset matching is not supported");
        }
        let idle_ms = opt_millis(&tp.idle_timeout, &format!("{ffield}.idle_timeout"))?.unwrap_or(ENVOY_IDLE_MS);
        return Ok(Chain { handler: Handler::Tcp { cluster }, idle_ms, tls, http: None, rds: None, inline: None });
    }
    if last.name == HCM
        || type_name == "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    {
        let hcm: HttpConnectionManager = unpack(any, &format!("{ffield}.typed_config"))?;
        return http_chain(&hcm, &ffield, tls);
    }
    bad(format!("{ffield}.name"), format!("network filter {:?} is not supported", last.name))
}

fn http_chain(hcm: &HttpConnectionManager, field: &str, tls: Option<(TlsSecrets, bool)>) -> Result<Chain, Invalid> {
    let codec = match CodecType::try_from(hcm.codec_type) {
        Ok(CodecType::Auto) => HttpCodec::Auto,
        Ok(CodecType::Http1) => HttpCodec::Http1,
        Ok(CodecType::Http2) => HttpCodec::Http2,
        _ => return bad(format!("{field}.codec_type"), "only AUTO, HTTP1 and HTTP2 are supported"),
    };
    for (i, f) in hcm.http_filters.iter().enumerate() {
        let last = i + 1 == hcm.http_filters.len();
        if f.name != ROUTER || !last {
            return bad(format!("{field}.http_filters[{i}]"), format!("HTTP filter {:?} is not supported", f.name));
        }
        if let Some(http_filter::ConfigType::ConfigDiscovery(_)) = f.config_type {
            return bad(format!("{field}.http_filters[{i}]"), "discovered HTTP filters are not supported");
        }
    }
    if hcm.http_filters.is_empty() {
        return bad(format!("{field}.http_filters"), "must end in envoy.filters.http.router");
    }
    if !hcm.upgrade_configs.is_empty() && hcm.upgrade_configs.iter().any(|u| u.enabled.as_ref().is_none_or(|e| e.value))
    {
        return bad(format!("{field}.upgrade_configs"), "protocol upgrades are not supported");
    }
    let (route_table, rds, inline) = match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(r)) => {
            validate_ref(&format!("{field}.rds.route_config_name"), &r.route_config_name)?;
            (r.route_config_name.clone(), Some(r.route_config_name.clone()), None)
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            // Unnamed inline tables are named by where they sit, which no RDS name can collide with.
            let id = if rc.name.is_empty() { format!("{field}.route_config") } else { rc.name.clone() };
            let table = route_table_named(rc, &format!("{field}.route_config"))?;
            (id.clone(), None, Some((id, table)))
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            return bad(format!("{field}.scoped_routes"), "scoped routes are not supported");
        }
        None => return bad(format!("{field}.rds"), "must name a route configuration"),
    };
    let request_headers_ms =
        opt_millis(&hcm.request_headers_timeout, &format!("{field}.request_headers_timeout"))?.unwrap_or(0);
    let idle_ms = opt_millis(
        &hcm.common_http_protocol_options.as_ref().and_then(|o| o.idle_timeout),
        &format!("{field}.common_http_protocol_options.idle_timeout"),
    )?
    .unwrap_or(ENVOY_IDLE_MS);
    let max_request_headers_bytes =
        hcm.max_request_headers_kb.as_ref().map_or(ENVOY_MAX_REQUEST_HEADERS_KB, |v| v.value).saturating_mul(1024);
    Ok(Chain {
        handler: Handler::Http { route_table, codec },
        tls,
        idle_ms,
        http: Some(HcmSettings { request_headers_ms, max_request_headers_bytes }),
        rds,
        inline,
    })
}

/// The SDS secret names of a TLS context; the validation context (trust bundle) is mandatory because the model
/// checks peers against the bundle paired with the certificate.
fn common_tls(ctx: &Option<CommonTlsContext>, field: &str) -> Result<(TlsSecrets, Vec<SpiffeId>), Invalid> {
    let field = format!("{field}.common_tls_context");
    let Some(ctx) = ctx else {
        return bad(field, "must be set");
    };
    if !ctx.tls_certificates.is_empty() {
        return bad(format!("{field}.tls_certificates"), "inline certificates are not supported; use SDS");
    }
    let [cert] = ctx.tls_certificate_sds_secret_configs.as_slice() else {
        return bad(format!("{field}.tls_certificate_sds_secret_configs"), "must name exactly one SDS secret");
    };
    validate_ref(&format!("{field}.tls_certificate_sds_secret_configs[0].name"), &cert.name)?;
    let (validation, sans) = match &ctx.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => (s.name.clone(), Vec::new()),
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            let Some(s) = &c.validation_context_sds_secret_config else {
                return bad(format!("{field}.combined_validation_context"), "must name an SDS secret");
            };
            let sans = match &c.default_validation_context {
                Some(v) => {
                    let vfield = format!("{field}.combined_validation_context.default_validation_context");
                    if v.trusted_ca.is_some()
                        || !v.verify_certificate_spki.is_empty()
                        || !v.verify_certificate_hash.is_empty()
                        || v.crl.is_some()
                        || v.custom_validator_config.is_some()
                    {
                        return bad(vfield, "only subject alt name matchers are supported here");
                    }
                    san_matchers(&v.match_typed_subject_alt_names, &v.match_subject_alt_names, &vfield)?
                }
                None => Vec::new(),
            };
            (s.name.clone(), sans)
        }
        _ => return bad(format!("{field}.validation_context_sds_secret_config"), "must name an SDS trust bundle"),
    };
    validate_ref(&format!("{field}.validation_context_sds_secret_config.name"), &validation)?;
    Ok((TlsSecrets { certificate: cert.name.clone(), validation }, sans))
}

fn san_matchers(
    typed: &[SubjectAltNameMatcher],
    legacy: &[StringMatcher],
    field: &str,
) -> Result<Vec<SpiffeId>, Invalid> {
    let exact = |m: &StringMatcher, f: String| -> Result<SpiffeId, Invalid> {
        match (&m.match_pattern, m.ignore_case) {
            (Some(MatchPattern::Exact(s)), false) => {
                s.parse().map_err(|e: String| Invalid { field: f, message: format!("not a SPIFFE ID: {e}") })
            }
            _ => bad(f, "only exact SPIFFE ID matches are supported"),
        }
    };
    let mut ids = Vec::new();
    for (i, m) in typed.iter().enumerate() {
        let f = format!("{field}.match_typed_subject_alt_names[{i}]");
        if SanType::try_from(m.san_type) != Ok(SanType::Uri) {
            return bad(format!("{f}.san_type"), "only URI SANs are supported");
        }
        let Some(matcher) = &m.matcher else {
            return bad(format!("{f}.matcher"), "must be set");
        };
        ids.push(exact(matcher, format!("{f}.matcher"))?);
    }
    for (i, m) in legacy.iter().enumerate() {
        ids.push(exact(m, format!("{field}.match_subject_alt_names[{i}]"))?);
    }
    Ok(ids)
}

fn downstream_tls(ts: &TransportSocket, field: &str) -> Result<(TlsSecrets, bool), Invalid> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return bad(format!("{field}.typed_config"), "must be set");
    };
    let ctx: DownstreamTlsContext = unpack(any, &format!("{field}.typed_config"))?;
    let field = format!("{field}.typed_config");
    if ctx.require_sni.as_ref().is_some_and(|b| b.value) {
        return bad(format!("{field}.require_sni"), "is not supported");
    }
    let (secrets, sans) = common_tls(&ctx.common_tls_context, &field)?;
    if !sans.is_empty() {
        return bad(
            format!("{field}.common_tls_context.combined_validation_context"),
            "client SAN matching is not supported; use authorization policies",
        );
    }
    Ok((secrets, ctx.require_client_certificate.as_ref().is_some_and(|b| b.value)))
}

// ---------------------------------------------------------------------------------------------------------------
// RDS
// ---------------------------------------------------------------------------------------------------------------

/// Converts an RDS `RouteConfiguration`.
pub fn route_table(rc: &RouteConfiguration) -> Result<RouteTableSpec, Invalid> {
    let root = format!("route_configuration[{}]", rc.name);
    validate_ref(&format!("{root}.name"), &rc.name)?;
    route_table_named(rc, &root)
}

fn route_table_named(rc: &RouteConfiguration, root: &str) -> Result<RouteTableSpec, Invalid> {
    if rc.vhds.is_some() {
        return bad(format!("{root}.vhds"), "virtual host discovery is not supported");
    }
    if !rc.cluster_specifier_plugins.is_empty() {
        return bad(format!("{root}.cluster_specifier_plugins"), "is not supported");
    }
    if !rc.request_mirror_policies.is_empty() {
        return bad(format!("{root}.request_mirror_policies"), "mirroring is not supported");
    }
    if !rc.vhost_header.is_empty() {
        return bad(format!("{root}.vhost_header"), "is not supported");
    }
    let global = Mutations::new(
        &rc.request_headers_to_add,
        &rc.request_headers_to_remove,
        &rc.response_headers_to_add,
        &rc.response_headers_to_remove,
        root,
    )?;
    let mut virtual_hosts = Vec::new();
    for (v, vh) in rc.virtual_hosts.iter().enumerate() {
        let vfield = format!("{root}.virtual_hosts[{v}]");
        if vh.matcher.is_some() {
            return bad(format!("{vfield}.matcher"), "matcher trees are not supported");
        }
        if TlsRequirementType::try_from(vh.require_tls) != Ok(TlsRequirementType::None) {
            return bad(format!("{vfield}.require_tls"), "is not supported");
        }
        if vh.cors.is_some() {
            return bad(format!("{vfield}.cors"), "CORS is not supported");
        }
        if !vh.rate_limits.is_empty() {
            return bad(format!("{vfield}.rate_limits"), "is not supported");
        }
        if vh.hedge_policy.is_some() || !vh.request_mirror_policies.is_empty() {
            return bad(format!("{vfield}.hedge_policy"), "hedging and mirroring are not supported");
        }
        if vh.retry_policy_typed_config.is_some() {
            return bad(format!("{vfield}.retry_policy_typed_config"), "is not supported");
        }
        let vhost = Mutations::new(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            &vfield,
        )?;
        let mut routes = Vec::new();
        for (r, rt) in vh.routes.iter().enumerate() {
            let rfield = format!("{vfield}.routes[{r}]");
            routes.push(route_entry(rt, r, &rfield, vh.retry_policy.as_ref(), &[&vhost, &global])?);
        }
        virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            routes,
        });
    }
    let table = RouteTableSpec { virtual_hosts };
    table.validate().map_err(|e| {
        let rest = e.field.strip_prefix("route_table.").unwrap_or(&e.field);
        Invalid { field: format!("{root}.{rest}"), message: e.message }
    })?;
    Ok(table)
}

/// Header mutations of one level (route, virtual host, route configuration).
#[derive(Default)]
struct Mutations {
    request_add: Vec<HeaderValue>,
    request_remove: Vec<String>,
    response_add: Vec<HeaderValue>,
    response_remove: Vec<String>,
}

impl Mutations {
    fn new(
        request_add: &[HeaderValueOption],
        request_remove: &[String],
        response_add: &[HeaderValueOption],
        response_remove: &[String],
        field: &str,
    ) -> Result<Self, Invalid> {
        Ok(Mutations {
            request_add: headers_to_add(request_add, &format!("{field}.request_headers_to_add"))?,
            request_remove: request_remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
            response_add: headers_to_add(response_add, &format!("{field}.response_headers_to_add"))?,
            response_remove: response_remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        })
    }
}

fn headers_to_add(list: &[HeaderValueOption], field: &str) -> Result<Vec<HeaderValue>, Invalid> {
    let mut out = Vec::new();
    for (i, hvo) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Some(h) = &hvo.header else {
            return bad(format!("{f}.header"), "must be set");
        };
        let value = if h.value.is_empty() && !h.raw_value.is_empty() {
            String::from_utf8(h.raw_value.clone())
                .map_err(|_| Invalid { field: format!("{f}.header.raw_value"), message: "is not UTF-8".into() })?
        } else {
            h.value.clone()
        };
        let append = match &hvo.append {
            Some(b) => b.value,
            None => match HeaderAppendAction::try_from(hvo.append_action) {
                Ok(HeaderAppendAction::AppendIfExistsOrAdd) => true,
                Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) => false,
                _ => return bad(format!("{f}.append_action"), "only append or overwrite-or-add are supported"),
            },
        };
        out.push(HeaderValue { name: h.key.to_ascii_lowercase(), value, append });
    }
    Ok(out)
}

fn route_entry(
    rt: &XdsRoute,
    index: usize,
    field: &str,
    vhost_retry: Option<&XdsRetry>,
    outer: &[&Mutations],
) -> Result<Route, Invalid> {
    let Some(m) = &rt.r#match else {
        return bad(format!("{field}.match"), "must be set");
    };
    let mfield = format!("{field}.match");
    if m.case_sensitive.as_ref().is_some_and(|b| !b.value) {
        return bad(format!("{mfield}.case_sensitive"), "case-insensitive paths are not supported");
    }
    let unsupported = [
        ("runtime_fraction", m.runtime_fraction.is_some()),
        ("query_parameters", !m.query_parameters.is_empty()),
        ("cookies", !m.cookies.is_empty()),
        ("grpc", m.grpc.is_some()),
        ("tls_context", m.tls_context.is_some()),
        ("dynamic_metadata", !m.dynamic_metadata.is_empty()),
        ("filter_state", !m.filter_state.is_empty()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{mfield}.{name}"), "matching on it is not supported");
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) if p.is_empty() => PathMatch::Prefix("/".into()),
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(r.regex.clone()),
        Some(PathSpecifier::PathSeparatedPrefix(_)) => {
            return bad(format!("{mfield}.path_separated_prefix"), "is not supported");
        }
        Some(PathSpecifier::ConnectMatcher(_)) => return bad(format!("{mfield}.connect_matcher"), "is not supported"),
        Some(PathSpecifier::PathMatchPolicy(_)) => {
            return bad(format!("{mfield}.path_match_policy"), "is not supported");
        }
        None => return bad(format!("{mfield}.path_specifier"), "must be set"),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_match(h, &format!("{mfield}.headers[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;

    let unsupported = [
        ("typed_per_filter_config", !rt.typed_per_filter_config.is_empty()),
        ("route_specifiers", !rt.route_specifiers.is_empty()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{field}.{name}"), "is not supported");
    }
    let action = match &rt.action {
        Some(route::Action::Route(ra)) => RouteAction::Forward(forward(ra, &format!("{field}.route"), vhost_retry)?),
        Some(route::Action::Redirect(r)) => RouteAction::Redirect(redirect(r, &format!("{field}.redirect"))?),
        Some(route::Action::DirectResponse(d)) => {
            let status = u16::try_from(d.status).map_err(|_| Invalid {
                field: format!("{field}.direct_response.status"),
                message: format!("{} is not an HTTP status", d.status),
            })?;
            let body = match &d.body {
                Some(_) => data_source(&d.body, &format!("{field}.direct_response.body"))?,
                None => String::new(),
            };
            if d.body_format.is_some() {
                return bad(format!("{field}.direct_response.body_format"), "is not supported");
            }
            RouteAction::DirectResponse { status, body }
        }
        _ => return bad(format!("{field}.action"), "only route, redirect and direct_response are supported"),
    };
    let own = Mutations::new(
        &rt.request_headers_to_add,
        &rt.request_headers_to_remove,
        &rt.response_headers_to_add,
        &rt.response_headers_to_remove,
        field,
    )?;
    // Envoy applies the route's mutations, then the virtual host's, then the route configuration's.
    let mut all = Mutations::default();
    for level in std::iter::once(&own).chain(outer.iter().copied()) {
        all.request_add.extend(level.request_add.iter().cloned());
        all.request_remove.extend(level.request_remove.iter().cloned());
        all.response_add.extend(level.response_add.iter().cloned());
        all.response_remove.extend(level.response_remove.iter().cloned());
    }
    Ok(Route {
        name: if rt.name.is_empty() { format!("routes[{index}]") } else { rt.name.clone() },
        matcher: RouteMatch { path, headers },
        action,
        request_headers_to_add: all.request_add,
        request_headers_to_remove: all.request_remove,
        response_headers_to_add: all.response_add,
        response_headers_to_remove: all.response_remove,
    })
}

fn header_match(h: &HeaderMatcher, field: &str) -> Result<HeaderMatch, Invalid> {
    if h.treat_missing_header_as_empty {
        return bad(format!("{field}.treat_missing_header_as_empty"), "is not supported");
    }
    let mut invert = h.invert_match;
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(s)) => StringMatch::Exact(s.clone()),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => StringMatch::Prefix(s.clone()),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => StringMatch::Regex(format!(".*{}", regex::escape(s))),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => StringMatch::Regex(format!(".*{}.*", regex::escape(s))),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => StringMatch::Regex(r.regex.clone()),
        Some(HeaderMatchSpecifier::PresentMatch(present)) => {
            if !present {
                invert = !invert;
            }
            StringMatch::Present
        }
        Some(HeaderMatchSpecifier::StringMatch(m)) => string_match(m, &format!("{field}.string_match"))?,
        Some(HeaderMatchSpecifier::RangeMatch(_)) => return bad(format!("{field}.range_match"), "is not supported"),
        // Envoy: no specifier means "present".
        None => StringMatch::Present,
    };
    Ok(HeaderMatch { name: h.name.to_ascii_lowercase(), value, invert })
}

fn forward(ra: &XdsRouteAction, field: &str, vhost_retry: Option<&XdsRetry>) -> Result<Forward, Invalid> {
    let clusters = match &ra.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedCluster { cluster: c.clone(), weight: 1 }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let mut out = Vec::new();
            for (i, cw) in w.clusters.iter().enumerate() {
                let f = format!("{field}.weighted_clusters.clusters[{i}]");
                if !cw.cluster_header.is_empty() {
                    return bad(format!("{f}.cluster_header"), "is not supported");
                }
                if cw.metadata_match.is_some()
                    || !cw.request_headers_to_add.is_empty()
                    || !cw.request_headers_to_remove.is_empty()
                    || !cw.response_headers_to_add.is_empty()
                    || !cw.response_headers_to_remove.is_empty()
                    || !cw.typed_per_filter_config.is_empty()
                    || cw.host_rewrite_specifier.is_some()
                {
                    return bad(f, "per-cluster metadata, headers, filters and host rewrites are not supported");
                }
                let weight = cw.weight.as_ref().map_or(0, |w| w.value);
                if weight == 0 {
                    // Envoy never picks a zero-weight cluster; leaving it out keeps that meaning.
                    continue;
                }
                out.push(WeightedCluster { cluster: cw.name.clone(), weight });
            }
            out
        }
        Some(route_action::ClusterSpecifier::ClusterHeader(_)) => {
            return bad(format!("{field}.cluster_header"), "is not supported");
        }
        Some(_) => return bad(format!("{field}.cluster_specifier_plugin"), "is not supported"),
        None => return bad(format!("{field}.cluster"), "must be set"),
    };
    let unsupported = [
        ("cluster_not_found_response_code", ra.cluster_not_found_response_code != 0),
        ("metadata_match", ra.metadata_match.is_some()),
        ("regex_rewrite", ra.regex_rewrite.is_some()),
        ("path_rewrite_policy", ra.path_rewrite_policy.is_some()),
        ("path_rewrite", !ra.path_rewrite.is_empty()),
        ("request_mirror_policies", !ra.request_mirror_policies.is_empty()),
        ("rate_limits", !ra.rate_limits.is_empty()),
        ("cors", ra.cors.is_some()),
        ("hedge_policy", ra.hedge_policy.is_some()),
        ("retry_policy_typed_config", ra.retry_policy_typed_config.is_some()),
        ("internal_redirect_policy", ra.internal_redirect_policy.is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{field}.{name}"), "is not supported");
    }
    let host_rewrite = match &ra.host_rewrite_specifier {
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(_) => return bad(format!("{field}.host_rewrite_specifier"), "only host_rewrite_literal is supported"),
        None => None,
    };
    let timeout_ms = opt_millis(&ra.timeout, &format!("{field}.timeout"))?.unwrap_or(ENVOY_ROUTE_TIMEOUT_MS);
    let retry = match ra.retry_policy.as_ref().or(vhost_retry) {
        Some(r) => Some(retry_policy(r, &format!("{field}.retry_policy"))?),
        None => None,
    };
    Ok(Forward {
        clusters,
        timeout_ms,
        prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
        host_rewrite,
        retry,
    })
}

fn retry_policy(r: &XdsRetry, field: &str) -> Result<RetryPolicy, Invalid> {
    let mut retry_on = BTreeSet::new();
    for cond in r.retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        retry_on.insert(match cond {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "connect-failure" => RetryOn::ConnectFailure,
            "reset" => RetryOn::Reset,
            "unavailable" => RetryOn::Unavailable,
            other => return bad(format!("{field}.retry_on"), format!("condition {other:?} is not supported")),
        });
    }
    let unsupported = [
        ("retry_priority", r.retry_priority.is_some()),
        ("retry_host_predicate", !r.retry_host_predicate.is_empty()),
        ("retriable_status_codes", !r.retriable_status_codes.is_empty()),
        ("retriable_headers", !r.retriable_headers.is_empty()),
        ("retriable_request_headers", !r.retriable_request_headers.is_empty()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{field}.{name}"), "is not supported");
    }
    Ok(RetryPolicy {
        attempts: r.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout_ms: opt_millis(&r.per_try_timeout, &format!("{field}.per_try_timeout"))?.unwrap_or(0),
        retry_on,
        // Envoy bounds retries by the circuit breaker's max_retries only; no budget.
        budget_percent: 100,
        min_retry_concurrency: ENVOY_CIRCUIT_BREAKER.max_retries,
    })
}

fn redirect(r: &RedirectAction, field: &str) -> Result<Redirect, Invalid> {
    if r.strip_query {
        return bad(format!("{field}.strip_query"), "is not supported");
    }
    let scheme = match &r.scheme_rewrite_specifier {
        Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(false)) | None => None,
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let path = match &r.path_rewrite_specifier {
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
        Some(_) => return bad(format!("{field}.path_rewrite_specifier"), "only path_redirect is supported"),
        None => None,
    };
    let host = match (r.host_redirect.as_str(), r.port_redirect) {
        ("", 0) => None,
        (h, 0) => Some(h.to_string()),
        ("", _) => return bad(format!("{field}.port_redirect"), "needs host_redirect"),
        (h, p) => Some(format!("{h}:{p}")),
    };
    let status = match redirect_action::RedirectResponseCode::try_from(r.response_code) {
        Ok(redirect_action::RedirectResponseCode::MovedPermanently) => 301,
        Ok(redirect_action::RedirectResponseCode::Found) => 302,
        Ok(redirect_action::RedirectResponseCode::SeeOther) => 303,
        Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => return bad(format!("{field}.response_code"), format!("{} is not known", r.response_code)),
    };
    Ok(Redirect { scheme, host, path, status })
}

// ---------------------------------------------------------------------------------------------------------------
// CDS / EDS
// ---------------------------------------------------------------------------------------------------------------

/// Converts a CDS `Cluster`.
pub fn cluster(c: &Cluster) -> Result<XdsCluster, Invalid> {
    let root = format!("cluster[{}]", c.name);
    validate_ref(&format!("{root}.name"), &c.name)?;
    let kind = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t).ok(),
        Some(ClusterDiscoveryType::ClusterType(_)) => None,
        None => Some(DiscoveryType::Static),
    };
    let (endpoints, eds_service) = match kind {
        Some(DiscoveryType::Static) => {
            let endpoints = match &c.load_assignment {
                Some(cla) => endpoints_at(cla, &format!("{root}.load_assignment"))?,
                None => Vec::new(),
            };
            (endpoints, None)
        }
        Some(DiscoveryType::Eds) => {
            let service = c.eds_cluster_config.as_ref().map(|e| e.service_name.clone()).unwrap_or_default();
            (Vec::new(), Some(if service.is_empty() { c.name.clone() } else { service }))
        }
        _ => return bad(format!("{root}.type"), "only STATIC and EDS clusters are supported"),
    };
    let unsupported = [
        ("transport_socket_matches", !c.transport_socket_matches.is_empty() || c.transport_socket_matcher.is_some()),
        ("lb_subset_config", c.lb_subset_config.is_some()),
        ("load_balancing_policy", c.load_balancing_policy.is_some() || c.lb_config.is_some()),
        ("filters", !c.filters.is_empty()),
        ("upstream_config", c.upstream_config.is_some()),
        ("upstream_bind_config", c.upstream_bind_config.is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return bad(format!("{root}.{name}"), "is not supported");
    }
    let lb = match XdsLb::try_from(c.lb_policy) {
        Ok(XdsLb::RoundRobin) => LbPolicy::RoundRobin,
        Ok(XdsLb::LeastRequest) => LbPolicy::LeastRequest,
        Ok(XdsLb::Random) => LbPolicy::Random,
        Ok(other) => {
            return bad(format!("{root}.lb_policy"), format!("{} is not supported", other.as_str_name()));
        }
        Err(_) => return bad(format!("{root}.lb_policy"), format!("{} is not a known policy", c.lb_policy)),
    };
    let connect_timeout_ms =
        opt_millis(&c.connect_timeout, &format!("{root}.connect_timeout"))?.unwrap_or(ENVOY_CONNECT_TIMEOUT_MS);

    let mut protocol = UpstreamProtocol::Http1;
    let mut common_http = c.common_http_protocol_options;
    if c.http2_protocol_options.is_some() {
        protocol = UpstreamProtocol::Http2;
    }
    for (key, any) in &c.typed_extension_protocol_options {
        let field = format!("{root}.typed_extension_protocol_options[{key}]");
        if key != HTTP_PROTOCOL_OPTIONS {
            return bad(field, "is not supported");
        }
        let opts: HttpProtocolOptions = unpack(any, &field)?;
        match &opts.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => protocol = UpstreamProtocol::Http2,
                Some(ProtocolConfig::HttpProtocolOptions(_)) => protocol = UpstreamProtocol::Http1,
                _ => return bad(format!("{field}.explicit_http_config"), "only HTTP/1.1 or HTTP/2 are supported"),
            },
            Some(_) => {
                return bad(format!("{field}.upstream_protocol_options"), "only explicit_http_config is supported");
            }
            None => {}
        }
        if !opts.http_filters.is_empty() || opts.retry_policy.is_some() || !opts.request_mirror_policies.is_empty() {
            return bad(field, "upstream filters, retries and mirrors are not supported");
        }
        if opts.common_http_protocol_options.is_some() {
            common_http = opts.common_http_protocol_options;
        }
    }
    let idle_timeout_ms = opt_millis(
        &common_http.as_ref().and_then(|o| o.idle_timeout),
        &format!("{root}.common_http_protocol_options.idle_timeout"),
    )?
    .unwrap_or(ENVOY_UPSTREAM_IDLE_MS);

    let circuit_breaker = match c.circuit_breakers.as_ref().and_then(|cb| cb.thresholds.first()) {
        Some(t) => {
            let d = ENVOY_CIRCUIT_BREAKER;
            CircuitBreaker {
                max_connections: t.max_connections.as_ref().map_or(d.max_connections, |v| v.value),
                max_pending_requests: t.max_pending_requests.as_ref().map_or(d.max_pending_requests, |v| v.value),
                max_requests: t.max_requests.as_ref().map_or(d.max_requests, |v| v.value),
                max_retries: t.max_retries.as_ref().map_or(d.max_retries, |v| v.value),
            }
        }
        None => ENVOY_CIRCUIT_BREAKER,
    };
    let outlier_detection = c.outlier_detection.as_ref().map(|od| {
        let enforcing = |v: &Option<_>, default: u32| -> bool {
            let v: &Option<envoy_types::pb::google::protobuf::UInt32Value> = v;
            v.as_ref().map_or(default, |v| v.value) > 0
        };
        let consecutive_5xx = if enforcing(&od.enforcing_consecutive_5xx, 100) {
            od.consecutive_5xx.as_ref().map_or(5, |v| v.value)
        } else {
            0
        };
        let consecutive_gateway_errors = if enforcing(&od.enforcing_consecutive_gateway_failure, 0) {
            od.consecutive_gateway_failure.as_ref().map_or(5, |v| v.value)
        } else {
            0
        };
        (consecutive_5xx, consecutive_gateway_errors, od)
    });
    let outlier_detection = match outlier_detection {
        Some((consecutive_5xx, consecutive_gateway_errors, od)) => Some(OutlierDetection {
            consecutive_5xx,
            consecutive_gateway_errors,
            base_ejection_ms: opt_millis(
                &od.base_ejection_time,
                &format!("{root}.outlier_detection.base_ejection_time"),
            )?
            .unwrap_or(30_000),
            max_ejection_percent: od.max_ejection_percent.as_ref().map_or(10, |v| v.value),
        }),
        None => None,
    };

    let health_check = match c.health_checks.as_slice() {
        [] => None,
        [hc] => Some(health_check(hc, &format!("{root}.health_checks[0]"))?),
        _ => return bad(format!("{root}.health_checks"), "at most one health check is supported"),
    };

    let (tls, tls_secrets) = match &c.transport_socket {
        None => (None, None),
        Some(ts) => {
            let field = format!("{root}.transport_socket");
            let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
                return bad(format!("{field}.typed_config"), "must be set");
            };
            let ctx: UpstreamTlsContext = unpack(any, &format!("{field}.typed_config"))?;
            let field = format!("{field}.typed_config");
            if ctx.auto_host_sni || ctx.auto_sni_san_validation {
                return bad(format!("{field}.auto_host_sni"), "automatic SNI is not supported");
            }
            let (secrets, server_identities) = common_tls(&ctx.common_tls_context, &field)?;
            let tls = UpstreamTls {
                certificate: secrets.certificate.clone(),
                server_identities,
                sni: ctx.sni.clone(),
                kernel_tls: None,
            };
            (Some(tls), Some(secrets))
        }
    };

    let spec = ClusterSpec {
        protocol,
        endpoints,
        lb,
        connect_timeout_ms,
        idle_timeout_ms,
        circuit_breaker,
        health_check,
        outlier_detection,
        tls,
    };
    spec.validate().map_err(|e| reroot("cluster", &c.name, e))?;
    Ok(XdsCluster { spec, eds_service, tls: tls_secrets })
}

fn health_check(
    hc: &envoy_types::pb::envoy::config::core::v3::HealthCheck,
    field: &str,
) -> Result<HealthCheck, Invalid> {
    let kind = match &hc.health_checker {
        Some(health_check::HealthChecker::TcpHealthCheck(t)) => {
            if t.send.is_some() || !t.receive.is_empty() || t.proxy_protocol_config.is_some() {
                return bad(format!("{field}.tcp_health_check"), "payload checks are not supported");
            }
            HealthCheckKind::Tcp
        }
        Some(health_check::HealthChecker::HttpHealthCheck(h)) => {
            if h.send.is_some()
                || !h.receive.is_empty()
                || !h.expected_statuses.is_empty()
                || !h.request_headers_to_add.is_empty()
                || h.service_name_matcher.is_some()
                || h.method != 0
            {
                return bad(
                    format!("{field}.http_health_check"),
                    "only path and host are supported (GET, 2xx expected)",
                );
            }
            HealthCheckKind::Http { path: h.path.clone(), host: h.host.clone() }
        }
        _ => return bad(format!("{field}.health_checker"), "only TCP and HTTP health checks are supported"),
    };
    if hc.alt_port.is_some() {
        return bad(format!("{field}.alt_port"), "is not supported");
    }
    Ok(HealthCheck {
        kind,
        interval_ms: opt_millis(&hc.interval, &format!("{field}.interval"))?.unwrap_or(0),
        timeout_ms: opt_millis(&hc.timeout, &format!("{field}.timeout"))?.unwrap_or(0),
        unhealthy_threshold: hc.unhealthy_threshold.as_ref().map_or(0, |v| v.value),
        healthy_threshold: hc.healthy_threshold.as_ref().map_or(0, |v| v.value),
    })
}

/// Converts an EDS `ClusterLoadAssignment`; the result belongs to the clusters whose EDS service name is
/// `cla.cluster_name`.
pub fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<Endpoint>, Invalid> {
    let root = format!("cluster_load_assignment[{}]", cla.cluster_name);
    validate_ref(&format!("{root}.cluster_name"), &cla.cluster_name)?;
    endpoints_at(cla, &root)
}

fn endpoints_at(cla: &ClusterLoadAssignment, root: &str) -> Result<Vec<Endpoint>, Invalid> {
    if !cla.named_endpoints.is_empty() {
        return bad(format!("{root}.named_endpoints"), "is not supported");
    }
    if cla.policy.as_ref().is_some_and(|p| !p.drop_overloads.is_empty()) {
        return bad(format!("{root}.policy.drop_overloads"), "is not supported");
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (l, lle) in cla.endpoints.iter().enumerate() {
        let lfield = format!("{root}.endpoints[{l}]");
        if lle.priority != 0 {
            return bad(format!("{lfield}.priority"), "priority failover is not supported");
        }
        let locality = lle
            .locality
            .as_ref()
            .map(|l| {
                if l.zone.is_empty() && l.sub_zone.is_empty() {
                    l.region.clone()
                } else {
                    format!("{}/{}/{}", l.region, l.zone, l.sub_zone)
                }
            })
            .unwrap_or_default();
        for (e, lbe) in lle.lb_endpoints.iter().enumerate() {
            let efield = format!("{lfield}.lb_endpoints[{e}]");
            let ep = match &lbe.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => ep,
                _ => return bad(format!("{efield}.endpoint"), "must be set"),
            };
            if !ep.additional_addresses.is_empty() {
                return bad(format!("{efield}.endpoint.additional_addresses"), "is not supported");
            }
            let address = socket_address(&ep.address, &format!("{efield}.endpoint.address"))?;
            if !seen.insert(address) {
                return bad(format!("{efield}.endpoint.address"), format!("{address} is listed twice"));
            }
            let health = match HealthStatus::try_from(lbe.health_status) {
                Ok(HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded) => EndpointHealth::Healthy,
                Ok(HealthStatus::Unhealthy | HealthStatus::Timeout) => EndpointHealth::Unhealthy,
                Ok(HealthStatus::Draining) => EndpointHealth::Draining,
                Err(_) => return bad(format!("{efield}.health_status"), "is not a known status"),
            };
            let weight = lbe.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if !(1..=128).contains(&weight) {
                return bad(format!("{efield}.load_balancing_weight"), format!("{weight} is not in 1..=128"));
            }
            out.push(Endpoint { address, weight, locality: locality.clone(), health });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// SDS
// ---------------------------------------------------------------------------------------------------------------

/// Converts an SDS `Secret`: a TLS certificate (chain + key) or a validation context (trust bundle).
pub fn secret(s: &Secret) -> Result<XdsSecret, Invalid> {
    let root = format!("secret[{}]", s.name);
    validate_ref(&format!("{root}.name"), &s.name)?;
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            let f = format!("{root}.tls_certificate");
            if t.pkcs12.is_some() || t.private_key_provider.is_some() || t.password.is_some() {
                return bad(f, "only PEM certificate_chain and private_key are supported");
            }
            let chain_pem = data_source(&t.certificate_chain, &format!("{f}.certificate_chain"))?;
            let key_pem = data_source(&t.private_key, &format!("{f}.private_key"))?;
            if !chain_pem.contains("-----BEGIN CERTIFICATE-----") {
                return bad(format!("{f}.certificate_chain"), "must hold a PEM CERTIFICATE block");
            }
            if !key_pem.contains("PRIVATE KEY-----") {
                return bad(format!("{f}.private_key"), "must hold a PEM PRIVATE KEY block");
            }
            Ok(XdsSecret::Certificate { chain_pem, key_pem })
        }
        Some(secret::Type::ValidationContext(v)) => {
            let f = format!("{root}.validation_context");
            if !v.match_typed_subject_alt_names.is_empty()
                || !v.match_subject_alt_names.is_empty()
                || !v.verify_certificate_spki.is_empty()
                || !v.verify_certificate_hash.is_empty()
                || v.crl.is_some()
                || v.custom_validator_config.is_some()
            {
                return bad(f, "only trusted_ca is supported");
            }
            let pem = data_source(&v.trusted_ca, &format!("{f}.trusted_ca"))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return bad(format!("{f}.trusted_ca"), "must hold a PEM CERTIFICATE block");
            }
            Ok(XdsSecret::TrustBundle { pem })
        }
        _ => bad(format!("{root}.type"), "only tls_certificate and validation_context are supported"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Assembly
// ---------------------------------------------------------------------------------------------------------------

/// Builds the model from all accepted resources. A certificate is the TLS certificate secret paired with the
/// validation secret the TLS contexts naming it name. As in Envoy, a route to an unknown cluster answers 503 and a
/// TCP handler of an unknown cluster closes the connection. Objects that cannot be built faithfully yet are held
/// back (reported in [`Assembled::warming`]): a cluster or listener whose certificate secrets have not arrived, a
/// route table splitting between known and unknown clusters, a listener whose route table is missing or held.
pub fn assemble(res: &XdsResources) -> Result<Assembled, Invalid> {
    let mut specs = MeshSpecs::default();
    let mut warming = Vec::new();

    // Certificates: every TLS context's (certificate, validation) pair; a certificate secret paired with two
    // different validation secrets would present one identity with two trust bundles.
    let mut pairs: BTreeMap<&str, (&str, String)> = BTreeMap::new();
    let users = res
        .clusters
        .iter()
        .filter_map(|(n, c)| c.tls.as_ref().map(|t| (format!("cluster[{n}].transport_socket"), t)))
        .chain(
            res.listeners
                .iter()
                .filter_map(|(n, l)| l.tls.as_ref().map(|t| (format!("listener[{n}].transport_socket"), t))),
        );
    for (field, t) in users {
        if let Some((validation, other)) = pairs.get(t.certificate.as_str())
            && *validation != t.validation
        {
            return bad(
                field,
                format!(
                    "pairs certificate secret {:?} with trust bundle {:?}, but {other} pairs it with {validation:?}",
                    t.certificate, t.validation
                ),
            );
        }
        pairs.insert(&t.certificate, (&t.validation, field));
    }
    for (cert, (validation, field)) in &pairs {
        match (res.secrets.get(*cert), res.secrets.get(*validation)) {
            (Some(XdsSecret::Certificate { chain_pem, key_pem }), Some(XdsSecret::TrustBundle { pem })) => {
                let spec = CertificateSpec {
                    certificate_chain_pem: chain_pem.clone(),
                    private_key_pem: key_pem.clone(),
                    trust_bundle_pem: pem.clone(),
                };
                spec.validate().map_err(|e| reroot("secret", cert, e))?;
                specs.certificates.insert((*cert).to_string(), spec);
            }
            (Some(XdsSecret::TrustBundle { .. }), _) => {
                return bad(field.clone(), format!("names validation secret {cert:?} as its certificate"));
            }
            (_, Some(XdsSecret::Certificate { .. })) => {
                return bad(field.clone(), format!("names certificate secret {validation:?} as its trust bundle"));
            }
            _ => {}
        }
    }

    for (name, c) in &res.clusters {
        if let Some(t) = &c.tls
            && !specs.certificates.contains_key(&t.certificate)
        {
            warming.push(format!("cluster/{name}"));
            continue;
        }
        let mut spec = c.spec.clone();
        if let Some(service) = &c.eds_service {
            spec.endpoints = res.endpoints.get(service).cloned().unwrap_or_default();
        }
        spec.validate().map_err(|e| reroot("cluster", name, e))?;
        specs.clusters.insert(name.clone(), spec);
    }

    let mut tables: BTreeMap<&String, &RouteTableSpec> = res.route_tables.iter().collect();
    for (lname, l) in &res.listeners {
        for (id, table) in &l.inline_routes {
            if let Some(prev) = tables.insert(id, table)
                && prev != table
            {
                return bad(
                    format!("listener[{lname}].filter_chains"),
                    format!("inline route configuration {id:?} differs from another of the same name"),
                );
            }
        }
    }
    for (id, table) in tables {
        // Envoy answers a route whose cluster is unknown with 503 (`cluster_not_found_response_code`, which
        // conversion only accepts at its default). A split with only some of its clusters known cannot keep its
        // shares, so such a table waits.
        let mut table = table.clone();
        let mut partial = false;
        for route in table.virtual_hosts.iter_mut().flat_map(|vh| vh.routes.iter_mut()) {
            if let RouteAction::Forward(f) = &route.action {
                let known = f.clusters.iter().filter(|wc| specs.clusters.contains_key(&wc.cluster)).count();
                if known == 0 {
                    route.action = RouteAction::DirectResponse { status: 503, body: String::new() };
                } else if known < f.clusters.len() {
                    partial = true;
                }
            }
        }
        if partial {
            warming.push(format!("route_table/{id}"));
        } else {
            specs.route_tables.insert(id.clone(), table);
        }
    }

    for (name, l) in &res.listeners {
        let mut spec = l.spec.clone();
        // Envoy's tcp_proxy closes connections for an unknown cluster.
        for handler in spec.destinations.iter_mut().map(|d| &mut d.handler).chain([&mut spec.default]) {
            if let Handler::Tcp { cluster } = handler
                && !specs.clusters.contains_key(cluster)
            {
                *handler = Handler::Reject;
            }
        }
        let routes_ready = spec.destinations.iter().map(|d| &d.handler).chain([&spec.default]).all(|h| match h {
            Handler::Http { route_table, .. } => specs.route_tables.contains_key(route_table),
            Handler::Tcp { .. } | Handler::Passthrough | Handler::Reject => true,
        });
        let tls_ready = spec.tls.as_ref().is_none_or(|t| specs.certificates.contains_key(&t.certificate));
        if routes_ready && tls_ready {
            specs.listeners.insert(name.clone(), spec);
        } else {
            warming.push(format!("listener/{name}"));
        }
    }
    Ok(Assembled { specs, warming })
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
