//! The xfrm netlink messages IPsec tunnels need (`linux/xfrm.h`): ESP states with an AEAD and optional device
//! offload, policies with one tunnel-mode template, their ids for deletion, and the decoders of the kernel's
//! dumps. Byte layouts follow the C structs (x86_64 and aarch64 agree: natural alignment, no packing).

use std::net::IpAddr;

use zeroize::{Zeroize, Zeroizing};

use crate::FabricError;
use crate::netlink::attr::{Attr, Attrs, emit_all};

pub const NETLINK_XFRM: isize = 6;
pub const XFRM_MSG_NEWSA: u16 = 0x10;
pub const XFRM_MSG_DELSA: u16 = 0x11;
pub const XFRM_MSG_GETSA: u16 = 0x12;
pub const XFRM_MSG_DELPOLICY: u16 = 0x14;
pub const XFRM_MSG_GETPOLICY: u16 = 0x15;
pub const XFRM_MSG_UPDPOLICY: u16 = 0x19;
pub const XFRM_MSG_UPDSA: u16 = 0x1a;
const XFRMA_TMPL: u16 = 5;
const XFRMA_ALG_AEAD: u16 = 18;
const XFRMA_OFFLOAD_DEV: u16 = 28;
pub const IPPROTO_ESP: u8 = 50;
const XFRM_MODE_TUNNEL: u8 = 1;
const XFRM_OFFLOAD_IPV6: u8 = 1;
const XFRM_OFFLOAD_INBOUND: u8 = 2;
pub const XFRM_OFFLOAD_PACKET: u8 = 4;
/// The AEAD ESP uses here, as the kernel's crypto API names it.
pub const AEAD_NAME: &str = "rfc4106(gcm(aes))";
const ICV_BITS: u32 = 128;

const SELECTOR_LEN: usize = 56;
const USERSA_INFO_LEN: usize = 224;
const USERPOLICY_INFO_LEN: usize = 168;
const USER_TMPL_LEN: usize = 64;
const USERSA_ID_LEN: usize = 24;
const USERPOLICY_ID_LEN: usize = 64;

/// Policy directions (`XFRM_POLICY_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    In = 0,
    Out = 1,
    Fwd = 2,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
            Dir::Fwd => "fwd",
        }
    }

    fn from_kernel(v: u8) -> Option<Dir> {
        match v {
            0 => Some(Dir::In),
            1 => Some(Dir::Out),
            2 => Some(Dir::Fwd),
            _ => None,
        }
    }
}

/// A traffic selector: source and destination prefixes (any port, any protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub src: IpAddr,
    pub src_len: u8,
    pub dst: IpAddr,
    pub dst_len: u8,
}

fn family(ip: IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

fn address(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => a = v6.octets(),
    }
    a
}

fn read_address(b: &[u8], family: u16) -> Option<IpAddr> {
    let a: [u8; 16] = b.get(..16)?.try_into().ok()?;
    match i32::from(family) {
        libc::AF_INET => Some(IpAddr::from([a[0], a[1], a[2], a[3]])),
        libc::AF_INET6 => Some(IpAddr::from(a)),
        _ => None,
    }
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    out[at..at + bytes.len()].copy_from_slice(bytes);
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ne_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn selector(sel: Option<&Selector>, fallback_family: u16) -> [u8; SELECTOR_LEN] {
    let mut s = [0u8; SELECTOR_LEN];
    match sel {
        Some(sel) => {
            put(&mut s, 0, &address(sel.dst));
            put(&mut s, 16, &address(sel.src));
            put(&mut s, 40, &family(sel.dst).to_ne_bytes());
            s[42] = sel.dst_len;
            s[43] = sel.src_len;
        }
        None => put(&mut s, 40, &fallback_family.to_ne_bytes()),
    }
    s
}

fn read_selector(b: &[u8]) -> Option<Selector> {
    let family = ne_u16(b, 40)?;
    Some(Selector {
        dst: read_address(b, family)?,
        src: read_address(b.get(16..)?, family)?,
        dst_len: *b.get(42)?,
        src_len: *b.get(43)?,
    })
}

/// Lifetimes without limits: `XFRM_INF` for the byte and packet limits of `xfrm_lifetime_cfg`; its four time
/// limits (seconds since added or first used) stay 0, which means none (a huge value would read as already past).
fn infinite_lifetimes(out: &mut [u8], at: usize) {
    for i in 0..4 {
        put(out, at + 8 * i, &u64::MAX.to_ne_bytes());
    }
}

/// Device offload of a state: the netdev and whether the NIC also does the packet handling (packet offload)
/// or only the crypto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    pub ifindex: u32,
    pub packet: bool,
}

