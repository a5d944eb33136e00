//! The agent's cryptography: AES-256-XTS for encrypted volumes ([`xts`]), the key-encryption key that wraps
//! volume keys at rest ([`kek`]), keys as intent ([`keys`]), and where crypto work runs — offload engine or the agent's cores ([`policy`]).
//!
//! Key material lives in [`Secret`]s and in cipher states that are zeroized when dropped; no type here prints,
//! serializes or reports key bytes in errors.

pub mod kek;
pub mod keys;
#[cfg(target_os = "linux")]
pub mod ktls;
pub mod policy;
pub mod xts;

mod error;
mod secret;

pub use error::CryptoError;
pub use secret::Secret;
