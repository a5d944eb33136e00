//! The xDS client against a management server in the test (ACK, NACK with the last good configuration kept, a
//! fixed update applied), and the same snapshot against a real Envoy, which must ACK every type: the snapshot is
//! valid Envoy configuration, not only agreeable to our client.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use dpu_proxy::model::{
    CertificateSpec, CircuitBreaker, ClusterSpec, Destination, Endpoint, EndpointHealth, Forward, Handler, HeaderMatch,
    HeaderValue, HealthCheck, HealthCheckKind, HttpCodec, LbPolicy, ListenerSpec, ListenerTimeouts, MeshSpecs,
    OutlierDetection, PathMatch, Redirect, RetryOn, RetryPolicy, Route, RouteAction, RouteMatch, RouteTableSpec,
    StringMatch, UpstreamProtocol, UpstreamTls, VirtualHost, WeightedCluster,
};
use dpu_proxy::xds::convert::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE};
use dpu_proxy::xds::{XdsConfig, XdsStatus, run_with_status};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, cluster};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, OutlierDetection as XdsOutlier, circuit_breakers};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, HeaderValue as XdsHeaderValue,
    HeaderValueOption, HealthCheck as XdsHealthCheck, HealthStatus, Http2ProtocolOptions, Locality, SocketAddress,
    TransportSocket, address, config_source, data_source, header_value_option, health_check, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as XdsEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, RedirectAction, RetryPolicy as XdsRetry, Route as XdsRoute,
    RouteAction as XdsRouteAction, RouteConfiguration, RouteMatch as XdsRouteMatch, VirtualHost as XdsVirtualHost,
    header_matcher, redirect_action, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher, TlsCertificate,
    UpstreamTlsContext, common_tls_context, secret, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WEB: &str = "outbound|80||web.default.svc.cluster.local";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------------------------
// Snapshot
// ---------------------------------------------------------------------------------------------------------------

fn pack<T: Message + Name>(msg: &T) -> Any {
    Any { type_url: T::type_url(), value: msg.encode_to_vec() }
}

fn dur(ms: u64) -> Option<PbDuration> {
    Some(PbDuration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

fn ads() -> Option<ConfigSource> {
    Some(ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..ConfigSource::default()
    })
}

fn sock(addr: SocketAddr) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..SocketAddress::default()
        })),
    })
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource { specifier: Some(data_source::Specifier::InlineString(s.into())), ..DataSource::default() })
}

fn exact(s: &str) -> Option<StringMatcher> {
    Some(StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Exact(s.into())), ignore_case: false })
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A workload certificate and a trust bundle, both PEM.
struct Pki {
    chain: String,
    key: String,
    bundle: String,
}

fn pki() -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(WEB_ID.try_into().unwrap())];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki { chain: cert.pem(), key: key.serialize_pem(), bundle: cert.pem() }
}

struct Ports {
    http: u16,
    tcp: u16,
}

fn web_cluster() -> Cluster {
    let tls = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig { name: "default".into(), sds_config: ads() }],
            validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: subject_alt_name_matcher::SanType::Uri as i32,
                            matcher: exact(WEB_ID),
                            oid: String::new(),
                        }],
                        ..CertificateValidationContext::default()
                    }),
                    validation_context_sds_secret_config: Some(SdsSecretConfig {
                        name: "ROOTCA".into(),
                        sds_config: ads(),
                    }),
                    ..Default::default()
                },
            )),
            ..CommonTlsContext::default()
        }),
        sni: "outbound_.80_._.web.default.svc.cluster.local".into(),
        ..UpstreamTlsContext::default()
    };
    let h2 = HttpProtocolOptions {
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(
                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    ),
                ),
            },
        )),
        ..HttpProtocolOptions::default()
    };
    Cluster {
        name: WEB.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: ads(), service_name: String::new() }),
        connect_timeout: dur(2_000),
        lb_policy: cluster::LbPolicy::LeastRequest as i32,
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                max_connections: u32v(100),
                max_pending_requests: u32v(50),
                max_requests: u32v(200),
                max_retries: u32v(4),
                ..Default::default()
            }],
            ..CircuitBreakers::default()
        }),
        outlier_detection: Some(XdsOutlier {
            consecutive_5xx: u32v(7),
            base_ejection_time: dur(15_000),
            max_ejection_percent: u32v(20),
            ..XdsOutlier::default()
        }),
        health_checks: vec![XdsHealthCheck {
            timeout: dur(1_000),
            interval: dur(5_000),
            unhealthy_threshold: u32v(3),
            healthy_threshold: u32v(2),
            health_checker: Some(health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
                host: "web".into(),
                path: "/healthz".into(),
                ..Default::default()
            })),
            ..XdsHealthCheck::default()
        }],
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&tls))),
        }),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack(&h2),
        )]
        .into(),
        ..Cluster::default()
    }
}

