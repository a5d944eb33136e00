//! The reconcile driver every data path reuses: a [`Controller`] runs a [`Reconciler`] at start,
//! after every store write, on [`Trigger::fire`], periodically, and with backoff after failures,
//! publishing the outcome on a shared [`StatusBoard`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::Store;

/// Identifies a stored object: its collection and id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Collection, e.g. "volumes".
    pub kind: String,
    /// Id within the collection.
    pub id: String,
}

impl ObjectKey {
    /// Key of `T::KIND/id`.
    pub fn of<T: crate::Resource>(id: &str) -> Self {
        Self { kind: T::KIND.to_owned(), id: id.to_owned() }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// Convergence state of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// Not converged yet (work in progress or waiting on a dependency).
    Pending,
    /// The real system matches the intent.
    Ready,
    /// Converging failed; `reason` says why.
    Error,
}

/// What a reconciler reports about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStatus {
    /// Convergence state.
    pub state: ObjectState,
    /// Human-readable explanation; empty when ready.
    pub reason: String,
    /// Generation of the intent this status describes.
    pub observed_generation: u64,
}

/// Outcome of one successful reconcile pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pass {
    /// Number of changes made to the real system (0 when nothing differed).
    pub changes: usize,
    /// Status of every object the reconciler is responsible for.
    pub statuses: Vec<(ObjectKey, ObjectStatus)>,
}

/// A failed reconcile pass; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading intent failed.
    #[error("reading intent failed: {0}")]
    Store(#[from] crate::Error),
    /// Converging failed.
    #[error("{0}")]
    Failed(String),
}

/// Converges one subsystem towards the intent in the store.
pub trait Reconciler: Send + Sync + 'static {
    /// Subsystem name used for the tracing span and status keys ("storage", "fabric", ...).
    fn name(&self) -> &'static str;
    /// Compare intent (read from the store) with what actually exists and converge. Must be idempotent and
    /// write nothing when nothing differs. Returns what it did and the per-object status.
    fn reconcile(&self, store: &Store) -> impl Future<Output = Result<Pass, ReconcileError>> + Send;
    /// Whether a pass depends on intent, so that every store write asks for one. An observer of the machine that
    /// reads no intent says no and runs on its triggers and resync only.
    fn reads_intent(&self) -> bool {
        true
    }
}

/// Pass counters of one subsystem.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassCounters {
    /// Passes run, failed ones included.
    pub passes: u64,
    /// Sum of [`Pass::changes`].
    pub changes: u64,
    /// Failed passes.
    pub errors: u64,
    /// Duration of the most recent pass.
    pub last_pass_duration: Duration,
    /// Error of the most recent pass, `None` if it succeeded.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Subsystem {
    counters: PassCounters,
    objects: BTreeMap<ObjectKey, ObjectStatus>,
}

/// Latest reconcile results of every subsystem, shared between controllers and the API layer.
/// A successful pass replaces the subsystem's object statuses; a failed one keeps the previous ones.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<RwLock<HashMap<&'static str, Subsystem>>>,
    events: Option<crate::events::Events>,
}

