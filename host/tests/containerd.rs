//! `dpu-snapshotter` as the only snapshotter of a real containerd 1.6 (Debian's), configured as a proxy plugin:
//! a two-layer image built offline with umoci (a static busybox, files, a file deleted in the second layer so
//! the layer holds a whiteout) is imported and unpacked through Prepare/Commit; `ctr snapshots` ls, info,
//! label, usage, view, prepare, mounts and commit work on it and the mounts, mounted by the kernel, show the
//! right files; the snapshots survive a restart of the snapshotter; `ctr run` starts a container from it with
//! runc; removing the image leaves no snapshot, no directory and no mount behind. Needs root, containerd,
//! runc, umoci, skopeo and a static busybox (Debian's busybox-static).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dpu_host::api::pb::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

const IMAGE: &str = "dpu.test/img:1";
const SNAPSHOTTER: &str = "dpu";

fn skip_reason() -> Option<String> {
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        return Some("not root".into());
    }
    for tool in ["containerd", "ctr", "runc", "umoci", "skopeo", "mount", "umount"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed"));
        }
    }
    match which("busybox") {
        None => Some("busybox is not installed (Debian: busybox-static)".into()),
        Some(path) if !is_static_elf(&path) => {
            Some(format!("{} is dynamically linked (Debian: install busybox-static)", path.display()))
        }
        Some(_) => None,
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// A 64-bit little-endian ELF executable without a program interpreter (PT_INTERP) is statically linked.
fn is_static_elf(path: &Path) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut header = [0u8; 64];
    if file.read_exact(&mut header).is_err() || &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return false;
    }
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().unwrap());
    let phentsize = u64::from(u16::from_le_bytes([header[0x36], header[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([header[0x38], header[0x39]]));
    for i in 0..phnum {
        let mut kind = [0u8; 4];
        if file.seek(SeekFrom::Start(phoff + i * phentsize)).is_err() || file.read_exact(&mut kind).is_err() {
            return false;
        }
        if u32::from_le_bytes(kind) == 3 {
            return false;
        }
    }
    true
}

/// The snapshotter binary as a command. When cross-testing, `DPU_TEST_RUNNER` names the emulator that runs
/// target binaries (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`), as cargo's runner does for the test itself.
fn snapshotter_command() -> Command {
    let binary = env!("CARGO_BIN_EXE_dpu-snapshotter");
    match std::env::var("DPU_TEST_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut command = Command::new(words.next().unwrap_or_default());
            command.args(words).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon we started: stopped with SIGTERM (then SIGKILL) on drop; its log is printed if the test fails.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { name, child, log }
    }

    /// SIGTERM and wait; true when it exited successfully.
    fn stop(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the {} log ---", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Unmounts `target` on drop when it is still mounted (a failed assertion between mount and umount).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Whether anything is mounted at or below `path` (per /proc/self/mountinfo).
fn is_mounted_under(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).any(|point| Path::new(point).starts_with(path))
}

/// The snapshotter's own view, over its socket (bypassing containerd's metadata layer).
struct Backend {
    rt: tokio::runtime::Runtime,
    client: SnapshotsClient<Channel>,
}

impl Backend {
    fn connect(socket: &Path) -> Self {
        // A worker thread drives the connection between calls, so it answers the server's GOAWAY at a stop.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let socket = socket.to_path_buf();
        let channel = rt
            .block_on(Endpoint::from_static("http://localhost").connect_with_connector(tower::service_fn(
                move |_: Uri| {
                    let socket = socket.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
                },
            )))
            .unwrap();
        Self { rt, client: SnapshotsClient::new(channel) }
    }

    fn list(&mut self) -> Vec<pb::Info> {
        let request = pb::ListSnapshotsRequest { snapshotter: SNAPSHOTTER.into(), filters: vec![] };
        self.rt.block_on(async {
            let mut stream = self.client.list(request).await.unwrap().into_inner();
            let mut all = Vec::new();
            while let Some(batch) = stream.message().await.unwrap() {
                all.extend(batch.info);
            }
            all
        })
    }

    /// The backend snapshot containerd stores as `name` (its keys are `<namespace>/<id>/<name>`).
    fn find(&mut self, name: &str) -> pb::Info {
        let all = self.list();
        all.iter()
            .find(|i| plain(&i.name) == name)
            .cloned()
            .unwrap_or_else(|| panic!("no backend snapshot for {name}: {all:?}"))
    }

    fn usage(&mut self, key: &str) -> pb::UsageResponse {
        let request = pb::UsageRequest { snapshotter: SNAPSHOTTER.into(), key: key.into() };
        self.rt.block_on(self.client.usage(request)).unwrap().into_inner()
    }
}

/// containerd's name of a backend key: `default/12/sha256:…` → `sha256:…`.
fn plain(backend_key: &str) -> &str {
    backend_key.splitn(3, '/').nth(2).unwrap_or(backend_key)
}

/// Builds the test image with umoci and exports it as a docker archive: layer 1 holds busybox (with `sh` and
/// `cat` links), `etc/hello`, `data/gone`, `data/kept`; layer 2 deletes `data/gone` (a whiteout) and adds
/// `etc/second`.
fn build_image(dir: &Path) -> PathBuf {
    let layout = dir.join("oci");
    let image = format!("{}:t", layout.display());
    let bundle = dir.join("bundle");
    run(Command::new("umoci").arg("init").arg("--layout").arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    for sub in ["bin", "etc", "data"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy(which("busybox").unwrap(), rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/hello"), "hello\n").unwrap();
    std::fs::write(rootfs.join("data/gone"), "doomed\n").unwrap();
    std::fs::write(rootfs.join("data/kept"), "kept\n").unwrap();
    run(Command::new("umoci").args(["repack", "--refresh-bundle", "--image", &image]).arg(&bundle));
    std::fs::remove_file(rootfs.join("data/gone")).unwrap();
    std::fs::write(rootfs.join("etc/second"), "second\n").unwrap();
    run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
    run(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/sh"]));
    let archive = dir.join("image.tar");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", &format!("oci:{image}")])
        .arg(format!("docker-archive:{}:{IMAGE}", archive.display())));
    archive
}

struct Env {
    dir: PathBuf,
    containerd_socket: PathBuf,
    snap_socket: PathBuf,
    snap_root: PathBuf,
}

impl Env {
    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.containerd_socket);
        cmd
    }

    fn snapshots(&self, args: &[&str]) -> String {
        run(self.ctr().args(["snapshots", "--snapshotter", SNAPSHOTTER]).args(args))
    }

    fn start_snapshotter(&self, generation: u32) -> Daemon {
        let config = self.dir.join("snapshotter.toml");
        std::fs::write(&config, format!("socket = \"/nonexistent/overridden.sock\"\nroot = {:?}\n", self.snap_root))
            .unwrap();
        let daemon = Daemon::spawn(
            "dpu-snapshotter",
            snapshotter_command()
                .arg("--config")
                .arg(&config)
                .arg("--socket")
                .arg(&self.snap_socket)
                .env("RUST_LOG", "info,dpu_host=debug"),
            self.dir.join(format!("snapshotter-{generation}.log")),
        );
        let socket = self.snap_socket.clone();
        wait_for("the snapshotter's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        daemon
    }

    fn start_containerd(&self) -> Daemon {
        let config = self.dir.join("containerd.toml");
        let d = self.dir.display();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/containerd-root"
state = "{d}/containerd-state"
# The proxy plugin is the only snapshotter; CRI stays off to keep the daemon small.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.snapshotter.v1.native",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]

[grpc]
  address = "{containerd}"

[ttrpc]
  address = "{containerd}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[proxy_plugins.{SNAPSHOTTER}]
  type = "snapshot"
  address = "{snap}"
"#,
                containerd = self.containerd_socket.display(),
                snap = self.snap_socket.display(),
            ),
        )
        .unwrap();
        let daemon = Daemon::spawn(
            "containerd",
            Command::new("containerd").arg("--config").arg(&config),
            self.dir.join("containerd.log"),
        );
        wait_for("containerd", Duration::from_secs(30), || {
            self.ctr().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        });
        daemon
    }

    /// Mounts what `ctr snapshots mounts` prints for `key` at `target`.
    fn mount(&self, key: &str, target: &Path) -> MountGuard {
        std::fs::create_dir_all(target).unwrap();
        let commands = self.snapshots(&["mounts", target.to_str().unwrap(), key]);
        assert!(commands.starts_with("mount "), "unexpected mount commands: {commands}");
        run(Command::new("sh").arg("-c").arg(&commands));
        assert!(is_mounted_under(target), "{key} is not mounted at {}", target.display());
        MountGuard(target.to_path_buf())
    }
}

fn umount(guard: MountGuard) {
    run(Command::new("umount").arg(&guard.0));
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn containerd_uses_dpu_snapshotter_as_its_snapshotter() {
    if let Some(reason) = skip_reason() {
        eprintln!("\n*** SKIPPED containerd_uses_dpu_snapshotter_as_its_snapshotter: {reason} ***\n");
        return;
    }
    // Short paths: unix socket addresses are limited to 108 bytes.
    let tmp = tempfile::Builder::new().prefix("dpu-ctd").tempdir_in("/tmp").unwrap();
    let env = Env {
        dir: tmp.path().to_path_buf(),
        containerd_socket: tmp.path().join("containerd.sock"),
        snap_socket: tmp.path().join("run/snap.sock"),
        snap_root: tmp.path().join("snap-root"),
    };
    let archive = build_image(&env.dir);

    let mut snapshotter = env.start_snapshotter(1);
    let mut containerd = env.start_containerd();
    let mut backend = Backend::connect(&env.snap_socket);

    // Import unpacks both layers through Prepare (bind, then overlay mounts) and Commit.
    let out = run(env.ctr().args(["images", "import", "--snapshotter", SNAPSHOTTER]).arg(&archive));
    assert!(out.contains("unpacking"), "{out}");
    let snaps = backend.list();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(snaps.iter().all(|s| s.kind() == pb::Kind::Committed), "{snaps:?}");
    let base = snaps.iter().find(|s| s.parent.is_empty()).expect("a base layer").clone();
    let top = snaps.iter().find(|s| s.parent == base.name).expect("a layer on the base").clone();
    let (base_name, top_name) = (plain(&base.name).to_owned(), plain(&top.name).to_owned());

    let ls = env.snapshots(&["ls"]);
    let rows: Vec<Vec<&str>> = ls.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(rows.contains(&vec![top_name.as_str(), base_name.as_str(), "Committed"]), "{ls}");
    assert!(rows.contains(&vec![base_name.as_str(), "Committed"]), "{ls}");
    assert_eq!(rows.len(), 2, "{ls}");

    let info: serde_json::Value = serde_json::from_str(&env.snapshots(&["info", &top_name])).unwrap();
    assert_eq!(info["Kind"], "Committed");
    assert_eq!(info["Parent"], base_name.as_str());

    // Labels containerd passes down (its `containerd.io/snapshot/` prefix) reach the snapshotter.
    env.snapshots(&["label", &top_name, "containerd.io/snapshot/dpu.test=yes"]);
    assert_eq!(backend.find(&top_name).labels.get("containerd.io/snapshot/dpu.test").map(String::as_str), Some("yes"));
    let info: serde_json::Value = serde_json::from_str(&env.snapshots(&["info", &top_name])).unwrap();
    assert_eq!(info["Labels"]["containerd.io/snapshot/dpu.test"], "yes");

    // Usage measured at commit: layer 1 = root, bin, busybox, sh, cat, ls, etc, hello, data, gone, kept;
    // layer 2 = root, etc, second, data, the whiteout of gone.
    let base_usage = backend.usage(&base.name);
    let top_usage = backend.usage(&top.name);
    assert_eq!((base_usage.inodes, top_usage.inodes), (11, 5));
    assert!(base_usage.size as u64 >= std::fs::metadata(which("busybox").unwrap()).unwrap().len());
    let usage = env.snapshots(&["usage", &top_name]);
    let row: Vec<&str> = usage.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!((row[0], row.last().copied()), (top_name.as_str(), Some("5")), "{usage}");

    // A view of the top layer: an overlay of both layers, nearest first, read-only.
    let view: serde_json::Value =
        serde_json::from_str(&env.snapshots(&["view", "--mounts", "dpu-view", &top_name])).unwrap();
    env.snapshots(&["label", "dpu-view", "containerd.io/gc.root=test"]);
    assert_eq!(view[0]["Type"], "overlay", "{view}");
    let lowerdir = view[0]["Options"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.as_str().unwrap().strip_prefix("lowerdir="))
        .expect("lowerdir")
        .to_owned();
    let lowers: Vec<&str> = lowerdir.split(':').collect();
    assert_eq!(lowers.len(), 2, "{lowerdir}");
    assert!(lowers.iter().all(|l| Path::new(l).starts_with(&env.snap_root)), "{lowerdir}");
    // The deletion was unpacked as an overlay whiteout: a 0/0 character device in the top layer.
    let whiteout = std::fs::symlink_metadata(Path::new(lowers[0]).join("data/gone")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0, "{whiteout:?}");
    assert_eq!(read(Path::new(lowers[1]).join("data/gone")), "doomed\n");

    let view_mnt = env.dir.join("mnt-view");
    let guard = env.mount("dpu-view", &view_mnt);
    assert_eq!(read(view_mnt.join("etc/hello")), "hello\n");
    assert_eq!(read(view_mnt.join("etc/second")), "second\n");
    assert_eq!(read(view_mnt.join("data/kept")), "kept\n");
    assert!(!view_mnt.join("data/gone").exists(), "the whiteout must hide data/gone");
    assert!(view_mnt.join("bin/busybox").is_file());
    assert!(std::fs::write(view_mnt.join("new"), "x").is_err(), "a view must be read-only");
    umount(guard);

    // An active snapshot: writes land in its own layer; usage is measured live; commit makes it a parent.
    env.snapshots(&["prepare", "dpu-rw", &top_name]);
    env.snapshots(&["label", "dpu-rw", "containerd.io/gc.root=test"]);
    let rw_mnt = env.dir.join("mnt-rw");
    let guard = env.mount("dpu-rw", &rw_mnt);
    std::fs::write(rw_mnt.join("written"), "by the test\n").unwrap();
    assert_eq!(read(rw_mnt.join("etc/hello")), "hello\n");
    umount(guard);
    let rw = backend.find("dpu-rw");
    assert_eq!(rw.kind(), pb::Kind::Active);
    assert_eq!(backend.usage(&rw.name).inodes, 2);
    let usage = env.snapshots(&["usage", "dpu-rw"]);
    assert_eq!(usage.lines().nth(1).unwrap().split_whitespace().last(), Some("2"), "{usage}");
    env.snapshots(&["commit", "dpu-committed", "dpu-rw"]);
    let committed = backend.find("dpu-committed");
    assert_eq!((committed.kind(), plain(&committed.parent)), (pb::Kind::Committed, top_name.as_str()));
    assert!(backend.list().iter().all(|s| plain(&s.name) != "dpu-rw"));
    // containerd removes backend snapshots in its garbage collector, shortly after the metadata.
    env.snapshots(&["rm", "dpu-committed", "dpu-view"]);
    wait_for("the removed snapshots to leave the backend", Duration::from_secs(20), || backend.list().len() == 2);

    // A restart of the snapshotter keeps every snapshot; containerd reconnects.
    let before_restart = backend.list();
    drop(backend);
    assert!(snapshotter.stop(), "the snapshotter did not stop cleanly on SIGTERM");
    assert!(!env.snap_socket.exists(), "the socket should be removed at exit");
    snapshotter = env.start_snapshotter(2);
    backend = Backend::connect(&env.snap_socket);
    assert_eq!(backend.list(), before_restart);
    let mut ls = String::new();
    wait_for("containerd to reach the restarted snapshotter", Duration::from_secs(30), || {
        let out = env.ctr().args(["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]).output().unwrap();
        ls = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success() && ls.contains(&top_name)
    });

    // A container from the image, on an active snapshot of this snapshotter, run by runc.
    let out = run(env.ctr().args([
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE,
        "dpu-test-run",
        "/bin/sh",
        "-c",
        "cat /etc/hello /etc/second; ls /data; test ! -e /data/gone && echo whiteout-ok",
    ]));
    assert_eq!(out, "hello\nsecond\nkept\nwhiteout-ok\n");
    // `--rm` removed the container's snapshot (containerd's garbage collector calls Remove).
    wait_for("the container's snapshot to be removed", Duration::from_secs(20), || backend.list().len() == 2);

    // Removing the image removes its snapshots, their directories and records.
    run(env.ctr().args(["images", "rm", "--sync", IMAGE]));
    wait_for("the image's snapshots to be removed", Duration::from_secs(20), || backend.list().is_empty());
    let ls = env.snapshots(&["ls"]);
    assert_eq!(ls.lines().count(), 1, "only the header should be left: {ls}");
    assert_eq!(std::fs::read_dir(env.snap_root.join("snapshots")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(env.snap_root.join("metadata")).unwrap().count(), 0);
    assert!(!is_mounted_under(&env.dir), "something is still mounted under {}", env.dir.display());

    assert!(containerd.stop(), "containerd did not stop cleanly");
    drop(backend);
    assert!(snapshotter.stop(), "the snapshotter did not stop cleanly on SIGTERM");
    assert!(!env.snap_socket.exists());
}
