//! Listeners: sockets (socket2; `IP_TRANSPARENT` for TPROXY capture), one accept loop per listener, and the
//! per-connection pipeline: original destination, workload identification by source address and packet mark,
//! fairness admission, TLS termination, handler selection, L4 authorization, then TCP or HTTP.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::authz::PeerInfo;
use crate::fairness::{ConnectionPermit, Fairness};
use crate::ktls::{Gate, Handover};
use crate::metrics::{Metrics, WorkloadLabels};
use crate::model::{Destination, Handler, SpiffeId};
use crate::snapshot::{ListenerConfig, Snapshot, SourceSnapshot, Workload};
use crate::{http, tcp};

/// A connection accepted this long before its listener began draining is still served: its first request (an
/// HTTP/2 client's preface and first streams) gets in before the connection closes or gets its GOAWAY.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(250);
/// A TLS handshake must finish within this when the listener sets no header timeout.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the drain deadline, connection tasks get this long to record their end before they are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Byte stream of an accepted connection, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("transparent listener {address}: cannot set IP_TRANSPARENT (needs CAP_NET_ADMIN and a kernel with TPROXY)")]
    Transparent {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Why a connection was refused before any handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source address belongs to a workload but the connection entered through another port.
    PortMismatch,
    /// A transparent listener only carries traffic of known workloads.
    UnknownSource,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PortMismatch => "port_mismatch",
            Refusal::UnknownSource => "unknown_source",
        }
    }
}

/// What every connection task shares with the proxy.
#[derive(Debug)]
pub struct Runtime {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub fairness: Arc<Fairness>,
}

/// One accepted connection as handlers see it.
#[derive(Debug)]
pub struct ConnContext {
    pub runtime: Arc<Runtime>,
    pub listener: Arc<ListenerConfig>,
    /// The listener's source as of accept; handlers prefer the current snapshot and fall back to this.
    pub source: Arc<SourceSnapshot>,
    pub peer: SocketAddr,
    /// The original destination (the local address; TPROXY keeps the address the client dialled).
    pub local: SocketAddr,
    pub workload: Option<Arc<Workload>>,
    pub destination_workload: Option<Arc<Workload>>,
    /// SPIFFE ID of the client certificate when TLS verified one.
    pub peer_identity: Option<SpiffeId>,
    pub tls: bool,
    /// Cancelled when draining starts (HTTP: GOAWAY / `Connection: close`).
    pub graceful: CancellationToken,
    /// Cancelled at the drain deadline: everything still open closes.
    pub close: CancellationToken,
}

impl ConnContext {
    /// The source principal: the peer certificate's SPIFFE ID under mTLS, else the workload's identity.
    pub fn principal(&self) -> Option<&SpiffeId> {
        self.peer_identity.as_ref().or_else(|| self.workload.as_ref().map(|w| &w.spec.identity))
    }

    pub fn peer_info(&self) -> PeerInfo<'_> {
        PeerInfo { principal: self.principal(), source: self.peer.ip(), destination_port: self.local.port() }
    }

    /// Istio `reporter`: `source` for captured outbound traffic, `destination` for inbound/explicit listeners.
    pub fn reporter(&self) -> &'static str {
        if self.listener.spec.transparent { "source" } else { "destination" }
    }

    pub fn security_policy(&self) -> &'static str {
        if self.peer_identity.is_some() { "mutual_tls" } else { "none" }
    }

    pub fn source_workload(&self) -> (String, String) {
        match &self.workload {
            Some(w) => (w.name().to_string(), w.namespace().to_string()),
            None => ("unknown".into(), "unknown".into()),
        }
    }

    pub fn destination_workload_name(&self) -> String {
        self.destination_workload.as_ref().map_or_else(|| "unknown".to_string(), |w| w.name().to_string())
    }
}

/// A running listener: its accept loop and the connections it spawned.
#[derive(Debug)]
pub struct ListenerHandle {
    pub address: SocketAddr,
    pub transparent: bool,
    stop: Option<oneshot::Sender<Duration>>,
    stopped: Option<oneshot::Receiver<()>>,
    task: JoinHandle<()>,
    /// Lists the socket for a hand-over to the next agent process while it is served.
    _registration: Option<dpu_intent::listen::Registration>,
}

impl ListenerHandle {
    /// Stops accepting (the socket is closed when this returns) and drains the listener's connections for at most
    /// `grace` in the background. The returned handle finishes when the last connection is gone.
    pub async fn drain(mut self, grace: Duration) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.await;
        }
        self.task
    }
}

