//! HTTP downstream: hyper 1 server connections (HTTP/1.1, h2c prior knowledge, either by preface, or by ALPN over
//! TLS) whose requests are routed per request against the current snapshot, admitted, authorized and forwarded.

mod body;
mod h1;
mod local;
mod request;
mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use crate::Body;
use crate::listener::{Activity, ConnContext, Io, Metered};
use crate::model::HttpCodec;

pub use h1::RELEASE_IDLE_CODEC_AFTER;

pub use local::{grpc_status_for, is_grpc};

/// hyper refuses read buffers smaller than this.
const MIN_READ_BUFFER: usize = 8192;

/// One downstream HTTP connection as request handlers see it.
struct HttpConn {
    ctx: Arc<ConnContext>,
    route_table: String,
    activity: Arc<Activity>,
    scheme: &'static str,
    /// Set once an upgrade has been answered with `101`: the tunnel waiting for the downstream transport, which
    /// the HTTP/1.1 connection hands over when hyper lets go of it.
    upgrade: Mutex<Option<oneshot::Sender<h1::Transport>>>,
}

impl std::fmt::Debug for HttpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConn")
            .field("peer", &self.ctx.peer)
            .field("route_table", &self.route_table)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

/// How long an `auto` listener waits for the bytes that tell HTTP/1.1 from HTTP/2 when the listener sets no
/// header timeout.
const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP on an accepted (and, with TLS, handshaken) connection until the client closes it, the idle timeout
/// passes, or the listener drains.
pub async fn serve(
    ctx: Arc<ConnContext>,
    io: Box<dyn Io>,
    route_table: String,
    codec: HttpCodec,
    alpn: Option<Vec<u8>>,
) {
    let timeouts = ctx.listener.spec.timeouts;
    let header_timeout =
        (timeouts.request_headers_ms > 0).then(|| Duration::from_millis(timeouts.request_headers_ms.into()));
    let idle = (timeouts.idle_ms > 0).then(|| Duration::from_millis(timeouts.idle_ms.into()));
    let max_head = ctx.listener.spec.max_request_headers_bytes as usize;

    let activity = Arc::new(Activity::default());
    let mut io = h1::Transport::new(Metered::new(io, activity.clone()));
    let version = match (ctx.tls, alpn.as_deref(), codec) {
        (true, Some(b"h2"), _) => Version::Http2,
        (true, _, _) => Version::Http1,
        (false, _, HttpCodec::Http1) => Version::Http1,
        (false, _, HttpCodec::Http2) => Version::Http2,
        (false, _, HttpCodec::Auto) => {
            let sniff = h1::starts_with_h2_preface(&mut io);
            match tokio::time::timeout(header_timeout.unwrap_or(DEFAULT_PREFACE_TIMEOUT), sniff).await {
                Ok(Ok(true)) => Version::Http2,
                Ok(Ok(false)) => Version::Http1,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "connection failed before its first request");
                    return;
                }
                Err(_) => {
                    tracing::debug!("client sent no complete request start in time, closing");
                    return;
                }
            }
        }
    };
    let scheme = if ctx.tls { "https" } else { "http" };
    let conn = Arc::new(HttpConn {
        ctx: ctx.clone(),
        route_table,
        activity: activity.clone(),
        scheme,
        upgrade: Mutex::default(),
    });
    let handler = conn.clone();
    let service = service_fn(move |req| -> ResponseFuture {
        let conn = handler.clone();
        Box::pin(async move { Ok::<_, Infallible>(request::handle(conn, req).await) })
    });

    let result = match version {
        Version::Http1 => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_head.max(MIN_READ_BUFFER))
                .max_header_size(max_head)
                .keep_alive(true);
            h1::serve(&conn, io, &b, service, idle).await
        }
        Version::Http2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new()).max_header_list_size(max_head as u32);
            let accepted = tokio::time::Instant::now();
            let mut conn = Box::pin(b.serve_connection(TokioIo::new(io), service));
            let idle_expired = activity.idle_expired(idle);
            tokio::pin!(idle_expired);
            let mut shutting_down = false;
            let mut drain_at: Option<Pin<Box<tokio::time::Sleep>>> = None;
            // GOAWAY when the listener drains or the connection goes idle; dropped at the drain deadline.
            loop {
                tokio::select! {
                    r = conn.as_mut() => break r.map_err(crate::BoxError::from),
                    () = ctx.graceful.cancelled(), if !shutting_down && drain_at.is_none() => {
                        // A connection accepted just before draining began (during a hand-over two processes
                        // accept on one socket) gets its preface and first streams in first: GOAWAY during the
                        // handshake would close it with the client's streams unanswered.
                        drain_at = Some(Box::pin(tokio::time::sleep_until(accepted + crate::listener::FIRST_REQUEST_GRACE)));
                    }
                    () = async { drain_at.as_mut().expect("armed").await }, if !shutting_down && drain_at.is_some() => {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = &mut idle_expired, if !shutting_down => {
                        tracing::debug!("idle timeout, closing");
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = ctx.close.cancelled() => break Ok(()),
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}
