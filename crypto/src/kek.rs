//! The key-encryption key: 32 random bytes in a file readable only by the agent, kept outside the data
//! directory, that wraps every key stored in the intent log with AES-256 key wrap (RFC 3394). The file is
//! created with O_EXCL and mode 0600, fsynced with its directory; a file any other user can read, a symlink or
//! a file of the wrong size is refused, naming the path.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use aes_kw::cipher::{Array, KeyInit};
use aes_kw::{KwAes256, KwpAes256};
use zeroize::Zeroizing;

use crate::{CryptoError, Secret};

/// Bytes of the key-encryption key (AES-256).
pub const KEK_LEN: usize = 32;
/// The integrity check value AES key wrap prepends.
const WRAP_OVERHEAD: usize = 8;

/// The key-encryption key. Its key schedule is zeroized when dropped; `Debug` shows only its id.
pub struct Kek {
    wrap: KwAes256,
    /// RFC 5649 (key wrap with padding) under the same key, for material that is not a multiple of 8 bytes.
    wrap_padded: KwpAes256,
    id: String,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Kek {
    /// Reads the key-encryption key at `path`, or creates it (32 random bytes, mode 0600) when there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, CryptoError> {
        match Self::load(path) {
            Err(CryptoError::KekIo { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let secret = Secret::generate(KEK_LEN)?;
        let io = |op: &'static str| move |source| CryptoError::KekIo { path: path.to_owned(), op, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("creating its directory"))?;
        }
        // Written whole under a private name, then linked into place: a crash leaves either no key file or a
        // complete one, and an agent racing this one links second, fails, and reads the winner's.
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{}.tmp", std::process::id()));
        let temporary = path.with_file_name(name);
        let _ = fs::remove_file(&temporary);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| file.write_all(secret.expose()).and_then(|()| file.sync_all()));
        let linked = written.and_then(|()| fs::hard_link(&temporary, path));
        let _ = fs::remove_file(&temporary);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load(path),
            Err(e) => return Err(io("creating")(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing its directory"))?;
        }
        Self::from_secret(secret)
    }

    /// Reads an existing key-encryption key file.
    fn load(path: &Path) -> Result<Self, CryptoError> {
        let refuse = |reason: String| CryptoError::KekFile { path: path.to_owned(), reason };
        let io = |op: &'static str| move |source| CryptoError::KekIo { path: path.to_owned(), op, source };
        let meta = fs::symlink_metadata(path).map_err(io("reading"))?;
        if meta.file_type().is_symlink() {
            return Err(refuse("is a symbolic link; point crypto.kek_file at the file itself".into()));
        }
        if !meta.is_file() {
            return Err(refuse("is not a regular file".into()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(refuse(format!("has mode {mode:04o}; it must be readable by its owner only (chmod 600)")));
        }
        if meta.uid() != nix_uid() {
            return Err(refuse(format!("belongs to uid {}, not to the agent's uid {}", meta.uid(), nix_uid())));
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(KEK_LEN + 1));
        File::open(path).and_then(|f| f.take(KEK_LEN as u64 + 1).read_to_end(&mut bytes)).map_err(io("reading"))?;
        if bytes.len() != KEK_LEN {
            return Err(refuse(format!("holds {} bytes, not {KEK_LEN}", bytes.len())));
        }
        Self::from_secret(Secret::new(std::mem::take(&mut *bytes)))
    }

    /// A key-encryption key from its 32 bytes.
    pub fn from_secret(key: Secret) -> Result<Self, CryptoError> {
        let Ok(bytes) = <&Array<u8, _>>::try_from(key.expose()) else {
            return Err(CryptoError::KeyLength { what: "a key-encryption key", expected: KEK_LEN, actual: key.len() });
        };
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"dpu-agent kek v1");
        context.update(key.expose());
        let digest = context.finish();
        let id = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { wrap: KwAes256::new(bytes), wrap_padded: KwpAes256::new(bytes), id })
    }

    /// 16 hex digits identifying the key (a hash of it), stored beside what it wraps.
    pub fn id(&self) -> String {
        self.id.clone()
    }

    /// Wraps `key` (a multiple of 8 bytes, at least 16).
    pub fn wrap(&self, key: &Secret) -> Result<Vec<u8>, CryptoError> {
        if key.len() < 16 || !key.len().is_multiple_of(8) {
            return Err(CryptoError::WrapLength(format!(
                "a key to wrap must be a multiple of 8 bytes and at least 16, got {}",
                key.len()
            )));
        }
        let mut out = vec![0; key.len() + WRAP_OVERHEAD];
        self.wrap
            .wrap_key(key.expose(), &mut out)
            .map_err(|e| CryptoError::WrapLength(format!("wrapping a {}-byte key: {e}", key.len())))?;
        Ok(out)
    }

    /// Wraps `key` of any length from 1 byte with padding (RFC 5649), for material that is not a multiple of 8
    /// bytes (ESP keys with their 4-byte salt).
    pub fn wrap_padded(&self, key: &Secret) -> Result<Vec<u8>, CryptoError> {
        if key.is_empty() {
            return Err(CryptoError::WrapLength("an empty key cannot be wrapped".into()));
        }
        let mut out = vec![0; key.len().next_multiple_of(8) + WRAP_OVERHEAD];
        let n = self
            .wrap_padded
            .wrap_key(key.expose(), &mut out)
            .map_err(|e| CryptoError::WrapLength(format!("wrapping a {}-byte key: {e}", key.len())))?
            .len();
        out.truncate(n);
        Ok(out)
    }

    /// Unwraps a key wrapped by [`Kek::wrap_padded`] with this key; anything else fails the integrity check.
    pub fn unwrap_padded(&self, wrapped: &[u8]) -> Result<Secret, CryptoError> {
        if wrapped.len() < 2 * WRAP_OVERHEAD || !wrapped.len().is_multiple_of(8) {
            return Err(CryptoError::WrapLength(format!(
                "a padded wrapped key is a multiple of 8 bytes and at least 16, got {}",
                wrapped.len()
            )));
        }
        let mut out = Secret::new(vec![0; wrapped.len() - WRAP_OVERHEAD]);
        let n = self.wrap_padded.unwrap_key(wrapped, out.expose_mut()).map_err(|_| CryptoError::Unwrap)?.len();
        out.truncate(n);
        Ok(out)
    }

    /// Unwraps a key wrapped by [`Kek::wrap`] with this key; anything else fails the integrity check.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<Secret, CryptoError> {
        if wrapped.len() < 16 + WRAP_OVERHEAD || !wrapped.len().is_multiple_of(8) {
            return Err(CryptoError::WrapLength(format!(
                "a wrapped key is a multiple of 8 bytes and at least 24, got {}",
                wrapped.len()
            )));
        }
        let mut out = Secret::new(vec![0; wrapped.len() - WRAP_OVERHEAD]);
        self.wrap.unwrap_key(wrapped, out.expose_mut()).map_err(|_| CryptoError::Unwrap)?;
        Ok(out)
    }
}

fn nix_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    const KEK_256: &str = "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F";

