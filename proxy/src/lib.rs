//! The shared service-mesh proxy of the DPU agent: one multi-tenant proxy that replaces every pod's sidecar.
//!
//! Configuration arrives as [`model::MeshSpecs`] from one or more sources (the agent's intent store, an xDS
//! control plane). [`proxy::Proxy::apply`] validates and compiles a source's specs into an immutable snapshot and
//! swaps it in atomically: established connections keep running, new connections and new requests see the new
//! snapshot, removed listeners drain.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod authz;
pub mod cluster;
pub mod fairness;
pub mod http;
pub mod ktls;
pub mod listener;
pub mod metrics;
pub mod model;
pub use dpu_intent::poll;
pub mod proxy;
pub mod reconcile;
pub mod route;
pub mod snapshot;
pub mod tcp;
pub mod tls;
pub mod xds;

pub use proxy::Proxy;

/// Error type carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type passed between the downstream (server) and upstream (cluster) halves.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Packet mark (`SO_MARK`) on every connection the proxy opens upstream, so the capture rules that steer pod
/// traffic into the proxy can skip the proxy's own traffic (loop avoidance).
pub const UPSTREAM_MARK: u32 = 0x0000_d9d0;
