//! Durable desired-state ("intent") storage and the reconcile driver of the DPU agent.
//!
//! Every object the API accepts is written to the [`Store`] (an fsynced append-only log) before the
//! RPC returns. One [`reconcile::Controller`] per data path then converges the real system towards it
//! and publishes per-object status on a [`reconcile::StatusBoard`].
//!
//! ```
//! use dpu_intent::{Created, Resource, Store};
//!
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
//! struct Volume {
//!     size_bytes: u64,
//! }
//! impl Resource for Volume {
//!     const KIND: &'static str = "volumes";
//! }
//!
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let created = store.create("vol-1", Volume { size_bytes: 1 << 30 })?;
//! assert!(matches!(created, Created::New(ref v) if v.meta.generation == 1));
//! let page = store.list::<Volume>(0, None)?;
//! assert_eq!(page.items.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod events;
pub mod listen;
mod log;
pub mod poll;
pub mod reconcile;
mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use store::{Batch, Store};

/// An intent value that breaks a rule, naming the field (`volume.block_size`, `cluster.endpoints[2].address`).
/// The API maps it to `InvalidArgument` with the field in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

/// `Err(Invalid)` for `field`, for validators that return early.
pub fn invalid<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid { field: field.into(), message: message.into() })
}

/// A typed collection stored in the intent store, following Google AIP resource naming.
pub trait Resource: Serialize + serde::de::DeserializeOwned + PartialEq + Clone + Send + Sync + 'static {
    /// Collection name, e.g. "volumes"; also the first segment of the resource name "volumes/{id}".
    const KIND: &'static str;
}

/// Bookkeeping the store keeps for every object.
///
/// Times are milliseconds since the Unix epoch (UTC) taken from the system clock at commit time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// 1 on create, incremented by every write that changes the spec.
    pub generation: u64,
    /// Store revision of the write that created the object.
    pub create_revision: u64,
    /// Store revision of the last write that changed the object.
    pub update_revision: u64,
    /// Creation time, Unix milliseconds.
    pub create_time: u64,
    /// Time of the last change, Unix milliseconds.
    pub update_time: u64,
}

/// A typed object as stored: its id, its spec and the store's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    /// The id within the collection (the `{id}` of `"{KIND}/{id}"`).
    pub id: String,
    /// The desired state.
    pub spec: T,
    /// Generation, revisions and times.
    pub meta: Meta,
}

/// Outcome of [`Store::create`].
#[derive(Debug, Clone, PartialEq)]
pub enum Created<T> {
    /// The object did not exist and was written.
    New(Stored<T>),
    /// An identical object already existed; nothing was written (idempotent retry).
    Unchanged(Stored<T>),
}

impl<T> Created<T> {
    /// The stored object, whichever way it came about.
    pub fn into_stored(self) -> Stored<T> {
        match self {
            Created::New(s) | Created::Unchanged(s) => s,
        }
    }
}

/// One page of [`Store::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// Objects ordered by id.
    pub items: Vec<Stored<T>>,
    /// Token for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Errors of the intent store. `kind` and `id` fields name the object concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not exist (gRPC NOT_FOUND).
    #[error("{kind}/{id} does not exist")]
    NotFound { kind: String, id: String },
    /// An object with that id exists with a different spec (gRPC ALREADY_EXISTS).
    #[error("{kind}/{id} already exists with a different spec")]
    AlreadyExists { kind: String, id: String },
    /// Optimistic concurrency failed: the object changed since it was read (gRPC ABORTED).
    #[error("{kind}/{id} is at generation {actual}, not the expected generation {expected}")]
    Conflict {
        kind: String,
        id: String,
        /// Generation the caller expected.
        expected: u64,
        /// Generation in the store.
        actual: u64,
    },
    /// The id breaks the AIP-122 naming rules (gRPC INVALID_ARGUMENT).
    #[error("the id {id:?} is invalid: it {rule}")]
    InvalidId {
        /// The rejected id.
        id: String,
        /// The rule that failed.
        rule: &'static str,
    },
    /// The page token does not decode or belongs to another collection or store (gRPC INVALID_ARGUMENT).
    #[error("the page token is invalid: {reason}")]
    InvalidPageToken {
        /// Why it was rejected.
        reason: String,
    },
    /// An object could not be converted to or from JSON.
    #[error("{kind}/{id} could not be converted to or from JSON: {source}")]
    Json {
        kind: String,
        id: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The intent log failed validation on open; the file was left untouched.
    #[error("the intent log {} is corrupt at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// Offset of the bad header or record.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// Another process holds the data directory.
    #[error("the data directory {} is locked by another agent process", dir.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// The store was released to the agent process taking over (an upgrade): writes go to that process once it
    /// serves (gRPC UNAVAILABLE: retry).
    #[error("the data directory {} is being handed over to a new agent process; retry shortly", dir.display())]
    Released {
        /// The data directory.
        dir: PathBuf,
    },
    /// A write would produce a log record larger than the format allows.
    #[error("a write of {size} bytes exceeds the maximum record size")]
    TooLarge {
        /// Encoded size in bytes.
        size: usize,
    },
    /// A filesystem operation failed. After a failed write the outcome of that write is unknown
    /// until the store is reopened; the next write first rewrites the log from memory.
    #[error("I/O on {} failed: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks an id against AIP-122: 1–63 characters of lowercase letters, digits and hyphens, starting
/// with a letter and not ending with a hyphen.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let rule = if id.is_empty() {
        Some("must not be empty")
    } else if id.len() > 63 {
        Some("must be at most 63 characters long")
    } else if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lowercase letter")
    } else if !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("must contain only lowercase letters, digits and hyphens")
    } else if id.ends_with('-') {
        Some("must not end with a hyphen")
    } else {
        None
    };
    match rule {
        Some(rule) => Err(Error::InvalidId { id: id.to_owned(), rule }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        for ok in ["a", "vol-1", "a1b2", &"x".repeat(63)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for (bad, rule) in [
            ("", "empty"),
            (&"x".repeat(64) as &str, "63"),
            ("1abc", "start"),
            ("-abc", "start"),
            ("aBc", "only"),
            ("a_b", "only"),
            ("abc-", "end"),
        ] {
            let err = validate_id(bad).expect_err(bad).to_string();
            assert!(err.contains(rule), "{bad}: {err}");
        }
    }
}