    #[test]
    fn rfc3394_vectors() {
        let kek = Kek::from_secret(Secret::new(hex(KEK_256))).unwrap();
        // 4.3: 128 bits of key data with a 256-bit KEK.
        let data = Secret::new(hex("00112233445566778899AABBCCDDEEFF"));
        let want = hex("64E8C3F9CE0F5BA263E9777905818A2A93C8191E7D6E8AE7");
        assert_eq!(kek.wrap(&data).unwrap(), want);
        assert_eq!(kek.unwrap(&want).unwrap().expose(), data.expose());
        // 4.6: 256 bits of key data with a 256-bit KEK.
        let data = Secret::new(hex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F"));
        let want = hex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21");
        assert_eq!(kek.wrap(&data).unwrap(), want);
        assert_eq!(kek.unwrap(&want).unwrap().expose(), data.expose());
    }

    #[test]
    fn unwrap_refuses_another_kek_corruption_and_bad_lengths() {
        let kek = Kek::from_secret(Secret::new(vec![1; 32])).unwrap();
        let other = Kek::from_secret(Secret::new(vec![2; 32])).unwrap();
        assert_ne!(kek.id(), other.id());
        let wrapped = kek.wrap(&Secret::new((0..64).collect())).unwrap();
        assert!(matches!(other.unwrap(&wrapped), Err(CryptoError::Unwrap)));
        let mut flipped = wrapped.clone();
        flipped[20] ^= 1;
        assert!(matches!(kek.unwrap(&flipped), Err(CryptoError::Unwrap)));
        assert!(matches!(kek.unwrap(&wrapped[..20]), Err(CryptoError::WrapLength(_))));
        assert!(matches!(kek.wrap(&Secret::new(vec![0; 12])), Err(CryptoError::WrapLength(_))));
        assert!(Kek::from_secret(Secret::new(vec![0; 16])).is_err());
        let shown = format!("{kek:?}");
        assert!(shown.contains(&kek.id()) && !shown.contains("[1, 1"), "{shown}");
    }

    #[test]
    fn the_file_is_created_private_reloaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.kek");
        let kek = Kek::load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEK_LEN as u64);
        assert_eq!(fs::metadata(dir.path().join("sub")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(Kek::load_or_create(&path).unwrap().id(), kek.id(), "the same key when reloaded");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Kek::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("agent.kek"), "{e}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

        let link = dir.path().join("link.kek");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(Kek::load_or_create(&link).unwrap_err().to_string().contains("symbolic link"));

        let short = dir.path().join("short.kek");
        fs::write(&short, [0u8; 16]).unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Kek::load_or_create(&short).unwrap_err().to_string().contains("16 bytes"));
    }
}
