//! rtnetlink traffic-control messages: the clsact qdisc, flower filters and the actions the fabric uses
//! (mirred, vlan, skbedit, gact, police, tunnel_key, ct, pedit), encoded from [`Rule`]s and decoded back from
//! the kernel's dumps.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::Emitable as _;

use super::attr::{Attr, Attrs, emit_all};
use crate::FabricError;
use crate::model::{IpNet, MacAddr};
use crate::rules::{Action, Keys, RuleId};

pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_GETQDISC: u16 = 38;
pub const RTM_NEWTFILTER: u16 = 44;
pub const RTM_DELTFILTER: u16 = 45;
pub const RTM_GETTFILTER: u16 = 46;

/// `TC_H_CLSACT` (= `TC_H_INGRESS`), the clsact qdisc's parent.
pub const TC_H_CLSACT: u32 = 0xffff_fff1;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the ingress hook of clsact.
pub const INGRESS_PARENT: u32 = 0xffff_fff2;
const CLSACT_HANDLE: u32 = 0xffff_0000;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;

const TCA_FLOWER_ACT: u16 = 3;
const TCA_FLOWER_KEY_ETH_DST: u16 = 4;
const TCA_FLOWER_KEY_ETH_DST_MASK: u16 = 5;
const TCA_FLOWER_KEY_ETH_SRC: u16 = 6;
const TCA_FLOWER_KEY_ETH_SRC_MASK: u16 = 7;
const TCA_FLOWER_KEY_ETH_TYPE: u16 = 8;
const TCA_FLOWER_KEY_IP_PROTO: u16 = 9;
const TCA_FLOWER_KEY_IPV4_SRC: u16 = 10;
const TCA_FLOWER_KEY_IPV4_SRC_MASK: u16 = 11;
const TCA_FLOWER_KEY_IPV4_DST: u16 = 12;
const TCA_FLOWER_KEY_IPV4_DST_MASK: u16 = 13;
const TCA_FLOWER_KEY_IPV6_SRC: u16 = 14;
const TCA_FLOWER_KEY_IPV6_SRC_MASK: u16 = 15;
const TCA_FLOWER_KEY_IPV6_DST: u16 = 16;
const TCA_FLOWER_KEY_IPV6_DST_MASK: u16 = 17;
const TCA_FLOWER_KEY_TCP_SRC: u16 = 18;
const TCA_FLOWER_KEY_TCP_DST: u16 = 19;
const TCA_FLOWER_KEY_UDP_SRC: u16 = 20;
const TCA_FLOWER_KEY_UDP_DST: u16 = 21;
const TCA_FLOWER_KEY_TCP_SRC_MASK: u16 = 35;
const TCA_FLOWER_KEY_UDP_SRC_MASK: u16 = 37;
const TCA_FLOWER_KEY_CT_STATE: u16 = 91;
const TCA_FLOWER_KEY_CT_STATE_MASK: u16 = 92;
const TCA_FLOWER_FLAGS: u16 = 22;
const TCA_FLOWER_KEY_VLAN_ID: u16 = 23;
const TCA_FLOWER_KEY_VLAN_ETH_TYPE: u16 = 25;
const TCA_FLOWER_KEY_ENC_KEY_ID: u16 = 26;
const TCA_FLOWER_IN_HW_COUNT: u16 = 86;

/// `TCA_CLS_FLAGS_*`.
pub const SKIP_HW: u32 = 1;
pub const SKIP_SW: u32 = 2;
pub const IN_HW: u32 = 4;
pub const NOT_IN_HW: u32 = 8;

const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_ACT_STATS: u16 = 4;
const TCA_ACT_COOKIE: u16 = 6;
const TCA_STATS_BASIC: u16 = 1;

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_PIPE: i32 = 3;
const TC_ACT_STOLEN: i32 = 4;

const TCA_MIRRED_PARMS: u16 = 2;
const TCA_EGRESS_REDIR: i32 = 1;
const TCA_EGRESS_MIRROR: i32 = 2;
const TCA_VLAN_PARMS: u16 = 2;
const TCA_VLAN_PUSH_VLAN_ID: u16 = 3;
const TCA_VLAN_PUSH_VLAN_PROTOCOL: u16 = 4;
const TCA_VLAN_ACT_POP: i32 = 1;
const TCA_VLAN_ACT_PUSH: i32 = 2;
const TCA_SKBEDIT_PARMS: u16 = 2;
const TCA_SKBEDIT_MARK: u16 = 5;
const TCA_GACT_PARMS: u16 = 2;
const TCA_TUNNEL_KEY_PARMS: u16 = 2;
const TCA_TUNNEL_KEY_ENC_IPV4_SRC: u16 = 3;
const TCA_TUNNEL_KEY_ENC_IPV4_DST: u16 = 4;
const TCA_TUNNEL_KEY_ENC_IPV6_SRC: u16 = 5;
const TCA_TUNNEL_KEY_ENC_IPV6_DST: u16 = 6;
const TCA_TUNNEL_KEY_ENC_KEY_ID: u16 = 7;
const TCA_TUNNEL_KEY_ENC_DST_PORT: u16 = 9;
const TCA_TUNNEL_KEY_ACT_SET: i32 = 1;
const TCA_TUNNEL_KEY_ACT_RELEASE: i32 = 2;
const TCA_CT_PARMS: u16 = 1;
const TCA_CT_ACTION: u16 = 3;
const TCA_CT_ZONE: u16 = 4;
const TCA_CT_NAT_IPV4_MIN: u16 = 9;
const TCA_CT_NAT_IPV4_MAX: u16 = 10;
const TCA_CT_NAT_PORT_MIN: u16 = 13;
const TCA_CT_NAT_PORT_MAX: u16 = 14;
const TCA_CT_ACT_COMMIT: u16 = 1;
const TCA_CT_ACT_NAT: u16 = 8;
const TCA_CT_ACT_NAT_DST: u16 = 32;
const TCA_PEDIT_PARMS: u16 = 2;
const TCA_PEDIT_PARMS_EX: u16 = 4;
const TCA_PEDIT_KEYS_EX: u16 = 5;
const TCA_PEDIT_KEY_EX: u16 = 6;
const TCA_PEDIT_KEY_EX_HTYPE: u16 = 1;
const TCA_PEDIT_KEY_EX_CMD: u16 = 2;
const TCA_PEDIT_KEY_EX_HDR_TYPE_ETH: u16 = 1;
const TCA_PEDIT_KEY_EX_CMD_SET: u16 = 0;
/// `struct tc_pedit_sel` (tc_gen, nkeys, flags, padding) and `struct tc_pedit_key`.
const TC_PEDIT_SEL_LEN: usize = 24;
const TC_PEDIT_KEY_LEN: usize = 24;
const TCA_POLICE_TBF: u16 = 1;
const TCA_POLICE_RATE: u16 = 2;
const TCA_POLICE_RESULT: u16 = 5;
const TCA_POLICE_RATE64: u16 = 8;

/// Length of `struct tc_gen` (index, capab, action, refcnt, bindcnt).
const TC_GEN_LEN: usize = 20;
/// Length of `struct tc_police`.
const TC_POLICE_LEN: usize = 56;
/// Largest packet the police action measures against its rate (covers GRO/TSO aggregates).
const POLICE_MTU: u32 = 256 * 1024;
/// Nanoseconds per psched tick (`PSCHED_SHIFT` = 6).
const NS_PER_TICK: u128 = 64;

/// `struct tcmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcMsg {
    pub ifindex: u32,
    pub handle: u32,
    pub parent: u32,
    /// Filters: `prio << 16 | protocol` (protocol in network byte order).
    pub info: u32,
}