impl StatusBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty board that publishes every change of an object's status to `events`.
    pub fn with_events(events: crate::events::Events) -> Self {
        Self { events: Some(events), ..Self::default() }
    }

    /// Status of one object as last reported by `subsystem`.
    pub fn get(&self, subsystem: &str, key: &ObjectKey) -> Option<ObjectStatus> {
        self.read(subsystem, |s| s.objects.get(key).cloned()).flatten()
    }

    /// All object statuses reported by `subsystem`, ordered by key.
    pub fn list(&self, subsystem: &str) -> Vec<(ObjectKey, ObjectStatus)> {
        let all = |s: &Subsystem| s.objects.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.read(subsystem, all).unwrap_or_default()
    }

    /// Pass counters of `subsystem` (all zero before its first pass).
    pub fn counters(&self, subsystem: &str) -> PassCounters {
        self.read(subsystem, |s| s.counters.clone()).unwrap_or_default()
    }

    /// Names of the subsystems that have reported, sorted.
    pub fn subsystems(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.inner.read().unwrap_or_else(PoisonError::into_inner).keys().copied().collect();
        names.sort_unstable();
        names
    }

    fn read<R>(&self, subsystem: &str, f: impl FnOnce(&Subsystem) -> R) -> Option<R> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).get(subsystem).map(f)
    }

    fn record(
        &self,
        subsystem: &'static str,
        duration: Duration,
        result: &Result<Pass, ReconcileError>,
        revision: u64,
    ) {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let s = map.entry(subsystem).or_default();
        s.counters.passes += 1;
        s.counters.last_pass_duration = duration;
        match result {
            Ok(pass) => {
                s.counters.changes += pass.changes as u64;
                s.counters.last_error = None;
                if let Some(events) = &self.events {
                    for (key, status) in &pass.statuses {
                        if s.objects.get(key) != Some(status) {
                            let generation = status.observed_generation;
                            let change = crate::events::Change::Status;
                            events.publish(
                                change,
                                key.clone(),
                                generation,
                                revision,
                                Some((subsystem, status.clone())),
                            );
                        }
                    }
                }
                s.objects = pass.statuses.iter().cloned().collect();
            }
            Err(e) => {
                s.counters.errors += 1;
                s.counters.last_error = Some(e.to_string());
            }
        }
    }
}

/// Cloneable handle that asks a controller for another pass (netlink events, remote failures, ...).
/// Fires that arrive while a pass runs coalesce into one more pass.
#[derive(Debug, Clone)]
pub struct Trigger {
    subsystem: &'static str,
    requests: Arc<watch::Sender<u64>>,
}

