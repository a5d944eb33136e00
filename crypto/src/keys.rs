//! Keys as intent. `cryptoKeys/{id}` holds an algorithm and the key's material wrapped (AES-256-KW) with the
//! agent's key-encryption key, which lives outside the data directory: the intent log, its copies and its
//! dumps hold no usable key. Material is checked when imported ([`check_material`]), unwrapped only to build a
//! cipher, and never leaves through the API.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dpu_intent::{Resource, Store};
use serde::{Deserialize, Serialize};

use crate::kek::Kek;
use crate::{CryptoError, Secret};

/// What a key is for; fixes its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAlgorithm {
    /// Two AES-256 keys (data, tweak): dm-crypt's `aes-xts-plain64` with `--key-size 512`.
    Aes256Xts,
    Aes128Gcm,
    Aes256Gcm,
    /// ESP's AES-GCM keying material (RFC 4106): a 16-byte key and the 4-byte salt, as `ip xfrm state … aead
    /// 'rfc4106(gcm(aes))' 0x<40 hex digits> 128` takes it.
    Aes128GcmEsp,
    /// As [`KeyAlgorithm::Aes128GcmEsp`] with a 32-byte key: 36 bytes.
    Aes256GcmEsp,
}

impl KeyAlgorithm {
    /// Bytes of material.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes256Xts => 64,
            Self::Aes128Gcm => 16,
            Self::Aes256Gcm => 32,
            Self::Aes128GcmEsp => 20,
            Self::Aes256GcmEsp => 36,
        }
    }

    /// Material that is not a multiple of 8 bytes is wrapped with padding (RFC 5649), the rest with RFC 3394.
    pub fn padded_wrap(self) -> bool {
        !self.key_len().is_multiple_of(8)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes256Xts => "aes-256-xts",
            Self::Aes128Gcm => "aes-128-gcm",
            Self::Aes256Gcm => "aes-256-gcm",
            Self::Aes128GcmEsp => "aes-128-gcm-esp",
            Self::Aes256GcmEsp => "aes-256-gcm-esp",
        }
    }
}

impl KeyAlgorithm {
    pub const ALL: [KeyAlgorithm; 5] =
        [Self::Aes256Xts, Self::Aes128Gcm, Self::Aes256Gcm, Self::Aes128GcmEsp, Self::Aes256GcmEsp];
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| KeyError::Algorithm(s.chars().take(64).collect()))
    }
}

/// `cryptoKeys/{id}`: the algorithm and the wrapped material.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySpec {
    pub algorithm: KeyAlgorithm,
    /// The material wrapped with the key-encryption key named by `kek`.
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
    /// [`Kek::id`] of the key-encryption key.
    pub kek: String,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec")
            .field("algorithm", &self.algorithm)
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .field("kek", &self.kek)
            .finish()
    }
}

impl Resource for KeySpec {
    const KIND: &'static str = "cryptoKeys";
}

/// Why a key cannot be imported or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown key algorithm {0:?} (aes-256-xts, aes-128-gcm, aes-256-gcm, aes-128-gcm-esp, aes-256-gcm-esp)")]
    Algorithm(String),
    #[error("{algorithm} keys are {want} bytes, got {len}")]
    Length { algorithm: KeyAlgorithm, len: usize, want: usize },
    #[error("the two halves of an AES-XTS key must differ (IEEE 1619)")]
    EqualHalves,
    #[error("cryptoKeys/{0} does not exist")]
    Missing(String),
    #[error("cryptoKeys/{id} is an {is} key, not {want}")]
    WrongAlgorithm { id: String, is: KeyAlgorithm, want: String },
    #[error(
        "the key was wrapped with key-encryption key {stored}, the agent has {ours}: restore the agent's \
         key-encryption key file"
    )]
    WrongKek { stored: String, ours: String },
    #[error("the key-encryption key {0} is missing: keys in the intent log cannot be unwrapped without it")]
    NoKek(PathBuf),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("reading the key: {0}")]
    Store(dpu_intent::Error),
}

/// Checks imported material against its algorithm: the length, and for XTS two different halves.
pub fn check_material(algorithm: KeyAlgorithm, material: &[u8]) -> Result<(), KeyError> {
    let want = algorithm.key_len();
    if material.len() != want {
        return Err(KeyError::Length { algorithm, len: material.len(), want });
    }
    if algorithm == KeyAlgorithm::Aes256Xts {
        let (a, b) = material.split_at(32);
        // Not secret-dependent timing worth hiding: equality of the halves is a property of a bad key.
        if a == b {
            return Err(KeyError::EqualHalves);
        }
    }
    Ok(())
}