pub const TCMSG_LEN: usize = 20;

impl TcMsg {
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0, 0, 0]); // family AF_UNSPEC + padding
        out.extend_from_slice(&self.ifindex.to_ne_bytes());
        out.extend_from_slice(&self.handle.to_ne_bytes());
        out.extend_from_slice(&self.parent.to_ne_bytes());
        out.extend_from_slice(&self.info.to_ne_bytes());
    }

    pub fn parse(buf: &[u8]) -> Result<(Self, &[u8]), FabricError> {
        if buf.len() < TCMSG_LEN {
            return Err(FabricError::Decode(format!("tcmsg needs {TCMSG_LEN} bytes, got {}", buf.len())));
        }
        let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        Ok((Self { ifindex: word(4), handle: word(8), parent: word(12), info: word(16) }, &buf[TCMSG_LEN..]))
    }

    /// Filter info for (priority, protocol).
    pub fn filter_info(prio: u16, protocol: u16) -> u32 {
        u32::from(prio) << 16 | u32::from(protocol.to_be())
    }
}

/// `RTM_NEWQDISC` payload creating the clsact qdisc on `ifindex`.
pub fn clsact(ifindex: u32) -> Vec<u8> {
    let mut out = Vec::new();
    TcMsg { ifindex, handle: CLSACT_HANDLE, parent: TC_H_CLSACT, info: 0 }.emit(&mut out);
    emit_all(&[Attr::string(TCA_KIND, "clsact")], &mut out);
    out
}

/// `RTM_GETQDISC` dump payload (all qdiscs; the caller filters by interface).
pub fn qdisc_dump() -> Vec<u8> {
    let mut out = Vec::new();
    TcMsg::default().emit(&mut out);
    out
}

/// Decodes a qdisc message into (ifindex, parent, kind).
pub fn decode_qdisc(payload: &[u8]) -> Result<(u32, u32, String), FabricError> {
    let (msg, rest) = TcMsg::parse(payload)?;
    let kind = Attrs::parse(rest)?.string(TCA_KIND)?.unwrap_or_default();
    Ok((msg.ifindex, msg.parent, kind))
}

/// `RTM_GETTFILTER` dump payload for the ingress hook of `ifindex`, chain 0.
pub fn filter_dump(ifindex: u32) -> Vec<u8> {
    let mut out = Vec::new();
    TcMsg { ifindex, handle: 0, parent: INGRESS_PARENT, info: 0 }.emit(&mut out);
    emit_all(&[Attr::u32(TCA_CHAIN, 0)], &mut out);
    out
}

/// `RTM_DELTFILTER` payload removing one filter.
pub fn filter_delete(ifindex: u32, id: RuleId) -> Vec<u8> {
    let mut out = Vec::new();
    let info = TcMsg::filter_info(id.prio, id.protocol);
    TcMsg { ifindex, handle: id.handle, parent: INGRESS_PARENT, info }.emit(&mut out);
    emit_all(&[Attr::string(TCA_KIND, "flower"), Attr::u32(TCA_CHAIN, 0)], &mut out);
    out
}

/// `RTM_NEWTFILTER` payload installing a flower filter on the ingress hook of `ifindex`. `resolve` maps the
/// actions' device names to interface indexes; `cookie` is attached to the first action.
pub fn filter(
    ifindex: u32,
    id: RuleId,
    keys: &Keys,
    actions: &[Action],
    flags: u32,
    cookie: &[u8],
    resolve: &dyn Fn(&str) -> Result<u32, FabricError>,
) -> Result<Vec<u8>, FabricError> {
    let mut options = flower_keys(keys);
    options.push(Attr::u32(TCA_FLOWER_FLAGS, flags));
    let mut list = Vec::with_capacity(actions.len());
    for (i, action) in actions.iter().enumerate() {
        let mut attrs = encode_action(action, resolve)?;
        if i == 0 && !cookie.is_empty() {
            attrs.push(Attr::bytes(TCA_ACT_COOKIE, cookie));
        }
        list.push(Attr::nested(u16::try_from(i + 1).unwrap_or(u16::MAX), attrs));
    }
    options.push(Attr::nested(TCA_FLOWER_ACT, list));
    let mut out = Vec::new();
    let info = TcMsg::filter_info(id.prio, id.protocol);
    TcMsg { ifindex, handle: id.handle, parent: INGRESS_PARENT, info }.emit(&mut out);
    emit_all(
        &[Attr::string(TCA_KIND, "flower"), Attr::u32(TCA_CHAIN, 0), Attr::nested(TCA_OPTIONS, options)],
        &mut out,
    );
    Ok(out)
}

/// Length of the content cookie [`filter_digested`] puts on a filter.
pub const COOKIE_LEN: usize = 16;

