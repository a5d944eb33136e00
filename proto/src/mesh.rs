//! Conversions between the `dpu.v1` mesh messages and the validated mesh model (`dpu-mesh`), shared by the agent
//! (requests in, stored specs out) and `dpuctl` (spec files out). Protobuf → model checks shape and fills
//! defaults, then runs the model's `validate`; every error names the offending field.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use dpu_intent::{Invalid, invalid};
use dpu_mesh as m;

use crate::v1 as pb;

fn parse<T: std::str::FromStr>(field: &str, value: &str, what: &str) -> Result<T, Invalid> {
    value.parse().map_err(|_| Invalid { field: field.into(), message: format!("{value:?} is not {what}") })
}

fn spiffe(field: &str, value: &str) -> Result<m::SpiffeId, Invalid> {
    value.parse().map_err(|e: String| Invalid { field: field.into(), message: e })
}

fn prefix(field: &str, value: &str) -> Result<m::IpPrefix, Invalid> {
    value.parse().map_err(|e: String| Invalid { field: field.into(), message: e })
}

/// A crypto policy field; unspecified means prefer hardware.
pub fn crypto_policy(field: &str, value: i32) -> Result<m::Policy, Invalid> {
    match pb::CryptoPolicy::try_from(value) {
        Ok(pb::CryptoPolicy::Unspecified | pb::CryptoPolicy::PreferHardware) => Ok(m::Policy::PreferHardware),
        Ok(pb::CryptoPolicy::RequireHardware) => Ok(m::Policy::RequireHardware),
        Ok(pb::CryptoPolicy::Software) => Ok(m::Policy::Software),
        Err(_) => Err(Invalid { field: field.into(), message: format!("unknown value {value}") }),
    }
}

pub fn crypto_policy_message(p: m::Policy) -> pb::CryptoPolicy {
    match p {
        m::Policy::RequireHardware => pb::CryptoPolicy::RequireHardware,
        m::Policy::PreferHardware => pb::CryptoPolicy::PreferHardware,
        m::Policy::Software => pb::CryptoPolicy::Software,
    }
}

fn port(field: &str, value: u32) -> Result<u16, Invalid> {
    u16::try_from(value).map_err(|_| Invalid { field: field.into(), message: format!("{value} is not a port") })
}

// ---- workloads ------------------------------------------------------------------------------------------------

