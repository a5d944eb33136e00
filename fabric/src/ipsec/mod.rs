//! IPsec tunnels between DPUs: `ipsecTunnels/{id}` intent (outer addresses, traffic selectors, one SPI and one
//! RFC 4106 AES-GCM key per direction) programmed into the kernel's xfrm tables over netlink — two ESP states
//! and the out, in and fwd policies — by [`IpsecReconciler`], which repairs drift (a state or policy deleted
//! behind its back comes back on the next pass) and writes nothing when nothing differs.
//!
//! Keys are configured, not negotiated: the agent has no IKE daemon. Sites that want IKE run strongSwan and
//! leave these tunnels unset; the agent's states never collide with theirs (every state and policy it owns
//! carries a request id `0xd9xxxxxx`, and a SPI someone else holds is reported, not taken over).
//!
//! Placement follows the tunnel's crypto policy: with an offload device that has `esp-hw-offload` on, the
//! states (and, for packet offload, the policies) carry `XFRMA_OFFLOAD_DEV`; packet offload is tried first,
//! then crypto offload; `prefer-hardware` falls back to the kernel's software ESP and says why,
//! `require-hardware` leaves the tunnel in error instead. NICs that offload IPsec want its states and policies
//! in place before the tc rules that steer into them: the agent spawns this reconciler before the fabric's, and
//! within a pass states go in before policies and policies leave before states. The fabric installs no rule that
//! steers into an SA yet, so nothing makes it wait for a tunnel.

pub mod xfrm;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use dpu_crypto::keys::{KeyAlgorithm, Keys};
use dpu_crypto::policy::{Placement, Policy};
use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler};
use dpu_intent::{Invalid, Resource, Store, invalid};
use serde::{Deserialize, Serialize};

use crate::FabricError;
use crate::model::IpNet;
use crate::netlink::socket::NlSocket;
use xfrm::{Dir, Offload, Selector, State};

/// Status-board name of the IPsec reconciler.
pub const SUBSYSTEM: &str = "ipsec";
/// The high byte of the request id of every state and policy the agent owns.
pub const REQID_OWNER: u32 = 0xd9;
/// The engine name of the kernel's own ESP.
pub const SOFTWARE_ENGINE: &str = "kernel ESP, rfc4106(gcm(aes)) on the CPU";
/// Key algorithms a tunnel takes.
pub const KEY_ALGORITHMS: [KeyAlgorithm; 2] = [KeyAlgorithm::Aes128GcmEsp, KeyAlgorithm::Aes256GcmEsp];

/// `ipsecTunnels/{id}`: a tunnel-mode ESP tunnel to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelSpec {
    /// This end's outer address.
    pub local: IpAddr,
    /// The peer's outer address.
    pub remote: IpAddr,
    /// Traffic selectors: what goes through the tunnel.
    pub local_subnet: IpNet,
    pub remote_subnet: IpNet,
    /// SPI of the outbound state (the peer's inbound) and of the inbound state.
    pub spi_out: u32,
    pub spi_in: u32,
    /// `cryptoKeys/{id}` (aes-128-gcm-esp or aes-256-gcm-esp) per direction.
    pub key_out: String,
    pub key_in: String,
    #[serde(default)]
    pub policy: Policy,
    /// The netdev that may offload ESP (`esp-hw-offload`); empty: none.
    #[serde(default)]
    pub device: String,
    /// After a rekey (new SPIs), how long the previous states stay: the new outbound state is used at once
    /// (the kernel picks the newest), the old inbound one still accepts what the peer sends before it switches.
    #[serde(default = "default_overlap")]
    pub rekey_overlap_seconds: u32,
}

pub const DEFAULT_REKEY_OVERLAP_SECONDS: u32 = 30;

fn default_overlap() -> u32 {
    DEFAULT_REKEY_OVERLAP_SECONDS
}

impl Resource for TunnelSpec {
    const KIND: &'static str = "ipsecTunnels";
}

