//! The switch the fabric programs: [`Switch`], implemented over rtnetlink by [`NetlinkSwitch`] and simulated
//! in memory by [`SimSwitch`]. Both encode rules with the same netlink encoder; the simulation decodes what it
//! stored with the same decoder the real switch uses on the kernel's dumps.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::FabricError;
use crate::netlink::devlink::Devlink;
use crate::netlink::socket::{Ethtool, NlSocket};
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
    /// Interface index of a netdev.
    fn ifindex(&self, dev: &str) -> Result<u32, FabricError>;
    /// Whether `dev` has a clsact qdisc.
    fn has_clsact(&self, dev: &str) -> Result<bool, FabricError>;
    /// Adds the clsact qdisc to `dev`.
    fn add_clsact(&self, dev: &str) -> Result<(), FabricError>;
    /// Flower filters on the ingress hook of `dev`, chain 0.
    fn rules(&self, dev: &str) -> Result<Vec<Filter>, FabricError>;
    /// Installs `rule` on `dev` (in hardware only when `offload`, else in software only), replacing a filter
    /// with the same identity when `replace`. The rule carries `cookie` for later comparison.
    fn install(&self, dev: &str, rule: &Rule, offload: bool, cookie: &[u8], replace: bool) -> Result<(), FabricError>;
    /// Removes one filter.
    fn remove(&self, dev: &str, id: RuleId) -> Result<(), FabricError>;
    /// Number of writes (qdisc and filter changes) made so far.
    fn writes(&self) -> u64;
}

/// `TCA_CLS_FLAGS_*` for a port: `skip_sw` on offloading ports, `skip_hw` otherwise.
pub fn placement(offload: bool) -> u32 {
    if offload { tc::SKIP_SW } else { tc::SKIP_HW }
}

