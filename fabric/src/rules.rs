//! The flower rules the fabric needs, compiled from the intent and the port inventory.
//!
//! Every rule sits on the clsact ingress hook of one port (chain 0) and is identified there by
//! (priority, protocol, handle). Priorities group rules by class, so evaluation order does not depend on the
//! order rules were installed in. Flower stops at the first matching rule of a priority; rules whose actions
//! end in *continue* let classification go on with the next priority.
//!
//! | class | on | rule |
//! |---|---|---|
//! | 1 police | VF representor | `police` at the attachment's rate, exceeding traffic dropped, the rest continues |
//! | 2 steer | VF representor | mesh: TCP to a service port → `skbedit mark` + redirect to the proxy's capture device |
//! | 3 track | VF representor | service: to a VIP:port, untracked → `ct zone nat` (established: DNAT), continue |
//! | 3 track | VF representor | service backend: from its ip:port, untracked → `ct zone nat` (replies: un-DNAT), continue |
//! | 4 balance | VF representor | service: to a VIP:port, new, source port / address bucket → `ct commit nat dst` backend, continue (no ready backend: drop) |
//! | 5 gateway | VF representor | service: to the gateway MAC and a backend address → `pedit` dst MAC = backend's, continue |
//! | 6 local | VF representor | destination MAC of another pod of the same network on this host → redirect |
//! | 7 flood | VF representor, uplink | group address → mirror to the network's other pods (+ VLAN push, uplink) |
//! | 8 out | VF representor | the pod's own source MAC → VLAN push + redirect to the uplink |
//! | 9 drop | VF representor | everything else (spoofed source, no uplink) |
//! | 6 in | uplink | VLAN + destination MAC of a local pod → VLAN pop + redirect |
//! | 6 back | capture device | destination MAC of a mesh pod → redirect (the proxy's answers) |
//!
//! Handles are derived from the rule's match, so a rule keeps its identity across passes and restarts.
//!
//! Services: a pod sends to the VIP through the fabric's gateway MAC. On every pod port of the network the
//! first packet of a connection is tracked in the network's conntrack zone, committed with DNAT to the backend
//! its bucket maps to (2^k buckets of the client's source port, or of its address with client-IP affinity,
//! spread evenly over the ready backends), its destination MAC is rewritten to the backend pod's, and the local
//! rule delivers it. Later packets are translated by the track rule alone. On the backend's port its replies
//! are tracked in the same zone, which restores the VIP as their source, and the local rule delivers them to
//! the client.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use crate::model::{
    AttachmentSpec, Backend, FabricSpec, IpNet, MacAddr, Mode, PortId, Segment, ServiceSpec, SessionAffinity,
};
use crate::ports::Port;

/// `ETH_P_ALL`: the filter sees every protocol.
pub const PROTO_ALL: u16 = 0x0003;
pub const PROTO_IPV4: u16 = 0x0800;
pub const PROTO_IPV6: u16 = 0x86dd;
pub const PROTO_8021Q: u16 = 0x8100;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `TCA_FLOWER_KEY_CT_FLAGS_*`: conntrack state bits of the `ct_state` key.
pub const CT_NEW: u16 = 1 << 0;
pub const CT_ESTABLISHED: u16 = 1 << 1;
pub const CT_RELATED: u16 = 1 << 2;
pub const CT_TRACKED: u16 = 1 << 3;
pub const CT_INVALID: u16 = 1 << 4;
pub const CT_REPLY: u16 = 1 << 5;

/// Buckets a service's new connections are spread over (a power of two: a mask of the source port or address).
pub const SERVICE_BUCKETS: u16 = 16;

/// Rule classes; the priority of a rule is `class * 10 + protocol slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Police = 1,
    Steer = 2,
    Track = 3,
    Balance = 4,
    Gateway = 5,
    Local = 6,
    Flood = 7,
    Out = 8,
    Drop = 9,
}

/// Priority of a rule of `class` for `protocol`: one tc priority carries one protocol.
pub fn priority(class: Class, protocol: u16) -> u16 {
    let slot = match protocol {
        PROTO_IPV4 => 1,
        PROTO_IPV6 => 2,
        PROTO_8021Q => 3,
        _ => 0,
    };
    class as u16 * 10 + slot
}

/// Flower match keys (absent = wildcard).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Keys {
    /// `TCA_FLOWER_KEY_ETH_TYPE`: the outer EtherType (0x8100 for tagged frames).
    pub eth_type: Option<u16>,
    /// Destination MAC with its mask.
    pub dst_mac: Option<(MacAddr, MacAddr)>,
    pub src_mac: Option<MacAddr>,
    pub vlan_id: Option<u16>,
    pub vlan_eth_type: Option<u16>,
    pub ip_proto: Option<u8>,
    pub dst_ip: Option<IpNet>,
    /// Source address with its mask (any mask, not only prefixes).
    pub src_ip: Option<(IpAddr, IpAddr)>,
    /// Destination port of `ip_proto` (TCP or UDP).
    pub dst_port: Option<u16>,
    /// Source port of `ip_proto` (TCP or UDP) with its mask.
    pub src_port: Option<(u16, u16)>,
    /// Conntrack state bits ([`CT_TRACKED`], [`CT_NEW`], …) with their mask.
    pub ct_state: Option<(u16, u16)>,
    /// Tunnel key (VXLAN VNI) of a decapsulated frame.
    pub enc_key_id: Option<u32>,
}

/// iproute2's `ct_state` text: `+trk+new`, `-trk`.
pub fn ct_state_text(state: u16, mask: u16) -> String {
    let names = [
        (CT_TRACKED, "trk"),
        (CT_NEW, "new"),
        (CT_ESTABLISHED, "est"),
        (CT_RELATED, "rel"),
        (CT_INVALID, "inv"),
        (CT_REPLY, "rpl"),
    ];
    let mut out = String::new();
    for (bit, name) in names {
        if mask & bit != 0 {
            out.push(if state & bit != 0 { '+' } else { '-' });
            out.push_str(name);
        }
    }
    out
}

