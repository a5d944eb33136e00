//! NVMe and NVMe/TCP wire formats: pure data layouts, encoders and a framing decoder, with no I/O.
//!
//! - [`spec`]: NVMe Base Specification 2.0 and NVMe over Fabrics structures (commands, completions, status
//!   codes, controller properties, Identify data, log pages, features, NQNs).
//! - [`tcp`]: the NVMe/TCP Transport Specification 1.0 PDUs, CRC32C digests, an incremental decoder for a
//!   byte stream and header encoders.
//!
//! Every multi-byte field is little-endian on the wire; the structures use `zerocopy`'s little-endian
//! integer types, so parsing a received buffer is a checked cast and never depends on the host's byte order.
#![forbid(unsafe_code)]

pub mod spec;
pub mod tcp;

/// Errors building or reading NVMe data structures.
///
/// Faults in a received NVMe/TCP byte stream are reported by [`tcp::PduError`] instead, which carries what a
/// Terminate Connection Request needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string does not fit the fixed-size field it is written to.
    #[error("{field} is {len} bytes long, the field holds at most {max}")]
    FieldTooLong { field: &'static str, len: usize, max: usize },
    /// A string field accepts printable ASCII only.
    #[error("{field} contains a character that is not printable ASCII")]
    NotPrintableAscii { field: &'static str },
    /// An NVMe Qualified Name breaks the rules of the NVMe Base Specification ("NVMe Qualified Names").
    #[error("invalid NQN: {reason}")]
    InvalidNqn { reason: &'static str },
    /// A list handed to an encoder does not fit the data structure.
    #[error("{what} holds at most {max} entries, got {len}")]
    TooManyEntries { what: &'static str, len: usize, max: usize },
}
