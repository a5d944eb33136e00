//! A blocking netlink socket (netlink-sys) with request/acknowledge and dump exchanges. Kernel refusals carry
//! the kernel's extended-ack message.

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer};
use netlink_sys::{Socket, SocketAddr};

use super::attr::{Attr, Attrs, emit_all};
use crate::FabricError;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const HEADER_LEN: usize = 16;

/// Builds one netlink message: header, then `payload`.
pub fn frame(message_type: u16, flags: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + payload.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&message_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(payload);
    out
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A data message: (type, payload).
    Data(u16, Vec<u8>),
    /// An acknowledgement (errno 0) or an error with the kernel's message.
    Ack { errno: i32, message: String },
    /// End of a dump.
    Done,
}

/// Splits a received datagram into messages of `sequence` (others are skipped).
pub fn parse_replies(datagram: &[u8], sequence: u32) -> Result<Vec<Reply>, FabricError> {
    Ok(parse_sequenced(datagram)?.into_iter().filter(|(seq, _)| *seq == sequence).map(|(_, r)| r).collect())
}

/// Splits a received datagram into its messages, each with its sequence number.
pub fn parse_sequenced(datagram: &[u8]) -> Result<Vec<(u32, Reply)>, FabricError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + HEADER_LEN <= datagram.len() {
        let buf = NetlinkBuffer::new_checked(&datagram[offset..])?;
        let len = buf.length() as usize;
        if len < HEADER_LEN {
            return Err(FabricError::Decode(format!("message length {len} is below the header size")));
        }
        let (kind, flags, seq) = (buf.message_type(), buf.flags(), buf.sequence_number());
        let payload = &datagram[offset + HEADER_LEN..offset + len];
        offset += (len + 3) & !3;
        let reply = match kind {
            NLMSG_DONE => Reply::Done,
            NLMSG_ERROR => parse_error(payload, flags)?,
            _ => Reply::Data(kind, payload.to_vec()),
        };
        out.push((seq, reply));
    }
    Ok(out)
}

fn parse_error(payload: &[u8], flags: u16) -> Result<Reply, FabricError> {
    let code = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| FabricError::Decode("error message shorter than its code".into()))?;
    let mut message = String::new();
    if flags & NLM_F_ACK_TLVS != 0 {
        // The request's header follows the code, with its payload unless the reply is capped.
        let echoed = payload
            .get(4..8)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| FabricError::Decode("error message without the request header".into()))?;
        let skip = 4usize.saturating_add(if flags & NLM_F_CAPPED != 0 { HEADER_LEN } else { echoed.max(HEADER_LEN) });
        if let Some(tlvs) = payload.get(skip..) {
            let attrs = Attrs::parse(tlvs)?;
            message = attrs.string(NLMSGERR_ATTR_MSG)?.unwrap_or_default();
        }
    }
    // Codes are negative errnos; a corrupt i32::MIN must not overflow.
    Ok(Reply::Ack { errno: code.saturating_neg(), message })
}

/// One request of a pipelined batch ([`NlSocket::pipeline`]).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub payload: &'a [u8],
}

/// Most requests sent before their acknowledgements are read: the kernel queues one acknowledgement per request
/// on the socket while it processes the datagram, and they must all fit the receive buffer.
pub const WINDOW: usize = 128;
/// Most bytes of requests in one datagram (well below the default socket send buffer).
const WINDOW_BYTES: usize = 64 * 1024;

/// A netlink socket of one protocol.
#[derive(Debug)]
pub struct NlSocket {
    socket: Socket,
    sequence: u32,
}

fn io(operation: &'static str) -> impl FnOnce(std::io::Error) -> FabricError {
    move |source| FabricError::Socket { operation, source }
}

