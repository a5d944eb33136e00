//! Generates bindings to the SPDK installed on the build machine (or in a cross sysroot) and links it statically.
//!
//! SPDK is found with pkg-config: `SPDK_DIR` (an install prefix) is searched first, then `PKG_CONFIG_PATH` and the
//! system's directories; `PKG_CONFIG_SYSROOT_DIR` and `PKG_CONFIG` work as usual for cross builds. The static SPDK
//! and DPDK archives are linked whole: bdev modules, transports, sock implementations, event subsystems and DPDK
//! drivers register themselves from constructors that nothing references by name.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// pkg-config modules the agent cannot work without: the application framework with its bdev, nvmf and sock
/// subsystems, the env layer over DPDK, the malloc bdev and the POSIX sockets.
const REQUIRED: &[&str] =
    &["spdk_event", "spdk_event_bdev", "spdk_event_nvmf", "spdk_bdev_malloc", "spdk_sock_posix", "spdk_env_dpdk"];
/// Modules linked when the installed SPDK has them: Linux AIO and the user-space NVMe driver as bdevs.
const OPTIONAL: &[&str] = &["spdk_bdev_aio", "spdk_bdev_nvme"];

fn pkg_config() -> Command {
    let mut cmd = Command::new(env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into()));
    if let Ok(dir) = env::var("SPDK_DIR") {
        let mut path = format!("{dir}/lib/pkgconfig");
        if let Ok(rest) = env::var("PKG_CONFIG_PATH") {
            path = format!("{path}:{rest}");
        }
        cmd.env("PKG_CONFIG_PATH", path);
    }
    // pkg-config refuses to answer for another target unless told the sysroot is meant for it.
    if env::var("TARGET").ok() != env::var("HOST").ok() {
        cmd.env("PKG_CONFIG_ALLOW_CROSS", "1");
    }
    cmd
}

fn exists(module: &str) -> bool {
    pkg_config().args(["--exists", module]).status().map(|s| s.success()).unwrap_or(false)
}

fn query(args: &[&str], modules: &[&str]) -> Vec<String> {
    let out =
        pkg_config().args(args).args(modules).output().unwrap_or_else(|e| {
            panic!("cannot run pkg-config ({e}); install pkg-config to build with the `spdk` feature")
        });
    if !out.status.success() {
        panic!("pkg-config {args:?} {modules:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

/// Archives that carry self-registering code (SPDK's own, DPDK's, ISA-L) are linked whole.
fn whole_archive(lib: &str) -> bool {
    lib.starts_with("spdk_") || lib.starts_with("rte_") || lib.starts_with("isal")
}

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_SYSROOT_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG");
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.h");
    println!("cargo:rerun-if-changed=shim.c");

    let missing: Vec<&str> = REQUIRED.iter().copied().filter(|m| !exists(m)).collect();
    if !missing.is_empty() {
        panic!(
            "SPDK not found: pkg-config has no module {}. Install SPDK (v24.01 or later) with its pkg-config files and \
             point SPDK_DIR at its prefix or PKG_CONFIG_PATH at its lib/pkgconfig (see ffi/README.md).",
            missing.join(", ")
        );
    }
    let mut modules: Vec<&str> = REQUIRED.to_vec();
    modules.extend(OPTIONAL.iter().copied().filter(|m| exists(m)));
    for m in OPTIONAL.iter().filter(|m| !modules.contains(m)) {
        println!("cargo:warning=SPDK has no {m}: that bdev module is not linked");
    }
    // The syslibs module lists what SPDK's archives need from the system (uuid, numa, ssl, aio ...).
    if exists("spdk_syslibs") {
        modules.push("spdk_syslibs");
    }

    let cflags = query(&["--cflags"], &modules);
    let target = env::var("TARGET").expect("cargo sets TARGET");
    // A cross build (aarch64 for the DPU) must see the target's SPDK, not the build machine's.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let host_arch = env::var("HOST").expect("cargo sets HOST").split('-').next().unwrap_or_default().to_owned();
    if arch != host_arch && env::var_os("PKG_CONFIG_SYSROOT_DIR").is_none() && env::var_os("SPDK_DIR").is_none() {
        panic!(
            "building for {arch} on {host_arch}: point SPDK_DIR (or PKG_CONFIG_SYSROOT_DIR with PKG_CONFIG_PATH) at an \
             SPDK built for {arch}; the build machine's own SPDK cannot be linked into this target"
        );
    }

    // C shims for static inline functions and union fields.
    let mut shim = cc::Build::new();
    shim.file("shim.c").warnings(false);
    for flag in &cflags {
        shim.flag(flag);
    }
    shim.compile("dpu_spdk_shim");

    // Libraries: search paths, then SPDK/DPDK archives whole, then system libraries, each once.
    let mut seen = std::collections::HashSet::new();
    for token in query(&["--libs", "--static"], &modules) {
        if let Some(dir) = token.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={dir}");
        } else if let Some(lib) = token.strip_prefix("-l") {
            if !seen.insert(lib.to_owned()) {
                continue;
            }
            if whole_archive(lib) {
                println!("cargo:rustc-link-lib=static:+whole-archive,-bundle={lib}");
            } else {
                println!("cargo:rustc-link-lib=dylib={lib}");
            }
        } else if token.ends_with(".a") {
            // An archive named by path (ISA-L in SPDK's own .pc files).
            let path = std::path::Path::new(&token);
            let name = path.file_stem().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("lib"));
            if let (Some(dir), Some(lib)) = (path.parent(), name)
                && seen.insert(lib.to_owned())
            {
                println!("cargo:rustc-link-search=native={}", dir.display());
                println!("cargo:rustc-link-lib=static:+whole-archive,-bundle={lib}");
            }
        }
        // `-Wl,--whole-archive` and friends in SPDK's .pc files are replaced by the modifiers above; other linker
        // flags (`-pthread`) are covered by Rust's own link line.
    }

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(&cflags)
        .clang_arg(format!("--target={target}"))
        .allowlist_function("spdk_(app|thread|get_thread|io_device|get_io_channel|put_io_channel|io_channel)_?.*")
        .allowlist_function("spdk_bdev_.*")
        .allowlist_function("spdk_nvmf_.*")
        .allowlist_function("spdk_nvme_transport_id_(parse|populate_trstring)")
        .allowlist_function("spdk_(dma|zmalloc|free|malloc)_?.*")
        .allowlist_function("spdk_(env_get_core_count|env_get_current_core)")
        .allowlist_function("spdk_uuid_.*")
        .allowlist_function("dpu_spdk_.*")
        .allowlist_type("spdk_bdev_module")
        .allowlist_type("spdk_bdev_fn_table")
        .allowlist_type("spdk_bdev_io_type")
        .allowlist_type("spdk_bdev_io_status")
        .allowlist_var("SPDK_.*")
        .blocklist_function("spdk_bdev_.*_ext_v2")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    // Symbols SPDK marks deprecated still bind; warnings about them are not errors here.
    builder = builder.clang_arg("-Wno-deprecated-declarations");
    let bindings = builder.generate().unwrap_or_else(|e| panic!("bindgen over SPDK's headers failed: {e}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings.write_to_file(out.join("bindings.rs")).expect("write bindings");
}
