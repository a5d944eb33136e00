use std::path::PathBuf;

/// What went wrong in a crypto operation. Messages name the offending length, file or setting, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A key of the wrong size was given.
    #[error("{what} must be {expected} bytes, got {actual}")]
    KeyLength { what: &'static str, expected: usize, actual: usize },
    /// The two halves of an AES-256-XTS key are equal.
    #[error("the AES-256-XTS key's two 32-byte halves are equal; IEEE 1619-2018 and FIPS 140 require Key1 != Key2")]
    XtsEqualHalves,
    /// Data handed to the cipher is not made of whole AES blocks or whole data units.
    #[error("{0}")]
    DataLength(String),
    /// A data unit number past 2^64 - 1 would be needed.
    #[error("data units {first} + {count} run past the last data unit number (2^64 - 1)")]
    DataUnitOverflow { first: u64, count: u64 },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Random,
    /// The key-encryption key file cannot be used.
    #[error("key-encryption key {}: {reason}", path.display())]
    KekFile { path: PathBuf, reason: String },
    /// Reading or writing the key-encryption key file failed.
    #[error("key-encryption key {}: {op}: {source}", path.display())]
    KekIo {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The wrapped key has a length AES key wrap cannot produce, or the key to wrap has one it cannot take.
    #[error("{0}")]
    WrapLength(String),
    /// The wrapped key's integrity check failed.
    #[error("the wrapped key does not unwrap with this key-encryption key (wrong KEK or corrupted data)")]
    Unwrap,
    /// The policy requires hardware and none can do the work.
    #[error("{0}")]
    HardwareRequired(String),
    /// A crypto policy name is not known.
    #[error("unknown crypto policy {0:?}; accepted: require-hardware, prefer-hardware, software")]
    UnknownPolicy(String),
}
