//! Upstream clusters against real sockets: pooling, multiplexing, circuit breaking, outlier ejection, active health
//! checks and TLS, with in-process hyper backends that count their connections.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dpu_proxy::Body;
use dpu_proxy::cluster::{Cluster, ClusterStats, LbContext, UpstreamError};
use dpu_proxy::model::{
    CircuitBreaker, ClusterSpec, Endpoint, EndpointHealth, HealthCheck, HealthCheckKind, LbPolicy, OutlierDetection,
    UpstreamProtocol, UpstreamTls,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------------------------

/// What a backend saw.
#[derive(Default)]
struct State {
    /// Connections accepted.
    connections: AtomicUsize,
    /// Connections still open.
    open: AtomicUsize,
    /// Answer for `/healthz`.
    unhealthy: AtomicBool,
    /// Host header (HTTP/1.1) or `:authority` (HTTP/2) of every request.
    hosts: Mutex<Vec<String>>,
    /// Requests that carried a Host header.
    host_headers: AtomicUsize,
    /// Close HTTP/1.1 connections after each response.
    no_keep_alive: AtomicBool,
    /// Connection tasks, aborted (closing their sockets) when the backend stops.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct Backend {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Backend {
    async fn start(h2: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(listener, h2, Arc::default())
    }

    fn serve(listener: TcpListener, h2: bool, state: Arc<State>) -> Backend {
        let addr = listener.local_addr().unwrap();
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let task = tokio::spawn(serve_io(stream, h2, Arc::clone(&st), "none"));
                st.tasks.lock().unwrap().push(task.abort_handle());
            }
        });
        Backend { addr, state, task }
    }

    fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

async fn serve_io<I>(io: I, h2: bool, state: Arc<State>, alpn: &'static str)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    state.connections.fetch_add(1, Ordering::SeqCst);
    state.open.fetch_add(1, Ordering::SeqCst);
    let st = Arc::clone(&state);
    let service = service_fn(move |req| handle(req, Arc::clone(&st), alpn));
    let io = TokioIo::new(io);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
    } else {
        let keep_alive = !state.no_keep_alive.load(Ordering::SeqCst);
        let _ = hyper::server::conn::http1::Builder::new().keep_alive(keep_alive).serve_connection(io, service).await;
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
}

async fn handle(req: Request<Incoming>, state: Arc<State>, alpn: &str) -> Result<Response<Full<Bytes>>, Infallible> {
    let host = match req.headers().get(http::header::HOST) {
        Some(h) => {
            state.host_headers.fetch_add(1, Ordering::SeqCst);
            h.to_str().unwrap_or("?").to_owned()
        }
        None => req.uri().authority().map(|a| a.to_string()).unwrap_or_default(),
    };
    state.hosts.lock().unwrap().push(host.clone());
    let response = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        Ok(r)
    };
    match req.uri().path() {
        "/big" => response(StatusCode::OK, Bytes::from(vec![b'x'; 4 << 20])),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            response(StatusCode::OK, Bytes::from_static(b"slow"))
        }
        "/healthz" if state.unhealthy.load(Ordering::SeqCst) => {
            response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"down"))
        }
        "/status/503" => response(StatusCode::SERVICE_UNAVAILABLE, Bytes::new()),
        path => response(StatusCode::OK, Bytes::from(format!("{path} {host} {alpn} {:?}", req.version()))),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

