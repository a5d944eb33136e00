use envoy_types::pb::envoy::config::cluster::v3::cluster::EdsClusterConfig;
use envoy_types::pb::envoy::config::core::v3::{
    CidrRange, HeaderValue as XdsHeaderValue, HealthCheck as XdsHealthCheck, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint as XdsEndpoint, LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChainMatch};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, RouteMatch as XdsRouteMatch, VirtualHost as XdsVirtualHost, WeightedCluster as XdsWeighted,
    weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, Rds};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SdsSecretConfig, TlsCertificate,
    common_tls_context::CombinedCertificateValidationContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use prost::{Message, Name};

use super::*;

fn pack<T: Message + Name>(msg: &T) -> Any {
    Any { type_url: T::type_url(), value: msg.encode_to_vec() }
}

fn sock(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..SocketAddress::default()
        })),
    })
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

fn tcp_chain(cluster: &str, m: Option<FilterChainMatch>) -> FilterChain {
    let tp = TcpProxy {
        stat_prefix: "t".into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..TcpProxy::default()
    };
    FilterChain {
        filter_chain_match: m,
        filters: vec![Filter { name: TCP_PROXY.into(), config_type: Some(filter::ConfigType::TypedConfig(pack(&tp))) }],
        ..FilterChain::default()
    }
}

fn hcm_chain(hcm: HttpConnectionManager) -> FilterChain {
    FilterChain {
        filters: vec![Filter { name: HCM.into(), config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))) }],
        ..FilterChain::default()
    }
}

fn router() -> Vec<HttpFilter> {
    vec![HttpFilter { name: ROUTER.into(), ..HttpFilter::default() }]
}

fn rds_hcm(name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: "h".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds { config_source: None, route_config_name: name.into() })),
        http_filters: router(),
        ..HttpConnectionManager::default()
    }
}

fn port_prefix(port: Option<u32>, prefixes: &[(&str, u32)]) -> Option<FilterChainMatch> {
    Some(FilterChainMatch {
        destination_port: port.and_then(u32v),
        prefix_ranges: prefixes
            .iter()
            .map(|(a, l)| CidrRange { address_prefix: (*a).into(), prefix_len: u32v(*l) })
            .collect(),
        ..FilterChainMatch::default()
    })
}

fn listener_with(chains: Vec<FilterChain>) -> Listener {
    Listener { name: "l".into(), address: sock("0.0.0.0", 15001), filter_chains: chains, ..Listener::default() }
}

fn tls_socket(tls: DownstreamTlsContext) -> Option<TransportSocket> {
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&tls))),
    })
}

fn common(cert: &str, validation: &str) -> Option<CommonTlsContext> {
    Some(CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![SdsSecretConfig { name: cert.into(), sds_config: None }],
        validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(SdsSecretConfig {
            name: validation.into(),
            sds_config: None,
        })),
        ..CommonTlsContext::default()
    })
}

fn route_to(cluster: &str, prefix: &str) -> XdsRoute {
    XdsRoute {
        r#match: Some(XdsRouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
            ..XdsRouteMatch::default()
        }),
        action: Some(route::Action::Route(XdsRouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..XdsRouteAction::default()
        })),
        ..XdsRoute::default()
    }
}

fn config(routes: Vec<XdsRoute>) -> RouteConfiguration {
    RouteConfiguration {
        name: "rc".into(),
        virtual_hosts: vec![XdsVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes,
            ..XdsVirtualHost::default()
        }],
        ..RouteConfiguration::default()
    }
}

fn forward_of(t: &RouteTableSpec) -> &Forward {
    match &t.virtual_hosts[0].routes[0].action {
        RouteAction::Forward(f) => f,
        other => panic!("not a forward: {other:?}"),
    }
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig { eds_config: None, service_name: String::new() }),
        ..Cluster::default()
    }
}

fn endpoint(ip: &str, port: u32, weight: Option<u32>, health: HealthStatus) -> LbEndpoint {
    LbEndpoint {
        health_status: health as i32,
        load_balancing_weight: weight.and_then(u32v),
        host_identifier: Some(HostIdentifier::Endpoint(XdsEndpoint {
            address: sock(ip, port),
            ..XdsEndpoint::default()
        })),
        ..LbEndpoint::default()
    }
}