fn db_cluster() -> Cluster {
    Cluster {
        name: "db".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "db".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![lb_endpoint("127.0.0.1:15432".parse().unwrap(), 1, HealthStatus::Unknown)],
                ..LocalityLbEndpoints::default()
            }],
            ..ClusterLoadAssignment::default()
        }),
        ..Cluster::default()
    }
}

fn lb_endpoint(addr: SocketAddr, weight: u32, health: HealthStatus) -> LbEndpoint {
    LbEndpoint {
        health_status: health as i32,
        load_balancing_weight: u32v(weight),
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(XdsEndpoint {
            address: sock(addr),
            ..XdsEndpoint::default()
        })),
        ..LbEndpoint::default()
    }
}

fn web_assignment() -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: WEB.into(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality { region: "us-east".into(), zone: "a".into(), sub_zone: "1".into() }),
            lb_endpoints: vec![
                lb_endpoint("127.0.0.1:18080".parse().unwrap(), 3, HealthStatus::Healthy),
                lb_endpoint("127.0.0.1:18081".parse().unwrap(), 1, HealthStatus::Draining),
            ],
            ..LocalityLbEndpoints::default()
        }],
        ..ClusterLoadAssignment::default()
    }
}

fn routes(api_prefix: &str, health_regex: &str) -> RouteConfiguration {
    let api = XdsRoute {
        name: "api".into(),
        r#match: Some(XdsRouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(api_prefix.into())),
            headers: vec![HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(exact("GET").unwrap())),
                ..HeaderMatcher::default()
            }],
            ..XdsRouteMatch::default()
        }),
        action: Some(route::Action::Route(XdsRouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(WEB.into())),
            timeout: dur(3_000),
            prefix_rewrite: "/v1/".into(),
            host_rewrite_specifier: Some(route_action::HostRewriteSpecifier::HostRewriteLiteral("web.internal".into())),
            retry_policy: Some(XdsRetry {
                retry_on: "5xx,gateway-error,connect-failure,reset,unavailable".into(),
                num_retries: u32v(2),
                per_try_timeout: dur(1_000),
                ..XdsRetry::default()
            }),
            ..XdsRouteAction::default()
        })),
        request_headers_to_add: vec![HeaderValueOption {
            header: Some(XdsHeaderValue { key: "x-mesh".into(), value: "dpu".into(), ..Default::default() }),
            append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..HeaderValueOption::default()
        }],
        response_headers_to_remove: vec!["server".into()],
        ..XdsRoute::default()
    };
    let old = XdsRoute {
        name: "old".into(),
        r#match: Some(XdsRouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Path("/old".into())),
            ..XdsRouteMatch::default()
        }),
        action: Some(route::Action::Redirect(RedirectAction {
            path_rewrite_specifier: Some(redirect_action::PathRewriteSpecifier::PathRedirect("/new".into())),
            response_code: redirect_action::RedirectResponseCode::PermanentRedirect as i32,
            ..RedirectAction::default()
        })),
        ..XdsRoute::default()
    };
    let health = XdsRoute {
        name: "health".into(),
        r#match: Some(XdsRouteMatch {
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: health_regex.into(),
                ..RegexMatcher::default()
            })),
            ..XdsRouteMatch::default()
        }),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status: 200,
            body: inline("ok"),
            ..DirectResponseAction::default()
        })),
        ..XdsRoute::default()
    };
    RouteConfiguration {
        name: "web-routes".into(),
        virtual_hosts: vec![XdsVirtualHost {
            name: "web".into(),
            domains: vec!["web.default.svc.cluster.local".into(), "web".into()],
            routes: vec![api, old, health],
            ..XdsVirtualHost::default()
        }],
        ..RouteConfiguration::default()
    }
}