fn spec(protocol: UpstreamProtocol, endpoints: &[SocketAddr]) -> ClusterSpec {
    ClusterSpec {
        protocol,
        endpoints: endpoints
            .iter()
            .map(|&address| Endpoint { address, weight: 1, locality: "r/z/s".into(), health: EndpointHealth::Healthy })
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

fn ctx() -> LbContext<'static> {
    LbContext { source: IpAddr::V4(Ipv4Addr::LOCALHOST), headers: None }
}

fn get(path: &str, host: &str) -> Request<Body> {
    Request::get(format!("http://{host}{path}"))
        .header("host", host)
        .body(http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync())
        .unwrap()
}

async fn text(response: Response<Body>) -> String {
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Binds `addr` again once a stopped backend's aborted tasks have released it.
async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("{addr} stayed in use");
}

/// Polls `cond` on the cluster's stats every 20 ms for up to 5 s.
async fn eventually(cluster: &Cluster, what: &str, cond: impl Fn(&ClusterStats) -> bool) {
    for _ in 0..250 {
        if cond(&cluster.stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}: {:#?}", cluster.stats());
}

// ---------------------------------------------------------------------------------------------------------------
// Pools
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn http1_keep_alive_reuses_one_connection() {
    let backend = Backend::start(false).await;
    let cluster = Cluster::new("web", &spec(UpstreamProtocol::Http1, &[backend.addr]), None);
    for _ in 0..100 {
        let response = cluster.send(get("/hello?x=1", "web.example"), &ctx()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "/hello web.example none HTTP/1.1");
    }
    assert_eq!(backend.connections(), 1);
    let stats = cluster.stats();
    assert_eq!((stats.endpoints[0].requests, stats.endpoints[0].connections), (100, 1));
    assert_eq!((stats.active_requests, stats.endpoints[0].active_requests), (0, 0));
    assert_eq!(stats.active_connections, 1);
}

#[tokio::test]
async fn http2_multiplexes_concurrent_requests_on_one_connection() {
    let backend = Backend::start(true).await;
    let cluster = Cluster::new("grpc", &spec(UpstreamProtocol::Http2, &[backend.addr]), None);
    let requests = (0..50).map(|_| {
        let cluster = Arc::clone(&cluster);
        async move { text(cluster.send(get("/slow", "api.example:8443"), &ctx()).await.unwrap()).await }
    });
    let bodies = futures_util::future::join_all(requests).await;
    assert!(bodies.iter().all(|b| b == "slow"), "{bodies:?}");
    assert_eq!(backend.connections(), 1);
    // `:authority` is the original host, not the endpoint address; no Host header went out.
    let hosts = backend.state.hosts.lock().unwrap().clone();
    assert_eq!(hosts.len(), 50);
    assert!(hosts.iter().all(|h| h == "api.example:8443"), "{hosts:?}");
    assert_eq!(backend.state.host_headers.load(Ordering::SeqCst), 0);
    let body = text(cluster.send(get("/x", "api.example"), &ctx()).await.unwrap()).await;
    assert_eq!(body, "/x api.example none HTTP/2.0");
    assert_eq!(cluster.stats().active_requests, 0);
}

#[tokio::test]
async fn connections_the_server_closes_are_not_reused() {
    let backend = Backend::start(false).await;
    backend.state.no_keep_alive.store(true, Ordering::SeqCst);
    let cluster = Cluster::new("web", &spec(UpstreamProtocol::Http1, &[backend.addr]), None);
    for i in 0..20 {
        let response = cluster.send(get(&format!("/{i}"), "web.example"), &ctx()).await.unwrap();
        assert_eq!(text(response).await, format!("/{i} web.example none HTTP/1.1"));
    }
    assert_eq!(backend.connections(), 20);
    assert_eq!(cluster.stats().endpoints[0].failures, 0);
}

#[tokio::test]
async fn http2_reconnects_after_the_connection_closes() {
    let backend = Backend::start(true).await;
    let addr = backend.addr;
    let cluster = Cluster::new("grpc", &spec(UpstreamProtocol::Http2, &[addr]), None);
    text(cluster.send(get("/", "api.example"), &ctx()).await.unwrap()).await;
    drop(backend);
    let revived = Backend::serve(rebind(addr).await, true, Arc::default());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let body = text(cluster.send(get("/again", "api.example"), &ctx()).await.unwrap()).await;
    assert_eq!(body, "/again api.example none HTTP/2.0");
    assert_eq!(revived.connections(), 1);
    assert_eq!(cluster.stats().endpoints[0].connections, 2);
}

#[tokio::test]
async fn a_body_dropped_half_read_takes_its_connection_along() {
    let backend = Backend::start(false).await;
    let cluster = Cluster::new("web", &spec(UpstreamProtocol::Http1, &[backend.addr]), None);
    let response = cluster.send(get("/big", "web.example"), &ctx()).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    assert_eq!(cluster.stats().active_requests, 1, "the request is active until its body ends");
    drop(body);
    assert_eq!(cluster.stats().active_requests, 0);
    assert_eq!(cluster.stats().endpoints[0].active_requests, 0);

    let response = cluster.send(get("/after", "web.example"), &ctx()).await.unwrap();
    assert_eq!(text(response).await, "/after web.example none HTTP/1.1");
    assert_eq!(backend.connections(), 2, "the half-read connection was not reused");
    // A fully read body does return its connection.
    let response = cluster.send(get("/big", "web.example"), &ctx()).await.unwrap();
    assert_eq!(text(response).await.len(), 4 << 20);
    cluster.send(get("/again", "web.example"), &ctx()).await.unwrap();
    assert_eq!(backend.connections(), 2);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let backend = Backend::start(false).await;
    let mut s = spec(UpstreamProtocol::Http1, &[backend.addr]);
    s.idle_timeout_ms = 200;
    let cluster = Cluster::new("web", &s, None);
    text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    assert_eq!(backend.state.open.load(Ordering::SeqCst), 1);
    for _ in 0..100 {
        if backend.state.open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.state.open.load(Ordering::SeqCst), 0, "the idle connection was closed");
    assert_eq!(cluster.stats().active_connections, 0);
    text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    assert_eq!(backend.connections(), 2);
}

// ---------------------------------------------------------------------------------------------------------------
// Circuit breaking, outlier detection, failover
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn max_requests_overflows_immediately() {
    let backend = Backend::start(false).await;
    let mut s = spec(UpstreamProtocol::Http1, &[backend.addr]);
    s.circuit_breaker.max_requests = 2;
    let cluster = Cluster::new("web", &s, None);
    // Responses whose bodies are not read yet keep their requests active.
    let a = cluster.send(get("/a", "web.example"), &ctx()).await.unwrap();
    let b = cluster.send(get("/b", "web.example"), &ctx()).await.unwrap();
    let err = cluster.send(get("/c", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Overflow { limit: "max_requests" }), "{err:?}");
    assert_eq!(err.response_flag(), "UO");
    assert!(!err.is_connect_failure());
    assert_eq!(cluster.stats().overflows, 1);
    assert_eq!(text(a).await, "/a web.example none HTTP/1.1");
    drop(b);
    let c = cluster.send(get("/c", "web.example"), &ctx()).await.unwrap();
    assert_eq!(text(c).await, "/c web.example none HTTP/1.1");
}

#[tokio::test]
async fn max_connections_limits_pooled_and_l4_connections() {
    let backend = Backend::start(false).await;
    let mut s = spec(UpstreamProtocol::Http1, &[backend.addr]);
    s.circuit_breaker.max_connections = 1;
    let cluster = Cluster::new("web", &s, None);
    let held = cluster.send(get("/a", "web.example"), &ctx()).await.unwrap();
    // The only connection is busy: a second one would exceed the limit.
    let err = cluster.send(get("/b", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Overflow { limit: "max_connections" }), "{err:?}");
    let err = cluster.connect(&ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Overflow { limit: "max_connections" }), "{err:?}");
    text(held).await;
    // Back in the pool: reused without a new connection.
    text(cluster.send(get("/c", "web.example"), &ctx()).await.unwrap()).await;
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn connect_failures_eject_the_endpoint() {
    let dead = closed_port().await;
    let backend = Backend::start(false).await;
    let mut s = spec(UpstreamProtocol::Http1, &[dead, backend.addr]);
    s.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: 0,
        consecutive_gateway_errors: 2,
        base_ejection_ms: 60_000,
        max_ejection_percent: 50,
    });
    let cluster = Cluster::new("web", &s, None);
    let mut failures = 0;
    for _ in 0..4 {
        match cluster.send(get("/", "web.example"), &ctx()).await {
            Ok(response) => assert_eq!(response.status(), StatusCode::OK),
            Err(e) => {
                assert!(matches!(e, UpstreamError::ConnectFailure { endpoint, .. } if endpoint == dead), "{e:?}");
                assert_eq!(e.response_flag(), "UF");
                assert!(e.is_connect_failure());
                assert_eq!(e.endpoint(), Some(dead));
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 2, "round robin alternates until the dead endpoint is ejected");
    let stats = cluster.stats();
    assert!(stats.endpoints[0].ejected && !stats.endpoints[1].ejected, "{stats:#?}");
    assert_eq!((stats.endpoints[0].ejections, stats.endpoints[0].failures), (1, 2));
    for _ in 0..10 {
        text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    }
}

#[tokio::test]
async fn max_ejection_percent_keeps_the_last_endpoints() {
    let dead = [closed_port().await, closed_port().await];
    let mut s = spec(UpstreamProtocol::Http1, &dead);
    s.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: 1,
        consecutive_gateway_errors: 0,
        base_ejection_ms: 60_000,
        max_ejection_percent: 50,
    });
    let cluster = Cluster::new("web", &s, None);
    for _ in 0..6 {
        let err = cluster.send(get("/", "web.example"), &ctx()).await.unwrap_err();
        assert_eq!(err.response_flag(), "UF");
    }
    let ejected = cluster.stats().endpoints.iter().filter(|e| e.ejected).count();
    assert_eq!(ejected, 1);
}

#[tokio::test]
async fn five_xx_responses_eject_and_successes_reset() {
    let flaky = Backend::start(false).await;
    let mut s = spec(UpstreamProtocol::Http1, &[flaky.addr]);
    s.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: 3,
        consecutive_gateway_errors: 0,
        base_ejection_ms: 300,
        max_ejection_percent: 100,
    });
    let cluster = Cluster::new("web", &s, None);
    for path in ["/status/503", "/status/503", "/", "/status/503", "/status/503"] {
        text(cluster.send(get(path, "web.example"), &ctx()).await.unwrap()).await;
    }
    assert!(!cluster.stats().endpoints[0].ejected, "the success in between reset the streak");
    text(cluster.send(get("/status/503", "web.example"), &ctx()).await.unwrap()).await;
    assert!(cluster.stats().endpoints[0].ejected);
    let err = cluster.send(get("/", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::NoHealthyEndpoint), "{err:?}");
    assert_eq!(err.response_flag(), "UH");
    // Un-ejected at pick time once the ejection expires.
    tokio::time::sleep(Duration::from_millis(350)).await;
    text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    assert_eq!(cluster.stats().endpoints[0].failures, 5);
}