const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const PEM_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource { specifier: Some(data_source::Specifier::InlineString(s.into())), ..DataSource::default() })
}

fn cert_secret(name: &str) -> Secret {
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(PEM_CERT),
            private_key: inline(PEM_KEY),
            ..TlsCertificate::default()
        })),
    }
}

fn bundle_secret(name: &str) -> Secret {
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(PEM_CERT),
            ..CertificateValidationContext::default()
        })),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// LDS
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn chains_are_ordered_by_envoy_specificity_with_port_fallback_to_the_default() {
    let mut l = listener_with(vec![
        tcp_chain("any", None),
        tcp_chain("wide", port_prefix(Some(80), &[("10.0.0.0", 8)])),
        tcp_chain("narrow", port_prefix(Some(80), &[("10.1.0.0", 16), ("192.0.2.0", 24)])),
        tcp_chain("net", port_prefix(None, &[("172.16.0.0", 12)])),
    ]);
    l.use_original_dst = Some(BoolValue { value: true });
    l.default_filter_chain = Some(tcp_chain("fallback", None));
    let out = listener(&l).unwrap();
    assert!(out.spec.transparent);
    let got: Vec<(Option<String>, u16, Handler)> =
        out.spec.destinations.iter().map(|d| (d.prefix.map(|p| p.to_string()), d.port, d.handler.clone())).collect();
    let tcp = |c: &str| Handler::Tcp { cluster: c.into() };
    assert_eq!(
        got,
        vec![
            // Longest prefix first, as Envoy's longest-prefix match.
            (Some("192.0.2.0/24".into()), 80, tcp("narrow")),
            (Some("10.1.0.0/16".into()), 80, tcp("narrow")),
            (Some("10.0.0.0/8".into()), 80, tcp("wide")),
            (None, 80, tcp("fallback")),
            (Some("172.16.0.0/12".into()), 0, tcp("net")),
            (None, 0, tcp("any")),
        ]
    );
    assert_eq!(out.spec.default, tcp("fallback"));
    assert_eq!(out.spec.address, "0.0.0.0:15001".parse().unwrap());
}

#[test]
fn unsupported_chain_matches_are_refused_by_field() {
    let mut m = port_prefix(Some(443), &[]).unwrap();
    m.server_names = vec!["api.example".into()];
    let err = listener(&listener_with(vec![tcp_chain("c", Some(m))])).unwrap_err();
    assert_eq!(err.field, "listener[l].filter_chains[0].filter_chain_match.server_names");

    let same =
        listener_with(vec![tcp_chain("a", port_prefix(Some(80), &[])), tcp_chain("b", port_prefix(Some(80), &[]))]);
    assert_eq!(listener(&same).unwrap_err().field, "listener[l].filter_chains[1].filter_chain_match");

    let mut l = listener_with(vec![tcp_chain("a", None)]);
    l.listener_filters = vec![envoy_types::pb::envoy::config::listener::v3::ListenerFilter {
        name: "envoy.filters.listener.proxy_protocol".into(),
        ..Default::default()
    }];
    assert_eq!(listener(&l).unwrap_err().field, "listener[l].listener_filters[0].name");

    let mut l = listener_with(vec![tcp_chain("a", None)]);
    l.bind_to_port = Some(BoolValue { value: false });
    assert_eq!(listener(&l).unwrap_err().field, "listener[l].bind_to_port");
}

