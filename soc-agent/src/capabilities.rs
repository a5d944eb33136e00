//! What this machine can do, found by exercising each capability — never assumed from the architecture, the
//! board or a config flag. Every probe is cheap and side-effect free apart from letting the kernel load a module
//! on demand, so probes run each time they are asked for and always describe the machine as it is now.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, AlgAddr, SockFlag, SockType, bind, setsockopt, socket, sockopt};
use serde::Serialize;

/// Outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Exercised and working.
    Available,
    /// Missing; the detail says why.
    Unavailable,
    /// Not active now, but the kernel has the module to provide it.
    Loadable,
}

/// One probed capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub name: &'static str,
    pub state: State,
    pub detail: String,
}

impl Capability {
    fn new(name: &'static str, state: State, detail: impl Into<String>) -> Self {
        Self { name, state, detail: detail.into() }
    }
}

/// Runs every probe. Blocking (a few system calls and sysfs reads); call from a blocking context.
pub fn probe_all() -> Vec<Capability> {
    let kernel = Kernel::running();
    vec![
        io_uring(),
        ktls(&kernel),
        af_alg(),
        tc_flower(&kernel),
        xfrm(&kernel),
        hugepages(Path::new("/proc/meminfo")),
        sriov(Path::new("/sys/class/net")),
        switchdev(Path::new("/sys/class/net")),
    ]
}

fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{} ({e})", Errno::from_raw(code)),
        None => e.to_string(),
    }
}

/// io_uring: set up a real ring. qemu-user and kernels with `io_uring_disabled` refuse it.
pub fn io_uring() -> Capability {
    match io_uring::IoUring::new(2) {
        Ok(_) => Capability::new("io_uring", State::Available, "io_uring_setup succeeded"),
        Err(e) => {
            let hint = match e.raw_os_error() {
                Some(libc::ENOSYS) => "; the kernel or emulator lacks io_uring, file volumes use a thread pool",
                Some(libc::EPERM) => "; disabled by sysctl kernel.io_uring_disabled",
                _ => "",
            };
            Capability::new("io_uring", State::Unavailable, format!("io_uring_setup: {}{hint}", errno_text(&e)))
        }
    }
}

/// kTLS: attach the `tls` upper-layer protocol to a TCP socket. A kernel with kTLS answers ENOTCONN (the ULP
/// exists but needs an established connection); without it, ENOENT.
pub fn ktls(kernel: &Kernel) -> Capability {
    let available_ulps = fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    let available_ulps = available_ulps.trim();
    let probe = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .and_then(|fd| setsockopt(&fd, sockopt::TcpUlp::default(), b"tls"));
    match probe {
        Err(Errno::ENOTCONN) | Ok(()) => {
            Capability::new("ktls", State::Available, format!("tls ULP present (tcp_available_ulp: {available_ulps})"))
        }
        Err(errno) => {
            let (state, module) = kernel.module_state("tls");
            let state = if state == State::Available { State::Unavailable } else { state };
            Capability::new(
                "ktls",
                state,
                format!("TCP_ULP \"tls\": {errno}; tcp_available_ulp: {available_ulps:?}; {module}"),
            )
        }
    }
}

/// AF_ALG: open the socket family and bind the AES-XTS skcipher used for volume encryption.
pub fn af_alg() -> Capability {
    let fd = match socket(AddressFamily::Alg, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None) {
        Ok(fd) => fd,
        Err(errno) => return Capability::new("af_alg", State::Unavailable, format!("socket(AF_ALG): {errno}")),
    };
    let xts = match bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &AlgAddr::new("skcipher", "xts(aes)")) {
        Ok(()) => match best_driver(&fs::read_to_string("/proc/crypto").unwrap_or_default(), "xts(aes)") {
            Some(driver) => format!("xts(aes) bound, driver {driver}"),
            None => "xts(aes) bound".to_owned(),
        },
        Err(errno) => format!("xts(aes) not bindable: {errno}"),
    };
    Capability::new("af_alg", State::Available, format!("AF_ALG socket opened; {xts}"))
}

/// tc flower: the classifier is a module; report whether it is loaded, built in or loadable.
pub fn tc_flower(kernel: &Kernel) -> Capability {
    let (state, detail) = kernel.module_state("cls_flower");
    Capability::new("tc_flower", state, detail)
}

