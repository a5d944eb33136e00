//! Arbitrary bytes from a downstream client into the proxy's HTTP listener (hyper's codec plus our routing,
//! header matches, authorization, gRPC timeouts, rewrites and retries towards a live backend). Any panic in the
//! proxy aborts the process (fuzz builds use panic=abort), so a crash here is a crash in production.

#![no_main]

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use dpu_proxy::Proxy;
use dpu_proxy::model::MeshSpecs;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

struct Harness {
    runtime: Runtime,
    listener: SocketAddr,
    _proxy: Proxy,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A backend that answers every request head with a short response; closes on EOF.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(b"HTTP/1.1 503 x\r\ncontent-length: 2\r\n\r\nno").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = runtime.block_on(async {
        let backend = backend().await;
        let spec = serde_json::json!({
            "clusters": {"web": {"protocol": "http1", "endpoints": [{"address": backend.to_string()}]}},
            "policies": {"deny-admin": {"action": "deny", "rules": [
                {"paths": ["/admin*"], "methods": ["POST"], "headers": [{"name": ":authority", "value": {"kind": "prefix", "value": "internal"}}]}
            ]}},
            "route_tables": {"web": {"virtual_hosts": [
                {"name": "api", "domains": ["api.example", "*.svc", "api.*"], "routes": [
                    {"name": "re", "match": {"path": {"kind": "regex", "value": "/v[0-9]+/items/[a-z]+"},
                      "headers": [{"name": "x-canary", "value": {"kind": "regex", "value": "on|yes"}, "invert": true}]},
                     "action": {"kind": "forward", "clusters": [{"cluster": "web", "weight": 3}], "timeout_ms": 200,
                                "prefix_rewrite": null, "host_rewrite": "backend",
                                "retry": {"attempts": 2, "per_try_timeout_ms": 100, "retry_on": ["5xx", "reset"]}}},
                    {"name": "pre", "match": {"path": {"kind": "prefix", "value": "/p"}},
                     "action": {"kind": "forward", "clusters": [{"cluster": "web"}], "prefix_rewrite": "/q"},
                     "request_headers_to_add": [{"name": "x-added", "value": "1", "append": true}],
                     "request_headers_to_remove": ["x-remove"], "response_headers_to_add": [{"name": "x-r", "value": "2"}]}
                ]},
                {"name": "rest", "domains": ["*"], "routes": [
                    {"name": "redirect", "match": {"path": {"kind": "exact", "value": "/old"}},
                     "action": {"kind": "redirect", "host": "new.example", "status": 308}},
                    {"name": "direct", "match": {"path": {"kind": "prefix", "value": "/"}},
                     "action": {"kind": "direct_response", "status": 200, "body": "ok"}}
                ]}
            ]}},
            "listeners": {"in": {"address": listener.to_string(), "policies": ["deny-admin"],
                "timeouts": {"request_headers_ms": 200, "idle_ms": 1000, "drain_ms": 100},
                "max_request_headers_bytes": 4096,
                "default": {"kind": "http", "route_table": "web", "codec": "auto"}}}
        });
        let specs: MeshSpecs = serde_json::from_value(spec).unwrap();
        let proxy = Proxy::new(&mut prometheus_client::registry::Registry::default());
        let report = proxy.apply("fuzz", specs).await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        proxy
    });
    Harness { runtime, listener, _proxy: proxy }
});

fuzz_target!(|data: &[u8]| {
    let h = &*HARNESS;
    h.runtime.block_on(async {
        let Ok(mut stream) = TcpStream::connect(h.listener).await else { return };
        let _ = stream.write_all(data).await;
        let _ = stream.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut sink)).await;
    });
});
