//! Converges the switch towards the fabric intent: compiles the rules every port needs, compares them with
//! the filters on each port (by identity and content cookie), and adds, replaces or removes only what differs.
//! A pass over an unchanged fabric reads and writes nothing but the dumps. A rule deleted behind the agent's
//! back is re-added on the next pass (the controller's periodic resync or a netlink link event).
//!
//! If any rule of an attachment is refused, the rules added for it in that pass are removed again and the
//! attachment reports the kernel's message, so an attachment is never left half-forwarded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dpu_intent::Store;
use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler, Trigger};

use crate::FabricError;
use crate::model::{AttachmentSpec, FABRIC_ID, FabricSpec, Segment, ServiceSpec};
use crate::rules::{Rule, RuleId, compile, service_owner};
use crate::switch::{Change, Encoded, Links, Switch, encode};

/// Status-board name of the fabric reconciler.
pub const SUBSYSTEM: &str = "fabric";

/// The fabric subsystem's reconciler.
#[derive(Debug, Clone)]
pub struct FabricReconciler {
    switch: Arc<dyn Switch>,
}

fn status(state: ObjectState, reason: impl Into<String>, generation: u64) -> ObjectStatus {
    ObjectStatus { state, reason: reason.into(), observed_generation: generation }
}

/// What one pass did, before it is turned into statuses.
#[derive(Debug, Default)]
struct Outcome {
    changes: usize,
    /// Attachment id or service owner (`services/{id}`) → why its rules are not installed.
    failed: BTreeMap<String, String>,
    /// Service id → why it is not (fully) served, though its rules are installed.
    unserved_services: BTreeMap<String, String>,
}

impl FabricReconciler {
    pub fn new(switch: Arc<dyn Switch>) -> Self {
        Self { switch }
    }

    /// The switch this reconciler programs.
    pub fn switch(&self) -> &Arc<dyn Switch> {
        &self.switch
    }

    /// One pass over the switch (blocking: netlink round trips). Interface indexes are read once, at its start;
    /// a device that disappears during the pass fails its rules, and the link event it causes starts another.
    fn converge(
        &self,
        fabric: &FabricSpec,
        attachments: &[(String, AttachmentSpec)],
        services: &[(String, ServiceSpec)],
    ) -> Result<Outcome, FabricError> {
        let ports = self.switch.ports()?;
        let mut links = self.switch.links()?;
        let mut out = Outcome::default();
        // The VXLAN device is the fabric's own: created when missing (an existing one is used as it is).
        if let Some(vxlan) = &fabric.vxlan
            && links.ifindex(&vxlan.device).is_err()
        {
            match self.switch.add_vxlan(&vxlan.device, vxlan.port) {
                Ok(()) => {
                    tracing::info!(dev = %vxlan.device, port = vxlan.port, "created the VXLAN device");
                    out.changes += 1;
                    links = self.switch.links()?;
                }
                Err(e) => {
                    tracing::warn!(dev = %vxlan.device, error = %e, "creating the VXLAN device failed");
                    for (id, a) in attachments {
                        if matches!(a.segment, Segment::Vxlan(_)) {
                            fail(&mut out.failed, id, &e);
                        }
                    }
                }
            }
        }
        let compiled = compile(fabric, attachments, services, &ports);
        for u in &compiled.unserved {
            out.failed.entry(u.attachment.clone()).or_insert_with(|| u.reason.clone());
        }
        for u in &compiled.unserved_services {
            out.unserved_services.entry(u.service.clone()).or_insert_with(|| u.reason.clone());
        }
        let offload: BTreeMap<&str, bool> = ports.iter().map(|p| (p.netdev.as_str(), p.hw_tc_offload)).collect();
        let mut devices: BTreeSet<&str> = ports.iter().map(|p| p.netdev.as_str()).collect();
        devices.extend(compiled.rules.keys().map(String::as_str));
        // The fabric's own devices are cleaned up too when nothing needs them any more.
        devices.extend(fabric.capture_device.as_deref());
        devices.extend(fabric.vxlan.as_ref().map(|v| v.device.as_str()));
        // Filters added in this pass with their owners, per device, for rollback.
        let mut added: BTreeMap<String, Vec<(RuleId, String)>> = BTreeMap::new();
        let none = Vec::new();
        for dev in devices {
            let wanted = compiled.rules.get(dev).unwrap_or(&none);
            let hw = offload.get(dev).copied().unwrap_or(false);
            // A device that fails (vanished, refused the qdisc, unreadable) fails only the attachments it serves.
            let mut device_added = Vec::new();
            if let Err(e) = self.converge_device(&links, dev, wanted, hw, &mut out, &mut device_added) {
                tracing::warn!(dev, error = %e, "converging a port failed");
                for r in wanted {
                    fail(&mut out.failed, &r.owner, &e);
                }
            }
            if !device_added.is_empty() {
                added.insert(dev.to_owned(), device_added);
            }
        }
        for (dev, rules) in added {
            let undo: Vec<(RuleId, String)> =
                rules.into_iter().filter(|(_, owner)| owners_of(owner).all(|o| out.failed.contains_key(o))).collect();
            let changes: Vec<Change<'_>> = undo.iter().map(|(id, _)| Change::Remove(*id)).collect();
            for ((id, owner), result) in undo.iter().zip(self.switch.apply(&links, &dev, &changes)) {
                match result {
                    Ok(()) => tracing::info!(dev, rule = %id, owner, "rolled back a rule of a failed attachment"),
                    Err(e) => tracing::warn!(dev, rule = %id, error = %e, "rolling back a rule failed"),
                }
            }
        }
        Ok(out)
    }
}