impl fmt::Display for Keys {
    /// iproute2-like text, e.g. `eth_type 0x8100 vlan_id 10 dst_mac 02:00:00:00:00:01`; `all` for no keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(t) = self.eth_type {
            parts.push(format!("eth_type {t:#06x}"));
        }
        if let Some(id) = self.vlan_id {
            parts.push(format!("vlan_id {id}"));
        }
        if let Some(t) = self.vlan_eth_type {
            parts.push(format!("vlan_ethtype {t:#06x}"));
        }
        if let Some(mac) = self.src_mac {
            parts.push(format!("src_mac {mac}"));
        }
        if let Some((mac, mask)) = self.dst_mac {
            parts.push(if mask == EXACT { format!("dst_mac {mac}") } else { format!("dst_mac {mac}/{mask}") });
        }
        if let Some(p) = self.ip_proto {
            parts.push(format!("ip_proto {p}"));
        }
        if let Some((ip, mask)) = self.src_ip {
            parts.push(format!("src_ip {ip}/{mask}"));
        }
        if let Some(ip) = self.dst_ip {
            parts.push(format!("dst_ip {ip}"));
        }
        if let Some((p, mask)) = self.src_port {
            parts.push(if mask == u16::MAX { format!("src_port {p}") } else { format!("src_port {p}/{mask:#x}") });
        }
        if let Some(p) = self.dst_port {
            parts.push(format!("dst_port {p}"));
        }
        if let Some((state, mask)) = self.ct_state {
            parts.push(format!("ct_state {}", ct_state_text(state, mask)));
        }
        if let Some(id) = self.enc_key_id {
            parts.push(format!("enc_key_id {id}"));
        }
        if parts.is_empty() { f.write_str("all") } else { f.write_str(&parts.join(" ")) }
    }
}

/// A tc action. Devices are netdev names; the switch resolves them to interface indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// mirred egress redirect: the packet leaves through `dev` and classification ends.
    Redirect {
        dev: String,
    },
    /// mirred egress mirror: a copy leaves through `dev`, the packet goes on to the next action.
    Mirror {
        dev: String,
    },
    VlanPush {
        id: u16,
    },
    VlanPop,
    /// skbedit mark.
    Mark(u32),
    /// gact drop.
    Drop,
    /// police: up to `rate_bps` bits per second with bursts of `burst_bytes`; the excess is dropped, conforming
    /// packets continue with the next filter.
    Police {
        rate_bps: u64,
        burst_bytes: u32,
    },
    /// tunnel_key set: the frame leaves through a collect-metadata tunnel device to `dst`.
    TunnelSet {
        src: IpAddr,
        dst: IpAddr,
        vni: u32,
        port: u16,
    },
    /// tunnel_key unset: drop the tunnel metadata of a decapsulated frame.
    TunnelUnset,
    /// act_ct in conntrack `zone`: looks the packet up (applying the connection's NAT when `nat`), commits a new
    /// connection when `commit`, with destination NAT to `dnat` when given. Classification continues with the
    /// next priority.
    Ct {
        zone: u16,
        commit: bool,
        nat: bool,
        dnat: Option<(Ipv4Addr, u16)>,
    },
    /// pedit: rewrites the destination MAC; classification continues with the next priority.
    SetDstMac(MacAddr),
    /// An action of another kind found on a port (read back only; the fabric never installs one).
    Foreign {
        kind: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redirect { dev } => write!(f, "redirect {dev}"),
            Self::Mirror { dev } => write!(f, "mirror {dev}"),
            Self::VlanPush { id } => write!(f, "vlan push {id}"),
            Self::VlanPop => f.write_str("vlan pop"),
            Self::Mark(m) => write!(f, "mark {m:#x}"),
            Self::Drop => f.write_str("drop"),
            Self::Police { rate_bps, burst_bytes } => write!(f, "police {rate_bps}bit burst {burst_bytes}"),
            Self::TunnelSet { src, dst, vni, port } => write!(f, "tunnel_key set {src} -> {dst}:{port} id {vni}"),
            Self::TunnelUnset => f.write_str("tunnel_key unset"),
            Self::Ct { zone, commit, nat, dnat } => {
                f.write_str("ct")?;
                if *commit {
                    f.write_str(" commit")?;
                }
                write!(f, " zone {zone}")?;
                match dnat {
                    Some((ip, port)) => write!(f, " nat dst addr {ip} port {port}"),
                    None if *nat => f.write_str(" nat"),
                    None => Ok(()),
                }
            }
            Self::SetDstMac(mac) => write!(f, "pedit eth dst set {mac}"),
            Self::Foreign { kind } => write!(f, "{kind}"),
        }
    }
}

/// One flower filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub prio: u16,
    pub protocol: u16,
    pub handle: u32,
    pub keys: Keys,
    pub actions: Vec<Action>,
    /// Attachment id the rule serves (status and stats are reported per attachment).
    pub owner: String,
}

impl Rule {
    /// (priority, protocol, handle): the rule's identity on its port.
    pub fn id(&self) -> RuleId {
        RuleId { prio: self.prio, protocol: self.protocol, handle: self.handle }
    }
}

/// Identity of a filter on a port's ingress hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleId {
    pub prio: u16,
    pub protocol: u16,
    pub handle: u32,
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prio {} protocol {:#06x} handle {:#x}", self.prio, self.protocol, self.handle)
    }
}

/// Rules for every port that needs some, keyed by netdev name.
pub type RuleSet = BTreeMap<String, Vec<Rule>>;

/// Why an attachment cannot be served right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unserved {
    pub attachment: String,
    pub reason: String,
}

/// Why a service is not (fully) served right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnservedService {
    pub service: String,
    pub reason: String,
}

/// Output of [`compile`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    pub rules: RuleSet,
    pub unserved: Vec<Unserved>,
    pub unserved_services: Vec<UnservedService>,
}

/// Owner of the rules of `services/{id}` (attachment ids cannot contain '/').
pub fn service_owner(id: &str) -> String {
    format!("services/{id}")
}