#[test]
fn http_chains_carry_codec_route_table_limits_and_tls() {
    let mut hcm = rds_hcm("routes");
    hcm.codec_type = CodecType::Http2 as i32;
    hcm.max_request_headers_kb = u32v(96);
    hcm.request_headers_timeout = Some(Duration { seconds: 2, nanos: 500_000 });
    let mut chain = hcm_chain(hcm);
    chain.transport_socket = tls_socket(DownstreamTlsContext {
        common_tls_context: common("default", "ROOTCA"),
        require_client_certificate: Some(BoolValue { value: true }),
        ..DownstreamTlsContext::default()
    });
    let out = listener(&listener_with(vec![chain])).unwrap();
    assert_eq!(
        out.spec.destinations[0].handler,
        Handler::Http { route_table: "routes".into(), codec: HttpCodec::Http2 }
    );
    assert_eq!(out.spec.max_request_headers_bytes, 96 * 1024);
    // Sub-millisecond remainders round up: a set timeout never becomes "none".
    assert_eq!(out.spec.timeouts.request_headers_ms, 2_001);
    assert_eq!(
        out.spec.tls,
        Some(DownstreamTls { certificate: "default".into(), require_client_certificate: true, kernel_tls: None })
    );
    assert_eq!(out.tls, Some(TlsSecrets { certificate: "default".into(), validation: "ROOTCA".into() }));
    assert_eq!(out.rds, BTreeSet::from(["routes".to_string()]));
}

#[test]
fn inline_route_configs_and_refused_http_filters() {
    let mut hcm = rds_hcm("unused");
    hcm.route_specifier = Some(RouteSpecifier::RouteConfig(config(vec![route_to("c", "/")])));
    let out = listener(&listener_with(vec![hcm_chain(hcm)])).unwrap();
    assert!(out.rds.is_empty());
    assert_eq!(out.inline_routes["rc"].virtual_hosts[0].routes[0].matcher.path, PathMatch::Prefix("/".into()));

    let mut hcm = rds_hcm("r");
    hcm.http_filters.insert(0, HttpFilter { name: "envoy.filters.http.fault".into(), ..HttpFilter::default() });
    let err = listener(&listener_with(vec![hcm_chain(hcm)])).unwrap_err();
    assert_eq!(err.field, "listener[l].filter_chains[0].filters[0].http_filters[0]");
    assert!(err.message.contains("envoy.filters.http.fault"), "{err}");
}

#[test]
fn chains_must_share_one_tls_setting() {
    let mut tls = tcp_chain("a", port_prefix(Some(443), &[]));
    tls.transport_socket =
        tls_socket(DownstreamTlsContext { common_tls_context: common("default", "ROOTCA"), ..Default::default() });
    let err = listener(&listener_with(vec![tls, tcp_chain("b", None)])).unwrap_err();
    assert_eq!(err.field, "listener[l].filter_chains[1].transport_socket");
}

// ---------------------------------------------------------------------------------------------------------------
// RDS
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn route_defaults_follow_envoy_and_header_matchers_keep_their_meaning() {
    let mut r = route_to("c", "/a");
    let m = r.r#match.as_mut().unwrap();
    m.headers = vec![
        HeaderMatcher {
            name: "X-Debug".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(false)),
            ..HeaderMatcher::default()
        },
        HeaderMatcher {
            name: "x-file".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::SuffixMatch(".tar.gz".into())),
            invert_match: true,
            ..HeaderMatcher::default()
        },
    ];
    let t = route_table(&config(vec![r])).unwrap();
    let headers = &t.virtual_hosts[0].routes[0].matcher.headers;
    assert_eq!(headers[0], HeaderMatch { name: "x-debug".into(), value: StringMatch::Present, invert: true });
    assert_eq!(
        headers[1],
        HeaderMatch { name: "x-file".into(), value: StringMatch::Regex(r".*\.tar\.gz".into()), invert: true }
    );
    let f = forward_of(&t);
    assert_eq!(f.timeout_ms, 15_000, "Envoy's default route timeout");
    assert_eq!(f.retry, None);
    assert_eq!(f.clusters, vec![WeightedCluster { cluster: "c".into(), weight: 1 }]);

    let mut r = route_to("c", "/a");
    r.r#match.as_mut().unwrap().headers = vec![HeaderMatcher {
        name: "x-n".into(),
        header_match_specifier: Some(HeaderMatchSpecifier::RangeMatch(Default::default())),
        ..HeaderMatcher::default()
    }];
    let err = route_table(&config(vec![r])).unwrap_err();
    assert_eq!(err.field, "route_configuration[rc].virtual_hosts[0].routes[0].match.headers[0].range_match");
}

