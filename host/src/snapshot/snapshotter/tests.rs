use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::snapshot::MAX_LABEL_BYTES;
use crate::snapshot::remote::{LayerFuture, NoRemoteLayers, RecordedLayer, RemoteError, RemoteLayer, SyncFuture};

fn open(root: &Path) -> Snapshotter {
    Snapshotter::open(root, Arc::new(NoRemoteLayers)).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn s(text: &str) -> String {
    text.to_owned()
}

fn fs_of(root: &Path, id: u64) -> String {
    root.join("snapshots").join(id.to_string()).join("fs").to_string_lossy().into_owned()
}

fn overlay(options: &[String]) -> Mount {
    let mut all = Vec::new();
    if overlay_has_index_option() {
        all.push(s("index=off"));
    }
    all.extend_from_slice(options);
    Mount { fs_type: s("overlay"), source: s("overlay"), options: all }
}

fn bind(source: &str, mode: &str) -> Mount {
    Mount { fs_type: s("bind"), source: s(source), options: vec![s(mode), s("rbind")] }
}

/// The `fs` directory a bind mount or an overlay's upper directory points at.
fn upper(mounts: &[Mount]) -> PathBuf {
    let m = &mounts[0];
    match m.fs_type.as_str() {
        "bind" => PathBuf::from(&m.source),
        _ => PathBuf::from(m.options.iter().find_map(|o| o.strip_prefix("upperdir=")).unwrap()),
    }
}

/// Prepares `key` on `parent`, writes `files` into its layer and commits it as `name`.
async fn layer(sn: &Snapshotter, name: &str, parent: Option<&str>, files: &[(&str, &str)]) {
    let key = format!("extract {name}");
    let mounts = sn.prepare(key.clone(), parent.map(s), Labels::new()).await.unwrap();
    let dir = upper(&mounts);
    for (path, content) in files {
        fs::write(dir.join(path), content).unwrap();
    }
    sn.commit(s(name), key, Labels::new()).await.unwrap();
}

fn assert_code(result: Result<impl std::fmt::Debug, Error>, want: &str, mentions: &str) {
    let err = result.expect_err("the call should fail");
    let code = match &err {
        Error::NotFound(_) => "not found",
        Error::AlreadyExists(_) => "already exists",
        Error::FailedPrecondition(_) => "failed precondition",
        Error::InvalidArgument(_) => "invalid argument",
        Error::Unavailable(_) => "unavailable",
        other => panic!("unexpected error {other:?}"),
    };
    assert_eq!(code, want, "{err}");
    assert!(err.to_string().contains(mentions), "{err:?} should mention {mentions:?}");
}

#[tokio::test]
async fn mounts_follow_the_overlayfs_snapshotter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sn = open(root);

    // Active without parent: a writable bind mount of its own layer.
    let mounts = sn.prepare(s("a"), None, Labels::new()).await.unwrap();
    assert_eq!(mounts, [bind(&fs_of(root, 1), "rw")]);
    assert!(root.join("snapshots/1/work").is_dir());
    assert_eq!(sn.mounts(s("a")).await.unwrap(), mounts);
    sn.commit(s("base"), s("a"), Labels::new()).await.unwrap();
    layer(&sn, "mid", Some("base"), &[]).await;

    // Active on a chain: overlay, lower dirs nearest first.
    let mounts = sn.prepare(s("c"), Some(s("mid")), Labels::new()).await.unwrap();
    assert_eq!(
        mounts,
        [overlay(&[
            format!("workdir={}", root.join("snapshots/3/work").display()),
            format!("upperdir={}", fs_of(root, 3)),
            format!("lowerdir={}:{}", fs_of(root, 2), fs_of(root, 1)),
        ])]
    );

    // Views: read-only bind of the single parent, overlay with lower dirs only above that, and a read-only
    // bind of its own empty layer without a parent.
    assert_eq!(sn.view(s("v1"), Some(s("base")), Labels::new()).await.unwrap(), [bind(&fs_of(root, 1), "ro")]);
    assert_eq!(
        sn.view(s("v2"), Some(s("mid")), Labels::new()).await.unwrap(),
        [overlay(&[format!("lowerdir={}:{}", fs_of(root, 2), fs_of(root, 1))])]
    );
    assert_eq!(sn.view(s("v3"), None, Labels::new()).await.unwrap(), [bind(&fs_of(root, 6), "ro")]);
    assert!(!root.join("snapshots/6/work").exists(), "views get no work directory");
    assert_eq!(sn.mounts(s("v2")).await.unwrap().len(), 1);
}