/// xfrm: open the XFRM netlink family (the kernel loads `xfrm_user` on demand) and look for the ESP AEAD.
pub fn xfrm(kernel: &Kernel) -> Capability {
    let aead = match best_driver(&fs::read_to_string("/proc/crypto").unwrap_or_default(), "rfc4106(gcm(aes))") {
        Some(driver) => format!("ESP AEAD rfc4106(gcm(aes)) via {driver}"),
        None => "ESP AEAD rfc4106(gcm(aes)) not registered yet".to_owned(),
    };
    match crate::sys::netlink_socket(libc::NETLINK_XFRM) {
        Ok(_) => Capability::new("xfrm", State::Available, format!("NETLINK_XFRM socket opened; {aead}")),
        Err(e) => {
            let (state, module) = kernel.module_state("xfrm_user");
            let state = if state == State::Available { State::Unavailable } else { state };
            Capability::new("xfrm", state, format!("socket(NETLINK_XFRM): {}; {module}", errno_text(&e)))
        }
    }
}

/// Hugepages: reserved pages in /proc/meminfo (the SPDK engine and large queues need them).
pub fn hugepages(meminfo: &Path) -> Capability {
    let text = fs::read_to_string(meminfo).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    match (field("HugePages_Total"), field("HugePages_Free"), field("Hugepagesize")) {
        (Some(total), Some(free), Some(size_kb)) if total > 0 => Capability::new(
            "hugepages",
            State::Available,
            format!("{total} pages of {size_kb} kB reserved, {free} free"),
        ),
        (Some(_), _, Some(size_kb)) => Capability::new(
            "hugepages",
            State::Unavailable,
            format!("no hugepages reserved (page size {size_kb} kB; set vm.nr_hugepages)"),
        ),
        _ => Capability::new("hugepages", State::Unavailable, format!("no hugepage counters in {}", meminfo.display())),
    }
}

fn net_devices(class_net: &Path) -> Vec<(String, PathBuf)> {
    let mut devices: Vec<_> = fs::read_dir(class_net)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    devices.sort();
    devices
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// SR-IOV: physical functions that can carry virtual functions.
pub fn sriov(class_net: &Path) -> Capability {
    let pfs: Vec<String> = net_devices(class_net)
        .into_iter()
        .filter_map(|(name, path)| {
            let total: u32 = read_trimmed(&path.join("device/sriov_totalvfs"))?.parse().ok()?;
            let enabled = read_trimmed(&path.join("device/sriov_numvfs")).unwrap_or_else(|| "0".into());
            (total > 0).then(|| format!("{name} ({enabled}/{total} VFs)"))
        })
        .collect();
    if pfs.is_empty() {
        Capability::new("sriov", State::Unavailable, "no network device reports sriov_totalvfs")
    } else {
        Capability::new("sriov", State::Available, format!("{} PF(s): {}", pfs.len(), pfs.join(", ")))
    }
}

/// switchdev: ports that belong to an embedded switch (uplinks and representors) expose `phys_switch_id`.
pub fn switchdev(class_net: &Path) -> Capability {
    let ports: Vec<String> = net_devices(class_net)
        .into_iter()
        .filter_map(|(name, path)| {
            read_trimmed(&path.join("phys_switch_id"))?;
            Some(match read_trimmed(&path.join("phys_port_name")) {
                Some(port) => format!("{name}={port}"),
                None => name,
            })
        })
        .collect();
    if ports.is_empty() {
        Capability::new("switchdev", State::Unavailable, "no network device reports phys_switch_id")
    } else {
        Capability::new("switchdev", State::Available, format!("{} switch port(s): {}", ports.len(), ports.join(", ")))
    }
}

/// One entry of the crypto capability registry: can `subject` do `feature`, in hardware or not, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CryptoCapability {
    /// "cpu", "kernel" or "netdev/<name>".
    pub subject: String,
    pub feature: &'static str,
    pub state: State,
    /// An offload engine (hardware in a crypto policy's sense), not the agent's cores.
    pub hardware: bool,
    pub detail: String,
}

impl CryptoCapability {
    fn new(subject: impl Into<String>, feature: &'static str, state: State, hardware: bool, detail: String) -> Self {
        Self { subject: subject.into(), feature, state, hardware, detail }
    }

    fn from_probe(feature: &'static str, probe: Capability) -> Self {
        Self::new("kernel", feature, probe.state, false, probe.detail)
    }
}

/// Netdev features that offload crypto (or the rules that steer to it), as ethtool names them.
pub const NETDEV_CRYPTO_FEATURES: [&str; 4] =
    ["tls-hw-tx-offload", "tls-hw-rx-offload", "esp-hw-offload", "hw-tc-offload"];

