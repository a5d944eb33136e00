//! Snapshot metadata on disk.
//!
//! Layout under the root directory:
//!
//! ```text
//! lock                 flock(2)ed while a snapshotter uses the root
//! next-id              ids below this number may have been handed out (reserved in blocks)
//! metadata/<id>.json   one record per snapshot
//! snapshots/<id>/fs    the snapshot's own layer (overlay upper dir, or a bind mount source)
//! snapshots/<id>/work  overlay work dir (active snapshots)
//! ```
//!
//! Every change of a snapshot touches exactly one record, written to a temporary file, fsynced, renamed over
//! the old one and made durable with an fsync of the directory; removal unlinks the record and fsyncs the
//! directory. A commit keeps the snapshot's id, so it is one record replacement too. A crash therefore leaves
//! every record either before or after the change, never half-way, and no recovery rules are needed at start;
//! the only leftovers are snapshot directories (and temporary files) no record refers to, which `Cleanup`
//! removes. Ids are never reused: the next id is kept above every id that may have been handed out.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Error, Info, Kind, Labels, Usage};

/// Ids are reserved in blocks of this size, so `next-id` is written once per this many snapshots.
const ID_BLOCK: u64 = 1024;

/// Paths under the root directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.root.join("metadata")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    fn record_name(id: u64) -> String {
        format!("{id}.json")
    }

    fn lock_path(&self) -> PathBuf {
        self.root.join("lock")
    }

    fn next_id_path(&self) -> PathBuf {
        self.root.join("next-id")
    }
}

/// One snapshot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Names the snapshot's directory and record file; kept across a commit.
    pub id: u64,
    pub info: Info,
    /// Measured at commit (committed snapshots); zero for others.
    pub usage: Usage,
    /// For a layer served by a remote layer source: the read-only directory that is its filesystem. Such a
    /// snapshot has no directory under `snapshots/`.
    pub remote_dir: Option<String>,
}

/// A point in time as stored: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stamp {
    secs: i64,
    nanos: u32,
}

impl From<SystemTime> for Stamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self { secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() },
            Err(before) => {
                // Before the epoch: store as a negative second count plus a non-negative fraction.
                let d = before.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                match d.subsec_nanos() {
                    0 => Self { secs: -secs, nanos: 0 },
                    n => Self { secs: -secs - 1, nanos: 1_000_000_000 - n },
                }
            }
        }
    }
}

impl From<Stamp> for SystemTime {
    fn from(s: Stamp) -> Self {
        let nanos = Duration::from_nanos(u64::from(s.nanos.min(999_999_999)));
        if s.secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(s.secs.unsigned_abs()) + nanos
        } else {
            UNIX_EPOCH - Duration::from_secs(s.secs.unsigned_abs()) + nanos
        }
    }
}

/// The record file format.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    id: u64,
    name: String,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default)]
    labels: Labels,
    created: Stamp,
    updated: Stamp,
    #[serde(default)]
    usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote_dir: Option<String>,
}

impl From<&Record> for RecordFile {
    fn from(r: &Record) -> Self {
        Self {
            id: r.id,
            name: r.info.name.clone(),
            kind: r.info.kind,
            parent: r.info.parent.clone(),
            labels: r.info.labels.clone(),
            created: r.info.created.into(),
            updated: r.info.updated.into(),
            usage: r.usage,
            remote_dir: r.remote_dir.clone(),
        }
    }
}

impl From<RecordFile> for Record {
    fn from(f: RecordFile) -> Self {
        Self {
            id: f.id,
            info: Info {
                name: f.name,
                parent: f.parent,
                kind: f.kind,
                created: f.created.into(),
                updated: f.updated.into(),
                labels: f.labels,
            },
            usage: f.usage,
            remote_dir: f.remote_dir,
        }
    }
}

/// The metadata directory of one root, held exclusively (flock) while open.
#[derive(Debug)]
pub struct MetaStore {
    layout: Layout,
    next_id: u64,
    /// Every id below this may have been handed out before; `next-id` on disk holds it.
    id_ceiling: u64,
    /// Held for the flock.
    _lock: File,
}

impl MetaStore {
    /// Opens (creating as needed) the root and loads every record, keyed by snapshot name. Refuses a root
    /// another process holds and metadata that contradicts itself.
    pub fn open(layout: Layout) -> Result<(Self, BTreeMap<String, Record>), Error> {
        for dir in [layout.root().to_path_buf(), layout.metadata_dir(), layout.snapshots_dir()] {
            create_private_dir(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let lock_path = layout.lock_path();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} is in use by another snapshotter (its lock file is held)",
                    layout.root().display()
                )));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {}", lock_path.display()), e));
            }
        }

        let id_ceiling = read_next_id(&layout.next_id_path())?;
        let records = load_records(&layout.metadata_dir())?;
        let max_record_id = records.values().map(|r| r.id).max().unwrap_or(0);
        let max_dir_id = max_numeric_entry(&layout.snapshots_dir())?;
        let next_id = id_ceiling.max(max_record_id.saturating_add(1)).max(max_dir_id.saturating_add(1)).max(1);
        Ok((Self { layout, next_id, id_ceiling, _lock: lock }, records))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A new id, never handed out before on this root (across restarts too).
    pub fn allocate_id(&mut self) -> Result<u64, Error> {
        if self.next_id >= self.id_ceiling {
            let ceiling = self.next_id.saturating_add(ID_BLOCK);
            let path = self.layout.next_id_path();
            write_atomic(&path, format!("{ceiling}\n").as_bytes())
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            self.id_ceiling = ceiling;
        }
        let id = self.next_id;
        self.next_id += 1;
        Ok(id)
    }

    /// Makes `record` durable, replacing any earlier record of the same id.
    pub fn write(&self, record: &Record) -> Result<(), Error> {
        let path = self.layout.metadata_dir().join(Layout::record_name(record.id));
        let json = serde_json::to_vec_pretty(&RecordFile::from(record))
            .map_err(|e| Error::Internal(format!("encoding the record of snapshot {:?}: {e}", record.info.name)))?;
        write_atomic(&path, &json).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Removes the record of `id` durably.
    pub fn delete(&self, id: u64) -> Result<(), Error> {
        let dir = self.layout.metadata_dir();
        let path = dir.join(Layout::record_name(id));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
        sync_dir(&dir).map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
    }

    /// Temporary files an interrupted write left behind (the caller holds the store, so none is in use).
    pub fn stray_temp_files(&self) -> Result<Vec<PathBuf>, Error> {
        let mut stray = Vec::new();
        for dir in [self.layout.root().to_path_buf(), self.layout.metadata_dir()] {
            let entries = fs::read_dir(&dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    stray.push(entry.path());
                }
            }
        }
        Ok(stray)
    }
}

