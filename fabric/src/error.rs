//! The fabric crate's error type.

/// A fabric operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A netlink socket operation failed.
    #[error("netlink {operation} failed")]
    Socket {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a request; `message` is its extended acknowledgement when it gave one.
    #[error("the kernel refused {request}: {message} (errno {errno})")]
    Kernel { request: String, errno: i32, message: String },
    /// A message from the kernel could not be decoded.
    #[error("malformed netlink message: {0}")]
    Decode(String),
    /// A network device the rules need does not exist.
    #[error("network device {0:?} does not exist")]
    NoDevice(String),
    /// Reading the port inventory failed.
    #[error("reading the port inventory from {path} failed")]
    Inventory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The port mapping file is not valid.
    #[error("port mapping {path}: {message}")]
    Mapping { path: String, message: String },
}

impl FabricError {
    /// The kernel's errno for refusals, `None` for other failures.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<netlink_packet_core::DecodeError> for FabricError {
    fn from(e: netlink_packet_core::DecodeError) -> Self {
        Self::Decode(e.to_string())
    }
}