/// `RTM_NEWTFILTER` payload like [`filter`], encoded once, whose first action carries a content cookie: two
/// 64-bit FNV-1a digests (different offsets) of the payload itself with the cookie zeroed. The same rule on the
/// same device with the same interface indexes and placement always has the same cookie; any difference in
/// keys, actions, targets or flags changes it. Returns the payload and the cookie.
pub fn filter_digested(
    ifindex: u32,
    id: RuleId,
    keys: &Keys,
    actions: &[Action],
    flags: u32,
    resolve: &dyn Fn(&str) -> Result<u32, FabricError>,
) -> Result<(Vec<u8>, [u8; COOKIE_LEN]), FabricError> {
    let mut options = flower_keys(keys);
    options.push(Attr::u32(TCA_FLOWER_FLAGS, flags));
    let before_actions = options.as_slice().buffer_len();
    let mut list = Vec::with_capacity(actions.len());
    for (i, action) in actions.iter().enumerate() {
        let mut attrs = encode_action(action, resolve)?;
        if i == 0 {
            // First, so its offset is known: the kernel reads action attributes by type, not position.
            attrs.insert(0, Attr::bytes(TCA_ACT_COOKIE, [0u8; COOKIE_LEN]));
        }
        list.push(Attr::nested(u16::try_from(i + 1).unwrap_or(u16::MAX), attrs));
    }
    if list.is_empty() {
        return Err(FabricError::Decode(format!("flower {id} has no action to carry its cookie")));
    }
    options.push(Attr::nested(TCA_FLOWER_ACT, list));
    let mut out = Vec::new();
    let info = TcMsg::filter_info(id.prio, id.protocol);
    TcMsg { ifindex, handle: id.handle, parent: INGRESS_PARENT, info }.emit(&mut out);
    let head = [Attr::string(TCA_KIND, "flower"), Attr::u32(TCA_CHAIN, 0)];
    emit_all(&head, &mut out);
    // TCA_OPTIONS header, the keys and flags, TCA_FLOWER_ACT header, action 1's header, the cookie's header.
    let at = out.len() + 4 + before_actions + 4 + 4 + 4;
    emit_all(&[Attr::nested(TCA_OPTIONS, options)], &mut out);
    let fnv = |basis: u64| out.iter().fold(basis, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let mut cookie = [0u8; COOKIE_LEN];
    cookie[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    cookie[8..].copy_from_slice(&fnv(0x6c62_272e_07bb_0142).to_be_bytes());
    out[at..at + COOKIE_LEN].copy_from_slice(&cookie);
    Ok((out, cookie))
}

fn prefix_mask(prefix: u8, width: u8) -> u128 {
    if prefix == 0 { 0 } else { (u128::MAX << (width - prefix.min(width))) & (u128::MAX >> (128 - u32::from(width))) }
}

fn flower_keys(k: &Keys) -> Vec<Attr> {
    let mut out = Vec::new();
    if let Some(t) = k.eth_type {
        out.push(Attr::be16(TCA_FLOWER_KEY_ETH_TYPE, t));
    }
    if let Some((mac, mask)) = k.dst_mac {
        out.push(Attr::bytes(TCA_FLOWER_KEY_ETH_DST, mac.0));
        out.push(Attr::bytes(TCA_FLOWER_KEY_ETH_DST_MASK, mask.0));
    }
    if let Some(mac) = k.src_mac {
        out.push(Attr::bytes(TCA_FLOWER_KEY_ETH_SRC, mac.0));
        out.push(Attr::bytes(TCA_FLOWER_KEY_ETH_SRC_MASK, [0xff; 6]));
    }
    if let Some(id) = k.vlan_id {
        out.push(Attr::u16(TCA_FLOWER_KEY_VLAN_ID, id));
    }
    if let Some(t) = k.vlan_eth_type {
        out.push(Attr::be16(TCA_FLOWER_KEY_VLAN_ETH_TYPE, t));
    }
    if let Some(p) = k.ip_proto {
        out.push(Attr::u8(TCA_FLOWER_KEY_IP_PROTO, p));
    }
    match k.src_ip {
        Some((IpAddr::V4(a), mask)) => {
            out.push(Attr::bytes(TCA_FLOWER_KEY_IPV4_SRC, a.octets()));
            let mask = match mask {
                IpAddr::V4(m) => m.octets(),
                IpAddr::V6(_) => [0xff; 4],
            };
            out.push(Attr::bytes(TCA_FLOWER_KEY_IPV4_SRC_MASK, mask));
        }
        Some((IpAddr::V6(a), mask)) => {
            out.push(Attr::bytes(TCA_FLOWER_KEY_IPV6_SRC, a.octets()));
            let mask = match mask {
                IpAddr::V6(m) => m.octets(),
                IpAddr::V4(_) => [0xff; 16],
            };
            out.push(Attr::bytes(TCA_FLOWER_KEY_IPV6_SRC_MASK, mask));
        }
        None => {}
    }
    if let Some(net) = k.dst_ip {
        match net.addr {
            IpAddr::V4(a) => {
                out.push(Attr::bytes(TCA_FLOWER_KEY_IPV4_DST, a.octets()));
                let mask = u32::try_from(prefix_mask(net.prefix, 32)).unwrap_or(u32::MAX);
                out.push(Attr::be32(TCA_FLOWER_KEY_IPV4_DST_MASK, mask));
            }
            IpAddr::V6(a) => {
                out.push(Attr::bytes(TCA_FLOWER_KEY_IPV6_DST, a.octets()));
                out.push(Attr::bytes(TCA_FLOWER_KEY_IPV6_DST_MASK, prefix_mask(net.prefix, 128).to_be_bytes()));
            }
        }
    }
    let udp = k.ip_proto == Some(crate::rules::IPPROTO_UDP);
    if let Some(p) = k.dst_port {
        out.push(Attr::be16(if udp { TCA_FLOWER_KEY_UDP_DST } else { TCA_FLOWER_KEY_TCP_DST }, p));
    }
    if let Some((p, mask)) = k.src_port {
        let (key, mask_key) = if udp {
            (TCA_FLOWER_KEY_UDP_SRC, TCA_FLOWER_KEY_UDP_SRC_MASK)
        } else {
            (TCA_FLOWER_KEY_TCP_SRC, TCA_FLOWER_KEY_TCP_SRC_MASK)
        };
        out.push(Attr::be16(key, p & mask));
        out.push(Attr::be16(mask_key, mask));
    }
    if let Some((state, mask)) = k.ct_state {
        out.push(Attr::u16(TCA_FLOWER_KEY_CT_STATE, state & mask));
        out.push(Attr::u16(TCA_FLOWER_KEY_CT_STATE_MASK, mask));
    }
    if let Some(id) = k.enc_key_id {
        out.push(Attr::be32(TCA_FLOWER_KEY_ENC_KEY_ID, id));
    }
    out
}

/// `struct tc_pedit_key` setting the bytes of `value` under `keep` (bits kept from the packet) at `offset`.
fn pedit_key(out: &mut Vec<u8>, keep: [u8; 4], value: [u8; 4], offset: u32) {
    out.extend_from_slice(&keep);
    out.extend_from_slice(&value);
    out.extend_from_slice(&offset.to_ne_bytes());
    out.extend_from_slice(&[0; 12]); // at, offmask, shift
}

/// The two 32-bit pedit keys that set the Ethernet destination (bytes 0-5 of the Ethernet header).
fn dst_mac_keys(mac: MacAddr) -> Vec<u8> {
    let m = mac.0;
    let mut keys = Vec::with_capacity(2 * TC_PEDIT_KEY_LEN);
    pedit_key(&mut keys, [0; 4], [m[0], m[1], m[2], m[3]], 0);
    pedit_key(&mut keys, [0, 0, 0xff, 0xff], [m[4], m[5], 0, 0], 4);
    keys
}

/// `struct tc_gen` with `action` as the verdict.
fn tc_gen(action: i32) -> Vec<u8> {
    let mut v = vec![0u8; TC_GEN_LEN];
    v[8..12].copy_from_slice(&action.to_ne_bytes());
    v
}

fn encode_action(
    action: &Action,
    resolve: &dyn Fn(&str) -> Result<u32, FabricError>,
) -> Result<Vec<Attr>, FabricError> {
    let (kind, options) = match action {
        Action::Redirect { dev } | Action::Mirror { dev } => {
            let (verdict, eaction) = match action {
                Action::Redirect { .. } => (TC_ACT_STOLEN, TCA_EGRESS_REDIR),
                _ => (TC_ACT_PIPE, TCA_EGRESS_MIRROR),
            };
            let mut parms = tc_gen(verdict);
            parms.extend_from_slice(&eaction.to_ne_bytes());
            parms.extend_from_slice(&resolve(dev)?.to_ne_bytes());
            ("mirred", vec![Attr::bytes(TCA_MIRRED_PARMS, parms)])
        }
        Action::VlanPush { id } => {
            let mut parms = tc_gen(TC_ACT_PIPE);
            parms.extend_from_slice(&TCA_VLAN_ACT_PUSH.to_ne_bytes());
            let attrs = vec![
                Attr::bytes(TCA_VLAN_PARMS, parms),
                Attr::u16(TCA_VLAN_PUSH_VLAN_ID, *id),
                Attr::be16(TCA_VLAN_PUSH_VLAN_PROTOCOL, crate::rules::PROTO_8021Q),
            ];
            ("vlan", attrs)
        }
        Action::VlanPop => {
            let mut parms = tc_gen(TC_ACT_PIPE);
            parms.extend_from_slice(&TCA_VLAN_ACT_POP.to_ne_bytes());
            ("vlan", vec![Attr::bytes(TCA_VLAN_PARMS, parms)])
        }
        Action::Mark(mark) => {
            ("skbedit", vec![Attr::bytes(TCA_SKBEDIT_PARMS, tc_gen(TC_ACT_PIPE)), Attr::u32(TCA_SKBEDIT_MARK, *mark)])
        }
        Action::Drop => ("gact", vec![Attr::bytes(TCA_GACT_PARMS, tc_gen(TC_ACT_SHOT))]),
        Action::Police { rate_bps, burst_bytes } => ("police", police(*rate_bps, *burst_bytes)),
        Action::TunnelSet { src, dst, vni, port } => {
            let mut parms = tc_gen(TC_ACT_PIPE);
            parms.extend_from_slice(&TCA_TUNNEL_KEY_ACT_SET.to_ne_bytes());
            let (src_kind, dst_kind) = match dst {
                IpAddr::V4(_) => (TCA_TUNNEL_KEY_ENC_IPV4_SRC, TCA_TUNNEL_KEY_ENC_IPV4_DST),
                IpAddr::V6(_) => (TCA_TUNNEL_KEY_ENC_IPV6_SRC, TCA_TUNNEL_KEY_ENC_IPV6_DST),
            };
            let attrs = vec![
                Attr::bytes(TCA_TUNNEL_KEY_PARMS, parms),
                Attr::ip(src_kind, *src),
                Attr::ip(dst_kind, *dst),
                Attr::be32(TCA_TUNNEL_KEY_ENC_KEY_ID, *vni),
                Attr::be16(TCA_TUNNEL_KEY_ENC_DST_PORT, *port),
            ];
            ("tunnel_key", attrs)
        }
        Action::TunnelUnset => {
            let mut parms = tc_gen(TC_ACT_PIPE);
            parms.extend_from_slice(&TCA_TUNNEL_KEY_ACT_RELEASE.to_ne_bytes());
            ("tunnel_key", vec![Attr::bytes(TCA_TUNNEL_KEY_PARMS, parms)])
        }
        Action::Ct { zone, commit, nat, dnat } => {
            let mut flags = 0;
            if *commit {
                flags |= TCA_CT_ACT_COMMIT;
            }
            if *nat || dnat.is_some() {
                flags |= TCA_CT_ACT_NAT;
            }
            let mut attrs = vec![
                Attr::bytes(TCA_CT_PARMS, tc_gen(TC_ACT_UNSPEC)),
                Attr::u16(TCA_CT_ACTION, flags | if dnat.is_some() { TCA_CT_ACT_NAT_DST } else { 0 }),
                Attr::u16(TCA_CT_ZONE, *zone),
            ];
            if let Some((ip, port)) = dnat {
                attrs.push(Attr::bytes(TCA_CT_NAT_IPV4_MIN, ip.octets()));
                attrs.push(Attr::bytes(TCA_CT_NAT_IPV4_MAX, ip.octets()));
                attrs.push(Attr::be16(TCA_CT_NAT_PORT_MIN, *port));
                attrs.push(Attr::be16(TCA_CT_NAT_PORT_MAX, *port));
            }
            ("ct", attrs)
        }
        Action::SetDstMac(mac) => {
            let mut parms = tc_gen(TC_ACT_UNSPEC);
            parms.extend_from_slice(&[2, 0, 0, 0]); // nkeys, flags, padding
            parms.extend(dst_mac_keys(*mac));
            let key_ex = || {
                Attr::nested(
                    TCA_PEDIT_KEY_EX,
                    vec![
                        Attr::u16(TCA_PEDIT_KEY_EX_HTYPE, TCA_PEDIT_KEY_EX_HDR_TYPE_ETH),
                        Attr::u16(TCA_PEDIT_KEY_EX_CMD, TCA_PEDIT_KEY_EX_CMD_SET),
                    ],
                )
            };
            let attrs =
                vec![Attr::bytes(TCA_PEDIT_PARMS_EX, parms), Attr::nested(TCA_PEDIT_KEYS_EX, vec![key_ex(), key_ex()])];
            ("pedit", attrs)
        }
        Action::Foreign { kind } => {
            return Err(FabricError::Decode(format!("a {kind:?} action is read back only, never installed")));
        }
    };
    Ok(vec![Attr::string(TCA_ACT_KIND, kind), Attr::nested(TCA_ACT_OPTIONS, options)])
}

/// Transmission time of `bytes` at `rate` bytes per second, in psched ticks.
fn ticks(bytes: u64, rate: u64) -> u32 {
    let ns = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1));
    u32::try_from(ns / NS_PER_TICK).unwrap_or(u32::MAX)
}