impl FabricReconciler {
    /// Brings one device's ingress filters to `wanted` with one pipelined batch of writes. Refused rules fail
    /// their owners and the pass goes on; errors reading or preparing the device are returned.
    fn converge_device(
        &self,
        links: &Links,
        dev: &str,
        wanted: &[Rule],
        hw: bool,
        out: &mut Outcome,
        added: &mut Vec<(RuleId, String)>,
    ) -> Result<(), FabricError> {
        let has_clsact = match self.switch.has_clsact(links, dev) {
            Err(FabricError::NoDevice(_)) if wanted.is_empty() => return Ok(()),
            other => other?,
        };
        if wanted.is_empty() && !has_clsact {
            return Ok(());
        }
        if !has_clsact {
            self.switch.add_clsact(links, dev)?;
            out.changes += 1;
        }
        let plan = plan(self.switch.as_ref(), links, dev, wanted, hw)?;
        let mut changes = Vec::with_capacity(plan.steps.len() + plan.remove.len());
        let mut sent: Vec<&Rule> = Vec::with_capacity(plan.steps.len());
        for step in &plan.steps {
            let rule = step.rule();
            if owners(rule).all(|o| out.failed.contains_key(o)) {
                // Its attachment already failed elsewhere in this pass.
                continue;
            }
            match step {
                Step::Add { encoded, .. } => changes.push(Change::Add(encoded)),
                Step::Replace { encoded, .. } => changes.push(Change::Replace(encoded)),
                Step::Broken { error, .. } => {
                    tracing::warn!(dev, rule = %rule.id(), owner = %rule.owner, error = %error, "encoding a rule failed");
                    fail(&mut out.failed, &rule.owner, error);
                    continue;
                }
            }
            sent.push(rule);
        }
        let installs = changes.len();
        changes.extend(plan.remove.iter().map(|id| Change::Remove(*id)));
        let results = self.switch.apply(links, dev, &changes);
        let mut removal_error = None;
        for (i, (change, result)) in changes.iter().zip(results).enumerate() {
            match (result, sent.get(i)) {
                (Ok(()), Some(rule)) => {
                    out.changes += 1;
                    if matches!(change, Change::Add(_)) {
                        added.push((rule.id(), rule.owner.clone()));
                    }
                }
                (Err(e), Some(rule)) => {
                    tracing::warn!(dev, rule = %rule.id(), owner = %rule.owner, error = %e, "installing a rule failed");
                    fail(&mut out.failed, &rule.owner, &e);
                }
                (Ok(()), None) => out.changes += 1,
                (Err(e), None) => {
                    tracing::warn!(dev, rule = %plan.remove[i - installs], error = %e, "removing a rule failed");
                    removal_error.get_or_insert(e);
                }
            }
        }
        removal_error.map_or(Ok(()), Err)
    }
}