#[test]
fn unsupported_match_conditions_are_never_dropped() {
    let mut r = route_to("c", "/");
    r.r#match.as_mut().unwrap().query_parameters = vec![Default::default()];
    let err = route_table(&config(vec![r])).unwrap_err();
    assert_eq!(err.field, "route_configuration[rc].virtual_hosts[0].routes[0].match.query_parameters");

    let mut r = route_to("c", "/");
    r.r#match.as_mut().unwrap().case_sensitive = Some(BoolValue { value: false });
    assert!(route_table(&config(vec![r])).unwrap_err().field.ends_with("match.case_sensitive"));

    let mut r = route_to("c", "/");
    r.r#match.as_mut().unwrap().path_specifier =
        Some(PathSpecifier::SafeRegex(RegexMatcher { regex: "/a(".into(), ..RegexMatcher::default() }));
    let err = route_table(&config(vec![r])).unwrap_err();
    assert_eq!(err.field, "route_configuration[rc].virtual_hosts[0].routes[0].match.path");
    assert!(err.message.contains("regex"), "{err}");
}

#[test]
fn weighted_retries_and_header_mutation_levels() {
    let mut r = route_to("c", "/");
    let Some(route::Action::Route(ra)) = r.action.as_mut() else { unreachable!() };
    ra.cluster_specifier = Some(route_action::ClusterSpecifier::WeightedClusters(XdsWeighted {
        clusters: vec![
            ClusterWeight { name: "v1".into(), weight: u32v(90), ..ClusterWeight::default() },
            ClusterWeight { name: "v2".into(), weight: u32v(10), ..ClusterWeight::default() },
            ClusterWeight { name: "v3".into(), weight: u32v(0), ..ClusterWeight::default() },
        ],
        ..XdsWeighted::default()
    }));
    ra.timeout = Some(Duration { seconds: 0, nanos: 0 });
    r.request_headers_to_add = vec![HeaderValueOption {
        header: Some(XdsHeaderValue { key: "X-Route".into(), value: "1".into(), ..Default::default() }),
        ..HeaderValueOption::default()
    }];
    let mut rc = config(vec![r]);
    rc.virtual_hosts[0].retry_policy =
        Some(XdsRetry { retry_on: "connect-failure, reset".into(), num_retries: u32v(3), ..XdsRetry::default() });
    rc.virtual_hosts[0].request_headers_to_add = vec![HeaderValueOption {
        header: Some(XdsHeaderValue { key: "x-vhost".into(), value: "2".into(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }];
    rc.request_headers_to_remove = vec!["X-Internal".into()];
    let t = route_table(&rc).unwrap();
    let f = forward_of(&t);
    assert_eq!(
        f.clusters,
        vec![
            WeightedCluster { cluster: "v1".into(), weight: 90 },
            WeightedCluster { cluster: "v2".into(), weight: 10 }
        ]
    );
    assert_eq!(f.timeout_ms, 0, "an explicit zero disables the timeout");
    let retry = f.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.retry_on, BTreeSet::from([RetryOn::ConnectFailure, RetryOn::Reset]));
    let route = &t.virtual_hosts[0].routes[0];
    assert_eq!(
        route.request_headers_to_add,
        vec![
            HeaderValue { name: "x-route".into(), value: "1".into(), append: true },
            HeaderValue { name: "x-vhost".into(), value: "2".into(), append: false },
        ]
    );
    assert_eq!(route.request_headers_to_remove, vec!["x-internal".to_string()]);

    let mut rc = config(vec![route_to("c", "/")]);
    rc.virtual_hosts[0].retry_policy = Some(XdsRetry { retry_on: "5xx,refused-stream".into(), ..XdsRetry::default() });
    let err = route_table(&rc).unwrap_err();
    assert_eq!(err.field, "route_configuration[rc].virtual_hosts[0].routes[0].route.retry_policy.retry_on");
    assert!(err.message.contains("refused-stream"), "{err}");
}

#[test]
fn redirects_and_direct_responses() {
    let mut r = route_to("c", "/");
    r.action = Some(route::Action::Redirect(RedirectAction {
        host_redirect: "example.com".into(),
        port_redirect: 8443,
        scheme_rewrite_specifier: Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)),
        response_code: redirect_action::RedirectResponseCode::Found as i32,
        ..RedirectAction::default()
    }));
    let mut d = route_to("c", "/x");
    d.action = Some(route::Action::DirectResponse(DirectResponseAction {
        status: 404,
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(b"gone".to_vec())),
            ..DataSource::default()
        }),
        ..DirectResponseAction::default()
    }));
    let t = route_table(&config(vec![r, d])).unwrap();
    assert_eq!(
        t.virtual_hosts[0].routes[0].action,
        RouteAction::Redirect(Redirect {
            scheme: Some("https".into()),
            host: Some("example.com:8443".into()),
            path: None,
            status: 302,
        })
    );
    assert_eq!(t.virtual_hosts[0].routes[1].action, RouteAction::DirectResponse { status: 404, body: "gone".into() });
}