/// The crypto capability registry: the CPU's AES instructions and the engine volumes encrypt with, the kernel's
/// kTLS and xfrm (with the drivers behind their algorithms), and per network device the offload features
/// ethtool reports active. Blocking (system calls, sysfs, netlink); call from a blocking context.
pub fn crypto_registry() -> Vec<CryptoCapability> {
    let kernel = Kernel::running();
    let proc_crypto = fs::read_to_string("/proc/crypto").unwrap_or_default();
    let engine = dpu_crypto::xts::engine();
    let mut out = vec![
        CryptoCapability::new(
            "cpu",
            "aes-instructions",
            if engine.cpu_instructions() { State::Available } else { State::Unavailable },
            false,
            if engine.cpu_instructions() {
                format!("AES runs on the CPU's instructions ({})", engine.name())
            } else {
                "no AES instructions: the constant-time software AES is used".to_owned()
            },
        ),
        CryptoCapability::new(
            "cpu",
            "aes-xts",
            State::Available,
            false,
            format!(
                "encrypted volumes: AES-256-XTS on the agent's cores ({}); {}",
                engine.name(),
                dpu_storage::bdev::NO_XTS_OFFLOAD
            ),
        ),
        CryptoCapability::from_probe("ktls", with_tls_stat(ktls(&kernel))),
        ktls_ciphers(dpu_proxy::ktls::kernel_support()),
        CryptoCapability::from_probe("xfrm", xfrm(&kernel)),
    ];
    for (feature, algorithm) in [("xfrm-gcm-aes", "rfc4106(gcm(aes))"), ("ktls-gcm-aes", "gcm(aes)")] {
        let (state, detail) = match best_driver(&proc_crypto, algorithm) {
            Some(driver) => (State::Available, format!("{algorithm} via {driver}")),
            None => (State::Loadable, format!("{algorithm} not registered yet (the kernel loads it on first use)")),
        };
        out.push(CryptoCapability::new("kernel", feature, state, false, detail));
    }
    out.extend(netdev_crypto(Path::new("/sys/class/net")));
    out
}

/// Whether a session placed by `require-hardware` can be offloaded here: the kernel must have TLS and some
/// network device must have `tls-hw-tx-offload` on. `Err` names what is missing. Blocking (sysfs, netlink).
pub fn kernel_tls_hardware() -> Result<Vec<String>, String> {
    let probe = ktls(&Kernel::running());
    if probe.state != State::Available {
        return Err(format!("the kernel has no TLS ({})", probe.detail));
    }
    let checked = netdev_crypto(Path::new("/sys/class/net"));
    let offloading: Vec<String> = checked
        .iter()
        .filter(|c| c.feature == "tls-hw-tx-offload" && c.state == State::Available)
        .map(|c| c.subject.trim_start_matches("netdev/").to_owned())
        .collect();
    if offloading.is_empty() {
        let names: BTreeSet<&str> = checked.iter().map(|c| c.subject.trim_start_matches("netdev/")).collect();
        return Err(format!(
            "no network device has tls-hw-tx-offload on (checked: {}); on BlueField it is offered by PF and SF \
             netdevs, not by switchdev representors",
            if names.is_empty() {
                "none with a device".to_owned()
            } else {
                names.into_iter().collect::<Vec<_>>().join(", ")
            }
        ));
    }
    Ok(offloading)
}

/// What the kernel's TLS accepted when the proxy exercised it: each version and cipher installed on a loopback
/// socket in both directions.
fn ktls_ciphers(support: &dpu_crypto::ktls::KernelSupport) -> CryptoCapability {
    let (state, detail) = match &support.ulp {
        Err(e) => (State::Unavailable, format!("no cipher can be handed to the kernel: {e}")),
        Ok(()) => {
            let name = |v: &dpu_crypto::ktls::Version, c: &dpu_crypto::ktls::Cipher| format!("{} {c}", v.as_str());
            let accepted: Vec<String> =
                support.ciphers.iter().filter(|(_, _, r)| r.is_ok()).map(|(v, c, _)| name(v, c)).collect();
            let refused: Vec<String> = support
                .ciphers
                .iter()
                .filter_map(|(v, c, r)| r.as_ref().err().map(|e| format!("{} ({e})", name(v, c))))
                .collect();
            let state = if accepted.is_empty() { State::Unavailable } else { State::Available };
            let refused = if refused.is_empty() { "none".to_owned() } else { refused.join(", ") };
            (state, format!("kernel TLS accepts: {}; refuses: {refused}", accepted.join(", ")))
        }
    };
    CryptoCapability::new("kernel", "ktls-ciphers", state, false, detail)
}