/// The conntrack zone of a pod network: its VLAN id, or for VXLAN networks 4096 + VNI mod 61440. Distinct
/// networks get distinct zones except VXLAN networks whose VNIs are equal modulo 61440 (compile reports them).
pub fn conntrack_zone(segment: Segment) -> u16 {
    match segment {
        Segment::Vlan(id) => id,
        Segment::Vxlan(vni) => u16::try_from(4096 + vni % 61_440).unwrap_or(u16::MAX),
    }
}

/// Spreads the `SERVICE_BUCKETS` buckets over the ready backends: each gets ⌈buckets / n⌉ at most, and each
/// bucket goes to the backend that ranks it highest (a hash of bucket and backend) among those with room. The
/// assignment depends only on the set of ready backends, and a backend leaving moves little more than its own
/// buckets. Returns, per bucket, an index into `ready`; empty without ready backends.
pub fn assign_buckets(ready: &[Backend]) -> Vec<usize> {
    if ready.is_empty() {
        return Vec::new();
    }
    let room = usize::from(SERVICE_BUCKETS).div_ceil(ready.len());
    let mut taken = vec![0usize; ready.len()];
    (0..SERVICE_BUCKETS)
        .map(|bucket| {
            let mut ranked: Vec<(u32, usize)> = ready
                .iter()
                .enumerate()
                .map(|(i, b)| (fnv1a32(format!("{bucket}/{}:{}", b.ip, b.port).as_bytes()), i))
                .collect();
            ranked.sort_by(|a, b| b.cmp(a));
            let pick = ranked.iter().map(|(_, i)| *i).find(|i| taken[*i] < room).unwrap_or(ranked[0].1);
            taken[pick] += 1;
            pick
        })
        .collect()
}

/// Default police burst: 10 ms at the rate, at least 16 KiB (so one TSO-sized burst fits).
pub fn default_burst(rate_bps: u64) -> u32 {
    u32::try_from((rate_bps / 8 / 100).max(16 * 1024)).unwrap_or(u32::MAX)
}

const MULTICAST_BIT: MacAddr = MacAddr([1, 0, 0, 0, 0, 0]);
const EXACT: MacAddr = MacAddr([0xff; 6]);

struct Local<'a> {
    id: &'a str,
    spec: &'a AttachmentSpec,
    dev: &'a str,
}

/// How a network reaches the other hosts.
struct Transport {
    /// Actions sending a pod's frame to the other hosts (ending in a redirect).
    out: Vec<Action>,
    /// Device frames from the other hosts arrive on, with the keys selecting this network there.
    dev: String,
    protocol: u16,
    keys: Keys,
    /// Action removing the network's encapsulation.
    decap: Action,
}

impl Transport {
    fn of(segment: Segment, uplink: Option<&str>, fabric: &FabricSpec) -> Option<Self> {
        match segment {
            Segment::Vlan(id) => {
                let up = uplink?;
                Some(Self {
                    out: vec![Action::VlanPush { id }, Action::Redirect { dev: up.to_owned() }],
                    dev: up.to_owned(),
                    protocol: PROTO_8021Q,
                    keys: Keys { eth_type: Some(PROTO_8021Q), vlan_id: Some(id), ..Keys::default() },
                    decap: Action::VlanPop,
                })
            }
            Segment::Vxlan(vni) => {
                let v = fabric.vxlan.as_ref()?;
                let mut out = Vec::new();
                for (i, peer) in v.peers.iter().enumerate() {
                    out.push(Action::TunnelSet { src: v.local, dst: *peer, vni, port: v.port });
                    let dev = v.device.clone();
                    out.push(if i + 1 == v.peers.len() { Action::Redirect { dev } } else { Action::Mirror { dev } });
                }
                // Without peers the network is local to this host; frames may still arrive from the device.
                if out.is_empty() {
                    out.push(Action::Drop);
                }
                Some(Self {
                    out,
                    dev: v.device.clone(),
                    protocol: PROTO_ALL,
                    keys: Keys { enc_key_id: Some(vni), ..Keys::default() },
                    decap: Action::TunnelUnset,
                })
            }
        }
    }
}