fn http_listener(port: u16) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "http_in".into(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: ads(),
            route_config_name: "web-routes".into(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&Router::default()))),
            ..HttpFilter::default()
        }],
        ..HttpConnectionManager::default()
    };
    Listener {
        name: "http-in".into(),
        address: sock(SocketAddr::from(([127, 0, 0, 1], port))),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..FilterChain::default()
        }],
        ..Listener::default()
    }
}

fn tcp_chain(cluster: &str, matcher: Option<FilterChainMatch>) -> FilterChain {
    let tcp = TcpProxy {
        stat_prefix: format!("tcp_{}", cluster.len()),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..TcpProxy::default()
    };
    FilterChain {
        filter_chain_match: matcher,
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack(&tcp))),
        }],
        ..FilterChain::default()
    }
}

fn tcp_listener(port: u16) -> Listener {
    let exact_port = FilterChainMatch {
        destination_port: u32v(u32::from(port)),
        prefix_ranges: vec![envoy_types::pb::envoy::config::core::v3::CidrRange {
            address_prefix: "127.0.0.1".into(),
            prefix_len: u32v(32),
        }],
        ..FilterChainMatch::default()
    };
    Listener {
        name: "db-out".into(),
        address: sock(SocketAddr::from(([127, 0, 0, 1], port))),
        use_original_dst: Some(BoolValue { value: false }),
        // Port-less chain first: the model must still prefer the more specific one.
        filter_chains: vec![tcp_chain(WEB, None), tcp_chain("db", Some(exact_port))],
        ..Listener::default()
    }
}

fn secrets(pki: &Pki) -> Vec<Secret> {
    vec![
        Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&pki.chain),
                private_key: inline(&pki.key),
                ..TlsCertificate::default()
            })),
        },
        Secret {
            name: "ROOTCA".into(),
            r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(&pki.bundle),
                ..CertificateValidationContext::default()
            })),
        },
    ]
}

/// Per type URL: version and named resources.
type Snapshot = BTreeMap<String, (String, Vec<(String, Any)>)>;

fn snapshot(ports: &Ports, pki: &Pki, route_config: &RouteConfiguration, version: &str) -> Snapshot {
    let mut s = Snapshot::new();
    let v = version.to_string();
    s.insert(
        CLUSTER_TYPE.into(),
        (v.clone(), vec![(WEB.into(), pack(&web_cluster())), ("db".into(), pack(&db_cluster()))]),
    );
    s.insert(ENDPOINT_TYPE.into(), (v.clone(), vec![(WEB.into(), pack(&web_assignment()))]));
    s.insert(
        LISTENER_TYPE.into(),
        (
            v.clone(),
            vec![
                ("http-in".into(), pack(&http_listener(ports.http))),
                ("db-out".into(), pack(&tcp_listener(ports.tcp))),
            ],
        ),
    );
    s.insert(ROUTE_TYPE.into(), (v.clone(), vec![("web-routes".into(), pack(route_config))]));
    s.insert(SECRET_TYPE.into(), (v, secrets(pki).into_iter().map(|sec| (sec.name.clone(), pack(&sec))).collect()));
    s
}

// ---------------------------------------------------------------------------------------------------------------
// Expected model
// ---------------------------------------------------------------------------------------------------------------

