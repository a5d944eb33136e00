//! The host's NVMe/TCP initiator and block devices, as the kernel shows them in sysfs: is the DPU's subsystem
//! connected, which block device is the namespace with a given UUID, and mounting a layer from it.
//!
//! Connecting uses nvme-cli (`nvme connect`), which writes the fabrics options to `/dev/nvme-fabrics` as the
//! distributions' own units do, with `ctrl_loss_tmo` unlimited: after a restart of the DPU's agent the kernel
//! reconnects on its own and the namespaces come back on the same devices.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Where the fabrics connection lives: the DPU's NVMe/TCP listener as this host reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub nqn: String,
    pub address: String,
    pub port: u16,
    /// This host's NQN; `None` lets nvme-cli use `/etc/nvme/hostnqn`.
    pub host_nqn: Option<String>,
}

/// The sysfs tree the kernel's NVMe driver publishes (a parameter so tests can give their own).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new("/sys")
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The controllers (`nvme0`, …) connected to `nqn` over TCP and not being deleted.
    pub fn controllers(&self, nqn: &str) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        for name in entries(&self.root.join("class/nvme"))? {
            let dir = self.root.join("class/nvme").join(&name);
            let attr = |a: &str| read_attr(&dir.join(a));
            if attr("subsysnqn").as_deref() == Some(nqn)
                && attr("transport").as_deref() == Some("tcp")
                && attr("state").as_deref() != Some("deleting")
            {
                found.push(name);
            }
        }
        found.sort();
        Ok(found)
    }

    /// The block device (`nvme0n1`) whose namespace UUID is `uuid` (RFC 4122 text), from its `uuid` attribute
    /// or, for a namespace that reports only an NGUID, from `nguid` (the same 16 bytes).
    pub fn namespace_by_uuid(&self, uuid: &str) -> io::Result<Option<String>> {
        let want = uuid_hex(uuid);
        for name in entries(&self.root.join("block"))? {
            // nvme<subsys>n<ns> is the disk; nvme<subsys>c<ctrl>n<ns> are its hidden paths (native multipath).
            if name.strip_prefix("nvme").is_none_or(|rest| rest.contains('c')) {
                continue;
            }
            let dir = self.root.join("block").join(&name);
            let matches =
                ["uuid", "nguid"].iter().any(|a| read_attr(&dir.join(a)).is_some_and(|v| uuid_hex(&v) == want));
            if matches {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Sets the block device's readahead (KiB). Small readahead suits lazily fetched layers: every page read
    /// ahead that the container never touches is a fetch from the registry.
    pub fn set_readahead(&self, device: &str, kib: u32) -> io::Result<()> {
        fs::write(self.root.join("block").join(device).join("queue/read_ahead_kb"), kib.to_string())
    }
}

/// Connects the kernel's initiator to `target` with nvme-cli.
pub async fn connect(target: &Target, timeout: Duration) -> Result<(), String> {
    let mut command = tokio::process::Command::new("nvme");
    command
        .args(["connect", "--transport=tcp"])
        .arg(format!("--traddr={}", target.address))
        .arg(format!("--trsvcid={}", target.port))
        .arg(format!("--nqn={}", target.nqn))
        .args(["--ctrl-loss-tmo=-1", "--reconnect-delay=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(host_nqn) = &target.host_nqn {
        command.arg(format!("--hostnqn={host_nqn}"));
    }
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Err("nvme-cli is not installed (no `nvme` in PATH)".into());
        }
        Ok(Err(e)) => return Err(format!("running nvme connect: {e}")),
        Err(_) => return Err(format!("nvme connect did not finish within {} s", timeout.as_secs())),
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "nvme connect to {}:{} ({}) failed ({}): {}",
        target.address,
        target.port,
        target.nqn,
        output.status,
        stderr.trim()
    ))
}

/// Whether `dir` is a mount point (its device differs from its parent's).
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let parent = dir.parent().unwrap_or(dir);
    Ok(fs::metadata(dir)?.dev() != fs::metadata(parent)?.dev())
}