impl TunnelSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.local.is_ipv4() != self.remote.is_ipv4() {
            return invalid("tunnel.remote", "local and remote addresses must be of one family");
        }
        for (field, a) in [("tunnel.local", self.local), ("tunnel.remote", self.remote)] {
            if a.is_unspecified() || a.is_multicast() {
                return invalid(field, format!("{a} is not a unicast address"));
            }
        }
        if self.local == self.remote {
            return invalid("tunnel.remote", "equals the local address");
        }
        if self.local_subnet.addr.is_ipv4() != self.remote_subnet.addr.is_ipv4() {
            return invalid("tunnel.remote_subnet", "the two selectors must be of one family");
        }
        for (field, spi) in [("tunnel.spi_out", self.spi_out), ("tunnel.spi_in", self.spi_in)] {
            if spi < 256 {
                return invalid(field, format!("{spi} is reserved (RFC 4303: SPIs 0-255)"));
            }
        }
        for (field, key) in [("tunnel.key_out", &self.key_out), ("tunnel.key_in", &self.key_in)] {
            if key.is_empty() {
                return invalid(field, "required: a cryptoKeys id (aes-128-gcm-esp or aes-256-gcm-esp)");
            }
        }
        if self.device.len() > 15 || self.device.contains(['/', ' ']) {
            return invalid("tunnel.device", format!("{:?} is not a network device name", self.device));
        }
        if self.rekey_overlap_seconds > 3600 {
            return invalid("tunnel.rekey_overlap_seconds", "at most 3600");
        }
        if self.policy == Policy::RequireHardware && self.device.is_empty() {
            return invalid("tunnel.device", "require-hardware needs the device that offloads ESP");
        }
        Ok(())
    }

    fn outbound(&self) -> Selector {
        Selector {
            src: self.local_subnet.addr,
            src_len: self.local_subnet.prefix,
            dst: self.remote_subnet.addr,
            dst_len: self.remote_subnet.prefix,
        }
    }

    fn inbound(&self) -> Selector {
        Selector {
            src: self.remote_subnet.addr,
            src_len: self.remote_subnet.prefix,
            dst: self.local_subnet.addr,
            dst_len: self.local_subnet.prefix,
        }
    }
}

/// The request id of a tunnel's states and policies: the owner byte and 24 bits of the id's FNV-1a hash.
pub fn reqid(id: &str) -> u32 {
    let hash = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    REQID_OWNER << 24 | (hash & 0x00ff_ffff)
}

fn owned(reqid: u32) -> bool {
    reqid >> 24 == REQID_OWNER
}

/// What the reconciler last did per tunnel: placement and request id, for the API and the metrics.
#[derive(Debug, Clone, Default)]
pub struct Tunnels(Arc<RwLock<BTreeMap<String, TunnelState>>>);

#[derive(Debug, Clone)]
pub struct TunnelState {
    pub placement: Placement,
    pub reqid: u32,
    /// This end's outer address: a state from it is outbound.
    pub local: IpAddr,
}

impl Tunnels {
    pub fn get(&self, id: &str) -> Option<TunnelState> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn replace(&self, states: BTreeMap<String, TunnelState>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = states;
    }

    /// Bytes and packets per tunnel and direction (`out`, `in`) as the kernel counts them on the agent's states.
    /// Blocking (an xfrm dump).
    pub fn counters(&self) -> Result<Vec<(String, &'static str, u64, u64)>, FabricError> {
        let by_reqid: HashMap<u32, (String, IpAddr)> = self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, t)| (t.reqid, (id.clone(), t.local)))
            .collect();
        if by_reqid.is_empty() {
            return Ok(Vec::new());
        }
        let mut socket = NlSocket::open(xfrm::NETLINK_XFRM)?;
        // During a rekey's overlap a direction has two states: their counts add up.
        let mut sums: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
        for state in dump_states(&mut socket)? {
            if let Some((id, local)) = by_reqid.get(&state.reqid) {
                let direction = if state.src == *local { "out" } else { "in" };
                let sum = sums.entry((id.clone(), direction)).or_default();
                sum.0 += state.bytes;
                sum.1 += state.packets;
            }
        }
        Ok(sums.into_iter().map(|((id, direction), (bytes, packets))| (id, direction, bytes, packets)).collect())
    }
}

