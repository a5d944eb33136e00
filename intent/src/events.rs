//! The agent's change feed: every committed change of intent (created, updated, deleted) and every change of an
//! object's status (pending, ready, error with its reason), in one ordered sequence that watchers read from and
//! resume in.
//!
//! Events sit in a bounded ring. Publishing never waits: a watcher that falls behind by more than the ring
//! holds is told to list again ([`Item::Relist`]), as a Kubernetes watch answers 410 Gone, instead of slowing the
//! agent. A watcher resumes with the [`Cursor`] of the last event it handled and misses nothing while the ring
//! still holds the next one. A cursor of an earlier agent process (an upgrade, a restart) resumes too when no
//! intent changed in between and this process's ring is still whole: its statuses are then replayed from its
//! start (repeats of the old process's last ones, harmlessly); otherwise the watcher is told to list again.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::reconcile::{ObjectKey, ObjectStatus};

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Intent written for the first time.
    Created,
    /// Intent changed (a new generation).
    Updated,
    /// Intent removed.
    Deleted,
    /// Its reconciler reported a new status (state, reason or observed generation changed).
    Status,
}

/// One entry of the feed.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in this process's feed, from 1.
    pub seq: u64,
    pub change: Change,
    pub key: ObjectKey,
    /// The intent's generation (for a deletion: the last one); for a status, the generation it observed.
    pub generation: u64,
    /// The store revision once this happened.
    pub revision: u64,
    /// The reconciler that reported it (status events).
    pub subsystem: Option<&'static str>,
    pub status: Option<ObjectStatus>,
    /// Unix milliseconds.
    pub time_ms: u64,
}

/// Where a watcher stands: `<process epoch>-<seq>-<store revision>`, opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    epoch: u64,
    seq: u64,
    revision: u64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}-{}", self.epoch, self.seq, self.revision)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, '-');
        let (Some(epoch), Some(seq), Some(revision)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{s:?} is not a watch cursor"));
        };
        let bad = |_| format!("{s:?} is not a watch cursor");
        Ok(Self {
            epoch: u64::from_str_radix(epoch, 16).map_err(bad)?,
            seq: seq.parse().map_err(bad)?,
            revision: revision.parse().map_err(bad)?,
        })
    }
}

/// What a watcher reads next.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<Event>),
    /// Events were lost to this watcher (it fell behind the ring, or its cursor is too old): list again, then
    /// go on from `cursor`.
    Relist {
        cursor: Cursor,
        reason: String,
    },
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    /// Seq of the next event.
    next: u64,
}

/// The feed; cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    ring: Arc<Mutex<Ring>>,
    latest: watch::Sender<u64>,
    epoch: u64,
    capacity: usize,
    /// The store revision when this process started: the point an earlier process's cursor must match.
    start_revision: u64,
}

