//! Host-side services of dpu-agent. Today: `dpu-snapshotter`, a containerd snapshotter served as a proxy
//! plugin over gRPC on a unix socket.
//!
//! - [`snapshot`]: the snapshotter itself (domain types, metadata store, mounts, filters, usage, remote layers);
//! - [`api`]: containerd's snapshots gRPC service, the only code that sees protobuf;
//! - [`server`]: the unix socket and the tonic server;
//! - [`config`]: the binary's configuration file;
//! - [`dpu`]: the remote layer source backed by the DPU (layers as NVMe namespaces, mounted here).

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod dpu;
pub mod server;
pub mod snapshot;