fn expected(ports: &Ports, pki: &Pki, api_prefix: &str, health_regex: &str) -> MeshSpecs {
    let mut specs = MeshSpecs::default();
    specs.certificates.insert(
        "default".into(),
        CertificateSpec {
            certificate_chain_pem: pki.chain.clone(),
            private_key_pem: pki.key.clone(),
            trust_bundle_pem: pki.bundle.clone(),
        },
    );
    specs.clusters.insert(
        WEB.into(),
        ClusterSpec {
            protocol: UpstreamProtocol::Http2,
            endpoints: vec![
                Endpoint {
                    address: "127.0.0.1:18080".parse().unwrap(),
                    weight: 3,
                    locality: "us-east/a/1".into(),
                    health: EndpointHealth::Healthy,
                },
                Endpoint {
                    address: "127.0.0.1:18081".parse().unwrap(),
                    weight: 1,
                    locality: "us-east/a/1".into(),
                    health: EndpointHealth::Draining,
                },
            ],
            lb: LbPolicy::LeastRequest,
            connect_timeout_ms: 2_000,
            idle_timeout_ms: 3_600_000,
            circuit_breaker: CircuitBreaker {
                max_connections: 100,
                max_pending_requests: 50,
                max_requests: 200,
                max_retries: 4,
            },
            health_check: Some(HealthCheck {
                kind: HealthCheckKind::Http { path: "/healthz".into(), host: "web".into() },
                interval_ms: 5_000,
                timeout_ms: 1_000,
                unhealthy_threshold: 3,
                healthy_threshold: 2,
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: 7,
                consecutive_gateway_errors: 0,
                base_ejection_ms: 15_000,
                max_ejection_percent: 20,
            }),
            tls: Some(UpstreamTls {
                certificate: "default".into(),
                server_identities: vec![WEB_ID.parse().unwrap()],
                sni: "outbound_.80_._.web.default.svc.cluster.local".into(),
                kernel_tls: None,
            }),
        },
    );
    specs.clusters.insert(
        "db".into(),
        ClusterSpec {
            protocol: UpstreamProtocol::Http1,
            endpoints: vec![Endpoint {
                address: "127.0.0.1:15432".parse().unwrap(),
                weight: 1,
                locality: String::new(),
                health: EndpointHealth::Healthy,
            }],
            lb: LbPolicy::RoundRobin,
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 3_600_000,
            circuit_breaker: CircuitBreaker {
                max_connections: 1024,
                max_pending_requests: 1024,
                max_requests: 1024,
                max_retries: 3,
            },
            health_check: None,
            outlier_detection: None,
            tls: None,
        },
    );
    let no_headers = |name: &str, matcher: RouteMatch, action: RouteAction| Route {
        name: name.into(),
        matcher,
        action,
        request_headers_to_add: vec![],
        request_headers_to_remove: vec![],
        response_headers_to_add: vec![],
        response_headers_to_remove: vec![],
    };
    specs.route_tables.insert(
        "web-routes".into(),
        RouteTableSpec {
            virtual_hosts: vec![VirtualHost {
                name: "web".into(),
                domains: vec!["web.default.svc.cluster.local".into(), "web".into()],
                routes: vec![
                    Route {
                        name: "api".into(),
                        matcher: RouteMatch {
                            path: PathMatch::Prefix(api_prefix.into()),
                            headers: vec![HeaderMatch {
                                name: ":method".into(),
                                value: StringMatch::Exact("GET".into()),
                                invert: false,
                            }],
                        },
                        action: RouteAction::Forward(Forward {
                            clusters: vec![WeightedCluster { cluster: WEB.into(), weight: 1 }],
                            timeout_ms: 3_000,
                            prefix_rewrite: Some("/v1/".into()),
                            host_rewrite: Some("web.internal".into()),
                            retry: Some(RetryPolicy {
                                attempts: 2,
                                per_try_timeout_ms: 1_000,
                                retry_on: BTreeSet::from([
                                    RetryOn::FiveXx,
                                    RetryOn::GatewayError,
                                    RetryOn::ConnectFailure,
                                    RetryOn::Reset,
                                    RetryOn::Unavailable,
                                ]),
                                budget_percent: 100,
                                min_retry_concurrency: 3,
                            }),
                        }),
                        request_headers_to_add: vec![HeaderValue {
                            name: "x-mesh".into(),
                            value: "dpu".into(),
                            append: false,
                        }],
                        request_headers_to_remove: vec![],
                        response_headers_to_add: vec![],
                        response_headers_to_remove: vec!["server".into()],
                    },
                    no_headers(
                        "old",
                        RouteMatch { path: PathMatch::Exact("/old".into()), headers: vec![] },
                        RouteAction::Redirect(Redirect {
                            scheme: None,
                            host: None,
                            path: Some("/new".into()),
                            status: 308,
                        }),
                    ),
                    no_headers(
                        "health",
                        RouteMatch { path: PathMatch::Regex(health_regex.into()), headers: vec![] },
                        RouteAction::DirectResponse { status: 200, body: "ok".into() },
                    ),
                ],
            }],
        },
    );
    let timeouts = ListenerTimeouts { request_headers_ms: 0, idle_ms: 3_600_000, drain_ms: 5_000 };
    specs.listeners.insert(
        "http-in".into(),
        ListenerSpec {
            address: SocketAddr::from(([127, 0, 0, 1], ports.http)),
            transparent: false,
            destinations: vec![Destination {
                prefix: None,
                port: 0,
                handler: Handler::Http { route_table: "web-routes".into(), codec: HttpCodec::Auto },
            }],
            default: Handler::Reject,
            tls: None,
            policies: vec![],
            timeouts,
            max_request_headers_bytes: 60 * 1024,
        },
    );
    specs.listeners.insert(
        "db-out".into(),
        ListenerSpec {
            address: SocketAddr::from(([127, 0, 0, 1], ports.tcp)),
            transparent: false,
            destinations: vec![
                Destination {
                    prefix: Some("127.0.0.1/32".parse().unwrap()),
                    port: ports.tcp,
                    handler: Handler::Tcp { cluster: "db".into() },
                },
                // Envoy does not fall back from a port's chains to port-less ones: the default (none: close).
                Destination { prefix: None, port: ports.tcp, handler: Handler::Reject },
                Destination { prefix: None, port: 0, handler: Handler::Tcp { cluster: WEB.into() } },
            ],
            default: Handler::Reject,
            tls: None,
            policies: vec![],
            timeouts: ListenerTimeouts { request_headers_ms: 10_000, ..timeouts },
            max_request_headers_bytes: 60 * 1024,
        },
    );
    specs
}