#[tokio::test]
async fn create_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(&sn, "base", None, &[]).await;
    sn.prepare(s("active"), Some(s("base")), Labels::new()).await.unwrap();

    assert_code(sn.prepare(s(""), None, Labels::new()).await, "invalid argument", "key");
    assert_code(sn.view(s(""), None, Labels::new()).await, "invalid argument", "key");
    assert_code(sn.prepare(s("active"), None, Labels::new()).await, "already exists", "\"active\"");
    // Keys and names share one namespace.
    assert_code(sn.view(s("base"), None, Labels::new()).await, "already exists", "\"base\"");
    assert_code(sn.prepare(s("x"), Some(s("nope")), Labels::new()).await, "not found", "\"nope\"");
    assert_code(sn.view(s("x"), Some(s("active")), Labels::new()).await, "invalid argument", "\"active\"");
    let long = labels(&[("k", &"v".repeat(MAX_LABEL_BYTES))]);
    assert_code(sn.prepare(s("x"), None, long).await, "invalid argument", "label");
    // Nothing of the failed calls stays behind.
    assert_eq!(sn.len().unwrap(), 2);
    assert_eq!(fs::read_dir(dir.path().join("snapshots")).unwrap().count(), 2);
}

#[tokio::test]
async fn commit_renames_an_active_snapshot_and_measures_it() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    let mounts = sn.prepare(s("k"), None, labels(&[("old", "1")])).await.unwrap();
    fs::write(upper(&mounts).join("file"), vec![1u8; 20_000]).unwrap();
    let active = sn.stat(s("k")).await.unwrap();
    assert_eq!(active.kind, Kind::Active);
    let live = sn.usage(s("k")).await.unwrap();
    assert_eq!(live.inodes, 2);
    assert!(live.size >= 20_000, "{live:?}");

    sn.commit(s("done"), s("k"), labels(&[("new", "2"), ("empty", "")])).await.unwrap();
    assert_code(sn.stat(s("k")).await, "not found", "\"k\"");
    let info = sn.stat(s("done")).await.unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.parent, None);
    // The commit's labels replace the active snapshot's; empty values are not labels.
    assert_eq!(info.labels, labels(&[("new", "2")]));
    assert!(info.created >= active.created);
    assert_eq!(sn.usage(s("done")).await.unwrap(), live);
    assert_code(sn.mounts(s("done")).await, "failed precondition", "\"done\"");

    sn.view(s("view"), Some(s("done")), Labels::new()).await.unwrap();
    sn.prepare(s("k2"), None, Labels::new()).await.unwrap();
    assert_code(sn.commit(s("done"), s("k2"), Labels::new()).await, "already exists", "\"done\"");
    assert_code(sn.commit(s("x"), s("missing"), Labels::new()).await, "not found", "\"missing\"");
    assert_code(sn.commit(s("x"), s("view"), Labels::new()).await, "failed precondition", "\"view\"");
    assert_code(sn.commit(s("x"), s("done"), Labels::new()).await, "failed precondition", "\"done\"");
    assert_code(sn.commit(s(""), s("k2"), Labels::new()).await, "invalid argument", "name");
    // A view's usage is its own empty layer's: nothing recorded.
    assert_eq!(sn.usage(s("view")).await.unwrap(), Usage::default());
    assert_code(sn.usage(s("missing")).await, "not found", "\"missing\"");
}

#[tokio::test]
async fn remove_refuses_parents_and_deletes_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sn = open(root);
    layer(&sn, "base", None, &[("f", "x")]).await;
    sn.prepare(s("child"), Some(s("base")), Labels::new()).await.unwrap();

    assert_code(sn.remove(s("base")).await, "failed precondition", "\"base\"");
    assert_code(sn.remove(s("missing")).await, "not found", "\"missing\"");
    sn.remove(s("child")).await.unwrap();
    assert!(!root.join("snapshots/2").exists());
    sn.remove(s("base")).await.unwrap();
    assert!(!root.join("snapshots/1").exists());
    assert!(sn.is_empty().unwrap());
    assert_eq!(fs::read_dir(root.join("metadata")).unwrap().count(), 0);
}