/// One difference between a device's filters and the wanted rules.
#[derive(Debug)]
pub enum Step<'a> {
    /// Not installed: add it.
    Add { rule: &'a Rule, encoded: Encoded },
    /// Installed with other content: replace it.
    Replace { rule: &'a Rule, encoded: Encoded },
    /// Cannot be encoded here (a device it names is missing).
    Broken { rule: &'a Rule, error: FabricError },
}

impl<'a> Step<'a> {
    pub fn rule(&self) -> &'a Rule {
        match self {
            Self::Add { rule, .. } | Self::Replace { rule, .. } | Self::Broken { rule, .. } => rule,
        }
    }
}

/// What differs on one device; an unchanged device has an empty plan.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    pub steps: Vec<Step<'a>>,
    /// Filters present that no wanted rule has.
    pub remove: Vec<RuleId>,
    /// Wanted rules already installed with the same content.
    pub unchanged: usize,
}

/// Compares the ingress filters of `dev` (which must have a clsact qdisc) with `wanted`, by identity and
/// content cookie. Reads only: one filter dump; every wanted rule is encoded once, with `links`.
pub fn plan<'a>(
    switch: &dyn Switch,
    links: &Links,
    dev: &str,
    wanted: &'a [Rule],
    offload: bool,
) -> Result<Plan<'a>, FabricError> {
    let present: BTreeMap<RuleId, Option<Vec<u8>>> =
        switch.rules(links, dev)?.into_iter().map(|f| (f.id, f.cookie)).collect();
    links.ifindex(dev)?;
    let mut plan = Plan::default();
    for rule in wanted {
        match encode(links, dev, rule, offload) {
            Err(error) => plan.steps.push(Step::Broken { rule, error }),
            Ok(encoded) => match present.get(&rule.id()) {
                Some(Some(have)) if have[..] == encoded.cookie[..] => plan.unchanged += 1,
                Some(_) => plan.steps.push(Step::Replace { rule, encoded }),
                None => plan.steps.push(Step::Add { rule, encoded }),
            },
        }
    }
    let wanted_ids: BTreeSet<RuleId> = wanted.iter().map(Rule::id).collect();
    plan.remove = present.into_keys().filter(|id| !wanted_ids.contains(id)).collect();
    Ok(plan)
}

