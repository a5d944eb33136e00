//! The switch the fabric programs: [`Switch`], implemented over rtnetlink by [`NetlinkSwitch`] and simulated
//! in memory by [`SimSwitch`]. Both encode rules with the same netlink encoder; the simulation decodes what it
//! stored with the same decoder the real switch uses on the kernel's dumps.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::FabricError;
use crate::netlink::devlink::Devlink;
use crate::netlink::link;
use crate::netlink::socket::{Ethtool, NlSocket, Request};
use crate::netlink::tc::{self, Filter};
use crate::ports::{InventoryConfig, InventorySource, Port, PortSource, from_devlink, scan};
use crate::rules::{Rule, RuleId};

const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NETLINK_ROUTE: isize = 0;

/// What the fabric needs from an eSwitch.
pub trait Switch: Send + Sync + fmt::Debug + 'static {
    /// The port inventory.
    fn ports(&self) -> Result<Vec<Port>, FabricError>;
    /// Interface indexes of every netdev now: read once per pass, so encoding a rule reads nothing.
    fn links(&self) -> Result<Links, FabricError>;
    /// Whether `dev` has a clsact qdisc. Methods taking `links` name devices by the indexes read in it.
    fn has_clsact(&self, links: &Links, dev: &str) -> Result<bool, FabricError>;
    /// Adds the clsact qdisc to `dev`.
    fn add_clsact(&self, links: &Links, dev: &str) -> Result<(), FabricError>;
    /// Creates `dev`, up: a collect-metadata (`external`) VXLAN device on UDP `port` that does not learn.
    fn add_vxlan(&self, dev: &str, port: u16) -> Result<(), FabricError>;
    /// Flower filters on the ingress hook of `dev`, chain 0.
    fn rules(&self, links: &Links, dev: &str) -> Result<Vec<Filter>, FabricError>;
    /// Applies `changes` to the ingress hook of `dev` in order, returning one result per change: a refused
    /// change does not stop the ones after it. The netlink switch pipelines them (many requests per datagram).
    fn apply(&self, links: &Links, dev: &str, changes: &[Change<'_>]) -> Vec<Result<(), FabricError>>;
    /// Number of writes (qdisc and filter changes) made so far.
    fn writes(&self) -> u64;
}

/// Interface indexes by netdev name, as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    by_name: BTreeMap<String, u32>,
    /// The same, the other way round: decoding a dump names every redirect target.
    by_index: BTreeMap<u32, String>,
}

impl Links {
    pub fn new(by_name: BTreeMap<String, u32>) -> Self {
        let by_index = by_name.iter().map(|(n, i)| (*i, n.clone())).collect();
        Self { by_name, by_index }
    }

    /// Interface index of `dev`.
    pub fn ifindex(&self, dev: &str) -> Result<u32, FabricError> {
        self.by_name.get(dev).copied().ok_or_else(|| FabricError::NoDevice(dev.to_owned()))
    }

    /// Name of interface `ifindex`, or `if<N>` for one not present when the links were read.
    pub fn name_of(&self, ifindex: u32) -> String {
        self.by_index.get(&ifindex).cloned().unwrap_or_else(|| format!("if{ifindex}"))
    }
}

/// A rule encoded for one device: its `RTM_NEWTFILTER` payload, which carries its content cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub id: RuleId,
    /// Installed in hardware only (`skip_sw`) rather than software only.
    pub offload: bool,
    pub cookie: [u8; tc::COOKIE_LEN],
    pub payload: Vec<u8>,
}

/// Encodes `rule` for `dev` once: the payload and the cookie identifying its exact content (including the
/// resolved interface indexes and the placement).
pub fn encode(links: &Links, dev: &str, rule: &Rule, offload: bool) -> Result<Encoded, FabricError> {
    let resolve = |d: &str| links.ifindex(d);
    let (payload, cookie) =
        tc::filter_digested(links.ifindex(dev)?, rule.id(), &rule.keys, &rule.actions, placement(offload), &resolve)?;
    Ok(Encoded { id: rule.id(), offload, cookie, payload })
}