#[tokio::test]
async fn update_changes_labels_only() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    sn.prepare(s("k"), None, labels(&[("a", "1"), ("b", "2")])).await.unwrap();
    let before = sn.stat(s("k")).await.unwrap();

    let info = sn.update(s("k"), vec![LabelEdit::Set { key: s("c"), value: Some(s("3")) }]).await.unwrap();
    assert_eq!(info.labels, labels(&[("a", "1"), ("b", "2"), ("c", "3")]));
    assert!(info.updated >= before.updated);
    assert_eq!(info.created, before.created);
    assert_eq!((info.kind, info.parent.clone(), info.name.clone()), (before.kind, before.parent, before.name));

    let info = sn.update(s("k"), vec![LabelEdit::Set { key: s("a"), value: None }]).await.unwrap();
    assert_eq!(info.labels, labels(&[("b", "2"), ("c", "3")]));
    let info = sn.update(s("k"), vec![LabelEdit::Set { key: s("b"), value: Some(s("")) }]).await.unwrap();
    assert_eq!(info.labels, labels(&[("c", "3")]));
    let info = sn.update(s("k"), vec![LabelEdit::ReplaceAll(labels(&[("z", "26")]))]).await.unwrap();
    assert_eq!(info.labels, labels(&[("z", "26")]));
    assert_eq!(sn.stat(s("k")).await.unwrap(), info);

    let long = LabelEdit::Set { key: s("big"), value: Some("v".repeat(MAX_LABEL_BYTES)) };
    assert_code(sn.update(s("k"), vec![long]).await, "invalid argument", "label");
    assert_eq!(sn.stat(s("k")).await.unwrap().labels, labels(&[("z", "26")]));
    assert_code(sn.update(s("missing"), vec![]).await, "not found", "\"missing\"");
}

#[tokio::test]
async fn list_filters() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(&sn, "base", None, &[]).await;
    sn.update(s("base"), vec![LabelEdit::Set { key: s("containerd.io/gc.root"), value: Some(s("x")) }]).await.unwrap();
    sn.prepare(s("work"), Some(s("base")), Labels::new()).await.unwrap();
    sn.view(s("look"), Some(s("base")), labels(&[("who", "me")])).await.unwrap();

    let names = |infos: Vec<Info>| infos.into_iter().map(|i| i.name).collect::<Vec<_>>();
    assert_eq!(names(sn.list(Filter::all()).await.unwrap()), ["base", "look", "work"]);
    let filter = |f: &[&str]| Filter::parse_all(f).unwrap();
    assert_eq!(names(sn.list(filter(&["kind==active"])).await.unwrap()), ["work"]);
    assert_eq!(names(sn.list(filter(&["parent==base,labels.who"])).await.unwrap()), ["look"]);
    assert_eq!(
        names(sn.list(filter(&[r#"labels."containerd.io/gc.root""#, "name~=^w"])).await.unwrap()),
        ["base", "work"]
    );
}

#[tokio::test]
async fn a_reopened_root_keeps_every_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (infos, mounts, usage) = {
        let sn = open(root);
        layer(&sn, "base", None, &[("a", "hello")]).await;
        layer(&sn, "top", Some("base"), &[("b", "world")]).await;
        sn.prepare(s("rw"), Some(s("top")), labels(&[("l", "1")])).await.unwrap();
        sn.view(s("ro"), Some(s("top")), Labels::new()).await.unwrap();
        // The newest snapshot is removed: its id must not be handed out again.
        sn.prepare(s("gone"), None, Labels::new()).await.unwrap();
        sn.remove(s("gone")).await.unwrap();
        (sn.list(Filter::all()).await.unwrap(), sn.mounts(s("rw")).await.unwrap(), sn.usage(s("top")).await.unwrap())
    };
    let sn = open(root);
    assert_eq!(sn.list(Filter::all()).await.unwrap(), infos);
    assert_eq!(sn.mounts(s("rw")).await.unwrap(), mounts);
    assert_eq!(sn.usage(s("top")).await.unwrap(), usage);
    let fresh = sn.prepare(s("fresh"), None, Labels::new()).await.unwrap();
    let fresh_dir = upper(&fresh);
    let id: u64 = fresh_dir.parent().unwrap().file_name().unwrap().to_str().unwrap().parse().unwrap();
    assert!(id > 5, "id {id} was used before the restart");
    assert_eq!(fs::read_to_string(root.join("snapshots/1/fs/a")).unwrap(), "hello");
}

#[tokio::test]
async fn cleanup_removes_only_unreferenced_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sn = open(root);
    layer(&sn, "base", None, &[("keep", "1")]).await;
    // What a crash between creating directories and writing the record, or an interrupted write, leaves.
    fs::create_dir_all(root.join("snapshots/777/fs/deep")).unwrap();
    fs::write(root.join("snapshots/777/fs/deep/file"), "x").unwrap();
    fs::write(root.join("metadata/.9.json.tmp"), "{").unwrap();

    let report = sn.cleanup().await.unwrap();
    assert_eq!(report, CleanupReport { removed: 1, failed: 0 });
    assert!(!root.join("snapshots/777").exists());
    assert!(!root.join("metadata/.9.json.tmp").exists());
    assert_eq!(fs::read_to_string(root.join("snapshots/1/fs/keep")).unwrap(), "1");
    assert_eq!(sn.cleanup().await.unwrap(), CleanupReport::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unpacks_get_distinct_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let sn = open(dir.path());
    layer(&sn, "base", None, &[]).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let sn = sn.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("extract-{i}");
            let mounts = sn.prepare(key.clone(), Some(s("base")), Labels::new()).await.unwrap();
            fs::write(upper(&mounts).join("n"), i.to_string()).unwrap();
            sn.commit(format!("layer-{i}"), key, Labels::new()).await.unwrap();
            upper(&mounts)
        }));
    }
    let mut dirs = HashSet::new();
    for task in tasks {
        assert!(dirs.insert(task.await.unwrap()));
    }
    assert_eq!(sn.list(Filter::parse_all(&["kind==committed"]).unwrap()).await.unwrap().len(), 33);
}

