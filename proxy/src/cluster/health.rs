//! Active health checking: one task per cluster probes every endpoint each `interval_ms` (each probe delayed by a
//! random share of a tenth of the interval, so probes of many endpoints and clusters spread out), with a TCP
//! connect (no TLS handshake) or an HTTP `GET` expecting 2xx over a fresh connection (HTTP/1.1, or HTTP/2 for
//! HTTP/2 clusters; through TLS when the cluster uses TLS). Health checks do not count against the circuit breaker
//! nor appear in the endpoint's connection count.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::Body;
use crate::model::{HealthCheck, HealthCheckKind, UpstreamProtocol};

use super::{Config, EndpointState, Shared, UpstreamStream, connect};

/// User agent of HTTP health checks.
const USER_AGENT: &str = "dpu-proxy-health-check";

/// Consecutive results of one endpoint's checks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    successes: u32,
    failures: u32,
}

/// Checks every endpoint each round, forever (the cluster aborts the task).
pub(crate) async fn run(shared: Arc<Shared>, hc: HealthCheck) {
    let interval = Duration::from_millis(u64::from(hc.interval_ms));
    let spread = (interval / 10).as_millis() as u64;
    loop {
        let cfg = shared.config.load_full();
        let probes = cfg.members.iter().map(|member| {
            let (shared, cfg, hc) = (&shared, &cfg, &hc);
            async move {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=spread))).await;
                let result = probe(cfg, hc, &member.state).await;
                shared.record_health(hc, &member.state, result);
            }
        });
        futures_util::future::join_all(probes).await;
        tokio::time::sleep(interval).await;
    }
}

impl Shared {
    fn record_health(&self, hc: &HealthCheck, endpoint: &EndpointState, result: Result<(), String>) {
        let mut counters = endpoint.health.lock().unwrap_or_else(|e| e.into_inner());
        let healthy = endpoint.active_healthy.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                counters.failures = 0;
                counters.successes = counters.successes.saturating_add(1);
                if !healthy && counters.successes >= hc.healthy_threshold {
                    endpoint.active_healthy.store(true, Ordering::Relaxed);
                    tracing::info!(
                        cluster = %self.id, endpoint = %endpoint.address, successes = counters.successes,
                        "endpoint passed its health checks and is back in rotation"
                    );
                }
            }
            Err(reason) => {
                self.health_check_failures.fetch_add(1, Ordering::Relaxed);
                counters.successes = 0;
                counters.failures = counters.failures.saturating_add(1);
                if healthy && counters.failures >= hc.unhealthy_threshold {
                    endpoint.active_healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        cluster = %self.id, endpoint = %endpoint.address, failures = counters.failures, %reason,
                        "endpoint failed its health checks and is out of rotation"
                    );
                } else {
                    tracing::debug!(cluster = %self.id, endpoint = %endpoint.address, %reason, "health check failed");
                }
            }
        }
    }
}

/// One check of one endpoint within the check's timeout; `Err` says why it failed.
async fn probe(cfg: &Config, hc: &HealthCheck, endpoint: &EndpointState) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(hc.timeout_ms));
    let check = async {
        let address = endpoint.address;
        let tcp = connect::tcp(address, timeout).await.map_err(|e| error_text(&e))?;
        let HealthCheckKind::Http { path, host } = &hc.kind else {
            return Ok(());
        };
        let stream = match &cfg.tls {
            None if cfg.tls_missing => return Err(super::TLS_MISSING.to_owned()),
            None => UpstreamStream::plain(address, tcp),
            Some(tls) => {
                let tls = connect::tls(tcp, address, Arc::clone(tls), &cfg.sni, timeout, false).await;
                UpstreamStream::tls(address, tls.map_err(|e| error_text(&e))?)
            }
        };
        let status = match cfg.protocol {
            UpstreamProtocol::Http2 => get_http2(stream, path, host, cfg.tls.is_some()).await,
            UpstreamProtocol::Http1 | UpstreamProtocol::Tcp => get_http1(stream, path, host).await,
        }
        .map_err(|e| format!("GET {path} failed: {e}"))?;
        if status.is_success() { Ok(()) } else { Err(format!("GET {path} answered {status}")) }
    };
    tokio::time::timeout(timeout, check).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

fn empty() -> Body {
    http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

async fn get_http1(stream: UpstreamStream, path: &str, host: &str) -> Result<http::StatusCode, String> {
    let request = Request::get(path)
        .header(header::HOST, host)
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close")
        .body(empty())
        .map_err(|e| format!("the request cannot be built: {e}"))?;
    let (mut sender, connection) =
        http1::handshake::<_, Body>(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let status = sender.send_request(request).await.map(|r| r.status()).map_err(|e| e.to_string());
    connection.abort();
    status
}

async fn get_http2(stream: UpstreamStream, path: &str, host: &str, tls: bool) -> Result<http::StatusCode, String> {
    let endpoint = stream.endpoint().to_string();
    let uri = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(if host.is_empty() { endpoint.as_str() } else { host })
        .path_and_query(path)
        .build()
        .map_err(|e| format!("the request cannot be built: {e}"))?;
    let request = Request::get(uri)
        .header(header::USER_AGENT, USER_AGENT)
        .body(empty())
        .map_err(|e| format!("the request cannot be built: {e}"))?;
    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let status = sender.send_request(request).await.map(|r| r.status()).map_err(|e| e.to_string());
    connection.abort();
    status
}

fn error_text(e: &super::UpstreamError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