// ---------------------------------------------------------------------------------------------------------------
// CDS / EDS / SDS
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn cluster_defaults_are_envoys() {
    let mut c = eds_cluster("web");
    c.http2_protocol_options = Some(Default::default());
    c.outlier_detection = Some(Default::default());
    let out = cluster(&c).unwrap();
    assert_eq!(out.eds_service.as_deref(), Some("web"));
    assert_eq!(out.spec.protocol, UpstreamProtocol::Http2);
    assert_eq!(out.spec.lb, LbPolicy::RoundRobin);
    assert_eq!(out.spec.connect_timeout_ms, 5_000);
    assert_eq!(out.spec.circuit_breaker, ENVOY_CIRCUIT_BREAKER);
    assert_eq!(
        out.spec.outlier_detection,
        Some(OutlierDetection {
            consecutive_5xx: 5,
            // Envoy enforces gateway failures only when asked to.
            consecutive_gateway_errors: 0,
            base_ejection_ms: 30_000,
            max_ejection_percent: 10,
        })
    );
    assert_eq!(out.tls, None);
}

#[test]
fn clusters_whose_meaning_we_cannot_keep_are_refused() {
    let mut c = eds_cluster("web");
    c.lb_policy = XdsLb::Maglev as i32;
    let err = cluster(&c).unwrap_err();
    assert_eq!(err.field, "cluster[web].lb_policy");
    assert!(err.message.contains("MAGLEV"), "{err}");

    let mut c = eds_cluster("web");
    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    assert_eq!(cluster(&c).unwrap_err().field, "cluster[web].type");

    let mut c = eds_cluster("web");
    c.health_checks = vec![XdsHealthCheck::default(), XdsHealthCheck::default()];
    assert_eq!(cluster(&c).unwrap_err().field, "cluster[web].health_checks");

    let mut c = eds_cluster("web");
    c.connect_timeout = Some(Duration { seconds: 3_600, nanos: 0 });
    assert_eq!(cluster(&c).unwrap_err().field, "cluster[web].connect_timeout_ms");

    let mut c = eds_cluster("web");
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig { name: "default".into(), sds_config: None }],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(MatchPattern::Prefix("spiffe://cluster.local/".into())),
                                ignore_case: false,
                            }),
                            oid: String::new(),
                        }],
                        ..CertificateValidationContext::default()
                    }),
                    validation_context_sds_secret_config: Some(SdsSecretConfig {
                        name: "ROOTCA".into(),
                        sds_config: None,
                    }),
                    ..Default::default()
                },
            )),
            ..CommonTlsContext::default()
        }),
        ..UpstreamTlsContext::default()
    };
    c.transport_socket = Some(TransportSocket {
        name: "tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&ctx))),
    });
    let err = cluster(&c).unwrap_err();
    assert!(err.field.ends_with("default_validation_context.match_typed_subject_alt_names[0].matcher"), "{err}");
}