impl Events {
    /// A feed holding the last `capacity` events, for a store at `start_revision`.
    pub fn new(capacity: usize, start_revision: u64) -> Self {
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 48;
        Self {
            ring: Arc::new(Mutex::new(Ring { events: VecDeque::with_capacity(capacity), next: 1 })),
            latest: watch::Sender::new(0),
            epoch,
            capacity: capacity.max(1),
            start_revision,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an event (never waits on watchers).
    pub fn publish(
        &self,
        change: Change,
        key: ObjectKey,
        generation: u64,
        revision: u64,
        status: Option<(&'static str, ObjectStatus)>,
    ) {
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let seq = {
            let mut ring = self.lock();
            let seq = ring.next;
            ring.next += 1;
            if ring.events.len() == self.capacity {
                ring.events.pop_front();
            }
            let (subsystem, status) = status.map_or((None, None), |(s, st)| (Some(s), Some(st)));
            ring.events.push_back(Arc::new(Event {
                seq,
                change,
                key,
                generation,
                revision,
                subsystem,
                status,
                time_ms,
            }));
            seq
        };
        self.latest.send_replace(seq);
    }

    /// The cursor of `event`.
    pub fn cursor(&self, event: &Event) -> Cursor {
        Cursor { epoch: self.epoch, seq: event.seq, revision: event.revision }
    }

    /// The cursor of the newest event (what a watcher that lists now resumes from).
    pub fn now(&self, revision: u64) -> Cursor {
        Cursor { epoch: self.epoch, seq: self.lock().next - 1, revision }
    }

    /// A watcher starting with the oldest event kept (the feed's recent history).
    pub fn replay(&self) -> Watcher {
        let oldest = {
            let ring = self.lock();
            ring.events.front().map_or(ring.next, |e| e.seq)
        };
        Watcher { events: self.clone(), position: oldest, relist: None, latest: self.latest.subscribe() }
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next
    }

    /// A watcher starting after `from` (`None`: with the next event). Its first item is a [`Item::Relist`] when
    /// `from` cannot be resumed.
    pub fn watch(&self, from: Option<Cursor>, revision_now: u64) -> Watcher {
        let (oldest, next) = {
            let ring = self.lock();
            (ring.events.front().map_or(ring.next, |e| e.seq), ring.next)
        };
        let (position, relist) = match from {
            None => (next, None),
            Some(c) if c.epoch == self.epoch && c.seq < next && c.seq + 1 >= oldest => (c.seq + 1, None),
            Some(c) if c.epoch == self.epoch && c.seq >= next => {
                (next, Some(format!("cursor {c} is ahead of this feed (at {})", next - 1)))
            }
            Some(c) if c.epoch == self.epoch => {
                (next, Some(format!("cursor {c} is older than the {} events kept", self.capacity)))
            }
            Some(c) if c.revision == self.start_revision && oldest == 1 => (1, None),
            Some(c) => (
                next,
                Some(format!(
                    "cursor {c} belongs to another agent process and intent changed since (revision {revision_now})"
                )),
            ),
        };
        let relist = relist.map(|reason| Item::Relist { cursor: self.now(revision_now), reason });
        Watcher { events: self.clone(), position, relist, latest: self.latest.subscribe() }
    }
}

/// One watcher's position in the feed.
#[derive(Debug)]
pub struct Watcher {
    events: Events,
    position: u64,
    relist: Option<Item>,
    latest: watch::Receiver<u64>,
}

impl Watcher {
    /// The seq of the event this watcher reads next.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The cursor just before this watcher's next event (where a client that stops now resumes from).
    pub fn cursor(&self, revision: u64) -> Cursor {
        Cursor { epoch: self.events.epoch, seq: self.position - 1, revision }
    }

    /// The next item, waiting for one to be published.
    pub async fn next(&mut self) -> Item {
        if let Some(item) = self.relist.take() {
            return item;
        }
        loop {
            {
                let ring = self.events.lock();
                let oldest = ring.events.front().map_or(ring.next, |e| e.seq);
                if self.position < oldest {
                    let missed = oldest - self.position;
                    self.position = ring.next;
                    let revision = ring.events.back().map_or(0, |e| e.revision);
                    return Item::Relist {
                        cursor: Cursor { epoch: self.events.epoch, seq: ring.next - 1, revision },
                        reason: format!("this watcher fell {missed} events behind the feed"),
                    };
                }
                if let Some(event) = ring.events.get((self.position - oldest) as usize) {
                    self.position += 1;
                    return Item::Event(event.clone());
                }
            }
            if self.latest.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::ObjectState;

    fn key(id: &str) -> ObjectKey {
        ObjectKey { kind: "volumes".into(), id: id.into() }
    }

    async fn next_event(w: &mut Watcher) -> Arc<Event> {
        match w.next().await {
            Item::Event(e) => e,
            Item::Relist { reason, .. } => panic!("relist: {reason}"),
        }
    }

    #[tokio::test]
    async fn watchers_resume_from_their_cursor_and_are_told_to_relist_when_they_cannot() {
        let events = Events::new(4, 7);
        let mut live = events.watch(None, 7);
        events.publish(Change::Created, key("a"), 1, 8, None);
        let status = ObjectStatus { state: ObjectState::Ready, reason: String::new(), observed_generation: 1 };
        events.publish(Change::Status, key("a"), 1, 8, Some(("storage", status.clone())));
        let first = next_event(&mut live).await;
        assert_eq!((first.change, first.seq, first.revision), (Change::Created, 1, 8));
        let cursor = events.cursor(&first);
        let parsed: Cursor = cursor.to_string().parse().expect("round trip");
        assert_eq!(parsed, cursor);
        assert!("nope".parse::<Cursor>().is_err());

        // Resuming from the first event's cursor replays the second.
        let mut resumed = events.watch(Some(cursor), 8);
        let second = next_event(&mut resumed).await;
        assert_eq!(
            (second.change, second.subsystem, second.status.clone()),
            (Change::Status, Some("storage"), Some(status))
        );

        // Four more push the first two out: the old cursor can no longer resume, a slow watcher learns it lost some.
        for i in 0..4 {
            events.publish(Change::Updated, key("a"), 2 + i, 9 + i, None);
        }
        assert!(matches!(events.watch(Some(cursor), 12).next().await, Item::Relist { .. }));
        let mut slow = live;
        match slow.next().await {
            Item::Relist { cursor, reason } => {
                assert!(reason.contains("behind"), "{reason}");
                assert_eq!(cursor.seq, 6);
                let mut after = events.watch(Some(cursor), 12);
                events.publish(Change::Deleted, key("a"), 5, 13, None);
                assert_eq!(next_event(&mut after).await.seq, 7);
            }
            Item::Event(e) => panic!("expected a relist, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn a_cursor_of_the_previous_process_resumes_when_no_intent_changed() {
        let old = Events::new(16, 3);
        old.publish(Change::Updated, key("a"), 2, 3, None);
        let first = next_event(&mut old.watch(Some(Cursor { seq: 0, ..old.now(3) }), 3)).await;
        let last = old.cursor(&first);
        // The new process starts at the same revision: its feed is replayed from its start.
        let new = Events::new(16, 3);
        let status = ObjectStatus { state: ObjectState::Pending, reason: "opening".into(), observed_generation: 2 };
        new.publish(Change::Status, key("a"), 2, 3, Some(("storage", status)));
        assert_eq!(next_event(&mut new.watch(Some(last), 3)).await.seq, 1);
        // A process that started after intent changed cannot know what the watcher missed.
        let later = Events::new(16, 4);
        assert!(matches!(later.watch(Some(last), 4).next().await, Item::Relist { .. }));
    }
}
