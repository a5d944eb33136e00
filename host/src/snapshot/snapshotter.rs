//! [`Snapshotter`]: the operations containerd calls, with the semantics of containerd's overlayfs snapshotter.
//!
//! One mutex guards the snapshot table and its metadata store; each operation takes it on tokio's blocking
//! pool (record writes fsync), so many requests run concurrently without stalling the runtime. Walks of a
//! layer (usage at commit and for active snapshots) and removal of directories run outside the lock.
//!
//! Mounts, as containerd's overlayfs snapshotter gives them:
//!
//! | snapshot | mounts |
//! |---|---|
//! | active, no parent | `bind` of its `fs`, `rw,rbind` |
//! | active with parents | `overlay`: `workdir=`, `upperdir=` its own, `lowerdir=` parents nearest first |
//! | view, no parent | `bind` of its own (empty) `fs`, `ro,rbind` |
//! | view, one parent | `bind` of the parent's `fs`, `ro,rbind` |
//! | view, several | `overlay` with `lowerdir=` only (read-only) |
//!
//! Overlay mounts start with `index=off` when the kernel's overlay module has the `index` parameter, so that
//! layers shared by many overlays never trip the inode index checks.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::remote::{LayerRequest, RecordedLayer, RemoteLayer, RemoteLayerSource};
use super::store::{Layout, MetaStore, Record, sync_dir};
use super::usage::disk_usage;
use super::{Error, Filter, Info, Kind, LabelEdit, Labels, Mount, TARGET_LABEL, Usage, validate_labels, without_empty};

/// Where the kernel's overlay module lists its `index` parameter (present from Linux 4.13).
const OVERLAY_INDEX_PARAMETER: &str = "/sys/module/overlay/parameters/index";

/// The snapshotter of one root directory.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    inner: Arc<Inner>,
    remote: Arc<dyn RemoteLayerSource>,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    store: MetaStore,
    /// Every snapshot by key (active, view) or name (committed): one namespace.
    snapshots: BTreeMap<String, Record>,
}

/// What `Cleanup` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Snapshot directories no record referred to.
    pub removed: usize,
    /// Directories that could not be removed (logged); a later cleanup tries again.
    pub failed: usize,
}

impl Snapshotter {
    /// Opens `root` (creating it when missing), loads every snapshot recorded there and takes the root's lock.
    /// Blocking.
    pub fn open(root: impl Into<PathBuf>, remote: Arc<dyn RemoteLayerSource>) -> Result<Self, Error> {
        let root = root.into();
        check_mount_path("the root directory", &root)?;
        let (store, snapshots) = MetaStore::open(Layout::new(root))?;
        let layout = store.layout().clone();
        Ok(Self { inner: Arc::new(Inner { layout, state: Mutex::new(State { store, snapshots }) }), remote })
    }

    pub fn root(&self) -> &Path {
        self.inner.layout.root()
    }

    /// How many snapshots are recorded.
    pub fn len(&self) -> Result<usize, Error> {
        Ok(self.inner.lock()?.snapshots.len())
    }