/// Binds `address` (SO_REUSEADDR; IP_TRANSPARENT / IPV6_TRANSPARENT when `transparent`) and listens, or takes
/// the socket the previous agent process listened on there (an upgrade: its queued connections carry over).
pub fn bind(address: SocketAddr, transparent: bool) -> Result<TcpListener, BindError> {
    let bind_err = |source| BindError::Bind { address, source };
    let (socket, inherited) = match dpu_intent::listen::take(address) {
        Some(listener) => (Socket::from(std::os::fd::OwnedFd::from(listener)), true),
        None => {
            (Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP)).map_err(bind_err)?, false)
        }
    };
    if !inherited {
        socket.set_reuse_address(true).map_err(bind_err)?;
    }
    // Set on an inherited socket too: the option may have changed with the configuration.
    if transparent || inherited {
        let r = if address.is_ipv4() {
            socket.set_ip_transparent_v4(transparent)
        } else {
            socket.set_ip_transparent_v6(transparent)
        };
        r.map_err(|source| BindError::Transparent { address, source })?;
    }
    socket.set_nonblocking(true).map_err(bind_err)?;
    if !inherited {
        socket.bind(&address.into()).map_err(bind_err)?;
        socket.listen(1024).map_err(bind_err)?;
    }
    TcpListener::from_std(socket.into()).map_err(bind_err)
}

/// Starts the accept loop of listener `source/id` on a bound socket.
pub fn spawn(
    runtime: Arc<Runtime>,
    source: String,
    id: String,
    transparent: bool,
    socket: TcpListener,
) -> ListenerHandle {
    let address = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let registration = dpu_intent::listen::register(&socket)
        .inspect_err(|e| tracing::warn!(%address, error = %e, "listener not listed for a hand-over"))
        .ok();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let span = tracing::info_span!("listener", source = %source, id = %id, %address);
    let task = tokio::spawn(accept_loop(runtime, source, id, socket, stop_rx, stopped_tx).instrument(span));
    ListenerHandle {
        address,
        transparent,
        stop: Some(stop_tx),
        stopped: Some(stopped_rx),
        task,
        _registration: registration,
    }
}

async fn accept_loop(
    runtime: Arc<Runtime>,
    source: String,
    id: String,
    socket: TcpListener,
    mut stop: oneshot::Receiver<Duration>,
    stopped: oneshot::Sender<()>,
) {
    let graceful = CancellationToken::new();
    let close = CancellationToken::new();
    let mut conns = JoinSet::new();
    let grace = loop {
        tokio::select! {
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("conn", %peer);
                    let task = connection(
                        runtime.clone(),
                        source.clone(),
                        id.clone(),
                        stream,
                        peer,
                        graceful.clone(),
                        close.clone(),
                    );
                    conns.spawn(task.instrument(span));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    drop(socket);
    let _ = stopped.send(());
    tracing::info!(
        connections = conns.len(),
        grace_ms = grace.as_millis() as u64,
        "listener stopped accepting, draining"
    );
    graceful.cancel();
    let drained = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(connections = conns.len(), "drain deadline reached, closing remaining connections");
        close.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, async { while conns.join_next().await.is_some() {} }).await;
        conns.abort_all();
    }
}

/// Identifies the workload behind a connection from its source address and the packet mark of the accepted
/// socket. `Ok(None)` is an anonymous source (explicit listeners only).
pub fn identify(
    index: &HashMap<IpAddr, Arc<Workload>>,
    transparent: bool,
    source: IpAddr,
    mark: u32,
) -> Result<Option<Arc<Workload>>, Refusal> {
    match index.get(&source.to_canonical()) {
        Some(w) if w.spec.port_mark == 0 || w.spec.port_mark == mark => Ok(Some(w.clone())),
        Some(_) => Err(Refusal::PortMismatch),
        None if transparent => Err(Refusal::UnknownSource),
        None => Ok(None),
    }
}

/// The handler for an original destination: the first destination whose prefix and port match, else the default.
pub fn select_handler<'a>(destinations: &'a [Destination], default: &'a Handler, dst: SocketAddr) -> &'a Handler {
    destinations
        .iter()
        .find(|d| (d.port == 0 || d.port == dst.port()) && d.prefix.is_none_or(|p| p.contains(dst.ip().to_canonical())))
        .map_or(default, |d| &d.handler)
}

