//! Kernel TLS: a TLS session whose handshake ran in userspace hands its record layer to the kernel (the `tls`
//! upper-layer protocol), which then encrypts on `write` and decrypts on `read` — in software, or on the NIC when
//! the egress device offers `tls-hw-tx-offload`. The kernel chooses between those two without telling the
//! caller, so [`ulp_info`] asks it afterwards through `sock_diag` (`INET_DIAG_ULP_INFO`, what `ss -ti` prints).
//!
//! Everything here is a thin, checked layer over the socket options and messages of `linux/tls.h` and
//! `linux/inet_diag.h`; the TLS handshake and the async stream live with their users. Parsers of bytes the
//! network or the kernel sends ([`post_handshake`], [`alert`], [`parse_diag_reply`]) never panic.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use zeroize::Zeroize;

/// TLS record content types (RFC 8446 §5.1).
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// The protocol version of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    fn wire(self) -> u16 {
        match self {
            Self::Tls12 => 0x0303,
            Self::Tls13 => 0x0304,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "TLS1.2",
            Self::Tls13 => "TLS1.3",
        }
    }
}

/// The AEADs the kernel's TLS implementation takes (of those a TLS 1.2/1.3 handshake here negotiates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    AesGcm128,
    AesGcm256,
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [Cipher::AesGcm128, Cipher::AesGcm256, Cipher::Chacha20Poly1305];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AesGcm128 => "aes-gcm-128",
            Self::AesGcm256 => "aes-gcm-256",
            Self::Chacha20Poly1305 => "chacha20-poly1305",
        }
    }

    fn key_len(self) -> usize {
        match self {
            Self::AesGcm128 => 16,
            Self::AesGcm256 | Self::Chacha20Poly1305 => 32,
        }
    }

    /// The kernel's cipher number (`TLS_CIPHER_*`).
    fn kernel_id(self) -> u16 {
        match self {
            Self::AesGcm128 => 51,
            Self::AesGcm256 => 52,
            Self::Chacha20Poly1305 => 54,
        }
    }

    fn from_kernel_id(id: u16) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.kernel_id() == id)
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A direction of the record layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Transmit,
    Receive,
}

/// One direction's traffic keys as the handshake left them: the AEAD key, the 12-byte IV (for TLS 1.2 GCM the
/// 4-byte salt followed by the 8 bytes the kernel takes as its IV) and the next record sequence number.
pub struct TrafficKeys<'a> {
    pub key: &'a [u8],
    pub iv: &'a [u8],
    pub seq: u64,
}

impl fmt::Debug for TrafficKeys<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrafficKeys")
            .field("key", &"<redacted>")
            .field("iv", &"<redacted>")
            .field("seq", &self.seq)
            .finish()
    }
}

/// Attaches the `tls` upper-layer protocol to a connected TCP socket. Until [`install`] sets a direction, the
/// socket carries bytes unchanged, so a caller that stops here can go on with userspace TLS.
pub fn attach(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpUlp::default(), b"tls").map_err(io::Error::from)
}