/// `struct tc_police` + the rate table the kernel requires with a rate: exceeding traffic is dropped,
/// conforming traffic continues classification (`TC_ACT_UNSPEC`).
fn police(rate_bps: u64, burst_bytes: u32) -> Vec<Attr> {
    let rate = (rate_bps / 8).max(1); // bytes per second
    let mut cell_log = 0u8;
    while (POLICE_MTU >> cell_log) > 255 {
        cell_log += 1;
    }
    let mut parms = vec![0u8; TC_POLICE_LEN];
    parms[4..8].copy_from_slice(&TC_ACT_SHOT.to_ne_bytes());
    parms[12..16].copy_from_slice(&ticks(u64::from(burst_bytes), rate).to_ne_bytes());
    parms[16..20].copy_from_slice(&POLICE_MTU.to_ne_bytes());
    // struct tc_ratespec at 20: cell_log, linklayer (ethernet), overhead, cell_align, mpu, rate.
    parms[20] = cell_log;
    parms[21] = 1;
    parms[24..26].copy_from_slice(&(-1i16).to_ne_bytes());
    parms[28..32].copy_from_slice(&u32::try_from(rate).unwrap_or(u32::MAX).to_ne_bytes());
    let mut table = Vec::with_capacity(1024);
    for i in 0..256u64 {
        table.extend_from_slice(&ticks((i + 1) << cell_log, rate).to_ne_bytes());
    }
    let mut attrs = vec![
        Attr::bytes(TCA_POLICE_TBF, parms),
        Attr::bytes(TCA_POLICE_RATE, table),
        Attr::u32(TCA_POLICE_RESULT, TC_ACT_UNSPEC as u32),
    ];
    if rate > u64::from(u32::MAX) {
        attrs.push(Attr::u64(TCA_POLICE_RATE64, rate));
    }
    attrs
}

/// A flower filter as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub id: RuleId,
    pub keys: Keys,
    pub actions: Vec<Action>,
    /// `TCA_CLS_FLAGS_*` as reported (skip_sw / skip_hw / in_hw / not_in_hw).
    pub flags: u32,
    pub in_hw_count: Option<u32>,
    pub cookie: Option<Vec<u8>>,
    pub packets: u64,
    pub bytes: u64,
}

/// Decodes an `RTM_NEWTFILTER` message from a dump. Returns `None` for entries that are not flower filters
/// on chain 0 with a handle (the per-priority header entries of a dump).
pub fn decode_filter(payload: &[u8], name_of: &dyn Fn(u32) -> String) -> Result<Option<Filter>, FabricError> {
    let (msg, rest) = TcMsg::parse(payload)?;
    let attrs = Attrs::parse(rest)?;
    if msg.handle == 0
        || attrs.string(TCA_KIND)?.as_deref() != Some("flower")
        || attrs.u32(TCA_CHAIN)?.unwrap_or(0) != 0
    {
        return Ok(None);
    }
    let id = RuleId {
        prio: u16::try_from(msg.info >> 16).unwrap_or(u16::MAX),
        protocol: u16::from_be((msg.info & 0xffff) as u16),
        handle: msg.handle,
    };
    let Some(options) = attrs.nested(TCA_OPTIONS)? else {
        return Err(FabricError::Decode(format!("flower filter {id} without options")));
    };
    let keys = decode_keys(&options)?;
    let mut filter = Filter {
        id,
        keys,
        actions: Vec::new(),
        flags: options.u32(TCA_FLOWER_FLAGS)?.unwrap_or(0),
        in_hw_count: options.u32(TCA_FLOWER_IN_HW_COUNT)?,
        cookie: None,
        packets: 0,
        bytes: 0,
    };
    if let Some(list) = options.nested(TCA_FLOWER_ACT)? {
        let mut ordered: Vec<(u16, &[u8])> = list.iter().collect();
        ordered.sort_by_key(|(order, _)| *order);
        for (i, (_, raw)) in ordered.into_iter().enumerate() {
            let act = Attrs::parse(raw)?;
            if i == 0 {
                filter.cookie = act.get(TCA_ACT_COOKIE).map(<[u8]>::to_vec);
                if let Some(stats) = act.nested(TCA_ACT_STATS)?
                    && let Some(basic) = stats.get(TCA_STATS_BASIC)
                    && basic.len() >= 12
                {
                    filter.bytes = u64::from_ne_bytes(basic[..8].try_into().unwrap_or_default());
                    filter.packets = u64::from(u32::from_ne_bytes(basic[8..12].try_into().unwrap_or_default()));
                }
            }
            filter.actions.push(decode_action(&act, name_of)?);
        }
    }
    Ok(Some(filter))
}