/// Seals and unseals key material with the agent's key-encryption key. The key-encryption key file is read at
/// open when it exists and created when the first key is sealed, so an agent that holds no key has no file.
#[derive(Clone)]
pub struct Keys {
    path: PathBuf,
    kek: Arc<Mutex<Option<Arc<Kek>>>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("path", &self.path).field("kek", &self.kek_id()).finish()
    }
}

impl Keys {
    /// Keys wrapped with the key-encryption key at `path`: loaded now if the file exists (a file with wrong
    /// permissions or size is an error now, not at first use).
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        let kek = match std::fs::symlink_metadata(path) {
            Ok(_) => Some(Arc::new(Kek::load_or_create(path)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => Some(Arc::new(Kek::load_or_create(path)?)),
        };
        Ok(Self { path: path.to_owned(), kek: Arc::new(Mutex::new(kek)) })
    }

    /// Keys wrapped with `kek` (tests, and platforms whose key store hands the key over).
    pub fn with_kek(kek: Kek) -> Self {
        Self { path: PathBuf::new(), kek: Arc::new(Mutex::new(Some(Arc::new(kek)))) }
    }

    fn loaded(&self) -> Option<Arc<Kek>> {
        self.kek.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The key-encryption key, created on first use.
    fn kek_for_sealing(&self) -> Result<Arc<Kek>, KeyError> {
        let mut kek = self.kek.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(k) = kek.as_ref() {
            return Ok(k.clone());
        }
        let created = Arc::new(Kek::load_or_create(&self.path)?);
        *kek = Some(created.clone());
        Ok(created)
    }

    /// Id of the key-encryption key, once there is one.
    pub fn kek_id(&self) -> Option<String> {
        self.loaded().map(|k| k.id())
    }

    /// Checks `material` and wraps it into a storable spec. Wrapping is deterministic, so importing the same
    /// material twice gives the same spec (an idempotent create).
    pub fn seal(&self, algorithm: KeyAlgorithm, material: &Secret) -> Result<KeySpec, KeyError> {
        check_material(algorithm, material.expose())?;
        let kek = self.kek_for_sealing()?;
        let wrapped = if algorithm.padded_wrap() { kek.wrap_padded(material)? } else { kek.wrap(material)? };
        Ok(KeySpec { algorithm, wrapped, kek: kek.id() })
    }

    /// New random material for `algorithm`, sealed (it never leaves the agent).
    pub fn generate(&self, algorithm: KeyAlgorithm) -> Result<KeySpec, KeyError> {
        loop {
            let material = Secret::generate(algorithm.key_len())?;
            match self.seal(algorithm, &material) {
                Err(KeyError::EqualHalves) => continue,
                sealed => return sealed,
            }
        }
    }

    /// The material of a stored key.
    pub fn unseal(&self, spec: &KeySpec) -> Result<Secret, KeyError> {
        let kek = self.loaded().ok_or_else(|| KeyError::NoKek(self.path.clone()))?;
        let ours = kek.id();
        if spec.kek != ours {
            return Err(KeyError::WrongKek { stored: spec.kek.clone(), ours });
        }
        let material =
            if spec.algorithm.padded_wrap() { kek.unwrap_padded(&spec.wrapped)? } else { kek.unwrap(&spec.wrapped)? };
        check_material(spec.algorithm, material.expose())?;
        Ok(material)
    }

    /// The material of `cryptoKeys/{id}`, which must be an AES-256-XTS key.
    pub fn xts_key(&self, store: &Store, id: &str) -> Result<Secret, KeyError> {
        self.material(store, id, &[KeyAlgorithm::Aes256Xts]).map(|(_, m)| m)
    }

    /// The algorithm and material of `cryptoKeys/{id}`, whose algorithm must be one of `accepted`.
    pub fn material(
        &self,
        store: &Store,
        id: &str,
        accepted: &[KeyAlgorithm],
    ) -> Result<(KeyAlgorithm, Secret), KeyError> {
        let spec = match store.get::<KeySpec>(id) {
            Ok(stored) => stored.spec,
            Err(dpu_intent::Error::NotFound { .. }) => return Err(KeyError::Missing(id.to_owned())),
            Err(e) => return Err(KeyError::Store(e)),
        };
        if !accepted.contains(&spec.algorithm) {
            let want = accepted.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(" or ");
            return Err(KeyError::WrongAlgorithm { id: id.to_owned(), is: spec.algorithm, want });
        }
        Ok((spec.algorithm, self.unseal(&spec)?))
    }
}

/// Bytes as a hex string in the intent log.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            text.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if !text.len().is_multiple_of(2) {
            return Err(D::Error::custom("odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16).map_err(D::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::with_kek(Kek::from_secret(Secret::new(vec![7; 32])).unwrap())
    }

    fn xts_material() -> Secret {
        Secret::new((0..64).collect())
    }

    #[test]
    fn material_is_checked() {
        assert!(matches!(check_material(KeyAlgorithm::Aes256Xts, &[1; 32]), Err(KeyError::Length { .. })));
        assert!(matches!(check_material(KeyAlgorithm::Aes256Xts, &[1; 64]), Err(KeyError::EqualHalves)));
        assert!(check_material(KeyAlgorithm::Aes256Xts, xts_material().expose()).is_ok());
        assert!(check_material(KeyAlgorithm::Aes128Gcm, &[1; 16]).is_ok());
        assert!(check_material(KeyAlgorithm::Aes256Gcm, &[1; 16]).is_err());
        assert!("aes-256-xts".parse::<KeyAlgorithm>().is_ok());
        let e = "des".parse::<KeyAlgorithm>().unwrap_err().to_string();
        assert!(e.contains("aes-256-xts"), "{e}");
    }

    #[test]
    fn sealed_keys_hold_no_material_and_round_trip() {
        let keys = keys();
        let material = xts_material();
        let spec = keys.seal(KeyAlgorithm::Aes256Xts, &material).unwrap();
        assert_eq!(spec, keys.seal(KeyAlgorithm::Aes256Xts, &material).unwrap(), "deterministic");
        let stored = serde_json::to_string(&spec).unwrap();
        let hex: String = material.expose().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!stored.contains(&hex[..16]), "{stored}");
        assert!(!format!("{spec:?}").contains(&hex[..16]));
        let back: KeySpec = serde_json::from_str(&stored).unwrap();
        assert_eq!(keys.unseal(&back).unwrap().expose(), material.expose());
    }

    #[test]
    fn esp_keys_of_every_length_round_trip() {
        let keys = keys();
        for algorithm in KeyAlgorithm::ALL {
            let material = Secret::new((0..algorithm.key_len()).map(|i| i as u8 ^ 0x5a).collect());
            let spec = keys.seal(algorithm, &material).unwrap();
            assert_eq!(keys.unseal(&spec).unwrap().expose(), material.expose(), "{algorithm}");
            assert_eq!(algorithm.padded_wrap(), algorithm.key_len() % 8 != 0);
        }
        assert_eq!("aes-256-gcm-esp".parse::<KeyAlgorithm>().unwrap(), KeyAlgorithm::Aes256GcmEsp);
    }

    #[test]
    fn another_kek_is_named() {
        let spec = keys().seal(KeyAlgorithm::Aes256Xts, &xts_material()).unwrap();
        let other = Keys::with_kek(Kek::from_secret(Secret::new(vec![8; 32])).unwrap());
        let e = other.unseal(&spec).unwrap_err();
        assert!(matches!(e, KeyError::WrongKek { .. }), "{e}");
        // A spec whose kek id was forged still fails the unwrap's integrity check.
        let forged = KeySpec { kek: other.kek_id().unwrap(), ..spec };
        assert!(matches!(other.unseal(&forged), Err(KeyError::Crypto(_))));
    }

    #[test]
    fn store_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys = keys();
        store.create("disk", keys.seal(KeyAlgorithm::Aes256Xts, &xts_material()).unwrap()).unwrap();
        store.create("gcm", keys.generate(KeyAlgorithm::Aes128Gcm).unwrap()).unwrap();
        assert_eq!(keys.xts_key(&store, "disk").unwrap().expose(), xts_material().expose());
        assert!(matches!(keys.xts_key(&store, "nope"), Err(KeyError::Missing(_))));
        assert!(matches!(keys.xts_key(&store, "gcm"), Err(KeyError::WrongAlgorithm { .. })));
    }

    #[test]
    fn the_kek_file_appears_with_the_first_key_and_is_required_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.kek");
        let keys = Keys::open(&path).unwrap();
        assert!(keys.kek_id().is_none() && !path.exists(), "no key, no key-encryption key");
        let spec = keys.seal(KeyAlgorithm::Aes256Xts, &xts_material()).unwrap();
        assert!(path.exists());
        let reopened = Keys::open(&path).unwrap();
        assert_eq!(reopened.kek_id(), keys.kek_id());
        assert_eq!(reopened.unseal(&spec).unwrap().expose(), xts_material().expose());
        std::fs::remove_file(&path).unwrap();
        let lost = Keys::open(&path).unwrap();
        assert!(matches!(lost.unseal(&spec), Err(KeyError::NoKek(_))));
    }
}