#[tokio::test]
async fn l4_connect_fails_over_to_other_endpoints() {
    let dead = closed_port().await;
    let backend = Backend::start(false).await;
    let s = spec(UpstreamProtocol::Tcp, &[dead, backend.addr]);
    let cluster = Cluster::new("tcp", &s, None);
    for _ in 0..4 {
        let stream = cluster.connect(&ctx()).await.unwrap();
        assert_eq!(stream.endpoint(), backend.addr);
    }
    let stats = cluster.stats();
    assert!(stats.endpoints[0].failures >= 1, "{stats:#?}");
    assert_eq!(stats.endpoints[1].connections, 4);

    let only_dead = Cluster::new("tcp", &spec(UpstreamProtocol::Tcp, &[dead]), None);
    let err = only_dead.connect(&ctx()).await.unwrap_err();
    assert!(err.is_connect_failure() && err.endpoint() == Some(dead), "{err:?}");
}

#[tokio::test]
async fn l4_streams_carry_bytes_and_count_as_active() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    });
    let cluster = Cluster::new("tcp", &spec(UpstreamProtocol::Tcp, &[addr]), None);
    let mut stream = cluster.connect(&ctx()).await.unwrap();
    assert!(!stream.is_tls());
    assert_eq!(cluster.stats().endpoints[0].active_requests, 1);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(stream);
    echo.await.unwrap();
    let stats = cluster.stats();
    assert_eq!((stats.endpoints[0].active_requests, stats.active_connections), (0, 0));
}