fn decode_keys(o: &Attrs<'_>) -> Result<Keys, FabricError> {
    let mut k = Keys { eth_type: o.be16(TCA_FLOWER_KEY_ETH_TYPE)?, ..Keys::default() };
    if let Some(mac) = o.mac(TCA_FLOWER_KEY_ETH_DST)? {
        let mask = o.mac(TCA_FLOWER_KEY_ETH_DST_MASK)?.unwrap_or([0xff; 6]);
        k.dst_mac = Some((MacAddr(mac), MacAddr(mask)));
    }
    k.src_mac = o.mac(TCA_FLOWER_KEY_ETH_SRC)?.map(MacAddr);
    k.vlan_id = o.u16(TCA_FLOWER_KEY_VLAN_ID)?;
    k.vlan_eth_type = o.be16(TCA_FLOWER_KEY_VLAN_ETH_TYPE)?;
    k.ip_proto = o.u8(TCA_FLOWER_KEY_IP_PROTO)?;
    if let Some(a) = o.ipv4(TCA_FLOWER_KEY_IPV4_DST)? {
        let mask = o.be32(TCA_FLOWER_KEY_IPV4_DST_MASK)?.unwrap_or(u32::MAX);
        k.dst_ip = Some(IpNet { addr: IpAddr::V4(a), prefix: mask.count_ones() as u8 });
    } else if let Some(a) = o.ipv6(TCA_FLOWER_KEY_IPV6_DST)? {
        let mask = o.ipv6(TCA_FLOWER_KEY_IPV6_DST_MASK)?.map_or(u128::MAX, u128::from);
        k.dst_ip = Some(IpNet { addr: IpAddr::V6(a), prefix: mask.count_ones() as u8 });
    }
    if let Some(a) = o.ipv4(TCA_FLOWER_KEY_IPV4_SRC)? {
        let mask = o.ipv4(TCA_FLOWER_KEY_IPV4_SRC_MASK)?.unwrap_or(Ipv4Addr::BROADCAST);
        k.src_ip = Some((IpAddr::V4(a), IpAddr::V4(mask)));
    } else if let Some(a) = o.ipv6(TCA_FLOWER_KEY_IPV6_SRC)? {
        let mask = o.ipv6(TCA_FLOWER_KEY_IPV6_SRC_MASK)?.unwrap_or(std::net::Ipv6Addr::from(u128::MAX));
        k.src_ip = Some((IpAddr::V6(a), IpAddr::V6(mask)));
    }
    let udp = k.ip_proto == Some(crate::rules::IPPROTO_UDP);
    let (dst, src, src_mask) = if udp {
        (TCA_FLOWER_KEY_UDP_DST, TCA_FLOWER_KEY_UDP_SRC, TCA_FLOWER_KEY_UDP_SRC_MASK)
    } else {
        (TCA_FLOWER_KEY_TCP_DST, TCA_FLOWER_KEY_TCP_SRC, TCA_FLOWER_KEY_TCP_SRC_MASK)
    };
    k.dst_port = o.be16(dst)?;
    // Values as matched: the bits under their mask.
    if let Some(p) = o.be16(src)? {
        let mask = o.be16(src_mask)?.unwrap_or(u16::MAX);
        k.src_port = Some((p & mask, mask));
    }
    if let Some(mask) = o.u16(TCA_FLOWER_KEY_CT_STATE_MASK)? {
        k.ct_state = Some((o.u16(TCA_FLOWER_KEY_CT_STATE)?.unwrap_or(0) & mask, mask));
    }
    k.enc_key_id = o.be32(TCA_FLOWER_KEY_ENC_KEY_ID)?;
    Ok(k)
}

/// Reads a `ct` action back; settings the fabric never uses (address ranges, IPv6 NAT, source NAT) are foreign.
fn decode_ct(options: &Attrs<'_>) -> Result<Action, FabricError> {
    parms(options, TCA_CT_PARMS, TC_GEN_LEN, "ct")?;
    let flags = options.u16(TCA_CT_ACTION)?.unwrap_or(0);
    let zone = options.u16(TCA_CT_ZONE)?.unwrap_or(0);
    let known = TCA_CT_ACT_COMMIT | TCA_CT_ACT_NAT | TCA_CT_ACT_NAT_DST;
    let dst_without_nat = flags & TCA_CT_ACT_NAT_DST != 0 && flags & TCA_CT_ACT_NAT == 0;
    if flags & !known != 0 || dst_without_nat {
        return Ok(Action::Foreign { kind: format!("ct flags {flags:#x}") });
    }
    let dnat = if flags & TCA_CT_ACT_NAT_DST != 0 {
        let min = options.ipv4(TCA_CT_NAT_IPV4_MIN)?;
        let max = options.ipv4(TCA_CT_NAT_IPV4_MAX)?;
        let port_min = options.be16(TCA_CT_NAT_PORT_MIN)?;
        let port_max = options.be16(TCA_CT_NAT_PORT_MAX)?;
        match (min, max, port_min, port_max) {
            (Some(a), Some(b), Some(p), Some(q)) if a == b && p == q => Some((a, p)),
            _ => return Ok(Action::Foreign { kind: "ct nat dst range".into() }),
        }
    } else {
        None
    };
    Ok(Action::Ct { zone, commit: flags & TCA_CT_ACT_COMMIT != 0, nat: flags & TCA_CT_ACT_NAT != 0, dnat })
}

/// Reads a `pedit` action back: the destination-MAC rewrite the fabric installs, anything else is foreign.
fn decode_pedit(options: &Attrs<'_>) -> Result<Action, FabricError> {
    let foreign = || Action::Foreign { kind: "pedit".into() };
    let Some(sel) = options.get(TCA_PEDIT_PARMS_EX).or_else(|| options.get(TCA_PEDIT_PARMS)) else {
        return Ok(foreign());
    };
    if sel.len() < TC_PEDIT_SEL_LEN || sel[TC_GEN_LEN] != 2 || sel.len() < TC_PEDIT_SEL_LEN + 2 * TC_PEDIT_KEY_LEN {
        return Ok(foreign());
    }
    let keys = &sel[TC_PEDIT_SEL_LEN..TC_PEDIT_SEL_LEN + 2 * TC_PEDIT_KEY_LEN];
    let mac = MacAddr([keys[4], keys[5], keys[6], keys[7], keys[TC_PEDIT_KEY_LEN + 4], keys[TC_PEDIT_KEY_LEN + 5]]);
    if keys != dst_mac_keys(mac).as_slice() {
        return Ok(foreign());
    }
    let Some(ex) = options.nested(TCA_PEDIT_KEYS_EX)? else { return Ok(foreign()) };
    let mut count = 0;
    for (kind, key) in ex.iter() {
        let key = Attrs::parse(key)?;
        let eth_set = key.u16(TCA_PEDIT_KEY_EX_HTYPE)? == Some(TCA_PEDIT_KEY_EX_HDR_TYPE_ETH)
            && key.u16(TCA_PEDIT_KEY_EX_CMD)?.unwrap_or(TCA_PEDIT_KEY_EX_CMD_SET) == TCA_PEDIT_KEY_EX_CMD_SET;
        if kind != TCA_PEDIT_KEY_EX || !eth_set {
            return Ok(foreign());
        }
        count += 1;
    }
    Ok(if count == 2 { Action::SetDstMac(mac) } else { foreign() })
}