fn dump_states(socket: &mut NlSocket) -> Result<Vec<State>, FabricError> {
    let mut out = Vec::new();
    for payload in socket.dump(xfrm::XFRM_MSG_GETSA, &[], "listing xfrm states")? {
        if let Some(state) = State::decode(&payload)? {
            out.push(state);
        }
    }
    Ok(out)
}

fn dump_policies(socket: &mut NlSocket) -> Result<Vec<xfrm::Policy>, FabricError> {
    let mut out = Vec::new();
    for payload in socket.dump(xfrm::XFRM_MSG_GETPOLICY, &[], "listing xfrm policies")? {
        if let Some(policy) = xfrm::Policy::decode(&payload)? {
            out.push(policy);
        }
    }
    Ok(out)
}

/// Converges the kernel's xfrm tables towards the `ipsecTunnels` intent.
#[derive(Debug, Clone)]
pub struct IpsecReconciler {
    keys: Keys,
    tunnels: Tunnels,
}

/// One tunnel's desired states and policies, or why it has none.
struct Desired {
    states: Vec<State>,
    policies: Vec<xfrm::Policy>,
    placement: Placement,
}

impl IpsecReconciler {
    pub fn new(keys: Keys, tunnels: Tunnels) -> Self {
        Self { keys, tunnels }
    }

    /// Where a tunnel's ESP runs: the offload device and whether it can do packet offload, or software.
    fn place(spec: &TunnelSpec) -> Result<(Placement, Option<u32>), String> {
        let (hardware, missing, ifindex) = if spec.device.is_empty() {
            (None, "no offload device is set".to_owned(), None)
        } else {
            match offload_device(&spec.device) {
                Ok(ifindex) => (Some(format!("{} esp-hw-offload", spec.device)), String::new(), Some(ifindex)),
                Err(why) => (None, why, None),
            }
        };
        let placement = dpu_crypto::policy::place(spec.policy, hardware.as_deref(), &missing, SOFTWARE_ENGINE)
            .map_err(|e| e.to_string())?;
        let ifindex = if placement.hardware { ifindex } else { None };
        Ok((placement, ifindex))
    }

    fn desired(&self, store: &Store, id: &str, spec: &TunnelSpec) -> Result<Desired, String> {
        spec.validate().map_err(|e| e.to_string())?;
        let (placement, ifindex) = Self::place(spec)?;
        let key = |field: &str, key_id: &str| {
            self.keys
                .material(store, key_id, &KEY_ALGORITHMS)
                .map(|(_, m)| m.expose().to_vec())
                .map_err(|e| format!("{field}: {e}"))
        };
        let reqid = reqid(id);
        let offload = ifindex.map(|ifindex| Offload { ifindex, packet: true });
        let state = |src, dst, spi, field: &str, key_id: &str, inbound| -> Result<State, String> {
            Ok(State {
                src,
                dst,
                spi,
                reqid,
                key: key(field, key_id)?,
                offload: offload.map(|o| (o, inbound)),
                expires_after: 0,
                bytes: 0,
                packets: 0,
                added: 0,
            })
        };
        let states = vec![
            state(spec.local, spec.remote, spec.spi_out, "tunnel.key_out", &spec.key_out, false)?,
            state(spec.remote, spec.local, spec.spi_in, "tunnel.key_in", &spec.key_in, true)?,
        ];
        let policy =
            |selector, dir, tmpl_src, tmpl_dst| xfrm::Policy { selector, dir, tmpl_src, tmpl_dst, reqid, priority: 0 };
        let policies = vec![
            policy(spec.outbound(), Dir::Out, spec.local, spec.remote),
            policy(spec.inbound(), Dir::In, spec.remote, spec.local),
            policy(spec.inbound(), Dir::Fwd, spec.remote, spec.local),
        ];
        Ok(Desired { states, policies, placement })
    }