/// One ESP state in tunnel mode.
#[derive(Clone, PartialEq, Eq)]
pub struct State {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub reqid: u32,
    /// RFC 4106 keying material: the AES key and the 4-byte salt.
    pub key: Vec<u8>,
    /// `Some`: offloaded to this device; the state is inbound when `dst` is local.
    pub offload: Option<(Offload, bool)>,
    /// Seconds after it was added at which the kernel removes the state (`hard_add_expires_seconds`); 0: never.
    /// A state being retired after a rekey carries one.
    pub expires_after: u64,
    /// Bytes and packets the kernel counted, and when it added the state (Unix seconds; from dumps, ignored
    /// when encoding).
    pub bytes: u64,
    pub packets: u64,
    pub added: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("src", &self.src)
            .field("dst", &self.dst)
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("reqid", &format_args!("{:#010x}", self.reqid))
            .field("key", &"<redacted>")
            .field("offload", &self.offload)
            .field("expires_after", &self.expires_after)
            .finish()
    }
}

impl State {
    /// The same state as far as the kernel's configuration goes (counters aside).
    pub fn same_config(&self, other: &State) -> bool {
        self.src == other.src
            && self.dst == other.dst
            && self.spi == other.spi
            && self.reqid == other.reqid
            && self.key == other.key
            && self.offload == other.offload
    }

    /// `XFRM_MSG_NEWSA` payload: `xfrm_usersa_info` + the AEAD (+ the offload device); cleared when dropped.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut info = [0u8; USERSA_INFO_LEN];
        let fam = family(self.dst);
        info[..SELECTOR_LEN].copy_from_slice(&selector(None, fam));
        put(&mut info, 56, &address(self.dst));
        put(&mut info, 72, &self.spi.to_be_bytes());
        info[76] = IPPROTO_ESP;
        put(&mut info, 80, &address(self.src));
        infinite_lifetimes(&mut info, 96);
        put(&mut info, 136, &self.expires_after.to_ne_bytes());
        put(&mut info, 208, &self.reqid.to_ne_bytes());
        put(&mut info, 212, &fam.to_ne_bytes());
        info[214] = XFRM_MODE_TUNNEL;
        info[215] = 32; // replay window
        let mut out = Zeroizing::new(info.to_vec());
        // The AEAD attribute is written straight into the zeroizing buffer: the key is copied nowhere else.
        let key_bits = u32::try_from(self.key.len() * 8).unwrap_or(u32::MAX);
        let attr_len = 4 + 72 + self.key.len();
        out.extend_from_slice(&u16::try_from(attr_len).unwrap_or(u16::MAX).to_ne_bytes());
        out.extend_from_slice(&XFRMA_ALG_AEAD.to_ne_bytes());
        let mut name = [0u8; 64];
        put(&mut name, 0, AEAD_NAME.as_bytes());
        out.extend_from_slice(&name);
        out.extend_from_slice(&key_bits.to_ne_bytes());
        out.extend_from_slice(&ICV_BITS.to_ne_bytes());
        out.extend_from_slice(&self.key);
        let padded = out.len().next_multiple_of(4);
        out.resize(padded, 0);
        if let Some((offload, inbound)) = self.offload {
            let mut flags = 0u8;
            if fam == libc::AF_INET6 as u16 {
                flags |= XFRM_OFFLOAD_IPV6;
            }
            if inbound {
                flags |= XFRM_OFFLOAD_INBOUND;
            }
            if offload.packet {
                flags |= XFRM_OFFLOAD_PACKET;
            }
            let mut dev = [0u8; 8];
            put(&mut dev, 0, &offload.ifindex.to_ne_bytes());
            dev[4] = flags;
            emit_all(&[Attr::bytes(XFRMA_OFFLOAD_DEV, dev.to_vec())], &mut out);
        }
        out
    }

    /// `XFRM_MSG_DELSA` payload: `xfrm_usersa_id`.
    pub fn id(&self) -> Vec<u8> {
        let mut id = [0u8; USERSA_ID_LEN];
        put(&mut id, 0, &address(self.dst));
        put(&mut id, 16, &self.spi.to_be_bytes());
        put(&mut id, 20, &family(self.dst).to_ne_bytes());
        id[22] = IPPROTO_ESP;
        id.to_vec()
    }

    /// Decodes one `XFRM_MSG_NEWSA` message of a dump. `Ok(None)`: not an ESP AEAD state (someone else's).
    pub fn decode(b: &[u8]) -> Result<Option<State>, FabricError> {
        let bad = |what: &str| FabricError::Decode(format!("xfrm state: {what}"));
        let info = b.get(..USERSA_INFO_LEN).ok_or_else(|| bad("shorter than xfrm_usersa_info"))?;
        let fam = ne_u16(info, 212).ok_or_else(|| bad("family"))?;
        if info[76] != IPPROTO_ESP {
            return Ok(None);
        }
        let (Some(dst), Some(src)) = (read_address(&info[56..], fam), read_address(&info[80..], fam)) else {
            return Ok(None);
        };
        let spi = u32::from_be_bytes(info[72..76].try_into().map_err(|_| bad("spi"))?);
        let reqid = ne_u32(info, 208).ok_or_else(|| bad("reqid"))?;
        let bytes = ne_u64(info, 160).ok_or_else(|| bad("lifetime"))?;
        let packets = ne_u64(info, 168).ok_or_else(|| bad("lifetime"))?;
        let added = ne_u64(info, 176).ok_or_else(|| bad("lifetime"))?;
        let expires_after = ne_u64(info, 136).ok_or_else(|| bad("lifetime"))?;
        let attrs = Attrs::parse(&b[USERSA_INFO_LEN..])?;
        let Some(aead) = attrs.get(XFRMA_ALG_AEAD) else { return Ok(None) };
        let name = aead.get(..64).ok_or_else(|| bad("AEAD name"))?;
        if name.split(|c| *c == 0).next() != Some(AEAD_NAME.as_bytes()) {
            return Ok(None);
        }
        let key_bits = ne_u32(aead, 64).ok_or_else(|| bad("AEAD key length"))? as usize;
        let key =
            aead.get(72..72 + key_bits.div_ceil(8)).ok_or_else(|| bad("AEAD key shorter than its length"))?.to_vec();
        let offload = match attrs.get(XFRMA_OFFLOAD_DEV) {
            Some(dev) => {
                let ifindex = ne_u32(dev, 0).ok_or_else(|| bad("offload device"))?;
                let flags = *dev.get(4).ok_or_else(|| bad("offload flags"))?;
                Some((Offload { ifindex, packet: flags & XFRM_OFFLOAD_PACKET != 0 }, flags & XFRM_OFFLOAD_INBOUND != 0))
            }
            None => None,
        };
        Ok(Some(State { src, dst, spi, reqid, key, offload, expires_after, bytes, packets, added }))
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// One policy with one tunnel-mode ESP template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub selector: Selector,
    pub dir: Dir,
    /// The template's outer addresses.
    pub tmpl_src: IpAddr,
    pub tmpl_dst: IpAddr,
    pub reqid: u32,
    pub priority: u32,
}