/// Hands one direction of the record layer to the kernel. The copies of the key made for the system call are
/// cleared before returning.
pub fn install(
    fd: BorrowedFd<'_>,
    direction: Direction,
    version: Version,
    cipher: Cipher,
    keys: &TrafficKeys<'_>,
) -> io::Result<()> {
    use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TlsCryptoInfo};
    if keys.key.len() != cipher.key_len() || keys.iv.len() != 12 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{cipher} takes a {}-byte key and a 12-byte IV, got {} and {}",
                cipher.key_len(),
                keys.key.len(),
                keys.iv.len()
            ),
        ));
    }
    let info = libc::tls_crypto_info { version: version.wire(), cipher_type: cipher.kernel_id() };
    let rec_seq = keys.seq.to_be_bytes();
    let mut value = match cipher {
        Cipher::AesGcm128 => {
            let mut c = libc::tls12_crypto_info_aes_gcm_128 { info, iv: [0; 8], key: [0; 16], salt: [0; 4], rec_seq };
            c.salt.copy_from_slice(&keys.iv[..4]);
            c.iv.copy_from_slice(&keys.iv[4..]);
            c.key.copy_from_slice(keys.key);
            TlsCryptoInfo::Aes128Gcm(c)
        }
        Cipher::AesGcm256 => {
            let mut c = libc::tls12_crypto_info_aes_gcm_256 { info, iv: [0; 8], key: [0; 32], salt: [0; 4], rec_seq };
            c.salt.copy_from_slice(&keys.iv[..4]);
            c.iv.copy_from_slice(&keys.iv[4..]);
            c.key.copy_from_slice(keys.key);
            TlsCryptoInfo::Aes256Gcm(c)
        }
        Cipher::Chacha20Poly1305 => {
            let mut c =
                libc::tls12_crypto_info_chacha20_poly1305 { info, iv: [0; 12], key: [0; 32], salt: [], rec_seq };
            c.iv.copy_from_slice(keys.iv);
            c.key.copy_from_slice(keys.key);
            TlsCryptoInfo::Chacha20Poly1305(c)
        }
    };
    let result = match direction {
        Direction::Transmit => nix::sys::socket::setsockopt(&fd, TcpTlsTx, &value),
        Direction::Receive => nix::sys::socket::setsockopt(&fd, TcpTlsRx, &value),
    };
    match &mut value {
        TlsCryptoInfo::Aes128Gcm(c) => (c.key.zeroize(), c.iv.zeroize(), c.salt.zeroize()),
        TlsCryptoInfo::Aes256Gcm(c) => (c.key.zeroize(), c.iv.zeroize(), c.salt.zeroize()),
        TlsCryptoInfo::Chacha20Poly1305(c) => (c.key.zeroize(), c.iv.zeroize(), ()),
    };
    result.map_err(io::Error::from)
}

/// Reads from a kTLS receive socket: the bytes of one or more records of the same content type, and that type.
/// Data records come without a control message; anything else (alerts, post-handshake messages) comes alone,
/// tagged, and only because room for the tag is given (without it the kernel fails the read with EIO).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u8)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, TlsGetRecordType};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(u8);
    let msg = nix::sys::socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let mut content = CONTENT_APPLICATION_DATA;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::TlsGetRecordType(t) = cmsg {
            content = match t {
                TlsGetRecordType::ChangeCipherSpec => CONTENT_CHANGE_CIPHER_SPEC,
                TlsGetRecordType::Alert => CONTENT_ALERT,
                TlsGetRecordType::Handshake => CONTENT_HANDSHAKE,
                TlsGetRecordType::ApplicationData => CONTENT_APPLICATION_DATA,
                TlsGetRecordType::Unknown(other) => other,
                // A type this nix does not know yet: treat as an unexpected record, never as data.
                _ => 0,
            };
        }
    }
    Ok((msg.bytes, content))
}

/// Sends one record of a content type other than data (an alert, say) on a kTLS transmit socket.
pub fn send_record(fd: BorrowedFd<'_>, content: u8, payload: &[u8]) -> io::Result<usize> {
    // nix has no typed control message for TLS_SET_RECORD_TYPE: build the one-byte cmsg by hand.
    #[repr(C)]
    struct Control {
        header: libc::cmsghdr,
        data: [u8; 8],
    }
    // SAFETY: cmsghdr is plain data; all-zero is a valid value.
    let mut control: Control = unsafe { std::mem::zeroed() };
    // SAFETY: CMSG_LEN only computes a length.
    let len = unsafe { libc::CMSG_LEN(1) };
    control.header.cmsg_len = len as _;
    control.header.cmsg_level = libc::SOL_TLS;
    control.header.cmsg_type = libc::TLS_SET_RECORD_TYPE;
    control.data[0] = content;
    let mut iov = libc::iovec { iov_base: payload.as_ptr().cast_mut().cast(), iov_len: payload.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&mut control as *mut Control).cast();
    // SAFETY: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(1) };
    msg.msg_controllen = space as _;
    // SAFETY: msg points at an iovec over `payload` and a control buffer that outlive the call.
    let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) }
}

