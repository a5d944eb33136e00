//! The admin HTTP listener: `/metrics` (OpenMetrics text), `/healthz` (process alive), `/readyz` (API
//! serving) and `/config_dump` (what the mesh proxy runs, private keys redacted). Plain HTTP/1.1; bind it to
//! loopback or a management network.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// State the admin endpoints report.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    /// Set once the gRPC API accepts requests; cleared when it starts draining.
    pub ready: Arc<AtomicBool>,
    /// Refreshes gauges that are read from other components just before a scrape.
    pub before_scrape: Arc<dyn Fn() + Send + Sync>,
    /// The mesh proxy's configuration dump.
    pub config_dump: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").field("ready", &self.ready).finish_non_exhaustive()
    }
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
        response
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), "text/plain");
    }
    match req.uri().path() {
        "/metrics" => {
            (state.before_scrape)();
            text(StatusCode::OK, state.metrics.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/config_dump" => {
            let dump = serde_json::to_string_pretty(&(state.config_dump)()).unwrap_or_default();
            text(StatusCode::OK, dump + "\n", "application/json")
        }
        "/readyz" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), "text/plain"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz, /readyz, /config_dump\n".into(),
            "text/plain",
        ),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: AdminState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&state, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
