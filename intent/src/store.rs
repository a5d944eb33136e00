//! The durable store and its typed AIP layer.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::events::Change as Feed;
use crate::log::{self, Op, Record};
use crate::reconcile::ObjectKey;
use crate::{Created, Error, Meta, Page, Resource, Stored, validate_id};

const LOG_FILE: &str = "intent.log";
const LOCK_FILE: &str = "LOCK";
/// Automatic compaction needs the log to exceed this size ...
const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// ... and this multiple of the live data.
const COMPACT_RATIO: u64 = 2;
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;

type Key = (String, String);

/// Durable, crash-safe store of JSON objects keyed by (kind, id), backed by `<dir>/intent.log`.
///
/// Every mutating call appends one record and `fsync`s it before returning; the in-memory index
/// changes only after that succeeded. Calls are short blocking file I/O: code on a tokio runtime
/// may call them directly for intent-sized writes (reads share the lock, so they may wait out an
/// in-flight fsync). Cloning yields another handle to the same store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    log_path: PathBuf,
    store_id: u64,
    state: Mutex<State>,
    revision: watch::Sender<u64>,
    /// The change feed every commit is published to, once attached.
    events: std::sync::OnceLock<crate::events::Events>,
}

#[derive(Default)]
struct State {
    /// The `flock`ed `LOCK` file; `None` once the store was released to another process.
    lock: Option<File>,
    /// Append handle; `None` when the log must be rewritten from memory before the next append.
    file: Option<File>,
    revision: u64,
    objects: BTreeMap<Key, Entry>,
    log_len: u64,
    live_len: u64,
}

struct Entry {
    object: Value,
    meta: Meta,
    size: u64,
}

/// An untyped change awaiting commit: a put, or a delete when `object` is `None`.
#[derive(Debug, Clone)]
struct Change {
    kind: &'static str,
    id: String,
    object: Option<Value>,
}

/// Several typed puts and deletes applied atomically, as one log record, by [`Store::apply`].
/// Puts create or replace; deleting a missing object is not an error.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    changes: Vec<Change>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a create-or-replace of `T::KIND/id`; validates the id.
    pub fn put<T: Resource>(&mut self, id: &str, spec: &T) -> Result<&mut Self, Error> {
        validate_id(id)?;
        let object = to_json::<T>(id, spec)?;
        self.changes.push(Change { kind: T::KIND, id: id.to_owned(), object: Some(object) });
        Ok(self)
    }

    /// Adds a delete of `T::KIND/id`.
    pub fn delete<T: Resource>(&mut self, id: &str) -> &mut Self {
        self.changes.push(Change { kind: T::KIND, id: id.to_owned(), object: None });
        self
    }
}