/// One write to a device's ingress hook.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Adds a filter that must not exist yet.
    Add(&'a Encoded),
    /// Replaces the filter with the same identity.
    Replace(&'a Encoded),
    /// Removes a filter.
    Remove(RuleId),
}

impl Change<'_> {
    /// Names the change in errors and logs, e.g. `adding flower prio 30 … on pf0vf1`.
    pub fn describe(&self, dev: &str) -> String {
        match self {
            Self::Add(e) | Self::Replace(e) => format!("adding flower {} on {dev}", e.id),
            Self::Remove(id) => format!("deleting flower {id} on {dev}"),
        }
    }
}

/// `TCA_CLS_FLAGS_*` for a port: `skip_sw` on offloading ports, `skip_hw` otherwise.
pub fn placement(offload: bool) -> u32 {
    if offload { tc::SKIP_SW } else { tc::SKIP_HW }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The real switch: rtnetlink for tc, ethtool netlink for `hw-tc-offload`, devlink (generic netlink) or sysfs
/// for the inventory.
#[derive(Debug)]
pub struct NetlinkSwitch {
    route: Mutex<NlSocket>,
    ethtool: Mutex<Option<Ethtool>>,
    devlink: Mutex<Option<Devlink>>,
    /// The inventory source of the last read, to log when it changes.
    last_source: Mutex<Option<&'static str>>,
    inventory: InventoryConfig,
    writes: AtomicU64,
}

impl NetlinkSwitch {
    pub fn open(inventory: InventoryConfig) -> Result<Self, FabricError> {
        let ethtool = match Ethtool::open() {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "ethtool netlink is unavailable: every port is treated as software-only");
                None
            }
        };
        Ok(Self {
            route: Mutex::new(NlSocket::open(NETLINK_ROUTE)?),
            ethtool: Mutex::new(ethtool),
            devlink: Mutex::new(None),
            last_source: Mutex::new(None),
            inventory,
            writes: AtomicU64::new(0),
        })
    }

    fn offloads(&self, dev: &str) -> bool {
        let mut ethtool = lock(&self.ethtool);
        let Some(e) = ethtool.as_mut() else { return false };
        match e.feature_active(dev, "hw-tc-offload") {
            Ok(on) => on,
            Err(err) => {
                tracing::debug!(dev, error = %err, "reading hw-tc-offload failed; treating the port as software-only");
                false
            }
        }
    }

    /// The eSwitch ports devlink reports; the socket is opened on first use and reopened after a failure.
    fn devlink_ports(&self) -> Result<Vec<Port>, FabricError> {
        let listed = {
            let mut devlink = lock(&self.devlink);
            if devlink.is_none() {
                *devlink = Some(Devlink::open()?);
            }
            let result = devlink.as_mut().map(Devlink::ports).unwrap_or_else(|| Ok(Vec::new()));
            if result.is_err() {
                *devlink = None;
            }
            result?
        };
        Ok(from_devlink(listed, &|dev| self.offloads(dev)))
    }

    /// Logs the inventory source when it differs from the previous read's.
    fn note_source(&self, source: &'static str, ports: usize, why: Option<String>) {
        let mut last = lock(&self.last_source);
        if *last != Some(source) {
            tracing::info!(source, ports, reason = why.unwrap_or_default(), "fabric port inventory source");
            *last = Some(source);
        }
    }
}

impl Switch for NetlinkSwitch {
    fn ports(&self) -> Result<Vec<Port>, FabricError> {
        let sysfs = || scan(&self.inventory, &|dev| self.offloads(dev));
        let (source, ports, why) = match self.inventory.source {
            InventorySource::Sysfs => ("sysfs", sysfs()?, None),
            InventorySource::Devlink => ("devlink", self.devlink_ports()?, None),
            InventorySource::Auto => match self.devlink_ports() {
                Ok(ports) if !ports.is_empty() => ("devlink", ports, None),
                Ok(_) => ("sysfs", sysfs()?, Some("devlink reports no eSwitch port with a netdev".to_owned())),
                Err(e) => ("sysfs", sysfs()?, Some(format!("devlink: {e}"))),
            },
        };
        self.note_source(source, ports.len(), why);
        Ok(ports)
    }