impl Trigger {
    /// Requests a pass; `reason` is logged.
    pub fn fire(&self, reason: &str) {
        tracing::debug!(subsystem = self.subsystem, reason, "reconcile requested");
        self.requests.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Timing of a [`Controller`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Pass interval when nothing else triggers one, to repair drift (default 60 s).
    pub resync_interval: Duration,
    /// Delay before the first retry of a failed pass; doubles per consecutive failure (default 1 s).
    pub initial_backoff: Duration,
    /// Upper bound of the retry delay (default 60 s).
    pub max_backoff: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Runs one reconciler in a loop.
///
/// A pass runs at start, when the store revision changes, when the [`Trigger`] fires and every
/// `resync_interval`. After a failed pass the next one runs only after the backoff delay; writes and
/// triggers during that delay are folded into that retry. A running pass is never cancelled: on
/// shutdown the loop exits once the current pass (if any) has finished.
#[derive(Debug)]
pub struct Controller<R> {
    reconciler: R,
    store: Store,
    board: StatusBoard,
    config: ControllerConfig,
    requests: Arc<watch::Sender<u64>>,
}

impl<R: Reconciler> Controller<R> {
    /// A controller publishing to `board`.
    pub fn new(reconciler: R, store: Store, board: StatusBoard, config: ControllerConfig) -> Self {
        let requests = Arc::new(watch::Sender::new(0));
        Self { reconciler, store, board, config, requests }
    }

    /// A handle that requests passes.
    pub fn trigger(&self) -> Trigger {
        Trigger { subsystem: self.reconciler.name(), requests: self.requests.clone() }
    }

    /// Spawns [`Controller::run`] on the current tokio runtime.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    /// Runs until `shutdown` becomes `true` or its sender is dropped.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.reconciler.name();
        let span = tracing::info_span!("reconcile", subsystem = name);
        async move {
            let mut revisions = self.store.subscribe();
            let mut requests = self.requests.subscribe();
            let mut failures = 0u32;
            let on_writes = self.reconciler.reads_intent();
            let mut cause = "start";
            while !*shutdown.borrow_and_update() {
                revisions.borrow_and_update();
                requests.borrow_and_update();
                tracing::debug!(cause, "reconcile pass started");
                let started = Instant::now();
                let result = self.reconciler.reconcile(&self.store).await;
                let duration = started.elapsed();
                self.board.record(name, duration, &result, self.store.revision());
                let wait = match &result {
                    Ok(pass) => {
                        failures = 0;
                        tracing::debug!(changes = pass.changes, ?duration, "reconcile pass finished");
                        None
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let delay = self.backoff(failures);
                        tracing::warn!(%error, failures, retry_in = ?delay, "reconcile pass failed");
                        Some(delay)
                    }
                };
                cause = tokio::select! {
                    changed = shutdown.changed() => match changed {
                        Ok(()) => "shutdown signal",
                        Err(_) => break,
                    },
                    () = tokio::time::sleep(wait.unwrap_or(self.config.resync_interval)) => {
                        if wait.is_some() { "retry" } else { "resync" }
                    }
                    Ok(()) = revisions.changed(), if wait.is_none() && on_writes => "intent changed",
                    Ok(()) = requests.changed(), if wait.is_none() => "trigger",
                };
            }
            tracing::debug!("reconcile loop stopped");
        }
        .instrument(span)
        .await;
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.config.initial_backoff.saturating_mul(factor).min(self.config.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde::{Deserialize, Serialize};
    use tokio::sync::{Semaphore, mpsc};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Vol {
        size: u64,
    }
    impl crate::Resource for Vol {
        const KIND: &'static str = "volumes";
    }

    /// Reports every pass (number, paused-clock time) on a channel; the first `fail_first` passes
    /// fail and the first pass waits for a permit on `gate` when one is given.
    struct Mock {
        passes: AtomicUsize,
        fail_first: usize,
        gate: Option<Arc<Semaphore>>,
        events: mpsc::UnboundedSender<(usize, Instant)>,
    }

    impl Reconciler for Mock {
        fn name(&self) -> &'static str {
            "mock"
        }

        async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
            let n = self.passes.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.events.send((n, Instant::now()));
            if let (1, Some(gate)) = (n, &self.gate) {
                gate.acquire().await.map_err(|e| ReconcileError::Failed(e.to_string()))?.forget();
            }
            if n <= self.fail_first {
                return Err(ReconcileError::Failed(format!("pass {n} failed")));
            }
            let statuses: Vec<_> = store
                .list_all::<Vol>()?
                .into_iter()
                .map(|v| {
                    let status = ObjectStatus {
                        state: ObjectState::Ready,
                        reason: String::new(),
                        observed_generation: v.meta.generation,
                    };
                    (ObjectKey::of::<Vol>(&v.id), status)
                })
                .collect();
            Ok(Pass { changes: statuses.len(), statuses })
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        store: Store,
        board: StatusBoard,
        trigger: Trigger,
        events: mpsc::UnboundedReceiver<(usize, Instant)>,
        shutdown: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    const CONFIG: ControllerConfig = ControllerConfig {
        resync_interval: Duration::from_secs(60),
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(3),
    };

    fn start(fail_first: usize, gate: Option<Arc<Semaphore>>) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.create("v1", Vol { size: 1 }).expect("create");
        let (tx, events) = mpsc::unbounded_channel();
        let mock = Mock { passes: AtomicUsize::new(0), fail_first, gate, events: tx };
        let board = StatusBoard::new();
        let controller = Controller::new(mock, store.clone(), board.clone(), CONFIG);
        let trigger = controller.trigger();
        let (shutdown, rx) = watch::channel(false);
        let task = controller.spawn(rx);
        Harness { _dir: dir, store, board, trigger, events, shutdown, task }
    }

    impl Harness {
        async fn next_pass(&mut self) -> (usize, Instant) {
            self.events.recv().await.expect("controller alive")
        }

        /// Lets the controller publish the pass it just ran.
        async fn settle(&self, passes: u64) {
            for _ in 0..100 {
                if self.board.counters("mock").passes >= passes {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("pass {passes} was never published");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runs_on_start_write_trigger_and_resync() {
        let mut h = start(0, None);
        let (n, t0) = h.next_pass().await;
        assert_eq!(n, 1);
        h.settle(1).await;
        let key = ObjectKey::of::<Vol>("v1");
        assert_eq!(h.board.get("mock", &key).map(|s| (s.state, s.observed_generation)), Some((ObjectState::Ready, 1)));

        h.store.update("v1", Vol { size: 2 }, None).expect("update");
        assert_eq!(h.next_pass().await, (2, t0), "a write triggers a pass at once");
        h.settle(2).await;
        assert_eq!(h.board.get("mock", &key).map(|s| s.observed_generation), Some(2));

        h.trigger.fire("link down");
        assert_eq!(h.next_pass().await, (3, t0));
        assert_eq!(h.next_pass().await, (4, t0 + CONFIG.resync_interval), "then only the periodic resync");
        h.settle(4).await;
        let counters = h.board.counters("mock");
        assert_eq!((counters.passes, counters.changes, counters.errors), (4, 4, 0));
        assert_eq!((h.board.subsystems(), h.board.list("mock").len()), (vec!["mock"], 1));

        h.shutdown.send(true).expect("controller listening");
        h.task.await.expect("clean stop");
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_during_a_pass_coalesce() {
        let gate = Arc::new(Semaphore::new(0));
        let mut h = start(0, Some(gate.clone()));
        let (_, t0) = h.next_pass().await;
        for reason in ["a", "b", "c"] {
            h.trigger.fire(reason);
        }
        h.store.create("v2", Vol { size: 2 }).expect("create");
        gate.add_permits(1);
        assert_eq!(h.next_pass().await, (2, t0), "one pass for everything that arrived");
        assert_eq!(h.next_pass().await, (3, t0 + CONFIG.resync_interval));
        drop(h.shutdown);
        h.task.await.expect("dropping the sender stops the loop");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_passes_retry_with_capped_backoff() {
        let mut h = start(4, None);
        let (_, t0) = h.next_pass().await;
        h.store.create("v2", Vol { size: 2 }).expect("write during backoff");
        let mut times = vec![];
        for _ in 0..5 {
            times.push(h.next_pass().await.1 - t0);
        }
        let secs = |s| Duration::from_secs(s);
        assert_eq!(times, [secs(1), secs(3), secs(6), secs(9), secs(69)]);
        h.settle(6).await;
        let counters = h.board.counters("mock");
        assert_eq!((counters.passes, counters.errors, counters.last_error), (6, 4, None));
        assert_eq!(h.board.list("mock").len(), 2);
        h.shutdown.send(true).expect("controller listening");
        h.task.await.expect("clean stop");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_pass_keeps_previous_statuses() {
        let events = crate::events::Events::new(16, 0);
        let mut watcher = events.watch(None, 0);
        let board = StatusBoard::with_events(events);
        let key = ObjectKey { kind: "volumes".into(), id: "v1".into() };
        let ready = ObjectStatus { state: ObjectState::Ready, reason: String::new(), observed_generation: 1 };
        let pass = || Ok(Pass { changes: 1, statuses: vec![(key.clone(), ready.clone())] });
        board.record("x", Duration::from_millis(5), &pass(), 3);
        board.record("x", Duration::from_millis(7), &Err(ReconcileError::Failed("device gone".into())), 3);
        assert_eq!(board.get("x", &key), Some(ready.clone()));
        let c = board.counters("x");
        assert_eq!((c.passes, c.errors, c.last_pass_duration), (2, 1, Duration::from_millis(7)));
        assert_eq!(c.last_error.as_deref(), Some("device gone"));
        assert_eq!(board.counters("unknown"), PassCounters::default());
        // The same status again is no change: one status event in all.
        board.record("x", Duration::from_millis(5), &pass(), 3);
        match watcher.next().await {
            crate::events::Item::Event(e) => {
                assert_eq!((e.change, e.status.as_ref(), e.revision), (crate::events::Change::Status, Some(&ready), 3));
            }
            other => panic!("{other:?}"),
        }
        let pending = tokio::time::timeout(Duration::from_millis(10), watcher.next()).await;
        assert!(pending.is_err(), "no second event: {pending:?}");
    }
}
