//! Per-endpoint connection pools and the HTTP exchange on them.
//!
//! HTTP/1.1: a stack of idle connections (last in, first out, so the warmest is reused and the rest can time out).
//! A connection is checked out for one exchange and goes back when the response body reaches its end; a body
//! dropped early takes its connection with it. HTTP/2: one multiplexed connection per endpoint, shared by clone,
//! re-established when it closes; concurrent first requests wait for a single connect.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::Instrument;

use crate::{Body, BoxError};

use super::breaker::{Resource, Slot};
use super::{ActiveRequest, Config, EndpointState, Shared, UpstreamError, now_ms};

/// One endpoint's connections.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    /// Held while an HTTP/2 connection is being established, so concurrent requests share one connect.
    h2_connect: tokio::sync::Mutex<()>,
    /// Bumped when the pool is emptied for a transport change; connections of older generations are not reused.
    generation: AtomicU64,
    /// When a request on the HTTP/2 connection last started or finished ([`now_ms`]).
    h2_last_used: AtomicU64,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<Body>,
    since_ms: u64,
    generation: u64,
}

/// An HTTP/1.1 connection to give back to its pool when the response body ends.
#[derive(Debug)]
pub(crate) struct Reuse {
    endpoint: Arc<EndpointState>,
    sender: http1::SendRequest<Body>,
    generation: u64,
}

impl Pool {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Pops the most recently used idle connection that is open, current and not past the idle timeout.
    fn take_idle(&self, idle_timeout: Option<Duration>) -> Option<http1::SendRequest<Body>> {
        let generation = self.generation();
        let now = now_ms();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop() {
            let expired = idle_timeout.is_some_and(|t| now.saturating_sub(entry.since_ms) >= t.as_millis() as u64);
            if entry.generation == generation && !expired && !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: http1::SendRequest<Body>, generation: u64) {
        if generation != self.generation() || sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(Idle { sender, since_ms: now_ms(), generation });
    }

    /// The shared HTTP/2 connection, if it is open.
    fn h2(&self) -> Option<http2::SendRequest<Body>> {
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn set_h2(&self, sender: http2::SendRequest<Body>) {
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        self.touch();
    }

    /// Notes activity, so the idle timeout of the HTTP/2 connection counts from now.
    pub(crate) fn touch(&self) {
        self.h2_last_used.store(now_ms(), Ordering::Relaxed);
    }

    /// Drops every pooled connection (connections in use finish and are then closed).
    pub(crate) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.h2.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Closes connections idle for `idle_timeout`: HTTP/1.1 connections in the stack, and the HTTP/2 connection
    /// when the endpoint has no active request.
    fn reap(&self, idle_timeout: Duration, active_requests: u64) {
        let now = now_ms();
        let limit = idle_timeout.as_millis() as u64;
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|i| !i.sender.is_closed() && now.saturating_sub(i.since_ms) < limit);
        if active_requests == 0 && now.saturating_sub(self.h2_last_used.load(Ordering::Relaxed)) >= limit {
            self.h2.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Number of idle HTTP/1.1 connections.
    #[cfg(test)]
    pub(crate) fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Closes idle connections of every endpoint of the cluster, checking a few times per `idle_timeout`.
pub(crate) async fn reap_idle(shared: Arc<Shared>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let cfg = shared.config.load_full();
        for member in &cfg.members {
            member.state.pool.reap(idle_timeout, member.state.active_requests.load(Ordering::Relaxed));
        }
    }
}

/// Sends one request over HTTP/1.1: an idle pooled connection if there is one, else a new connection. A pooled
/// connection that turns out closed before the request was written is replaced transparently (the keep-alive race).
pub(crate) async fn send_http1(
    shared: &Shared,
    cfg: &Config,
    endpoint: &Arc<EndpointState>,
    mut req: Request<Body>,
) -> Result<(Response<Incoming>, Option<Reuse>), UpstreamError> {
    to_http1(&mut req);
    loop {
        let generation = endpoint.pool.generation();
        let (mut sender, reused) = match checkout_http1(cfg, endpoint).await {
            Some(sender) => (sender, true),
            None => (connect_http1(shared, cfg, endpoint).await?, false),
        };
        match sender.try_send_request(req).await {
            Ok(response) => {
                let reuse = Reuse { endpoint: Arc::clone(endpoint), sender, generation };
                return Ok((response, Some(reuse)));
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if reused => {
                    tracing::debug!(error = %e.error(), "pooled connection closed before the request was sent");
                    req = unsent;
                }
                _ => return Err(reset(endpoint.address, e.error())),
            },
        }
    }
}

async fn checkout_http1(cfg: &Config, endpoint: &EndpointState) -> Option<http1::SendRequest<Body>> {
    while let Some(mut sender) = endpoint.pool.take_idle(cfg.idle_timeout) {
        if sender.ready().await.is_ok() {
            return Some(sender);
        }
    }
    None
}

async fn connect_http1(
    shared: &Shared,
    cfg: &Config,
    endpoint: &EndpointState,
) -> Result<http1::SendRequest<Body>, UpstreamError> {
    let _pending = shared.breaker.acquire(Resource::Pending)?;
    let slot = shared.breaker.acquire(Resource::Connections)?;
    let stream = shared.open(cfg, endpoint).await?.hold(Some(slot), None);
    let address = endpoint.address;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::ConnectFailure { endpoint: address, source: io::Error::other(e) })?;
    let span =
        tracing::debug_span!("upstream_connection", cluster = %shared.id, endpoint = %address, protocol = "http1");
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        }
        .instrument(span),
    );
    Ok(sender)
}

