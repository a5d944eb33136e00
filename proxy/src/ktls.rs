//! Kernel TLS for mesh connections. A listener or cluster whose TLS settings carry `kernel_tls` runs the
//! handshake in rustls as usual, then hands the session's record layer to the kernel: the connection becomes a
//! [`KtlsStream`], a TCP socket whose `read`/`write` carry plaintext while the kernel (or the NIC, when the
//! egress device offers `tls-hw-tx-offload`) encrypts and decrypts records. Each connection's outcome — the
//! kernel in software or hardware as the kernel itself reports it (`sock_diag`), or userspace with the reason
//! it stayed there — is counted in `dpu_proxy_tls_connections_total`; nothing falls back silently.
//!
//! The hand-over must lose no byte. During the handshake the socket is read through a [`Gate`] that never
//! passes rustls more than the rest of the current record, so rustls holds only whole records when the
//! handshake ends; plaintext it already decrypted is handed over with the stream. A connection whose gate
//! stopped mid-record, or whose rustls still has records to send, stays in userspace.
//!
//! Limits: TLS 1.3 KeyUpdate from the peer cannot be followed (the kernel has no receive rekey before 6.13) and
//! fails the connection with that reason; session tickets are read and dropped (the proxy does not resume).

use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use dpu_crypto::ktls::{self as kernel, Cipher, Conf, Direction, KernelSupport, PostHandshake, TrafficKeys, Version};
use dpu_crypto::policy::Policy;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Labels of `dpu_proxy_tls_connections_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TlsLabels {
    /// `downstream` (a listener's) or `upstream` (a cluster's).
    pub side: &'static str,
    /// The listener or cluster.
    pub name: String,
    /// `rustls` (userspace), `ktls-sw`, `ktls-hw`, or `none` (refused or failed at hand-over).
    pub engine: &'static str,
    /// Why this engine; see [`Reason`].
    pub reason: &'static str,
}

/// TLS connections by where their records are encrypted, for every proxy in the process (registered by
/// [`crate::metrics::Metrics::register`]).
pub fn connections() -> &'static Family<TlsLabels, Counter> {
    static FAMILY: OnceLock<Family<TlsLabels, Counter>> = OnceLock::new();
    FAMILY.get_or_init(Family::default)
}

/// What the running kernel's TLS accepts, probed once per process on first use.
pub fn kernel_support() -> &'static KernelSupport {
    static SUPPORT: OnceLock<KernelSupport> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let support = kernel::probe();
        match &support.ulp {
            Ok(()) => tracing::info!(ciphers = ?accepted(&support), "kernel TLS available"),
            Err(e) => tracing::info!(reason = %e, "kernel TLS unavailable: kernel_tls connections stay in userspace"),
        }
        support
    })
}

/// What a `kernel_tls` setting comes to on this kernel, for the status of the listener or cluster that carries
/// it; where each connection's records went is counted per connection.
pub fn status_text(policy: Policy) -> String {
    let support = kernel_support();
    match (&support.ulp, policy) {
        (Err(e), Policy::RequireHardware) => {
            format!("kernel TLS (require-hardware) unavailable, connections are refused: {e}")
        }
        (Err(e), _) => format!("kernel TLS ({policy}) unavailable, connections stay in userspace TLS: {e}"),
        (Ok(()), _) => format!(
            "kernel TLS ({policy}) for {}; each connection's placement (software or NIC) and why: \
             dpu_proxy_tls_connections_total",
            accepted(support).join(", ")
        ),
    }
}

fn accepted(support: &KernelSupport) -> Vec<String> {
    support.ciphers.iter().filter(|(_, _, r)| r.is_ok()).map(|(v, c, _)| format!("{} {c}", v.as_str())).collect()
}

/// Why a connection's records are where they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `kernel_tls` is not set.
    NotRequested,
    /// The kernel has no TLS upper-layer protocol.
    NoKernelTls(String),
    /// The kernel refuses the negotiated version or cipher.
    Cipher(String),
    /// rustls held part of a record or unsent records at the end of the handshake.
    InFlight(&'static str),
    /// The kernel encrypts in software; `why` says why not the NIC.
    KernelSoftware(String),
    /// The NIC encrypts.
    KernelHardware,
    /// The kernel took the keys but did not say where it runs them.
    Unreported(String),
    /// `require-hardware` and the kernel did not offload.
    HardwareRequired(String),
    /// The kernel refused the keys after the session was handed over: the connection is lost.
    Failed(String),
}

impl Reason {
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NotRequested => "not_requested",
            Reason::NoKernelTls(_) => "no_kernel_tls",
            Reason::Cipher(_) => "cipher",
            Reason::InFlight(_) => "in_flight",
            Reason::KernelSoftware(_) => "no_offload",
            Reason::KernelHardware => "offloaded",
            Reason::Unreported(_) => "unreported",
            Reason::HardwareRequired(_) => "hardware_required",
            Reason::Failed(_) => "failed",
        }
    }

    pub fn text(&self) -> String {
        match self {
            Reason::NotRequested => "kernel TLS not requested".into(),
            Reason::NoKernelTls(e) => format!("the kernel has no TLS: {e}"),
            Reason::Cipher(e) => format!("the kernel refuses this session's cipher: {e}"),
            Reason::InFlight(what) => format!("{what} at the end of the handshake"),
            Reason::KernelSoftware(why) => format!("kernel TLS in software: {why}"),
            Reason::KernelHardware => "kernel TLS offloaded to the NIC".into(),
            Reason::Unreported(e) => format!("kernel TLS; the kernel did not report where: {e}"),
            Reason::HardwareRequired(why) => format!("require-hardware: {why}"),
            Reason::Failed(e) => format!("the kernel refused the session keys: {e}"),
        }
    }
}

/// Counts one connection's outcome and logs it.
pub fn record(side: &'static str, name: &str, engine: &'static str, reason: &Reason) {
    connections().get_or_create(&TlsLabels { side, name: name.to_owned(), engine, reason: reason.code() }).inc();
    match reason {
        Reason::Failed(_) | Reason::HardwareRequired(_) => {
            tracing::warn!(side, name, engine, reason = %reason.text(), "TLS connection closed at hand-over");
        }
        _ => tracing::debug!(side, name, engine, reason = %reason.text(), "TLS record layer placed"),
    }
}

/// The socket under a TLS handshake that may be handed to the kernel: reads stop at record boundaries until
/// [`Gate::open`], so rustls never holds part of a record the kernel would then miss.
#[derive(Debug)]
pub struct Gate {
    io: TcpStream,
    open: bool,
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Gate {
    /// A gate that holds reads to record boundaries.
    pub fn closed(io: TcpStream) -> Gate {
        Gate { io, open: false, header: [0; 5], header_len: 0, body_left: 0 }
    }

    /// A gate that passes reads through (the session stays in userspace).
    pub fn passthrough(io: TcpStream) -> Gate {
        Gate { open: true, ..Gate::closed(io) }
    }

    /// Passes reads through from now on.
    pub fn open(&mut self) {
        self.open = true;
    }

    /// No part of a record has been read past.
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }
}

impl AsyncRead for Gate {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.open {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let want = if this.header_len < 5 { 5 - this.header_len } else { this.body_left };
        let mut scratch = [0u8; 2048];
        let limit = want.min(buf.remaining()).min(scratch.len());
        let mut part = ReadBuf::new(&mut scratch[..limit]);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
        let got = part.filled();
        if this.header_len < 5 {
            this.header[this.header_len..this.header_len + got.len()].copy_from_slice(got);
            this.header_len += got.len();
            if this.header_len == 5 {
                this.body_left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
                if this.body_left == 0 {
                    this.header_len = 0;
                }
            }
        } else {
            this.body_left -= got.len();
            if this.body_left == 0 {
                this.header_len = 0;
            }
        }
        buf.put_slice(got);
        Poll::Ready(Ok(()))
    }
}

/// AsyncWrite by delegating every call but shutdown to the TcpStream in field `io`.
macro_rules! write_through {
    ($type:ty, |$this:ident, $cx:ident| $shutdown:block) => {
        impl AsyncWrite for $type {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, $cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let $this = self.get_mut();
                $shutdown
            }
        }
    };
}

write_through!(Gate, |this, cx| { Pin::new(&mut this.io).poll_shutdown(cx) });

/// Where a handshaken session went.
#[derive(Debug)]
pub enum Handover<S> {
    /// The kernel has the record layer.
    Kernel(KtlsStream, Reason),
    /// The session stays in userspace (its gate now open).
    Userspace(S, Reason),
    /// The connection cannot go on: the policy refused what the kernel did, or the kernel refused the keys.
    Closed(Reason),
}

impl<S> Handover<S> {
    /// The engine label of the outcome.
    pub fn engine(&self) -> &'static str {
        match self {
            Handover::Kernel(_, Reason::KernelHardware) => "ktls-hw",
            Handover::Kernel(..) => "ktls-sw",
            Handover::Userspace(..) => "rustls",
            Handover::Closed(_) => "none",
        }
    }

    pub fn reason(&self) -> &Reason {
        match self {
            Handover::Kernel(_, r) | Handover::Userspace(_, r) | Handover::Closed(r) => r,
        }
    }
}

fn session_params(common: &rustls::CommonState) -> Result<(Version, Cipher), Reason> {
    let version = match common.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => Version::Tls13,
        Some(ProtocolVersion::TLSv1_2) => Version::Tls12,
        other => return Err(Reason::Cipher(format!("protocol version {other:?}"))),
    };
    let suite = common.negotiated_cipher_suite().map(|s| s.suite());
    let cipher = match suite {
        Some(
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ) => Cipher::AesGcm128,
        Some(
            CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ) => Cipher::AesGcm256,
        Some(
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ) => Cipher::Chacha20Poly1305,
        other => return Err(Reason::Cipher(format!("cipher suite {other:?} has no kernel TLS equivalent"))),
    };
    kernel_support()
        .check(version, cipher)
        .map_err(|e| if kernel_support().ulp.is_err() { Reason::NoKernelTls(e) } else { Reason::Cipher(e) })?;
    Ok((version, cipher))
}

/// Decides whether a session can move to the kernel, and attaches the ULP when it can. Nothing is lost on
/// `Err`: the session goes on in userspace.
fn prepare(gate: &Gate, common: &rustls::CommonState) -> Result<(Version, Cipher), Reason> {
    let params = session_params(common)?;
    if !gate.at_boundary() {
        return Err(Reason::InFlight("part of a record was in flight"));
    }
    if common.wants_write() {
        return Err(Reason::InFlight("records were still queued to send"));
    }
    kernel::attach(gate.io.as_fd()).map_err(|e| Reason::NoKernelTls(format!("TCP_ULP \"tls\": {e}")))?;
    Ok(params)
}

/// A handshaken tokio-rustls stream over a [`Gate`], client or server side.
pub trait Session: Sized {
    fn gate(&self) -> &Gate;
    fn gate_mut(&mut self) -> &mut Gate;
    fn common(&self) -> &rustls::CommonState;
    fn into_parts(self) -> (Gate, rustls::Connection);
}

macro_rules! session {
    ($stream:ty, $variant:ident) => {
        impl Session for $stream {
            fn gate(&self) -> &Gate {
                self.get_ref().0
            }
            fn gate_mut(&mut self) -> &mut Gate {
                self.get_mut().0
            }
            fn common(&self) -> &rustls::CommonState {
                self.get_ref().1
            }
            fn into_parts(self) -> (Gate, rustls::Connection) {
                let (gate, conn) = self.into_inner();
                (gate, rustls::Connection::$variant(conn))
            }
        }
    };
}

session!(tokio_rustls::server::TlsStream<Gate>, Server);
session!(tokio_rustls::client::TlsStream<Gate>, Client);

/// Hands a handshaken session to the kernel under `policy`, or keeps it in userspace with the reason.
pub fn handover<S: Session>(mut tls: S, policy: Option<Policy>) -> Handover<S> {
    let Some(policy) = policy else {
        tls.gate_mut().open();
        return Handover::Userspace(tls, Reason::NotRequested);
    };
    match prepare(tls.gate(), tls.common()) {
        Err(reason) if policy == Policy::RequireHardware => Handover::Closed(Reason::HardwareRequired(reason.text())),
        Err(reason) => {
            tls.gate_mut().open();
            Handover::Userspace(tls, reason)
        }
        Ok(params) => {
            let (gate, conn) = tls.into_parts();
            finish(gate, conn, params, policy)
        }
    }
}

fn finish<S>(gate: Gate, mut conn: rustls::Connection, params: (Version, Cipher), policy: Policy) -> Handover<S> {
    let (version, cipher) = params;
    // Plaintext rustls decrypted from whole records after the handshake (a request sent right behind the
    // client's Finished) is served before the socket.
    let mut prefix = Vec::new();
    let mut peer_closed = false;
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => {
                peer_closed = true;
                break;
            }
            Ok(n) => prefix.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Handover::Closed(Reason::Failed(format!("reading buffered plaintext: {e}"))),
        }
    }
    let secrets = match conn.dangerous_extract_secrets() {
        Ok(s) => s,
        Err(e) => return Handover::Closed(Reason::Failed(format!("extracting the session keys: {e}"))),
    };
    let io = gate.io;
    for (direction, (seq, secret)) in [(Direction::Transmit, &secrets.tx), (Direction::Receive, &secrets.rx)] {
        let (key, iv) = match secret {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return Handover::Closed(Reason::Failed("an AEAD the kernel does not take".into())),
        };
        let keys = TrafficKeys { key, iv, seq: *seq };
        if let Err(e) = kernel::install(io.as_fd(), direction, version, cipher, &keys) {
            return Handover::Closed(Reason::Failed(format!("{direction:?}: {e}")));
        }
    }
    drop(secrets);
    tracing::debug!(version = version.as_str(), %cipher, "TLS session handed to the kernel");
    let reason = match (io.local_addr(), io.peer_addr()) {
        (Ok(local), Ok(peer)) => placement(local, peer, policy),
        (Err(e), _) | (_, Err(e)) => Reason::Unreported(e.to_string()),
    };
    if policy == Policy::RequireHardware && reason != Reason::KernelHardware {
        return Handover::Closed(Reason::HardwareRequired(reason.text()));
    }
    let stream =
        KtlsStream { io, prefix, prefix_at: 0, handshake: Vec::new(), read_closed: peer_closed, close_sent: false };
    Handover::Kernel(stream, reason)
}

/// Reads back from the kernel where it runs the connection's record crypto.
fn placement(local: SocketAddr, peer: SocketAddr, policy: Policy) -> Reason {
    match kernel::ulp_info(local, peer) {
        Ok(Some(info)) if info.tx.is_hardware() => Reason::KernelHardware,
        Ok(Some(info)) if info.tx == Conf::Software => Reason::KernelSoftware(match policy {
            Policy::Software => "software requested by policy".into(),
            _ => "the egress device did not take the session (no tls-hw-tx-offload)".into(),
        }),
        Ok(Some(info)) => Reason::Unreported(format!("transmit configuration {:?}", info.tx)),
        Ok(None) => Reason::Unreported("sock_diag shows no TLS on the socket".into()),
        Err(e) => Reason::Unreported(format!("sock_diag: {e}")),
    }
}

/// A TCP connection whose TLS records the kernel encrypts and decrypts.
#[derive(Debug)]
pub struct KtlsStream {
    io: TcpStream,
    /// Plaintext decrypted by rustls before the hand-over, served first.
    prefix: Vec<u8>,
    prefix_at: usize,
    /// Post-handshake handshake bytes of a message not yet complete.
    handshake: Vec<u8>,
    read_closed: bool,
    close_sent: bool,
}

/// Post-handshake messages larger than this are refused (a session ticket is a few hundred bytes).
const MAX_POST_HANDSHAKE: usize = 64 * 1024;

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl KtlsStream {
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }
}

impl AsyncRead for KtlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix_at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.prefix_at);
            buf.put_slice(&this.prefix[this.prefix_at..this.prefix_at + n]);
            this.prefix_at += n;
            if this.prefix_at == this.prefix.len() {
                this.prefix = Vec::new();
                this.prefix_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.read_closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let fd = this.io.as_fd();
            let (n, content) = match this.io.try_io(Interest::READABLE, || kernel::recv(fd, unfilled)) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            match content {
                kernel::CONTENT_APPLICATION_DATA => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                kernel::CONTENT_ALERT => match kernel::alert(&unfilled[..n]) {
                    Some(alert) if alert.is_close_notify() => {
                        this.read_closed = true;
                        return Poll::Ready(Ok(()));
                    }
                    Some(alert) => {
                        return Poll::Ready(Err(protocol_error(format!(
                            "the peer sent TLS alert {} (level {})",
                            alert.description, alert.level
                        ))));
                    }
                    None => return Poll::Ready(Err(protocol_error(format!("a malformed TLS alert of {n} bytes")))),
                },
                kernel::CONTENT_HANDSHAKE => {
                    this.handshake.extend_from_slice(&unfilled[..n]);
                    match kernel::post_handshake(&this.handshake) {
                        PostHandshake::Ignore => this.handshake.clear(),
                        PostHandshake::Incomplete(_) if this.handshake.len() <= MAX_POST_HANDSHAKE => {}
                        PostHandshake::Incomplete(need) => {
                            return Poll::Ready(Err(protocol_error(format!(
                                "a post-handshake message larger than {MAX_POST_HANDSHAKE} bytes ({need} more)"
                            ))));
                        }
                        PostHandshake::KeyUpdate => {
                            return Poll::Ready(Err(protocol_error(
                                "the peer updated its TLS keys (KeyUpdate), which kernel TLS here cannot follow".into(),
                            )));
                        }
                        PostHandshake::Unexpected(kind) => {
                            return Poll::Ready(Err(protocol_error(format!(
                                "unexpected post-handshake message type {kind}"
                            ))));
                        }
                    }
                }
                other => return Poll::Ready(Err(protocol_error(format!("unexpected TLS record type {other}")))),
            }
        }
    }
}

// Shutdown sends close_notify, then shuts the write side.
write_through!(KtlsStream, |this, cx| {
    while !this.close_sent {
        ready!(this.io.poll_write_ready(cx))?;
        let fd = this.io.as_fd();
        let alert = [kernel::Alert::CLOSE_NOTIFY.level, kernel::Alert::CLOSE_NOTIFY.description];
        match this.io.try_io(Interest::WRITABLE, || kernel::send_record(fd, kernel::CONTENT_ALERT, &alert)) {
            Ok(_) => this.close_sent = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The peer is gone: nothing to notify.
            Err(_) => this.close_sent = true,
        }
    }
    Pin::new(&mut this.io).poll_shutdown(cx)
});