// ---------------------------------------------------------------------------------------------------------------
// Management server
// ---------------------------------------------------------------------------------------------------------------

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    node: String,
    type_url: String,
    version: String,
    nonce: String,
    error: Option<(i32, String)>,
}

#[derive(Clone)]
struct Ads {
    snapshot: watch::Receiver<Snapshot>,
    /// Bumped to make the server drop every open stream.
    kick: watch::Receiver<u64>,
    seen: mpsc::UnboundedSender<Seen>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let mut snapshot = self.snapshot.clone();
        let mut kick = self.kick.clone();
        kick.mark_unchanged();
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut node = String::new();
            let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut sent: BTreeMap<String, String> = BTreeMap::new();
            let mut nonce = 0u64;
            loop {
                let mut due = Vec::new();
                tokio::select! {
                    _ = kick.changed() => return,
                    req = inbound.message() => {
                        let Ok(Some(req)) = req else { return };
                        if let Some(n) = &req.node {
                            node = n.id.clone();
                        }
                        let _ = seen.send(Seen {
                            node: node.clone(),
                            type_url: req.type_url.clone(),
                            version: req.version_info.clone(),
                            nonce: req.response_nonce.clone(),
                            error: req.error_detail.as_ref().map(|e| (e.code, e.message.clone())),
                        });
                        let wanted: BTreeSet<String> = req.resource_names.iter().cloned().collect();
                        let changed = names.get(&req.type_url) != Some(&wanted);
                        names.insert(req.type_url.clone(), wanted);
                        let current = snapshot.borrow().get(&req.type_url).map(|(v, _)| v.clone());
                        if changed || sent.get(&req.type_url) != current.as_ref() {
                            due.push(req.type_url.clone());
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let current = snapshot.borrow().clone();
                        for type_url in names.keys() {
                            if current.get(type_url).map(|(v, _)| v) != sent.get(type_url) {
                                due.push(type_url.clone());
                            }
                        }
                    }
                }
                for type_url in due {
                    let Some((version, resources)) = snapshot.borrow().get(&type_url).cloned() else { continue };
                    let wanted = names.get(&type_url).cloned().unwrap_or_default();
                    let wildcard = type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE;
                    nonce += 1;
                    let response = DiscoveryResponse {
                        version_info: version.clone(),
                        resources: resources
                            .into_iter()
                            .filter(|(name, _)| wildcard || wanted.contains(name))
                            .map(|(_, any)| any)
                            .collect(),
                        type_url: type_url.clone(),
                        nonce: nonce.to_string(),
                        ..DiscoveryResponse::default()
                    };
                    sent.insert(type_url, version);
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("this server speaks state-of-the-world ADS only"))
    }
}

struct Server {
    addr: SocketAddr,
    snapshot: watch::Sender<Snapshot>,
    kick: watch::Sender<u64>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

async fn start_server(snapshot: Snapshot) -> Server {
    let (snap_tx, snap_rx) = watch::channel(snapshot);
    let (kick_tx, kick_rx) = watch::channel(0);
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = AggregatedDiscoveryServiceServer::new(Ads { snapshot: snap_rx, kick: kick_rx, seen: seen_tx });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Server { addr, snapshot: snap_tx, kick: kick_tx, seen: seen_rx }
}

/// Every request the server saw, in order.
struct Log {
    rx: mpsc::UnboundedReceiver<Seen>,
    history: Vec<Seen>,
}

impl Log {
    /// The first request, seen already or arriving within [`WAIT`], that matches `pred`.
    async fn wait(&mut self, what: &str, mut pred: impl FnMut(&Seen) -> bool) -> Seen {
        if let Some(s) = self.history.iter().find(|s| pred(s)) {
            return s.clone();
        }
        tokio::time::timeout(WAIT, async {
            loop {
                let s = self.rx.recv().await.expect("server alive");
                self.history.push(s.clone());
                if pred(&s) {
                    return s;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_acks_nacks_keeps_last_good_and_envoy_agrees() {
    let pki = pki();
    let ports = Ports { http: free_port(), tcp: free_port() };
    let good = routes("/api/", "/health(z)?");
    let Server { addr, snapshot: snap_tx, kick, seen } = start_server(snapshot(&ports, &pki, &good, "1")).await;
    let mut seen = Log { rx: seen, history: Vec::new() };

    let (applied_tx, mut applied) = mpsc::unbounded_channel::<MeshSpecs>();
    let (status_tx, status_rx) = watch::channel(XdsStatus::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = XdsConfig {
        server: format!("http://{addr}").parse().unwrap(),
        node_id: "dpu-proxy~test".into(),
        node_cluster: "mesh".into(),
        tls: None,
    };
    // While set, the proxy side refuses what it is given.
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refusing = refuse.clone();
    let client = tokio::spawn(run_with_status(
        config,
        move |specs| {
            let tx = applied_tx.clone();
            let refused = refusing.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if refused {
                    return Err("the proxy refused the snapshot: listener http-in cannot bind".to_string());
                }
                tx.send(specs).map_err(|_| "test receiver gone".to_string())?;
                Ok(())
            }
        },
        async move {
            let _ = stop_rx.await;
        },
        status_tx,
    ));

    // 1. The whole snapshot arrives (CDS → EDS → LDS → RDS → SDS) and is applied exactly as expected.
    let want = expected(&ports, &pki, "/api/", "/health(z)?");
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let specs = applied.recv().await.expect("client alive");
            if specs.listeners.len() == 2 && specs.certificates.len() == 1 {
                return specs;
            }
        }
    })
    .await
    .expect("complete configuration applied");
    assert_eq!(got, want);
    for type_url in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE] {
        let ack = seen
            .wait(&format!("ACK of {type_url}"), |s| {
                s.node == "dpu-proxy~test" && s.type_url == type_url && s.version == "1" && !s.nonce.is_empty()
            })
            .await;
        assert_eq!(ack.error, None, "{type_url} NACKed: {ack:?}");
    }
    let status = status_rx.borrow().clone();
    assert!(status.connected);
    assert_eq!(status.types[ROUTE_TYPE].version, "1");
    assert_eq!(status.types[SECRET_TYPE].resources, 2);
    assert!(status.warming.is_empty(), "{:?}", status.warming);
    while applied.try_recv().is_ok() {}

    // 2. An invalid route configuration (an unparsable regex) is NACKed naming it; nothing is applied.
    let bad = routes("/api/", "/health(");
    snap_tx.send_modify(|s| {
        s.insert(ROUTE_TYPE.into(), ("2".into(), vec![("web-routes".into(), pack(&bad))]));
    });
    let nack = seen.wait("NACK of version 2", |s| s.type_url == ROUTE_TYPE && s.error.is_some()).await;
    let (code, message) = nack.error.clone().unwrap();
    assert_eq!(code, 3, "INVALID_ARGUMENT");
    assert!(message.contains("route_configuration[web-routes].virtual_hosts[0].routes[2].match.path"), "{message}");
    assert_eq!(nack.version, "1", "a NACK carries the last accepted version");
    assert!(applied.try_recv().is_err(), "the refused update must not be applied");
    let status = status_rx.borrow().clone();
    assert_eq!(status.types[ROUTE_TYPE].version, "1");
    assert!(status.types[ROUTE_TYPE].last_nack.as_deref().is_some_and(|m| m.contains("web-routes")));

    // 3. A valid update is applied and ACKed; the rest of the configuration is the last good one.
    let fixed = routes("/v2/", "/health(z)?");
    snap_tx.send_modify(|s| {
        s.insert(ROUTE_TYPE.into(), ("3".into(), vec![("web-routes".into(), pack(&fixed))]));
    });
    let got = tokio::time::timeout(WAIT, applied.recv()).await.expect("update applied").unwrap();
    assert_eq!(got, expected(&ports, &pki, "/v2/", "/health(z)?"));
    let ack = seen.wait("ACK of version 3", |s| s.type_url == ROUTE_TYPE && s.version == "3").await;
    assert_eq!(ack.error, None);
    assert_eq!(status_rx.borrow().types[ROUTE_TYPE].last_nack, None);

    // 4. An update the proxy itself refuses is NACKed with the proxy's message; the last good version stays.
    refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    snap_tx.send_modify(|s| {
        s.insert(ROUTE_TYPE.into(), ("4".into(), vec![("web-routes".into(), pack(&fixed))]));
    });
    let nack =
        seen.wait("NACK of version 4", |s| s.type_url == ROUTE_TYPE && s.version == "3" && s.error.is_some()).await;
    assert_eq!(nack.error.unwrap().1, "the proxy refused the snapshot: listener http-in cannot bind");
    assert_eq!(status_rx.borrow().types[ROUTE_TYPE].version, "3");
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);

    // 5. The server drops the stream: the client reconnects and resubscribes with the versions it accepted.
    kick.send_modify(|k| *k += 1);
    for (type_url, version) in
        [(CLUSTER_TYPE, "1"), (ENDPOINT_TYPE, "1"), (LISTENER_TYPE, "1"), (ROUTE_TYPE, "3"), (SECRET_TYPE, "1")]
    {
        let resub = seen
            .wait(&format!("resubscription to {type_url}"), |s| {
                s.type_url == type_url && s.nonce.is_empty() && !s.version.is_empty()
            })
            .await;
        assert_eq!(resub.version, version, "{type_url}");
    }
    let got = tokio::time::timeout(WAIT, applied.recv()).await.expect("re-applied after reconnect").unwrap();
    assert_eq!(got, expected(&ports, &pki, "/v2/", "/health(z)?"));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, client).await.expect("client stops").unwrap().unwrap();