#[tokio::test]
async fn update_keeps_the_state_of_endpoints_that_stay() {
    let a = Backend::start(false).await;
    let b = Backend::start(false).await;
    let cluster = Cluster::new("web", &spec(UpstreamProtocol::Http1, &[a.addr]), None);
    for _ in 0..3 {
        text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    }
    let mut s = spec(UpstreamProtocol::Http1, &[b.addr, a.addr]);
    s.endpoints[1].locality = "r/z2/s".into();
    cluster.update(&s, None);
    let stats = cluster.stats();
    assert_eq!(stats.endpoints[1].address, a.addr);
    assert_eq!((stats.endpoints[1].requests, stats.endpoints[1].locality.as_str()), (3, "r/z2/s"));
    assert_eq!(stats.endpoints[0].requests, 0);
    for _ in 0..4 {
        text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    }
    // `a` kept its pooled connection.
    assert_eq!((a.connections(), b.connections()), (1, 1));
    // Draining endpoints get no new requests.
    s.endpoints[0].health = EndpointHealth::Draining;
    cluster.update(&s, None);
    for _ in 0..4 {
        text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    }
    assert_eq!(cluster.stats().endpoints[0].requests, 2);
}

#[tokio::test]
async fn ring_hash_on_a_header_is_sticky() {
    let backends = [Backend::start(false).await, Backend::start(false).await, Backend::start(false).await];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut s = spec(UpstreamProtocol::Http1, &addrs);
    s.lb = LbPolicy::RingHash { hash_on: dpu_proxy::model::HashOn::Header { name: "x-user".into() } };
    let cluster = Cluster::new("web", &s, None);
    let mut chosen = std::collections::HashMap::new();
    for round in 0..3 {
        for user in 0..20 {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-user", format!("user-{user}").parse().unwrap());
            let ctx = LbContext { source: IpAddr::V4(Ipv4Addr::LOCALHOST), headers: Some(&headers) };
            let before: Vec<u64> = cluster.stats().endpoints.iter().map(|e| e.requests).collect();
            text(cluster.send(get("/", "web.example"), &ctx).await.unwrap()).await;
            let after: Vec<u64> = cluster.stats().endpoints.iter().map(|e| e.requests).collect();
            let used = (0..3).find(|&i| after[i] != before[i]).unwrap();
            if round == 0 {
                chosen.insert(user, used);
            } else {
                assert_eq!(chosen[&user], used, "user-{user} moved");
            }
        }
    }
    let distinct: std::collections::HashSet<_> = chosen.values().collect();
    assert!(distinct.len() >= 2, "20 keys over 3 endpoints use more than one: {chosen:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Active health checks
// ---------------------------------------------------------------------------------------------------------------

fn health_check(kind: HealthCheckKind) -> HealthCheck {
    HealthCheck { kind, interval_ms: 100, timeout_ms: 100, unhealthy_threshold: 2, healthy_threshold: 1 }
}

#[tokio::test]
async fn tcp_health_check_marks_a_dead_endpoint_down_and_up_again() {
    let backend = Backend::start(false).await;
    let addr = backend.addr;
    let mut s = spec(UpstreamProtocol::Http1, &[addr]);
    s.health_check = Some(health_check(HealthCheckKind::Tcp));
    let cluster = Cluster::new("web", &s, None);
    assert!(cluster.stats().endpoints[0].active_health, "endpoints start healthy");
    text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;

    drop(backend);
    eventually(&cluster, "the endpoint is marked down", |s| !s.endpoints[0].active_health).await;
    assert!(cluster.stats().health_check_failures >= 2);
    let err = cluster.send(get("/", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::NoHealthyEndpoint), "{err:?}");

    let _revived = Backend::serve(rebind(addr).await, false, Arc::default());
    eventually(&cluster, "the endpoint is back up", |s| s.endpoints[0].active_health).await;
    text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;

    // Removing the health check puts endpoints back in rotation and stops the checker.
    cluster.update(&spec(UpstreamProtocol::Http1, &[addr]), None);
    let failures = cluster.stats().health_check_failures;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cluster.stats().health_check_failures, failures);
}

#[tokio::test]
async fn http_health_check_follows_the_status() {
    for h2 in [false, true] {
        let backend = Backend::start(h2).await;
        let protocol = if h2 { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 };
        let mut s = spec(protocol, &[backend.addr]);
        s.health_check =
            Some(health_check(HealthCheckKind::Http { path: "/healthz".into(), host: "hc.example".into() }));
        let cluster = Cluster::new("web", &s, None);
        for _ in 0..250 {
            if backend.state.hosts.lock().unwrap().iter().any(|h| h == "hc.example") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(backend.state.hosts.lock().unwrap().iter().any(|h| h == "hc.example"), "checks carry the host");
        assert!(cluster.stats().endpoints[0].active_health);

        backend.state.unhealthy.store(true, Ordering::SeqCst);
        eventually(&cluster, "the endpoint is marked down", |s| !s.endpoints[0].active_health).await;
        backend.state.unhealthy.store(false, Ordering::SeqCst);
        eventually(&cluster, "the endpoint is back up", |s| s.endpoints[0].active_health).await;
        // Health checks use their own connections, not the pool or the circuit breaker.
        assert_eq!(cluster.stats().endpoints[0].connections, 0);
        drop(cluster);
        // The checker stops with the cluster.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let seen = backend.connections();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(backend.connections(), seen, "h2={h2}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------------------------

struct Pki {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["backend.mesh.test".to_owned()]).unwrap();
    leaf.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/default/sa/backend".try_into().unwrap()));
    leaf.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf_cert.der().to_vec())], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki { client: Arc::new(client), server: Arc::new(server) }
}

/// A TLS backend speaking whatever ALPN selected; it answers with the protocol it negotiated.
async fn tls_backend(server: Arc<rustls::ServerConfig>) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state: Arc<State> = Arc::default();
    let st = Arc::clone(&state);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, conn_state) = (acceptor.clone(), Arc::clone(&st));
            let conn = tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let alpn = match tls.get_ref().1.alpn_protocol() {
                    Some(b"h2") => "h2",
                    Some(b"http/1.1") => "http/1.1",
                    _ => "none",
                };
                serve_io(tls, alpn == "h2", conn_state, alpn).await;
            });
            st.tasks.lock().unwrap().push(conn.abort_handle());
        }
    });
    Backend { addr, state, task }
}