/// Compiles the attachments and services (id → spec) against the inventory into the rules each port needs.
/// Attachments whose port is missing (or whose mode needs what the fabric lacks) are reported in `unserved`
/// and get no rules; the others are unaffected. Services are reported in `unserved_services` when they have
/// backends that are no served pod of their network on this DPU (the other backends are served) or cannot be
/// served at all.
pub fn compile(
    fabric: &FabricSpec,
    attachments: &[(String, AttachmentSpec)],
    services: &[(String, ServiceSpec)],
    ports: &[Port],
) -> Compiled {
    let by_id: BTreeMap<PortId, &Port> = ports.iter().map(|p| (p.id, p)).collect();
    // Rules must not depend on the order attachments were listed in.
    let mut sorted: Vec<&(String, AttachmentSpec)> = attachments.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Compiled::default();
    let uplink = match fabric.uplink {
        None => None,
        Some(id) => match by_id.get(&id) {
            Some(p) => Some(p.netdev.as_str()),
            None => {
                // Without the uplink VLAN networks forward only locally; say so on their attachments.
                for (id_, spec) in &sorted {
                    if matches!(spec.segment, Segment::Vlan(_)) {
                        out.unserved.push(Unserved {
                            attachment: id_.clone(),
                            reason: format!("uplink port {id} is not present: traffic to other hosts is dropped"),
                        });
                    }
                }
                None
            }
        },
    };

    // Attachments that can be served, grouped by segment.
    let mut segments: BTreeMap<Segment, Vec<Local<'_>>> = BTreeMap::new();
    for (id, spec) in sorted {
        let Some(port) = by_id.get(&spec.port) else {
            out.unserved
                .push(Unserved { attachment: id.clone(), reason: format!("port {} is not present", spec.port) });
            continue;
        };
        let refusal = match (&spec.mode, spec.segment) {
            (Mode::Mesh { .. }, _) if fabric.capture_device.is_none() => {
                Some("mesh mode needs the fabric's capture_device")
            }
            (_, Segment::Vxlan(_)) if fabric.vxlan.is_none() => Some("VXLAN networks need the fabric's vxlan settings"),
            _ => None,
        };
        if let Some(reason) = refusal {
            out.unserved.push(Unserved { attachment: id.clone(), reason: reason.into() });
            continue;
        }
        segments.entry(spec.segment).or_default().push(Local { id, spec, dev: &port.netdev });
    }

    for (segment, locals) in &segments {
        let transport = Transport::of(*segment, uplink, fabric);
        for me in locals {
            let others: Vec<&Local<'_>> = locals.iter().filter(|o| o.id != me.id).collect();
            let rules = out.rules.entry(me.dev.to_owned()).or_default();
            let owner = me.id.to_owned();
            let rule = |class: Class, protocol: u16, keys: Keys, actions: Vec<Action>| Rule {
                prio: priority(class, protocol),
                protocol,
                handle: 0,
                keys,
                actions,
                owner: owner.clone(),
            };
            if let Some(rate) = me.spec.rate_limit_bps {
                let police = Action::Police { rate_bps: rate, burst_bytes: default_burst(rate) };
                rules.push(rule(Class::Police, PROTO_ALL, Keys::default(), vec![police]));
            }
            if let (Mode::Mesh { service_ports }, Some(capture)) = (&me.spec.mode, &fabric.capture_device) {
                for proto in [PROTO_IPV4, PROTO_IPV6] {
                    for port in service_ports {
                        let keys = Keys {
                            eth_type: Some(proto),
                            src_mac: Some(me.spec.mac),
                            ip_proto: Some(IPPROTO_TCP),
                            dst_port: Some(*port),
                            ..Keys::default()
                        };
                        let actions = vec![Action::Mark(me.spec.mark), Action::Redirect { dev: capture.clone() }];
                        rules.push(rule(Class::Steer, proto, keys, actions));
                    }
                }
            }
            for other in &others {
                let keys = Keys { dst_mac: Some((other.spec.mac, EXACT)), ..Keys::default() };
                rules.push(rule(Class::Local, PROTO_ALL, keys, vec![Action::Redirect { dev: other.dev.to_owned() }]));
            }
            // Group addresses (ARP, ND, DHCP): a copy to every other pod of the network, and to the other hosts.
            let mut flood: Vec<Action> = others.iter().map(|o| Action::Mirror { dev: o.dev.to_owned() }).collect();
            match &transport {
                Some(t) => flood.extend(t.out.iter().cloned()),
                None => flood.push(Action::Drop),
            }
            let keys =
                Keys { src_mac: Some(me.spec.mac), dst_mac: Some((MULTICAST_BIT, MULTICAST_BIT)), ..Keys::default() };
            rules.push(rule(Class::Flood, PROTO_ALL, keys, flood));
            if let Some(t) = &transport {
                let keys = Keys { src_mac: Some(me.spec.mac), ..Keys::default() };
                rules.push(rule(Class::Out, PROTO_ALL, keys, t.out.clone()));
            }
            rules.push(rule(Class::Drop, PROTO_ALL, Keys::default(), vec![Action::Drop]));

            if let Some(t) = &transport {
                let keys = Keys { dst_mac: Some((me.spec.mac, EXACT)), ..t.keys.clone() };
                let actions = vec![t.decap.clone(), Action::Redirect { dev: me.dev.to_owned() }];
                let r = rule(Class::Local, t.protocol, keys, actions);
                out.rules.entry(t.dev.clone()).or_default().push(r);
            }
        }
        if let Some(t) = &transport {
            let mut actions = vec![t.decap.clone()];
            for (i, l) in locals.iter().enumerate() {
                actions.push(if i + 1 == locals.len() {
                    Action::Redirect { dev: l.dev.to_owned() }
                } else {
                    Action::Mirror { dev: l.dev.to_owned() }
                });
            }
            let keys = Keys { dst_mac: Some((MULTICAST_BIT, MULTICAST_BIT)), ..t.keys.clone() };
            let owner = locals.iter().map(|l| l.id).collect::<Vec<_>>().join(",");
            let r = Rule {
                prio: priority(Class::Flood, t.protocol),
                protocol: t.protocol,
                handle: 0,
                keys,
                actions,
                owner,
            };
            out.rules.entry(t.dev.clone()).or_default().push(r);
        }
    }
    // The proxy answers steered connections through its capture device: deliver to the mesh pods by MAC.
    if let Some(capture) = &fabric.capture_device {
        for local in segments.values().flatten().filter(|l| matches!(l.spec.mode, Mode::Mesh { .. })) {
            let keys = Keys { dst_mac: Some((local.spec.mac, EXACT)), ..Keys::default() };
            let rule = Rule {
                prio: priority(Class::Local, PROTO_ALL),
                protocol: PROTO_ALL,
                handle: 0,
                keys,
                actions: vec![Action::Redirect { dev: local.dev.to_owned() }],
                owner: local.id.to_owned(),
            };
            out.rules.entry(capture.clone()).or_default().push(rule);
        }
    }
    compile_services(fabric, services, &segments, &mut out);
    for rules in out.rules.values_mut() {
        assign_handles(rules);
    }
    out
}

/// Adds a rule for `owner`, or adds `owner` to an identical rule another service already needs on `dev`.
fn add_shared(out: &mut Compiled, dev: &str, rule: Rule) {
    let rules = out.rules.entry(dev.to_owned()).or_default();
    match rules.iter_mut().find(|r| r.prio == rule.prio && r.protocol == rule.protocol && r.keys == rule.keys) {
        Some(existing) if existing.actions == rule.actions => {
            if !existing.owner.split(',').any(|o| o == rule.owner) {
                existing.owner = format!("{},{}", existing.owner, rule.owner);
            }
        }
        // Same match, other actions: the first service (by id) keeps it; compile_services reports conflicts.
        Some(_) => {}
        None => rules.push(rule),
    }
}

