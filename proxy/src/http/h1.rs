//! HTTP/1.1 downstream connections that give their codec back while idle.
//!
//! hyper's HTTP/1 server holds an 8 KiB write buffer from construction and an 8 KiB read buffer from the first
//! read, for as long as the connection lives; a shared proxy with tens of thousands of idle keep-alive clients
//! would spend most of its memory on them. So a hyper connection here serves a run of requests only: once no
//! byte has moved and no request has been in flight for [`RELEASE_IDLE_CODEC_AFTER`], keep-alive is switched
//! off for the connection object (not for the client — the last response has already been written with
//! keep-alive), hyper finishes, and the transport is taken back with any bytes hyper had read but not parsed.
//! The connection then waits for the client's next byte holding only the socket, and builds a new hyper
//! connection when it arrives.
//!
//! A `101 Switching Protocols` answer ends the hyper connection the same way; the transport is then handed to
//! the tunnel that [`super::upgrade`] started.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::HttpConn;
use crate::listener::{Io, Metered};
use crate::{Body, BoxError};

/// A keep-alive connection with nothing moving for this long gives back its codec buffers.
pub const RELEASE_IDLE_CODEC_AFTER: Duration = Duration::from_millis(50);
/// How long closing an idle connection may wait for the transport's shutdown (TLS close_notify).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// A draining connection closes once nothing has moved on it for this long. One in use gets its next request
/// answered with `Connection: close` instead: closing it between two requests would lose the one the client may
/// be sending (HTTP/1.1 has no GOAWAY).
pub const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// The downstream transport: the accepted (and possibly TLS) stream, metered, with bytes read from it ahead of
/// the codec that will parse them.
pub type Transport = Prefixed<Metered<Box<dyn Io>>>;

/// A stream with bytes to be read before the stream's own.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(inner: T) -> Prefixed<T> {
        Prefixed { prefix: Bytes::new(), inner }
    }

    /// Puts `bytes` back in front of what is still to be read.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.prefix.is_empty() {
            self.prefix = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            self.prefix = joined.freeze();
        }
    }

    /// Bytes read from the stream and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.prefix.len()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = buf.remaining().min(self.prefix.len());
        let head = self.prefix.split_to(n);
        buf.put_slice(&head);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes either are the HTTP/2 preface or cannot become it, and puts them back. `false` also
/// for a client that closes first (the HTTP/1 codec then sees the same bytes and the end of stream).
pub async fn starts_with_h2_preface(io: &mut Transport) -> io::Result<bool> {
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    let h2 = loop {
        if n == seen.len() {
            break true;
        }
        let read = io.read(&mut seen[n..]).await?;
        if read == 0 {
            break false;
        }
        n += read;
        if seen[..n] != H2_PREFACE[..n] {
            break false;
        }
    };
    io.unread(Bytes::copy_from_slice(&seen[..n]));
    Ok(h2)
}

/// Why a hyper connection object ended.
enum Ended {
    /// hyper is done with the client: it closed, asked to close, or the connection is being shut down.
    Closed,
    /// Released while idle; the client may send another request.
    Released,
}

/// Serves HTTP/1.1 on `io` until the client closes, the idle timeout passes, or the listener drains.
pub async fn serve<S>(
    conn: &Arc<HttpConn>,
    mut io: Transport,
    builder: &http1::Builder,
    mut service: S,
    idle: Option<Duration>,
) -> Result<(), BoxError>
where
    S: HttpService<Incoming, ResBody = Body> + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
{
    let ctx = &conn.ctx;
    let activity = &conn.activity;
    // A connection released with part of a request head buffered keeps its next codec until that request is
    // done, so a client trickling a head cannot restart hyper's header timeout over and over.
    let mut may_release = true;
    let codecs = &ctx.runtime.metrics.http1_codecs;
    loop {
        // Boxed, so a released connection's task keeps none of it.
        let mut hyper_conn = Box::new(builder.serve_connection(TokioIo::new(io), service));
        let codec = Held::new(codecs);
        let mut ending: Option<Ended> = None;
        let served = loop {
            let draining = ctx.graceful.is_cancelled();
            let quiet_after = match (ending.is_some(), draining, may_release, idle) {
                (true, _, _, _) => None,
                (false, true, _, idle) => Some(idle.map_or(DRAIN_QUIET, |idle| idle.min(DRAIN_QUIET))),
                (false, false, true, Some(idle)) => Some(idle.min(RELEASE_IDLE_CODEC_AFTER)),
                (false, false, true, None) => Some(RELEASE_IDLE_CODEC_AFTER),
                (false, false, false, idle) => idle,
            };
            let quiet = activity.idle_expired(quiet_after);
            tokio::select! {
                r = poll_fn(|cx| hyper_conn.poll_without_shutdown(cx)) => break r,
                // Draining: responses from here on say `Connection: close` (request.rs); the quiet wait is
                // re-armed with DRAIN_QUIET.
                () = ctx.graceful.cancelled(), if !draining && ending.is_none() => {}
                () = quiet => {
                    let timed_out = draining || idle.is_some_and(|idle| activity.idle_for() >= idle);
                    if timed_out && !draining {
                        tracing::debug!("idle timeout, closing");
                    }
                    ending = Some(if timed_out { Ended::Closed } else { Ended::Released });
                    Pin::new(&mut *hyper_conn).graceful_shutdown();
                }
                () = ctx.close.cancelled() => return Ok(()),
            }
        };
        served?;
        let parts = hyper_conn.into_parts();
        drop(codec);
        io = parts.io.into_inner();
        io.unread(parts.read_buf);
        service = parts.service;

        let upgraded = conn.upgrade.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(tunnel) = upgraded {
            // The 101 is written; the tunnel owns the transport from here.
            let _ = tunnel.send(io);
            return Ok(());
        }
        if !matches!(ending, Some(Ended::Released)) {
            close(&mut io).await;
            return Ok(());
        }
        may_release = io.buffered() == 0;
        if may_release && !next_request(conn, &mut io, idle).await? {
            close(&mut io).await;
            return Ok(());
        }
    }
}

/// Counts a hyper connection object in [`crate::metrics::Metrics::http1_codecs`] while it lives.
struct Held<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Held<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Held<'a> {
        gauge.inc();
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Waits, holding no codec, for the first byte of the client's next request and puts it back. `false` when the
/// connection should close instead: the client closed, the idle timeout passed, or the listener drains and the
/// connection has been quiet for [`DRAIN_QUIET`].
async fn next_request(conn: &HttpConn, io: &mut Transport, idle: Option<Duration>) -> Result<bool, BoxError> {
    let ctx = &conn.ctx;
    let idle_expired = conn.activity.idle_expired(idle);
    let drained = async {
        ctx.graceful.cancelled().await;
        conn.activity.idle_expired(Some(DRAIN_QUIET)).await;
    };
    let mut first = [0u8; 1];
    tokio::select! {
        read = io.read(&mut first) => match read? {
            0 => Ok(false),
            _ => {
                io.unread(Bytes::copy_from_slice(&first));
                Ok(true)
            }
        },
        () = idle_expired => {
            tracing::debug!("idle timeout, closing");
            Ok(false)
        }
        () = drained => Ok(false),
        () = ctx.close.cancelled() => Ok(false),
    }
}

async fn close(io: &mut Transport) {
    if let Err(e) = tokio::time::timeout(SHUTDOWN_GRACE, io.shutdown()).await.unwrap_or(Ok(())) {
        tracing::debug!(error = %e, "shutting the connection down failed");
    }
}