impl TryFrom<pb::MeshWorkload> for m::WorkloadSpec {
    type Error = Invalid;
    fn try_from(w: pb::MeshWorkload) -> Result<Self, Invalid> {
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| parse::<IpAddr>(&format!("workload.addresses[{i}]"), a, "an IP address"))
            .collect::<Result<_, _>>()?;
        let limits = w.limits.unwrap_or_default();
        let spec = m::WorkloadSpec {
            port: w.port,
            port_mark: w.port_mark,
            addresses,
            identity: spiffe("workload.identity", &w.identity)?,
            certificate: w.certificate,
            limits: m::WorkloadLimits {
                max_connections: limits.max_connections,
                connections_per_second: limits.connections_per_second,
                requests_per_second: limits.requests_per_second,
            },
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&m::WorkloadSpec> for pb::MeshWorkload {
    fn from(w: &m::WorkloadSpec) -> Self {
        pb::MeshWorkload {
            port: w.port.clone(),
            port_mark: w.port_mark,
            addresses: w.addresses.iter().map(ToString::to_string).collect(),
            identity: w.identity.to_string(),
            certificate: w.certificate.clone(),
            limits: Some(pb::MeshWorkloadLimits {
                max_connections: w.limits.max_connections,
                connections_per_second: w.limits.connections_per_second,
                requests_per_second: w.limits.requests_per_second,
            }),
            ..Default::default()
        }
    }
}

// ---- certificates ---------------------------------------------------------------------------------------------

impl TryFrom<pb::MeshCertificate> for m::CertificateSpec {
    type Error = Invalid;
    fn try_from(c: pb::MeshCertificate) -> Result<Self, Invalid> {
        let spec = m::CertificateSpec {
            certificate_chain_pem: c.certificate_chain_pem,
            private_key_pem: c.private_key_pem,
            trust_bundle_pem: c.trust_bundle_pem,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The private key is input only: it never leaves the agent.
impl From<&m::CertificateSpec> for pb::MeshCertificate {
    fn from(c: &m::CertificateSpec) -> Self {
        pb::MeshCertificate {
            certificate_chain_pem: c.certificate_chain_pem.clone(),
            private_key_pem: String::new(),
            trust_bundle_pem: c.trust_bundle_pem.clone(),
            ..Default::default()
        }
    }
}

// ---- clusters -------------------------------------------------------------------------------------------------

impl TryFrom<pb::MeshCluster> for m::ClusterSpec {
    type Error = Invalid;
    fn try_from(c: pb::MeshCluster) -> Result<Self, Invalid> {
        use pb::MeshUpstreamProtocol as P;
        let protocol = match P::try_from(c.protocol) {
            Ok(P::Tcp) => m::UpstreamProtocol::Tcp,
            Ok(P::Http1) => m::UpstreamProtocol::Http1,
            Ok(P::Http2) => m::UpstreamProtocol::Http2,
            _ => return invalid("cluster.protocol", "must be TCP, HTTP1 or HTTP2"),
        };
        let mut endpoints = Vec::with_capacity(c.endpoints.len());
        for (i, ep) in c.endpoints.into_iter().enumerate() {
            use pb::MeshEndpointHealth as H;
            let health = match H::try_from(ep.health) {
                Ok(H::Unspecified | H::Healthy) => m::EndpointHealth::Healthy,
                Ok(H::Unhealthy) => m::EndpointHealth::Unhealthy,
                Ok(H::Draining) => m::EndpointHealth::Draining,
                Err(_) => return invalid(format!("cluster.endpoints[{i}].health"), "unknown health value"),
            };
            endpoints.push(m::Endpoint {
                address: parse::<SocketAddr>(&format!("cluster.endpoints[{i}].address"), &ep.address, "ip:port")?,
                weight: if ep.weight == 0 { 1 } else { ep.weight },
                locality: ep.locality,
                health,
            });
        }
        use pb::mesh_lb_policy::Policy;
        let lb = match c.lb.and_then(|lb| lb.policy) {
            None | Some(Policy::RoundRobin(_)) => m::LbPolicy::RoundRobin,
            Some(Policy::LeastRequest(_)) => m::LbPolicy::LeastRequest,
            Some(Policy::RingHashHeader(name)) => m::LbPolicy::RingHash { hash_on: m::HashOn::Header { name } },
            Some(Policy::RingHashSourceIp(_)) => m::LbPolicy::RingHash { hash_on: m::HashOn::SourceIp },
            Some(Policy::Random(_)) => m::LbPolicy::Random,
        };
        let cb = c.circuit_breaker.unwrap_or_default();
        let health_check = match c.health_check {
            None => None,
            Some(hc) => {
                use pb::mesh_health_check::Kind;
                let kind = match hc.kind {
                    Some(Kind::Tcp(_)) => m::HealthCheckKind::Tcp,
                    Some(Kind::Http(h)) => m::HealthCheckKind::Http { path: h.path, host: h.host },
                    None => return invalid("cluster.health_check.kind", "must be tcp or http"),
                };
                Some(m::HealthCheck {
                    kind,
                    interval_ms: hc.interval_ms,
                    timeout_ms: hc.timeout_ms,
                    unhealthy_threshold: hc.unhealthy_threshold,
                    healthy_threshold: hc.healthy_threshold,
                })
            }
        };
        let spec = m::ClusterSpec {
            protocol,
            endpoints,
            lb,
            connect_timeout_ms: if c.connect_timeout_ms == 0 { 1000 } else { c.connect_timeout_ms },
            idle_timeout_ms: c.idle_timeout_ms,
            circuit_breaker: m::CircuitBreaker {
                max_connections: cb.max_connections,
                max_pending_requests: cb.max_pending_requests,
                max_requests: cb.max_requests,
                max_retries: cb.max_retries,
            },
            health_check,
            outlier_detection: c.outlier_detection.map(|od| m::OutlierDetection {
                consecutive_5xx: od.consecutive_5xx,
                consecutive_gateway_errors: od.consecutive_gateway_errors,
                base_ejection_ms: od.base_ejection_ms,
                max_ejection_percent: od.max_ejection_percent,
            }),
            tls: match c.tls {
                None => None,
                Some(t) => Some(m::UpstreamTls {
                    certificate: t.certificate,
                    server_identities: t
                        .server_identities
                        .iter()
                        .enumerate()
                        .map(|(i, s)| spiffe(&format!("cluster.tls.server_identities[{i}]"), s))
                        .collect::<Result<_, _>>()?,
                    sni: t.sni,
                    kernel_tls: t.kernel_tls.map(|p| crypto_policy("cluster.tls.kernel_tls", p)).transpose()?,
                }),
            },
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&m::ClusterSpec> for pb::MeshCluster {
    fn from(c: &m::ClusterSpec) -> Self {
        use pb::mesh_lb_policy::Policy;
        let protocol = match c.protocol {
            m::UpstreamProtocol::Tcp => pb::MeshUpstreamProtocol::Tcp,
            m::UpstreamProtocol::Http1 => pb::MeshUpstreamProtocol::Http1,
            m::UpstreamProtocol::Http2 => pb::MeshUpstreamProtocol::Http2,
        };
        let policy = match &c.lb {
            m::LbPolicy::RoundRobin => Policy::RoundRobin(pb::Empty {}),
            m::LbPolicy::LeastRequest => Policy::LeastRequest(pb::Empty {}),
            m::LbPolicy::RingHash { hash_on: m::HashOn::Header { name } } => Policy::RingHashHeader(name.clone()),
            m::LbPolicy::RingHash { hash_on: m::HashOn::SourceIp } => Policy::RingHashSourceIp(pb::Empty {}),
            m::LbPolicy::Random => Policy::Random(pb::Empty {}),
        };
        pb::MeshCluster {
            protocol: protocol as i32,
            endpoints: c
                .endpoints
                .iter()
                .map(|ep| pb::MeshEndpoint {
                    address: ep.address.to_string(),
                    weight: ep.weight,
                    locality: ep.locality.clone(),
                    health: match ep.health {
                        m::EndpointHealth::Healthy => pb::MeshEndpointHealth::Healthy,
                        m::EndpointHealth::Unhealthy => pb::MeshEndpointHealth::Unhealthy,
                        m::EndpointHealth::Draining => pb::MeshEndpointHealth::Draining,
                    } as i32,
                })
                .collect(),
            lb: Some(pb::MeshLbPolicy { policy: Some(policy) }),
            connect_timeout_ms: c.connect_timeout_ms,
            idle_timeout_ms: c.idle_timeout_ms,
            circuit_breaker: Some(pb::MeshCircuitBreaker {
                max_connections: c.circuit_breaker.max_connections,
                max_pending_requests: c.circuit_breaker.max_pending_requests,
                max_requests: c.circuit_breaker.max_requests,
                max_retries: c.circuit_breaker.max_retries,
            }),
            health_check: c.health_check.as_ref().map(|hc| pb::MeshHealthCheck {
                kind: Some(match &hc.kind {
                    m::HealthCheckKind::Tcp => pb::mesh_health_check::Kind::Tcp(pb::Empty {}),
                    m::HealthCheckKind::Http { path, host } => {
                        pb::mesh_health_check::Kind::Http(pb::MeshHttpHealthCheck {
                            path: path.clone(),
                            host: host.clone(),
                        })
                    }
                }),
                interval_ms: hc.interval_ms,
                timeout_ms: hc.timeout_ms,
                unhealthy_threshold: hc.unhealthy_threshold,
                healthy_threshold: hc.healthy_threshold,
            }),
            outlier_detection: c.outlier_detection.map(|od| pb::MeshOutlierDetection {
                consecutive_5xx: od.consecutive_5xx,
                consecutive_gateway_errors: od.consecutive_gateway_errors,
                base_ejection_ms: od.base_ejection_ms,
                max_ejection_percent: od.max_ejection_percent,
            }),
            tls: c.tls.as_ref().map(|t| pb::MeshUpstreamTls {
                certificate: t.certificate.clone(),
                server_identities: t.server_identities.iter().map(ToString::to_string).collect(),
                sni: t.sni.clone(),
                kernel_tls: t.kernel_tls.map(|p| crypto_policy_message(p).into()),
            }),
            ..Default::default()
        }
    }
}

// ---- route tables ---------------------------------------------------------------------------------------------

fn header_match(field: &str, h: pb::MeshHeaderMatch) -> Result<m::HeaderMatch, Invalid> {
    use pb::mesh_header_match::Value;
    let value = match h.value {
        Some(Value::Exact(v)) => m::StringMatch::Exact(v),
        Some(Value::Prefix(v)) => m::StringMatch::Prefix(v),
        Some(Value::Regex(v)) => m::StringMatch::Regex(v),
        Some(Value::Present(_)) => m::StringMatch::Present,
        None => return invalid(format!("{field}.value"), "must be exact, prefix, regex or present"),
    };
    Ok(m::HeaderMatch { name: h.name, value, invert: h.invert })
}

fn header_match_pb(h: &m::HeaderMatch) -> pb::MeshHeaderMatch {
    use pb::mesh_header_match::Value;
    let value = match &h.value {
        m::StringMatch::Exact(v) => Value::Exact(v.clone()),
        m::StringMatch::Prefix(v) => Value::Prefix(v.clone()),
        m::StringMatch::Regex(v) => Value::Regex(v.clone()),
        m::StringMatch::Present => Value::Present(pb::Empty {}),
    };
    pb::MeshHeaderMatch { name: h.name.clone(), value: Some(value), invert: h.invert }
}

fn header_values(list: Vec<pb::MeshHeaderValue>) -> Vec<m::HeaderValue> {
    list.into_iter().map(|h| m::HeaderValue { name: h.name, value: h.value, append: h.append }).collect()
}

fn header_values_pb(list: &[m::HeaderValue]) -> Vec<pb::MeshHeaderValue> {
    list.iter()
        .map(|h| pb::MeshHeaderValue { name: h.name.clone(), value: h.value.clone(), append: h.append })
        .collect()
}

fn retry_on(field: &str, value: &str) -> Result<m::RetryOn, Invalid> {
    Ok(match value {
        "5xx" => m::RetryOn::FiveXx,
        "gateway_error" | "gateway-error" => m::RetryOn::GatewayError,
        "connect_failure" | "connect-failure" => m::RetryOn::ConnectFailure,
        "reset" => m::RetryOn::Reset,
        "unavailable" => m::RetryOn::Unavailable,
        other => {
            return invalid(
                field,
                format!("{other:?} is not one of 5xx, gateway_error, connect_failure, reset, unavailable"),
            );
        }
    })
}

fn retry_on_name(r: m::RetryOn) -> &'static str {
    match r {
        m::RetryOn::FiveXx => "5xx",
        m::RetryOn::GatewayError => "gateway_error",
        m::RetryOn::ConnectFailure => "connect_failure",
        m::RetryOn::Reset => "reset",
        m::RetryOn::Unavailable => "unavailable",
    }
}

fn route(field: &str, r: pb::MeshRoute) -> Result<m::Route, Invalid> {
    use pb::mesh_route::{Action, Path};
    let path = match r.path {
        Some(Path::PathExact(p)) => m::PathMatch::Exact(p),
        Some(Path::PathPrefix(p)) => m::PathMatch::Prefix(p),
        Some(Path::PathRegex(p)) => m::PathMatch::Regex(p),
        None => m::PathMatch::Prefix("/".into()),
    };
    let headers = r
        .headers
        .into_iter()
        .enumerate()
        .map(|(i, h)| header_match(&format!("{field}.headers[{i}]"), h))
        .collect::<Result<_, _>>()?;
    let action = match r.action {
        Some(Action::Forward(f)) => {
            let retry = match f.retry {
                None => None,
                Some(rp) => Some(m::RetryPolicy {
                    attempts: rp.attempts,
                    per_try_timeout_ms: rp.per_try_timeout_ms,
                    retry_on: rp
                        .retry_on
                        .iter()
                        .enumerate()
                        .map(|(i, v)| retry_on(&format!("{field}.action.retry.retry_on[{i}]"), v))
                        .collect::<Result<BTreeSet<_>, _>>()?,
                    budget_percent: if rp.budget_percent == 0 { 20 } else { rp.budget_percent },
                    min_retry_concurrency: if rp.min_retry_concurrency == 0 { 3 } else { rp.min_retry_concurrency },
                }),
            };
            m::RouteAction::Forward(m::Forward {
                clusters: f
                    .clusters
                    .into_iter()
                    .map(|c| m::WeightedCluster { cluster: c.cluster, weight: c.weight.max(1) })
                    .collect(),
                timeout_ms: f.timeout_ms,
                prefix_rewrite: f.prefix_rewrite,
                host_rewrite: f.host_rewrite,
                retry,
            })
        }
        Some(Action::Redirect(rd)) => m::RouteAction::Redirect(m::Redirect {
            scheme: rd.scheme,
            host: rd.host,
            path: rd.path,
            status: if rd.status == 0 { 301 } else { u16::try_from(rd.status).unwrap_or(u16::MAX) },
        }),
        Some(Action::DirectResponse(d)) => {
            m::RouteAction::DirectResponse { status: u16::try_from(d.status).unwrap_or(u16::MAX), body: d.body }
        }
        None => return invalid(format!("{field}.action"), "must be forward, redirect or direct_response"),
    };
    Ok(m::Route {
        name: r.name,
        matcher: m::RouteMatch { path, headers },
        action,
        request_headers_to_add: header_values(r.request_headers_to_add),
        request_headers_to_remove: r.request_headers_to_remove,
        response_headers_to_add: header_values(r.response_headers_to_add),
        response_headers_to_remove: r.response_headers_to_remove,
    })
}

fn route_pb(r: &m::Route) -> pb::MeshRoute {
    use pb::mesh_route::{Action, Path};
    let path = match &r.matcher.path {
        m::PathMatch::Exact(p) => Path::PathExact(p.clone()),
        m::PathMatch::Prefix(p) => Path::PathPrefix(p.clone()),
        m::PathMatch::Regex(p) => Path::PathRegex(p.clone()),
    };
    let action = match &r.action {
        m::RouteAction::Forward(f) => Action::Forward(pb::MeshForward {
            clusters: f
                .clusters
                .iter()
                .map(|c| pb::MeshWeightedCluster { cluster: c.cluster.clone(), weight: c.weight })
                .collect(),
            timeout_ms: f.timeout_ms,
            prefix_rewrite: f.prefix_rewrite.clone(),
            host_rewrite: f.host_rewrite.clone(),
            retry: f.retry.as_ref().map(|rp| pb::MeshRetryPolicy {
                attempts: rp.attempts,
                per_try_timeout_ms: rp.per_try_timeout_ms,
                retry_on: rp.retry_on.iter().map(|r| retry_on_name(*r).to_owned()).collect(),
                budget_percent: rp.budget_percent,
                min_retry_concurrency: rp.min_retry_concurrency,
            }),
        }),
        m::RouteAction::Redirect(rd) => Action::Redirect(pb::MeshRedirect {
            scheme: rd.scheme.clone(),
            host: rd.host.clone(),
            path: rd.path.clone(),
            status: u32::from(rd.status),
        }),
        m::RouteAction::DirectResponse { status, body } => {
            Action::DirectResponse(pb::MeshDirectResponse { status: u32::from(*status), body: body.clone() })
        }
    };
    pb::MeshRoute {
        name: r.name.clone(),
        path: Some(path),
        headers: r.matcher.headers.iter().map(header_match_pb).collect(),
        action: Some(action),
        request_headers_to_add: header_values_pb(&r.request_headers_to_add),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: header_values_pb(&r.response_headers_to_add),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
    }
}

impl TryFrom<pb::MeshRouteTable> for m::RouteTableSpec {
    type Error = Invalid;
    fn try_from(t: pb::MeshRouteTable) -> Result<Self, Invalid> {
        let mut virtual_hosts = Vec::with_capacity(t.virtual_hosts.len());
        for (v, vh) in t.virtual_hosts.into_iter().enumerate() {
            let routes = vh
                .routes
                .into_iter()
                .enumerate()
                .map(|(r, rt)| route(&format!("route_table.virtual_hosts[{v}].routes[{r}]"), rt))
                .collect::<Result<_, _>>()?;
            virtual_hosts.push(m::VirtualHost { name: vh.name, domains: vh.domains, routes });
        }
        let spec = m::RouteTableSpec { virtual_hosts };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&m::RouteTableSpec> for pb::MeshRouteTable {
    fn from(t: &m::RouteTableSpec) -> Self {
        pb::MeshRouteTable {
            virtual_hosts: t
                .virtual_hosts
                .iter()
                .map(|vh| pb::MeshVirtualHost {
                    name: vh.name.clone(),
                    domains: vh.domains.clone(),
                    routes: vh.routes.iter().map(route_pb).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }
}

// ---- listeners ------------------------------------------------------------------------------------------------

fn handler(field: &str, h: Option<pb::MeshHandler>) -> Result<m::Handler, Invalid> {
    use pb::mesh_handler::Kind;
    Ok(match h.and_then(|h| h.kind) {
        Some(Kind::TcpCluster(cluster)) => m::Handler::Tcp { cluster },
        Some(Kind::Passthrough(_)) => m::Handler::Passthrough,
        Some(Kind::Http(http)) => {
            use pb::MeshHttpCodec as C;
            let codec = match C::try_from(http.codec) {
                Ok(C::Unspecified | C::Auto) => m::HttpCodec::Auto,
                Ok(C::Http1) => m::HttpCodec::Http1,
                Ok(C::Http2) => m::HttpCodec::Http2,
                Err(_) => return invalid(format!("{field}.http.codec"), "unknown codec"),
            };
            m::Handler::Http { route_table: http.route_table, codec }
        }
        Some(Kind::Reject(_)) => m::Handler::Reject,
        None => return invalid(field, "must be tcp_cluster, passthrough, http or reject"),
    })
}

fn handler_pb(h: &m::Handler) -> pb::MeshHandler {
    use pb::mesh_handler::Kind;
    let kind = match h {
        m::Handler::Tcp { cluster } => Kind::TcpCluster(cluster.clone()),
        m::Handler::Passthrough => Kind::Passthrough(pb::Empty {}),
        m::Handler::Http { route_table, codec } => Kind::Http(pb::MeshHttpHandler {
            route_table: route_table.clone(),
            codec: match codec {
                m::HttpCodec::Http1 => pb::MeshHttpCodec::Http1,
                m::HttpCodec::Http2 => pb::MeshHttpCodec::Http2,
                m::HttpCodec::Auto => pb::MeshHttpCodec::Auto,
            } as i32,
        }),
        m::Handler::Reject => Kind::Reject(pb::Empty {}),
    };
    pb::MeshHandler { kind: Some(kind) }
}

impl TryFrom<pb::MeshListener> for m::ListenerSpec {
    type Error = Invalid;
    fn try_from(l: pb::MeshListener) -> Result<Self, Invalid> {
        let mut destinations = Vec::with_capacity(l.destinations.len());
        for (i, d) in l.destinations.into_iter().enumerate() {
            let field = format!("listener.destinations[{i}]");
            destinations.push(m::Destination {
                prefix: if d.prefix.is_empty() { None } else { Some(prefix(&format!("{field}.prefix"), &d.prefix)?) },
                port: port(&format!("{field}.port"), d.port)?,
                handler: handler(&format!("{field}.handler"), d.handler)?,
            });
        }
        let defaults = m::ListenerTimeouts::default();
        let t = l.timeouts.unwrap_or_default();
        let spec = m::ListenerSpec {
            address: parse("listener.address", &l.address, "ip:port")?,
            transparent: l.transparent,
            destinations,
            default: handler("listener.default_handler", l.default_handler)?,
            tls: l
                .tls
                .map(|t| -> Result<_, Invalid> {
                    Ok(m::DownstreamTls {
                        certificate: t.certificate,
                        require_client_certificate: t.require_client_certificate,
                        kernel_tls: t.kernel_tls.map(|p| crypto_policy("listener.tls.kernel_tls", p)).transpose()?,
                    })
                })
                .transpose()?,
            policies: l.policies,
            timeouts: m::ListenerTimeouts {
                request_headers_ms: t.request_headers_ms.unwrap_or(defaults.request_headers_ms),
                idle_ms: t.idle_ms.unwrap_or(defaults.idle_ms),
                drain_ms: t.drain_ms.unwrap_or(defaults.drain_ms),
            },
            max_request_headers_bytes: if l.max_request_headers_bytes == 0 {
                64 * 1024
            } else {
                l.max_request_headers_bytes
            },
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&m::ListenerSpec> for pb::MeshListener {
    fn from(l: &m::ListenerSpec) -> Self {
        pb::MeshListener {
            address: l.address.to_string(),
            transparent: l.transparent,
            destinations: l
                .destinations
                .iter()
                .map(|d| pb::MeshDestination {
                    prefix: d.prefix.map(|p| p.to_string()).unwrap_or_default(),
                    port: u32::from(d.port),
                    handler: Some(handler_pb(&d.handler)),
                })
                .collect(),
            default_handler: Some(handler_pb(&l.default)),
            tls: l.tls.as_ref().map(|t| pb::MeshDownstreamTls {
                certificate: t.certificate.clone(),
                require_client_certificate: t.require_client_certificate,
                kernel_tls: t.kernel_tls.map(|p| crypto_policy_message(p).into()),
            }),
            policies: l.policies.clone(),
            timeouts: Some(pb::MeshListenerTimeouts {
                request_headers_ms: Some(l.timeouts.request_headers_ms),
                idle_ms: Some(l.timeouts.idle_ms),
                drain_ms: Some(l.timeouts.drain_ms),
            }),
            max_request_headers_bytes: l.max_request_headers_bytes,
            ..Default::default()
        }
    }
}

// ---- policies -------------------------------------------------------------------------------------------------

impl TryFrom<pb::MeshPolicy> for m::PolicySpec {
    type Error = Invalid;
    fn try_from(p: pb::MeshPolicy) -> Result<Self, Invalid> {
        let action = match pb::MeshPolicyAction::try_from(p.action) {
            Ok(pb::MeshPolicyAction::Allow) => m::PolicyAction::Allow,
            Ok(pb::MeshPolicyAction::Deny) => m::PolicyAction::Deny,
            _ => return invalid("policy.action", "must be ALLOW or DENY"),
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, rule) in p.rules.into_iter().enumerate() {
            let field = format!("policy.rules[{r}]");
            rules.push(m::PolicyRule {
                principals: rule.principals,
                namespaces: rule.namespaces,
                source_prefixes: rule
                    .source_prefixes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| prefix(&format!("{field}.source_prefixes[{i}]"), s))
                    .collect::<Result<_, _>>()?,
                ports: rule
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| port(&format!("{field}.ports[{i}]"), *p))
                    .collect::<Result<_, _>>()?,
                methods: rule.methods,
                paths: rule.paths,
                headers: rule
                    .headers
                    .into_iter()
                    .enumerate()
                    .map(|(i, h)| header_match(&format!("{field}.headers[{i}]"), h))
                    .collect::<Result<_, _>>()?,
            });
        }
        let spec = m::PolicySpec { action, rules };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&m::PolicySpec> for pb::MeshPolicy {
    fn from(p: &m::PolicySpec) -> Self {
        pb::MeshPolicy {
            action: match p.action {
                m::PolicyAction::Allow => pb::MeshPolicyAction::Allow,
                m::PolicyAction::Deny => pb::MeshPolicyAction::Deny,
            } as i32,
            rules: p
                .rules
                .iter()
                .map(|r| pb::MeshPolicyRule {
                    principals: r.principals.clone(),
                    namespaces: r.namespaces.clone(),
                    source_prefixes: r.source_prefixes.iter().map(ToString::to_string).collect(),
                    ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                    methods: r.methods.clone(),
                    paths: r.paths.clone(),
                    headers: r.headers.iter().map(header_match_pb).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> pb::MeshCluster {
        pb::MeshCluster {
            protocol: pb::MeshUpstreamProtocol::Http1 as i32,
            endpoints: vec![pb::MeshEndpoint { address: "127.0.0.1:8080".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn clusters_round_trip_with_defaults_filled() {
        let spec = m::ClusterSpec::try_from(cluster()).unwrap();
        assert_eq!(spec.connect_timeout_ms, 1000);
        assert_eq!(spec.endpoints[0].weight, 1);
        assert_eq!(spec.lb, m::LbPolicy::RoundRobin);
        let back = m::ClusterSpec::try_from(pb::MeshCluster::from(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = cluster();
        c.endpoints[0].address = "nope".into();
        assert_eq!(m::ClusterSpec::try_from(c).unwrap_err().field, "cluster.endpoints[0].address");
        let mut c = cluster();
        c.protocol = 0;
        assert_eq!(m::ClusterSpec::try_from(c).unwrap_err().field, "cluster.protocol");
        let l = pb::MeshListener { address: "127.0.0.1:15001".into(), ..Default::default() };
        assert_eq!(m::ListenerSpec::try_from(l).unwrap_err().field, "listener.default_handler");
    }

    #[test]
    fn route_tables_and_listeners_round_trip() {
        let table = pb::MeshRouteTable {
            virtual_hosts: vec![pb::MeshVirtualHost {
                name: "web".into(),
                domains: vec!["web.default".into(), "*".into()],
                routes: vec![pb::MeshRoute {
                    name: "api".into(),
                    path: Some(pb::mesh_route::Path::PathPrefix("/api".into())),
                    headers: vec![pb::MeshHeaderMatch {
                        name: "x-canary".into(),
                        value: Some(pb::mesh_header_match::Value::Exact("1".into())),
                        invert: false,
                    }],
                    action: Some(pb::mesh_route::Action::Forward(pb::MeshForward {
                        clusters: vec![pb::MeshWeightedCluster { cluster: "web-v1".into(), weight: 90 }],
                        retry: Some(pb::MeshRetryPolicy {
                            attempts: 2,
                            retry_on: vec!["5xx".into(), "connect_failure".into()],
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        let spec = m::RouteTableSpec::try_from(table).unwrap();
        assert_eq!(m::RouteTableSpec::try_from(pb::MeshRouteTable::from(&spec)).unwrap(), spec);

        let listener = pb::MeshListener {
            address: "0.0.0.0:15001".into(),
            transparent: true,
            destinations: vec![pb::MeshDestination {
                prefix: "10.96.0.0/12".into(),
                port: 80,
                handler: Some(pb::MeshHandler {
                    kind: Some(pb::mesh_handler::Kind::Http(pb::MeshHttpHandler {
                        route_table: "web".into(),
                        codec: 0,
                    })),
                }),
            }],
            default_handler: Some(pb::MeshHandler { kind: Some(pb::mesh_handler::Kind::Passthrough(pb::Empty {})) }),
            ..Default::default()
        };
        let spec = m::ListenerSpec::try_from(listener).unwrap();
        assert_eq!(spec.timeouts, m::ListenerTimeouts::default());
        assert_eq!(m::ListenerSpec::try_from(pb::MeshListener::from(&spec)).unwrap(), spec);
    }
}