#[tokio::test]
async fn tls_upstream_with_sni_and_alpn() {
    let pki = pki();
    let backend = tls_backend(Arc::clone(&pki.server)).await;
    let tls = |sni: &str| UpstreamTls {
        certificate: "backend-client".into(),
        server_identities: vec![],
        sni: sni.into(),
        kernel_tls: None,
    };

    let mut s = spec(UpstreamProtocol::Http1, &[backend.addr]);
    s.tls = Some(tls("backend.mesh.test"));
    let cluster = Cluster::new("web", &s, Some(Arc::clone(&pki.client)));
    for _ in 0..3 {
        let body = text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
        assert_eq!(body, "/ web.example http/1.1 HTTP/1.1");
    }
    assert_eq!(backend.connections(), 1);

    // Switching the cluster to HTTP/2 renegotiates with ALPN h2 on a new connection.
    s.protocol = UpstreamProtocol::Http2;
    cluster.update(&s, Some(Arc::clone(&pki.client)));
    let body = text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;
    assert_eq!(body, "/ web.example h2 HTTP/2.0");
    assert_eq!(backend.connections(), 2);

    // Without SNI the endpoint's IP address is the server name (the certificate has it).
    s.tls = Some(tls(""));
    let cluster = Cluster::new("web", &s, Some(Arc::clone(&pki.client)));
    text(cluster.send(get("/", "web.example"), &ctx()).await.unwrap()).await;

    // L4 through TLS.
    s.protocol = UpstreamProtocol::Tcp;
    s.tls = Some(tls("backend.mesh.test"));
    let cluster = Cluster::new("tcp", &s, Some(Arc::clone(&pki.client)));
    let stream = cluster.connect(&ctx()).await.unwrap();
    assert!(stream.is_tls());

    // A server whose certificate does not match the name fails as a connect failure.
    s.protocol = UpstreamProtocol::Http1;
    s.tls = Some(tls("other.mesh.test"));
    let cluster = Cluster::new("web", &s, Some(Arc::clone(&pki.client)));
    let err = cluster.send(get("/", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
    assert_eq!(err.response_flag(), "UF");
    assert!(err.is_connect_failure());

    // An HTTP/2 cluster in front of a server that only speaks HTTP/1.1 fails to connect rather than sending the
    // HTTP/2 preface to it.
    let mut only_h1 = (*pki.server).clone();
    only_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let h1_backend = tls_backend(Arc::new(only_h1)).await;
    let mut h2 = spec(UpstreamProtocol::Http2, &[h1_backend.addr]);
    h2.tls = Some(tls("backend.mesh.test"));
    let cluster = Cluster::new("grpc", &h2, Some(Arc::clone(&pki.client)));
    let err = cluster.send(get("/", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");

    // TLS asked for without a client config: fail closed (never plaintext) and do not blame the endpoint.
    s.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: 1,
        consecutive_gateway_errors: 1,
        base_ejection_ms: 60_000,
        max_ejection_percent: 100,
    });
    let cluster = Cluster::new("web", &s, None);
    let before = backend.connections();
    let err = cluster.send(get("/", "web.example"), &ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { endpoint, .. } if endpoint == backend.addr), "{err:?}");
    let err = cluster.connect(&ctx()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
    assert_eq!(backend.connections(), before);
    assert!(!cluster.stats().endpoints[0].ejected);
}

#[tokio::test]
async fn tls_http_health_check() {
    let pki = pki();
    let backend = tls_backend(Arc::clone(&pki.server)).await;
    let mut s = spec(UpstreamProtocol::Http2, &[backend.addr]);
    s.tls = Some(UpstreamTls {
        certificate: "c".into(),
        server_identities: vec![],
        sni: "backend.mesh.test".into(),
        kernel_tls: None,
    });
    s.health_check = Some(health_check(HealthCheckKind::Http { path: "/healthz".into(), host: "hc.example".into() }));
    let cluster = Cluster::new("web", &s, Some(pki.client));
    backend.state.unhealthy.store(true, Ordering::SeqCst);
    eventually(&cluster, "the endpoint is marked down", |s| !s.endpoints[0].active_health).await;
    backend.state.unhealthy.store(false, Ordering::SeqCst);
    eventually(&cluster, "the endpoint is back up", |s| s.endpoints[0].active_health).await;
}