/// Sends one request over the endpoint's HTTP/2 connection, connecting first when there is none. A request the
/// connection refused unsent (it was closing) is sent once more on a new connection.
pub(crate) async fn send_http2(
    shared: &Shared,
    cfg: &Config,
    endpoint: &Arc<EndpointState>,
    mut req: Request<Body>,
) -> Result<(Response<Incoming>, Option<Reuse>), UpstreamError> {
    to_http2(&mut req, cfg.tls.is_some(), endpoint.address);
    let mut fresh = false;
    loop {
        let mut sender = match endpoint.pool.h2() {
            Some(sender) if !fresh => sender,
            _ => {
                fresh = true;
                connect_http2(shared, cfg, endpoint).await?
            }
        };
        endpoint.pool.touch();
        let result = match sender.ready().await {
            Ok(()) => sender.try_send_request(req).await,
            Err(e) if !fresh => {
                tracing::debug!(error = %e, "shared HTTP/2 connection closed; reconnecting");
                fresh = true;
                continue;
            }
            Err(e) => return Err(reset(endpoint.address, &e)),
        };
        match result {
            Ok(response) => return Ok((response, None)),
            Err(mut e) => match e.take_message() {
                Some(unsent) if !fresh => {
                    tracing::debug!(error = %e.error(), "shared HTTP/2 connection refused a new stream; reconnecting");
                    req = unsent;
                    fresh = true;
                }
                _ => return Err(reset(endpoint.address, e.error())),
            },
        }
    }
}

async fn connect_http2(
    shared: &Shared,
    cfg: &Config,
    endpoint: &EndpointState,
) -> Result<http2::SendRequest<Body>, UpstreamError> {
    let _pending = shared.breaker.acquire(Resource::Pending)?;
    let _connecting = endpoint.pool.h2_connect.lock().await;
    if let Some(sender) = endpoint.pool.h2() {
        return Ok(sender);
    }
    let slot = shared.breaker.acquire(Resource::Connections)?;
    let stream = shared.open(cfg, endpoint).await?.hold(Some(slot), None);
    let address = endpoint.address;
    // A server that picked another protocol would answer the HTTP/2 preface with garbage; one that ignored ALPN
    // may still speak HTTP/2 with prior knowledge.
    if let Some(alpn) = stream.alpn_protocol().filter(|p| *p != b"h2") {
        let message = format!("the server selected ALPN {:?} instead of h2", String::from_utf8_lossy(alpn));
        return Err(UpstreamError::Tls { endpoint: address, message });
    }
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::ConnectFailure { endpoint: address, source: io::Error::other(e) })?;
    let span =
        tracing::debug_span!("upstream_connection", cluster = %shared.id, endpoint = %address, protocol = "http2");
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        }
        .instrument(span),
    );
    endpoint.pool.set_h2(sender.clone());
    Ok(sender)
}

