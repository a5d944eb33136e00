//! dpu-agent: the service on the Arm cores of a DPU that the host drives over gRPC.
//!
//! Module map: [`config`] (TOML, validated once) → [`agent`] (wiring and shutdown) → [`api`] (gRPC services,
//! authentication and roles) over the intent store and reconcilers of `dpu-intent`. [`capabilities`] and
//! [`platform`] describe the machine; [`admin`] and [`metrics`] expose it to Prometheus; [`pki`] makes a
//! development CA. [`upgrade`] hands a running agent's sockets and store to its successor; [`systemd`] speaks
//! the service manager's notification protocol.

pub mod admin;
pub mod agent;
pub mod api;
pub mod capabilities;
pub mod config;
pub mod logging;
pub mod machine;
pub mod metrics;
pub mod pki;
pub mod platform;
pub mod settings;
mod sys;
pub mod systemd;
pub mod upgrade;

/// Version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git revision this build came from.
pub const GIT_REVISION: &str = env!("DPU_AGENT_GIT_REVISION");
/// Target triple this build was compiled for.
pub const TARGET: &str = env!("DPU_AGENT_TARGET");