impl Policy {
    /// `XFRM_MSG_UPDPOLICY` payload: `xfrm_userpolicy_info` + one `xfrm_user_tmpl`.
    pub fn encode(&self) -> Vec<u8> {
        let mut info = [0u8; USERPOLICY_INFO_LEN];
        info[..SELECTOR_LEN].copy_from_slice(&selector(Some(&self.selector), 0));
        infinite_lifetimes(&mut info, 56);
        put(&mut info, 152, &self.priority.to_ne_bytes());
        info[160] = self.dir as u8;
        // action XFRM_POLICY_ALLOW (0), flags 0, share XFRM_SHARE_ANY (0)
        let mut tmpl = [0u8; USER_TMPL_LEN];
        put(&mut tmpl, 0, &address(self.tmpl_dst));
        tmpl[20] = IPPROTO_ESP;
        put(&mut tmpl, 24, &family(self.tmpl_dst).to_ne_bytes());
        put(&mut tmpl, 28, &address(self.tmpl_src));
        put(&mut tmpl, 44, &self.reqid.to_ne_bytes());
        tmpl[48] = XFRM_MODE_TUNNEL;
        for at in [52, 56, 60] {
            put(&mut tmpl, at, &u32::MAX.to_ne_bytes()); // any authentication, encryption, compression
        }
        let mut out = info.to_vec();
        emit_all(&[Attr::bytes(XFRMA_TMPL, tmpl.to_vec())], &mut out);
        out
    }

    /// `XFRM_MSG_DELPOLICY` payload: `xfrm_userpolicy_id` (by selector and direction).
    pub fn id(&self) -> Vec<u8> {
        let mut id = [0u8; USERPOLICY_ID_LEN];
        id[..SELECTOR_LEN].copy_from_slice(&selector(Some(&self.selector), 0));
        id[60] = self.dir as u8;
        id.to_vec()
    }