/// Brings `dev` to exactly `wanted` (adding the clsact qdisc if needed) with one pipelined batch; returns the
/// first refusal (the other changes of the batch are applied). Returns the number of writes: 0 when nothing
/// differed.
pub fn sync(switch: &dyn Switch, dev: &str, wanted: &[Rule], offload: bool) -> Result<usize, FabricError> {
    let links = switch.links()?;
    let mut writes = 0;
    if !switch.has_clsact(&links, dev)? {
        switch.add_clsact(&links, dev)?;
        writes += 1;
    }
    let mut plan = plan(switch, &links, dev, wanted, offload)?;
    if let Some(at) = plan.steps.iter().position(|s| matches!(s, Step::Broken { .. }))
        && let Step::Broken { error, .. } = plan.steps.swap_remove(at)
    {
        return Err(error);
    }
    let mut changes = Vec::with_capacity(plan.steps.len() + plan.remove.len());
    for step in &plan.steps {
        match step {
            Step::Add { encoded, .. } => changes.push(Change::Add(encoded)),
            Step::Replace { encoded, .. } => changes.push(Change::Replace(encoded)),
            Step::Broken { .. } => {}
        }
    }
    changes.extend(plan.remove.iter().map(|id| Change::Remove(*id)));
    let mut first = None;
    for result in switch.apply(&links, dev, &changes) {
        match result {
            Ok(()) => writes += 1,
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(writes), Err)
}

fn owners(rule: &Rule) -> impl Iterator<Item = &str> {
    owners_of(&rule.owner)
}

fn owners_of(owner: &str) -> impl Iterator<Item = &str> {
    owner.split(',')
}

fn fail(failed: &mut BTreeMap<String, String>, owner: &str, e: &FabricError) {
    for o in owner.split(',') {
        failed.entry(o.to_owned()).or_insert_with(|| e.to_string());
    }
}

impl Reconciler for FabricReconciler {
    fn name(&self) -> &'static str {
        SUBSYSTEM
    }

    async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
        let fabric = match store.get::<FabricSpec>(FABRIC_ID) {
            Ok(f) => Some(f),
            Err(dpu_intent::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let attachments = store.list_all::<AttachmentSpec>()?;
        let services = store.list_all::<ServiceSpec>()?;
        let spec = fabric.as_ref().map(|f| f.spec.clone()).unwrap_or_default();
        let input: Vec<(String, AttachmentSpec)> = attachments.iter().map(|a| (a.id.clone(), a.spec.clone())).collect();
        let service_input: Vec<(String, ServiceSpec)> =
            services.iter().map(|s| (s.id.clone(), s.spec.clone())).collect();
        let this = self.clone();
        let outcome = tokio::task::spawn_blocking(move || this.converge(&spec, &input, &service_input))
            .await
            .map_err(|e| ReconcileError::Failed(format!("fabric pass panicked: {e}")))?
            .map_err(|e| ReconcileError::Failed(e.to_string()))?;
        let mut statuses = Vec::new();
        if let Some(f) = &fabric {
            statuses.push((ObjectKey::of::<FabricSpec>(&f.id), status(ObjectState::Ready, "", f.meta.generation)));
        }
        for a in &attachments {
            let s = match outcome.failed.get(&a.id) {
                Some(reason) => status(ObjectState::Error, reason.clone(), a.meta.generation),
                None => status(ObjectState::Ready, "", a.meta.generation),
            };
            statuses.push((ObjectKey::of::<AttachmentSpec>(&a.id), s));
        }
        for svc in &services {
            let failed = outcome.failed.get(&service_owner(&svc.id));
            let s = match failed.or_else(|| outcome.unserved_services.get(&svc.id)) {
                Some(reason) => status(ObjectState::Error, reason.clone(), svc.meta.generation),
                None => status(ObjectState::Ready, "", svc.meta.generation),
            };
            statuses.push((ObjectKey::of::<ServiceSpec>(&svc.id), s));
        }
        Ok(Pass { changes: outcome.changes, statuses })
    }
}

/// Watches rtnetlink link notifications (representors appearing, disappearing, renamed) and fires `trigger`
/// for each batch. Runs on its own thread for the life of the process.
pub fn watch_links(trigger: Trigger) -> Result<(), FabricError> {
    const RTNLGRP_LINK: u32 = 1;
    let mut socket =
        netlink_sys::Socket::new(0).map_err(|source| FabricError::Socket { operation: "socket", source })?;
    socket
        .bind(&netlink_sys::SocketAddr::new(0, 1 << (RTNLGRP_LINK - 1)))
        .map_err(|source| FabricError::Socket { operation: "bind", source })?;
    std::thread::Builder::new()
        .name("dpu-fabric-links".into())
        .spawn(move || {
            loop {
                match socket.recv_from_full() {
                    Ok(_) => trigger.fire("link change"),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => trigger.fire("link events overflowed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "link watch stopped: drift is repaired on the periodic resync only");
                        return;
                    }
                }
            }
        })
        .map_err(|source| FabricError::Socket { operation: "spawn link watch", source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MacAddr, Mode, PortId, Segment};
    use crate::rules::{Class, PROTO_ALL, priority};
    use crate::switch::SimSwitch;

    fn attachment(vf: u16, vlan: u16) -> AttachmentSpec {
        AttachmentSpec {
            port: PortId::vf(0, vf),
            mac: MacAddr([2, 0, 0, 0, 0, vf as u8]),
            ips: [format!("10.0.0.{vf}/24").parse().unwrap()].into(),
            segment: Segment::Vlan(vlan),
            mode: Mode::Direct,
            rate_limit_bps: Some(50_000_000),
            spiffe_id: String::new(),
            mark: 0x00fa_0000 + u32::from(vf),
        }
    }

    fn setup() -> (tempfile::TempDir, Store, Arc<SimSwitch>, FabricReconciler) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sim = Arc::new(SimSwitch::new());
        sim.add_device("p0", Some("p0".parse().unwrap()), false);
        for vf in 1..=3 {
            sim.add_device(&format!("pf0vf{vf}"), Some(PortId::vf(0, vf)), false);
        }
        sim.add_device("proxy0", None, false);
        store
            .create(
                FABRIC_ID,
                FabricSpec {
                    uplink: Some("p0".parse().unwrap()),
                    capture_device: Some("proxy0".into()),
                    ..FabricSpec::default()
                },
            )
            .unwrap();
        let reconciler = FabricReconciler::new(sim.clone());
        (dir, store, sim, reconciler)
    }

    #[tokio::test]
    async fn converges_then_writes_nothing_then_repairs_drift() {
        let (_dir, store, sim, reconciler) = setup();
        store.create("a", attachment(1, 10)).unwrap();
        store.create("b", attachment(2, 10)).unwrap();
        let first = reconciler.reconcile(&store).await.unwrap();
        assert!(first.changes > 0);
        for (key, s) in &first.statuses {
            assert_eq!(s.state, ObjectState::Ready, "{key}: {}", s.reason);
        }
        assert!(sim.filter_count("pf0vf1") >= 5 && sim.filter_count("p0") == 3);

        let writes = sim.writes();
        let second = reconciler.reconcile(&store).await.unwrap();
        assert_eq!(second.changes, 0, "unchanged intent must change nothing");
        assert_eq!(sim.writes(), writes, "a no-op pass writes nothing");

        let police = RuleId {
            prio: priority(Class::Police, PROTO_ALL),
            protocol: PROTO_ALL,
            handle: sim.rules(&sim.links().unwrap(), "pf0vf2").unwrap()[0].id.handle,
        };
        assert!(sim.tamper_remove("pf0vf2", police));
        let repaired = reconciler.reconcile(&store).await.unwrap();
        assert_eq!(repaired.changes, 1, "exactly the deleted rule comes back");
        assert!(sim.rules(&sim.links().unwrap(), "pf0vf2").unwrap().iter().any(|f| f.id == police));

        // A changed spec replaces rules in place; detaching removes them.
        let mut faster = attachment(1, 10);
        faster.rate_limit_bps = Some(100_000_000);
        store.update("a", faster, None).unwrap();
        assert_eq!(reconciler.reconcile(&store).await.unwrap().changes, 1);
        store.delete::<AttachmentSpec>("a", false).unwrap();
        store.delete::<AttachmentSpec>("b", false).unwrap();
        assert!(reconciler.reconcile(&store).await.unwrap().changes > 0);
        for dev in ["p0", "pf0vf1", "pf0vf2"] {
            assert_eq!(sim.filter_count(dev), 0, "{dev}");
        }
        let writes = sim.writes();
        assert_eq!(reconciler.reconcile(&store).await.unwrap().changes, 0);
        assert_eq!(sim.writes(), writes);
    }

    #[tokio::test]
    async fn refused_attachment_is_rolled_back_and_reported() {
        let (_dir, store, sim, reconciler) = setup();
        store.create("a", attachment(1, 10)).unwrap();
        store.create("b", attachment(2, 10)).unwrap();
        // The uplink takes b's rule first (ports are visited in name order), then b's own port refuses: the
        // rule added for b on the uplink is removed again; a, which shares the network, stays served.
        sim.refuse_installs(Some(("pf0vf2", "Unsupported action on this port")));
        let pass = reconciler.reconcile(&store).await.unwrap();
        let by_id: BTreeMap<String, ObjectStatus> = pass.statuses.into_iter().map(|(k, s)| (k.id, s)).collect();
        assert_eq!(by_id["b"].state, ObjectState::Error);
        assert!(by_id["b"].reason.contains("Unsupported action on this port"), "{}", by_id["b"].reason);
        assert_eq!(by_id["a"].state, ObjectState::Ready, "{}", by_id["a"].reason);
        assert_eq!(sim.filter_count("pf0vf2"), 0);
        let uplink = sim.rules(&sim.links().unwrap(), "p0").unwrap();
        assert_eq!(uplink.len(), 2, "a's unicast rule and the network's flood rule; b's unicast rule rolled back");
        assert!(sim.filter_count("pf0vf1") > 0);
        sim.refuse_installs(None);
        let pass = reconciler.reconcile(&store).await.unwrap();
        assert!(pass.statuses.iter().all(|(_, s)| s.state == ObjectState::Ready));
        assert_eq!(sim.filter_count("p0"), 3);
    }

    #[tokio::test]
    async fn missing_capture_device_fails_only_mesh_attachments() {
        let (_dir, store, sim, reconciler) = setup();
        sim.remove_device("proxy0");
        store.create("a", attachment(1, 10)).unwrap();
        let mut mesh = attachment(2, 10);
        mesh.mode = Mode::Mesh { service_ports: [8080].into() };
        store.create("m", mesh).unwrap();
        let pass = reconciler.reconcile(&store).await.unwrap();
        let by_id: BTreeMap<String, ObjectStatus> = pass.statuses.into_iter().map(|(k, s)| (k.id, s)).collect();
        assert_eq!(by_id["a"].state, ObjectState::Ready, "{}", by_id["a"].reason);
        assert_eq!(by_id["m"].state, ObjectState::Error);
        assert!(by_id["m"].reason.contains("proxy0"), "{}", by_id["m"].reason);
        assert_eq!(sim.filter_count("pf0vf2"), 0, "the mesh pod's rules were rolled back");
        // Once the device is back the mesh pod is served; detached, its return rule goes from the capture device.
        sim.add_device("proxy0", None, false);
        reconciler.reconcile(&store).await.unwrap();
        assert_eq!(sim.filter_count("proxy0"), 1);
        store.delete::<AttachmentSpec>("m", false).unwrap();
        reconciler.reconcile(&store).await.unwrap();
        assert_eq!(sim.filter_count("proxy0"), 0);
    }

    #[tokio::test]
    async fn missing_vxlan_device_is_created_once() {
        let (_dir, store, sim, reconciler) = setup();
        let mut fabric = store.get::<FabricSpec>(FABRIC_ID).unwrap().spec;
        fabric.vxlan = Some(crate::model::VxlanSpec {
            device: "vxlan0".into(),
            local: "192.168.50.1".parse().unwrap(),
            port: 4789,
            peers: ["192.168.50.2".parse().unwrap()].into(),
        });
        store.update(FABRIC_ID, fabric, None).unwrap();
        let mut tenant = attachment(1, 10);
        tenant.segment = Segment::Vxlan(5000);
        store.create("v", tenant).unwrap();

        let pass = reconciler.reconcile(&store).await.unwrap();
        let by_id: BTreeMap<String, ObjectStatus> = pass.statuses.into_iter().map(|(k, s)| (k.id, s)).collect();
        assert_eq!(by_id["v"].state, ObjectState::Ready, "{}", by_id["v"].reason);
        assert!(sim.filter_count("vxlan0") > 0, "the VXLAN network's rules are on the created device");
        let writes = reconciler.switch().writes();
        let again = reconciler.reconcile(&store).await.unwrap();
        assert_eq!(again.changes, 0);
        assert_eq!(reconciler.switch().writes(), writes, "an existing device is not created again");
    }

    #[test]
    fn sync_writes_only_differences() {
        let sim = SimSwitch::new();
        sim.add_device("a", Some(PortId::vf(0, 1)), false);
        sim.add_device("b", None, false);
        let rule = |handle: u32| Rule {
            prio: 30,
            protocol: PROTO_ALL,
            handle,
            keys: crate::rules::Keys {
                dst_mac: Some((MacAddr([2, 0, 0, 0, 0, handle as u8]), MacAddr([0xff; 6]))),
                ..Default::default()
            },
            actions: vec![crate::rules::Action::Redirect { dev: "b".into() }],
            owner: "x".into(),
        };
        let wanted: Vec<Rule> = (1..=50).map(rule).collect();
        assert_eq!(sync(&sim, "a", &wanted, false).unwrap(), 51, "the qdisc and every rule");
        assert_eq!(sync(&sim, "a", &wanted, false).unwrap(), 0);
        let p = plan(&sim, &sim.links().unwrap(), "a", &wanted, false).unwrap();
        assert_eq!((p.steps.len(), p.remove.len(), p.unchanged), (0, 0, 50));
        assert_eq!(sync(&sim, "a", &wanted[..40], false).unwrap(), 10, "ten removed");
        assert_eq!(sync(&sim, "a", &wanted, true).unwrap_err().errno(), Some(95), "no offload on this port");
    }

    #[tokio::test]
    async fn vanished_representor_is_reported_and_returns() {
        let (_dir, store, sim, reconciler) = setup();
        store.create("a", attachment(1, 10)).unwrap();
        reconciler.reconcile(&store).await.unwrap();
        sim.remove_device("pf0vf1");
        let pass = reconciler.reconcile(&store).await.unwrap();
        let a = pass.statuses.iter().find(|(k, _)| k.id == "a").unwrap();
        assert_eq!(a.1.state, ObjectState::Error);
        assert_eq!(a.1.reason, "port pf0vf1 is not present");
        assert_eq!(sim.filter_count("p0"), 0, "the uplink no longer forwards to it");
        sim.add_device("pf0vf1", Some(PortId::vf(0, 1)), false);
        let pass = reconciler.reconcile(&store).await.unwrap();
        assert!(pass.statuses.iter().all(|(_, s)| s.state == ObjectState::Ready));
        assert!(sim.filter_count("pf0vf1") > 0);
    }

    #[tokio::test]
    async fn services_converge_write_nothing_unchanged_and_report_unserved_backends() {
        use crate::model::{Backend, Protocol, SessionAffinity};
        let (_dir, store, sim, reconciler) = setup();
        for vf in 1..=3 {
            store.create(&format!("pod{vf}"), attachment(vf, 10)).unwrap();
        }
        let backend = |last: u8, ready: bool| Backend { ip: [10, 0, 0, last].into(), port: 8080, ready };
        let web = ServiceSpec {
            vip: [10, 96, 0, 10].into(),
            port: 80,
            protocol: Protocol::Tcp,
            segment: Segment::Vlan(10),
            backends: vec![backend(2, true), backend(3, true), backend(9, true)],
            session_affinity: SessionAffinity::None,
        };
        store.create("web", web.clone()).unwrap();
        let pass = reconciler.reconcile(&store).await.unwrap();
        let by_id: BTreeMap<String, ObjectStatus> = pass.statuses.into_iter().map(|(k, s)| (k.id, s)).collect();
        assert_eq!(by_id["pod1"].state, ObjectState::Ready, "{}", by_id["pod1"].reason);
        assert_eq!(by_id["web"].state, ObjectState::Error);
        assert_eq!(by_id["web"].reason, "backends 10.0.0.9:8080 are no pod of vlan 10 on this DPU");
        let ct_rules = |dev: &str| {
            sim.rules(&sim.links().unwrap(), dev)
                .unwrap()
                .into_iter()
                .filter(|f| f.actions.iter().any(|a| matches!(a, crate::rules::Action::Ct { .. })))
                .count()
        };
        assert_eq!(ct_rules("pf0vf1"), 1 + usize::from(crate::rules::SERVICE_BUCKETS), "track + one rule per bucket");
        assert!(ct_rules("pf0vf2") > ct_rules("pf0vf1"), "a backend also tracks its replies");

        // Read back from the switch, the ct and pedit rules compare equal: nothing is rewritten.
        let writes = sim.writes();
        assert_eq!(reconciler.reconcile(&store).await.unwrap().changes, 0);
        assert_eq!(sim.writes(), writes, "a no-op pass writes nothing");

        // An unready backend: only the buckets that pointed at it are rewritten.
        let mut update = web.clone();
        update.backends = vec![backend(2, true), backend(3, false)];
        store.update("web", update, None).unwrap();
        let pass = reconciler.reconcile(&store).await.unwrap();
        assert!(pass.changes > 0 && pass.changes <= 3 * 10, "{} changes", pass.changes);
        let web_status = pass.statuses.iter().find(|(k, _)| k.id == "web").unwrap();
        assert_eq!(web_status.1.state, ObjectState::Ready, "{}", web_status.1.reason);
        let writes = sim.writes();
        assert_eq!(reconciler.reconcile(&store).await.unwrap().changes, 0);
        assert_eq!(sim.writes(), writes);

        store.delete::<ServiceSpec>("web", false).unwrap();
        assert!(reconciler.reconcile(&store).await.unwrap().changes > 0);
        for dev in ["pf0vf1", "pf0vf2", "pf0vf3"] {
            assert_eq!(ct_rules(dev), 0, "{dev}");
        }
    }
}