impl NlSocket {
    /// Opens and binds a socket of `protocol` (`NETLINK_ROUTE` = 0, `NETLINK_GENERIC` = 16) with extended acks.
    pub fn open(protocol: isize) -> Result<Self, FabricError> {
        let mut socket = Socket::new(protocol).map_err(io("socket"))?;
        socket.bind_auto().map_err(io("bind"))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io("connect"))?;
        // Older kernels lack these options; requests still work, only without the kernel's messages.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_rx_buf_sz(4 << 20);
        Ok(Self { socket, sequence: 1 })
    }

    fn send(&mut self, message_type: u16, flags: u16, payload: &[u8]) -> Result<u32, FabricError> {
        self.sequence = self.sequence.wrapping_add(1).max(1);
        let message = frame(message_type, flags | NLM_F_REQUEST, self.sequence, payload);
        self.socket.send(&message, 0).map_err(io("send"))?;
        Ok(self.sequence)
    }

    fn receive(&self, sequence: u32) -> Result<Vec<Reply>, FabricError> {
        let (datagram, _) = self.socket.recv_from_full().map_err(io("receive"))?;
        parse_replies(&datagram, sequence)
    }

    /// Sends a request and waits for its acknowledgement; `what` names the request in errors.
    pub fn request(&mut self, message_type: u16, flags: u16, payload: &[u8], what: &str) -> Result<(), FabricError> {
        let sequence = self.send(message_type, flags | NLM_F_ACK, payload)?;
        loop {
            for reply in self.receive(sequence)? {
                if let Reply::Ack { errno, message } = reply {
                    return match errno {
                        0 => Ok(()),
                        _ => Err(refusal(what, errno, message)),
                    };
                }
            }
        }
    }

    /// Sends `requests` with acknowledgements requested, many per datagram (each with its own sequence number),
    /// and collects one result per request, in order. The kernel processes every request of a datagram even when
    /// an earlier one fails, so a refusal affects only its own request; `what(i)` names request `i` in errors.
    pub fn pipeline(
        &mut self,
        requests: &[Request<'_>],
        what: &dyn Fn(usize) -> String,
    ) -> Vec<Result<(), FabricError>> {
        let mut results: Vec<Option<Result<(), FabricError>>> = (0..requests.len()).map(|_| None).collect();
        let mut start = 0;
        while start < requests.len() {
            let mut datagram = Vec::new();
            let mut pending: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
            let mut end = start;
            while end < requests.len() && end - start < WINDOW {
                let r = &requests[end];
                if !datagram.is_empty() && datagram.len() + HEADER_LEN + r.payload.len() > WINDOW_BYTES {
                    break;
                }
                self.sequence = self.sequence.wrapping_add(1).max(1);
                datagram.extend(frame(r.message_type, r.flags | NLM_F_REQUEST | NLM_F_ACK, self.sequence, r.payload));
                pending.insert(self.sequence, end);
                end += 1;
            }
            let lost = |results: &mut Vec<Option<Result<(), FabricError>>>,
                        pending: &std::collections::HashMap<u32, usize>,
                        operation: &'static str,
                        e: &std::io::Error| {
                for i in pending.values() {
                    let source = std::io::Error::new(e.kind(), e.to_string());
                    results[*i] = Some(Err(FabricError::Socket { operation, source }));
                }
            };
            if let Err(e) = self.socket.send(&datagram, 0) {
                lost(&mut results, &pending, "send", &e);
                start = end;
                continue;
            }
            while !pending.is_empty() {
                let datagram = match self.socket.recv_from_full() {
                    Ok((d, _)) => d,
                    Err(e) => {
                        lost(&mut results, &pending, "receive", &e);
                        pending.clear();
                        break;
                    }
                };
                let replies = match parse_sequenced(&datagram) {
                    Ok(r) => r,
                    Err(e) => {
                        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
                        lost(&mut results, &pending, "receive", &e);
                        pending.clear();
                        break;
                    }
                };
                for (seq, reply) in replies {
                    if let Reply::Ack { errno, message } = reply
                        && let Some(i) = pending.remove(&seq)
                    {
                        results[i] = Some(if errno == 0 { Ok(()) } else { Err(refusal(&what(i), errno, message)) });
                    }
                }
            }
            start = end;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(FabricError::Decode("no acknowledgement".into()))))
            .collect()
    }

    /// Sends a dump request and collects the payloads of every data message.
    pub fn dump(&mut self, message_type: u16, payload: &[u8], what: &str) -> Result<Vec<Vec<u8>>, FabricError> {
        let sequence = self.send(message_type, NLM_F_DUMP, payload)?;
        let mut out = Vec::new();
        loop {
            for reply in self.receive(sequence)? {
                match reply {
                    Reply::Data(_, payload) => out.push(payload),
                    Reply::Done => return Ok(out),
                    Reply::Ack { errno: 0, .. } => {}
                    Reply::Ack { errno, message } => return Err(refusal(what, errno, message)),
                }
            }
        }
    }

    /// Sends a request and returns the payload of its one data reply (generic netlink `get`).
    pub fn query(&mut self, message_type: u16, payload: &[u8], what: &str) -> Result<Vec<u8>, FabricError> {
        let sequence = self.send(message_type, NLM_F_ACK, payload)?;
        let mut data = None;
        loop {
            for reply in self.receive(sequence)? {
                match reply {
                    Reply::Data(_, payload) => data = Some(payload),
                    Reply::Done => {}
                    Reply::Ack { errno: 0, .. } => {
                        return data.ok_or_else(|| FabricError::Decode(format!("no reply to {what}")));
                    }
                    Reply::Ack { errno, message } => return Err(refusal(what, errno, message)),
                }
            }
        }
    }
}