#[test]
fn endpoints_keep_weights_health_and_locality() {
    let cla = ClusterLoadAssignment {
        cluster_name: "web".into(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(envoy_types::pb::envoy::config::core::v3::Locality {
                region: "eu".into(),
                zone: String::new(),
                sub_zone: String::new(),
            }),
            lb_endpoints: vec![
                endpoint("10.0.0.1", 80, None, HealthStatus::Unknown),
                endpoint("10.0.0.2", 80, Some(7), HealthStatus::Timeout),
                endpoint("::1", 80, Some(2), HealthStatus::Draining),
            ],
            ..LocalityLbEndpoints::default()
        }],
        ..ClusterLoadAssignment::default()
    };
    let eps = endpoints(&cla).unwrap();
    let got: Vec<_> = eps.iter().map(|e| (e.address.to_string(), e.weight, e.health, e.locality.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("10.0.0.1:80".to_string(), 1, EndpointHealth::Healthy, "eu"),
            ("10.0.0.2:80".to_string(), 7, EndpointHealth::Unhealthy, "eu"),
            ("[::1]:80".to_string(), 2, EndpointHealth::Draining, "eu"),
        ]
    );

    let mut bad = cla.clone();
    bad.endpoints[0].priority = 1;
    assert_eq!(endpoints(&bad).unwrap_err().field, "cluster_load_assignment[web].endpoints[0].priority");
    let mut bad = cla.clone();
    bad.endpoints[0].lb_endpoints[1] = endpoint("10.0.0.1", 80, None, HealthStatus::Healthy);
    assert_eq!(
        endpoints(&bad).unwrap_err().field,
        "cluster_load_assignment[web].endpoints[0].lb_endpoints[1].endpoint.address"
    );
    let mut bad = cla;
    bad.endpoints[0].lb_endpoints[0] = endpoint("10.0.0.9", 80, Some(500), HealthStatus::Healthy);
    assert!(endpoints(&bad).unwrap_err().field.ends_with("lb_endpoints[0].load_balancing_weight"));
}

#[test]
fn secrets_are_certificates_or_bundles() {
    assert_eq!(
        secret(&cert_secret("default")).unwrap(),
        XdsSecret::Certificate { chain_pem: PEM_CERT.into(), key_pem: PEM_KEY.into() }
    );
    assert_eq!(secret(&bundle_secret("ROOTCA")).unwrap(), XdsSecret::TrustBundle { pem: PEM_CERT.into() });
    let mut s = cert_secret("default");
    if let Some(secret::Type::TlsCertificate(t)) = &mut s.r#type {
        t.private_key = Some(DataSource {
            specifier: Some(data_source::Specifier::Filename("/etc/key.pem".into())),
            ..DataSource::default()
        });
    }
    assert_eq!(secret(&s).unwrap_err().field, "secret[default].tls_certificate.private_key");
    let debug = format!("{:?}", secret(&cert_secret("default")).unwrap());
    assert!(!debug.contains("MIIE"), "key material must not be printed: {debug}");
}

// ---------------------------------------------------------------------------------------------------------------
// Assembly
// ---------------------------------------------------------------------------------------------------------------

fn resources() -> XdsResources {
    let mut res = XdsResources::default();
    res.clusters.insert("web".into(), cluster(&eds_cluster("web")).unwrap());
    res.listeners.insert(
        "l".into(),
        listener(&listener_with(vec![hcm_chain(rds_hcm("rc")), tcp_chain("db", port_prefix(Some(5432), &[]))]))
            .unwrap(),
    );
    res
}