/// Mounts the EROFS on `/dev/<device>` read-only at `dir` (created when missing), unless something is mounted
/// there already.
pub fn mount_layer(device: &str, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    if is_mount_point(dir)? {
        return Ok(());
    }
    let source = Path::new("/dev").join(device);
    nix::mount::mount(Some(&source), dir, Some("erofs"), nix::mount::MsFlags::MS_RDONLY, None::<&str>)
        .map_err(|e| io::Error::other(format!("mounting {} (erofs) on {}: {e}", source.display(), dir.display())))
}

/// Detaches the mount at `dir` (lazily: a user still holding a file keeps it until done) and removes the
/// empty directory. Nothing mounted is fine.
pub fn unmount_layer(dir: &Path) -> io::Result<()> {
    match is_mount_point(dir) {
        Ok(true) => nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| io::Error::other(format!("unmounting {}: {e}", dir.display())))?,
        Ok(false) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn entries(dir: &Path) -> io::Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn read_attr(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// Lowercase hex digits of a UUID or NGUID, whatever its punctuation.
fn uuid_hex(text: &str) -> String {
    text.chars().filter(char::is_ascii_hexdigit).map(|c| c.to_ascii_lowercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, value: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("{value}\n")).unwrap();
    }

    #[test]
    fn controllers_of_a_subsystem() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (ctrl, nqn, transport, state) in [
            ("nvme0", "nqn.a", "pcie", "live"),
            ("nvme1", "nqn.dpu", "tcp", "live"),
            ("nvme2", "nqn.dpu", "tcp", "deleting"),
            ("nvme3", "nqn.dpu", "tcp", "connecting"),
        ] {
            write(root, &format!("class/nvme/{ctrl}/subsysnqn"), nqn);
            write(root, &format!("class/nvme/{ctrl}/transport"), transport);
            write(root, &format!("class/nvme/{ctrl}/state"), state);
        }
        let sysfs = Sysfs::new(root);
        assert_eq!(sysfs.controllers("nqn.dpu").unwrap(), ["nvme1", "nvme3"]);
        assert!(sysfs.controllers("nqn.other").unwrap().is_empty());
        assert!(Sysfs::new(root.join("absent")).controllers("nqn.dpu").unwrap().is_empty());
    }

    #[test]
    fn namespaces_by_uuid_or_nguid() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "block/nvme0c0n1/uuid", "0f3c5d9a-1b2c-4d3e-8f40-112233445566");
        write(root, "block/nvme0n1/uuid", "0f3c5d9a-1b2c-4d3e-8f40-112233445566");
        write(root, "block/nvme0n2/uuid", "00000000-0000-0000-0000-000000000000");
        write(root, "block/nvme0n2/nguid", "aabbccdd-eeff-5011-9233-445566778899");
        write(root, "block/sda/uuid", "11111111-2222-4333-8444-555555555555");
        let sysfs = Sysfs::new(root);
        assert_eq!(
            sysfs.namespace_by_uuid("0F3C5D9A-1B2C-4D3E-8F40-112233445566").unwrap().as_deref(),
            Some("nvme0n1")
        );
        assert_eq!(
            sysfs.namespace_by_uuid("aabbccdd-eeff-5011-9233-445566778899").unwrap().as_deref(),
            Some("nvme0n2")
        );
        assert_eq!(sysfs.namespace_by_uuid("11111111-2222-4333-8444-555555555555").unwrap(), None);

        fs::create_dir_all(root.join("block/nvme0n1/queue")).unwrap();
        sysfs.set_readahead("nvme0n1", 32).unwrap();
        assert_eq!(fs::read_to_string(root.join("block/nvme0n1/queue/read_ahead_kb")).unwrap(), "32");
    }

    #[test]
    fn unmounting_nothing_removes_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        fs::create_dir(&layer).unwrap();
        assert!(!is_mount_point(&layer).unwrap());
        unmount_layer(&layer).unwrap();
        assert!(!layer.exists());
        unmount_layer(&layer).unwrap();
    }
}
