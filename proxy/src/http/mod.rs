//! HTTP downstream: hyper 1 server connections (HTTP/1.1, h2c prior knowledge, either by preface, or by ALPN over
//! TLS) whose requests are routed per request against the current snapshot, admitted, authorized and forwarded.

mod body;
mod local;
mod request;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::listener::{Activity, ConnContext, Io, Metered};
use crate::model::HttpCodec;

pub use local::{grpc_status_for, is_grpc};

/// hyper refuses read buffers smaller than this.
const MIN_READ_BUFFER: usize = 8192;

/// Runs a hyper connection to completion; starts a graceful shutdown (HTTP/2 GOAWAY, HTTP/1.1 close after the
/// current response) when the listener drains or the connection goes idle, and drops it at the drain deadline.
macro_rules! drive {
    ($conn:expr, $idle:expr, $graceful:expr, $close:expr) => {{
        let conn = $conn;
        let idle = $idle;
        tokio::pin!(conn);
        tokio::pin!(idle);
        let graceful: &CancellationToken = &$graceful;
        let close: &CancellationToken = &$close;
        let mut shutting_down = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => break r.map_err(crate::BoxError::from),
                () = graceful.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = &mut idle, if !shutting_down => {
                    tracing::debug!("idle timeout, closing");
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = close.cancelled() => break Ok(()),
            }
        }
    }};
}

/// One downstream HTTP connection as request handlers see it.
#[derive(Debug)]
struct HttpConn {
    ctx: Arc<ConnContext>,
    route_table: String,
    activity: Arc<Activity>,
    scheme: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
    Auto,
}

/// Serves HTTP on an accepted (and, with TLS, handshaken) connection until the client closes it, the idle timeout
/// passes, or the listener drains.
pub async fn serve(
    ctx: Arc<ConnContext>,
    io: Box<dyn Io>,
    route_table: String,
    codec: HttpCodec,
    alpn: Option<Vec<u8>>,
) {
    let version = match (ctx.tls, alpn.as_deref(), codec) {
        (true, Some(b"h2"), _) => Version::Http2,
        (true, _, _) => Version::Http1,
        (false, _, HttpCodec::Http1) => Version::Http1,
        (false, _, HttpCodec::Http2) => Version::Http2,
        (false, _, HttpCodec::Auto) => Version::Auto,
    };
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Metered::new(io, activity.clone()));
    let scheme = if ctx.tls { "https" } else { "http" };
    let conn = Arc::new(HttpConn { ctx: ctx.clone(), route_table, activity: activity.clone(), scheme });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(request::handle(conn, req).await) }
    });

    let timeouts = ctx.listener.spec.timeouts;
    let header_timeout =
        (timeouts.request_headers_ms > 0).then(|| Duration::from_millis(timeouts.request_headers_ms.into()));
    let idle = (timeouts.idle_ms > 0).then(|| Duration::from_millis(timeouts.idle_ms.into()));
    let max_head = ctx.listener.spec.max_request_headers_bytes as usize;
    let idle_expired = async {
        match idle {
            Some(d) => activity.idle_expired(d).await,
            None => std::future::pending().await,
        }
    };
    let result = match version {
        Version::Http1 => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_head.max(MIN_READ_BUFFER))
                .max_header_size(max_head)
                .keep_alive(true);
            let conn = b.serve_connection(io, service).with_upgrades();
            drive!(conn, idle_expired, ctx.graceful, ctx.close)
        }
        Version::Http2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new()).max_header_list_size(max_head as u32);
            let conn = b.serve_connection(io, service);
            drive!(conn, idle_expired, ctx.graceful, ctx.close)
        }
        Version::Auto => {
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_head.max(MIN_READ_BUFFER))
                .keep_alive(true);
            b.http2().timer(TokioTimer::new()).max_header_list_size(max_head as u32);
            let conn = b.serve_connection_with_upgrades(io, service);
            drive!(conn, idle_expired, ctx.graceful, ctx.close)
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}
