//! What the machine offers, observed: the probed capabilities and the fabric's ports, reported on the status board
//! under subsystem `machine` (kinds `capabilities` and `ports`). The board publishes a change of any of them as a
//! STATUS event, so a module loaded, a representor plugged in or a VF removed reaches watchers the way a
//! reconciler's report does. It changes nothing: a pass only looks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use dpu_fabric::switch::Switch;
use dpu_intent::Store;
use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler};

use crate::capabilities::{self, Capability, State};

pub const SUBSYSTEM: &str = "machine";
/// Status kind of a probed capability (`capabilities/ktls`).
pub const CAPABILITIES: &str = "capabilities";
/// Status kind of a port of the eSwitch (`ports/pf0vf3`).
pub const PORTS: &str = "ports";

/// Why a port that was seen is no longer reported.
const GONE: &str = "gone: no longer in the port inventory (unplugged, or its VF or SF was removed)";

/// Observes capabilities and ports on every pass (at start, on link events, on the periodic resync).
#[derive(Debug)]
pub struct MachineObserver {
    switch: Arc<dyn Switch>,
    probe: fn() -> Vec<Capability>,
    /// Every port seen since start, with its last status: one that disappears stays, as gone.
    ports: Mutex<BTreeMap<String, ObjectStatus>>,
}

impl MachineObserver {
    pub fn new(switch: Arc<dyn Switch>) -> Self {
        Self::with_probe(switch, capabilities::probe_all)
    }

    fn with_probe(switch: Arc<dyn Switch>, probe: fn() -> Vec<Capability>) -> Self {
        Self { switch, probe, ports: Mutex::new(BTreeMap::new()) }
    }
}

fn status(state: ObjectState, reason: &str) -> ObjectStatus {
    ObjectStatus { state, reason: reason.to_owned(), observed_generation: 0 }
}

/// Available is ready; loadable is pending (a module away); unavailable is an error with the probe's reason.
fn capability_status(c: &Capability) -> ObjectStatus {
    match c.state {
        State::Available => status(ObjectState::Ready, ""),
        State::Loadable => status(ObjectState::Pending, &c.detail),
        State::Unavailable => status(ObjectState::Error, &c.detail),
    }
}

impl Reconciler for MachineObserver {
    fn name(&self) -> &'static str {
        SUBSYSTEM
    }

    /// Intent writes change nothing it looks at: the probes and the port inventory run on link events and resync.
    fn reads_intent(&self) -> bool {
        false
    }

    async fn reconcile(&self, _store: &Store) -> Result<Pass, ReconcileError> {
        let (switch, probe) = (self.switch.clone(), self.probe);
        let (capabilities, ports) = tokio::task::spawn_blocking(move || (probe(), switch.ports()))
            .await
            .map_err(|e| ReconcileError::Failed(format!("probing the machine: {e}")))?;
        let mut statuses: Vec<(ObjectKey, ObjectStatus)> = capabilities
            .iter()
            .map(|c| (ObjectKey { kind: CAPABILITIES.into(), id: c.name.into() }, capability_status(c)))
            .collect();
        let mut known = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        match ports {
            Ok(ports) => {
                for seen in known.values_mut() {
                    *seen = status(ObjectState::Error, GONE);
                }
                for port in ports {
                    known.insert(port.id.to_string(), status(ObjectState::Ready, ""));
                }
            }
            // The ports keep their last status; the capabilities still report.
            Err(e) => tracing::warn!(error = %e, "reading the port inventory"),
        }
        statuses.extend(known.iter().map(|(id, s)| (ObjectKey { kind: PORTS.into(), id: id.clone() }, s.clone())));
        Ok(Pass { changes: 0, statuses })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use dpu_fabric::model::PortId;
    use dpu_fabric::switch::SimSwitch;
    use dpu_intent::events::{Change, Events, Item};
    use dpu_intent::reconcile::{Controller, ControllerConfig, StatusBoard};

    use super::*;

    static KTLS_LOADED: AtomicBool = AtomicBool::new(false);

    fn probe() -> Vec<Capability> {
        vec![if KTLS_LOADED.load(Ordering::SeqCst) {
            Capability { name: "ktls", state: State::Available, detail: "tls in tcp_available_ulp".into() }
        } else {
            Capability { name: "ktls", state: State::Loadable, detail: "modprobe tls".into() }
        }]
    }

    async fn next_status(watcher: &mut dpu_intent::events::Watcher) -> (String, ObjectState, String) {
        loop {
            let item = tokio::time::timeout(std::time::Duration::from_secs(10), watcher.next()).await.expect("event");
            if let Item::Event(e) = item
                && e.change == Change::Status
            {
                let s = e.status.clone().expect("status");
                return (e.key.to_string(), s.state, s.reason);
            }
        }
    }

    #[tokio::test]
    async fn hot_plug_and_capability_changes_reach_the_change_feed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let events = Events::new(64, store.revision());
        let board = StatusBoard::with_events(events.clone());
        let mut watcher = events.watch(None, store.revision());
        let switch = Arc::new(SimSwitch::new());
        let vf3: PortId = "pf0vf3".parse().expect("port name");
        switch.add_device("eth3", Some(vf3), true);
        let controller = Controller::new(
            MachineObserver::with_probe(switch.clone(), probe),
            store.clone(),
            board.clone(),
            ControllerConfig::default(),
        );
        let trigger = controller.trigger();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = controller.spawn(stopped);

        assert_eq!(
            next_status(&mut watcher).await,
            ("capabilities/ktls".into(), ObjectState::Pending, "modprobe tls".into())
        );
        assert_eq!(next_status(&mut watcher).await, ("ports/pf0vf3".into(), ObjectState::Ready, String::new()));

        // The VF goes away: its port is reported gone, and nothing else changed.
        switch.remove_device("eth3");
        trigger.fire("link event");
        assert_eq!(next_status(&mut watcher).await, ("ports/pf0vf3".into(), ObjectState::Error, GONE.into()));
        // The module is loaded and the VF comes back.
        KTLS_LOADED.store(true, Ordering::SeqCst);
        switch.add_device("eth3", Some(vf3), true);
        trigger.fire("link event");
        assert_eq!(next_status(&mut watcher).await, ("capabilities/ktls".into(), ObjectState::Ready, String::new()));
        assert_eq!(next_status(&mut watcher).await, ("ports/pf0vf3".into(), ObjectState::Ready, String::new()));
        // A pass that finds nothing new publishes nothing.
        let before = events.next_seq();
        trigger.fire("resync");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(events.next_seq(), before);
        assert_eq!(board.list(SUBSYSTEM).len(), 2);
        // An intent write asks for no pass: nothing the observer looks at changed.
        let passes = board.counters(SUBSYSTEM).passes;
        let settings = crate::settings::AgentSettings::default();
        store.create(crate::settings::SETTINGS_ID, settings).expect("an intent write");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(board.counters(SUBSYSTEM).passes, passes, "no pass for an intent write");

        stop.send(true).expect("stop");
        task.await.expect("controller");
    }
}
