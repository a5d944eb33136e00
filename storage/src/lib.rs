//! The block storage data path: volumes (`bdev`), the NVMe/TCP target that exports them as namespaces, and the
//! reconciler that builds both from intent.

pub mod bdev;
pub mod image;
pub mod initiator;
pub mod model;
pub mod reconcile;
#[cfg(feature = "spdk")]
pub mod spdk;
pub mod target;
