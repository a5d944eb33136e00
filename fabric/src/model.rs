//! Validated fabric intent: what the API accepted, as stored in the intent store.
//!
//! - `fabrics/default` ([`FabricSpec`]): the node's uplink port and the proxy's capture device;
//! - `attachments/{id}` ([`AttachmentSpec`]): one VF attached to a pod network;
//! - `services/{id}` ([`ServiceSpec`]): a ClusterIP of a pod network balanced over backend pods.
//!
//! A port is named by its eSwitch identity ([`PortId`]: controller, PF, VF or SF number), never by the netdev
//! name its representor happens to have.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

pub use dpu_intent::Invalid;
use dpu_intent::{Resource, invalid};
use serde::{Deserialize, Serialize};

/// Id of the one [`FabricSpec`] object.
pub const FABRIC_ID: &str = "default";

/// First packet mark handed out to attachments that do not choose one; marks below are left to the host.
pub const MARK_BASE: u32 = 0x00fa_0000;

/// What an eSwitch port stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "number")]
pub enum Function {
    /// The physical port (uplink), `p{pf}`.
    Physical,
    /// The host's PCI physical function, `pf{pf}hpf`.
    HostPf,
    /// A PCI virtual function, `pf{pf}vf{n}`.
    Vf(u16),
    /// A scalable (sub)function, `pf{pf}sf{n}`.
    Sf(u32),
}

/// Identity of an eSwitch port: (controller, PF number, function). Controller 0 is the local host; external
/// hosts (multi-host / external controller) are 1 and up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortId {
    pub controller: u32,
    pub pf: u16,
    pub function: Function,
}

impl PortId {
    /// `pf{pf}vf{vf}` on controller 0.
    pub fn vf(pf: u16, vf: u16) -> Self {
        Self { controller: 0, pf, function: Function::Vf(vf) }
    }

    /// True for VFs and SFs: the ports a pod can be attached to.
    pub fn is_attachable(&self) -> bool {
        matches!(self.function, Function::Vf(_) | Function::Sf(_))
    }
}

impl fmt::Display for PortId {
    /// The kernel's `phys_port_name` form: `p0`, `pf0hpf`, `pf0vf3`, `pf1sf7`, with a `c{n}` prefix for
    /// controllers other than 0.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.controller != 0 {
            write!(f, "c{}", self.controller)?;
        }
        match self.function {
            Function::Physical => write!(f, "p{}", self.pf),
            Function::HostPf => write!(f, "pf{}hpf", self.pf),
            Function::Vf(n) => write!(f, "pf{}vf{n}", self.pf),
            Function::Sf(n) => write!(f, "pf{}sf{n}", self.pf),
        }
    }
}

/// A port name that is not in `phys_port_name` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a port name like p0, pf0hpf, pf0vf3, pf0sf2 or c1pf0vf3")]
pub struct BadPortName(pub String);

impl FromStr for PortId {
    type Err = BadPortName;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadPortName(text.to_owned());
        let number = |s: &str| -> Result<u32, BadPortName> {
            if s.is_empty() || s.len() > 7 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse().map_err(|_| bad())
        };
        let split_digits = |s: &str| -> (usize, usize) {
            let end = s.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
            (0, end)
        };
        let mut rest = text;
        let mut controller = 0;
        if let Some(r) = rest.strip_prefix('c') {
            let (_, end) = split_digits(r);
            controller = number(&r[..end])?;
            rest = &r[end..];
        }
        if let Some(r) = rest.strip_prefix("pf") {
            let (_, end) = split_digits(r);
            let pf = u16::try_from(number(&r[..end])?).map_err(|_| bad())?;
            let tail = &r[end..];
            let function = if tail == "hpf" {
                Function::HostPf
            } else if let Some(n) = tail.strip_prefix("vf") {
                Function::Vf(u16::try_from(number(n)?).map_err(|_| bad())?)
            } else if let Some(n) = tail.strip_prefix("sf") {
                Function::Sf(number(n)?)
            } else {
                return Err(bad());
            };
            return Ok(Self { controller, pf, function });
        }
        if let Some(r) = rest.strip_prefix('p') {
            let pf = u16::try_from(number(r)?).map_err(|_| bad())?;
            return Ok(Self { controller, pf, function: Function::Physical });
        }
        Err(bad())
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: Self = Self([0xff; 6]);

