//! Access log lines as the agent's subscriber receives them: one JSON line per HTTP request and per TCP connection
//! on the `dpu_proxy::access` target. A process-wide capturing subscriber, so this file holds one test.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dpu_proxy::model::{
    CircuitBreaker, ClusterSpec, Endpoint, EndpointHealth, Handler, HttpCodec, LbPolicy, ListenerSpec,
    ListenerTimeouts, MeshSpecs, PathMatch, Route, RouteAction, RouteMatch, RouteTableSpec, UpstreamProtocol,
    VirtualHost,
};
use dpu_proxy::proxy::Proxy;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps the message of every `dpu_proxy::access` event.
struct Capture;

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == dpu_proxy::access_log::TARGET
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        LINES.lock().unwrap_or_else(|e| e.into_inner()).push(m.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

fn listener(address: SocketAddr, default: Handler) -> ListenerSpec {
    ListenerSpec {
        address,
        transparent: false,
        destinations: vec![],
        default,
        tls: None,
        policies: vec![],
        timeouts: ListenerTimeouts::default(),
        max_request_headers_bytes: 8192,
    }
}

/// Waits for a captured line matching `pred`.
async fn wait_for(pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let found = LINES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| pred(v));
        if let Some(v) = found {
            return v;
        }
        assert!(Instant::now() < deadline, "no matching access log line in {:?}", LINES.lock().map(|l| l.clone()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_connections_are_logged_as_json() {
    tracing::subscriber::set_global_default(Capture).expect("install subscriber");

    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let echo_addr = echo.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                }
            });
        }
    });

    let http_addr = free_addr();
    let tcp_addr = free_addr();
    let mut specs = MeshSpecs::default();
    specs.route_tables.insert(
        "web".into(),
        RouteTableSpec {
            virtual_hosts: vec![VirtualHost {
                name: "web".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: "hello".into(),
                    matcher: RouteMatch { path: PathMatch::Prefix("/".into()), headers: vec![] },
                    action: RouteAction::DirectResponse { status: 201, body: "hello".into() },
                    request_headers_to_add: vec![],
                    request_headers_to_remove: vec![],
                    response_headers_to_add: vec![],
                    response_headers_to_remove: vec![],
                }],
            }],
        },
    );
    specs.clusters.insert(
        "echo".into(),
        ClusterSpec {
            protocol: UpstreamProtocol::Tcp,
            endpoints: vec![Endpoint {
                address: echo_addr,
                weight: 1,
                locality: String::new(),
                health: EndpointHealth::Healthy,
            }],
            lb: LbPolicy::RoundRobin,
            connect_timeout_ms: 1000,
            idle_timeout_ms: 0,
            circuit_breaker: CircuitBreaker::default(),
            health_check: None,
            outlier_detection: None,
            tls: None,
        },
    );
    specs.listeners.insert(
        "http".into(),
        listener(http_addr, Handler::Http { route_table: "web".into(), codec: HttpCodec::Http1 }),
    );
    specs.listeners.insert("tcp".into(), listener(tcp_addr, Handler::Tcp { cluster: "echo".into() }));
    let proxy = Proxy::new(&mut Registry::default());
    let report = proxy.apply("intent", specs).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let mut s = TcpStream::connect(http_addr).await.expect("connect");
    s.write_all(b"GET /greet?x=1 HTTP/1.1\r\nhost: web\r\nx-request-id: req-1\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert!(out.starts_with(b"HTTP/1.1 201"), "{}", String::from_utf8_lossy(&out));

    let line = wait_for(|v| v["request_id"] == "req-1").await;
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/greet?x=1");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["status"], 201);
    assert_eq!(line["route"], "hello");
    assert_eq!(line["listener"], "http");
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["bytes_sent"], 5);
    assert_eq!(line["source_workload"], "unknown");
    assert!(line["start_time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{line}");
    assert!(line["duration_ms"].is_u64(), "{line}");

    let mut s = TcpStream::connect(tcp_addr).await.expect("connect");
    s.write_all(b"twelve bytes").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert_eq!(out, b"twelve bytes");
    let line = wait_for(|v| v["protocol"] == "TCP").await;
    assert_eq!(line["cluster"], "echo");
    assert_eq!(line["bytes_received"], 12);
    assert_eq!(line["bytes_sent"], 12);
    assert_eq!(line["upstream_endpoint"], echo_addr.to_string());
    proxy.shutdown(Duration::from_secs(1)).await;
}