async fn connection(
    runtime: Arc<Runtime>,
    source: String,
    id: String,
    stream: TcpStream,
    peer: SocketAddr,
    graceful: CancellationToken,
    close: CancellationToken,
) {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "connection gone before it was read");
            return;
        }
    };
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let mark = SockRef::from(&stream).mark().unwrap_or(0);
    let _ = stream.set_nodelay(true);
    let snapshot = runtime.snapshot.load_full();
    let (Some(src), Some(listener)) = (snapshot.sources.get(&source), snapshot.listener(&source, &id)) else {
        tracing::debug!("listener no longer configured, closing");
        return;
    };
    let workload = match identify(&snapshot.workloads_by_address, listener.spec.transparent, peer.ip(), mark) {
        Ok(w) => w,
        Err(refusal) => {
            let label = snapshot.workloads_by_address.get(&peer.ip()).map_or("unknown", |w| w.id.as_str());
            tracing::warn!(reason = refusal.reason(), mark, workload = label, "connection refused");
            runtime.metrics.rejected(label, refusal.reason());
            return;
        }
    };
    let _permit: Option<ActiveConnection> = match &workload {
        Some(w) => match runtime.fairness.admit_connection(&w.admission_key(), &w.spec.limits) {
            Ok(permit) => Some(ActiveConnection::new(permit, &runtime.metrics, &w.id)),
            Err(rejection) => {
                tracing::warn!(workload = %w.id, reason = rejection.reason(), "connection refused by admission");
                runtime.metrics.rejected(&w.id, rejection.reason());
                return;
            }
        },
        None => None,
    };
    let destination_workload = snapshot.workloads_by_address.get(&local.ip()).cloned();
    let handler = select_handler(&listener.spec.destinations, &listener.spec.default, local).clone();

    // Client-first protocols (HTTP, and TLS for anything) allocate their buffers only once the client has sent
    // something: a connection opened ahead of use costs a socket and this task, not a codec. Opaque TCP may be
    // server-first (SMTP, MySQL), so it is handed over at once.
    if listener.server_tls.is_some() || matches!(handler, Handler::Http { .. }) {
        let timeouts = listener.spec.timeouts;
        let wait = [timeouts.request_headers_ms, timeouts.idle_ms].into_iter().find(|ms| *ms > 0);
        let expiry = async {
            match wait {
                Some(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
                None => std::future::pending().await,
            }
        };
        // Draining closes a connection that has sent nothing, but not one accepted just now: during a hand-over
        // both processes accept on one socket, and a client that connected to the old one as it began draining
        // has its first request on the way.
        let accepted = tokio::time::Instant::now();
        let drained = async {
            graceful.cancelled().await;
            tokio::time::sleep_until(accepted + FIRST_REQUEST_GRACE).await;
        };
        tokio::select! {
            biased;
            ready = stream.readable() => {
                if ready.is_err() {
                    return;
                }
            }
            () = expiry => {
                tracing::debug!("client sent nothing in time, closing");
                return;
            }
            () = drained => return,
        }
    }
    let (io, peer_identity, alpn): (Box<dyn Io>, Option<SpiffeId>, Option<Vec<u8>>) = match &listener.server_tls {
        None => (Box::new(stream), None, None),
        Some(config) => {
            let timeout = match listener.spec.timeouts.request_headers_ms {
                0 => DEFAULT_HANDSHAKE_TIMEOUT,
                ms => Duration::from_millis(u64::from(ms)),
            };
            let kernel_tls = listener.spec.tls.as_ref().and_then(|t| t.kernel_tls);
            let gate = if kernel_tls.is_some() { Gate::closed(stream) } else { Gate::passthrough(stream) };
            // Boxed: the handshake state is large and lives only until the handshake is done.
            let accept = Box::pin(tokio_rustls::TlsAcceptor::from(config.clone()).accept(gate));
            match tokio::time::timeout(timeout, accept).await {
                Ok(Ok(tls_stream)) => {
                    let (_, conn) = tls_stream.get_ref();
                    let identity = conn.peer_certificates().and_then(crate::tls::peer_identity);
                    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                    let handover = crate::ktls::handover(tls_stream, kernel_tls);
                    crate::ktls::record("downstream", &listener.id, handover.engine(), handover.reason());
                    let io: Box<dyn Io> = match handover {
                        Handover::Kernel(s, _) => Box::new(s),
                        Handover::Userspace(s, _) => Box::new(s),
                        Handover::Closed(_) => return,
                    };
                    (io, identity, alpn)
                }
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!("TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let tls = listener.spec.tls.is_some();
    let ctx = Arc::new(ConnContext {
        runtime: runtime.clone(),
        listener: listener.clone(),
        source: src.clone(),
        peer,
        local,
        workload,
        destination_workload,
        peer_identity,
        tls,
        graceful,
        close,
    });
    drop(snapshot);

    match handler {
        Handler::Reject => tracing::debug!("destination rejected by configuration"),
        Handler::Tcp { cluster } => {
            if let Err(denied) = ctx.listener.authorizer.check_connection(&ctx.peer_info()) {
                tracing::info!(policy = %denied.policy, reason = %denied.reason, "connection denied by policy");
                return;
            }
            let live = ctx
                .runtime
                .snapshot
                .load()
                .sources
                .get(&ctx.listener.source)
                .and_then(|s| s.clusters.get(&cluster))
                .cloned();
            let Some(cluster) = live.or_else(|| ctx.source.clusters.get(&cluster).cloned()) else {
                tracing::warn!(cluster = %cluster, "cluster vanished, closing");
                return;
            };
            Box::pin(tcp::proxy(&ctx, io, tcp::Target::Cluster(cluster))).await;
        }
        Handler::Passthrough => {
            if let Err(denied) = ctx.listener.authorizer.check_connection(&ctx.peer_info()) {
                tracing::info!(policy = %denied.policy, reason = %denied.reason, "connection denied by policy");
                return;
            }
            Box::pin(tcp::proxy(&ctx, io, tcp::Target::OriginalDestination(local))).await;
        }
        Handler::Http { route_table, codec } => http::serve(ctx, io, route_table, codec, alpn).await,
    }
}

/// An admitted connection: holds the workload's slot and the active-connections gauge.
struct ActiveConnection {
    _permit: ConnectionPermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl ActiveConnection {
    fn new(permit: ConnectionPermit, metrics: &Metrics, workload: &str) -> ActiveConnection {
        let gauge =
            metrics.active_connections.get_or_create(&WorkloadLabels { workload: workload.to_string() }).clone();
        gauge.inc();
        ActiveConnection { _permit: permit, gauge }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Bytes and activity of a connection, shared between its I/O wrapper and its watchdogs.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    pub read: AtomicU64,
    pub written: AtomicU64,
    /// Requests in flight (HTTP); idle only counts while this is zero.
    pub in_flight: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        crate::poll::moved();
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long nothing moved.
    pub fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once the connection has been idle (no bytes, nothing in flight) for `idle`; never without one.
    pub async fn idle_expired(&self, idle: Option<Duration>) {
        let Some(idle) = idle else { return std::future::pending().await };
        loop {
            let quiet = self.idle_for();
            if quiet >= idle && self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            let wait = idle.saturating_sub(quiet).max(Duration::from_millis(50));
            tokio::time::sleep(wait).await;
        }
    }
}

/// An HTTP request in flight on a connection, from its head until its response ends: the connection does not
/// count as idle meanwhile, and under poll mode `in_flight` the workers poll ([`crate::poll`]).
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
    _polling: crate::poll::Request,
}

impl InFlight {
    pub fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { activity: activity.clone(), _polling: crate::poll::Request::start() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// Counts bytes and records activity on a stream.
    #[derive(Debug)]
    pub struct Metered<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> Metered<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Metered<T> {
        activity.touch();
        Metered { inner, activity }
    }
}

impl<T: AsyncRead> AsyncRead for Metered<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.activity.read.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Metered<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{WorkloadLimits, WorkloadSpec};

    fn index(mark: u32) -> HashMap<IpAddr, Arc<Workload>> {
        let spec = WorkloadSpec {
            port: "vf1".into(),
            port_mark: mark,
            addresses: vec!["10.0.0.5".parse().unwrap()],
            identity: SpiffeId::new("cluster.local", "ns", "web").unwrap(),
            certificate: String::new(),
            limits: WorkloadLimits::default(),
        };
        let w = Arc::new(Workload { id: "web".into(), source: "intent".into(), spec });
        HashMap::from([("10.0.0.5".parse().unwrap(), w)])
    }

    #[test]
    fn workloads_are_identified_by_address_and_mark() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(identify(&index(7), false, ip, 7).unwrap().unwrap().id, "web");
        assert_eq!(identify(&index(7), false, ip, 8).unwrap_err(), Refusal::PortMismatch);
        assert_eq!(identify(&index(0), true, ip, 8).unwrap().unwrap().id, "web");
        assert!(identify(&index(7), false, other, 0).unwrap().is_none());
        assert_eq!(identify(&index(7), true, other, 0).unwrap_err(), Refusal::UnknownSource);
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(identify(&index(7), false, mapped, 7).unwrap().unwrap().id, "web");
    }

    #[test]
    fn handlers_are_picked_by_destination() {
        let dests = vec![
            Destination { prefix: Some("10.96.0.0/12".parse().unwrap()), port: 80, handler: Handler::Reject },
            Destination { prefix: None, port: 443, handler: Handler::Passthrough },
        ];
        let default = Handler::Tcp { cluster: "c".into() };
        let pick = |a: &str| select_handler(&dests, &default, a.parse().unwrap()).clone();
        assert_eq!(pick("10.96.1.1:80"), Handler::Reject);
        assert_eq!(pick("10.1.1.1:80"), default);
        assert_eq!(pick("10.1.1.1:443"), Handler::Passthrough);
    }
}
