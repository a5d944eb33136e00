//! Opaque TCP: a connection proxied to a cluster endpoint or, for capture passthrough, to the destination the
//! client dialled. Bytes are copied both ways with half-close (a FIN from one side is passed on while the other
//! direction keeps flowing), the connection closes after the listener's idle timeout, and opened/closed/byte
//! metrics plus one access log line are recorded.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::UPSTREAM_MARK;
use crate::access_log::Entry;
use crate::cluster::{Cluster, LbContext};
use crate::listener::{Activity, ConnContext, Io, Metered};
use crate::metrics::TcpLabels;

/// Connect timeout for passthrough connections (clusters carry their own).
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An upstream stream and the endpoint it reached.
type Connected = (Box<dyn Io>, SocketAddr);

/// Where an opaque connection goes.
#[derive(Debug)]
pub enum Target {
    Cluster(Arc<Cluster>),
    /// Capture passthrough: the original destination, from the proxy's own address, marked [`UPSTREAM_MARK`].
    OriginalDestination(SocketAddr),
}

/// Proxies `downstream` to `target` until both directions are closed, the idle timeout passes, or the listener's
/// drain deadline is reached.
pub async fn proxy(ctx: &ConnContext, downstream: Box<dyn Io>, target: Target) {
    let started = Instant::now();
    let mut entry = Entry::new("TCP", SystemTime::now(), ctx.peer, ctx.local);
    let (source_workload, source_namespace) = ctx.source_workload();
    let labels = TcpLabels {
        reporter: ctx.reporter(),
        source_workload: source_workload.clone(),
        source_workload_namespace: source_namespace,
        source_principal: ctx.principal().map_or_else(|| "unknown".to_string(), ToString::to_string),
        destination_service: match &target {
            Target::Cluster(c) => c.id().to_string(),
            Target::OriginalDestination(a) => a.to_string(),
        },
        destination_workload: ctx.destination_workload_name(),
        connection_security_policy: ctx.security_policy(),
    };
    entry.listener = ctx.listener.id.clone();
    entry.source_workload = source_workload;
    entry.source_principal = labels.source_principal.clone();
    entry.destination_workload = labels.destination_workload.clone();
    entry.cluster = match &target {
        Target::Cluster(c) => c.id().to_string(),
        Target::OriginalDestination(_) => "passthrough".to_string(),
    };
    let metrics = &ctx.runtime.metrics;
    metrics.tcp_opened.get_or_create(&labels).inc();

    let upstream: Result<Connected, (&'static str, String)> = match &target {
        Target::Cluster(cluster) => {
            let lb = LbContext { source: ctx.peer.ip(), headers: None };
            match cluster.connect(&lb).await {
                Ok(stream) => {
                    let endpoint = stream.endpoint();
                    Ok((Box::new(stream), endpoint))
                }
                Err(e) => Err((e.response_flag(), e.to_string())),
            }
        }
        Target::OriginalDestination(dst) => match connect_marked(*dst).await {
            Ok(stream) => Ok((Box::new(stream), *dst)),
            Err(e) => Err(("UF", format!("connect to {dst} failed: {e}"))),
        },
    };
    let activity = Arc::new(Activity::default());
    match upstream {
        Err((flag, message)) => {
            tracing::info!(error = %message, "upstream connect failed, closing downstream");
            entry.response_flags = flag.to_string();
        }
        Ok((upstream, endpoint)) => {
            entry.upstream_endpoint = endpoint.to_string();
            let mut down = Metered::new(downstream, activity.clone());
            let mut up = upstream;
            let idle = match ctx.listener.spec.timeouts.idle_ms {
                0 => None,
                ms => Some(Duration::from_millis(u64::from(ms))),
            };
            let idle_expired = activity.idle_expired(idle);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "TCP proxying ended with an error");
                    }
                }
                () = idle_expired => tracing::debug!("idle timeout, closing"),
                () = ctx.close.cancelled() => tracing::debug!("listener drain deadline, closing"),
            }
        }
    }
    // Downstream perspective: received = read from the client, sent = written to it.
    let received = activity.read.load(Ordering::Relaxed);
    let sent = activity.written.load(Ordering::Relaxed);
    metrics.tcp_received_bytes.get_or_create(&labels).inc_by(received);
    metrics.tcp_sent_bytes.get_or_create(&labels).inc_by(sent);
    metrics.tcp_closed.get_or_create(&labels).inc();
    entry.bytes_received = received;
    entry.bytes_sent = sent;
    entry.duration_ms = started.elapsed().as_millis() as u64;
    if entry.response_flags.is_empty() {
        entry.response_flags = "-".to_string();
    }
    entry.emit();
}

/// Connects to `dst` from the proxy's own address with `SO_MARK = UPSTREAM_MARK`, so capture rules skip it.
pub async fn connect_marked(dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(UPSTREAM_MARK)?;
    socket.set_nonblocking(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
