//! The validated mesh model lives in its own crate (`dpu-mesh`) so the API edge and `dpuctl` share it without
//! linking the data plane.

pub use dpu_mesh::*;