/// kTLS with the kernel's own counters of software and device TLS connections, when it keeps them.
fn with_tls_stat(mut probe: Capability) -> Capability {
    if let Ok(stat) = fs::read_to_string("/proc/net/tls_stat") {
        let counts: Vec<String> = stat
            .lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .filter(|(k, _)| k.starts_with("TlsCurr"))
            .map(|(k, v)| format!("{k} {}", v.trim()))
            .collect();
        probe.detail.push_str(&format!("; /proc/net/tls_stat: {}", counts.join(", ")));
    }
    probe
}

/// Whether ethtool reports `feature` active on `device`; `Err` says why it cannot tell. Blocking (netlink).
pub fn netdev_feature(device: &str, feature: &str) -> Result<bool, String> {
    if !Path::new("/sys/class/net").join(device).exists() {
        return Err(format!("network device {device:?} does not exist"));
    }
    dpu_fabric::netlink::socket::netdev_feature(device, feature)
}

/// Per network device (physical functions, representors, SFs; not loopback or virtual devices), the crypto
/// offload features ethtool reports active.
fn netdev_crypto(class_net: &Path) -> Vec<CryptoCapability> {
    let devices: Vec<String> = net_devices(class_net)
        .into_iter()
        .filter(|(_, path)| path.join("device").exists())
        .map(|(name, _)| name)
        .collect();
    if devices.is_empty() {
        return Vec::new();
    }
    let mut ethtool = match dpu_fabric::netlink::socket::Ethtool::open() {
        Ok(e) => e,
        Err(e) => {
            return vec![CryptoCapability::new(
                "kernel",
                "ethtool",
                State::Unavailable,
                false,
                format!("ethtool netlink: {e}; netdev offloads unknown"),
            )];
        }
    };
    let mut out = Vec::new();
    for device in devices {
        for feature in NETDEV_CRYPTO_FEATURES {
            let (state, detail) = match ethtool.feature_active(&device, feature) {
                Ok(true) => (State::Available, format!("{feature} on")),
                Ok(false) => (State::Unavailable, format!("{feature} off or not offered by the driver")),
                Err(e) => (State::Unavailable, format!("reading {feature}: {e}")),
            };
            out.push(CryptoCapability::new(format!("netdev/{device}"), feature, state, true, detail));
        }
    }
    out
}

/// Highest-priority driver registered in /proc/crypto for an algorithm name.
fn best_driver(proc_crypto: &str, algorithm: &str) -> Option<String> {
    proc_crypto
        .split("\n\n")
        .filter_map(|block| {
            let field = |key: &str| {
                block.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == key).then(|| v.trim().to_owned())
                })
            };
            (field("name")? == algorithm).then_some(())?;
            let priority: i64 = field("priority")?.parse().ok()?;
            Some((priority, field("driver")?))
        })
        .max()
        .map(|(_, driver)| driver)
}

/// The running kernel's module tables.
#[derive(Debug, Clone)]
pub struct Kernel {
    modules_dir: PathBuf,
    sys_module: PathBuf,
}

impl Kernel {
    /// The kernel this process runs on.
    pub fn running() -> Self {
        Self {
            modules_dir: Path::new("/lib/modules").join(crate::platform::kernel_release()),
            sys_module: PathBuf::from("/sys/module"),
        }
    }