/// Creates `dir` (and its parents) with mode 0700 for the last component when it is new.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

fn read_next_id(path: &Path) -> Result<u64, Error> {
    match fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| Error::Corrupt(format!("{} does not hold a number: {:?}", path.display(), text.trim()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(1),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// The largest entry name of `dir` that is a number (0 when there is none).
fn max_numeric_entry(dir: &Path) -> Result<u64, Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    let mut max = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
            max = max.max(id);
        }
    }
    Ok(max)
}

/// Reads every `<id>.json` of `dir` and checks the records against each other: ids match their file names,
/// names are unique, and every parent exists and is committed.
fn load_records(dir: &Path) -> Result<BTreeMap<String, Record>, Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    let mut records: BTreeMap<String, Record> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let file_name = entry.file_name();
        let Some(id) = file_name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let bytes = fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let file: RecordFile = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("{} is not a snapshot record: {e}", path.display())))?;
        if file.id != id {
            return Err(Error::Corrupt(format!("{} holds the record of id {}", path.display(), file.id)));
        }
        if file.name.is_empty() {
            return Err(Error::Corrupt(format!("{} names no snapshot", path.display())));
        }
        let record = Record::from(file);
        if let Some(other) = records.get(&record.info.name) {
            return Err(Error::Corrupt(format!(
                "snapshot {:?} is recorded twice (ids {} and {})",
                record.info.name, other.id, record.id
            )));
        }
        records.insert(record.info.name.clone(), record);
    }
    for record in records.values() {
        if let Some(parent) = &record.info.parent {
            match records.get(parent) {
                None => {
                    return Err(Error::Corrupt(format!(
                        "the parent {parent:?} of snapshot {:?} is not recorded",
                        record.info.name
                    )));
                }
                Some(p) if p.info.kind != Kind::Committed => {
                    return Err(Error::Corrupt(format!(
                        "the parent {parent:?} of snapshot {:?} is not committed",
                        record.info.name
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(records)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content: write a temporary
/// file beside it, fsync it, rename it over `path`, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no directory"))?;
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, name: &str, kind: Kind, parent: Option<&str>) -> Record {
        let now = SystemTime::now();
        Record {
            id,
            info: Info {
                name: name.into(),
                parent: parent.map(Into::into),
                kind,
                created: now,
                updated: now,
                labels: Labels::from([("a".into(), "1".into())]),
            },
            usage: Usage { size: 4096, inodes: 3 },
            remote_dir: None,
        }
    }

    #[test]
    fn records_round_trip_and_ids_stay_unique_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let (mut store, records) = MetaStore::open(layout.clone()).unwrap();
        assert!(records.is_empty());
        let a = store.allocate_id().unwrap();
        let b = store.allocate_id().unwrap();
        assert_eq!((a, b), (1, 2));
        let base = record(a, "base", Kind::Committed, None);
        let child = record(b, "child", Kind::Active, Some("base"));
        store.write(&base).unwrap();
        store.write(&child).unwrap();
        // The highest id is removed before the restart; it must not come back.
        store.delete(b).unwrap();
        drop(store);

        let (mut store, records) = MetaStore::open(layout).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records["base"], base);
        let c = store.allocate_id().unwrap();
        assert!(c > b, "id {c} was handed out before");
    }

    #[test]
    fn a_second_open_of_the_same_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let (_store, _) = MetaStore::open(layout.clone()).unwrap();
        let err = MetaStore::open(layout).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }

    #[test]
    fn snapshot_directories_without_records_push_the_next_id_up() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        fs::create_dir_all(layout.snapshot_dir(4000)).unwrap();
        let (mut store, _) = MetaStore::open(layout).unwrap();
        assert_eq!(store.allocate_id().unwrap(), 4001);
    }

    #[test]
    fn inconsistent_metadata_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let (mut store, _) = MetaStore::open(layout.clone()).unwrap();
        let id = store.allocate_id().unwrap();
        store.write(&record(id, "orphan", Kind::Active, Some("missing"))).unwrap();
        drop(store);
        let err = MetaStore::open(layout.clone()).unwrap_err();
        assert!(matches!(&err, Error::Corrupt(m) if m.contains("missing")), "{err}");

        fs::write(layout.metadata_dir().join("7.json"), b"{not json").unwrap();
        let err = MetaStore::open(layout).unwrap_err();
        assert!(matches!(&err, Error::Corrupt(m) if m.contains("7.json")), "{err}");
    }

    #[test]
    fn timestamps_keep_nanoseconds_and_survive_dates_before_the_epoch() {
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH,
        ] {
            assert_eq!(SystemTime::from(Stamp::from(t)), t);
        }
    }
}