fn refusal(what: &str, errno: i32, message: String) -> FabricError {
    let message = if message.is_empty() { std::io::Error::from_raw_os_error(errno).to_string() } else { message };
    FabricError::Kernel { request: what.to_owned(), errno, message }
}

const NETLINK_GENERIC: isize = 16;
const GENL_ID_CTRL: u16 = 16;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const ETHTOOL_MSG_FEATURES_GET: u8 = 11;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_ACTIVE: u16 = 4;
const ETHTOOL_A_HEADER_DEV_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BIT_VALUE: u16 = 3;

/// A generic netlink payload: the `genlmsghdr` (command, version, reserved) and the attributes.
pub fn genl_payload(command: u8, version: u8, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![command, version, 0, 0];
    emit_all(attrs, &mut out);
    out
}

/// Opens a generic netlink socket and resolves the id of the family `name` with `CTRL_CMD_GETFAMILY`. A
/// family the kernel does not have is refused with `ENOENT`.
pub fn open_genl_family(name: &str) -> Result<(NlSocket, u16), FabricError> {
    let mut socket = NlSocket::open(NETLINK_GENERIC)?;
    let payload = genl_payload(CTRL_CMD_GETFAMILY, 1, &[Attr::string(CTRL_ATTR_FAMILY_NAME, name)]);
    let reply = socket.query(GENL_ID_CTRL, &payload, &format!("resolving the {name} netlink family"))?;
    let attrs = Attrs::parse(reply.get(4..).unwrap_or_default())?;
    let family = attrs
        .u16(CTRL_ATTR_FAMILY_ID)?
        .ok_or_else(|| FabricError::Decode(format!("{name} family reply without an id")))?;
    Ok((socket, family))
}

/// Ethtool over generic netlink: reads netdev features without ioctls.
#[derive(Debug)]
pub struct Ethtool {
    socket: NlSocket,
    family: u16,
}

impl Ethtool {
    /// Opens a generic netlink socket and resolves the `ethtool` family.
    pub fn open() -> Result<Self, FabricError> {
        let (socket, family) = open_genl_family("ethtool")?;
        Ok(Self { socket, family })
    }

    /// Whether `netdev` has the feature `name` (e.g. `hw-tc-offload`) active.
    pub fn feature_active(&mut self, netdev: &str, name: &str) -> Result<bool, FabricError> {
        let header = Attr::nested(ETHTOOL_A_FEATURES_HEADER, vec![Attr::string(ETHTOOL_A_HEADER_DEV_NAME, netdev)]);
        let payload = genl_payload(ETHTOOL_MSG_FEATURES_GET, 1, &[header]);
        let reply = self.socket.query(self.family, &payload, &format!("reading the features of {netdev}"))?;
        active_feature(reply.get(4..).unwrap_or_default(), name)
    }
}

/// Whether ethtool reports `feature` active on `device`; `Err` says, naming both, why it cannot tell.
pub fn netdev_feature(device: &str, feature: &str) -> Result<bool, String> {
    let mut ethtool =
        Ethtool::open().map_err(|e| format!("cannot read {feature} of {device}: ethtool netlink: {e}"))?;
    ethtool.feature_active(device, feature).map_err(|e| format!("reading {feature} of {device}: {e}"))
}