    // 6. Envoy takes the same (current) snapshot and ACKs every type without a single NACK, then NACKs the
    //    invalid route configuration as our client did.
    envoy_agrees(addr, &snap_tx, &mut seen).await;
}

fn envoy_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/dpu-agent/venv/bin/envoy");
    p.exists().then_some(p)
}

async fn envoy_agrees(server: SocketAddr, snapshot: &watch::Sender<Snapshot>, seen: &mut Log) {
    let Some(envoy) = envoy_binary() else {
        eprintln!("skipped: Envoy acceptance check, no envoy binary at ~/.cache/dpu-agent/venv/bin/envoy");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = serde_json::json!({
        "node": { "id": "envoy-check", "cluster": "mesh" },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds" } }]
            },
            "cds_config": { "ads": {}, "resource_api_version": "V3" },
            "lds_config": { "ads": {}, "resource_api_version": "V3" }
        },
        "static_resources": { "clusters": [{
            "name": "xds",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": {} }
                }
            },
            "load_assignment": { "cluster_name": "xds", "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": server.port() } }
            } }] }] }
        }] }
    });
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let child = std::process::Command::new(&envoy)
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"])
        .arg("--base-id")
        .arg(std::process::id().to_string())
        .spawn()
        .expect("envoy starts");
    let _envoy = KillOnDrop(child);

    let mut acked = BTreeSet::new();
    let mut nacks = Vec::new();
    let all = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE];
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.len() < all.len() {
        let s = match tokio::time::timeout_at(deadline, seen.rx.recv()).await {
            Ok(Some(s)) => s,
            _ => break,
        };
        if s.node != "envoy-check" {
            continue;
        }
        match &s.error {
            Some(e) => nacks.push((s.type_url.clone(), e.clone())),
            None if !s.nonce.is_empty() && s.version == if s.type_url == ROUTE_TYPE { "4" } else { "1" } => {
                acked.insert(s.type_url.clone());
            }
            None => {}
        }
    }
    // Give Envoy a moment to NACK anything it validates late (listener binding, secrets in use).
    let settle = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(s)) = tokio::time::timeout_at(settle, seen.rx.recv()).await {
        if s.node == "envoy-check"
            && let Some(e) = s.error
        {
            nacks.push((s.type_url, e));
        }
    }
    assert!(nacks.is_empty(), "Envoy NACKed: {nacks:?}");
    let missing: Vec<_> = all.iter().filter(|t| !acked.contains(**t)).collect();
    assert!(missing.is_empty(), "Envoy did not ACK {missing:?} (ACKed {acked:?})");

    // And Envoy refuses what our client refused: the same unparsable route regex.
    snapshot.send_modify(|s| {
        s.insert(ROUTE_TYPE.into(), ("5".into(), vec![("web-routes".into(), pack(&routes("/api/", "/health(")))]));
    });
    let nack = seen.wait("Envoy's NACK of version 5", |s| s.node == "envoy-check" && s.error.is_some()).await;
    assert_eq!(nack.type_url, ROUTE_TYPE);
    assert_eq!(nack.version, "4", "Envoy keeps its last accepted version too");
}

/// Stops the Envoy child however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