/// HTTP/1.1 on the wire: origin-form target (authority-form for CONNECT), Host as given — or taken from the URI
/// when the request has none (a request that arrived over HTTP/2).
fn to_http1(req: &mut Request<Body>) {
    *req.version_mut() = Version::HTTP_11;
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req.uri().authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    if req.method() == http::Method::CONNECT || (req.uri().scheme().is_none() && req.uri().authority().is_none()) {
        return;
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(req.uri().path_and_query().cloned().unwrap_or_else(|| "/".parse().expect("valid")));
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// HTTP/2 on the wire: `:authority` from the Host header (the original host, not the endpoint address), or the
/// URI's, or else the endpoint; `:scheme` kept or derived from the transport; no Host header.
fn to_http2(req: &mut Request<Body>, tls: bool, endpoint: SocketAddr) {
    *req.version_mut() = Version::HTTP_2;
    let host = req.headers_mut().remove(header::HOST).and_then(|h| Authority::try_from(h.as_bytes()).ok());
    let mut parts = req.uri().clone().into_parts();
    parts.authority = host.or(parts.authority).or_else(|| Authority::try_from(endpoint.to_string().as_str()).ok());
    if parts.scheme.is_none() {
        parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some("/".parse().expect("valid"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

fn reset(endpoint: SocketAddr, error: &hyper::Error) -> UpstreamError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    UpstreamError::Reset { endpoint, message }
}

/// Wraps a response body so that, when it ends, the connection returns to its pool and the request stops counting
/// as active; when it is dropped early, only the latter happens and the connection closes.
pub(crate) fn wrap_response(
    response: Response<Incoming>,
    request: Slot,
    active: ActiveRequest,
    reuse: Option<Reuse>,
) -> Response<Body> {
    let (parts, inner) = response.into_parts();
    let finish = Finish { _request: request, _active: active, reuse };
    let finish = if inner.is_end_stream() {
        finish.complete();
        None
    } else {
        Some(finish)
    };
    Response::from_parts(parts, ResponseBody { inner, finish }.boxed_unsync())
}

/// What a finished exchange gives back.
#[derive(Debug)]
struct Finish {
    _request: Slot,
    _active: ActiveRequest,
    reuse: Option<Reuse>,
}

impl Finish {
    fn complete(self) {
        if let Some(Reuse { endpoint, sender, generation }) = self.reuse {
            endpoint.pool.put_idle(sender, generation);
        }
    }
}

#[derive(Debug)]
struct ResponseBody {
    inner: Incoming,
    finish: Option<Finish>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                if let Some(finish) = this.finish.take() {
                    finish.complete();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream()
                    && let Some(finish) = this.finish.take()
                {
                    finish.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection is not reusable; the request is over.
                this.finish = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Body {
        http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
    }

    #[test]
    fn http1_requests_use_origin_form_and_keep_host() {
        let mut req = Request::builder()
            .uri("http://10.0.0.1:8080/a/b?c=d")
            .header("host", "web.example")
            .version(Version::HTTP_2)
            .body(empty())
            .unwrap();
        to_http1(&mut req);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.headers()["host"], "web.example");
        assert_eq!(req.version(), Version::HTTP_11);

        // An HTTP/2 request (no Host header) gets Host from its authority.
        let mut req = Request::builder().uri("https://api.example/x").body(empty()).unwrap();
        to_http1(&mut req);
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()["host"], "api.example");
    }

    #[test]
    fn http2_requests_carry_the_original_authority() {
        let endpoint: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let mut req = Request::builder().uri("/svc/Method").header("host", "grpc.example:50051").body(empty()).unwrap();
        to_http2(&mut req, false, endpoint);
        assert_eq!(req.uri(), "http://grpc.example:50051/svc/Method");
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.version(), Version::HTTP_2);

        let mut req = Request::builder().uri("https://api.example/").body(empty()).unwrap();
        to_http2(&mut req, false, endpoint);
        assert_eq!(req.uri(), "https://api.example/");

        let mut req = Request::builder().uri("/").body(empty()).unwrap();
        to_http2(&mut req, true, endpoint);
        assert_eq!(req.uri(), "https://10.0.0.1:8080/");
    }
}