    /// Decodes one `XFRM_MSG_NEWPOLICY` message of a dump. `Ok(None)`: not a single-template tunnel policy.
    pub fn decode(b: &[u8]) -> Result<Option<Policy>, FabricError> {
        let bad = |what: &str| FabricError::Decode(format!("xfrm policy: {what}"));
        let info = b.get(..USERPOLICY_INFO_LEN).ok_or_else(|| bad("shorter than xfrm_userpolicy_info"))?;
        let Some(selector) = read_selector(info) else { return Ok(None) };
        let Some(dir) = Dir::from_kernel(info[160]) else { return Ok(None) };
        let priority = ne_u32(info, 152).ok_or_else(|| bad("priority"))?;
        let attrs = Attrs::parse(&b[USERPOLICY_INFO_LEN..])?;
        let Some(tmpls) = attrs.get(XFRMA_TMPL) else { return Ok(None) };
        if tmpls.len() != USER_TMPL_LEN || tmpls[20] != IPPROTO_ESP || tmpls[48] != XFRM_MODE_TUNNEL {
            return Ok(None);
        }
        let fam = ne_u16(tmpls, 24).ok_or_else(|| bad("template family"))?;
        let (Some(tmpl_dst), Some(tmpl_src)) = (read_address(tmpls, fam), read_address(&tmpls[28..], fam)) else {
            return Ok(None);
        };
        let reqid = ne_u32(tmpls, 44).ok_or_else(|| bad("template reqid"))?;
        Ok(Some(Policy { selector, dir, tmpl_src, tmpl_dst, reqid, priority }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            src: "192.168.77.1".parse().unwrap(),
            dst: "192.168.77.2".parse().unwrap(),
            spi: 0x1001,
            reqid: 0xd900_0042,
            key: (0..36).collect(),
            offload: None,
            expires_after: 0,
            bytes: 0,
            packets: 0,
            added: 0,
        }
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        let s = state();
        let bytes = s.encode();
        assert_eq!(bytes.len(), USERSA_INFO_LEN + 4 + 72 + 36);
        // Byte and packet limits infinite, time limits none (0).
        assert_eq!(&bytes[96..104], &u64::MAX.to_ne_bytes());
        assert_eq!(&bytes[128..160], &[0; 32]);
        let mut retiring = state();
        retiring.expires_after = 95;
        assert_eq!(State::decode(&retiring.encode()).unwrap().unwrap().expires_after, 95);
        let back = State::decode(&bytes).unwrap().unwrap();
        assert!(back.same_config(&s), "{back:?}");
        assert!(!format!("{back:?}").contains("35"), "Debug shows key bytes");
        let mut offloaded = state();
        offloaded.offload = Some((Offload { ifindex: 7, packet: true }, true));
        let back = State::decode(&offloaded.encode()).unwrap().unwrap();
        assert_eq!(back.offload, offloaded.offload);
        let id = s.id();
        assert_eq!(&id[16..20], &0x1001u32.to_be_bytes());
        assert_eq!(id[22], IPPROTO_ESP);
    }

    #[test]
    fn policy_round_trips_through_its_encoding() {
        let p = Policy {
            selector: Selector {
                src: "10.1.0.0".parse().unwrap(),
                src_len: 24,
                dst: "10.2.0.0".parse().unwrap(),
                dst_len: 24,
            },
            dir: Dir::Out,
            tmpl_src: "192.168.77.1".parse().unwrap(),
            tmpl_dst: "192.168.77.2".parse().unwrap(),
            reqid: 0xd900_0042,
            priority: 0,
        };
        let bytes = p.encode();
        assert_eq!(bytes.len(), USERPOLICY_INFO_LEN + 4 + USER_TMPL_LEN);
        assert_eq!(Policy::decode(&bytes).unwrap(), Some(p.clone()));
        assert_eq!(p.id().len(), USERPOLICY_ID_LEN);
    }

    #[test]
    fn foreign_and_short_messages() {
        assert!(State::decode(&[0; 10]).is_err());
        assert!(Policy::decode(&[0; 10]).is_err());
        // An AH state (proto 51) is someone else's.
        let mut ah = state().encode().to_vec();
        ah[76] = 51;
        assert_eq!(State::decode(&ah).unwrap(), None);
        // A key length past the attribute.
        let mut long = state().encode().to_vec();
        put(&mut long, USERSA_INFO_LEN + 4 + 64, &4096u32.to_ne_bytes());
        assert!(State::decode(&long).is_err());
    }
}
