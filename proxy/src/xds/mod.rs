//! xDS client: an Istio / Envoy control plane drives the proxy over ADS (state of the world).
//!
//! [`convert`] turns Envoy v3 resources into [`crate::model`] objects at the edge, refusing anything whose meaning
//! the proxy cannot keep; [`client`] holds the ADS stream, ACKs and NACKs each response, and hands every accepted
//! configuration, complete, to the caller.

pub mod client;
pub mod convert;

pub use client::{TypeStatus, XdsConfig, XdsError, XdsStatus, run, run_with_status};