    /// One blocking pass: states first (a policy never points at a missing state), then policies; removals of
    /// tunnels no longer wanted go the other way round.
    fn converge(&self, store: &Store, tunnels: &[(String, TunnelSpec)]) -> Result<Outcome, FabricError> {
        let mut socket = NlSocket::open(xfrm::NETLINK_XFRM)?;
        let actual_states = dump_states(&mut socket)?;
        let actual_policies = dump_policies(&mut socket)?;
        tracing::debug!(states = actual_states.len(), policies = actual_policies.len(), "xfrm tables read");
        let mut outcome = Outcome::default();
        let mut wanted_states = Vec::new();
        let mut wanted_policies = Vec::new();
        let mut by_reqid: HashMap<u32, &str> = HashMap::new();
        for (id, spec) in tunnels {
            let reqid = reqid(id);
            if let Some(other) = by_reqid.insert(reqid, id) {
                outcome
                    .failed
                    .insert(id.clone(), format!("request id {reqid:#x} collides with tunnel {other}: rename it"));
                continue;
            }
            let desired = match self.desired(store, id, spec) {
                Ok(d) => d,
                Err(reason) => {
                    outcome.failed.insert(id.clone(), reason);
                    continue;
                }
            };
            match self.install_states(&mut socket, &actual_states, &desired.states, &mut outcome) {
                Ok(placement_note) => {
                    let mut placement = desired.placement.clone();
                    if let Some(note) = placement_note {
                        placement = note;
                    }
                    outcome.placed.insert(id.clone(), TunnelState { placement, reqid, local: spec.local });
                }
                Err(reason) => {
                    outcome.failed.insert(id.clone(), reason);
                    continue;
                }
            }
            for p in &desired.policies {
                let present = actual_policies.iter().any(|a| a == p);
                if !present {
                    tracing::debug!(tunnel = %id, dir = p.dir.as_str(), "xfrm policy missing or different");
                    let what = format!("xfrm policy {} of tunnel {id}", p.dir.as_str());
                    match socket.request(xfrm::XFRM_MSG_UPDPOLICY, 0, &p.encode(), &what) {
                        Ok(()) => outcome.changes += 1,
                        Err(e) => {
                            outcome.failed.insert(id.clone(), e.to_string());
                        }
                    }
                }
            }
            wanted_states.extend(desired.states.iter().map(|s| (s.dst, s.spi)));
            wanted_policies.extend(desired.policies.into_iter().map(|p| (p.selector, p.dir)));
        }
        for p in actual_policies.iter().filter(|p| owned(p.reqid)) {
            if !wanted_policies.contains(&(p.selector, p.dir)) {
                tracing::debug!(policy = ?p, "stale xfrm policy");
                socket.request(xfrm::XFRM_MSG_DELPOLICY, 0, &p.id(), "removing a stale xfrm policy")?;
                outcome.changes += 1;
            }
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for s in actual_states.iter().filter(|s| owned(s.reqid)) {
            if wanted_states.contains(&(s.dst, s.spi)) {
                continue;
            }
            // A state of a tunnel that is still installed was replaced by a rekey: it retires after the
            // tunnel's overlap, timed by the kernel itself; states of tunnels that are gone leave now.
            let rekeyed = tunnels.iter().find(|(id, _)| reqid(id) == s.reqid && outcome.placed.contains_key(id));
            match rekeyed {
                Some(_) if s.expires_after != 0 => {}
                Some((id, spec)) => {
                    let mut retiring = s.clone();
                    retiring.expires_after = now.saturating_sub(s.added) + u64::from(spec.rekey_overlap_seconds);
                    let what = format!("retiring xfrm state spi {:#x} of tunnel {id}", s.spi);
                    socket.request(xfrm::XFRM_MSG_UPDSA, 0, &retiring.encode(), &what)?;
                    tracing::info!(tunnel = %id, spi = format_args!("{:#x}", s.spi), overlap_s = spec.rekey_overlap_seconds, "rekeyed: the previous ESP state retires");
                    outcome.changes += 1;
                }
                None => {
                    tracing::debug!(state = ?s, "stale xfrm state");
                    socket.request(xfrm::XFRM_MSG_DELSA, 0, &s.id(), "removing a stale xfrm state")?;
                    outcome.changes += 1;
                }
            }
        }
        Ok(outcome)
    }

    /// Installs a tunnel's two states where missing or different. With an offload device, packet offload is
    /// tried, then crypto offload; `Ok(Some(p))` when the placement ended below what was planned.
    fn install_states(
        &self,
        socket: &mut NlSocket,
        actual: &[State],
        desired: &[State],
        outcome: &mut Outcome,
    ) -> Result<Option<Placement>, String> {
        let mut note = None;
        for want in desired {
            let existing = actual.iter().find(|a| a.dst == want.dst && a.spi == want.spi);
            if let Some(a) = existing {
                if !owned(a.reqid) {
                    return Err(format!(
                        "SPI {:#x} to {} is held by another xfrm state (request id {:#x}), not the agent's",
                        want.spi, want.dst, a.reqid
                    ));
                }
                let same = a.same_config(want) || (want.offload.is_some() && a.same_config(&crypto_only(want)));
                // A retiring state wanted again (a rekey rolled back) is replaced, so it stops expiring.
                if same && a.expires_after == 0 {
                    continue;
                }
                tracing::debug!(spi = want.spi, have = ?a, want = ?want, "xfrm state differs");
                socket
                    .request(xfrm::XFRM_MSG_DELSA, 0, &a.id(), "replacing a changed xfrm state")
                    .map_err(|e| e.to_string())?;
                outcome.changes += 1;
            }
            let what = format!("xfrm state spi {:#x} to {}", want.spi, want.dst);
            let mut result = socket.request(xfrm::XFRM_MSG_NEWSA, 0, &want.encode(), &what);
            if result.is_err() && want.offload.is_some() {
                let crypto = crypto_only(want);
                result = socket.request(xfrm::XFRM_MSG_NEWSA, 0, &crypto.encode(), &what);
                if result.is_ok() {
                    note = Some(Placement {
                        hardware: true,
                        engine: "esp-hw-offload (crypto offload)".into(),
                        reason: "the device refused packet offload; the kernel frames ESP and the NIC encrypts".into(),
                    });
                }
            }
            result.map_err(|e| e.to_string())?;
            outcome.changes += 1;
        }
        Ok(note)
    }
}

fn crypto_only(state: &State) -> State {
    let mut s = state.clone();
    s.offload = state.offload.map(|(o, inbound)| (Offload { packet: false, ..o }, inbound));
    s
}

/// The interface index of a device with `esp-hw-offload` on, or why it cannot offload.
fn offload_device(device: &str) -> Result<u32, String> {
    let ifindex = nix::net::if_::if_nametoindex(device).map_err(|e| format!("network device {device:?}: {e}"))?;
    match crate::netlink::socket::netdev_feature(device, "esp-hw-offload")? {
        true => Ok(ifindex),
        false => Err(format!("{device} has no esp-hw-offload (off, or not offered by its driver)")),
    }
}

#[derive(Debug, Default)]
struct Outcome {
    changes: usize,
    failed: BTreeMap<String, String>,
    placed: BTreeMap<String, TunnelState>,
}

impl Reconciler for IpsecReconciler {
    fn name(&self) -> &'static str {
        SUBSYSTEM
    }