    /// True for group (multicast and broadcast) addresses.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{text:?} is not a MAC address like 02:00:00:00:00:01"));
        }
        for (byte, part) in out.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(format!("{text:?} is not a MAC address like 02:00:00:00:00:01"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{text:?} has a non-hex octet {part:?}"))?;
        }
        Ok(Self(out))
    }
}

/// An address with its prefix length, e.g. `10.0.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has a prefix length that is not 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

/// The L2 segment a pod network is carried on between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum Segment {
    /// 802.1Q VLAN on the uplink, 1..=4094.
    Vlan(u16),
    /// VXLAN network identifier, 1..=16777215, carried to the fabric's VXLAN peers.
    Vxlan(u32),
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vlan(id) => write!(f, "vlan {id}"),
            Self::Vxlan(vni) => write!(f, "vni {vni}"),
        }
    }
}

/// How the fabric treats an attached pod's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mode {
    /// The fabric forwards everything.
    Direct,
    /// TCP to `service_ports` is steered to the proxy's capture device (marked with the attachment's mark); the
    /// rest is forwarded.
    Mesh { service_ports: BTreeSet<u16> },
}

/// `attachments/{id}`: a VF attached to a pod network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentSpec {
    pub port: PortId,
    pub mac: MacAddr,
    pub ips: BTreeSet<IpNet>,
    pub segment: Segment,
    pub mode: Mode,
    /// Ingress rate limit (pod → fabric) in bits per second; `None` for unlimited.
    #[serde(default)]
    pub rate_limit_bps: Option<u64>,
    /// The pod's workload identity (SPIFFE ID).
    pub spiffe_id: String,
    /// Packet mark the fabric puts on the pod's steered traffic; the proxy identifies the workload by it.
    pub mark: u32,
}

impl Resource for AttachmentSpec {
    const KIND: &'static str = "attachments";
}

/// Smallest rate limit accepted: 8 kbit/s (one 1500-byte burst per 1.5 s).
pub const MIN_RATE_BPS: u64 = 8_000;

impl AttachmentSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.port.is_attachable() {
            return invalid("attachment.port", format!("{} is not a VF or SF", self.port));
        }
        if self.mac.is_multicast() || self.mac.is_zero() {
            return invalid("attachment.mac", format!("{} is not a unicast address", self.mac));
        }
        for ip in &self.ips {
            if ip.addr.is_unspecified() || ip.addr.is_multicast() {
                return invalid("attachment.ips", format!("{ip} is not a unicast address"));
            }
        }
        match self.segment {
            Segment::Vlan(id) if !(1..=4094).contains(&id) => {
                return invalid("attachment.vlan", format!("{id} is not in 1..=4094"));
            }
            Segment::Vxlan(vni) if !(1..=0xff_ffff).contains(&vni) => {
                return invalid("attachment.vni", format!("{vni} is not in 1..=16777215"));
            }
            Segment::Vlan(_) | Segment::Vxlan(_) => {}
        }
        if let Mode::Mesh { service_ports } = &self.mode {
            if service_ports.is_empty() {
                return invalid("attachment.service_ports", "mesh mode needs at least one service port");
            }
            if service_ports.contains(&0) {
                return invalid("attachment.service_ports", "0 is not a port");
            }
        }
        if let Some(rate) = self.rate_limit_bps
            && rate < MIN_RATE_BPS
        {
            return invalid("attachment.rate_limit_bps", format!("{rate} is below the minimum {MIN_RATE_BPS}"));
        }
        if !self.spiffe_id.is_empty() {
            validate_spiffe_id(&self.spiffe_id)?;
        }
        if self.mark == 0 {
            return invalid("attachment.mark", "0 means unmarked; a mark is required");
        }
        Ok(())
    }
}

/// `spiffe://trust-domain/path`, lower-case trust domain, no query or fragment.
pub fn validate_spiffe_id(id: &str) -> Result<(), Invalid> {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return invalid("attachment.spiffe_id", format!("{id:?} does not start with spiffe://"));
    };
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !domain_ok {
        return invalid("attachment.spiffe_id", format!("{id:?} has an invalid trust domain"));
    }
    let path_ok = path.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    });
    if path.is_empty() || !path_ok || id.len() > 2048 {
        return invalid("attachment.spiffe_id", format!("{id:?} needs a path of segments [A-Za-z0-9._-]"));
    }
    Ok(())
}