    /// One sysfs scan: every netdev's `ifindex`.
    fn links(&self) -> Result<Links, FabricError> {
        let mut by_name = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.inventory.net_dir) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
                if let Some(i) =
                    std::fs::read_to_string(e.path().join("ifindex")).ok().and_then(|s| s.trim().parse().ok())
                {
                    by_name.insert(name, i);
                }
            }
        }
        Ok(Links::new(by_name))
    }

    fn has_clsact(&self, links: &Links, dev: &str) -> Result<bool, FabricError> {
        let ifindex = links.ifindex(dev)?;
        let dump = lock(&self.route).dump(tc::RTM_GETQDISC, &tc::qdisc_dump(), "listing qdiscs")?;
        for payload in dump {
            let (i, parent, kind) = tc::decode_qdisc(&payload)?;
            if i == ifindex && parent == tc::TC_H_CLSACT && kind == "clsact" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn add_clsact(&self, links: &Links, dev: &str) -> Result<(), FabricError> {
        let payload = tc::clsact(links.ifindex(dev)?);
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.route).request(
            tc::RTM_NEWQDISC,
            NLM_F_CREATE | NLM_F_EXCL,
            &payload,
            &format!("adding the clsact qdisc to {dev}"),
        )
    }

    fn add_vxlan(&self, dev: &str, port: u16) -> Result<(), FabricError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.route).request(
            link::RTM_NEWLINK,
            NLM_F_CREATE | NLM_F_EXCL,
            &link::vxlan_external(dev, port),
            &format!("creating the VXLAN device {dev} (external, UDP port {port})"),
        )
    }

    fn rules(&self, links: &Links, dev: &str) -> Result<Vec<Filter>, FabricError> {
        let payload = tc::filter_dump(links.ifindex(dev)?);
        let dump = lock(&self.route).dump(tc::RTM_GETTFILTER, &payload, &format!("listing the filters of {dev}"))?;
        let mut out = Vec::new();
        for payload in dump {
            out.extend(tc::decode_filter(&payload, &|i| links.name_of(i))?);
        }
        Ok(out)
    }

    fn apply(&self, links: &Links, dev: &str, changes: &[Change<'_>]) -> Vec<Result<(), FabricError>> {
        if changes.is_empty() {
            return Vec::new();
        }
        let ifindex = match links.ifindex(dev) {
            Ok(i) => i,
            Err(_) => return changes.iter().map(|_| Err(FabricError::NoDevice(dev.to_owned()))).collect(),
        };
        let deletes: Vec<Vec<u8>> = changes
            .iter()
            .map(|c| match c {
                Change::Remove(id) => tc::filter_delete(ifindex, *id),
                Change::Add(_) | Change::Replace(_) => Vec::new(),
            })
            .collect();
        let requests: Vec<Request<'_>> = changes
            .iter()
            .zip(&deletes)
            .map(|(c, delete)| match c {
                Change::Add(e) => {
                    Request { message_type: tc::RTM_NEWTFILTER, flags: NLM_F_CREATE | NLM_F_EXCL, payload: &e.payload }
                }
                Change::Replace(e) => Request {
                    message_type: tc::RTM_NEWTFILTER,
                    flags: NLM_F_CREATE | NLM_F_REPLACE,
                    payload: &e.payload,
                },
                Change::Remove(_) => Request { message_type: tc::RTM_DELTFILTER, flags: 0, payload: delete },
            })
            .collect();
        self.writes.fetch_add(changes.len() as u64, Ordering::Relaxed);
        lock(&self.route).pipeline(&requests, &|i| changes[i].describe(dev))
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct SimDevice {
    ifindex: u32,
    clsact: bool,
    offload: bool,
    /// Encoded `RTM_NEWTFILTER` payloads by identity.
    filters: BTreeMap<RuleId, Vec<u8>>,
}

#[derive(Debug, Default)]
struct SimState {
    ports: BTreeMap<String, crate::model::PortId>,
    devices: BTreeMap<String, SimDevice>,
    next_ifindex: u32,
    /// Installs on this device fail with this kernel message.
    refuse: Option<(String, String)>,
}

/// A simulated eSwitch: netdevs, clsact qdiscs and flower filters held in memory, with the kernel's refusals
/// for missing qdiscs, duplicate and missing filters.
#[derive(Debug, Default)]
pub struct SimSwitch {
    state: Mutex<SimState>,
    writes: AtomicU64,
}

impl SimSwitch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a netdev (a representor when `port` is given); returns its ifindex.
    pub fn add_device(&self, dev: &str, port: Option<crate::model::PortId>, offload: bool) -> u32 {
        let mut s = lock(&self.state);
        s.next_ifindex += 1;
        let ifindex = s.next_ifindex + 1;
        s.devices.insert(dev.to_owned(), SimDevice { ifindex, offload, ..SimDevice::default() });
        if let Some(p) = port {
            s.ports.insert(dev.to_owned(), p);
        }
        ifindex
    }

    /// Removes a netdev with its qdisc and filters (a representor disappearing).
    pub fn remove_device(&self, dev: &str) {
        let mut s = lock(&self.state);
        s.devices.remove(dev);
        s.ports.remove(dev);
    }

    /// Deletes a filter behind the fabric's back (drift).
    pub fn tamper_remove(&self, dev: &str, id: RuleId) -> bool {
        lock(&self.state).devices.get_mut(dev).is_some_and(|d| d.filters.remove(&id).is_some())
    }

    /// Makes every later install on `dev` fail with `message`, or stops doing so with `None`.
    pub fn refuse_installs(&self, refusal: Option<(&str, &str)>) {
        lock(&self.state).refuse = refusal.map(|(d, m)| (d.to_owned(), m.to_owned()));
    }

    /// Number of filters on `dev`.
    pub fn filter_count(&self, dev: &str) -> usize {
        lock(&self.state).devices.get(dev).map_or(0, |d| d.filters.len())
    }

    fn apply_one(&self, dev: &str, change: &Change<'_>) -> Result<(), FabricError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let request = change.describe(dev);
        let mut s = lock(&self.state);
        let (encoded, replace) = match change {
            Change::Remove(id) => {
                let d = s.devices.get_mut(dev).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))?;
                return match d.filters.remove(id) {
                    Some(_) => Ok(()),
                    None => Err(Self::refused(request, 2, "Filter with specified handle not found")),
                };
            }
            Change::Add(e) => (*e, false),
            Change::Replace(e) => (*e, true),
        };
        if let Some((refused_dev, message)) = &s.refuse
            && refused_dev == dev
        {
            return Err(Self::refused(request, 22, message));
        }
        let d = s.devices.get_mut(dev).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))?;
        if !d.clsact {
            return Err(Self::refused(request, 22, "Parent Qdisc doesn't exists"));
        }
        if encoded.offload && !d.offload {
            return Err(Self::refused(request, 95, "TC offload is disabled on net device"));
        }
        let (msg, _) = tc::TcMsg::parse(&encoded.payload)?;
        if msg.ifindex != d.ifindex {
            return Err(Self::refused(request, 19, "Network device not found"));
        }
        if !replace && d.filters.contains_key(&encoded.id) {
            return Err(Self::refused(request, 17, "Filter already exists"));
        }
        d.filters.insert(encoded.id, encoded.payload.clone());
        Ok(())
    }

    fn refused(request: String, errno: i32, message: &str) -> FabricError {
        FabricError::Kernel { request, errno, message: message.to_owned() }
    }
}