/// A TLS alert (RFC 8446 §6): level and description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alert {
    pub level: u8,
    pub description: u8,
}

impl Alert {
    pub const CLOSE_NOTIFY: Alert = Alert { level: 1, description: 0 };

    pub fn is_close_notify(self) -> bool {
        self.description == 0
    }
}

/// Parses the payload of an alert record: exactly two bytes.
pub fn alert(payload: &[u8]) -> Option<Alert> {
    match payload {
        [level, description] => Some(Alert { level: *level, description: *description }),
        _ => None,
    }
}

/// What handshake bytes received after the handshake ask of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostHandshake {
    /// Only session tickets: nothing to do (the proxy does not resume sessions).
    Ignore,
    /// A message is cut short; this many more bytes are needed.
    Incomplete(usize),
    /// The peer changed its traffic keys (TLS 1.3 KeyUpdate); a kernel without rekey support cannot follow.
    KeyUpdate,
    /// A handshake message that has no place after the handshake here (renegotiation, certificate request …).
    Unexpected(u8),
}

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Classifies post-handshake messages (type, 24-bit length, body; several may share a record, one may span
/// records). The first message that needs action decides.
pub fn post_handshake(mut bytes: &[u8]) -> PostHandshake {
    while !bytes.is_empty() {
        let Some(header) = bytes.get(..4) else { return PostHandshake::Incomplete(4 - bytes.len()) };
        let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
        match header[0] {
            HANDSHAKE_NEW_SESSION_TICKET => {}
            HANDSHAKE_KEY_UPDATE => return PostHandshake::KeyUpdate,
            other => return PostHandshake::Unexpected(other),
        }
        let Some(rest) = bytes.get(4 + len..) else { return PostHandshake::Incomplete(4 + len - bytes.len()) };
        bytes = rest;
    }
    PostHandshake::Ignore
}

/// Who does a direction's record crypto, as the kernel reports it (`TLS_CONF_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conf {
    /// Not handed to the kernel.
    Base,
    /// The kernel, on the CPU.
    Software,
    /// The NIC (crypto offload; the kernel frames records).
    Hardware,
    /// The NIC frames and encrypts whole records.
    HardwareRecord,
    Unknown(u16),
}

impl Conf {
    fn from_kernel(v: u16) -> Conf {
        match v {
            1 => Conf::Base,
            2 => Conf::Software,
            3 => Conf::Hardware,
            4 => Conf::HardwareRecord,
            other => Conf::Unknown(other),
        }
    }

    pub fn is_hardware(self) -> bool {
        matches!(self, Conf::Hardware | Conf::HardwareRecord)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Conf::Base => "base",
            Conf::Software => "sw",
            Conf::Hardware => "hw",
            Conf::HardwareRecord => "hw-record",
            Conf::Unknown(_) => "unknown",
        }
    }
}

/// The kernel's account of a socket's TLS upper-layer protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UlpInfo {
    pub version: u16,
    pub cipher: Option<Cipher>,
    pub tx: Conf,
    pub rx: Conf,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const INET_DIAG_INFO: u8 = 2;
const INET_DIAG_ULP_INFO: u16 = 19;
const INET_ULP_INFO_NAME: u16 = 1;
const INET_ULP_INFO_TLS: u16 = 2;
const TLS_INFO_VERSION: u16 = 1;
const TLS_INFO_CIPHER: u16 = 2;
const TLS_INFO_TXCONF: u16 = 3;
const TLS_INFO_RXCONF: u16 = 4;
/// struct inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode.
const INET_DIAG_MSG_LEN: usize = 72;

/// Asks the kernel (sock_diag, one exact lookup by address pair) what its TLS layer does for the TCP socket
/// from `local` to `peer`. `Ok(None)`: the socket has no TLS upper-layer protocol.
pub fn ulp_info(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<UlpInfo>> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let request = diag_request(local, peer);
    // SAFETY: the buffer is valid for its length; the kernel address is the zeroed default (pid 0).
    let sent = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = vec![0u8; 8192];
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return parse_diag_reply(&reply[..n as usize]).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => io::Error::new(
                io::ErrorKind::NotFound,
                "sock_diag: no such socket, or no TCP handler (the tcp_diag module is not loaded)",
            ),
            _ => e,
        });
    }
}

