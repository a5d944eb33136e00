//! `dpu.v1.AgentService`: build and platform facts, probed capabilities, and the agent settings resource.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::time::{Instant, SystemTime};

use dpu_intent::Store;
use dpu_intent::events::{Change, Cursor, Events, Item};
use dpu_intent::reconcile::{ObjectKey, ObjectState, StatusBoard};
use dpu_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{FieldMask, intent_status};
use crate::capabilities::{self, Capability, State};
use crate::platform;
use crate::settings::{AgentSettings, SETTINGS_ID, SETTINGS_SUBSYSTEM};

/// Resource name of the settings singleton.
const SETTINGS_NAME: &str = "settings";

/// Implementation of `AgentService`.
#[derive(Debug)]
pub struct AgentApi {
    store: Store,
    status: StatusBoard,
    events: Events,
    /// Turns `true` when this process stops serving: watch streams end (after a bookmark) so clients resume on
    /// the process taking over.
    stopping: tokio::sync::watch::Receiver<bool>,
    started: SystemTime,
    started_at: Instant,
}

/// Messages a watch stream may hold for a slow client before it waits (the feed itself never waits).
const WATCH_BUFFER: usize = 64;

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

impl AgentApi {
    pub fn new(
        store: Store,
        status: StatusBoard,
        events: Events,
        stopping: tokio::sync::watch::Receiver<bool>,
        started: SystemTime,
        started_at: Instant,
    ) -> Self {
        Self { store, status, events, stopping, started, started_at }
    }

    fn settings_response(&self, stored: Option<dpu_intent::Stored<AgentSettings>>) -> pb::AgentSettings {
        let (spec, meta) = match stored {
            Some(s) => (s.spec, Some(s.meta)),
            None => (AgentSettings::default(), None),
        };
        let generation = meta.map_or(0, |m| m.generation);
        let status = self.status.get(SETTINGS_SUBSYSTEM, &ObjectKey::of::<AgentSettings>(SETTINGS_ID));
        pb::AgentSettings {
            name: SETTINGS_NAME.into(),
            log_filter: spec.log_filter.unwrap_or_default(),
            labels: spec.labels.into_iter().collect(),
            generation: i64::try_from(generation).unwrap_or(i64::MAX),
            status: Some(match &meta {
                Some(meta) => object_status(status, meta),
                None => resource_status(status, 0),
            }),
        }
    }

