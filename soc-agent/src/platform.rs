//! Facts about the machine the agent runs on: kernel, host name, board identity.

use std::fs;
use std::path::Path;

/// Board identity, when something on the machine names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Board {
    /// "dmi" or "device-tree".
    pub source: &'static str,
    pub vendor: String,
    pub model: String,
    pub bluefield: bool,
    pub detail: String,
}

/// Kernel release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
}

/// Host name (`uname -n`).
pub fn hostname() -> String {
    nix::sys::utsname::uname().map(|u| u.nodename().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
}

/// Paths that only exist on BlueField SoCs (platform drivers of the Arm side).
const BLUEFIELD_MARKERS: &[&str] = &[
    "/sys/bus/platform/drivers/mlxbf-bootctl",
    "/sys/bus/platform/drivers/mlxbf-tmfifo",
    "/sys/bus/platform/drivers/mlxbf-pmc",
];

/// Detects the board from DMI (UEFI/ACPI machines, BlueField included) or the device tree.
pub fn board() -> Option<Board> {
    board_in(Path::new("/"))
}

fn board_in(root: &Path) -> Option<Board> {
    let read = |p: &str| {
        fs::read(root.join(p.trim_start_matches('/')))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_owned())
            .filter(|s| !s.is_empty())
    };
    let marker = BLUEFIELD_MARKERS.iter().find(|p| root.join(p.trim_start_matches('/')).exists());
    let mentions_bluefield = |s: &str| s.to_ascii_lowercase().contains("bluefield");

    if let Some(model) = read("/sys/class/dmi/id/product_name") {
        let vendor = read("/sys/class/dmi/id/sys_vendor").unwrap_or_default();
        let board_name = read("/sys/class/dmi/id/board_name").unwrap_or_default();
        let bluefield = marker.is_some() || mentions_bluefield(&model) || mentions_bluefield(&board_name);
        let detail = match marker {
            Some(m) => format!("board {board_name}; platform driver {m}"),
            None => format!("board {board_name}"),
        };
        return Some(Board { source: "dmi", vendor, model, bluefield, detail });
    }
    if let Some(model) = read("/proc/device-tree/model") {
        let compatible = read("/proc/device-tree/compatible").unwrap_or_default().replace('\0', ",");
        let vendor = compatible.split(',').next().unwrap_or_default().to_owned();
        let bluefield = marker.is_some() || mentions_bluefield(&model) || compatible.contains("mlxbf");
        return Some(Board {
            source: "device-tree",
            vendor,
            model,
            bluefield,
            detail: format!("compatible {compatible}"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, contents: &str) {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, contents).unwrap();
    }

    #[test]
    fn bluefield_by_dmi_and_platform_driver() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "sys/class/dmi/id/product_name", "BlueField-3 DPU\n");
        write(root.path(), "sys/class/dmi/id/sys_vendor", "https://www.mellanox.com\n");
        fs::create_dir_all(root.path().join("sys/bus/platform/drivers/mlxbf-bootctl")).unwrap();
        let board = board_in(root.path()).unwrap();
        assert_eq!(board.source, "dmi");
        assert_eq!(board.model, "BlueField-3 DPU");
        assert!(board.bluefield);
        assert!(board.detail.contains("mlxbf-bootctl"));
    }

    #[test]
    fn device_tree_board() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "proc/device-tree/model", "linux,dummy-virt\0");
        write(root.path(), "proc/device-tree/compatible", "linux,dummy-virt\0");
        let board = board_in(root.path()).unwrap();
        assert_eq!(board.source, "device-tree");
        assert_eq!(board.vendor, "linux");
        assert!(!board.bluefield);
    }

    #[test]
    fn nothing_identifies_the_board() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(board_in(root.path()), None);
    }

    #[test]
    fn kernel_release_matches_proc() {
        let proc = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(kernel_release(), proc.trim());
    }
}