    /// Whether module `name` is loaded or built in (Available), in the module tree (Loadable) or absent.
    pub fn module_state(&self, name: &str) -> (State, String) {
        if self.sys_module.join(name).exists() {
            return (State::Available, format!("module {name} loaded"));
        }
        let file = format!("/{name}.ko");
        let listed = |table: &str| {
            fs::read_to_string(self.modules_dir.join(table))
                .map(|t| {
                    t.lines().any(|l| {
                        let path = l.split(':').next().unwrap_or_default();
                        path.strip_suffix(".xz")
                            .or_else(|| path.strip_suffix(".zst"))
                            .or_else(|| path.strip_suffix(".gz"))
                            .unwrap_or(path)
                            .replace('-', "_")
                            .ends_with(&file)
                    })
                })
                .unwrap_or(false)
        };
        if listed("modules.builtin") {
            (State::Available, format!("module {name} built in"))
        } else if listed("modules.dep") {
            (State::Loadable, format!("module {name} loadable from {}", self.modules_dir.display()))
        } else {
            (State::Unavailable, format!("module {name} not loaded and not in {}", self.modules_dir.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_is_probed_with_a_reason() {
        let caps = probe_all();
        let names: Vec<_> = caps.iter().map(|c| c.name).collect();
        assert_eq!(names, ["io_uring", "ktls", "af_alg", "tc_flower", "xfrm", "hugepages", "sriov", "switchdev"]);
        assert!(caps.iter().all(|c| !c.detail.is_empty()));
    }

    #[test]
    fn io_uring_state_matches_errno() {
        // Native Linux sets up a ring; qemu-user answers ENOSYS and the probe must say so, not fail.
        let cap = io_uring();
        match cap.state {
            State::Available => assert_eq!(cap.detail, "io_uring_setup succeeded"),
            _ => assert!(cap.detail.starts_with("io_uring_setup: E"), "{}", cap.detail),
        }
    }

    #[test]
    fn meminfo_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        fs::write(
            &path,
            "MemTotal: 1 kB\nHugePages_Total:     512\nHugePages_Free:      500\nHugepagesize:       2048 kB\n",
        )
        .unwrap();
        let cap = hugepages(&path);
        assert_eq!(cap.state, State::Available);
        assert_eq!(cap.detail, "512 pages of 2048 kB reserved, 500 free");
        fs::write(&path, "HugePages_Total: 0\nHugePages_Free: 0\nHugepagesize: 2048 kB\n").unwrap();
        assert_eq!(hugepages(&path).state, State::Unavailable);
    }

    #[test]
    fn sriov_and_switchdev_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path();
        for (dev, files) in [
            (
                "p0",
                vec![
                    ("device/sriov_totalvfs", "16"),
                    ("device/sriov_numvfs", "2"),
                    ("phys_switch_id", "abcd"),
                    ("phys_port_name", "p0"),
                ],
            ),
            ("pf0vf0", vec![("phys_switch_id", "abcd"), ("phys_port_name", "pf0vf0")]),
            ("lo", vec![]),
        ] {
            fs::create_dir_all(net.join(dev)).unwrap();
            for (file, contents) in files {
                let p = net.join(dev).join(file);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, contents).unwrap();
            }
        }
        let cap = sriov(net);
        assert_eq!((cap.state, cap.detail.as_str()), (State::Available, "1 PF(s): p0 (2/16 VFs)"));
        let cap = switchdev(net);
        assert_eq!((cap.state, cap.detail.as_str()), (State::Available, "2 switch port(s): p0=p0, pf0vf0=pf0vf0"));
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(sriov(empty.path()).state, State::Unavailable);
    }

    #[test]
    fn ktls_ciphers_name_what_the_kernel_accepted_and_refused() {
        use dpu_crypto::ktls::{Cipher, KernelSupport, Version};
        let support = KernelSupport {
            ulp: Ok(()),
            ciphers: vec![
                (Version::Tls13, Cipher::AesGcm256, Ok(())),
                (Version::Tls13, Cipher::Chacha20Poly1305, Err("TLS_TX: Invalid argument".into())),
            ],
        };
        let c = ktls_ciphers(&support);
        assert_eq!(c.state, State::Available);
        assert!(c.detail.contains("accepts: TLS1.3 aes-gcm-256;"), "{}", c.detail);
        assert!(c.detail.contains("refuses: TLS1.3 chacha20-poly1305 (TLS_TX: Invalid argument)"), "{}", c.detail);
        let none = ktls_ciphers(&KernelSupport { ulp: Err("TCP_ULP \"tls\": No such file".into()), ciphers: vec![] });
        assert_eq!(none.state, State::Unavailable);
        assert!(none.detail.contains("TCP_ULP"), "{}", none.detail);
    }

    #[test]
    fn crypto_driver_by_priority() {
        let text = "name         : xts(aes)\ndriver       : xts-aes-generic\npriority     : 100\n\n\
                    name         : xts(aes)\ndriver       : xts-aes-ce\npriority     : 300\n\n\
                    name         : gcm(aes)\ndriver       : gcm-aes-ce\npriority     : 400\n";
        assert_eq!(best_driver(text, "xts(aes)").as_deref(), Some("xts-aes-ce"));
        assert_eq!(best_driver(text, "cbc(aes)"), None);
    }

    #[test]
    fn module_tables() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Kernel { modules_dir: dir.path().to_owned(), sys_module: dir.path().join("sys") };
        fs::write(dir.path().join("modules.dep"), "kernel/net/sched/cls_flower.ko: kernel/net/sched/x.ko\n").unwrap();
        fs::write(dir.path().join("modules.builtin"), "kernel/net/tls/tls.ko\n").unwrap();
        assert_eq!(kernel.module_state("cls_flower").0, State::Loadable);
        assert_eq!(kernel.module_state("tls").0, State::Available);
        assert_eq!(kernel.module_state("xfrm_user").0, State::Unavailable);
        fs::create_dir_all(dir.path().join("sys/xfrm_user")).unwrap();
        assert_eq!(kernel.module_state("xfrm_user").0, State::Available);
    }
}