fn diag_request(local: SocketAddr, peer: SocketAddr) -> Vec<u8> {
    let family = match local {
        SocketAddr::V4(_) => libc::AF_INET as u8,
        SocketAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&72u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 1 << (INET_DIAG_INFO - 1), 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&peer.port().to_be_bytes());
    for addr in [local, peer] {
        let mut bytes = [0u8; 16];
        match addr {
            SocketAddr::V4(a) => bytes[..4].copy_from_slice(&a.ip().octets()),
            SocketAddr::V6(a) => bytes = a.ip().octets(),
        }
        m.extend_from_slice(&bytes);
    }
    m.extend_from_slice(&0u32.to_ne_bytes()); // interface: any
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m
}

/// A reply the kernel should not have sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sock_diag reply: {0}")]
pub struct DiagError(pub String);

impl From<DiagError> for io::Error {
    fn from(e: DiagError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Netlink attributes (length, type, payload, padded to 4) as (type without flags, payload).
fn attributes(mut b: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), DiagError>> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(ne_u16(b, 0)?);
        let kind = ne_u16(b, 2)? & 0x3fff;
        if len < 4 || len > b.len() {
            b = &[];
            return Some(Err(DiagError(format!("attribute {kind} claims {len} bytes"))));
        }
        let payload = &b[4..len];
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some(Ok((kind, payload)))
    })
}

/// Parses the answer to [`ulp_info`]'s request: one `inet_diag_msg` with attributes, or a netlink error.
pub fn parse_diag_reply(b: &[u8]) -> io::Result<Option<UlpInfo>> {
    let len = ne_u32(b, 0).ok_or_else(|| DiagError("shorter than a netlink header".into()))? as usize;
    let kind = ne_u16(b, 4).unwrap_or_default();
    if len < 16 || len > b.len() {
        return Err(DiagError(format!("message length {len} with {} bytes received", b.len())).into());
    }
    let body = &b[16..len];
    match kind {
        NLMSG_ERROR => {
            let errno = ne_u32(body, 0).ok_or_else(|| DiagError("truncated error".into()))? as i32;
            return Err(match errno.checked_neg() {
                Some(e) if e > 0 => io::Error::from_raw_os_error(e),
                _ => DiagError(format!("netlink error code {errno}")).into(),
            });
        }
        NLMSG_DONE => return Err(io::Error::new(io::ErrorKind::NotFound, "sock_diag: no such socket")),
        SOCK_DIAG_BY_FAMILY => {}
        other => return Err(DiagError(format!("unexpected message type {other}")).into()),
    }
    let attrs = body.get(INET_DIAG_MSG_LEN..).ok_or_else(|| DiagError("truncated inet_diag_msg".into()))?;
    for attr in attributes(attrs) {
        let (kind, payload) = attr?;
        if kind != INET_DIAG_ULP_INFO {
            continue;
        }
        let mut name = &[][..];
        let mut tls = None;
        for inner in attributes(payload) {
            match inner? {
                (INET_ULP_INFO_NAME, v) => name = v,
                (INET_ULP_INFO_TLS, v) => tls = Some(v),
                _ => {}
            }
        }
        if name.split(|b| *b == 0).next() != Some(b"tls") {
            return Ok(None);
        }
        let mut info = UlpInfo { version: 0, cipher: None, tx: Conf::Base, rx: Conf::Base };
        for inner in attributes(tls.unwrap_or_default()) {
            let (kind, v) = inner?;
            let value = ne_u16(v, 0);
            match (kind, value) {
                (TLS_INFO_VERSION, Some(x)) => info.version = x,
                (TLS_INFO_CIPHER, Some(x)) => info.cipher = Cipher::from_kernel_id(x),
                (TLS_INFO_TXCONF, Some(x)) => info.tx = Conf::from_kernel(x),
                (TLS_INFO_RXCONF, Some(x)) => info.rx = Conf::from_kernel(x),
                _ => {}
            }
        }
        return Ok(Some(info));
    }
    Ok(None)
}