/// `fabrics/default`: the node's fabric-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FabricSpec {
    /// The physical port that leads to the other hosts (`p0`); `None`: pods talk only to pods on this host.
    #[serde(default)]
    pub uplink: Option<PortId>,
    /// Netdev the proxy captures steered traffic on (mesh mode); `None`: mesh attachments are refused.
    #[serde(default)]
    pub capture_device: Option<String>,
    /// How VXLAN networks reach the other hosts; `None`: VXLAN attachments are refused.
    #[serde(default)]
    pub vxlan: Option<VxlanSpec>,
    /// The MAC address pods send service (ClusterIP) traffic to; `None`: [`DEFAULT_SERVICE_GATEWAY_MAC`].
    #[serde(default)]
    pub service_gateway_mac: Option<MacAddr>,
}

/// The service gateway MAC when the fabric does not name one: locally administered, unicast.
pub const DEFAULT_SERVICE_GATEWAY_MAC: MacAddr = MacAddr([0x02, 0xd9, 0xd0, 0x5e, 0x00, 0x01]);

/// Default VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// VXLAN transport of the fabric: a collect-metadata (`external`) vxlan netdev (created by the reconciler when
/// missing), this host's tunnel endpoint and the other hosts' endpoints. Frames of a VXLAN network that are not
/// for a local pod go to every peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanSpec {
    pub device: String,
    pub local: IpAddr,
    pub port: u16,
    pub peers: BTreeSet<IpAddr>,
}

impl Resource for FabricSpec {
    const KIND: &'static str = "fabrics";
}

impl FabricSpec {
    /// The MAC address pods send service traffic to.
    pub fn gateway_mac(&self) -> MacAddr {
        self.service_gateway_mac.unwrap_or(DEFAULT_SERVICE_GATEWAY_MAC)
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(mac) = self.service_gateway_mac
            && (mac.is_multicast() || mac.is_zero())
        {
            return invalid("fabric.service_gateway_mac", format!("{mac} is not a unicast address"));
        }
        if let Some(uplink) = &self.uplink
            && uplink.function != Function::Physical
        {
            return invalid("fabric.uplink", format!("{uplink} is not a physical port"));
        }
        if let Some(dev) = &self.capture_device {
            validate_netdev_name("fabric.capture_device", dev)?;
        }
        if let Some(v) = &self.vxlan {
            validate_netdev_name("fabric.vxlan_device", &v.device)?;
            if v.local.is_unspecified() || v.local.is_multicast() {
                return invalid("fabric.vtep", format!("{} is not a unicast address", v.local));
            }
            if v.port == 0 {
                return invalid("fabric.vxlan_port", "0 is not a port");
            }
            for peer in &v.peers {
                if peer.is_ipv4() != v.local.is_ipv4()
                    || peer.is_unspecified()
                    || peer.is_multicast()
                    || *peer == v.local
                {
                    return invalid(
                        "fabric.vxlan_peers",
                        format!("{peer} is not a unicast address of the same family as {}, other than it", v.local),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// How a service picks the backend of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionAffinity {
    /// By the client's source port: connections spread over the backends.
    #[default]
    None,
    /// By the client's address: every connection of a client goes to the same backend.
    ClientIp,
}

/// One backend pod of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Ready (Kubernetes EndpointSlice condition): only ready backends get new connections; established ones
    /// to an unready backend go on.
    pub ready: bool,
}

/// Most backends of one service.
pub const MAX_BACKENDS: usize = 256;

/// `services/{id}`: a virtual address (ClusterIP) of a pod network, balanced over backend pods of that network
/// with conntrack DNAT in the eSwitch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub segment: Segment,
    /// Sorted by (ip, port), unique.
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
}

impl Resource for ServiceSpec {
    const KIND: &'static str = "services";
}

impl ServiceSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        let unicast = |ip: Ipv4Addr| !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast());
        if !unicast(self.vip) {
            return invalid("service.vip", format!("{} is not a unicast address", self.vip));
        }
        if self.port == 0 {
            return invalid("service.port", "0 is not a port");
        }
        match self.segment {
            Segment::Vlan(id) if !(1..=4094).contains(&id) => {
                return invalid("service.vlan", format!("{id} is not in 1..=4094"));
            }
            Segment::Vxlan(vni) if !(1..=0xff_ffff).contains(&vni) => {
                return invalid("service.vni", format!("{vni} is not in 1..=16777215"));
            }
            Segment::Vlan(_) | Segment::Vxlan(_) => {}
        }
        if self.backends.len() > MAX_BACKENDS {
            return invalid("service.backends", format!("{} backends; at most {MAX_BACKENDS}", self.backends.len()));
        }
        for pair in self.backends.windows(2) {
            if (pair[0].ip, pair[0].port) >= (pair[1].ip, pair[1].port) {
                return invalid("service.backends", format!("{}:{} is listed twice", pair[1].ip, pair[1].port));
            }
        }
        for b in &self.backends {
            if !unicast(b.ip) || b.ip == self.vip {
                return invalid("service.backends", format!("{} is not a unicast pod address", b.ip));
            }
            if b.port == 0 {
                return invalid("service.backends", format!("{}: 0 is not a port", b.ip));
            }
        }
        Ok(())
    }