    fn stored_settings(&self) -> Result<Option<dpu_intent::Stored<AgentSettings>>, Status> {
        match self.store.get::<AgentSettings>(SETTINGS_ID) {
            Ok(s) => Ok(Some(s)),
            Err(dpu_intent::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(intent_status(e)),
        }
    }
}

/// A time the store or the feed keeps as Unix milliseconds.
fn unix_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// The API status of a stored object: its reconciler's report and when it was created and last changed.
pub(crate) fn object_status(
    status: Option<dpu_intent::reconcile::ObjectStatus>,
    meta: &dpu_intent::Meta,
) -> pb::ResourceStatus {
    pb::ResourceStatus {
        create_time: Some(unix_ms(meta.create_time)),
        update_time: Some(unix_ms(meta.update_time)),
        ..resource_status(status, meta.generation)
    }
}

/// Maps a reconciler's report onto the API status; no report for the current generation means pending.
pub(crate) fn resource_status(
    status: Option<dpu_intent::reconcile::ObjectStatus>,
    generation: u64,
) -> pb::ResourceStatus {
    let Some(status) = status.filter(|s| s.observed_generation == generation) else {
        return pb::ResourceStatus {
            state: pb::ResourceState::Pending.into(),
            reason: "waiting for the reconciler".into(),
            observed_generation: 0,
            ..pb::ResourceStatus::default()
        };
    };
    let state = match status.state {
        ObjectState::Pending => pb::ResourceState::Pending,
        ObjectState::Ready => pb::ResourceState::Ready,
        ObjectState::Error => pb::ResourceState::Error,
    };
    pb::ResourceStatus {
        state: state.into(),
        reason: status.reason,
        observed_generation: i64::try_from(status.observed_generation).unwrap_or(i64::MAX),
        ..pb::ResourceStatus::default()
    }
}

impl From<Capability> for pb::Capability {
    fn from(c: Capability) -> Self {
        let state = match c.state {
            State::Available => pb::CapabilityState::Available,
            State::Unavailable => pb::CapabilityState::Unavailable,
            State::Loadable => pb::CapabilityState::Loadable,
        };
        pb::Capability { name: c.name.into(), state: state.into(), detail: c.detail }
    }
}

impl From<platform::Board> for pb::Board {
    fn from(b: platform::Board) -> Self {
        pb::Board {
            source: b.source.into(),
            vendor: b.vendor,
            model: b.model,
            bluefield: b.bluefield,
            detail: b.detail,
        }
    }
}

/// Validates an incoming settings message into the domain type.
impl TryFrom<pb::AgentSettings> for AgentSettings {
    type Error = Status;
    fn try_from(msg: pb::AgentSettings) -> Result<Self, Status> {
        if !msg.name.is_empty() && msg.name != SETTINGS_NAME {
            return Err(Status::invalid_argument(format!(
                "settings.name: {:?} is not a settings resource (expected {SETTINGS_NAME:?})",
                msg.name
            )));
        }
        let settings = AgentSettings {
            log_filter: Some(msg.log_filter).filter(|f| !f.is_empty()),
            labels: msg.labels.into_iter().collect(),
        };
        settings.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(settings)
    }
}

fn watch_message(item: Item, events: &Events) -> pb::WatchEvent {
    match item {
        Item::Relist { cursor, reason } => pb::WatchEvent {
            r#type: pb::WatchEventType::Relist.into(),
            cursor: cursor.to_string(),
            reason,
            ..pb::WatchEvent::default()
        },
        Item::Event(e) => {
            let kind = match e.change {
                Change::Created => pb::WatchEventType::Created,
                Change::Updated => pb::WatchEventType::Updated,
                Change::Deleted => pb::WatchEventType::Deleted,
                Change::Status => pb::WatchEventType::Status,
            };
            let generation = e.generation;
            pb::WatchEvent {
                r#type: kind.into(),
                cursor: events.cursor(&e).to_string(),
                name: e.key.to_string(),
                kind: e.key.kind.clone(),
                id: e.key.id.clone(),
                generation: super::generation(generation),
                revision: super::generation(e.revision),
                status: e.status.clone().map(|s| resource_status(Some(s), generation)),
                subsystem: e.subsystem.unwrap_or_default().into(),
                time: Some(unix_ms(e.time_ms)),
                reason: String::new(),
            }
        }
    }
}

/// Why a watch ends, or is refused, while this process stops serving: the client resumes on a new connection.
const STOPS_SERVING: &str = "the agent stops serving here: resume after the last cursor";

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type WatchEventsStream = WatchStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        if *self.stopping.borrow() {
            return Err(Status::unavailable(STOPS_SERVING));
        }
        let request = request.into_inner();
        let from = match request.resume_after.as_str() {
            "" => None,
            token => Some(token.parse::<Cursor>().map_err(|e| Status::invalid_argument(format!("resume_after: {e}")))?),
        };
        let kinds: BTreeSet<String> = request.kinds.into_iter().collect();
        let names: BTreeSet<String> = request.names.into_iter().collect();
        let revision = self.store.revision();
        // With replay, the history ends before the event that comes next now: a bookmark marks it.
        let (mut watcher, mut history_end) = match (&from, request.replay) {
            (None, true) => (self.events.replay(), Some(self.events.next_seq())),
            _ => (self.events.watch(from, revision), None),
        };
        let events = self.events.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let opened = pb::WatchEvent {
            r#type: pb::WatchEventType::Opened.into(),
            cursor: watcher.cursor(revision).to_string(),
            revision: super::generation(revision),
            ..pb::WatchEvent::default()
        };
        let mut stopping = self.stopping.clone();
        let store = self.store.clone();
        let bookmark = move |watcher: &dpu_intent::events::Watcher| pb::WatchEvent {
            r#type: pb::WatchEventType::Bookmark.into(),
            cursor: watcher.cursor(store.revision()).to_string(),
            revision: super::generation(store.revision()),
            ..pb::WatchEvent::default()
        };
        tokio::spawn(async move {
            if tx.send(Ok(opened)).await.is_err() {
                return;
            }
            // Events filtered out since the last message sent: a bookmark carries the stream past them at the end.
            let mut skipped = false;
            loop {
                if history_end.is_some_and(|end| watcher.position() >= end) {
                    history_end = None;
                    skipped = false;
                    if tx.send(Ok(bookmark(&watcher))).await.is_err() {
                        return;
                    }
                }
                let item = tokio::select! {
                    item = watcher.next() => item,
                    () = tx.closed() => return,
                    () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                        if skipped {
                            let _ = tx.send(Ok(bookmark(&watcher))).await;
                        }
                        let _ = tx.send(Err(Status::unavailable(STOPS_SERVING))).await;
                        return;
                    }
                };
                if let Item::Event(e) = &item
                    && ((!kinds.is_empty() && !kinds.contains(&e.key.kind))
                        || (!names.is_empty() && !names.contains(&e.key.to_string())))
                {
                    skipped = true;
                    continue;
                }
                skipped = false;
                if tx.send(Ok(watch_message(item, &events))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_agent_info(&self, _: Request<pb::GetAgentInfoRequest>) -> Result<Response<pb::AgentInfo>, Status> {
        let (capabilities, board) = tokio::task::spawn_blocking(|| (capabilities::probe_all(), platform::board()))
            .await
            .map_err(|e| Status::internal(format!("capability probe failed: {e}")))?;
        let uptime = self.started_at.elapsed();
        Ok(Response::new(pb::AgentInfo {
            version: crate::VERSION.into(),
            git_revision: crate::GIT_REVISION.into(),
            target_arch: std::env::consts::ARCH.into(),
            target: crate::TARGET.into(),
            kernel_release: platform::kernel_release(),
            hostname: platform::hostname(),
            board: board.map(Into::into),
            start_time: Some(prost_types::Timestamp::from(self.started)),
            uptime: prost_types::Duration::try_from(uptime).ok(),
            capabilities: capabilities.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_agent_settings(
        &self,
        request: Request<pb::GetAgentSettingsRequest>,
    ) -> Result<Response<pb::AgentSettings>, Status> {
        let name = request.into_inner().name;
        if !name.is_empty() && name != SETTINGS_NAME {
            return Err(Status::not_found(format!(
                "{name:?} is not a resource of AgentService (try {SETTINGS_NAME:?})"
            )));
        }
        Ok(Response::new(self.settings_response(self.stored_settings()?)))
    }

    async fn update_agent_settings(
        &self,
        request: Request<pb::UpdateAgentSettingsRequest>,
    ) -> Result<Response<pb::AgentSettings>, Status> {
        let request = request.into_inner();
        let incoming: AgentSettings =
            request.settings.ok_or_else(|| Status::invalid_argument("settings: required"))?.try_into()?;
        let mask = FieldMask::parse(request.update_mask, &["log_filter", "labels"])?;
        let expected = u64::try_from(request.expected_generation).ok().filter(|g| *g != 0);

        // Read-modify-write guarded by the generation read: a concurrent update makes the write fail with a
        // conflict, and unless the caller pinned a generation we merge again on top of it.
        let stored = loop {
            let current = self.stored_settings()?;
            let mut merged = current.as_ref().map(|s| s.spec.clone()).unwrap_or_default();
            if mask.covers("log_filter") {
                merged.log_filter.clone_from(&incoming.log_filter);
            }
            if mask.covers("labels") {
                merged.labels.clone_from(&incoming.labels);
            }
            let result = match current {
                None if expected.is_some() => {
                    return Err(Status::aborted("settings were never written; expected_generation must be 0"));
                }
                None => self.store.create(SETTINGS_ID, merged).map(dpu_intent::Created::into_stored),
                Some(current) => {
                    self.store.update(SETTINGS_ID, merged, Some(expected.unwrap_or(current.meta.generation)))
                }
            };
            match result {
                Err(dpu_intent::Error::Conflict { .. } | dpu_intent::Error::AlreadyExists { .. })
                    if expected.is_none() =>
                {
                    continue;
                }
                other => break other.map_err(intent_status)?,
            }
        };
        tracing::info!(generation = stored.meta.generation, "agent settings updated");
        Ok(Response::new(self.settings_response(Some(stored))))
    }
}
