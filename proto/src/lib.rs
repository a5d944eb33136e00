//! The `dpu.v1` API as generated Rust types.
//!
//! Generated types stay at the API edge: the agent converts them into validated domain types with `TryFrom`
//! and the rest of the code never sees protobuf.

pub mod mesh;

/// Messages and services of package `dpu.v1`.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all, rust_2018_idioms)]
    tonic::include_proto!("dpu.v1");
}

/// Encoded `FileDescriptorSet` of every `dpu.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dpu_v1_descriptor");