    pub fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len()? == 0)
    }

    /// Runs `f` on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Internal(format!("snapshot task failed: {e}")))?
    }

    /// Creates the active snapshot `key` on `parent` and returns its mounts.
    ///
    /// When `labels` name a target layer ([`TARGET_LABEL`]) that is not recorded yet, the remote layer source
    /// is asked first; if it serves the layer, the committed snapshot `target` is recorded and the answer is
    /// [`Error::AlreadyExists`], which tells containerd the layer is in place.
    pub async fn prepare(&self, key: String, parent: Option<String>, labels: Labels) -> Result<Vec<Mount>, Error> {
        check_key("key", &key)?;
        let labels = checked_labels(labels)?;
        if let Some(target) = labels.get(TARGET_LABEL).filter(|t| !t.is_empty()).cloned()
            && self.remote_layer(&key, &target, parent.as_ref(), &labels).await?
        {
            return Err(Error::AlreadyExists(format!(
                "target snapshot {target:?} already exists: the layer is served by the remote layer source"
            )));
        }
        self.run(move |inner| inner.create(Kind::Active, key, parent, labels)).await
    }

    /// Creates the read-only view `key` of `parent` and returns its mounts.
    pub async fn view(&self, key: String, parent: Option<String>, labels: Labels) -> Result<Vec<Mount>, Error> {
        check_key("key", &key)?;
        let labels = checked_labels(labels)?;
        self.run(move |inner| inner.create(Kind::View, key, parent, labels)).await
    }

    /// The mounts of an active snapshot or a view.
    pub async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.run(move |inner| {
            let state = inner.lock()?;
            let record = state.get(&key)?;
            if record.info.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed; only active snapshots and views have mounts"
                )));
            }
            state.mounts(&inner.layout, record)
        })
        .await
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` with `labels` (replacing its own),
    /// measuring its usage.
    pub async fn commit(&self, name: String, key: String, labels: Labels) -> Result<(), Error> {
        check_key("name", &name)?;
        check_key("key", &key)?;
        let labels = checked_labels(labels)?;
        self.run(move |inner| inner.commit(name, key, labels)).await
    }

    /// Removes a snapshot without children and its directory; for a remote layer, the source is told.
    pub async fn remove(&self, key: String) -> Result<(), Error> {
        let released = self.run(move |inner| inner.remove(&key)).await?;
        if let Some((removed, remaining)) = released
            && let Err(e) = self.remote.release(&removed, &remaining).await
        {
            // The snapshot is gone either way; the next Cleanup lets go of what this left behind.
            tracing::warn!(snapshot = %removed.name, error = %e, "releasing a remote layer failed");
        }
        Ok(())
    }

    /// Every remote layer recorded.
    pub async fn remote_layers(&self) -> Result<Vec<RecordedLayer>, Error> {
        self.run(|inner| Ok(inner.lock()?.remote_layers())).await
    }

    /// Hands every recorded remote layer to the source (see [`RemoteLayerSource::sync`]): at start, and on
    /// `Cleanup`.
    pub async fn sync_remote(&self) -> Result<(), Error> {
        let recorded = self.remote_layers().await?;
        self.remote.sync(&recorded).await.map_err(|e| Error::Unavailable(format!("remote layers: {e}")))
    }

    pub async fn stat(&self, key: String) -> Result<Info, Error> {
        self.run(move |inner| Ok(inner.lock()?.get(&key)?.info.clone())).await
    }

    /// Changes the labels of `key`; nothing else of a snapshot can change.
    pub async fn update(&self, key: String, edits: Vec<LabelEdit>) -> Result<Info, Error> {
        self.run(move |inner| inner.update(&key, edits)).await
    }

    /// Every snapshot `filter` matches, ordered by name.
    pub async fn list(&self, filter: Filter) -> Result<Vec<Info>, Error> {
        self.run(move |inner| {
            let state = inner.lock()?;
            Ok(state.snapshots.values().filter(|r| filter.matches(&r.info)).map(|r| r.info.clone()).collect())
        })
        .await
    }

    /// Space the snapshot's own layer takes: measured now for an active snapshot, as measured at commit for a
    /// committed one, nothing for a view (its layer stays empty) or a remote layer (not on local disk).
    pub async fn usage(&self, key: String) -> Result<Usage, Error> {
        self.run(move |inner| {
            let fs_dir = {
                let state = inner.lock()?;
                let record = state.get(&key)?;
                if record.info.kind != Kind::Active {
                    return Ok(record.usage);
                }
                inner.layout.fs_dir(record.id)
            };
            disk_usage(&fs_dir).map_err(|e| Error::io(format!("measuring snapshot {key:?}"), e))
        })
        .await
    }

    /// Removes what a crash or a failed removal left behind: snapshot directories no record refers to and
    /// temporary files of interrupted metadata writes.
    pub async fn cleanup(&self) -> Result<CleanupReport, Error> {
        let report = self.run(|inner| inner.cleanup()).await?;
        if let Err(e) = self.sync_remote().await {
            tracing::warn!(error = %e, "remote layers not in sync");
        }
        Ok(report)
    }

    /// Asks the remote layer source for the layer `target`; true when the committed snapshot `target` now
    /// exists because of it.
    async fn remote_layer(
        &self,
        key: &str,
        target: &str,
        parent: Option<&String>,
        labels: &Labels,
    ) -> Result<bool, Error> {
        // An ordinary Prepare's errors come first: a taken key, a missing or uncommitted parent.
        let ask = {
            let (key, target, parent) = (key.to_owned(), target.to_owned(), parent.cloned());
            self.run(move |inner| {
                let state = inner.lock()?;
                state.check_new_key(&key)?;
                state.parent(parent.as_deref())?;
                Ok(!state.snapshots.contains_key(&target))
            })
            .await?
        };
        if !ask {
            return Ok(false);
        }
        let layer = LayerRequest { target: target.to_owned(), parent: parent.cloned(), labels: labels.clone() };
        let remote = match self.remote.resolve(&layer).await {
            Ok(Some(remote)) => remote,
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::warn!(target = %layer.target, error = %e, "remote layer source failed; unpacking locally");
                return Ok(false);
            }
        };
        let target = layer.target.clone();
        match self.run(move |inner| inner.create_remote(layer, remote)).await {
            Ok(()) => Ok(true),
            // Another Prepare of the same layer recorded it first.
            Err(Error::AlreadyExists(_)) => Ok(true),
            Err(e) => {
                tracing::warn!(target = %target, error = %e, "cannot use the remote layer; unpacking locally");
                Ok(false)
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, Error> {
        self.state.lock().map_err(|_| Error::Internal("the snapshot table lock is poisoned".into()))
    }

    fn create(&self, kind: Kind, key: String, parent: Option<String>, labels: Labels) -> Result<Vec<Mount>, Error> {
        let mut state = self.lock()?;
        state.check_new_key(&key)?;
        let parent_fs = state.parent(parent.as_deref())?.map(|p| state.fs_path(&self.layout, p));
        let id = state.store.allocate_id()?;
        let dir = self.layout.snapshot_dir(id);
        let now = SystemTime::now();
        let record = Record {
            id,
            info: Info { name: key.clone(), parent, kind, created: now, updated: now, labels },
            usage: Usage::default(),
            remote_dir: None,
        };
        let written = self.make_dirs(id, kind, parent_fs.as_deref()).and_then(|()| state.store.write(&record));
        if let Err(e) = written {
            if let Err(cleanup) = remove_tree(&dir) {
                tracing::warn!(path = %dir.display(), error = %cleanup, "removing a half-created snapshot");
            }
            return Err(e);
        }
        let mounts = state.mounts(&self.layout, &record)?;
        tracing::debug!(key = %key, id, kind = kind.as_str(), "snapshot created");
        state.snapshots.insert(key, record);
        Ok(mounts)
    }

    /// `snapshots/<id>/fs` (owned like the parent's root directory, as overlayfs copies up nothing for it) and,
    /// for an active snapshot, `work`; durable before the record that refers to them.
    fn make_dirs(&self, id: u64, kind: Kind, parent_fs: Option<&Path>) -> Result<(), Error> {
        let dir = self.layout.snapshot_dir(id);
        let fs_dir = self.layout.fs_dir(id);
        let creating = |what: &Path| {
            let what = what.display().to_string();
            move |e| Error::io(format!("creating {what}"), e)
        };
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(creating(&dir))?;
        fs::DirBuilder::new().mode(0o755).create(&fs_dir).map_err(creating(&fs_dir))?;
        if let Some(parent_fs) = parent_fs {
            let owner =
                fs::metadata(parent_fs).map_err(|e| Error::io(format!("reading {}", parent_fs.display()), e))?;
            std::os::unix::fs::lchown(&fs_dir, Some(owner.uid()), Some(owner.gid()))
                .map_err(|e| Error::io(format!("changing the owner of {}", fs_dir.display()), e))?;
        }
        if kind == Kind::Active {
            let work = self.layout.work_dir(id);
            fs::DirBuilder::new().mode(0o711).create(&work).map_err(creating(&work))?;
        }
        sync_dir(&dir).map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
        let parent = self.layout.snapshots_dir();
        sync_dir(&parent).map_err(|e| Error::io(format!("syncing {}", parent.display()), e))
    }

    fn create_remote(&self, layer: LayerRequest, remote: RemoteLayer) -> Result<(), Error> {
        let RemoteLayer { dir, labels: source_labels } = remote;
        check_mount_path("a remote layer directory", &dir)?;
        let meta = fs::metadata(&dir).map_err(|e| Error::io(format!("remote layer {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!("remote layer {} is not a directory", dir.display())));
        }
        let dir = path_string(&dir);
        let mut labels = layer.labels;
        labels.extend(source_labels);
        let labels = checked_labels(labels)?;
        let mut state = self.lock()?;
        if state.snapshots.contains_key(&layer.target) {
            return Err(Error::AlreadyExists(format!("snapshot {:?} already exists", layer.target)));
        }
        state.parent(layer.parent.as_deref())?;
        let id = state.store.allocate_id()?;
        let now = SystemTime::now();
        let record = Record {
            id,
            info: Info {
                name: layer.target.clone(),
                parent: layer.parent,
                kind: Kind::Committed,
                created: now,
                updated: now,
                labels,
            },
            usage: Usage::default(),
            remote_dir: Some(dir.clone()),
        };
        state.store.write(&record)?;
        tracing::info!(target = %layer.target, id, dir = %dir, "layer served by the remote layer source");
        state.snapshots.insert(layer.target, record);
        Ok(())
    }

    fn commit(&self, name: String, key: String, labels: Labels) -> Result<(), Error> {
        let check = |state: &State| -> Result<u64, Error> {
            if state.snapshots.contains_key(&name) {
                return Err(Error::AlreadyExists(format!("snapshot {name:?} already exists")));
            }
            let record = state.get(&key)?;
            if record.info.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is {}; only active snapshots can be committed",
                    record.info.kind.as_str()
                )));
            }
            Ok(record.id)
        };
        let id = check(&*self.lock()?)?;
        let fs_dir = self.layout.fs_dir(id);
        let usage = match disk_usage(&fs_dir) {
            Ok(usage) => usage,
            Err(e) => {
                // A concurrent Remove or Commit of the key explains a vanished layer better than the walk.
                check(&*self.lock()?)?;
                return Err(Error::io(format!("measuring snapshot {key:?}"), e));
            }
        };

        let mut state = self.lock()?;
        // The table may have changed while the layer was measured.
        if check(&state)? != id {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} was replaced during the commit")));
        }
        let mut record = state.get(&key)?.clone();
        let now = SystemTime::now();
        record.info.name = name.clone();
        record.info.kind = Kind::Committed;
        record.info.created = now;
        record.info.updated = now;
        record.info.labels = labels;
        record.usage = usage;
        state.store.write(&record)?;
        state.snapshots.remove(&key);
        tracing::debug!(key = %key, name = %name, id, size = usage.size, inodes = usage.inodes, "snapshot committed");
        state.snapshots.insert(name, record);
        Ok(())
    }

    /// Deletes the record; for a remote layer, returns it and the remote layers that remain.
    fn remove(&self, key: &str) -> Result<Option<(RecordedLayer, Vec<RecordedLayer>)>, Error> {
        let (dir, released) = {
            let mut state = self.lock()?;
            let record = state.get(key)?;
            let children = state.snapshots.values().filter(|r| r.info.parent.as_deref() == Some(key)).count();
            if children > 0 {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has {children} child snapshot(s); remove them first"
                )));
            }
            let id = record.id;
            state.store.delete(id)?;
            let record = state.snapshots.remove(key).expect("the record was just read");
            tracing::debug!(key = %key, id, "snapshot removed");
            match RecordedLayer::of(&record) {
                Some(removed) => (None, Some((removed, state.remote_layers()))),
                None => (Some(self.layout.snapshot_dir(id)), None),
            }
        };
        // The record is gone, so the directory is garbage whatever happens here; Cleanup retries failures.
        if let Some(dir) = dir
            && let Err(e) = remove_tree(&dir)
        {
            tracing::warn!(key = %key, path = %dir.display(), error = %e, "removing a snapshot directory failed");
        }
        Ok(released)
    }

    fn update(&self, key: &str, edits: Vec<LabelEdit>) -> Result<Info, Error> {
        let mut state = self.lock()?;
        let mut record = state.get(key)?.clone();
        for edit in edits {
            match edit {
                LabelEdit::ReplaceAll(labels) => record.info.labels = labels,
                LabelEdit::Set { key, value: Some(value) } => {
                    record.info.labels.insert(key, value);
                }
                LabelEdit::Set { key, value: None } => {
                    record.info.labels.remove(&key);
                }
            }
        }
        record.info.labels = checked_labels(std::mem::take(&mut record.info.labels))?;
        record.info.updated = SystemTime::now();
        state.store.write(&record)?;
        let info = record.info.clone();
        state.snapshots.insert(key.to_owned(), record);
        Ok(info)
    }

    fn cleanup(&self) -> Result<CleanupReport, Error> {
        let orphans = {
            let state = self.lock()?;
            let known: HashSet<String> =
                state.snapshots.values().filter(|r| r.remote_dir.is_none()).map(|r| r.id.to_string()).collect();
            let snapshots_dir = self.layout.snapshots_dir();
            let entries = fs::read_dir(&snapshots_dir)
                .map_err(|e| Error::io(format!("reading {}", snapshots_dir.display()), e))?;
            let mut orphans = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(format!("reading {}", snapshots_dir.display()), e))?;
                if !entry.file_name().to_str().is_some_and(|name| known.contains(name)) {
                    orphans.push(entry.path());
                }
            }
            // Temporary files are only written under the lock, so none of these is in use.
            for path in state.store.stray_temp_files()? {
                match fs::remove_file(&path) {
                    Ok(()) => tracing::info!(path = %path.display(), "removed a stray temporary file"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
                }
            }
            orphans
        };
        // Ids are never reused, so no new snapshot can take an orphan's directory while it is removed.
        let mut report = CleanupReport::default();
        for dir in orphans {
            match remove_tree(&dir) {
                Ok(()) => {
                    tracing::info!(path = %dir.display(), "removed an unreferenced snapshot directory");
                    report.removed += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "removing an unreferenced snapshot directory");
                    report.failed += 1;
                }
            }
        }
        Ok(report)
    }
}

impl RecordedLayer {
    fn of(record: &Record) -> Option<Self> {
        let dir = record.remote_dir.as_ref()?;
        Some(Self { name: record.info.name.clone(), dir: PathBuf::from(dir), labels: record.info.labels.clone() })
    }
}

impl State {
    fn remote_layers(&self) -> Vec<RecordedLayer> {
        self.snapshots.values().filter_map(RecordedLayer::of).collect()
    }

    fn get(&self, key: &str) -> Result<&Record, Error> {
        self.snapshots.get(key).ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))
    }

    fn check_new_key(&self, key: &str) -> Result<(), Error> {
        if self.snapshots.contains_key(key) {
            return Err(Error::AlreadyExists(format!("snapshot {key:?} already exists")));
        }
        Ok(())
    }

    /// The parent a new snapshot may sit on: it must exist and be committed.
    fn parent(&self, parent: Option<&str>) -> Result<Option<&Record>, Error> {
        let Some(parent) = parent else {
            return Ok(None);
        };
        let record = self
            .snapshots
            .get(parent)
            .ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?} does not exist")))?;
        if record.info.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent snapshot {parent:?} is {}, not committed",
                record.info.kind.as_str()
            )));
        }
        Ok(Some(record))
    }

    /// The directory holding a snapshot's own layer.
    fn fs_path(&self, layout: &Layout, record: &Record) -> PathBuf {
        match &record.remote_dir {
            Some(dir) => PathBuf::from(dir),
            None => layout.fs_dir(record.id),
        }
    }

    /// The layers below `record`, nearest first.
    fn lower_dirs(&self, layout: &Layout, record: &Record) -> Result<Vec<String>, Error> {
        let mut dirs = Vec::new();
        let mut next = record.info.parent.as_deref();
        while let Some(name) = next {
            let parent = self.snapshots.get(name).ok_or_else(|| {
                Error::Corrupt(format!("the parent {name:?} of a snapshot below {:?} is missing", record.info.name))
            })?;
            dirs.push(path_string(&self.fs_path(layout, parent)));
            next = parent.info.parent.as_deref();
        }
        Ok(dirs)
    }

    fn mounts(&self, layout: &Layout, record: &Record) -> Result<Vec<Mount>, Error> {
        let own = path_string(&layout.fs_dir(record.id));
        let lowers = self.lower_dirs(layout, record)?;
        let bind = |source: String, mode: &str| Mount {
            fs_type: "bind".into(),
            source,
            options: vec![mode.to_owned(), "rbind".to_owned()],
        };
        let mut overlay_options = Vec::new();
        if overlay_has_index_option() {
            overlay_options.push("index=off".to_owned());
        }
        let mount = match (record.info.kind, lowers.as_slice()) {
            (Kind::Active, []) => bind(own, "rw"),
            (Kind::Active, lowers) => {
                overlay_options.push(format!("workdir={}", path_string(&layout.work_dir(record.id))));
                overlay_options.push(format!("upperdir={own}"));
                overlay_options.push(format!("lowerdir={}", lowers.join(":")));
                Mount { fs_type: "overlay".into(), source: "overlay".into(), options: overlay_options }
            }
            (Kind::View, []) => bind(own, "ro"),
            (Kind::View, [only]) => bind(only.clone(), "ro"),
            (Kind::View, lowers) => {
                overlay_options.push(format!("lowerdir={}", lowers.join(":")));
                Mount { fs_type: "overlay".into(), source: "overlay".into(), options: overlay_options }
            }
            (Kind::Committed, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {:?} is committed and has no mounts",
                    record.info.name
                )));
            }
        };
        Ok(vec![mount])
    }
}

/// Whether the running kernel's overlayfs takes `index=`; the parameter appears once the module is loaded.
pub fn overlay_has_index_option() -> bool {
    Path::new(OVERLAY_INDEX_PARAMETER).exists()
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn check_key(what: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("the snapshot {what} must not be empty")));
    }
    Ok(())
}

fn checked_labels(labels: Labels) -> Result<Labels, Error> {
    let labels = without_empty(labels);
    validate_labels(&labels)?;
    Ok(labels)
}

/// Paths that end up in overlay mount options must be absolute UTF-8 without the option separators.
fn check_mount_path(what: &str, path: &Path) -> Result<(), Error> {
    let Some(text) = path.to_str() else {
        return Err(Error::InvalidArgument(format!("{what} {} is not UTF-8", path.display())));
    };
    if !path.is_absolute() {
        return Err(Error::InvalidArgument(format!("{what} {text:?} is not an absolute path")));
    }
    if let Some(c) = text.chars().find(|c| matches!(c, ',' | ':' | '\\')) {
        return Err(Error::InvalidArgument(format!(
            "{what} {text:?} contains {c:?}, which overlay mounts cannot take"
        )));
    }
    Ok(())
}

/// Removes a directory tree; a tree that is already gone counts as removed.
fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