/// A remote layer source for tests: serves `dir` for every layer (or declines, or fails) and counts calls.
#[derive(Debug)]
struct TestSource {
    answer: Result<Option<PathBuf>, String>,
    calls: AtomicUsize,
    seen: Mutex<Vec<LayerRequest>>,
    /// Each release: the removed snapshot and the names of the remote layers that remained.
    released: Mutex<Vec<(String, Vec<String>)>>,
    /// Each sync: the names handed over.
    synced: Mutex<Vec<Vec<String>>>,
}

impl TestSource {
    fn new(answer: Result<Option<PathBuf>, String>) -> Arc<Self> {
        Arc::new(Self {
            answer,
            calls: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            released: Mutex::new(Vec::new()),
            synced: Mutex::new(Vec::new()),
        })
    }
}

impl RemoteLayerSource for TestSource {
    fn resolve<'a>(&'a self, layer: &'a LayerRequest) -> LayerFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.seen.lock().unwrap().push(layer.clone());
            tokio::task::yield_now().await;
            let answer = self.answer.clone().map_err(RemoteError::new)?;
            Ok(answer.map(|dir| RemoteLayer { dir, labels: labels(&[("containerd.io/snapshot/test.source", "yes")]) }))
        })
    }

    fn release<'a>(&'a self, removed: &'a RecordedLayer, remaining: &'a [RecordedLayer]) -> SyncFuture<'a> {
        let names = remaining.iter().map(|r| r.name.clone()).collect();
        self.released.lock().unwrap().push((removed.name.clone(), names));
        Box::pin(std::future::ready(Ok(())))
    }

    fn sync<'a>(&'a self, recorded: &'a [RecordedLayer]) -> SyncFuture<'a> {
        self.synced.lock().unwrap().push(recorded.iter().map(|r| r.name.clone()).collect());
        Box::pin(std::future::ready(Err(RemoteError::new("backend away"))))
    }
}

#[tokio::test]
async fn the_source_hears_of_removed_remote_layers_and_gets_every_recorded_one_on_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let remote_dir = dir.path().join("remote-layer");
    fs::create_dir_all(&remote_dir).unwrap();
    let source = TestSource::new(Ok(Some(remote_dir.clone())));
    let sn = Snapshotter::open(dir.path().join("root"), source.clone()).unwrap();
    for (key, target, parent) in [("x1", "sha256:c1", None), ("x2", "sha256:c2", Some(s("sha256:c1")))] {
        let err = sn.prepare(s(key), parent, labels(&[(TARGET_LABEL, target)])).await;
        assert_code(err, "already exists", target);
    }
    layer(&sn, "sha256:local", Some("sha256:c2"), &[]).await;
    let recorded = sn.remote_layers().await.unwrap();
    assert_eq!(recorded.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["sha256:c1", "sha256:c2"]);
    assert!(
        recorded.iter().all(|r| r.dir == remote_dir && r.labels.contains_key("containerd.io/snapshot/test.source"))
    );

    // A failing sync does not fail containerd's Cleanup; it is logged.
    sn.cleanup().await.unwrap();
    assert_eq!(source.synced.lock().unwrap().clone(), [vec![s("sha256:c1"), s("sha256:c2")]]);

    sn.remove(s("sha256:local")).await.unwrap();
    assert!(source.released.lock().unwrap().is_empty(), "a local snapshot is not the source's business");
    sn.remove(s("sha256:c2")).await.unwrap();
    sn.remove(s("sha256:c1")).await.unwrap();
    assert_eq!(
        source.released.lock().unwrap().clone(),
        [(s("sha256:c2"), vec![s("sha256:c1")]), (s("sha256:c1"), vec![])]
    );
    assert_code(sn.sync_remote().await, "unavailable", "backend away");
}