    /// Sorts the backends into their stored order (by address and port).
    pub fn normalize(&mut self) {
        self.backends.sort_by_key(|b| (b.ip, b.port, b.ready));
    }
}

/// Linux interface names: 1-15 bytes, no '/', whitespace or ':'.
pub fn validate_netdev_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok { Ok(()) } else { invalid(field, format!("{name:?} is not a network device name")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> AttachmentSpec {
        AttachmentSpec {
            port: PortId::vf(0, 3),
            mac: "02:00:00:00:00:03".parse().unwrap(),
            ips: ["10.0.0.3/24".parse().unwrap()].into(),
            segment: Segment::Vlan(100),
            mode: Mode::Direct,
            rate_limit_bps: None,
            spiffe_id: "spiffe://cluster.local/ns/default/sa/web".into(),
            mark: MARK_BASE,
        }
    }

    #[test]
    fn port_names_round_trip() {
        for name in ["p0", "p1", "pf0hpf", "pf0vf3", "pf1sf7", "c1pf0vf3", "c2p1", "c1pf0hpf"] {
            let id: PortId = name.parse().unwrap();
            assert_eq!(id.to_string(), name);
        }
        assert_eq!("pf0vf12".parse::<PortId>().unwrap(), PortId::vf(0, 12));
        assert_eq!("c3pf1sf9".parse::<PortId>().unwrap().controller, 3);
        for bad in ["", "pf", "pf0", "pf0vf", "eth0", "pf0vf-1", "pfxvf1", "pf0vf99999999", "p", "c1", "pf0vf1x"] {
            assert!(bad.parse::<PortId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_and_prefix_parsing() {
        let mac: MacAddr = "02:aB:00:00:00:01".parse().unwrap();
        assert_eq!(mac.to_string(), "02:ab:00:00:00:01");
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:0g".parse::<MacAddr>().is_err());
        let net: IpNet = "10.1.2.3/16".parse().unwrap();
        assert_eq!((net.prefix, net.to_string().as_str()), (16, "10.1.2.3/16"));
        assert_eq!("fd00::1".parse::<IpNet>().unwrap().prefix, 128);
        assert!("10.0.0.1/33".parse::<IpNet>().is_err());
        assert!("nope/1".parse::<IpNet>().is_err());
    }

    #[test]
    fn attachment_rules() {
        attachment().validate().unwrap();
        let field = |a: AttachmentSpec| a.validate().unwrap_err().field;
        assert_eq!(field(AttachmentSpec { port: "p0".parse().unwrap(), ..attachment() }), "attachment.port");
        assert_eq!(field(AttachmentSpec { mac: MacAddr::BROADCAST, ..attachment() }), "attachment.mac");
        assert_eq!(field(AttachmentSpec { segment: Segment::Vlan(4095), ..attachment() }), "attachment.vlan");
        assert_eq!(field(AttachmentSpec { segment: Segment::Vxlan(1 << 24), ..attachment() }), "attachment.vni");
        AttachmentSpec { segment: Segment::Vxlan(5000), ..attachment() }.validate().unwrap();
        let mesh = Mode::Mesh { service_ports: BTreeSet::new() };
        assert_eq!(field(AttachmentSpec { mode: mesh, ..attachment() }), "attachment.service_ports");
        assert_eq!(field(AttachmentSpec { rate_limit_bps: Some(10), ..attachment() }), "attachment.rate_limit_bps");
        assert_eq!(field(AttachmentSpec { mark: 0, ..attachment() }), "attachment.mark");
        for bad in ["http://x/y", "spiffe://", "spiffe://UP/x", "spiffe://td", "spiffe://td/a//b", "spiffe://td/../x"] {
            assert_eq!(
                field(AttachmentSpec { spiffe_id: bad.into(), ..attachment() }),
                "attachment.spiffe_id",
                "{bad}"
            );
        }
    }

    #[test]
    fn fabric_rules() {
        let vxlan = VxlanSpec {
            device: "vxlan0".into(),
            local: "192.168.50.1".parse().unwrap(),
            port: VXLAN_PORT,
            peers: ["192.168.50.2".parse().unwrap()].into(),
        };
        let good = FabricSpec {
            uplink: Some("p0".parse().unwrap()),
            capture_device: Some("proxy0".into()),
            vxlan: Some(vxlan.clone()),
            service_gateway_mac: None,
        };
        good.validate().unwrap();
        let vf = FabricSpec { uplink: Some(PortId::vf(0, 1)), ..FabricSpec::default() };
        assert_eq!(vf.validate().unwrap_err().field, "fabric.uplink");
        let long = FabricSpec { capture_device: Some("x".repeat(16)), ..FabricSpec::default() };
        assert_eq!(long.validate().unwrap_err().field, "fabric.capture_device");
        let mixed = VxlanSpec { peers: ["fd00::2".parse().unwrap()].into(), ..vxlan.clone() };
        let mixed = FabricSpec { vxlan: Some(mixed), ..FabricSpec::default() };
        assert_eq!(mixed.validate().unwrap_err().field, "fabric.vxlan_peers");
        let zero = FabricSpec { vxlan: Some(VxlanSpec { port: 0, ..vxlan }), ..FabricSpec::default() };
        assert_eq!(zero.validate().unwrap_err().field, "fabric.vxlan_port");
    }

    fn service() -> ServiceSpec {
        ServiceSpec {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            segment: Segment::Vlan(100),
            backends: vec![
                Backend { ip: "10.100.0.2".parse().unwrap(), port: 8080, ready: true },
                Backend { ip: "10.100.0.3".parse().unwrap(), port: 8080, ready: false },
            ],
            session_affinity: SessionAffinity::None,
        }
    }

    #[test]
    fn service_rules() {
        service().validate().unwrap();
        let field = |s: ServiceSpec| s.validate().unwrap_err().field;
        assert_eq!(field(ServiceSpec { vip: Ipv4Addr::UNSPECIFIED, ..service() }), "service.vip");
        assert_eq!(field(ServiceSpec { vip: "224.0.0.1".parse().unwrap(), ..service() }), "service.vip");
        assert_eq!(field(ServiceSpec { port: 0, ..service() }), "service.port");
        assert_eq!(field(ServiceSpec { segment: Segment::Vlan(0), ..service() }), "service.vlan");
        assert_eq!(field(ServiceSpec { segment: Segment::Vxlan(1 << 24), ..service() }), "service.vni");
        let mut twice = service();
        twice.backends[1] = twice.backends[0];
        assert_eq!(field(twice), "service.backends");
        let mut unsorted = service();
        unsorted.backends.reverse();
        assert_eq!(field(unsorted.clone()), "service.backends");
        unsorted.normalize();
        unsorted.validate().unwrap();
        let mut zero = service();
        zero.backends[0].port = 0;
        assert_eq!(field(zero), "service.backends");
        let mut vip = service();
        vip.backends[0].ip = vip.vip;
        assert_eq!(field(vip), "service.backends");
        let json = serde_json::to_value(service()).unwrap();
        assert_eq!(json["protocol"], "tcp");
        assert_eq!(json["session_affinity"], "none");
        assert_eq!(serde_json::from_value::<ServiceSpec>(json).unwrap(), service());
        let bad_gw = FabricSpec { service_gateway_mac: Some(MacAddr::BROADCAST), ..FabricSpec::default() };
        assert_eq!(bad_gw.validate().unwrap_err().field, "fabric.service_gateway_mac");
        assert_eq!(FabricSpec::default().gateway_mac(), DEFAULT_SERVICE_GATEWAY_MAC);
        assert!(!DEFAULT_SERVICE_GATEWAY_MAC.is_multicast() && DEFAULT_SERVICE_GATEWAY_MAC.0[0] & 2 == 2);
    }

    #[test]
    fn stored_form_is_stable() {
        let json = serde_json::to_value(attachment()).unwrap();
        assert_eq!(json["port"]["function"], serde_json::json!({"kind": "vf", "number": 3}));
        assert_eq!(json["mac"], "02:00:00:00:00:03");
        let back: AttachmentSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, attachment());
    }
}