/// What the running kernel's TLS layer accepts, found by exercising it once on loopback connections.
#[derive(Debug, Clone)]
pub struct KernelSupport {
    /// `Err`: why no socket here can use kernel TLS.
    pub ulp: Result<(), String>,
    /// Per version and cipher: accepted for transmit and receive, or the kernel's refusal.
    pub ciphers: Vec<(Version, Cipher, Result<(), String>)>,
}

impl KernelSupport {
    /// Whether a session of `version` and `cipher` can be handed over; `Err` says why not.
    pub fn check(&self, version: Version, cipher: Cipher) -> Result<(), String> {
        self.ulp.clone()?;
        match self.ciphers.iter().find(|(v, c, _)| *v == version && *c == cipher) {
            Some((_, _, result)) => result.clone(),
            None => Err(format!("{} {cipher} was not probed", version.as_str())),
        }
    }
}

/// Probes the kernel: attaches the ULP to a loopback connection and installs each version and cipher with a
/// throwaway key in both directions. Blocking; a few system calls per combination.
pub fn probe() -> KernelSupport {
    let pair = || -> io::Result<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok((client, server))
    };
    let try_one = |version: Version, cipher: Cipher| -> Result<(), String> {
        let (client, _server) = pair().map_err(|e| format!("loopback connection: {e}"))?;
        attach(client.as_fd()).map_err(|e| format!("TCP_ULP \"tls\": {e}"))?;
        let key = vec![0u8; cipher.key_len()];
        let keys = TrafficKeys { key: &key, iv: &[0; 12], seq: 0 };
        for (direction, name) in [(Direction::Transmit, "TLS_TX"), (Direction::Receive, "TLS_RX")] {
            install(client.as_fd(), direction, version, cipher, &keys)
                .map_err(|e| format!("{name} {} {cipher}: {e}", version.as_str()))?;
        }
        Ok(())
    };
    let ulp = pair()
        .map_err(|e| format!("loopback connection: {e}"))
        .and_then(|(client, _server)| attach(client.as_fd()).map_err(|e| format!("TCP_ULP \"tls\": {e}")));
    let mut ciphers = Vec::new();
    for version in [Version::Tls12, Version::Tls13] {
        for cipher in Cipher::ALL {
            let result = match &ulp {
                Ok(()) => try_one(version, cipher),
                Err(e) => Err(e.clone()),
            };
            ciphers.push((version, cipher, result));
        }
    }
    KernelSupport { ulp, ciphers }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_handshake_messages() {
        let ticket = [4u8, 0, 0, 3, 1, 2, 3];
        assert_eq!(post_handshake(&ticket), PostHandshake::Ignore);
        assert_eq!(post_handshake(&[ticket, ticket].concat()), PostHandshake::Ignore);
        assert_eq!(post_handshake(&ticket[..5]), PostHandshake::Incomplete(2));
        assert_eq!(post_handshake(&ticket[..2]), PostHandshake::Incomplete(2));
        assert_eq!(post_handshake(&[24, 0, 0, 1, 0]), PostHandshake::KeyUpdate);
        assert_eq!(post_handshake(&[13, 0, 0, 0]), PostHandshake::Unexpected(13));
        assert_eq!(post_handshake(&[4, 0xff, 0xff, 0xff]), PostHandshake::Incomplete(0xff_ffff));
    }

    #[test]
    fn alerts() {
        assert_eq!(alert(&[1, 0]), Some(Alert::CLOSE_NOTIFY));
        assert!(alert(&[1, 0]).unwrap().is_close_notify());
        assert_eq!(alert(&[2, 40]), Some(Alert { level: 2, description: 40 }));
        assert_eq!(alert(&[1]), None);
        assert_eq!(alert(&[1, 0, 0]), None);
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn reply(attrs: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + INET_DIAG_MSG_LEN + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; INET_DIAG_MSG_LEN]);
        m.extend_from_slice(attrs);
        m
    }

    #[test]
    fn diag_reply_with_tls() {
        let tls = [
            attr(TLS_INFO_VERSION, &0x0304u16.to_ne_bytes()),
            attr(TLS_INFO_CIPHER, &52u16.to_ne_bytes()),
            attr(TLS_INFO_TXCONF, &3u16.to_ne_bytes()),
            attr(TLS_INFO_RXCONF, &2u16.to_ne_bytes()),
        ]
        .concat();
        let ulp = [attr(INET_ULP_INFO_NAME, b"tls\0"), attr(INET_ULP_INFO_TLS | 0x8000, &tls)].concat();
        let attrs = [attr(4, b"cubic\0"), attr(INET_DIAG_ULP_INFO | 0x8000, &ulp)].concat();
        let info = parse_diag_reply(&reply(&attrs)).unwrap().unwrap();
        assert_eq!(
            info,
            UlpInfo { version: 0x0304, cipher: Some(Cipher::AesGcm256), tx: Conf::Hardware, rx: Conf::Software }
        );
        assert!(info.tx.is_hardware() && !info.rx.is_hardware());
    }

    #[test]
    fn diag_reply_without_tls_and_errors() {
        assert_eq!(parse_diag_reply(&reply(&attr(4, b"cubic\0"))).unwrap(), None);
        let mptcp = attr(INET_DIAG_ULP_INFO, &attr(INET_ULP_INFO_NAME, b"mptcp\0"));
        assert_eq!(parse_diag_reply(&reply(&mptcp)).unwrap(), None);
        let mut error = Vec::new();
        error.extend_from_slice(&20u32.to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_diag_reply(&error).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(parse_diag_reply(&[1, 2, 3]).is_err());
        let mut odd = error.clone();
        odd[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(parse_diag_reply(&odd).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut bad = reply(&attr(INET_DIAG_ULP_INFO, b"xxxx"));
        let n = bad.len();
        bad[n - 8..n - 6].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse_diag_reply(&bad).is_err());
    }

    #[test]
    fn request_layout() {
        let local: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let peer: SocketAddr = "10.0.0.2:50000".parse().unwrap();
        let r = diag_request(local, peer);
        assert_eq!(r.len(), 72);
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(&r[24..26], &443u16.to_be_bytes());
        assert_eq!(&r[26..28], &50000u16.to_be_bytes());
        assert_eq!(&r[28..32], &[10, 0, 0, 1]);
        assert_eq!(&r[44..48], &[10, 0, 0, 2]);
    }

    #[test]
    fn install_checks_lengths_before_the_kernel() {
        let (a, _b) = {
            let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (a, l.accept().unwrap().0)
        };
        let keys = TrafficKeys { key: &[0; 16], iv: &[0; 12], seq: 0 };
        let e = install(a.as_fd(), Direction::Transmit, Version::Tls13, Cipher::AesGcm256, &keys).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("32-byte key"), "{e}");
        assert!(format!("{keys:?}").contains("key: \"<redacted>\""));
    }

    #[test]
    fn probe_reports_every_combination_with_a_reason() {
        let support = probe();
        assert_eq!(support.ciphers.len(), 6);
        match &support.ulp {
            // This machine's kernel may have no `tls` module: every combination then carries that reason.
            Err(e) => {
                assert!(e.contains("TCP_ULP"), "{e}");
                assert_eq!(support.check(Version::Tls13, Cipher::AesGcm128), Err(e.clone()));
            }
            Ok(()) => {
                for (v, c, r) in &support.ciphers {
                    if let Err(e) = r {
                        assert!(e.contains(c.as_str()) && e.contains(v.as_str()), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn ulp_info_of_a_plain_socket() {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _b = l.accept().unwrap();
        // A plain socket has no ULP: the kernel answers without INET_DIAG_ULP_INFO (or, in a sandbox without
        // NETLINK_SOCK_DIAG, the call fails — never a made-up answer).
        if let Ok(info) = ulp_info(a.local_addr().unwrap(), a.peer_addr().unwrap()) {
            assert_eq!(info, None);
        }
    }
}