#[tokio::test]
async fn a_remote_layer_becomes_a_committed_snapshot_and_prepare_says_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let remote_dir = dir.path().join("remote-layer");
    fs::create_dir_all(&remote_dir).unwrap();
    fs::write(remote_dir.join("from-remote"), "r").unwrap();
    let source = TestSource::new(Ok(Some(remote_dir.clone())));
    let sn = Snapshotter::open(&root, source.clone()).unwrap();
    layer(&sn, "sha256:base", None, &[]).await;

    let request =
        labels(&[(TARGET_LABEL, "sha256:chain2"), ("containerd.io/snapshot/cri.layer-digest", "sha256:blob2")]);
    let err = sn.prepare(s("extract-1 sha256:chain2"), Some(s("sha256:base")), request.clone()).await;
    assert_code(err, "already exists", "sha256:chain2");
    let seen = source.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [LayerRequest { target: s("sha256:chain2"), parent: Some(s("sha256:base")), labels: request.clone() }]
    );

    // The committed snapshot is there, named by the target, on the requested parent; the key is not.
    let info = sn.stat(s("sha256:chain2")).await.unwrap();
    assert_eq!((info.kind, info.parent.as_deref()), (Kind::Committed, Some("sha256:base")));
    let mut recorded = request.clone();
    recorded.insert(s("containerd.io/snapshot/test.source"), s("yes"));
    assert_eq!(info.labels, recorded);
    assert_code(sn.stat(s("extract-1 sha256:chain2")).await, "not found", "extract-1");
    assert_eq!(sn.usage(s("sha256:chain2")).await.unwrap(), Usage::default());

    // The next layer stacks on the remote directory.
    let mounts = sn.prepare(s("extract-2"), Some(s("sha256:chain2")), Labels::new()).await.unwrap();
    let lower = mounts[0].options.iter().find_map(|o| o.strip_prefix("lowerdir=")).unwrap();
    assert_eq!(lower, format!("{}:{}", remote_dir.display(), fs_of(&root, 1)));

    // A second Prepare of the same layer asks nobody: the target exists, so it is an ordinary Prepare that
    // containerd's commit will then find taken.
    let calls = source.calls.load(Ordering::SeqCst);
    sn.prepare(s("extract-3 sha256:chain2"), Some(s("sha256:base")), request.clone()).await.unwrap();
    assert_eq!(source.calls.load(Ordering::SeqCst), calls);
    // A taken key fails before the source is asked.
    assert_code(sn.prepare(s("extract-2"), None, request.clone()).await, "already exists", "extract-2");
    assert_eq!(source.calls.load(Ordering::SeqCst), calls);

    // The record survives a restart, and removing the snapshot leaves the remote directory alone.
    sn.remove(s("extract-2")).await.unwrap();
    sn.remove(s("extract-3 sha256:chain2")).await.unwrap();
    drop(sn);
    let sn = Snapshotter::open(&root, Arc::new(NoRemoteLayers)).unwrap();
    assert_eq!(sn.stat(s("sha256:chain2")).await.unwrap(), info);
    assert_eq!(sn.cleanup().await.unwrap(), CleanupReport::default());
    sn.remove(s("sha256:chain2")).await.unwrap();
    assert_eq!(fs::read_to_string(remote_dir.join("from-remote")).unwrap(), "r");
}

#[tokio::test]
async fn a_declining_or_failing_remote_source_falls_back_to_a_local_snapshot() {
    for answer in [Ok(None), Err(s("device offline")), Ok(Some(PathBuf::from("/nonexistent/layer")))] {
        let dir = tempfile::tempdir().unwrap();
        let source = TestSource::new(answer.clone());
        let sn = Snapshotter::open(dir.path(), source.clone()).unwrap();
        let mounts = sn.prepare(s("extract"), None, labels(&[(TARGET_LABEL, "sha256:l1")])).await.unwrap();
        assert_eq!(mounts[0].fs_type, "bind", "{answer:?}");
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        sn.commit(s("sha256:l1"), s("extract"), Labels::new()).await.unwrap();
        assert_eq!(sn.stat(s("sha256:l1")).await.unwrap().kind, Kind::Committed);
    }
}