#[test]
fn listeners_wait_for_their_route_tables_and_unknown_clusters_behave_as_in_envoy() {
    let mut res = resources();
    let a = assemble(&res).unwrap();
    assert_eq!(a.warming, vec!["listener/l".to_string()]);
    assert!(a.specs.listeners.is_empty());
    assert!(a.specs.clusters["web"].endpoints.is_empty(), "EDS not arrived: no endpoints yet");

    res.route_tables
        .insert("rc".into(), route_table(&config(vec![route_to("web", "/"), route_to("gone", "/g")])).unwrap());
    res.endpoints.insert(
        "web".into(),
        endpoints(&ClusterLoadAssignment {
            cluster_name: "web".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint("10.0.0.1", 80, None, HealthStatus::Healthy)],
                ..LocalityLbEndpoints::default()
            }],
            ..ClusterLoadAssignment::default()
        })
        .unwrap(),
    );
    let a = assemble(&res).unwrap();
    assert!(a.warming.is_empty(), "{:?}", a.warming);
    assert_eq!(a.specs.clusters["web"].endpoints.len(), 1);
    let routes = &a.specs.route_tables["rc"].virtual_hosts[0].routes;
    assert!(matches!(routes[0].action, RouteAction::Forward(_)));
    assert_eq!(routes[1].action, RouteAction::DirectResponse { status: 503, body: String::new() });
    let l = &a.specs.listeners["l"];
    assert_eq!(l.destinations[0].port, 5432);
    assert_eq!(l.destinations[0].handler, Handler::Reject, "tcp_proxy to an unknown cluster closes");

    // A split between a known and an unknown cluster cannot keep its shares: the table (and listener) wait.
    let mut split = route_to("web", "/");
    if let Some(route::Action::Route(ra)) = split.action.as_mut() {
        ra.cluster_specifier = Some(route_action::ClusterSpecifier::WeightedClusters(XdsWeighted {
            clusters: vec![
                ClusterWeight { name: "web".into(), weight: u32v(1), ..ClusterWeight::default() },
                ClusterWeight { name: "gone".into(), weight: u32v(1), ..ClusterWeight::default() },
            ],
            ..XdsWeighted::default()
        }));
    }
    res.route_tables.insert("rc".into(), route_table(&config(vec![split])).unwrap());
    let a = assemble(&res).unwrap();
    assert_eq!(a.warming, vec!["route_table/rc".to_string(), "listener/l".to_string()]);
}

#[test]
fn certificates_pair_secrets_and_conflicting_pairs_are_refused() {
    let mut res = XdsResources::default();
    let mut chain = tcp_chain("web", None);
    chain.transport_socket =
        tls_socket(DownstreamTlsContext { common_tls_context: common("default", "ROOTCA"), ..Default::default() });
    res.listeners.insert("in".into(), listener(&listener_with(vec![chain])).unwrap());
    res.clusters.insert("web".into(), cluster(&eds_cluster("web")).unwrap());
    let a = assemble(&res).unwrap();
    assert_eq!(a.warming, vec!["listener/in".to_string()], "secrets not arrived yet");

    res.secrets.insert("default".into(), secret(&cert_secret("default")).unwrap());
    res.secrets.insert("ROOTCA".into(), secret(&bundle_secret("ROOTCA")).unwrap());
    let a = assemble(&res).unwrap();
    assert!(a.warming.is_empty());
    assert_eq!(
        a.specs.certificates["default"],
        CertificateSpec {
            certificate_chain_pem: PEM_CERT.into(),
            private_key_pem: PEM_KEY.into(),
            trust_bundle_pem: PEM_CERT.into(),
        }
    );

    let mut other = tcp_chain("web", None);
    other.transport_socket =
        tls_socket(DownstreamTlsContext { common_tls_context: common("default", "OTHERCA"), ..Default::default() });
    res.listeners.insert("in2".into(), listener(&listener_with(vec![other])).unwrap());
    let err = assemble(&res).unwrap_err();
    assert_eq!(err.field, "listener[in2].transport_socket");
    assert!(err.message.contains("OTHERCA") && err.message.contains("ROOTCA"), "{err}");
}

#[test]
fn any_payloads_are_checked_against_their_type() {
    let any = pack(&TcpProxy::default());
    let err = unpack::<HttpConnectionManager>(&any, "f").unwrap_err();
    assert_eq!(err.field, "f");
    let garbage = Any { type_url: TcpProxy::type_url(), value: vec![0xff, 0xff, 0xff] };
    assert!(unpack::<TcpProxy>(&garbage, "g").unwrap_err().message.contains("undecodable"));
}