/// Looks for `name` among the set bits of `ETHTOOL_A_FEATURES_ACTIVE` (verbose bitset without mask: only
/// set bits are listed, each with its name).
pub fn active_feature(attrs: &[u8], name: &str) -> Result<bool, FabricError> {
    let attrs = Attrs::parse(attrs)?;
    let Some(active) = attrs.nested(ETHTOOL_A_FEATURES_ACTIVE)? else { return Ok(false) };
    let Some(bits) = active.nested(ETHTOOL_A_BITSET_BITS)? else { return Ok(false) };
    for (_, bit) in bits.iter() {
        let bit = Attrs::parse(bit)?;
        if bit.string(ETHTOOL_A_BITSET_BIT_NAME)?.as_deref() == Some(name) {
            return Ok(bit.get(ETHTOOL_A_BITSET_BIT_VALUE).is_some() || active.get(1).is_some());
        }
    }
    Ok(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn error_reply(sequence: u32, errno: i32, message: &str) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend_from_slice(&frame(44, 0, sequence, &[])[..HEADER_LEN]);
        emit_all(&[Attr::string(NLMSGERR_ATTR_MSG, message)], &mut payload);
        frame(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, sequence, &payload)
    }

    #[test]
    fn replies_with_extended_ack() {
        let mut datagram = frame(44, 2, 7, &[1, 2, 3, 4]);
        datagram.extend(frame(44, 2, 6, &[9, 9, 9, 9])); // another request's: skipped
        datagram.extend(error_reply(7, 95, "Specified filter kind not found"));
        let replies = parse_replies(&datagram, 7).unwrap();
        assert_eq!(
            replies,
            vec![
                Reply::Data(44, vec![1, 2, 3, 4]),
                Reply::Ack { errno: 95, message: "Specified filter kind not found".into() }
            ]
        );
        let done = frame(NLMSG_DONE, 2, 3, &0i32.to_ne_bytes());
        assert_eq!(parse_replies(&done, 3).unwrap(), vec![Reply::Done]);
        let e = refusal("adding a rule", 95, String::new());
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn truncated_replies_are_errors() {
        let mut bad = frame(44, 0, 1, &[0; 8]);
        bad[0] = 200; // length past the datagram
        assert!(parse_replies(&bad, 1).is_err());
        let short_error = frame(NLMSG_ERROR, 0, 1, &[0, 0]);
        assert!(parse_replies(&short_error, 1).is_err());
        let extreme = frame(NLMSG_ERROR, 0, 1, &i32::MIN.to_ne_bytes());
        assert_eq!(parse_replies(&extreme, 1).unwrap(), vec![Reply::Ack { errno: i32::MAX, message: String::new() }]);
    }

    #[test]
    fn feature_bits() {
        let bit = |name: &str| Attr::nested(1, vec![Attr::u32(1, 3), Attr::string(ETHTOOL_A_BITSET_BIT_NAME, name)]);
        let active = Attr::nested(
            ETHTOOL_A_FEATURES_ACTIVE,
            vec![
                Attr::bytes(1, []),
                Attr::nested(ETHTOOL_A_BITSET_BITS, vec![bit("rx-checksum"), bit("hw-tc-offload")]),
            ],
        );
        let mut buf = Vec::new();
        emit_all(&[active], &mut buf);
        assert!(active_feature(&buf, "hw-tc-offload").unwrap());
        assert!(!active_feature(&buf, "rx-gro-hw").unwrap());
    }

    /// Whether tc messages reach the kernel: qemu-user translates only link, address and route messages.
    pub(crate) fn tc_netlink_works() -> bool {
        let dump = NlSocket::open(0).and_then(|mut s| s.dump(38, &[0; 20], "listing qdiscs"));
        match dump {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipped: tc messages do not reach a kernel here ({e}; qemu-user does not translate them)");
                false
            }
        }
    }

    #[test]
    fn pipelined_requests_map_every_answer_to_its_request() {
        const RTM_GETLINK: u16 = 18;
        let link = |ifindex: i32| {
            let mut payload = vec![0u8; 16];
            payload[4..8].copy_from_slice(&ifindex.to_ne_bytes());
            payload
        };
        let (lo, missing) = (link(1), link(0x7fff_fff0));
        // More than two windows; every third request names an interface that cannot exist.
        let requests: Vec<Request<'_>> = (0..WINDOW * 2 + 7)
            .map(|i| Request { message_type: RTM_GETLINK, flags: 0, payload: if i % 3 == 0 { &missing } else { &lo } })
            .collect();
        let mut socket = NlSocket::open(0).unwrap();
        let results = socket.pipeline(&requests, &|i| format!("reading link {i}"));
        assert_eq!(results.len(), requests.len());
        for (i, r) in results.iter().enumerate() {
            if i % 3 == 0 {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
                assert!(e.to_string().contains(&format!("reading link {i}:")), "{e}");
            } else {
                assert!(r.is_ok(), "request {i}: {r:?}");
            }
        }
        // The socket stays in step: a plain request afterwards gets its own answer.
        socket.dump(RTM_GETLINK, &[0; 16], "listing links").unwrap();
    }

    #[test]
    fn kernel_refusal_carries_the_extended_ack() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (netlink writes)");
            return;
        }
        if !tc_netlink_works() {
            return;
        }
        let mut socket = NlSocket::open(0).unwrap();
        // A filter on an interface index that cannot exist.
        let mut payload = vec![0u8; 20];
        payload[4..8].copy_from_slice(&0x7fff_fff0i32.to_ne_bytes());
        let e = socket.request(44, 0x400 | 0x200, &payload, "adding a filter").unwrap_err();
        assert!(e.errno().is_some(), "{e}");
        assert!(e.to_string().starts_with("the kernel refused adding a filter: "), "{e}");
    }
}