fn parms<'a>(options: &Attrs<'a>, kind: u16, len: usize, what: &str) -> Result<&'a [u8], FabricError> {
    options
        .get(kind)
        .filter(|p| p.len() >= len)
        .ok_or_else(|| FabricError::Decode(format!("{what} action without its {len}-byte parameters")))
}

fn word(b: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn decode_action(act: &Attrs<'_>, name_of: &dyn Fn(u32) -> String) -> Result<Action, FabricError> {
    let kind = act.string(TCA_ACT_KIND)?.unwrap_or_default();
    let options = act.nested(TCA_ACT_OPTIONS)?.unwrap_or_default();
    Ok(match kind.as_str() {
        "mirred" => {
            let p = parms(&options, TCA_MIRRED_PARMS, TC_GEN_LEN + 8, "mirred")?;
            let dev = name_of(word(p, TC_GEN_LEN + 4) as u32);
            match word(p, TC_GEN_LEN) {
                TCA_EGRESS_REDIR => Action::Redirect { dev },
                TCA_EGRESS_MIRROR => Action::Mirror { dev },
                other => Action::Foreign { kind: format!("mirred {other}") },
            }
        }
        "vlan" => {
            let p = parms(&options, TCA_VLAN_PARMS, TC_GEN_LEN + 4, "vlan")?;
            match word(p, TC_GEN_LEN) {
                TCA_VLAN_ACT_POP => Action::VlanPop,
                TCA_VLAN_ACT_PUSH => Action::VlanPush { id: options.u16(TCA_VLAN_PUSH_VLAN_ID)?.unwrap_or(0) },
                other => Action::Foreign { kind: format!("vlan {other}") },
            }
        }
        "skbedit" => Action::Mark(options.u32(TCA_SKBEDIT_MARK)?.unwrap_or(0)),
        "tunnel_key" => {
            let p = parms(&options, TCA_TUNNEL_KEY_PARMS, TC_GEN_LEN + 4, "tunnel_key")?;
            match word(p, TC_GEN_LEN) {
                TCA_TUNNEL_KEY_ACT_RELEASE => Action::TunnelUnset,
                TCA_TUNNEL_KEY_ACT_SET => {
                    let v4 = (options.ipv4(TCA_TUNNEL_KEY_ENC_IPV4_SRC)?, options.ipv4(TCA_TUNNEL_KEY_ENC_IPV4_DST)?);
                    let (src, dst) = match v4 {
                        (Some(s), Some(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
                        _ => {
                            let src = options.ipv6(TCA_TUNNEL_KEY_ENC_IPV6_SRC)?;
                            let dst = options.ipv6(TCA_TUNNEL_KEY_ENC_IPV6_DST)?;
                            match (src, dst) {
                                (Some(s), Some(d)) => (IpAddr::V6(s), IpAddr::V6(d)),
                                _ => return Err(FabricError::Decode("tunnel_key set without addresses".into())),
                            }
                        }
                    };
                    Action::TunnelSet {
                        src,
                        dst,
                        vni: options.be32(TCA_TUNNEL_KEY_ENC_KEY_ID)?.unwrap_or(0),
                        port: options.be16(TCA_TUNNEL_KEY_ENC_DST_PORT)?.unwrap_or(0),
                    }
                }
                other => Action::Foreign { kind: format!("tunnel_key {other}") },
            }
        }
        "gact" => Action::Drop,
        "ct" => decode_ct(&options)?,
        "pedit" => decode_pedit(&options)?,
        "police" => {
            let p = parms(&options, TCA_POLICE_TBF, TC_POLICE_LEN, "police")?;
            let rate32 = word(p, 28) as u32;
            let rate = match options.get(TCA_POLICE_RATE64) {
                Some(v) if v.len() == 8 => u64::from_ne_bytes(v.try_into().unwrap_or_default()),
                _ => u64::from(rate32),
            };
            let burst_ticks = u128::from(word(p, 12) as u32);
            // Exact when the configured burst lasts a whole number of ticks, otherwise truncated.
            let burst = u32::try_from(burst_ticks * NS_PER_TICK * u128::from(rate) / 1_000_000_000).unwrap_or(u32::MAX);
            Action::Police { rate_bps: rate * 8, burst_bytes: burst }
        }
        other => Action::Foreign { kind: other.to_owned() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{PROTO_8021Q, PROTO_IPV4};

    fn names(dev: &str) -> Result<u32, FabricError> {
        match dev {
            "p0" => Ok(2),
            "pf0vf1" => Ok(11),
            "proxy0" => Ok(30),
            other => Err(FabricError::NoDevice(other.into())),
        }
    }

    fn index_names(ifindex: u32) -> String {
        match ifindex {
            2 => "p0".into(),
            11 => "pf0vf1".into(),
            30 => "proxy0".into(),
            n => format!("if{n}"),
        }
    }

    /// What a dump returns for a filter we installed: the request's options echoed, plus flags and stats.
    fn as_dumped(request: &[u8], in_hw: bool, packets: u32) -> Vec<u8> {
        let (msg, rest) = TcMsg::parse(request).unwrap();
        let top = Attrs::parse(rest).unwrap();
        let options = top.nested(TCA_OPTIONS).unwrap().unwrap();
        let mut echoed = Vec::new();
        for (kind, value) in options.iter() {
            if kind == TCA_FLOWER_FLAGS {
                let flags = u32::from_ne_bytes(value.try_into().unwrap()) | if in_hw { IN_HW } else { NOT_IN_HW };
                echoed.push(Attr::u32(kind, flags));
            } else if kind == TCA_FLOWER_ACT {
                let mut list = Vec::new();
                for (order, act) in Attrs::parse(value).unwrap().iter() {
                    let mut a: Vec<Attr> = Attrs::parse(act).unwrap().iter().map(|(k, v)| raw(k, v)).collect();
                    let mut basic = 1500u64.to_ne_bytes().to_vec();
                    basic.extend_from_slice(&packets.to_ne_bytes());
                    basic.extend_from_slice(&[0; 4]);
                    a.push(Attr::nested(TCA_ACT_STATS, vec![Attr::bytes(TCA_STATS_BASIC, basic)]));
                    list.push(Attr::nested(order, a));
                }
                echoed.push(Attr::nested(kind, list));
            } else {
                echoed.push(Attr::bytes(kind, value));
            }
        }
        echoed.push(Attr::u32(TCA_FLOWER_IN_HW_COUNT, u32::from(in_hw)));
        let mut out = Vec::new();
        msg.emit(&mut out);
        emit_all(&[Attr::string(TCA_KIND, "flower"), Attr::nested(TCA_OPTIONS, echoed)], &mut out);
        out
    }

    /// Re-wraps a decoded attribute, nesting the ones the kernel nests.
    fn raw(kind: u16, value: &[u8]) -> Attr {
        if kind == TCA_ACT_OPTIONS {
            Attr::nested(kind, Attrs::parse(value).unwrap().iter().map(|(k, v)| Attr::bytes(k, v)).collect())
        } else {
            Attr::bytes(kind, value)
        }
    }

    fn round_trip(keys: Keys, actions: Vec<Action>) {
        let id = RuleId { prio: 31, protocol: PROTO_IPV4, handle: 0x1234 };
        let request = filter(11, id, &keys, &actions, SKIP_HW, &[7; 16], &names).unwrap();
        let dumped = as_dumped(&request, false, 3);
        let f = decode_filter(&dumped, &index_names).unwrap().unwrap();
        assert_eq!(f.id, id);
        assert_eq!(f.keys, keys);
        assert_eq!(f.actions, actions);
        assert_eq!(f.flags, SKIP_HW | NOT_IN_HW);
        assert_eq!(f.in_hw_count, Some(0));
        assert_eq!(f.cookie.as_deref(), Some(&[7u8; 16][..]));
        assert_eq!((f.packets, f.bytes), (3, 1500));
    }

    #[test]
    fn flower_rules_round_trip() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        round_trip(
            Keys {
                eth_type: Some(PROTO_IPV4),
                src_mac: Some(mac),
                ip_proto: Some(6),
                dst_ip: Some("10.96.0.0/12".parse().unwrap()),
                dst_port: Some(8080),
                ..Keys::default()
            },
            vec![Action::Mark(0xfa0001), Action::Redirect { dev: "proxy0".into() }],
        );
        round_trip(
            Keys {
                eth_type: Some(PROTO_8021Q),
                vlan_id: Some(100),
                dst_mac: Some((MacAddr([1, 0, 0, 0, 0, 0]), MacAddr([1, 0, 0, 0, 0, 0]))),
                ..Keys::default()
            },
            vec![Action::VlanPop, Action::Mirror { dev: "pf0vf1".into() }, Action::Redirect { dev: "p0".into() }],
        );
        round_trip(
            Keys { dst_ip: Some("fd00::/64".parse().unwrap()), ..Keys::default() },
            vec![Action::VlanPush { id: 4094 }, Action::Drop],
        );
        round_trip(Keys::default(), vec![Action::Police { rate_bps: 100_000_000, burst_bytes: 125_056 }]);
        let tunnel = |src: &str, dst: &str| Action::TunnelSet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            vni: 5000,
            port: 4789,
        };
        round_trip(
            Keys { src_mac: Some(mac), ..Keys::default() },
            vec![
                tunnel("192.168.50.1", "192.168.50.2"),
                Action::Mirror { dev: "p0".into() },
                tunnel("fd00::1", "fd00::3"),
                Action::Redirect { dev: "p0".into() },
            ],
        );
        round_trip(
            Keys { enc_key_id: Some(5000), dst_mac: Some((mac, MacAddr([0xff; 6]))), ..Keys::default() },
            vec![Action::TunnelUnset, Action::Redirect { dev: "pf0vf1".into() }],
        );
        round_trip(Keys::default(), vec![Action::Police { rate_bps: 80_000_000_000, burst_bytes: 100_480 }]);
    }

    #[test]
    fn service_rules_round_trip() {
        use crate::rules::{CT_NEW, CT_TRACKED, IPPROTO_UDP};
        let vip = Keys {
            eth_type: Some(PROTO_IPV4),
            ip_proto: Some(6),
            dst_ip: Some("10.96.0.10/32".parse().unwrap()),
            dst_port: Some(80),
            ..Keys::default()
        };
        round_trip(
            Keys { ct_state: Some((0, CT_TRACKED)), ..vip.clone() },
            vec![Action::Ct { zone: 100, commit: false, nat: true, dnat: None }],
        );
        let dnat = Action::Ct { zone: 100, commit: true, nat: true, dnat: Some(("10.100.0.2".parse().unwrap(), 8080)) };
        let new = Keys { ct_state: Some((CT_TRACKED | CT_NEW, CT_TRACKED | CT_NEW)), ..vip.clone() };
        round_trip(Keys { src_port: Some((6, 0x1e)), ..new.clone() }, vec![dnat.clone()]);
        round_trip(
            Keys { src_ip: Some(("0.0.0.3".parse().unwrap(), "0.0.0.15".parse().unwrap())), ..new.clone() },
            vec![dnat],
        );
        round_trip(
            Keys {
                ip_proto: Some(IPPROTO_UDP),
                src_ip: Some(("10.100.0.2".parse().unwrap(), "255.255.255.255".parse().unwrap())),
                src_port: Some((53, u16::MAX)),
                ..vip.clone()
            },
            vec![Action::Ct { zone: 4196, commit: false, nat: true, dnat: None }],
        );
        round_trip(
            Keys { src_ip: Some(("fd00::2".parse().unwrap(), "ffff::".parse().unwrap())), ..Keys::default() },
            vec![Action::Drop],
        );
        round_trip(
            Keys { dst_mac: Some((MacAddr([2, 0xd9, 0xd0, 0x5e, 0, 1]), MacAddr([0xff; 6]))), ..vip },
            vec![Action::SetDstMac(MacAddr([2, 0, 0, 0, 0, 5])), Action::Redirect { dev: "pf0vf1".into() }],
        );
    }

    #[test]
    fn ct_and_pedit_wire_layout() {
        let id = RuleId { prio: 41, protocol: PROTO_IPV4, handle: 7 };
        let dnat = Action::Ct { zone: 100, commit: true, nat: true, dnat: Some(("10.100.0.2".parse().unwrap(), 80)) };
        let keys =
            Keys { ip_proto: Some(6), src_port: Some((0x17, 0x1e)), ct_state: Some((0x9, 0x9)), ..Keys::default() };
        let request =
            filter(11, id, &keys, &[dnat, Action::SetDstMac(MacAddr([1, 2, 3, 4, 5, 6]))], 0, &[], &names).unwrap();
        let (_, rest) = TcMsg::parse(&request).unwrap();
        let top = Attrs::parse(rest).unwrap();
        let options = top.nested(TCA_OPTIONS).unwrap().unwrap();
        assert_eq!(options.be16(TCA_FLOWER_KEY_TCP_SRC).unwrap(), Some(0x16), "the value is sent masked");
        assert_eq!(options.be16(TCA_FLOWER_KEY_TCP_SRC_MASK).unwrap(), Some(0x1e));
        assert_eq!(options.u16(TCA_FLOWER_KEY_CT_STATE_MASK).unwrap(), Some(0x9));
        let acts = options.nested(TCA_FLOWER_ACT).unwrap().unwrap();
        let ct = Attrs::parse(acts.get(1).unwrap()).unwrap();
        assert_eq!(ct.string(TCA_ACT_KIND).unwrap().as_deref(), Some("ct"));
        let o = ct.nested(TCA_ACT_OPTIONS).unwrap().unwrap();
        assert_eq!(word(o.get(TCA_CT_PARMS).unwrap(), 8), TC_ACT_UNSPEC, "classification continues");
        assert_eq!(o.u16(TCA_CT_ACTION).unwrap(), Some(1 | 8 | 32), "commit, nat, nat dst");
        assert_eq!(o.u16(TCA_CT_ZONE).unwrap(), Some(100));
        assert_eq!(o.get(TCA_CT_NAT_IPV4_MIN), Some(&[10, 100, 0, 2][..]));
        assert_eq!(o.be16(TCA_CT_NAT_PORT_MAX).unwrap(), Some(80));
        let pedit = Attrs::parse(acts.get(2).unwrap()).unwrap();
        let o = pedit.nested(TCA_ACT_OPTIONS).unwrap().unwrap();
        let sel = o.get(TCA_PEDIT_PARMS_EX).unwrap();
        assert_eq!(sel.len(), 24 + 2 * 24, "struct tc_pedit_sel + two keys");
        assert_eq!((word(sel, 8), sel[20]), (TC_ACT_UNSPEC, 2));
        // key 1: bytes 0-3 replaced; key 2: bytes 4-5 replaced, 6-7 (source MAC) kept.
        assert_eq!(&sel[24..32], &[0, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(&sel[48..56], &[0, 0, 0xff, 0xff, 5, 6, 0, 0]);
        assert_eq!(word(&sel[48..], 8), 4);
        let ex = o.nested(TCA_PEDIT_KEYS_EX).unwrap().unwrap();
        assert_eq!(ex.iter().count(), 2);
        for (kind, key) in ex.iter() {
            assert_eq!(kind, TCA_PEDIT_KEY_EX);
            assert_eq!(Attrs::parse(key).unwrap().u16(TCA_PEDIT_KEY_EX_HTYPE).unwrap(), Some(1), "Ethernet header");
        }
        // A ct action the fabric does not write (source NAT) reads back as foreign, never as one of ours.
        let mut foreign = Vec::new();
        let options = vec![
            Attr::bytes(TCA_CT_PARMS, tc_gen(TC_ACT_PIPE)),
            Attr::u16(TCA_CT_ACTION, TCA_CT_ACT_NAT | 16),
            Attr::u16(TCA_CT_ZONE, 1),
        ];
        emit_all(&[Attr::string(TCA_ACT_KIND, "ct"), Attr::nested(TCA_ACT_OPTIONS, options)], &mut foreign);
        let action = decode_action(&Attrs::parse(&foreign).unwrap(), &index_names).unwrap();
        assert!(matches!(action, Action::Foreign { .. }), "{action:?}");
    }

    #[test]
    fn digested_filters_carry_their_cookie() {
        let id = RuleId { prio: 60, protocol: 3, handle: 9 };
        let keys = Keys { dst_mac: Some((MacAddr([2, 0, 0, 0, 0, 9]), MacAddr([0xff; 6]))), ..Keys::default() };
        let actions = [Action::Redirect { dev: "p0".into() }];
        let (payload, cookie) = filter_digested(11, id, &keys, &actions, SKIP_HW, &names).unwrap();
        let f = decode_filter(&payload, &index_names).unwrap().unwrap();
        assert_eq!(
            (f.cookie.as_deref(), f.keys, f.actions.as_slice()),
            (Some(&cookie[..]), keys.clone(), &actions[..])
        );
        let (_, other) = filter_digested(11, id, &keys, &actions, SKIP_SW, &names).unwrap();
        assert_ne!(cookie, other);
        assert!(filter_digested(11, id, &keys, &[], SKIP_HW, &names).is_err(), "no action to carry the cookie");
    }

    #[test]
    fn wire_layout_matches_the_kernel_structs() {
        let id = RuleId { prio: 60, protocol: 0x0003, handle: 5 };
        let keys = Keys { dst_mac: Some((MacAddr([2, 0, 0, 0, 0, 9]), MacAddr([0xff; 6]))), ..Keys::default() };
        let request = filter(11, id, &keys, &[Action::Redirect { dev: "p0".into() }], SKIP_SW, &[], &names).unwrap();
        let (msg, rest) = TcMsg::parse(&request).unwrap();
        assert_eq!(msg, TcMsg { ifindex: 11, handle: 5, parent: 0xffff_fff2, info: 60 << 16 | 0x0300 });
        let top = Attrs::parse(rest).unwrap();
        let options = top.nested(TCA_OPTIONS).unwrap().unwrap();
        assert_eq!(options.u32(TCA_FLOWER_FLAGS).unwrap(), Some(SKIP_SW));
        let acts = options.nested(TCA_FLOWER_ACT).unwrap().unwrap();
        let first = Attrs::parse(acts.get(1).unwrap()).unwrap();
        assert_eq!(first.string(TCA_ACT_KIND).unwrap().as_deref(), Some("mirred"));
        assert!(first.get(TCA_ACT_COOKIE).is_none(), "an empty cookie is not sent");
        let p = first.nested(TCA_ACT_OPTIONS).unwrap().unwrap().get(TCA_MIRRED_PARMS).unwrap().to_vec();
        assert_eq!(p.len(), 28, "struct tc_mirred");
        assert_eq!((word(&p, 8), word(&p, 20), word(&p, 24)), (TC_ACT_STOLEN, TCA_EGRESS_REDIR, 2));
        assert!(filter(1, id, &keys, &[Action::Mirror { dev: "nope".into() }], 0, &[], &names).is_err());
        let police = police(8_000_000, 20_000);
        let mut buf = Vec::new();
        emit_all(&police, &mut buf);
        let p = Attrs::parse(&buf).unwrap();
        assert_eq!(p.get(TCA_POLICE_TBF).unwrap().len(), 56, "struct tc_police");
        assert_eq!(p.get(TCA_POLICE_RATE).unwrap().len(), 1024, "rate table");
        assert_eq!(p.u32(TCA_POLICE_RESULT).unwrap(), Some(u32::MAX), "conforming packets continue");
    }

    #[test]
    fn dump_headers_and_other_filters_are_skipped() {
        let mut header = Vec::new();
        TcMsg { ifindex: 11, handle: 0, parent: INGRESS_PARENT, info: 10 << 16 | 0x0300 }.emit(&mut header);
        emit_all(&[Attr::string(TCA_KIND, "flower")], &mut header);
        assert_eq!(decode_filter(&header, &index_names).unwrap(), None);
        let mut u32_filter = Vec::new();
        TcMsg { ifindex: 11, handle: 0x800, parent: INGRESS_PARENT, info: 1 << 16 }.emit(&mut u32_filter);
        emit_all(&[Attr::string(TCA_KIND, "u32")], &mut u32_filter);
        assert_eq!(decode_filter(&u32_filter, &index_names).unwrap(), None);
        assert!(decode_filter(&[0; 10], &index_names).is_err());
        let mut bare = Vec::new();
        TcMsg { ifindex: 11, handle: 1, parent: INGRESS_PARENT, info: 1 << 16 }.emit(&mut bare);
        emit_all(&[Attr::string(TCA_KIND, "flower")], &mut bare);
        assert!(decode_filter(&bare, &index_names).is_err(), "flower without options");
    }

    #[test]
    fn foreign_actions_are_read_not_fatal() {
        let mut act = Vec::new();
        emit_all(&[Attr::string(TCA_ACT_KIND, "pedit"), Attr::nested(TCA_ACT_OPTIONS, vec![])], &mut act);
        let mut payload = Vec::new();
        TcMsg { ifindex: 11, handle: 9, parent: INGRESS_PARENT, info: 1 << 16 | 0x0300 }.emit(&mut payload);
        let options = vec![Attr::nested(TCA_FLOWER_ACT, vec![Attr::bytes(1, act)])];
        emit_all(&[Attr::string(TCA_KIND, "flower"), Attr::nested(TCA_OPTIONS, options)], &mut payload);
        let f = decode_filter(&payload, &index_names).unwrap().unwrap();
        assert_eq!(f.actions, vec![Action::Foreign { kind: "pedit".into() }]);
        assert!(filter(11, f.id, &f.keys, &f.actions, 0, &[], &names).is_err(), "never installed");
    }

    #[test]
    fn qdisc_messages() {
        let req = clsact(7);
        let (ifindex, parent, kind) = decode_qdisc(&req).unwrap();
        assert_eq!((ifindex, parent, kind.as_str()), (7, TC_H_CLSACT, "clsact"));
        assert_eq!(filter_dump(7).len(), TCMSG_LEN + 8);
        assert_eq!(prefix_mask(24, 32), 0xffff_ff00);
        assert_eq!(prefix_mask(0, 32), 0);
        assert_eq!(prefix_mask(128, 128), u128::MAX);
    }
}
