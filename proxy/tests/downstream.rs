//! The proxy end to end over real sockets: backends (a hyper server that echoes what it received and names
//! itself, a TCP echo) spun up in the test, configuration through `Proxy::apply`, clients over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dpu_proxy::model::{
    CircuitBreaker, ClusterSpec, Destination, Endpoint, EndpointHealth, Forward, Handler, HeaderMatch, HeaderValue,
    HttpCodec, LbPolicy, ListenerSpec, ListenerTimeouts, MeshSpecs, PathMatch, Redirect, RetryOn, RetryPolicy, Route,
    RouteAction, RouteMatch, RouteTableSpec, SpiffeId, StringMatch, UpstreamProtocol, VirtualHost, WeightedCluster,
    WorkloadLimits, WorkloadSpec,
};
use dpu_proxy::proxy::{ApplyReport, Proxy};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

type TestBody = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------------------------

/// An HTTP/1.1 + h2c backend named `name`:
/// - `/status/<code>` answers with that status;
/// - `/fail-on/<name>` answers 503 on the backend of that name;
/// - `/slow/<ms>` answers after that long;
/// - `/grpc` echoes the body as a gRPC response with `grpc-status: 0` and `x-backend` in trailers, plus the
///   request's `x-client-trailer` trailer as `x-echoed-trailer`;
/// - an Upgrade request is accepted (101) and the upgraded stream echoed;
/// - anything else: 200 with JSON `{backend, method, path, headers}`.
async fn http_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(move |req| backend(name, req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn backend(name: &'static str, mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    if req.headers().contains_key(http::header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .header("x-backend", name)
            .body(Empty::new().boxed())
            .expect("101");
        return Ok(resp);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(Response::builder()
            .status(status)
            .header("x-backend", name)
            .body(Full::new(Bytes::from(name)).boxed())
            .expect("status"));
    }
    if path.strip_prefix("/fail-on/") == Some(name) {
        let _ = req.into_body().collect().await;
        return Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("x-backend", name)
            .body(Full::new(Bytes::from(name)).boxed())
            .expect("failure"));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(100))).await;
    }
    if path == "/grpc" {
        let collected = req.into_body().collect().await.ok();
        let request_trailers = collected.as_ref().and_then(|c| c.trailers().cloned()).unwrap_or_default();
        let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
        let mut trailers = HeaderMap::new();
        if let Some(v) = request_trailers.get("x-client-trailer") {
            trailers.insert("x-echoed-trailer", v.clone());
        }
        trailers.insert("grpc-status", "0".parse().expect("value"));
        trailers.insert("x-backend", name.parse().expect("value"));
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![Ok(Frame::data(body)), Ok(Frame::trailers(trailers))];
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .expect("grpc"));
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = v.to_str().unwrap_or("");
        headers
            .entry(k.as_str().to_string())
            .and_modify(|cur| *cur = format!("{cur}, {v}"))
            .or_insert_with(|| v.into());
    }
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, ());
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let echo = serde_json::json!({
        "backend": name,
        "body": String::from_utf8_lossy(&body),
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
    });
    Ok(Response::builder()
        .header("x-backend", name)
        .header("x-internal", "secret")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(echo.to_string())).boxed())
        .expect("echo"))
}

/// A TCP echo that answers only after the client half-closes: everything received, then FIN.
async fn tcp_echo_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut data = Vec::new();
                if stream.read_to_end(&mut data).await.is_ok() {
                    let _ = stream.write_all(b"echo:").await;
                    let _ = stream.write_all(&data).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().expect("probe address").port()
}

/// A listener address no other test in this process can be given: each call takes its own loopback
/// address (127.1.x.y), so a port probed and released here cannot be handed to a parallel test's probe.
fn listen_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8);
    let probe = std::net::TcpListener::bind((ip, 0)).expect("probe port");
    probe.local_addr().expect("probe address")
}

fn cluster(protocol: UpstreamProtocol, endpoints: &[SocketAddr]) -> ClusterSpec {
    ClusterSpec {
        protocol,
        endpoints: endpoints
            .iter()
            .map(|a| Endpoint { address: *a, weight: 1, locality: String::new(), health: EndpointHealth::Healthy })
            .collect(),
        lb: LbPolicy::RoundRobin,
        connect_timeout_ms: 1000,
        idle_timeout_ms: 0,
        circuit_breaker: CircuitBreaker::default(),
        health_check: None,
        outlier_detection: None,
        tls: None,
    }
}

fn route(name: &str, path: PathMatch, action: RouteAction) -> Route {
    Route {
        name: name.into(),
        matcher: RouteMatch { path, headers: vec![] },
        action,
        request_headers_to_add: vec![],
        request_headers_to_remove: vec![],
        response_headers_to_add: vec![],
        response_headers_to_remove: vec![],
    }
}

fn forward_to(clusters: &[(&str, u32)]) -> Forward {
    Forward {
        clusters: clusters.iter().map(|(c, w)| WeightedCluster { cluster: c.to_string(), weight: *w }).collect(),
        timeout_ms: 0,
        prefix_rewrite: None,
        host_rewrite: None,
        retry: None,
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost { name: name.into(), domains: domains.iter().map(|d| d.to_string()).collect(), routes }
}

fn http_listener(address: SocketAddr, table: &str, codec: HttpCodec) -> ListenerSpec {
    ListenerSpec {
        address,
        transparent: false,
        destinations: vec![],
        default: Handler::Http { route_table: table.into(), codec },
        tls: None,
        policies: vec![],
        timeouts: ListenerTimeouts::default(),
        max_request_headers_bytes: 16 * 1024,
    }
}

fn workload(addresses: &[&str], port_mark: u32, sa: &str, limits: WorkloadLimits) -> WorkloadSpec {
    WorkloadSpec {
        port: format!("vf-{sa}"),
        port_mark,
        addresses: addresses.iter().map(|a| a.parse().expect("address")).collect(),
        identity: SpiffeId::new("cluster.local", "shop", sa).expect("identity"),
        certificate: String::new(),
        limits,
    }
}

/// One HTTP cluster per backend name, a route table `web`, and an HTTP listener on `address`.
fn http_specs(address: SocketAddr, clusters: &[(&str, SocketAddr)], vhosts: Vec<VirtualHost>) -> MeshSpecs {
    let mut specs = MeshSpecs::default();
    for (name, addr) in clusters {
        specs.clusters.insert(name.to_string(), cluster(UpstreamProtocol::Http1, &[*addr]));
    }
    specs.route_tables.insert("web".into(), RouteTableSpec { virtual_hosts: vhosts });
    specs.listeners.insert("http".into(), http_listener(address, "web", HttpCodec::Http1));
    specs
}

async fn apply_ok(proxy: &Proxy, source: &str, specs: MeshSpecs) {
    let report: ApplyReport = proxy.apply(source, specs).await;
    assert!(report.errors.is_empty(), "unexpected apply errors: {:?}", report.errors);
}

// ---------------------------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------------------------

struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn backend(&self) -> String {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }
}

impl H1 {
    async fn connect(addr: SocketAddr) -> H1 {
        H1::over(TcpStream::connect(addr).await.expect("connect proxy")).await
    }

    async fn connect_from(addr: SocketAddr, source: &str) -> H1 {
        H1::over(connect_from(addr, source).await.expect("connect proxy")).await
    }

    async fn over(stream: TcpStream) -> H1 {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        H1 { sender }
    }

