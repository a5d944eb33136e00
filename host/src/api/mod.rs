//! The gRPC edge: containerd's snapshots service over the [`Snapshotter`](crate::snapshot::Snapshotter).
//!
//! Generated protobuf types ([`pb`]) live only here; `convert` turns them into domain types and domain
//! errors into gRPC status codes, [`service`] answers the RPCs.

mod convert;
pub mod service;

pub use service::SnapshotService;

/// Generated messages and services, in modules that mirror the protobuf packages.
pub mod pb {
    /// Package `containerd.*`.
    pub mod containerd {
        /// Package `containerd.types`.
        pub mod types {
            #![allow(missing_debug_implementations, clippy::all, rust_2018_idioms)]
            tonic::include_proto!("containerd.types");
        }

        /// Package `containerd.services.*`.
        pub mod services {
            /// Package `containerd.services.snapshots.*`.
            pub mod snapshots {
                /// Package `containerd.services.snapshots.v1`.
                pub mod v1 {
                    #![allow(missing_debug_implementations, clippy::all, rust_2018_idioms)]
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }

    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}