impl Switch for SimSwitch {
    fn ports(&self) -> Result<Vec<Port>, FabricError> {
        let s = lock(&self.state);
        let mut out: Vec<Port> = s
            .ports
            .iter()
            .filter_map(|(dev, id)| {
                let d = s.devices.get(dev)?;
                Some(Port {
                    id: *id,
                    netdev: dev.clone(),
                    ifindex: d.ifindex,
                    hw_tc_offload: d.offload,
                    source: PortSource::NetdevName,
                })
            })
            .collect();
        out.sort_by_key(|p| p.id);
        Ok(out)
    }

    fn links(&self) -> Result<Links, FabricError> {
        Ok(Links::new(lock(&self.state).devices.iter().map(|(n, d)| (n.clone(), d.ifindex)).collect()))
    }

    fn has_clsact(&self, _links: &Links, dev: &str) -> Result<bool, FabricError> {
        lock(&self.state).devices.get(dev).map(|d| d.clsact).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))
    }

    fn add_clsact(&self, _links: &Links, dev: &str) -> Result<(), FabricError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut s = lock(&self.state);
        let d = s.devices.get_mut(dev).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))?;
        if d.clsact {
            return Err(Self::refused(
                format!("adding the clsact qdisc to {dev}"),
                17,
                "Exclusivity flag on, cannot modify",
            ));
        }
        d.clsact = true;
        Ok(())
    }

    fn add_vxlan(&self, dev: &str, _port: u16) -> Result<(), FabricError> {
        if lock(&self.state).devices.contains_key(dev) {
            return Err(Self::refused(format!("creating the VXLAN device {dev}"), 17, "File exists"));
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.add_device(dev, None, false);
        Ok(())
    }

    fn rules(&self, _links: &Links, dev: &str) -> Result<Vec<Filter>, FabricError> {
        let s = lock(&self.state);
        let d = s.devices.get(dev).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))?;
        let names: BTreeMap<u32, &str> = s.devices.iter().map(|(n, d)| (d.ifindex, n.as_str())).collect();
        let name_of = |i: u32| names.get(&i).map_or_else(|| format!("if{i}"), |n| (*n).to_owned());
        let mut out = Vec::new();
        for payload in d.filters.values() {
            if let Some(mut f) = tc::decode_filter(payload, &name_of)? {
                let in_hw = f.flags & tc::SKIP_SW != 0;
                f.flags |= if in_hw { tc::IN_HW } else { tc::NOT_IN_HW };
                f.in_hw_count = Some(u32::from(in_hw));
                out.push(f);
            }
        }
        Ok(out)
    }

    fn apply(&self, _links: &Links, dev: &str, changes: &[Change<'_>]) -> Vec<Result<(), FabricError>> {
        changes.iter().map(|c| self.apply_one(dev, c)).collect()
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Action, Keys};

    fn rule(handle: u32) -> Rule {
        Rule {
            prio: 30,
            protocol: 3,
            handle,
            keys: Keys::default(),
            actions: vec![Action::Redirect { dev: "b".into() }],
            owner: "x".into(),
        }
    }

    fn one(switch: &dyn Switch, links: &Links, dev: &str, change: Change<'_>) -> Result<(), FabricError> {
        switch.apply(links, dev, &[change]).pop().unwrap()
    }

    #[test]
    fn simulation_refuses_like_the_kernel() {
        let sim = SimSwitch::new();
        sim.add_device("a", Some(crate::model::PortId::vf(0, 1)), false);
        sim.add_device("b", None, false);
        let links = sim.links().unwrap();
        let r1 = encode(&links, "a", &rule(1), false).unwrap();
        let e = one(&sim, &links, "a", Change::Add(&r1)).unwrap_err();
        assert!(e.to_string().contains("Parent Qdisc doesn't exists"), "{e}");
        sim.add_clsact(&links, "a").unwrap();
        assert!(sim.add_clsact(&links, "a").is_err());
        one(&sim, &links, "a", Change::Add(&r1)).unwrap();
        assert_eq!(one(&sim, &links, "a", Change::Add(&r1)).unwrap_err().errno(), Some(17));
        let hw = encode(&links, "a", &rule(2), true).unwrap();
        assert_eq!(one(&sim, &links, "a", Change::Add(&hw)).unwrap_err().errno(), Some(95));
        let listed = sim.rules(&links, "a").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].actions, vec![Action::Redirect { dev: "b".into() }]);
        assert_eq!(listed[0].cookie.as_deref(), Some(&r1.cookie[..]));
        assert_eq!(listed[0].flags & tc::NOT_IN_HW, tc::NOT_IN_HW);
        // One batch: a refusal in the middle leaves the changes around it applied.
        let r3 = encode(&links, "a", &rule(3), false).unwrap();
        let results = sim.apply(&links, "a", &[Change::Remove(rule(1).id()), Change::Add(&hw), Change::Add(&r3)]);
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert_eq!(results[1].as_ref().unwrap_err().errno(), Some(95));
        assert_eq!(one(&sim, &links, "a", Change::Remove(rule(1).id())).unwrap_err().errno(), Some(2));
        assert_eq!(sim.ports().unwrap().len(), 1);
        assert_eq!(sim.writes(), 10, "every change counts, refused or not");
    }

    #[test]
    fn cookies_follow_content_and_placement() {
        let links = Links::new([("a".to_owned(), 4), ("b".to_owned(), 5)].into());
        let a = encode(&links, "a", &rule(1), false).unwrap();
        assert_eq!(a, encode(&links, "a", &rule(1), false).unwrap());
        assert_ne!(a.cookie, encode(&links, "a", &rule(1), true).unwrap().cookie, "placement is part of the content");
        let moved = Links::new([("a".to_owned(), 4), ("b".to_owned(), 6)].into());
        assert_ne!(a.cookie, encode(&moved, "a", &rule(1), false).unwrap().cookie, "a re-created target changes it");
        let mut other = rule(1);
        other.keys.vlan_id = Some(7);
        assert_ne!(a.cookie, encode(&links, "a", &other, false).unwrap().cookie, "the match is part of the content");
        assert!(matches!(encode(&links, "c", &rule(1), false), Err(FabricError::NoDevice(_))));
        // The payload carries exactly that cookie, read back by the dump decoder.
        let f =
            tc::decode_filter(&a.payload, &|i| if i == 5 { "b".into() } else { format!("if{i}") }).unwrap().unwrap();
        assert_eq!(f.cookie.as_deref(), Some(&a.cookie[..]));
        assert_eq!(f.actions, rule(1).actions);
    }

    #[test]
    fn netlink_switch_on_the_host_kernel() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (creates a veth pair and a clsact qdisc)");
            return;
        }
        if !crate::netlink::socket::tests::tc_netlink_works() {
            return;
        }
        let name = format!("fbt{}", std::process::id() % 100_000);
        let peer = format!("{name}p");
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().map(|s| s.success());
        if ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]).ok() != Some(true) {
            eprintln!("skipped: cannot create a veth pair here");
            return;
        }
        let result = std::panic::catch_unwind(|| {
            let switch = NetlinkSwitch::open(InventoryConfig::default()).unwrap();
            let links = switch.links().unwrap();
            assert!(!switch.has_clsact(&links, &name).unwrap());
            switch.add_clsact(&links, &name).unwrap();
            assert!(switch.has_clsact(&links, &name).unwrap());
            assert!(switch.rules(&links, &name).unwrap().is_empty());
            let dup = switch.add_clsact(&links, &name).unwrap_err();
            assert_eq!(dup.errno(), Some(17), "{dup}");
            // Flower may be missing from this kernel; if it is, the refusal carries the kernel's own words.
            let mut r = rule(1);
            r.actions = vec![Action::Redirect { dev: peer.clone() }];
            let e = encode(&links, &name, &r, false).unwrap();
            let batch: Vec<Encoded> = (2..=300)
                .map(|h| {
                    let mut r = r.clone();
                    r.handle = h;
                    r.keys.dst_mac = Some((
                        crate::model::MacAddr([2, 0, 0, 0, (h >> 8) as u8, h as u8]),
                        crate::model::MacAddr([0xff; 6]),
                    ));
                    encode(&links, &name, &r, false).unwrap()
                })
                .collect();
            match one(&switch, &links, &name, Change::Add(&e)) {
                Ok(()) => {
                    let listed = switch.rules(&links, &name).unwrap();
                    assert_eq!(listed.len(), 1);
                    assert_eq!(listed[0].actions, r.actions);
                    assert_eq!(listed[0].cookie.as_deref(), Some(&e.cookie[..]));
                    // Pipelined: more requests than one window, with a refusal (a duplicate) in the middle.
                    let mut changes: Vec<Change<'_>> = batch.iter().map(Change::Add).collect();
                    changes.insert(150, Change::Add(&e));
                    let results = switch.apply(&links, &name, &changes);
                    assert_eq!(results.len(), changes.len());
                    for (i, res) in results.iter().enumerate() {
                        if i == 150 {
                            assert_eq!(res.as_ref().unwrap_err().errno(), Some(17), "the duplicate is refused");
                        } else {
                            assert!(res.is_ok(), "request {i}: {res:?}");
                        }
                    }
                    assert_eq!(switch.rules(&links, &name).unwrap().len(), 300);
                    let removes: Vec<Change<'_>> = batch.iter().map(|e| Change::Remove(e.id)).collect();
                    assert!(switch.apply(&links, &name, &removes).iter().all(Result::is_ok));
                    one(&switch, &links, &name, Change::Remove(r.id())).unwrap();
                }
                Err(e) => {
                    assert!(e.errno().is_some(), "{e}");
                    eprintln!("flower refused by this kernel: {e}");
                }
            }
            assert!(matches!(links.ifindex("no-such-dev0"), Err(FabricError::NoDevice(_))));
        });
        let _ = ip(&["link", "del", &name]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