/// The cookie identifying a rule's exact content (including resolved interface indexes and placement): two
/// 64-bit FNV-1a digests with different offsets over the encoded filter.
pub fn cookie(
    ifindex: u32,
    rule: &Rule,
    offload: bool,
    resolve: &dyn Fn(&str) -> Result<u32, FabricError>,
) -> Result<Vec<u8>, FabricError> {
    let encoded = tc::filter(ifindex, rule.id(), &rule.keys, &rule.actions, placement(offload), &[], resolve)?;
    let fnv = |basis: u64| encoded.iter().fold(basis, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let mut out = fnv(0xcbf2_9ce4_8422_2325).to_be_bytes().to_vec();
    out.extend_from_slice(&fnv(0x6c62_272e_07bb_0142).to_be_bytes());
    Ok(out)
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

    fn names(&self) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.inventory.net_dir) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
                if let Some(i) =
                    std::fs::read_to_string(e.path().join("ifindex")).ok().and_then(|s| s.trim().parse().ok())
                {
                    out.insert(i, name);
                }
            }
        }
        out
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

    fn ifindex(&self, dev: &str) -> Result<u32, FabricError> {
        let path = self.inventory.net_dir.join(dev).join("ifindex");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| FabricError::NoDevice(dev.to_owned()))
    }

    fn has_clsact(&self, dev: &str) -> Result<bool, FabricError> {
        let ifindex = self.ifindex(dev)?;
        let dump = lock(&self.route).dump(tc::RTM_GETQDISC, &tc::qdisc_dump(), "listing qdiscs")?;
        for payload in dump {
            let (i, parent, kind) = tc::decode_qdisc(&payload)?;
            if i == ifindex && parent == tc::TC_H_CLSACT && kind == "clsact" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn add_clsact(&self, dev: &str) -> Result<(), FabricError> {
        let payload = tc::clsact(self.ifindex(dev)?);
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.route).request(
            tc::RTM_NEWQDISC,
            NLM_F_CREATE | NLM_F_EXCL,
            &payload,
            &format!("adding the clsact qdisc to {dev}"),
        )
    }

    fn rules(&self, dev: &str) -> Result<Vec<Filter>, FabricError> {
        let payload = tc::filter_dump(self.ifindex(dev)?);
        let dump = lock(&self.route).dump(tc::RTM_GETTFILTER, &payload, &format!("listing the filters of {dev}"))?;
        let names = self.names();
        let name_of = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));
        let mut out = Vec::new();
        for payload in dump {
            out.extend(tc::decode_filter(&payload, &name_of)?);
        }
        Ok(out)
    }

    fn install(&self, dev: &str, rule: &Rule, offload: bool, cookie: &[u8], replace: bool) -> Result<(), FabricError> {
        let resolve = |d: &str| self.ifindex(d);
        let payload =
            tc::filter(self.ifindex(dev)?, rule.id(), &rule.keys, &rule.actions, placement(offload), cookie, &resolve)?;
        let flags = if replace { NLM_F_CREATE | NLM_F_REPLACE } else { NLM_F_CREATE | NLM_F_EXCL };
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.route).request(tc::RTM_NEWTFILTER, flags, &payload, &format!("adding flower {} on {dev}", rule.id()))
    }

    fn remove(&self, dev: &str, id: RuleId) -> Result<(), FabricError> {
        let payload = tc::filter_delete(self.ifindex(dev)?, id);
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.route).request(tc::RTM_DELTFILTER, 0, &payload, &format!("deleting flower {id} on {dev}"))
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

    fn ifindex(&self, dev: &str) -> Result<u32, FabricError> {
        lock(&self.state).devices.get(dev).map(|d| d.ifindex).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))
    }

    fn has_clsact(&self, dev: &str) -> Result<bool, FabricError> {
        lock(&self.state).devices.get(dev).map(|d| d.clsact).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))
    }

    fn add_clsact(&self, dev: &str) -> Result<(), FabricError> {
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

    fn rules(&self, dev: &str) -> Result<Vec<Filter>, FabricError> {
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

    fn install(&self, dev: &str, rule: &Rule, offload: bool, cookie: &[u8], replace: bool) -> Result<(), FabricError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let request = format!("adding flower {} on {dev}", rule.id());
        let mut s = lock(&self.state);
        if let Some((refused_dev, message)) = &s.refuse
            && refused_dev == dev
        {
            return Err(Self::refused(request, 22, message));
        }
        let indexes: BTreeMap<String, u32> = s.devices.iter().map(|(n, d)| (n.clone(), d.ifindex)).collect();
        let resolve = |d: &str| indexes.get(d).copied().ok_or_else(|| FabricError::NoDevice(d.to_owned()));
        let d = s.devices.get_mut(dev).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))?;
        if !d.clsact {
            return Err(Self::refused(request, 22, "Parent Qdisc doesn't exists"));
        }
        if offload && !d.offload {
            return Err(Self::refused(request, 95, "TC offload is disabled on net device"));
        }
        if !replace && d.filters.contains_key(&rule.id()) {
            return Err(Self::refused(request, 17, "Filter already exists"));
        }
        let payload =
            tc::filter(d.ifindex, rule.id(), &rule.keys, &rule.actions, placement(offload), cookie, &resolve)?;
        d.filters.insert(rule.id(), payload);
        Ok(())
    }

    fn remove(&self, dev: &str, id: RuleId) -> Result<(), FabricError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut s = lock(&self.state);
        let d = s.devices.get_mut(dev).ok_or_else(|| FabricError::NoDevice(dev.to_owned()))?;
        match d.filters.remove(&id) {
            Some(_) => Ok(()),
            None => Err(Self::refused(
                format!("deleting flower {id} on {dev}"),
                2,
                "Filter with specified handle not found",
            )),
        }
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

    #[test]
    fn simulation_refuses_like_the_kernel() {
        let sim = SimSwitch::new();
        sim.add_device("a", Some(crate::model::PortId::vf(0, 1)), false);
        sim.add_device("b", None, false);
        let e = sim.install("a", &rule(1), false, &[], false).unwrap_err();
        assert!(e.to_string().contains("Parent Qdisc doesn't exists"), "{e}");
        sim.add_clsact("a").unwrap();
        assert!(sim.add_clsact("a").is_err());
        sim.install("a", &rule(1), false, &[1; 16], false).unwrap();
        assert_eq!(sim.install("a", &rule(1), false, &[], false).unwrap_err().errno(), Some(17));
        assert_eq!(sim.install("a", &rule(2), true, &[], false).unwrap_err().errno(), Some(95));
        let listed = sim.rules("a").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].actions, vec![Action::Redirect { dev: "b".into() }]);
        assert_eq!(listed[0].cookie.as_deref(), Some(&[1u8; 16][..]));
        assert_eq!(listed[0].flags & tc::NOT_IN_HW, tc::NOT_IN_HW);
        sim.remove("a", rule(1).id()).unwrap();
        assert_eq!(sim.remove("a", rule(1).id()).unwrap_err().errno(), Some(2));
        assert_eq!(sim.ports().unwrap().len(), 1);
    }

    #[test]
    fn cookies_follow_content_and_placement() {
        let resolve = |d: &str| if d == "b" { Ok(5) } else { Err(FabricError::NoDevice(d.into())) };
        let a = cookie(4, &rule(1), false, &resolve).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(a, cookie(4, &rule(1), false, &resolve).unwrap());
        assert_ne!(a, cookie(4, &rule(1), true, &resolve).unwrap(), "placement is part of the content");
        let moved = |d: &str| if d == "b" { Ok(6) } else { Err(FabricError::NoDevice(d.into())) };
        assert_ne!(a, cookie(4, &rule(1), false, &moved).unwrap(), "a re-created target device changes the rule");
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
            assert!(!switch.has_clsact(&name).unwrap());
            switch.add_clsact(&name).unwrap();
            assert!(switch.has_clsact(&name).unwrap());
            assert!(switch.rules(&name).unwrap().is_empty());
            let dup = switch.add_clsact(&name).unwrap_err();
            assert_eq!(dup.errno(), Some(17), "{dup}");
            // Flower may be missing from this kernel; if it is, the refusal carries the kernel's own words.
            let mut r = rule(1);
            r.actions = vec![Action::Redirect { dev: peer.clone() }];
            match switch.install(&name, &r, false, &[3; 16], false) {
                Ok(()) => {
                    let listed = switch.rules(&name).unwrap();
                    assert_eq!(listed.len(), 1);
                    assert_eq!(listed[0].actions, r.actions);
                    assert_eq!(listed[0].cookie.as_deref(), Some(&[3u8; 16][..]));
                    switch.remove(&name, r.id()).unwrap();
                }
                Err(e) => {
                    assert!(e.errno().is_some(), "{e}");
                    eprintln!("flower refused by this kernel: {e}");
                }
            }
            assert!(matches!(switch.ifindex("no-such-dev0"), Err(FabricError::NoDevice(_))));
        });
        let _ = ip(&["link", "del", &name]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
