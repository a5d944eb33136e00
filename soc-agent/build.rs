//! Records the git revision and the compilation target so `GetAgentInfo` can report them, and sets the static
//! build's link layout.

use std::process::Command;

fn main() {
    // TARGET is the triple being compiled for, also when cross-compiling (unlike cfg!(target_arch) in build.rs).
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=DPU_AGENT_TARGET={target}");

    // The static musl agent: nothing applies RELRO to a static binary (musl's start code makes no mprotect call
    // for it; checked under qemu-aarch64 -strace), and GNU ld aligns RELRO's end to the 64 KiB max page size on
    // arm64, which only padded the file by up to 64 KiB. Without it the writable segment follows the text in the
    // file; segments stay aligned to 64 KiB in memory, so the binary still loads with 64 KiB pages.
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,norelro");
    }

    let revision = std::env::var("DPU_AGENT_GIT_REVISION").ok().or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        let rev = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !rev.is_empty()).then_some(rev)
    });
    let revision = revision.unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    let suffix = if dirty { "-dirty" } else { "" };
    println!("cargo:rustc-env=DPU_AGENT_GIT_REVISION={revision}{suffix}");
    println!("cargo:rerun-if-env-changed=DPU_AGENT_GIT_REVISION");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/index");
}
