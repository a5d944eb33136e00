use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::CryptoError;

/// Key material. Zeroized when dropped (the whole allocation, spare capacity included); `Debug` shows only the
/// length. There is deliberately no `Display`, `Clone` or serialization.
pub struct Secret(Vec<u8>);

impl Secret {
    /// Takes ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// `len` bytes from the operating system's random number generator.
    pub fn generate(len: usize) -> Result<Self, CryptoError> {
        let mut secret = Self(vec![0; len]);
        SystemRandom::new().fill(&mut secret.0).map_err(|_| CryptoError::Random)?;
        Ok(secret)
    }

    /// The key bytes, for handing to a cipher. Do not copy them anywhere that outlives the call.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The key bytes, for a cipher to fill in place.
    pub(crate) fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Shortens the material to `len` bytes, clearing the bytes cut off.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len < self.0.len() {
            self.0[len..].zeroize();
            self.0.truncate(len);
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_only_the_length() {
        let secret = Secret::new(vec![0xab; 32]);
        let shown = format!("{secret:?} {secret:#?}");
        assert_eq!(format!("{secret:?}"), "Secret(32 bytes)");
        assert!(!shown.to_lowercase().contains("ab,") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn generate_fills_from_the_rng() {
        let a = Secret::generate(64).unwrap();
        let b = Secret::generate(64).unwrap();
        assert_eq!(a.len(), 64);
        assert!(!a.is_empty());
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.expose(), &[0; 64][..]);
        assert!(Secret::generate(0).unwrap().is_empty());
    }
}