    async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
        let tunnels = store.list_all::<TunnelSpec>()?;
        let input: Vec<(String, TunnelSpec)> = tunnels.iter().map(|t| (t.id.clone(), t.spec.clone())).collect();
        let this = self.clone();
        let owned_store = store.clone();
        let outcome = match tokio::task::spawn_blocking(move || this.converge(&owned_store, &input))
            .await
            .map_err(|e| ReconcileError::Failed(format!("ipsec pass panicked: {e}")))?
        {
            Ok(outcome) => outcome,
            // The kernel's xfrm tables cannot be read or written at all (no NETLINK_XFRM here): every tunnel
            // says so in its status; the next drift pass tries again.
            Err(e) if !tunnels.is_empty() => Outcome {
                failed: tunnels.iter().map(|t| (t.id.clone(), format!("xfrm: {e}"))).collect(),
                ..Outcome::default()
            },
            // No tunnel and no way to reach xfrm: nothing of ours can be installed there to clean up.
            Err(e) => {
                tracing::debug!(error = %e, "xfrm unreachable; no IPsec tunnel is configured");
                Outcome::default()
            }
        };
        let statuses = tunnels
            .iter()
            .map(|t| {
                let (state, reason) = match (outcome.failed.get(&t.id), outcome.placed.get(&t.id)) {
                    (Some(reason), _) => (ObjectState::Error, reason.clone()),
                    (None, Some(p)) => (ObjectState::Ready, p.placement.reason.clone()),
                    (None, None) => (ObjectState::Pending, String::new()),
                };
                (
                    ObjectKey::of::<TunnelSpec>(&t.id),
                    ObjectStatus { state, reason, observed_generation: t.meta.generation },
                )
            })
            .collect();
        for (id, reason) in &outcome.failed {
            tracing::warn!(tunnel = %id, %reason, "IPsec tunnel not installed");
        }
        if outcome.changes > 0 {
            tracing::info!(
                changes = outcome.changes,
                tunnels = outcome.placed.len(),
                "xfrm states and policies written"
            );
        }
        self.tunnels.replace(outcome.placed);
        Ok(Pass { changes: outcome.changes, statuses })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TunnelSpec {
        TunnelSpec {
            local: "192.168.77.1".parse().unwrap(),
            remote: "192.168.77.2".parse().unwrap(),
            local_subnet: "10.1.0.0/24".parse().unwrap(),
            remote_subnet: "10.2.0.0/24".parse().unwrap(),
            spi_out: 0x1001,
            spi_in: 0x1002,
            key_out: "k-out".into(),
            key_in: "k-in".into(),
            policy: Policy::PreferHardware,
            device: String::new(),
            rekey_overlap_seconds: DEFAULT_REKEY_OVERLAP_SECONDS,
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(spec().validate().is_ok());
        type Change = fn(&mut TunnelSpec);
        let cases: [(Change, &str); 6] = [
            (|s| s.remote = "2001:db8::1".parse().unwrap(), "tunnel.remote"),
            (|s| s.remote = s.local, "tunnel.remote"),
            (|s| s.spi_in = 7, "tunnel.spi_in"),
            (|s| s.key_out.clear(), "tunnel.key_out"),
            (|s| s.device = "a/b".into(), "tunnel.device"),
            (|s| s.policy = Policy::RequireHardware, "tunnel.device"),
        ];
        for (change, field) in cases {
            let mut s = spec();
            change(&mut s);
            assert_eq!(s.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn request_ids_are_owned_and_stable() {
        assert_eq!(reqid("east"), reqid("east"));
        assert_ne!(reqid("east"), reqid("west"));
        assert!(owned(reqid("east")));
        assert!(!owned(1));
    }

    #[test]
    fn placement_without_a_device() {
        let (p, ifindex) = IpsecReconciler::place(&spec()).unwrap();
        assert!(!p.hardware && ifindex.is_none());
        assert!(p.reason.contains("no offload device"), "{}", p.reason);
        let mut soft = spec();
        soft.policy = Policy::Software;
        assert!(IpsecReconciler::place(&soft).unwrap().0.reason.contains("software requested"));
        let mut hw = spec();
        hw.policy = Policy::RequireHardware;
        hw.device = "nonexistent0".into();
        let e = IpsecReconciler::place(&hw).unwrap_err();
        assert!(e.contains("nonexistent0"), "{e}");
    }
}
