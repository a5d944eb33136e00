//! Opening upstream connections: a TCP socket marked with [`UPSTREAM_MARK`] (so the capture rules skip the proxy's
//! own traffic), `TCP_NODELAY`, a connect timeout, then TLS when the cluster has a client config.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::ktls::{Gate, Handover, KtlsStream};

use crate::UPSTREAM_MARK;

use super::UpstreamError;
use super::breaker::Slot;

/// Set once the missing `CAP_NET_ADMIN` has been reported, so the warning is not repeated per connection.
static MARK_DENIED_REPORTED: AtomicBool = AtomicBool::new(false);

/// Connects a TCP socket to `endpoint` within `timeout`.
pub(crate) async fn tcp(endpoint: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let failure = |source: io::Error| UpstreamError::ConnectFailure { endpoint, source };
    let socket = Socket::new(Domain::for_address(endpoint), Type::STREAM, Some(Protocol::TCP)).map_err(failure)?;
    set_mark(&socket);
    socket.set_tcp_nodelay(true).map_err(failure)?;
    socket.set_nonblocking(true).map_err(failure)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(timeout, socket.connect(endpoint)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(failure(source)),
        Err(_) => Err(UpstreamError::ConnectTimeout { endpoint }),
    }
}

#[cfg(target_os = "linux")]
fn set_mark(socket: &Socket) {
    match socket.set_mark(UPSTREAM_MARK) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            if !MARK_DENIED_REPORTED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    mark = UPSTREAM_MARK,
                    "setting SO_MARK on upstream sockets needs CAP_NET_ADMIN; connecting without the mark, so \
                     capture rules cannot tell the proxy's own traffic apart"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "setting SO_MARK on an upstream socket failed"),
    }
}

#[cfg(not(target_os = "linux"))]
fn set_mark(_socket: &Socket) {
    if !MARK_DENIED_REPORTED.swap(true, Ordering::Relaxed) {
        tracing::warn!("SO_MARK is not available on this platform; upstream sockets are not marked");
    }
}

/// Runs the TLS handshake within `timeout`. The server name is `sni` when set, otherwise the endpoint's IP address
/// (rustls sends no SNI for an address; the verifier checks the peer's identity, not a name). With `for_kernel`
/// the handshake reads whole records only, so the session can then move to the kernel ([`crate::ktls`]).
pub(crate) async fn tls(
    stream: TcpStream,
    endpoint: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
    timeout: Duration,
    for_kernel: bool,
) -> Result<TlsStream<Gate>, UpstreamError> {
    let stream = if for_kernel { Gate::closed(stream) } else { Gate::passthrough(stream) };
    let name = if sni.is_empty() {
        ServerName::IpAddress(endpoint.ip().into())
    } else {
        ServerName::try_from(sni.to_owned())
            .map_err(|e| UpstreamError::Tls { endpoint, message: format!("server name {sni:?} is invalid: {e}") })?
    };
    match tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, stream)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(UpstreamError::Tls { endpoint, message: e.to_string() }),
        Err(_) => Err(UpstreamError::Tls { endpoint, message: "the handshake timed out".into() }),
    }
}

/// An open upstream connection, plain or TLS. It holds the cluster's connection slot (and, for L4 streams, the
/// endpoint's active-request count) until dropped.
#[derive(Debug)]
pub struct UpstreamStream {
    endpoint: SocketAddr,
    io: Io,
    _connection: Option<Slot>,
    _active: Option<super::ActiveRequest>,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<Gate>>),
    /// Records in the kernel; the ALPN protocol the server selected.
    Kernel(Box<KtlsStream>, Option<Vec<u8>>),
}

impl UpstreamStream {
    pub(crate) fn plain(endpoint: SocketAddr, stream: TcpStream) -> UpstreamStream {
        UpstreamStream { endpoint, io: Io::Plain(stream), _connection: None, _active: None }
    }

    pub(crate) fn tls(endpoint: SocketAddr, stream: TlsStream<Gate>) -> UpstreamStream {
        UpstreamStream { endpoint, io: Io::Tls(Box::new(stream)), _connection: None, _active: None }
    }

    /// Runs the cluster's kernel TLS policy on a handshaken stream: the kernel takes the records, or they stay
    /// in userspace with the reason counted, or the connection is refused.
    pub(crate) fn handover(
        endpoint: SocketAddr,
        stream: TlsStream<Gate>,
        cluster: &str,
        policy: Option<dpu_crypto::policy::Policy>,
    ) -> Result<UpstreamStream, UpstreamError> {
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let handover = crate::ktls::handover(stream, policy);
        crate::ktls::record("upstream", cluster, handover.engine(), handover.reason());
        let io = match handover {
            Handover::Kernel(s, _) => Io::Kernel(Box::new(s), alpn),
            Handover::Userspace(s, _) => Io::Tls(Box::new(s)),
            Handover::Closed(reason) => return Err(UpstreamError::Tls { endpoint, message: reason.text() }),
        };
        Ok(UpstreamStream { endpoint, io, _connection: None, _active: None })
    }

    pub(crate) fn hold(mut self, connection: Option<Slot>, active: Option<super::ActiveRequest>) -> UpstreamStream {
        self._connection = connection;
        self._active = active;
        self
    }

    /// The endpoint this stream is connected to.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Whether the stream runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_) | Io::Kernel(..))
    }

    /// The ALPN protocol the server selected, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.io {
            Io::Plain(_) => None,
            Io::Tls(tls) => tls.get_ref().1.alpn_protocol(),
            Io::Kernel(_, alpn) => alpn.as_deref(),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Kernel(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Kernel(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Kernel(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::Kernel(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Kernel(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Kernel(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