#[derive(Serialize, Deserialize)]
struct PageToken {
    store: u64,
    kind: String,
    after: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.inner.dir).field("revision", &self.revision()).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, takes an exclusive lock on `<dir>/LOCK` and
    /// replays the log. A damaged log yields [`Error::Corrupt`] and is not modified. An incomplete
    /// final record (an unacknowledged write cut short by a crash) is dropped: the original file is
    /// kept as `intent.log.torn` and the log is rewritten without it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = lock_dir(&dir)?;
        let log_path = dir.join(LOG_FILE);
        let (mut st, store_id, rewrite) = load(&dir, &log_path)?;
        st.lock = Some(lock);
        let revision = watch::Sender::new(st.revision);
        let inner = Inner {
            dir,
            log_path,
            store_id,
            state: Mutex::new(State::default()),
            revision,
            events: std::sync::OnceLock::new(),
        };
        st.file = Some(if rewrite { inner.rewrite(&mut st)? } else { inner.open_append()? });
        *inner.lock() = st;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Gives the data directory up to another process (the agent that takes over at an upgrade): closes the log
    /// and unlocks `LOCK`. Reads keep answering from memory; every write fails with [`Error::Released`] until
    /// [`Store::reacquire`].
    pub fn release(&self) {
        let mut st = self.inner.lock();
        st.file = None;
        st.lock = None;
        tracing::info!(revision = st.revision, "intent store released");
    }

    /// Whether [`Store::release`] gave the data directory up.
    pub fn is_released(&self) -> bool {
        self.inner.lock().lock.is_none()
    }

    /// Takes the data directory back after [`Store::release`] (the other process went away): locks it again and
    /// replays the log, so whatever the other process committed meanwhile is in memory; subscribers see the new
    /// revision when it changed. A no-op on a store that holds its lock.
    pub fn reacquire(&self) -> Result<(), Error> {
        let mut st = self.inner.lock();
        if st.lock.is_some() {
            return Ok(());
        }
        let lock = lock_dir(&self.inner.dir)?;
        let (mut fresh, store_id, rewrite) = load(&self.inner.dir, &self.inner.log_path)?;
        if store_id != self.inner.store_id {
            return Err(Error::Corrupt {
                path: self.inner.log_path.clone(),
                offset: 0,
                reason: format!("it now belongs to store {store_id:016x}, not {:016x}", self.inner.store_id),
            });
        }
        fresh.lock = Some(lock);
        fresh.file = Some(if rewrite { self.inner.rewrite(&mut fresh)? } else { self.inner.open_append()? });
        let changed = fresh.revision != st.revision;
        *st = fresh;
        if changed {
            self.inner.revision.send_replace(st.revision);
        }
        tracing::info!(revision = st.revision, changed, "intent store reacquired");
        Ok(())
    }

    /// Publishes every commit from now on to `events` (created / updated / deleted per object). Once.
    pub fn attach_events(&self, events: crate::events::Events) {
        let _ = self.inner.events.set(events);
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The revision of the last committed write (0 for an empty store).
    pub fn revision(&self) -> u64 {
        *self.inner.revision.borrow()
    }

    /// A receiver of the current revision; it changes after every committed write.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    /// Rewrites the log as a single snapshot record. Also runs automatically after a write once the
    /// log exceeds 1 MiB and twice the size of the live data.
    pub fn compact(&self) -> Result<(), Error> {
        let mut st = self.inner.lock();
        if st.lock.is_none() {
            return Err(Error::Released { dir: self.inner.dir.clone() });
        }
        st.file = None;
        st.file = Some(self.inner.rewrite(&mut st)?);
        Ok(())
    }

    /// Creates `T::KIND/id`. Creating an identical object again succeeds without writing.
    pub fn create<T: Resource>(&self, id: &str, spec: T) -> Result<Created<T>, Error> {
        validate_id(id)?;
        let object = to_json::<T>(id, &spec)?;
        let mut st = self.inner.lock();
        if let Some(entry) = st.get(T::KIND, id) {
            let existing: T = from_json::<T>(id, &entry.object)?;
            if existing != spec {
                return Err(Error::AlreadyExists { kind: T::KIND.into(), id: id.into() });
            }
            return Ok(Created::Unchanged(Stored { id: id.into(), spec, meta: entry.meta }));
        }
        self.inner.commit(&mut st, vec![Change { kind: T::KIND, id: id.into(), object: Some(object) }])?;
        let meta = st.meta::<T>(id)?;
        Ok(Created::New(Stored { id: id.into(), spec, meta }))
    }

    /// Reads `T::KIND/id`.
    pub fn get<T: Resource>(&self, id: &str) -> Result<Stored<T>, Error> {
        let st = self.inner.lock();
        let entry = st.get(T::KIND, id).ok_or_else(|| not_found::<T>(id))?;
        Ok(Stored { id: id.into(), spec: from_json(id, &entry.object)?, meta: entry.meta })
    }

    /// Replaces the spec of an existing object. With `expected_generation`, fails with
    /// [`Error::Conflict`] unless the stored generation matches. An unchanged spec writes nothing.
    pub fn update<T: Resource>(&self, id: &str, spec: T, expected_generation: Option<u64>) -> Result<Stored<T>, Error> {
        let object = to_json::<T>(id, &spec)?;
        let mut st = self.inner.lock();
        let entry = st.get(T::KIND, id).ok_or_else(|| not_found::<T>(id))?;
        let actual = entry.meta.generation;
        if let Some(expected) = expected_generation.filter(|&g| g != actual) {
            return Err(Error::Conflict { kind: T::KIND.into(), id: id.into(), expected, actual });
        }
        if from_json::<T>(id, &entry.object)? != spec {
            let change = Change { kind: T::KIND, id: id.into(), object: Some(object) };
            self.inner.commit(&mut st, vec![change])?;
        }
        let meta = st.meta::<T>(id)?;
        Ok(Stored { id: id.into(), spec, meta })
    }

    /// Deletes `T::KIND/id` and returns what was stored. A missing object is [`Error::NotFound`]
    /// unless `allow_missing`, which yields `Ok(None)`.
    pub fn delete<T: Resource>(&self, id: &str, allow_missing: bool) -> Result<Option<Stored<T>>, Error> {
        let mut st = self.inner.lock();
        let Some(entry) = st.get(T::KIND, id) else {
            return if allow_missing { Ok(None) } else { Err(not_found::<T>(id)) };
        };
        let old = Stored { id: id.into(), spec: from_json(id, &entry.object)?, meta: entry.meta };
        self.inner.commit(&mut st, vec![Change { kind: T::KIND, id: id.into(), object: None }])?;
        Ok(Some(old))
    }

    /// One page of the collection in id order. `page_size` 0 means 50; larger than 1000 means 1000.
    /// Paging continues after the last id returned, so concurrent writes never shift pages.
    pub fn list<T: Resource>(&self, page_size: usize, page_token: Option<&str>) -> Result<Page<T>, Error> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let start = match page_token.filter(|t| !t.is_empty()) {
            Some(token) => Bound::Excluded((T::KIND.to_owned(), self.decode_token(token, T::KIND)?)),
            None => Bound::Included((T::KIND.to_owned(), String::new())),
        };
        let st = self.inner.lock();
        let mut items = Vec::new();
        let mut rest = st.objects.range((start, Bound::Unbounded)).take_while(|((k, _), _)| k == T::KIND);
        for ((_, id), entry) in rest.by_ref().take(size) {
            items.push(Stored { id: id.clone(), spec: from_json(id, &entry.object)?, meta: entry.meta });
        }
        let next_page_token = match (rest.next(), items.last()) {
            (Some(_), Some(last)) => Some(self.encode_token(T::KIND, &last.id)?),
            _ => None,
        };
        Ok(Page { items, next_page_token })
    }

    /// Every object of the collection in id order (for reconcilers).
    pub fn list_all<T: Resource>(&self) -> Result<Vec<Stored<T>>, Error> {
        let st = self.inner.lock();
        let start = Bound::Included((T::KIND.to_owned(), String::new()));
        st.objects
            .range((start, Bound::Unbounded))
            .take_while(|((k, _), _)| k == T::KIND)
            .map(|((_, id), e)| Ok(Stored { id: id.clone(), spec: from_json(id, &e.object)?, meta: e.meta }))
            .collect()
    }

    /// Commits a batch as one record and returns the resulting revision. Puts that change nothing and
    /// deletes of missing objects are skipped; a batch that changes nothing writes nothing.
    pub fn apply(&self, batch: Batch) -> Result<u64, Error> {
        let mut st = self.inner.lock();
        self.inner.commit(&mut st, batch.changes)
    }

    fn encode_token(&self, kind: &str, after: &str) -> Result<String, Error> {
        let token = PageToken { store: self.inner.store_id, kind: kind.into(), after: after.into() };
        let json =
            serde_json::to_vec(&token).map_err(|source| Error::Json { kind: kind.into(), id: after.into(), source })?;
        Ok(URL_SAFE_NO_PAD.encode(json))
    }

    fn decode_token(&self, token: &str, kind: &str) -> Result<String, Error> {
        let invalid = |reason: &str| Error::InvalidPageToken { reason: reason.into() };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid("it is not valid base64"))?;
        let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| invalid("it does not decode"))?;
        if token.store != self.inner.store_id {
            return Err(invalid("it was issued by another store"));
        }
        if token.kind != kind {
            return Err(invalid(&format!("it belongs to a listing of {}, not {kind}", token.kind)));
        }
        Ok(token.after)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves changes against the index, appends and fsyncs them as one record, then updates the
    /// index and publishes the new revision. Returns the current revision if nothing changed.
    fn commit(&self, st: &mut State, changes: Vec<Change>) -> Result<u64, Error> {
        let rev = st.revision + 1;
        let now = now_millis();
        // Effect of the batch so far, so that several changes to one key compose.
        let mut pending: BTreeMap<Key, Option<(Value, Meta)>> = BTreeMap::new();
        let mut ops = Vec::new();
        for Change { kind, id, object } in changes {
            let key = (kind.to_owned(), id);
            let current = match pending.get(&key) {
                Some(p) => p.clone(),
                None => st.objects.get(&key).map(|e| (e.object.clone(), e.meta)),
            };
            let (kind, id) = key.clone();
            let op = match (object, current) {
                (None, None) => continue,
                (Some(new), Some((old, _))) if new == old => continue,
                (None, Some(_)) => Op::Delete { kind, id },
                (Some(object), Some((_, m))) => {
                    let meta = Meta { generation: m.generation + 1, update_revision: rev, update_time: now, ..m };
                    Op::Put { kind, id, meta, object }
                }
                (Some(object), None) => {
                    let meta = Meta {
                        generation: 1,
                        create_revision: rev,
                        update_revision: rev,
                        create_time: now,
                        update_time: now,
                    };
                    Op::Put { kind, id, meta, object }
                }
            };
            let effect = match &op {
                Op::Put { object, meta, .. } => Some((object.clone(), *meta)),
                Op::Delete { .. } => None,
            };
            pending.insert(key, effect);
            ops.push(op);
        }
        if ops.is_empty() {
            return Ok(st.revision);
        }
        if st.lock.is_none() {
            return Err(Error::Released { dir: self.dir.clone() });
        }
        let record = Record { rev, ops };
        let bytes = log::encode(&record)?;
        let mut file = match st.file.take() {
            Some(file) => file,
            None => self.rewrite(st)?,
        };
        // On failure the handle is dropped, so the next write rewrites the log from memory first.
        file.write_all(&bytes).and_then(|()| file.sync_data()).map_err(io_err(&self.log_path))?;
        st.file = Some(file);
        st.log_len += bytes.len() as u64;
        let published: Vec<_> = match self.events.get() {
            Some(_) => record
                .ops
                .iter()
                .map(|op| match op {
                    Op::Put { kind, id, meta, .. } => {
                        let change = if meta.generation == 1 { Feed::Created } else { Feed::Updated };
                        (change, kind.clone(), id.clone(), meta.generation)
                    }
                    Op::Delete { kind, id } => {
                        let last = st.get(kind, id).map_or(0, |e| e.meta.generation);
                        (Feed::Deleted, kind.clone(), id.clone(), last)
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        st.apply(record);
        if let Some(events) = self.events.get() {
            for (change, kind, id, generation) in published {
                events.publish(change, ObjectKey { kind, id }, generation, rev, None);
            }
        }
        self.revision.send_replace(rev);
        if st.log_len > COMPACT_MIN_BYTES && st.log_len > COMPACT_RATIO * st.live_len {
            st.file = None;
            match self.rewrite(st) {
                Ok(file) => st.file = Some(file),
                Err(e) => {
                    tracing::warn!(error = %e, "intent log compaction failed; retrying on the next write")
                }
            }
        }
        Ok(rev)
    }

    /// Writes a snapshot of the index to `intent.log.tmp`, fsyncs it, renames it over the log,
    /// fsyncs the directory and returns a fresh append handle.
    fn rewrite(&self, st: &mut State) -> Result<File, Error> {
        let mut buf = log::header(self.store_id);
        if st.revision > 0 {
            let ops = st
                .objects
                .iter()
                .map(|((kind, id), e)| Op::Put {
                    kind: kind.clone(),
                    id: id.clone(),
                    meta: e.meta,
                    object: e.object.clone(),
                })
                .collect();
            buf.extend(log::encode(&Record { rev: st.revision, ops })?);
        }
        let tmp = self.dir.join("intent.log.tmp");
        write_synced(&tmp, &buf)?;
        fs::rename(&tmp, &self.log_path).map_err(io_err(&self.log_path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))?;
        let file = self.open_append()?;
        tracing::debug!(from = st.log_len, to = buf.len(), "intent log rewritten");
        st.log_len = buf.len() as u64;
        Ok(file)
    }

    fn open_append(&self) -> Result<File, Error> {
        OpenOptions::new().append(true).open(&self.log_path).map_err(io_err(&self.log_path))
    }
}

impl State {
    fn apply(&mut self, record: Record) {
        self.revision = record.rev;
        for op in record.ops {
            let (key, new) = match op {
                Op::Put { kind, id, meta, object } => {
                    let size = serde_json::to_vec(&object).map_or(0, |v| v.len() as u64) + 160;
                    ((kind, id), Some(Entry { object, meta, size }))
                }
                Op::Delete { kind, id } => ((kind, id), None),
            };
            let old = match new {
                Some(entry) => {
                    self.live_len += entry.size;
                    self.objects.insert(key, entry)
                }
                None => self.objects.remove(&key),
            };
            self.live_len = self.live_len.saturating_sub(old.map_or(0, |e| e.size));
        }
    }

    fn get(&self, kind: &str, id: &str) -> Option<&Entry> {
        self.objects.get(&(kind.to_owned(), id.to_owned()))
    }

    fn meta<T: Resource>(&self, id: &str) -> Result<Meta, Error> {
        self.get(T::KIND, id).map(|e| e.meta).ok_or_else(|| not_found::<T>(id))
    }
}

/// Opens `<dir>/LOCK` and takes its exclusive `flock`.
fn lock_dir(dir: &Path) -> Result<File, Error> {
    let lock_path = dir.join(LOCK_FILE);
    let lock =
        OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(TryLockError::WouldBlock) => Err(Error::Locked { dir: dir.to_path_buf() }),
        Err(TryLockError::Error(e)) => Err(io_err(&lock_path)(e)),
    }
}

/// Replays `log_path` into a fresh index (the caller holds the lock). Returns the index, the store id and whether
/// the log must be rewritten before appending (new store, or a torn tail dropped: the original is kept as
/// `intent.log.torn`).
fn load(dir: &Path, log_path: &Path) -> Result<(State, u64, bool), Error> {
    let mut st = State::default();
    let (store_id, rewrite) = match fs::read(log_path) {
        Ok(bytes) => {
            let replayed = log::replay(&bytes, |rec| st.apply(rec)).map_err(|(offset, reason)| Error::Corrupt {
                path: log_path.to_path_buf(),
                offset,
                reason,
            })?;
            st.log_len = replayed.valid_len;
            if replayed.torn {
                let torn = dir.join("intent.log.torn");
                tracing::warn!(
                    path = %log_path.display(), offset = replayed.valid_len,
                    dropped_bytes = bytes.len() as u64 - replayed.valid_len,
                    "intent log ends in an incomplete record from an interrupted write; dropping it \
                     and keeping the original as {}", torn.display()
                );
                write_synced(&torn, &bytes)?;
            }
            (replayed.store_id, replayed.torn)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (new_store_id(), true),
        Err(e) => return Err(io_err(log_path)(e)),
    };
    let tmp = dir.join("intent.log.tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    Ok((st, store_id, rewrite))
}

fn to_json<T: Resource>(id: &str, spec: &T) -> Result<Value, Error> {
    serde_json::to_value(spec).map_err(|source| Error::Json { kind: T::KIND.into(), id: id.into(), source })
}

fn from_json<T: Resource>(id: &str, object: &Value) -> Result<T, Error> {
    T::deserialize(object).map_err(|source| Error::Json { kind: T::KIND.into(), id: id.into(), source })
}

fn not_found<T: Resource>(id: &str) -> Error {
    Error::NotFound { kind: T::KIND.into(), id: id.into() }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_err(path))
}

fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn new_store_id() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((SystemTime::now(), std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Vol {
        size: u64,
        #[serde(default)]
        label: String,
    }
    impl Resource for Vol {
        const KIND: &'static str = "volumes";
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Net {
        vni: u32,
    }
    impl Resource for Net {
        const KIND: &'static str = "networks";
    }

    fn vol(size: u64) -> Vol {
        Vol { size, label: String::new() }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        (dir, store)
    }

    /// Start offsets of the records in a log file.
    fn record_offsets(bytes: &[u8]) -> Vec<usize> {
        let (mut pos, mut out) = (20, vec![]);
        while pos + 8 <= bytes.len() {
            out.push(pos);
            pos += 8 + u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        }
        out
    }

    #[test]
    fn create_get_update_delete() {
        let (_dir, s) = open();
        let mut revs = s.subscribe();
        let Created::New(v) = s.create("v1", vol(10)).expect("create") else { panic!("not new") };
        assert_eq!((v.meta.generation, v.meta.create_revision, s.revision()), (1, 1, 1));
        assert!(revs.has_changed().expect("open") && *revs.borrow_and_update() == 1);
        assert!(matches!(s.create("v1", vol(10)), Ok(Created::Unchanged(u)) if u == v));
        assert!(matches!(s.create("v1", vol(11)), Err(Error::AlreadyExists { .. })));
        assert!(matches!(s.create("V1", vol(1)), Err(Error::InvalidId { .. })));
        assert_eq!(s.revision(), 1);
        assert!(!revs.has_changed().expect("open"));
        assert_eq!(s.get::<Vol>("v1").expect("get"), v);

        assert_eq!(s.update("v1", vol(10), None).expect("same").meta, v.meta);
        assert_eq!(s.revision(), 1, "an unchanged spec writes nothing");
        let u = s.update("v1", vol(20), Some(1)).expect("update");
        assert_eq!((u.meta.generation, u.meta.create_revision, u.meta.update_revision), (2, 1, 2));
        let err = s.update("v1", vol(30), Some(1)).expect_err("stale");
        assert!(matches!(err, Error::Conflict { expected: 1, actual: 2, .. }), "{err}");
        assert!(matches!(s.update("nope", vol(1), None), Err(Error::NotFound { .. })));
        assert_eq!(s.get::<Vol>("v1").expect("get").spec, vol(20));

        assert!(matches!(s.delete::<Vol>("nope", false), Err(Error::NotFound { .. })));
        assert_eq!(s.delete::<Vol>("nope", true).expect("allow missing"), None);
        assert_eq!(s.delete::<Vol>("v1", false).expect("delete"), Some(u));
        let err = s.get::<Vol>("v1").expect_err("gone");
        assert_eq!(err.to_string(), "volumes/v1 does not exist");
        assert_eq!(s.revision(), 3);
    }

    #[test]
    fn list_pages_and_tokens() {
        let (_dir, s) = open();
        for i in [5, 1, 7, 3, 2, 6, 4] {
            s.create(&format!("v{i}"), vol(i)).expect("create");
        }
        s.create("n1", Net { vni: 1 }).expect("create net");
        let first = s.list::<Vol>(3, None).expect("page 1");
        let ids = |p: &Page<Vol>| p.items.iter().map(|v| v.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ["v1", "v2", "v3"]);
        let token = first.next_page_token.expect("more");
        // Inserts before and after the cursor do not shift the next page.
        s.create("v0", vol(0)).expect("create");
        s.create("v35", vol(35)).expect("create");
        let second = s.list::<Vol>(3, Some(&token)).expect("page 2");
        assert_eq!(ids(&second), ["v35", "v4", "v5"]);
        let third = s.list::<Vol>(3, second.next_page_token.as_deref()).expect("page 3");
        assert_eq!((ids(&third), third.next_page_token), (vec!["v6".into(), "v7".into()], None));
        assert_eq!(s.list::<Vol>(0, None).expect("all").items.len(), 9);
        assert_eq!(s.list_all::<Net>().expect("nets").len(), 1);

        for bad in ["%%%", "bm90IGpzb24"] {
            assert!(matches!(s.list::<Vol>(3, Some(bad)), Err(Error::InvalidPageToken { .. })), "{bad}");
        }
        let err = s.list::<Net>(3, Some(&token)).expect_err("other kind");
        assert!(err.to_string().contains("volumes, not networks"), "{err}");
        let (_dir2, other) = open();
        assert!(matches!(other.list::<Vol>(3, Some(&token)), Err(Error::InvalidPageToken { .. })));
    }

    #[test]
    fn batch_is_one_revision_and_survives_reopen() {
        let (dir, s) = open();
        s.create("keep", vol(1)).expect("create");
        s.create("gone", vol(2)).expect("create");
        let mut batch = Batch::new();
        batch.put("keep", &vol(9)).expect("put").put("n1", &Net { vni: 7 }).expect("put");
        batch.delete::<Vol>("gone").delete::<Vol>("never-existed");
        assert!(matches!(Batch::new().put("Bad", &vol(1)), Err(Error::InvalidId { .. })));
        assert_eq!(s.apply(batch.clone()).expect("apply"), 3);
        assert_eq!(s.apply(batch).expect("no-op"), 3, "a batch that changes nothing writes nothing");
        let before = (s.list_all::<Vol>().expect("list"), s.get::<Net>("n1").expect("net"));
        assert_eq!(before.0.len(), 1);
        assert_eq!((before.0[0].meta.generation, before.1.meta.create_revision), (2, 3));
        drop(s);

        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.revision(), 3);
        assert_eq!((s.list_all::<Vol>().expect("list"), s.get::<Net>("n1").expect("net")), before);
        assert_eq!(s.create("later", vol(4)).expect("create").into_stored().meta.create_revision, 4);
    }

    #[test]
    fn corruption_is_reported_and_file_untouched() {
        let (dir, s) = open();
        for i in 0..6 {
            s.create(&format!("v{i}"), vol(i)).expect("create");
        }
        drop(s);
        let path = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&path).expect("read");
        let target = record_offsets(&bytes)[3];
        bytes[target + 20] ^= 0x01;
        fs::write(&path, &bytes).expect("write");
        let checksum = crc32c::crc32c(&bytes);

        match Store::open(dir.path()) {
            Err(Error::Corrupt { offset, reason, .. }) => {
                assert_eq!(offset, target as u64);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        assert_eq!(crc32c::crc32c(&fs::read(&path).expect("read")), checksum);
        assert!(!dir.path().join("intent.log.torn").exists() && !dir.path().join("intent.log.tmp").exists());
    }

    #[test]
    fn torn_tail_is_dropped_whole() {
        let (dir, s) = open();
        s.create("a", vol(1)).expect("create");
        let mut batch = Batch::new();
        batch.put("b", &vol(2)).expect("put").put("c", &vol(3)).expect("put");
        s.apply(batch).expect("apply");
        drop(s);
        let path = dir.path().join(LOG_FILE);
        let bytes = fs::read(&path).expect("read");
        fs::write(&path, &bytes[..bytes.len() - 5]).expect("truncate");

        let s = Store::open(dir.path()).expect("open torn");
        assert_eq!(s.list_all::<Vol>().expect("list").len(), 1, "the torn batch is dropped entirely");
        assert_eq!(fs::read(dir.path().join("intent.log.torn")).expect("forensic copy"), &bytes[..bytes.len() - 5]);
        s.create("d", vol(4)).expect("write after torn tail");
        drop(s);

        let rewritten = fs::read(&path).expect("read");
        let replayed = log::replay(&rewritten, |_| {}).expect("valid");
        assert!(!replayed.torn && replayed.valid_len == rewritten.len() as u64);
        let s = Store::open(dir.path()).expect("reopen");
        let ids: Vec<_> = s.list_all::<Vol>().expect("list").into_iter().map(|v| v.id).collect();
        assert_eq!((ids, s.revision()), (vec!["a".to_owned(), "d".to_owned()], 2));
    }

    #[test]
    fn compaction_shrinks_and_keeps_content() {
        let (dir, s) = open();
        let path = dir.path().join(LOG_FILE);
        let big = "x".repeat(20_000);
        s.create("v", Vol { size: 0, label: big.clone() }).expect("create");
        for i in 1..40 {
            s.update("v", Vol { size: i, label: big.clone() }, None).expect("update");
        }
        let grown = fs::metadata(&path).expect("stat").len();
        assert!(grown > 700_000);
        s.compact().expect("compact");
        assert!(fs::metadata(&path).expect("stat").len() < 25_000);
        let before = s.get::<Vol>("v").expect("get");
        assert_eq!(before.meta.generation, 40);
        // Automatic compaction once the log passes 1 MiB and twice the live data.
        for i in 0..60 {
            s.update("v", Vol { size: i + 100, label: big.clone() }, None).expect("update");
        }
        assert!(fs::metadata(&path).expect("stat").len() < 1 << 20);
        let last = s.get::<Vol>("v").expect("get");
        drop(s);
        assert_eq!(Store::open(dir.path()).expect("reopen").get::<Vol>("v").expect("get"), last);
        assert_eq!(last.meta.generation, 100);
    }

    #[test]
    fn handles_are_shareable() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Store>();
        let (_dir, s) = open();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || (0..5).try_for_each(|i| s.create(&format!("t{t}-{i}"), vol(i)).map(drop)))
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("create");
        }
        assert_eq!((s.list_all::<Vol>().expect("list").len(), s.revision()), (20, 20));
    }

    #[test]
    fn second_open_is_locked() {
        let (dir, s) = open();
        let err = Store::open(dir.path()).expect_err("locked");
        assert!(matches!(err, Error::Locked { .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        drop(s);
        Store::open(dir.path()).expect("free again");
    }

    #[tokio::test]
    async fn commits_are_published_to_the_change_feed() {
        use crate::events::{Change as Feed, Events, Item};
        let (_dir, s) = open();
        s.create("early", vol(1)).expect("before the feed");
        let events = Events::new(16, s.revision());
        s.attach_events(events.clone());
        let mut watcher = events.watch(None, s.revision());
        s.create("a", vol(1)).expect("create");
        s.create("a", vol(1)).expect("an identical create writes nothing");
        s.update("a", vol(2), None).expect("update");
        s.delete::<Vol>("a", false).expect("delete");
        let mut seen = Vec::new();
        for _ in 0..3 {
            match watcher.next().await {
                Item::Event(e) => seen.push((e.change, e.key.to_string(), e.generation, e.revision)),
                Item::Relist { reason, .. } => panic!("{reason}"),
            }
        }
        assert_eq!(
            seen,
            vec![
                (Feed::Created, "volumes/a".to_string(), 1, 2),
                (Feed::Updated, "volumes/a".to_string(), 2, 3),
                (Feed::Deleted, "volumes/a".to_string(), 2, 4),
            ]
        );
    }

    #[test]
    fn release_hands_the_directory_over_and_reacquire_takes_it_back() {
        let (dir, s) = open();
        s.create("a", vol(1)).expect("create");
        s.release();
        assert!(s.is_released());
        assert!(matches!(s.create("b", vol(2)), Err(Error::Released { .. })));
        assert_eq!(s.get::<Vol>("a").expect("reads still answer").spec, vol(1), "reads keep answering");
        let next = Store::open(dir.path()).expect("the next process opens it");
        next.create("c", vol(3)).expect("the next process writes");
        assert!(matches!(s.reacquire(), Err(Error::Locked { .. })), "still held by the next process");
        drop(next);
        let revisions = s.subscribe();
        s.reacquire().expect("reacquire");
        assert!(revisions.has_changed().expect("sender alive"), "subscribers learn of the other process's write");
        assert_eq!(s.get::<Vol>("c").expect("its write is replayed").spec, vol(3));
        s.create("d", vol(4)).expect("writes again");
        assert!(matches!(Store::open(dir.path()), Err(Error::Locked { .. })));
    }
}