fn compile_services(
    fabric: &FabricSpec,
    services: &[(String, ServiceSpec)],
    segments: &BTreeMap<Segment, Vec<Local<'_>>>,
    out: &mut Compiled,
) {
    let mut sorted: Vec<&(String, ServiceSpec)> = services.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let gateway = fabric.gateway_mac();
    // First service (by id) of each VIP:port/protocol of a network, and the network of each conntrack zone.
    let mut vips: BTreeMap<(Segment, Ipv4Addr, u16, u8), &str> = BTreeMap::new();
    let mut zones: BTreeMap<u16, Segment> = BTreeMap::new();
    for (id, svc) in sorted {
        let owner = service_owner(id);
        let mut unserved = |reason: String| out.unserved_services.push(UnservedService { service: id.clone(), reason });
        let proto = svc.protocol.number();
        if let Some(first) = vips.get(&(svc.segment, svc.vip, svc.port, proto)) {
            unserved(format!("{}:{}/{} on {} is services/{first}'s", svc.vip, svc.port, svc.protocol, svc.segment));
            continue;
        }
        let Some(locals) = segments.get(&svc.segment) else {
            unserved(format!("no pod of {} is served on this DPU", svc.segment));
            continue;
        };
        let zone = conntrack_zone(svc.segment);
        if let Some(other) = zones.get(&zone)
            && *other != svc.segment
        {
            unserved(format!("{} shares conntrack zone {zone} with {other}", svc.segment));
            continue;
        }
        zones.insert(zone, svc.segment);
        vips.insert((svc.segment, svc.vip, svc.port, proto), id);

        // Backends are pods of the network on this DPU, found by address.
        let pod_of = |ip: Ipv4Addr| locals.iter().find(|l| l.spec.ips.iter().any(|n| n.addr == IpAddr::V4(ip)));
        let served: Vec<(&Backend, &Local<'_>)> =
            svc.backends.iter().filter_map(|b| pod_of(b.ip).map(|l| (b, l))).collect();
        let missing: Vec<String> =
            svc.backends.iter().filter(|b| pod_of(b.ip).is_none()).map(|b| format!("{}:{}", b.ip, b.port)).collect();
        if !missing.is_empty() {
            unserved(format!("backends {} are no pod of {} on this DPU", missing.join(", "), svc.segment));
        }
        let ready: Vec<Backend> = served.iter().filter(|(b, _)| b.ready).map(|(b, _)| **b).collect();
        let buckets = assign_buckets(&ready);

        let l4 = Keys {
            eth_type: Some(PROTO_IPV4),
            ip_proto: Some(proto),
            dst_ip: Some(IpNet { addr: IpAddr::V4(svc.vip), prefix: 32 }),
            dst_port: Some(svc.port),
            ..Keys::default()
        };
        let rule = |class: Class, keys: Keys, actions: Vec<Action>| Rule {
            prio: priority(class, PROTO_IPV4),
            protocol: PROTO_IPV4,
            handle: 0,
            keys,
            actions,
            owner: owner.clone(),
        };
        let track = Action::Ct { zone, commit: false, nat: true, dnat: None };
        for client in locals {
            let keys = Keys { ct_state: Some((0, CT_TRACKED)), ..l4.clone() };
            add_shared(out, client.dev, rule(Class::Track, keys, vec![track.clone()]));
            let new = Keys { ct_state: Some((CT_TRACKED | CT_NEW, CT_TRACKED | CT_NEW)), ..l4.clone() };
            if buckets.is_empty() {
                // No ready backend: new connections are refused here rather than sent on with the VIP.
                add_shared(out, client.dev, rule(Class::Balance, new.clone(), vec![Action::Drop]));
            }
            let mask = SERVICE_BUCKETS - 1;
            for (bucket, backend) in buckets.iter().enumerate() {
                let bucket = u16::try_from(bucket).unwrap_or(mask);
                let b = &ready[*backend];
                let keys = match svc.session_affinity {
                    // Bits 1-4 of the port: Linux hands out even source ports to connect() first, so bit 0
                    // hardly varies.
                    SessionAffinity::None => Keys { src_port: Some((bucket << 1, mask << 1)), ..new.clone() },
                    SessionAffinity::ClientIp => Keys {
                        src_ip: Some((
                            IpAddr::V4(Ipv4Addr::from(u32::from(bucket))),
                            IpAddr::V4(Ipv4Addr::from(u32::from(mask))),
                        )),
                        ..new.clone()
                    },
                };
                let commit = Action::Ct { zone, commit: true, nat: true, dnat: Some((b.ip, b.port)) };
                add_shared(out, client.dev, rule(Class::Balance, keys, vec![commit]));
            }
            for (b, pod) in &served {
                let keys = Keys {
                    eth_type: Some(PROTO_IPV4),
                    dst_mac: Some((gateway, EXACT)),
                    dst_ip: Some(IpNet { addr: IpAddr::V4(b.ip), prefix: 32 }),
                    ..Keys::default()
                };
                add_shared(out, client.dev, rule(Class::Gateway, keys, vec![Action::SetDstMac(pod.spec.mac)]));
            }
        }
        for (b, pod) in &served {
            let keys = Keys {
                eth_type: Some(PROTO_IPV4),
                ip_proto: Some(proto),
                src_ip: Some((IpAddr::V4(b.ip), IpAddr::V4(Ipv4Addr::BROADCAST))),
                src_port: Some((b.port, u16::MAX)),
                ct_state: Some((0, CT_TRACKED)),
                ..Keys::default()
            };
            add_shared(out, pod.dev, rule(Class::Track, keys, vec![track.clone()]));
        }
    }
}

/// Gives every rule a handle derived from its priority and keys, unique per (priority, protocol); collisions
/// probe the next value, in a deterministic order.
fn assign_handles(rules: &mut [Rule]) {
    rules.sort_by_cached_key(|r| (r.prio, r.protocol, key_text(&r.keys)));
    let mut used: BTreeSet<(u16, u16, u32)> = BTreeSet::new();
    for r in rules.iter_mut() {
        let mut h = fnv1a32(key_text(&r.keys).as_bytes()) & 0x7fff_ffff;
        if h == 0 {
            h = 1;
        }
        while !used.insert((r.prio, r.protocol, h)) {
            h = if h == 0x7fff_ffff { 1 } else { h + 1 };
        }
        r.handle = h;
    }
}

fn key_text(k: &Keys) -> String {
    format!("{k:?}")
}

/// 32-bit FNV-1a.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MARK_BASE;
    use crate::ports::Port;

    pub(crate) fn port(name: &str, dev: &str, ifindex: u32) -> Port {
        Port {
            id: name.parse().unwrap(),
            netdev: dev.into(),
            ifindex,
            hw_tc_offload: false,
            source: crate::ports::PortSource::NetdevName,
        }
    }

    pub(crate) fn attach(vf: u16, vlan: u16, mode: Mode) -> AttachmentSpec {
        AttachmentSpec {
            port: PortId::vf(0, vf),
            mac: MacAddr([2, 0, 0, 0, vlan as u8, vf as u8]),
            ips: [format!("10.{vlan}.0.{vf}/24").parse().unwrap()].into(),
            segment: Segment::Vlan(vlan),
            mode,
            rate_limit_bps: None,
            spiffe_id: String::new(),
            mark: MARK_BASE + u32::from(vf),
        }
    }

    fn ports() -> Vec<Port> {
        vec![
            port("p0", "p0", 2),
            port("pf0vf1", "pf0vf1", 11),
            port("pf0vf2", "pf0vf2", 12),
            port("pf0vf3", "pf0vf3", 13),
        ]
    }

    fn fabric() -> FabricSpec {
        FabricSpec {
            uplink: Some("p0".parse().unwrap()),
            capture_device: Some("proxy0".into()),
            ..FabricSpec::default()
        }
    }

    #[test]
    fn two_networks_never_forward_to_each_other() {
        let a = vec![
            ("a".into(), attach(1, 10, Mode::Direct)),
            ("b".into(), attach(2, 10, Mode::Direct)),
            ("c".into(), attach(3, 20, Mode::Direct)),
        ];
        let c = compile(&fabric(), &a, &[], &ports());
        assert!(c.unserved.is_empty(), "{:?}", c.unserved);
        let targets = |dev: &str| -> BTreeSet<String> {
            c.rules[dev]
                .iter()
                .flat_map(|r| r.actions.iter())
                .filter_map(|a| match a {
                    Action::Redirect { dev } | Action::Mirror { dev } => Some(dev.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(targets("pf0vf1"), ["p0", "pf0vf2"].map(String::from).into());
        assert_eq!(targets("pf0vf3"), ["p0"].map(String::from).into(), "vf3 is alone on vlan 20");
        // The uplink delivers vlan 10 only to vf1/vf2 and vlan 20 only to vf3.
        for r in &c.rules["p0"] {
            let vlan = r.keys.vlan_id.unwrap();
            for a in &r.actions {
                if let Action::Redirect { dev } | Action::Mirror { dev } = a {
                    assert_eq!(vlan == 20, dev == "pf0vf3", "{r:?}");
                }
            }
        }
        // Egress to the uplink is tagged with the pod's own vlan.
        let out = c.rules["pf0vf3"].iter().find(|r| r.prio == priority(Class::Out, PROTO_ALL)).unwrap();
        assert_eq!(out.actions[0], Action::VlanPush { id: 20 });
    }

    #[test]
    fn identities_are_stable_and_unique() {
        let a = vec![("a".into(), attach(1, 10, Mode::Direct)), ("b".into(), attach(2, 10, Mode::Direct))];
        let first = compile(&fabric(), &a, &[], &ports());
        let mut reversed = a.clone();
        reversed.reverse();
        assert_eq!(compile(&fabric(), &reversed, &[], &ports()).rules, first.rules, "input order must not matter");
        for rules in first.rules.values() {
            let ids: BTreeSet<RuleId> = rules.iter().map(Rule::id).collect();
            assert_eq!(ids.len(), rules.len());
            assert!(rules.iter().all(|r| r.handle != 0));
        }
    }

    #[test]
    fn mesh_steers_service_ports_with_the_mark() {
        let mut spec = attach(1, 10, Mode::Mesh { service_ports: [80, 443].into() });
        spec.rate_limit_bps = Some(100_000_000);
        let c = compile(&fabric(), &[("m".into(), spec.clone())], &[], &ports());
        let rules = &c.rules["pf0vf1"];
        let steer: Vec<&Rule> = rules.iter().filter(|r| r.prio / 10 == Class::Steer as u16).collect();
        assert_eq!(steer.len(), 4, "two ports, IPv4 and IPv6");
        for r in steer {
            assert_eq!(r.actions, vec![Action::Mark(spec.mark), Action::Redirect { dev: "proxy0".into() }]);
            assert_eq!(r.keys.ip_proto, Some(IPPROTO_TCP));
            assert_eq!(r.keys.eth_type, Some(r.protocol));
        }
        let back = &c.rules["proxy0"];
        assert_eq!(back.len(), 1, "the proxy's answers go back to the pod");
        assert_eq!(back[0].actions, vec![Action::Redirect { dev: "pf0vf1".into() }]);
        let police = &rules[0];
        assert_eq!(police.prio, 10);
        assert!(matches!(police.actions[0], Action::Police { rate_bps: 100_000_000, .. }));
        // Without a capture device the mesh attachment is refused, visibly.
        let bare = FabricSpec { capture_device: None, ..fabric() };
        let c = compile(&bare, &[("m".into(), spec)], &[], &ports());
        assert!(c.rules.is_empty());
        assert_eq!(c.unserved[0].attachment, "m");
    }

    #[test]
    fn vxlan_networks_go_to_every_peer_and_come_back_by_vni() {
        let vxlan = crate::model::VxlanSpec {
            device: "vxlan0".into(),
            local: "192.168.50.1".parse().unwrap(),
            port: 4789,
            peers: ["192.168.50.2".parse().unwrap(), "192.168.50.3".parse().unwrap()].into(),
        };
        let f = FabricSpec { vxlan: Some(vxlan), ..fabric() };
        let mut a = attach(1, 10, Mode::Direct);
        a.segment = Segment::Vxlan(5000);
        let mut b = attach(2, 10, Mode::Direct);
        b.segment = Segment::Vxlan(5000);
        let c = compile(&f, &[("a".into(), a.clone()), ("b".into(), b)], &[], &ports());
        assert!(c.unserved.is_empty(), "{:?}", c.unserved);
        assert!(!c.rules.contains_key("p0"), "VXLAN networks do not use the VLAN uplink");
        let out = c.rules["pf0vf1"].iter().find(|r| r.prio == priority(Class::Out, PROTO_ALL)).unwrap();
        let tunnel = |dst: &str| Action::TunnelSet {
            src: "192.168.50.1".parse().unwrap(),
            dst: dst.parse().unwrap(),
            vni: 5000,
            port: 4789,
        };
        assert_eq!(
            out.actions,
            vec![
                tunnel("192.168.50.2"),
                Action::Mirror { dev: "vxlan0".into() },
                tunnel("192.168.50.3"),
                Action::Redirect { dev: "vxlan0".into() },
            ]
        );
        let inbound = &c.rules["vxlan0"];
        assert_eq!(inbound.len(), 3, "two pods and the group rule");
        assert!(inbound.iter().all(|r| r.keys.enc_key_id == Some(5000) && r.actions[0] == Action::TunnelUnset));
        // Without the fabric's vxlan settings the attachment is refused, visibly.
        let c = compile(&fabric(), &[("a".into(), a)], &[], &ports());
        assert_eq!(c.unserved[0].reason, "VXLAN networks need the fabric's vxlan settings");
    }

    #[test]
    fn missing_ports_are_reported_not_fatal() {
        let a = vec![("a".into(), attach(1, 10, Mode::Direct)), ("z".into(), attach(9, 10, Mode::Direct))];
        let c = compile(&fabric(), &a, &[], &ports());
        assert_eq!(c.unserved, vec![Unserved { attachment: "z".into(), reason: "port pf0vf9 is not present".into() }]);
        assert!(c.rules.contains_key("pf0vf1"));
        let no_uplink = FabricSpec::default();
        let c = compile(&no_uplink, &a[..1], &[], &ports());
        assert!(!c.rules.contains_key("p0"));
        let flood = c.rules["pf0vf1"].iter().find(|r| r.prio == priority(Class::Flood, PROTO_ALL)).unwrap();
        assert_eq!(flood.actions, vec![Action::Drop], "alone and without uplink: nowhere to flood");
    }

    fn service(backends: &[(&str, u16, bool)], affinity: SessionAffinity) -> ServiceSpec {
        let mut s = ServiceSpec {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
            segment: Segment::Vlan(10),
            backends: backends
                .iter()
                .map(|(ip, port, ready)| Backend { ip: ip.parse().unwrap(), port: *port, ready: *ready })
                .collect(),
            session_affinity: affinity,
        };
        s.normalize();
        s
    }

    fn pods() -> Vec<(String, AttachmentSpec)> {
        vec![
            ("a".into(), attach(1, 10, Mode::Direct)),
            ("b".into(), attach(2, 10, Mode::Direct)),
            ("c".into(), attach(3, 10, Mode::Direct)),
        ]
    }

    fn class(rules: &[Rule], class: Class) -> Vec<&Rule> {
        rules.iter().filter(|r| r.prio == priority(class, PROTO_IPV4)).collect()
    }

    fn dnat_targets(rules: &[Rule]) -> BTreeMap<Ipv4Addr, usize> {
        let mut out = BTreeMap::new();
        for r in class(rules, Class::Balance) {
            if let [Action::Ct { dnat: Some((ip, _)), commit: true, .. }] = r.actions.as_slice() {
                *out.entry(*ip).or_default() += 1;
            }
        }
        out
    }

    #[test]
    fn services_balance_buckets_over_ready_local_backends() {
        // Backends are pods b (10.10.0.2) and c (10.10.0.3); a is the client.
        let svc = service(&[("10.10.0.2", 8080, true), ("10.10.0.3", 8080, true)], SessionAffinity::None);
        let c = compile(&fabric(), &pods(), &[("web".into(), svc.clone())], &ports());
        assert!(c.unserved.is_empty() && c.unserved_services.is_empty(), "{:?}", c.unserved_services);
        let vf1 = &c.rules["pf0vf1"];
        let track = class(vf1, Class::Track);
        assert_eq!(track.len(), 1);
        assert_eq!(track[0].keys.ct_state, Some((0, CT_TRACKED)));
        assert_eq!(track[0].actions, vec![Action::Ct { zone: 10, commit: false, nat: true, dnat: None }]);
        assert_eq!(track[0].owner, "services/web");
        let balance = class(vf1, Class::Balance);
        assert_eq!(balance.len(), usize::from(SERVICE_BUCKETS));
        let buckets: BTreeSet<(u16, u16)> = balance.iter().map(|r| r.keys.src_port.unwrap()).collect();
        assert_eq!(buckets.len(), usize::from(SERVICE_BUCKETS), "one rule per bucket");
        assert!(buckets.iter().all(|(_, mask)| *mask == 0x1e));
        assert!(balance.iter().all(|r| r.keys.ct_state == Some((CT_TRACKED | CT_NEW, CT_TRACKED | CT_NEW))));
        let spread = dnat_targets(vf1);
        assert_eq!(spread.values().copied().collect::<Vec<_>>(), vec![8, 8], "evenly over two backends");
        // The gateway MAC is rewritten to the backend pod's MAC, for every backend.
        let gateway = class(vf1, Class::Gateway);
        assert_eq!(gateway.len(), 2);
        for r in &gateway {
            assert_eq!(r.keys.dst_mac, Some((fabric().gateway_mac(), EXACT)));
            let ip = r.keys.dst_ip.unwrap().addr;
            let mac =
                if ip.to_string() == "10.10.0.2" { MacAddr([2, 0, 0, 0, 10, 2]) } else { MacAddr([2, 0, 0, 0, 10, 3]) };
            assert_eq!(r.actions, vec![Action::SetDstMac(mac)]);
        }
        // Replies are tracked on the backends' ports (and not on the client's).
        for dev in ["pf0vf2", "pf0vf3"] {
            let replies: Vec<&Rule> =
                class(&c.rules[dev], Class::Track).into_iter().filter(|r| r.keys.src_ip.is_some()).collect();
            assert_eq!(replies.len(), 1, "{dev}");
            assert_eq!(replies[0].keys.src_port, Some((8080, u16::MAX)));
        }
        assert!(class(vf1, Class::Track).iter().all(|r| r.keys.src_ip.is_none()));
        // Service classes come after mesh steering and before local delivery.
        assert!(priority(Class::Steer, PROTO_IPV6) < priority(Class::Track, PROTO_IPV4));
        assert!(priority(Class::Gateway, PROTO_IPV4) < priority(Class::Local, PROTO_ALL));
        // Deterministic: the same intent compiles to the same rules.
        assert_eq!(compile(&fabric(), &pods(), &[("web".into(), svc)], &ports()).rules, c.rules);
    }

    #[test]
    fn unready_backends_get_no_new_connections_and_move_only_their_buckets() {
        let three = [("10.10.0.1", 80, true), ("10.10.0.2", 80, true), ("10.10.0.3", 80, true)];
        let all = compile(&fabric(), &pods(), &[("web".into(), service(&three, SessionAffinity::None))], &ports());
        let mut two = three;
        two[2].2 = false;
        let fewer = compile(&fabric(), &pods(), &[("web".into(), service(&two, SessionAffinity::None))], &ports());
        let unready: Ipv4Addr = "10.10.0.3".parse().unwrap();
        assert!(!dnat_targets(&fewer.rules["pf0vf1"]).contains_key(&unready));
        assert_eq!(dnat_targets(&fewer.rules["pf0vf1"]).values().sum::<usize>(), usize::from(SERVICE_BUCKETS));
        // Buckets of the backends that stayed ready mostly stay where they were.
        let by_bucket = |c: &Compiled| -> BTreeMap<(u16, u16), Action> {
            class(&c.rules["pf0vf1"], Class::Balance)
                .iter()
                .map(|r| (r.keys.src_port.unwrap(), r.actions[0].clone()))
                .collect()
        };
        let (before, after) = (by_bucket(&all), by_bucket(&fewer));
        let moved_elsewhere = before
            .iter()
            .filter(|(k, a)| !matches!(a, Action::Ct { dnat: Some((ip, _)), .. } if *ip == unready) && after[*k] != **a)
            .count();
        assert!(moved_elsewhere <= 2, "{moved_elsewhere} buckets of ready backends moved");
        // The unready backend keeps its gateway and reply rules: established connections go on.
        assert_eq!(class(&fewer.rules["pf0vf1"], Class::Gateway).len(), 3);
        assert!(class(&fewer.rules["pf0vf3"], Class::Track).iter().any(|r| r.keys.src_ip.is_some()));
        // No ready backend at all: new connections to the VIP are dropped.
        let none = [("10.10.0.2", 80, false)];
        let c = compile(&fabric(), &pods(), &[("web".into(), service(&none, SessionAffinity::None))], &ports());
        let balance = class(&c.rules["pf0vf1"], Class::Balance);
        assert_eq!(balance.len(), 1);
        assert_eq!(balance[0].actions, vec![Action::Drop]);
    }

    #[test]
    fn client_ip_affinity_buckets_by_source_address() {
        let svc = service(&[("10.10.0.2", 80, true), ("10.10.0.3", 80, true)], SessionAffinity::ClientIp);
        let c = compile(&fabric(), &pods(), &[("web".into(), svc)], &ports());
        let balance = class(&c.rules["pf0vf1"], Class::Balance);
        assert_eq!(balance.len(), usize::from(SERVICE_BUCKETS));
        let mask: IpAddr = "0.0.0.15".parse().unwrap();
        assert!(balance.iter().all(|r| r.keys.src_port.is_none() && r.keys.src_ip.unwrap().1 == mask));
        assert!(balance[0].keys.to_string().contains("src_ip 0.0.0."), "{}", balance[0].keys);
    }

    #[test]
    fn unserved_backends_and_conflicts_are_reported() {
        let svc = service(&[("10.10.0.2", 80, true), ("10.10.0.99", 80, true)], SessionAffinity::None);
        let dup = service(&[("10.10.0.3", 80, true)], SessionAffinity::None);
        let mut other_net = dup.clone();
        other_net.segment = Segment::Vlan(20);
        let c = compile(
            &fabric(),
            &pods(),
            &[("web".into(), svc), ("web2".into(), dup), ("far".into(), other_net)],
            &ports(),
        );
        let reasons: BTreeMap<&str, &str> =
            c.unserved_services.iter().map(|u| (u.service.as_str(), u.reason.as_str())).collect();
        assert_eq!(reasons["web"], "backends 10.10.0.99:80 are no pod of vlan 10 on this DPU");
        assert!(reasons["web2"].contains("services/web's"), "{}", reasons["web2"]);
        assert_eq!(reasons["far"], "no pod of vlan 20 is served on this DPU");
        // web is served with its local backend; web2 got no rules.
        assert_eq!(dnat_targets(&c.rules["pf0vf1"]).keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.10.0.2"]);
        assert!(c.rules.values().flatten().all(|r| !r.owner.contains("web2")));
        // Two VXLAN networks whose VNIs share a conntrack zone: the second is refused.
        assert_eq!(conntrack_zone(Segment::Vxlan(5)), conntrack_zone(Segment::Vxlan(5 + 61_440)));
        assert_ne!(conntrack_zone(Segment::Vlan(100)), conntrack_zone(Segment::Vxlan(100)));
    }

    #[test]
    fn services_sharing_a_backend_share_its_rules() {
        let a = service(&[("10.10.0.2", 80, true)], SessionAffinity::None);
        let mut b = a.clone();
        b.vip = "10.96.0.11".parse().unwrap();
        let c = compile(&fabric(), &pods(), &[("a".into(), a), ("b".into(), b)], &ports());
        let gateway = class(&c.rules["pf0vf1"], Class::Gateway);
        assert_eq!(gateway.len(), 1, "one MAC rewrite per backend address");
        assert_eq!(gateway[0].owner, "services/a,services/b");
        let replies = class(&c.rules["pf0vf2"], Class::Track);
        assert_eq!(replies.iter().filter(|r| r.keys.src_ip.is_some()).count(), 1);
        for rules in c.rules.values() {
            let ids: BTreeSet<RuleId> = rules.iter().map(Rule::id).collect();
            assert_eq!(ids.len(), rules.len());
        }
    }
}