    async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", host, path, headers, Bytes::new()).await.expect("request")
    }

    async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, hyper::Error> {
        let mut b = Request::builder().method(method).uri(path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self.sender.send_request(b.body(Full::new(body)).expect("request")).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }
}

async fn connect_from(addr: SocketAddr, source: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().expect("source"), 0))?;
    socket.connect(addr).await
}

/// Writes raw bytes and reads until the proxy closes (or `limit` passes).
async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect proxy");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await.is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn metrics_text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("encode metrics");
    out
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_route_by_host_path_and_header() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let c = http_backend("c").await;
    let addr = listen_addr();
    let mut canary = route("canary", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("c", 1)])));
    canary.matcher.headers =
        vec![HeaderMatch { name: "x-canary".into(), value: StringMatch::Exact("yes".into()), invert: false }];
    let specs = http_specs(
        addr,
        &[("a", a), ("b", b), ("c", c)],
        vec![
            vhost(
                "api",
                &["api.example"],
                vec![
                    canary,
                    route("api-b", PathMatch::Prefix("/b/".into()), RouteAction::Forward(forward_to(&[("b", 1)]))),
                    route("api-a", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)]))),
                ],
            ),
            vhost(
                "other",
                &["*"],
                vec![route("rest", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("b", 1)])))],
            ),
        ],
    );
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let mut client = H1::connect(addr).await;
    let r = client.get("api.example:8080", "/x?q=1", &[]).await;
    assert_eq!((r.status, r.backend().as_str()), (StatusCode::OK, "a"));
    let echo = r.json();
    assert_eq!(echo["path"], "/x?q=1");
    assert_eq!(echo["headers"]["host"], "api.example:8080");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-request-id"].as_str().map(str::len), Some(36));
    assert_eq!(client.get("api.example", "/b/1", &[]).await.backend(), "b");
    assert_eq!(client.get("api.example", "/b/1", &[("x-canary", "yes")]).await.backend(), "c");
    assert_eq!(client.get("elsewhere", "/x", &[]).await.backend(), "b");
    // The client's request id is kept.
    let r = client.get("api.example", "/", &[("x-request-id", "abc")]).await;
    assert_eq!(r.json()["headers"]["x-request-id"], "abc");

    let text = metrics_text(&registry);
    assert!(text.contains("istio_requests_total{"), "{text}");
    assert!(text.contains("destination_service=\"a\""), "{text}");
    assert!(text.contains("dpu_proxy_endpoint_requests_total{"), "{text}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_weights() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let addr = listen_addr();
    let specs = http_specs(
        addr,
        &[("a", a), ("b", b)],
        vec![vhost(
            "web",
            &["*"],
            vec![route(
                "split",
                PathMatch::Prefix("/".into()),
                RouteAction::Forward(forward_to(&[("a", 80), ("b", 20)])),
            )],
        )],
    );
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;
    let mut client = H1::connect(addr).await;
    let n = 400;
    let mut to_a = 0;
    for _ in 0..n {
        if client.get("web", "/", &[]).await.backend() == "a" {
            to_a += 1;
        }
    }
    let share = f64::from(to_a) / f64::from(n);
    assert!((0.70..=0.90).contains(&share), "share of a: {share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_direct_response_and_header_rewrites() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut rewrite = route(
        "rewrite",
        PathMatch::Prefix("/api/".into()),
        RouteAction::Forward(Forward {
            prefix_rewrite: Some("/v2/".into()),
            host_rewrite: Some("internal.example".into()),
            ..forward_to(&[("a", 1)])
        }),
    );
    rewrite.request_headers_to_add = vec![
        HeaderValue { name: "x-added".into(), value: "1".into(), append: false },
        HeaderValue { name: "x-multi".into(), value: "two".into(), append: true },
    ];
    rewrite.request_headers_to_remove = vec!["x-drop".into()];
    rewrite.response_headers_to_add =
        vec![HeaderValue { name: "x-served-by".into(), value: "proxy".into(), append: false }];
    rewrite.response_headers_to_remove = vec!["x-internal".into()];
    let specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![
                route(
                    "moved",
                    PathMatch::Exact("/old".into()),
                    RouteAction::Redirect(Redirect {
                        scheme: Some("https".into()),
                        host: None,
                        path: Some("/new".into()),
                        status: 308,
                    }),
                ),
                route(
                    "teapot",
                    PathMatch::Exact("/tea".into()),
                    RouteAction::DirectResponse { status: 418, body: "short and stout".into() },
                ),
                rewrite,
            ],
        )],
    );
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;
    let mut client = H1::connect(addr).await;

    let r = client.get("shop.example", "/old?x=1", &[]).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers["location"], "https://shop.example/new?x=1");

    let r = client.get("shop.example", "/tea", &[]).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(&r.body[..], b"short and stout");

    let r = client
        .get(
            "shop.example",
            "/api/items?id=3",
            &[("x-drop", "1"), ("x-multi", "one"), ("connection", "x-hop"), ("x-hop", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let echo = r.json();
    assert_eq!(echo["path"], "/v2/items?id=3");
    assert_eq!(echo["headers"]["host"], "internal.example");
    assert_eq!(echo["headers"]["x-added"], "1");
    assert!(echo["headers"].get("x-drop").is_none(), "{echo}");
    assert!(echo["headers"].get("x-hop").is_none(), "{echo}");
    assert_eq!(r.headers["x-served-by"], "proxy");
    assert!(!r.headers.contains_key("x-internal"));
    // Appended: both values reach the backend.
    assert_eq!(echo["headers"]["x-multi"], "one, two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_5xx_succeed_on_the_other_endpoint() {
    let good = http_backend("good").await;
    let bad = http_backend("bad").await;
    let addr = listen_addr();
    let mut specs = MeshSpecs::default();
    specs.clusters.insert("mixed".into(), cluster(UpstreamProtocol::Http1, &[bad, good]));
    let retry = RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: 0,
        retry_on: BTreeSet::from([RetryOn::FiveXx]),
        budget_percent: 100,
        min_retry_concurrency: 10,
    };
    specs.route_tables.insert(
        "web".into(),
        RouteTableSpec {
            virtual_hosts: vec![vhost(
                "web",
                &["*"],
                vec![route(
                    "retry",
                    PathMatch::Prefix("/".into()),
                    RouteAction::Forward(Forward { retry: Some(retry), ..forward_to(&[("mixed", 1)]) }),
                )],
            )],
        },
    );
    specs.listeners.insert("http".into(), http_listener(addr, "web", HttpCodec::Http1));
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;

    // The bad endpoint answers /fail-on/bad with 503, the good one with 200: every request ends on the good one.
    let mut client = H1::connect(addr).await;
    for _ in 0..6 {
        let r = client.send("POST", "web", "/fail-on/bad", &[], Bytes::from_static(b"payload")).await.expect("request");
        assert_eq!(r.status, StatusCode::OK, "body: {:?}", r.body);
        assert_eq!(r.backend(), "good");
        assert_eq!(r.json()["method"], "POST");
        assert_eq!(r.json()["body"], "payload");
    }
    // A chunked body (length unknown up front) is replayed from the copy kept while it streamed.
    for _ in 0..6 {
        let (resp, _) = raw_exchange(
            addr,
            b"POST /fail-on/bad HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
              7\r\npayload\r\n0\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("x-backend: good"), "{resp}");
        assert!(resp.contains(r#""body":"payload""#), "{resp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_gives_504_and_no_healthy_endpoint_503() {
    let slow = http_backend("slow").await;
    let addr = listen_addr();
    let mut specs = MeshSpecs::default();
    specs.clusters.insert("slow".into(), cluster(UpstreamProtocol::Http1, &[slow]));
    let mut down = cluster(UpstreamProtocol::Http1, &[slow]);
    down.endpoints[0].health = EndpointHealth::Unhealthy;
    specs.clusters.insert("down".into(), down);
    let retry = RetryPolicy {
        attempts: 1,
        per_try_timeout_ms: 150,
        retry_on: BTreeSet::from([RetryOn::FiveXx]),
        budget_percent: 100,
        min_retry_concurrency: 10,
    };
    specs.route_tables.insert(
        "web".into(),
        RouteTableSpec {
            virtual_hosts: vec![vhost(
                "web",
                &["*"],
                vec![
                    route("down", PathMatch::Prefix("/down".into()), RouteAction::Forward(forward_to(&[("down", 1)]))),
                    route(
                        "slow",
                        PathMatch::Prefix("/".into()),
                        RouteAction::Forward(Forward { retry: Some(retry), ..forward_to(&[("slow", 1)]) }),
                    ),
                ],
            )],
        },
    );
    specs.listeners.insert("http".into(), http_listener(addr, "web", HttpCodec::Http1));
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;
    let mut client = H1::connect(addr).await;

    let started = Instant::now();
    let r = client.get("web", "/slow/2000", &[]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.headers["x-dpu-proxy-error"], "upstream_per_try_timeout");
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
    // A shorter grpc-timeout wins over the per-try timeout: DEADLINE_EXCEEDED, trailers-only.
    let started = Instant::now();
    let r = client.get("web", "/slow/2000", &[("content-type", "application/grpc"), ("grpc-timeout", "50m")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["grpc-status"], "4");
    assert_eq!(r.headers["x-dpu-proxy-error"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_millis(1000), "took {:?}", started.elapsed());
    let fast = client.get("web", "/fast", &[]).await;
    assert_eq!(fast.status, StatusCode::OK);

    let r = client.get("web", "/down", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["x-dpu-proxy-error"], "no_healthy_endpoint");

    // gRPC requests get trailers-only local replies.
    let r = client.get("web", "/down", &[("content-type", "application/grpc")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["grpc-status"], "14");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_slow_requests_are_cut() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    let l = specs.listeners.get_mut("http").expect("listener");
    l.max_request_headers_bytes = 4096;
    l.timeouts.request_headers_ms = 300;
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;

    let (resp, closed) = raw_exchange(addr, b"GARBAGE\r\n\r\n", Duration::from_secs(3)).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:?}");
    assert!(closed, "connection left open after a malformed request");

    // Over the limit but under hyper's smallest read buffer: refused by the head size check.
    let big = format!("GET / HTTP/1.1\r\nhost: web\r\nx-big: {}\r\n\r\n", "v".repeat(6000));
    let (resp, closed) = raw_exchange(addr, big.as_bytes(), Duration::from_secs(3)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");
    assert!(closed);
    // Far over the limit: the head never fits the read buffer.
    let huge = format!("GET / HTTP/1.1\r\nhost: web\r\nx-big: {}\r\n\r\n", "v".repeat(64 * 1024));
    let (resp, _) = raw_exchange(addr, huge.as_bytes(), Duration::from_secs(3)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");

    // Slowloris: half a head, then nothing; the header timeout closes the connection.
    let started = Instant::now();
    let (_, closed) = raw_exchange(addr, b"GET / HTTP/1.1\r\nhost: web\r\nx-slow:", Duration::from_secs(5)).await;
    assert!(closed, "slow client not cut");
    assert!(started.elapsed() < Duration::from_secs(3), "cut after {:?}", started.elapsed());

    // A well-formed request still works.
    let (resp, _) =
        raw_exchange(addr, b"GET /ok HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n", Duration::from_secs(3)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
}

/// Specs for one listener at `addr` routing every request to backend `a`.
fn everything_to_a(addr: SocketAddr, a: SocketAddr) -> MeshSpecs {
    http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    )
}

/// Upgrades `client`'s connection to the echo protocol (backend `a` answers 101) and checks that each message
/// comes back through the tunnel.
async fn upgrade_and_echo(client: &mut H1, messages: &[&[u8]]) {
    let req = Request::builder()
        .uri("/ws")
        .header("host", "web")
        .header("connection", "Upgrade")
        .header("upgrade", "echo")
        .body(Full::new(Bytes::new()))
        .expect("request");
    client.sender.ready().await.expect("connection open");
    let resp = client.sender.send_request(req).await.expect("upgrade response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["x-backend"], "a");
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    for msg in messages {
        io.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(3), io.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(&buf, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_is_tunnelled_both_ways() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", everything_to_a(addr, a)).await;
    let mut client = H1::connect(addr).await;
    upgrade_and_echo(&mut client, &[b"hello", b"second frame"]).await;
}

/// The value of an unlabelled gauge or counter in the text exposition.
fn metric_value(registry: &Registry, name: &str) -> Option<i64> {
    metrics_text(registry)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Reads one response with a Content-Length body off a raw connection; returns the head and the body.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read");
        assert_ne!(n, 0, "connection closed before a full response head: {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse::<usize>().ok())
        .expect("content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_keep_alive_connections_release_their_codec_and_serve_again() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", everything_to_a(addr, a)).await;
    let codecs = || metric_value(&registry, "dpu_proxy_http1_codecs").expect("dpu_proxy_http1_codecs");
    let released = || async {
        let deadline = Instant::now() + Duration::from_secs(3);
        while codecs() != 0 {
            assert!(Instant::now() < deadline, "the codec was not released: {} held", codecs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let quiet = dpu_proxy::http::RELEASE_IDLE_CODEC_AFTER * 4;

    // A keep-alive client: the codec goes while it is quiet, and the same connection serves the next request.
    let mut client = H1::connect(addr).await;
    assert_eq!(client.get("web", "/one", &[]).await.status, StatusCode::OK);
    released().await;
    let again = client.get("web", "/two", &[]).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["path"], "/two");
    released().await;

    // A head that arrives in two pieces with a quiet spell between them, then two pipelined requests.
    let mut raw = TcpStream::connect(addr).await.expect("connect proxy");
    raw.write_all(b"GET /split HTTP/1.1\r\nHo").await.expect("write");
    tokio::time::sleep(quiet).await;
    raw.write_all(b"st: web\r\n\r\n").await.expect("write");
    let (head, body) = read_response(&mut raw).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("/split"), "{body}");
    tokio::time::sleep(quiet).await;
    raw.write_all(b"GET /p1 HTTP/1.1\r\nHost: web\r\n\r\nGET /p2 HTTP/1.1\r\nHost: web\r\n\r\n").await.expect("write");
    for path in ["/p1", "/p2"] {
        let (head, body) = read_response(&mut raw).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(body.contains(path), "{path} answered with {body}");
    }
    released().await;

    // An upgrade on a connection that has released its codec: the tunnel gets the transport.
    upgrade_and_echo(&mut client, &[b"after a release"]).await;
    released().await;
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP/2 and gRPC
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_grpc_trailers_pass_through() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut specs = MeshSpecs::default();
    specs.clusters.insert("grpc".into(), cluster(UpstreamProtocol::Http2, &[a]));
    specs.route_tables.insert(
        "web".into(),
        RouteTableSpec {
            virtual_hosts: vec![vhost(
                "web",
                &["*"],
                vec![route(
                    "grpc",
                    PathMatch::Prefix("/grpc".into()),
                    RouteAction::Forward(forward_to(&[("grpc", 1)])),
                )],
            )],
        },
    );
    specs.listeners.insert("h2".into(), http_listener(addr, "web", HttpCodec::Auto));
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;

    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2 handshake");
    tokio::spawn(conn);
    // A streamed request body (no length) whose trailers must reach the backend.
    let mut request_trailers = HeaderMap::new();
    request_trailers.insert("x-client-trailer", "from-client".parse().expect("value"));
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))), Ok(Frame::trailers(request_trailers))];
    let req = Request::builder()
        .method("POST")
        .uri("http://svc.example/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .expect("request");
    let resp = sender.send_request(req).await.expect("grpc response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-backend"], "a");
    assert_eq!(trailers["x-echoed-trailer"], "from-client");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");

    // No route for a gRPC method: trailers-only UNIMPLEMENTED.
    let req = Request::builder()
        .method("POST")
        .uri("http://svc.example/pkg.Svc/Missing")
        .header("content-type", "application/grpc")
        .body(Empty::new().boxed())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "12");

    // The same listener also speaks HTTP/1.1 (auto codec).
    let mut h1 = H1::connect(addr).await;
    assert_eq!(
        h1.send("POST", "svc", "/grpc", &[], Bytes::from_static(b"x")).await.expect("h1").status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxying_passes_half_close() {
    let echo = tcp_echo_after_eof().await;
    let addr = listen_addr();
    let mut specs = MeshSpecs::default();
    specs.clusters.insert("echo".into(), cluster(UpstreamProtocol::Tcp, &[echo]));
    specs.listeners.insert(
        "tcp".into(),
        ListenerSpec {
            default: Handler::Tcp { cluster: "echo".into() },
            ..http_listener(addr, "unused", HttpCodec::Http1)
        },
    );
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"half-").await.expect("write");
    stream.write_all(b"closed").await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(out, b"echo:half-closed");

    // Counters are recorded when the connection ends.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = metrics_text(&registry);
        if text.contains("istio_tcp_connections_closed_total{") {
            assert!(text.contains("istio_tcp_received_bytes_total{"), "{text}");
            assert!(text.contains("destination_service=\"echo\""), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no TCP close metrics: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Workloads: identification and fairness
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_mark_mismatch_is_refused() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    // 127.0.0.4 belongs to a workload that must arrive with mark 7; loopback connections carry mark 0.
    specs.workloads.insert("marked".into(), workload(&["127.0.0.4"], 7, "marked", WorkloadLimits::default()));
    specs.workloads.insert("plain".into(), workload(&["127.0.0.5"], 0, "plain", WorkloadLimits::default()));
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let mut stream = connect_from(addr, "127.0.0.4").await.expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n").await.ok();
    let mut out = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await.expect("closed in time");
    assert!(read.is_err() || out.is_empty(), "refused connection got a response: {:?}", String::from_utf8_lossy(&out));
    let text = metrics_text(&registry);
    assert!(
        text.contains("dpu_proxy_workload_rejections_total{workload=\"marked\",reason=\"port_mismatch\"} 1"),
        "{text}"
    );

    // The same listener serves a workload without a mark requirement, and anonymous sources.
    let mut client = H1::connect_from(addr, "127.0.0.5").await;
    let r = client.get("web", "/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(H1::connect(addr).await.get("web", "/", &[]).await.status, StatusCode::OK);
    let text = metrics_text(&registry);
    assert!(text.contains("source_workload=\"plain\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_limit_applies_per_workload() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    let limited = WorkloadLimits { requests_per_second: 3, ..WorkloadLimits::default() };
    specs.workloads.insert("noisy".into(), workload(&["127.0.0.6"], 0, "noisy", limited));
    specs.workloads.insert("quiet".into(), workload(&["127.0.0.7"], 0, "quiet", WorkloadLimits::default()));
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let mut noisy = H1::connect_from(addr, "127.0.0.6").await;
    let mut quiet = H1::connect_from(addr, "127.0.0.7").await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(noisy.get("web", "/", &[]).await.status);
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert!((3..=4).contains(&ok), "{statuses:?}");
    assert_eq!(ok + limited, 10, "{statuses:?}");
    let r = noisy.get("web", "/", &[]).await;
    assert_eq!(r.headers.get("x-dpu-proxy-error").map(|v| v.to_str().unwrap_or("")), Some("request_rate"));
    for _ in 0..10 {
        assert_eq!(quiet.get("web", "/", &[]).await.status, StatusCode::OK);
    }
    let text = metrics_text(&registry);
    assert!(text.contains("dpu_proxy_workload_rejections_total{workload=\"noisy\",reason=\"request_rate\"}"), "{text}");
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration changes
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_change_reaches_an_open_keep_alive_connection() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let addr = listen_addr();
    let to = |c: &str| {
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[(c, 1)])))],
        )]
    };
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", http_specs(addr, &[("a", a), ("b", b)], to("a"))).await;
    let mut client = H1::connect(addr).await;
    assert_eq!(client.get("web", "/", &[]).await.backend(), "a");
    apply_ok(&proxy, "intent", http_specs(addr, &[("a", a), ("b", b)], to("b"))).await;
    // Same connection, new route.
    assert_eq!(client.get("web", "/", &[]).await.backend(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_listener_drains_in_flight_requests_and_refuses_new_ones() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs.clone()).await;
    let mut client = H1::connect(addr).await;
    let in_flight = tokio::spawn(async move { client.get("web", "/slow/600", &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;

    let mut without = specs;
    without.listeners.clear();
    apply_ok(&proxy, "intent", without).await;
    assert!(TcpStream::connect(addr).await.is_err(), "removed listener still accepts");
    let dump = proxy.config_dump();
    assert_eq!(dump["listeners"]["intent/http (draining)"]["state"], "draining", "{dump}");

    let r = in_flight.await.expect("task");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.backend(), "a");
    // HTTP/1.1 drain: the response says the connection ends.
    assert_eq!(r.headers.get("connection").map(|v| v.to_str().unwrap_or("")), Some("close"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_keep_alive_connection_answers_its_next_request_then_closes_when_quiet() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs.clone()).await;
    // A client between two requests as draining begins: the request it sends next is answered, and the answer
    // closes the connection.
    let mut busy = H1::connect(addr).await;
    assert_eq!(busy.get("web", "/", &[]).await.status, StatusCode::OK);
    // A keep-alive connection with nothing on it: closed once quiet for the drain's quiet time.
    let mut quiet = TcpStream::connect(addr).await.expect("connect");
    quiet.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = quiet.read(&mut buf).await.expect("first answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));

    let mut without = specs;
    without.listeners.clear();
    apply_ok(&proxy, "intent", without).await;
    let r = busy.get("web", "/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers.get("connection").map(|v| v.to_str().unwrap_or("")), Some("close"));

    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match quiet.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a quiet keep-alive connection stayed open while draining");
    assert!(started.elapsed() < Duration::from_secs(2), "closed only after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_left_out_and_reported() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("occupy a port");
    let taken_addr = taken.local_addr().expect("address");
    let mut specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    // A route table naming a missing cluster, and a listener on it.
    specs.route_tables.insert(
        "dangling".into(),
        RouteTableSpec {
            virtual_hosts: vec![vhost(
                "x",
                &["*"],
                vec![route("r", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("missing", 1)])))],
            )],
        },
    );
    specs.listeners.insert("on-dangling".into(), http_listener(listen_addr(), "dangling", HttpCodec::Http1));
    // A listener whose port is in use, one sharing the first listener's address, and an invalid cluster.
    specs.listeners.insert("busy".into(), http_listener(taken_addr, "web", HttpCodec::Http1));
    specs.listeners.insert("twin".into(), http_listener(addr, "web", HttpCodec::Http1));
    let mut bad = cluster(UpstreamProtocol::Http1, &[a]);
    bad.connect_timeout_ms = 0;
    specs.clusters.insert("bad".into(), bad);
    // Two workloads claiming one address; one naming a missing certificate.
    specs.workloads.insert("w1".into(), workload(&["10.1.0.1"], 0, "w1", WorkloadLimits::default()));
    specs.workloads.insert("w2".into(), workload(&["10.1.0.1"], 0, "w2", WorkloadLimits::default()));
    let mut w3 = workload(&["10.1.0.3"], 0, "w3", WorkloadLimits::default());
    w3.certificate = "nope".into();
    specs.workloads.insert("w3".into(), w3);
    // A cluster whose TLS names a missing certificate; an HTTP route to a TCP cluster; a missing policy.
    let mut tls_cluster = cluster(UpstreamProtocol::Http2, &[a]);
    tls_cluster.tls = Some(dpu_proxy::model::UpstreamTls {
        certificate: "nope".into(),
        server_identities: vec![],
        sni: String::new(),
        kernel_tls: None,
    });
    specs.clusters.insert("needs-cert".into(), tls_cluster);
    specs.clusters.insert("raw".into(), cluster(UpstreamProtocol::Tcp, &[a]));
    specs.route_tables.insert(
        "to-tcp".into(),
        RouteTableSpec {
            virtual_hosts: vec![vhost(
                "x",
                &["*"],
                vec![route("r", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("raw", 1)])))],
            )],
        },
    );
    let mut guarded = http_listener(listen_addr(), "web", HttpCodec::Http1);
    guarded.policies = vec!["missing-policy".into()];
    specs.listeners.insert("guarded".into(), guarded);

    let proxy = Proxy::new(&mut Registry::default());
    // Another source already holds an address: this source's claim on it is refused.
    let mut other = MeshSpecs::default();
    other.workloads.insert("first".into(), workload(&["10.1.0.9"], 0, "first", WorkloadLimits::default()));
    apply_ok(&proxy, "xds", other).await;
    specs.workloads.insert("late".into(), workload(&["10.1.0.9"], 0, "late", WorkloadLimits::default()));
    let report = proxy.apply("intent", specs).await;
    let mut got: Vec<(&str, &str, &str)> =
        report.errors.iter().map(|e| (e.kind, e.id.as_str(), e.field.as_str())).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("meshClusters", "bad", "cluster.connect_timeout_ms"),
            ("meshClusters", "needs-cert", "cluster.tls.certificate"),
            ("meshListeners", "busy", "listener.address"),
            ("meshListeners", "guarded", "listener.policies[0]"),
            ("meshListeners", "on-dangling", "listener.default.route_table"),
            ("meshListeners", "twin", "listener.address"),
            ("meshRouteTables", "dangling", "route_table.virtual_hosts[0].routes[0].action.clusters[0].cluster"),
            ("meshRouteTables", "to-tcp", "route_table.virtual_hosts[0].routes[0].action.clusters[0].cluster"),
            ("meshWorkloads", "late", "workload.addresses[0]"),
            ("meshWorkloads", "w2", "workload.addresses[0]"),
            ("meshWorkloads", "w3", "workload.certificate"),
        ],
        "{:?}",
        report.errors
    );
    // The good part applied.
    assert_eq!(H1::connect(addr).await.get("web", "/", &[]).await.status, StatusCode::OK);
    let dump = proxy.config_dump();
    assert_eq!(dump["sources"]["intent"]["listeners"]["busy"]["state"], "error");
    assert_eq!(dump["sources"]["intent"]["clusters"]["a"]["active"], true);
    assert!(dump["sources"]["intent"]["clusters"]["a"]["stats"]["endpoints"].is_array(), "{dump}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_destinations_pick_handlers_and_reject() {
    let echo = tcp_echo_after_eof().await;
    let addr = listen_addr();
    let mut specs = MeshSpecs::default();
    specs.clusters.insert("echo".into(), cluster(UpstreamProtocol::Tcp, &[echo]));
    specs.listeners.insert(
        "tcp".into(),
        ListenerSpec {
            destinations: vec![Destination {
                prefix: Some("127.0.0.0/8".parse().expect("prefix")),
                port: addr.port(),
                handler: Handler::Reject,
            }],
            default: Handler::Tcp { cluster: "echo".into() },
            ..http_listener(addr, "unused", HttpCodec::Http1)
        },
    );
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"x").await.ok();
    let _ = stream.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await.expect("closed in time");
    assert!(out.is_empty(), "rejected destination got data: {out:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Transparent capture (TPROXY), in network namespaces
// ---------------------------------------------------------------------------------------------------------------

/// Runs a command, failing the test with its output when it fails.
fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("spawn command");
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Best-effort removal of everything the capture test creates, on success or failure.
struct CaptureNet {
    client_ns: String,
    server_ns: String,
    table: String,
    server: Option<std::process::Child>,
}

const CAPTURE_MARK: &str = "0x2a1";
const CAPTURE_ROUTE_TABLE: &str = "673";

impl Drop for CaptureNet {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let run = |args: &[&str]| {
            let _ = std::process::Command::new(args[0]).args(&args[1..]).output();
        };
        run(&["nft", "delete", "table", "ip", &self.table]);
        run(&["ip", "rule", "del", "fwmark", CAPTURE_MARK, "lookup", CAPTURE_ROUTE_TABLE]);
        run(&["ip", "route", "flush", "table", CAPTURE_ROUTE_TABLE]);
        // Deleting a namespace deletes the veth ends inside it, and with them their peers.
        run(&["ip", "netns", "del", &self.client_ns]);
        run(&["ip", "netns", "del", &self.server_ns]);
    }
}

/// Client (10.77.1.2, a workload; 10.77.1.3, unknown) and server (10.77.2.2:8080) live in their own network
/// namespaces, linked by veth pairs to the test's namespace where the proxy runs. An nftables `tproxy` rule steers
/// the client's TCP to port 8080 into the proxy's transparent listener (packets marked with the proxy's upstream
/// mark are skipped); the listener passes the connection through to the original destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_capture_passes_through_to_the_original_destination() {
    if std::process::Command::new("id").arg("-u").output().map(|o| o.stdout != b"0\n").unwrap_or(true) {
        eprintln!("*** skipped: needs root (transparent capture) ***");
        return;
    }
    // qemu-user (the aarch64 test run) does not translate IP_TRANSPARENT; the native run covers capture.
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if let Err(e) = probe.set_ip_transparent_v4(true) {
        eprintln!("*** skipped: IP_TRANSPARENT is not available on this platform ({e}) ***");
        return;
    }
    let tag = std::process::id() % 100_000;
    let (cns, sns) = (format!("dpxc{tag}"), format!("dpxs{tag}"));
    let (c_host, c_ns) = (format!("dpxc{tag}h"), format!("dpxc{tag}n"));
    let (s_host, s_ns) = (format!("dpxs{tag}h"), format!("dpxs{tag}n"));
    let mut net =
        CaptureNet { client_ns: cns.clone(), server_ns: sns.clone(), table: format!("dpx{tag}"), server: None };
    for ns in [&cns, &sns] {
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    for (ns, host, inner, host_ip, inner_ips) in [
        (&cns, &c_host, &c_ns, "10.77.1.1/24", &["10.77.1.2/24", "10.77.1.3/24"][..]),
        (&sns, &s_host, &s_ns, "10.77.2.1/24", &["10.77.2.2/24"][..]),
    ] {
        sh(&["ip", "link", "add", host, "type", "veth", "peer", "name", inner]);
        sh(&["ip", "link", "set", inner, "netns", ns]);
        sh(&["ip", "addr", "add", host_ip, "dev", host]);
        sh(&["ip", "link", "set", host, "up"]);
        for ip in inner_ips {
            sh(&["ip", "-n", ns, "addr", "add", ip, "dev", inner]);
        }
        sh(&["ip", "-n", ns, "link", "set", inner, "up"]);
        let gw = host_ip.trim_end_matches("/24");
        sh(&["ip", "-n", ns, "route", "add", "default", "via", gw]);
    }

    let port = free_port();
    let rules = format!(
        "table ip {table} {{\n  chain capture {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
         meta mark {upstream:#x} return\n    iifname \"{c_host}\" tcp dport 8080 tproxy to :{port} meta mark set \
         {CAPTURE_MARK} accept\n  }}\n}}\n",
        table = net.table,
        upstream = dpu_proxy::UPSTREAM_MARK,
    );
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nft");
    std::io::Write::write_all(nft.stdin.as_mut().expect("nft stdin"), rules.as_bytes()).expect("write rules");
    drop(nft.stdin.take());
    assert!(nft.wait().expect("nft").success(), "nft rejected:\n{rules}");
    sh(&["ip", "rule", "add", "fwmark", CAPTURE_MARK, "lookup", CAPTURE_ROUTE_TABLE]);
    sh(&["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", CAPTURE_ROUTE_TABLE]);

    let server = "import socket\n\
        s = socket.socket()\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('0.0.0.0', 8080))\n\
        s.listen()\n\
        while True:\n    \
            c, a = s.accept()\n    \
            d = c.recv(100)\n    \
            l = c.getsockname()\n    \
            c.sendall(f'dst={l[0]}:{l[1]} src={a[0]} got={d.decode()}'.encode())\n    \
            c.close()\n";
    net.server = Some(
        std::process::Command::new("ip")
            .args(["netns", "exec", &sns, "python3", "-c", server])
            .spawn()
            .expect("spawn server"),
    );

    let mut specs = MeshSpecs::default();
    specs.workloads.insert("client".into(), workload(&["10.77.1.2"], 0, "client", WorkloadLimits::default()));
    specs.listeners.insert(
        "capture".into(),
        ListenerSpec {
            transparent: true,
            default: Handler::Passthrough,
            ..http_listener(SocketAddr::from(([0, 0, 0, 0], port)), "unused", HttpCodec::Http1)
        },
    );
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let client = |source: &'static str| {
        let script = format!(
            "import socket\n\
             s = socket.socket()\n\
             s.settimeout(3)\n\
             s.bind(('{source}', 0))\n\
             try:\n    \
                 s.connect(('10.77.2.2', 8080))\n    \
                 s.sendall(b'hello')\n    \
                 print(s.recv(200).decode())\n\
             except Exception as e:\n    \
                 print('error', e)\n"
        );
        let cns = cns.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("ip").args(["netns", "exec", &cns, "python3", "-c", &script]).output()
            })
            .await
            .expect("client task")
            .expect("run client");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    // The server may still be starting.
    let mut answer = String::new();
    for _ in 0..30 {
        answer = client("10.77.1.2").await;
        if answer.starts_with("dst=") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The server saw the destination the client dialled, from the proxy's own address.
    assert_eq!(answer, "dst=10.77.2.2:8080 src=10.77.2.1 got=hello");
    let text = metrics_text(&registry);
    assert!(text.contains("reporter=\"source\""), "{text}");
    assert!(text.contains("source_workload=\"client\""), "{text}");
    assert!(text.contains("destination_service=\"10.77.2.2:8080\""), "{text}");

    // A source that is no workload is refused on a transparent listener.
    let refused = client("10.77.1.3").await;
    assert!(!refused.starts_with("dst="), "unknown source was proxied: {refused}");
    let text = metrics_text(&registry);
    assert!(text.contains("reason=\"unknown_source\""), "{text}");
    proxy.shutdown(Duration::from_secs(1)).await;
    drop(net);
}

// ---------------------------------------------------------------------------------------------------------------
// TLS termination and authorization
// ---------------------------------------------------------------------------------------------------------------

struct TestCa {
    cert: String,
    key: String,
}

impl TestCa {
    fn new() -> TestCa {
        let (cert, key) = dpu_proxy::tls::new_dev_ca("cluster.local").expect("CA");
        TestCa { cert, key }
    }

    fn spec(&self, sa: &str) -> dpu_proxy::model::CertificateSpec {
        let id = SpiffeId::new("cluster.local", "shop", sa).expect("identity");
        let (chain, key) = dpu_proxy::tls::issue_dev_identity(&self.cert, &self.key, &id, 1).expect("issue");
        dpu_proxy::model::CertificateSpec {
            certificate_chain_pem: chain,
            private_key_pem: key,
            trust_bundle_pem: self.cert.clone(),
        }
    }
}

/// An HTTP/2 client over mTLS presenting `client` (a certificate id in `store`).
async fn h2_over_mtls(
    addr: SocketAddr,
    store: &dpu_proxy::tls::TlsStore,
    client: &str,
) -> std::io::Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let config = store.client_config(client, &[], &[b"h2"], false).expect("client config");
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("gateway.mesh.invalid").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_listener_authorizes_by_peer_spiffe_id() {
    let a = http_backend("a").await;
    let echo = tcp_echo_after_eof().await;
    let ca = TestCa::new();
    let http_addr = listen_addr();
    let tcp_addr = listen_addr();
    let mut specs = http_specs(
        http_addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    specs.clusters.insert("echo".into(), cluster(UpstreamProtocol::Tcp, &[echo]));
    specs.certificates.insert("gateway".into(), ca.spec("gateway"));
    specs.policies.insert(
        "only-web".into(),
        dpu_proxy::model::PolicySpec {
            action: dpu_proxy::model::PolicyAction::Allow,
            rules: vec![dpu_proxy::model::PolicyRule {
                principals: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
                ..Default::default()
            }],
        },
    );
    let tls = Some(dpu_proxy::model::DownstreamTls {
        certificate: "gateway".into(),
        require_client_certificate: true,
        kernel_tls: None,
    });
    {
        let l = specs.listeners.get_mut("http").expect("listener");
        l.default = Handler::Http { route_table: "web".into(), codec: HttpCodec::Auto };
        l.tls = tls.clone();
        l.policies = vec!["only-web".into()];
    }
    specs.listeners.insert(
        "tcp".into(),
        ListenerSpec {
            default: Handler::Tcp { cluster: "echo".into() },
            tls,
            policies: vec!["only-web".into()],
            ..http_listener(tcp_addr, "unused", HttpCodec::Http1)
        },
    );
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let clients = dpu_proxy::tls::TlsStore::default();
    let errors =
        clients.apply(&BTreeMap::from([("web".to_string(), ca.spec("web")), ("api".to_string(), ca.spec("api"))]));
    assert!(errors.is_empty(), "{errors:?}");

    // web is allowed, over HTTP/2 negotiated by ALPN.
    let mut web = h2_over_mtls(http_addr, &clients, "web").await.expect("web connects");
    let req = Request::builder().uri("https://svc.example/hello").body(Full::new(Bytes::new())).expect("request");
    let resp = web.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echo: Value = serde_json::from_slice(&body).expect("echo");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    assert_eq!(echo["headers"]["host"], "svc.example");

    // api is authenticated but not allowed.
    let mut api = h2_over_mtls(http_addr, &clients, "api").await.expect("api connects");
    let req = Request::builder().uri("https://svc.example/hello").body(Full::new(Bytes::new())).expect("request");
    let resp = api.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-dpu-proxy-error"], "rbac_access_denied");

    // Without a client certificate the handshake fails.
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    let tcp = TcpStream::connect(http_addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("gateway.mesh.invalid").expect("server name");
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(anonymous)).connect(name, tcp).await?;
        // TLS 1.3: the server's verdict on the client certificate arrives after the client's handshake.
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(3), attempt).await.expect("refused in time");
    assert!(matches!(outcome, Err(_) | Ok(0)), "anonymous client was served: {outcome:?}");

    // L4: the TCP listener admits web and closes api's connection before any byte is proxied.
    for (client, allowed) in [("web", true), ("api", false)] {
        let config = clients.client_config(client, &[], &[], false).expect("client config");
        let tcp = TcpStream::connect(tcp_addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("gateway.mesh.invalid").expect("server name");
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("handshake");
        let _ = tls.write_all(b"ping").await;
        let _ = tls.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut out)).await.expect("in time");
        assert_eq!(out == b"echo:ping", allowed, "{client}: {:?}", String::from_utf8_lossy(&out));
    }

    let text = metrics_text(&registry);
    assert!(text.contains("connection_security_policy=\"mutual_tls\""), "{text}");
    assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/web\""), "{text}");

    // The dump names identities, never keys.
    let dump = proxy.config_dump();
    let cert = &dump["sources"]["intent"]["certificates"]["gateway"];
    assert_eq!(cert["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/gateway");
    assert!(cert["certificate_chain_pem_bytes"].as_u64().unwrap_or(0) > 0, "{cert}");
    let text = dump.to_string();
    assert!(!text.contains("PRIVATE KEY") && !text.contains("private_key"), "{text}");
}

/// Test-only verifier for the anonymous client, which must fail on the server's side, not its own.
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let a = http_backend("a").await;
    let echo = tcp_echo_after_eof().await;
    let http_addr = listen_addr();
    let tcp_addr = listen_addr();
    let mut specs = http_specs(
        http_addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    specs.listeners.get_mut("http").expect("listener").timeouts.idle_ms = 300;
    specs.clusters.insert("echo".into(), cluster(UpstreamProtocol::Tcp, &[echo]));
    let mut tcp = ListenerSpec {
        default: Handler::Tcp { cluster: "echo".into() },
        ..http_listener(tcp_addr, "-", HttpCodec::Http1)
    };
    tcp.timeouts.idle_ms = 300;
    specs.listeners.insert("tcp".into(), tcp);
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs).await;

    // HTTP: a kept-alive connection with nothing in flight is closed after the idle time; a slow request in
    // flight is not cut by it.
    let mut stream = TcpStream::connect(http_addr).await.expect("connect");
    stream.write_all(b"GET /slow/500 HTTP/1.1\r\nhost: web\r\n\r\n").await.expect("write");
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await.expect("closed in time").ok();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(700), "closed after {:?}", started.elapsed());

    // TCP: no bytes either way for the idle time closes both sides.
    let mut stream = TcpStream::connect(tcp_addr).await.expect("connect");
    stream.write_all(b"x").await.expect("write");
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await.expect("closed in time").ok();
    assert!(started.elapsed() >= Duration::from_millis(250), "closed after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_listener_binds_the_new_address_and_drains_the_old() {
    let a = http_backend("a").await;
    let old = listen_addr();
    let new = listen_addr();
    let vhosts = || {
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )]
    };
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", http_specs(old, &[("a", a)], vhosts())).await;
    let mut client = H1::connect(old).await;
    let in_flight = tokio::spawn(async move { client.get("web", "/slow/500", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    apply_ok(&proxy, "intent", http_specs(new, &[("a", a)], vhosts())).await;
    assert_eq!(H1::connect(new).await.get("web", "/", &[]).await.status, StatusCode::OK);
    assert!(TcpStream::connect(old).await.is_err(), "old address still accepts");
    assert_eq!(in_flight.await.expect("task").status, StatusCode::OK);
    let dump = proxy.config_dump();
    assert_eq!(dump["listeners"]["intent/http"]["address"], new.to_string(), "{dump}");
    proxy.shutdown(Duration::from_secs(1)).await;
    assert!(TcpStream::connect(new).await.is_err(), "shut-down proxy still accepts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_tcp_listener_closes_connections_after_the_drain_time() {
    let echo = tcp_echo_after_eof().await;
    let addr = listen_addr();
    let mut specs = MeshSpecs::default();
    specs.clusters.insert("echo".into(), cluster(UpstreamProtocol::Tcp, &[echo]));
    let mut tcp =
        ListenerSpec { default: Handler::Tcp { cluster: "echo".into() }, ..http_listener(addr, "-", HttpCodec::Http1) };
    tcp.timeouts.drain_ms = 300;
    specs.listeners.insert("tcp".into(), tcp);
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs.clone()).await;

    // The echo waits for EOF, so this connection stays open until the proxy closes it.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"open").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    specs.listeners.clear();
    let started = Instant::now();
    apply_ok(&proxy, "intent", specs).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await.expect("closed in time").ok();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "closed before the drain time: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_h2_listener_sends_goaway_after_in_flight_streams() {
    let a = http_backend("a").await;
    let addr = listen_addr();
    let mut specs = http_specs(
        addr,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    specs.listeners.get_mut("http").expect("listener").default =
        Handler::Http { route_table: "web".into(), codec: HttpCodec::Http2 };
    let proxy = Proxy::new(&mut Registry::default());
    apply_ok(&proxy, "intent", specs.clone()).await;

    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let req = |path: &str| {
        Request::builder().uri(format!("http://web{path}")).body(Full::new(Bytes::new())).expect("request")
    };
    let in_flight = sender.send_request(req("/slow/500"));
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(150)).await;
    specs.listeners.clear();
    apply_ok(&proxy, "intent", specs).await;

    let resp = in_flight.await.expect("task").expect("in-flight stream completes");
    assert_eq!(resp.status(), StatusCode::OK);
    // After GOAWAY the connection ends once its last stream is done.
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(ended.is_ok(), "HTTP/2 connection still open after drain");
    assert!(sender.send_request(req("/")).await.is_err(), "new stream accepted after GOAWAY");
}

// ---------------------------------------------------------------------------------------------------------------
// A real peer: curl
// ---------------------------------------------------------------------------------------------------------------

/// Runs curl with `args`; `None` when curl is not installed.
async fn curl(args: Vec<String>) -> Option<String> {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl").args(["-sS", "--max-time", "5"]).args(&args).output().ok()?;
        assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("curl task")
}

/// The mesh identity `curl` of `ca` as PEM files in `dir`: (certificate chain, key).
fn client_cert_files(ca: &TestCa, dir: &std::path::Path) -> (String, String) {
    let client = ca.spec("curl");
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path.to_string_lossy().into_owned()
    };
    (write("cert.pem", &client.certificate_chain_pem), write("key.pem", &client.private_key_pem))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http1_h2c_and_mtls_to_the_proxy() {
    if std::process::Command::new("curl").arg("--version").output().is_err() {
        eprintln!("*** skipped: curl is not installed ***");
        return;
    }
    let a = http_backend("a").await;
    let ca = TestCa::new();
    let plain = listen_addr();
    let secure = listen_addr();
    let mut specs = http_specs(
        plain,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    specs.listeners.get_mut("http").expect("listener").default =
        Handler::Http { route_table: "web".into(), codec: HttpCodec::Auto };
    specs.certificates.insert("gateway".into(), ca.spec("gateway"));
    let mut tls_listener = http_listener(secure, "web", HttpCodec::Auto);
    tls_listener.tls = Some(dpu_proxy::model::DownstreamTls {
        certificate: "gateway".into(),
        require_client_certificate: true,
        kernel_tls: None,
    });
    specs.listeners.insert("https".into(), tls_listener);
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    // HTTP/1.1: two requests on one connection, then a chunked upload.
    let out = curl(vec![
        "-w".into(),
        "|%{http_version}|%{num_connects}\n".into(),
        format!("http://{plain}/one"),
        format!("http://{plain}/two"),
    ])
    .await
    .expect("curl");
    assert!(out.contains(r#""path":"/one""#) && out.contains(r#""path":"/two""#), "{out}");
    assert!(out.contains("|1.1|1") && out.contains("|1.1|0"), "connection not reused: {out}");
    let out = curl(vec![
        "-H".into(),
        "transfer-encoding: chunked".into(),
        "--data-binary".into(),
        "chunked upload".into(),
        format!("http://{plain}/upload"),
    ])
    .await
    .expect("curl");
    assert!(out.contains(r#""body":"chunked upload""#), "{out}");

    // h2c with prior knowledge on the auto-codec listener.
    let out = curl(vec![
        "--http2-prior-knowledge".into(),
        "-w".into(),
        "|%{http_version}".into(),
        format!("http://{plain}/h2"),
    ])
    .await
    .expect("curl");
    assert!(out.ends_with("|2") && out.contains(r#""path":"/h2""#), "{out}");

    // mTLS with a client certificate; ALPN picks HTTP/2.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = client_cert_files(&ca, dir.path());
    let out = curl(vec![
        "--insecure".into(),
        "--cert".into(),
        cert,
        "--key".into(),
        key,
        "-w".into(),
        "|%{http_version}".into(),
        format!("https://{secure}/secure"),
    ])
    .await
    .expect("curl");
    assert!(out.ends_with("|2") && out.contains(r#""x-forwarded-proto":"https""#), "{out}");
    let text = metrics_text(&registry);
    assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/curl\""), "{text}");
}

/// kernel_tls on a listener: every connection is placed and counted with its reason. On a kernel with TLS the
/// records move to the kernel (software here: loopback offloads nothing); without it they stay in userspace and
/// say so. `require-hardware` refuses the connection either way, since loopback never offloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_tls_places_every_connection_and_says_why() {
    use dpu_proxy::ktls::{TlsLabels, connections, kernel_support};
    use dpu_proxy::model::Policy;
    if std::process::Command::new("curl").arg("--version").output().is_err() {
        eprintln!("*** skipped: curl is not installed ***");
        return;
    }
    let a = http_backend("a").await;
    let ca = TestCa::new();
    let plain = listen_addr();
    let (prefer, require) = (listen_addr(), listen_addr());
    let mut specs = http_specs(
        plain,
        &[("a", a)],
        vec![vhost(
            "web",
            &["*"],
            vec![route("all", PathMatch::Prefix("/".into()), RouteAction::Forward(forward_to(&[("a", 1)])))],
        )],
    );
    specs.certificates.insert("gateway".into(), ca.spec("gateway"));
    for (id, address, policy) in
        [("ktls-prefer", prefer, Policy::PreferHardware), ("ktls-require", require, Policy::RequireHardware)]
    {
        let mut listener = http_listener(address, "web", HttpCodec::Http1);
        listener.tls = Some(dpu_proxy::model::DownstreamTls {
            certificate: "gateway".into(),
            require_client_certificate: true,
            kernel_tls: Some(policy),
        });
        specs.listeners.insert(id.into(), listener);
    }
    let mut registry = Registry::default();
    let proxy = Proxy::new(&mut registry);
    apply_ok(&proxy, "intent", specs).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = client_cert_files(&ca, dir.path());
    let request = |address: SocketAddr, path: &str| {
        vec![
            "--insecure".into(),
            "--http1.1".into(),
            "--cert".into(),
            cert.clone(),
            "--key".into(),
            key.clone(),
            format!("https://{address}{path}"),
            format!("https://{address}{path}-again"),
        ]
    };
    let count = |name: &str, engine: &'static str, reason: &'static str| {
        connections().get_or_create(&TlsLabels { side: "downstream", name: name.into(), engine, reason }).get()
    };

    // Two requests on one keep-alive connection: the second is read by whichever layer holds the records.
    let out = curl(request(prefer, "/prefer")).await.expect("curl through the prefer-hardware listener");
    assert!(out.contains(r#""path":"/prefer""#) && out.contains(r#""path":"/prefer-again""#), "{out}");
    let (engine, reason) = match &kernel_support().ulp {
        Ok(()) => ("ktls-sw", "no_offload"),
        Err(_) => ("rustls", "no_kernel_tls"),
    };
    assert_eq!(count("ktls-prefer", engine, reason), 1, "{}", metrics_text(&registry));

    let args = request(require, "/require");
    let refused = tokio::task::spawn_blocking(move || std::process::Command::new("curl").args(&args).output())
        .await
        .expect("curl task")
        .expect("run curl");
    let out = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success() && !out.contains("/require"), "require-hardware served a request: {out}");
    // curl opens a new connection for the second URL after the first was closed.
    assert!(count("ktls-require", "none", "hardware_required") >= 1, "{}", metrics_text(&registry));
    let text = metrics_text(&registry);
    assert!(text.contains("dpu_proxy_tls_connections_total{"), "{text}");

    // What the listeners' status says of the setting on this kernel.
    let status = dpu_proxy::ktls::status_text(Policy::PreferHardware);
    match &kernel_support().ulp {
        Ok(()) => assert!(status.contains("aes-gcm") && status.contains("dpu_proxy_tls_connections_total"), "{status}"),
        Err(_) => assert!(status.contains("unavailable, connections stay in userspace TLS"), "{status}"),
    }
    if kernel_support().ulp.is_err() {
        let status = dpu_proxy::ktls::status_text(Policy::RequireHardware);
        assert!(status.contains("connections are refused"), "{status}");
    }
}
