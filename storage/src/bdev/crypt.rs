//! The encrypted volume: AES-256-XTS over any other volume (its base), in the layout of dm-crypt's plain mode
//! with `aes-xts-plain64`. Data unit `n` of the volume (512 or 4096 bytes, dividing the block size) is encrypted
//! with the tweak `n`; the base holds only ciphertext, so `cryptsetup open --type plain --cipher aes-xts-plain64
//! --key-size 512` (plus `--sector-size 4096 --iv-large-sectors` for 4096-byte units) opens the base's bytes.
//!
//! The cipher runs inline on the I/O's task, in the buffer the I/O owns: reads decrypt after the base's read,
//! writes encrypt before the base's write (the buffer comes back holding ciphertext). A 4 KiB unit costs well
//! under a microsecond on a core with AES instructions, less than handing it to another thread would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dpu_crypto::CryptoError;
use dpu_crypto::policy::{Placement, Policy};
use dpu_crypto::xts::XtsCipher;

use super::{BufResult, Geometry, IoFuture, SharedVolume, Volume, VolumeError};

/// Why volume encryption has no hardware placement in this build.
pub const NO_XTS_OFFLOAD: &str = "no AES-XTS offload engine is available to the agent (crypto-enabled BlueField \
     parts expose one through SPDK's accel_mlx5, which this build does not use)";

/// Where an encrypted volume with `policy` runs here: on the agent's cores, with the CPU's AES instructions
/// where present; refused when the policy requires hardware.
pub fn placement(policy: Policy) -> Result<Placement, CryptoError> {
    dpu_crypto::policy::place(policy, None, NO_XTS_OFFLOAD, dpu_crypto::xts::engine().name())
}

/// Bytes of encrypted zeroes written per base write when zeroing or deallocating a range.
const ZERO_RUN: usize = 1 << 20;

/// The encrypted volumes the target serves, by volume id: what each one's engine has done, for metrics.
#[derive(Debug, Clone, Default)]
pub struct EncryptedVolumes(Arc<std::sync::RwLock<std::collections::BTreeMap<String, Arc<EncryptedVolume>>>>);

impl EncryptedVolumes {
    pub(crate) fn insert(&self, id: &str, volume: Arc<EncryptedVolume>) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.to_owned(), volume);
    }

    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|id, _| keep(id));
    }

    /// Every encrypted volume: id, engine, bytes encrypted, bytes decrypted.
    pub fn snapshot(&self) -> Vec<(String, dpu_crypto::xts::Engine, u64, u64)> {
        let map = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter()
            .map(|(id, v)| {
                let (encrypted, decrypted) = v.bytes();
                (id.clone(), v.engine(), encrypted, decrypted)
            })
            .collect()
    }
}

/// AES-256-XTS over a base volume.
pub struct EncryptedVolume {
    base: SharedVolume,
    cipher: Arc<XtsCipher>,
    data_unit: usize,
    /// Data units per block.
    units_per_block: u64,
    /// Bytes encrypted and decrypted, for what the engine actually did.
    encrypted: AtomicU64,
    decrypted: AtomicU64,
}

impl std::fmt::Debug for EncryptedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedVolume")
            .field("base", &self.base.kind())
            .field("engine", &self.cipher.engine().name())
            .field("data_unit", &self.data_unit)
            .finish_non_exhaustive()
    }
}

/// Why an encrypted volume cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum EncryptedError {
    #[error("data unit {data_unit} is not 512 or 4096 bytes dividing the base's {block_size}-byte blocks")]
    DataUnit { data_unit: u32, block_size: u32 },
}

impl EncryptedVolume {
    pub fn new(base: SharedVolume, cipher: Arc<XtsCipher>, data_unit: u32) -> Result<Self, EncryptedError> {
        let block_size = base.geometry().block_size;
        if !matches!(data_unit, 512 | 4096) || !block_size.is_multiple_of(data_unit) {
            return Err(EncryptedError::DataUnit { data_unit, block_size });
        }
        Ok(Self {
            base,
            cipher,
            data_unit: data_unit as usize,
            units_per_block: u64::from(block_size / data_unit),
            encrypted: AtomicU64::new(0),
            decrypted: AtomicU64::new(0),
        })
    }

    /// The AES implementation this volume's cipher runs on.
    pub fn engine(&self) -> dpu_crypto::xts::Engine {
        self.cipher.engine()
    }

    /// Bytes (encrypted, decrypted) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.encrypted.load(Ordering::Relaxed), self.decrypted.load(Ordering::Relaxed))
    }

    fn first_unit(&self, lba: u64) -> u64 {
        lba * self.units_per_block
    }

    fn encrypt(&self, lba: u64, buf: &mut [u8]) {
        // The geometry check before this guarantees whole blocks, so whole data units.
        self.cipher.encrypt_units(self.first_unit(lba), self.data_unit, buf).expect("whole data units");
        self.encrypted.fetch_add(buf.len() as u64, Ordering::Relaxed);
    }

    fn decrypt(&self, lba: u64, buf: &mut [u8]) {
        self.cipher.decrypt_units(self.first_unit(lba), self.data_unit, buf).expect("whole data units");
        self.decrypted.fetch_add(buf.len() as u64, Ordering::Relaxed);
    }

    /// Writes encrypted zeroes over `blocks` blocks from `lba`, a run at a time.
    async fn zero(&self, lba: u64, blocks: u64) -> Result<(), VolumeError> {
        let g = self.geometry();
        let end = lba.checked_add(blocks).filter(|&e| e <= g.blocks).ok_or(VolumeError::OutOfRange {
            start: lba,
            end: lba.saturating_add(blocks),
            capacity: g.blocks,
        })?;
        let run_blocks = (ZERO_RUN / g.block_size as usize) as u64;
        let mut at = lba;
        let mut buf = Vec::new();
        while at < end {
            let n = run_blocks.min(end - at);
            buf.clear();
            buf.resize(n as usize * g.block_size as usize, 0);
            self.encrypt(at, &mut buf);
            let (back, r) = self.base.write(at, std::mem::take(&mut buf)).await;
            r?;
            buf = back;
            at += n;
        }
        Ok(())
    }
}

impl Volume for EncryptedVolume {
    fn kind(&self) -> &'static str {
        "encrypted"
    }

    fn geometry(&self) -> Geometry {
        self.base.geometry()
    }

    fn read(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            if let Err(e) = self.geometry().check(lba, buf.len()) {
                return (buf, Err(e));
            }
            let (mut buf, r) = self.base.read(lba, buf).await;
            if r.is_ok() {
                self.decrypt(lba, &mut buf);
            }
            (buf, r)
        })
    }

    fn write(&self, lba: u64, mut buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            if let Err(e) = self.geometry().check(lba, buf.len()) {
                return (buf, Err(e));
            }
            self.encrypt(lba, &mut buf);
            self.base.write(lba, buf).await
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>> {
        self.base.flush()
    }

    /// Deallocation is not passed down: the base would read back zeroes, which decrypt to noise. The range is
    /// written with encrypted zeroes instead, so it reads back as zeroes through this volume.
    fn discard(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(self.zero(lba, blocks))
    }

    fn volatile_write_cache(&self) -> bool {
        self.base.volatile_write_cache()
    }

    fn read_only(&self) -> bool {
        self.base.read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::MallocVolume;
    use dpu_crypto::Secret;

    fn key() -> Arc<XtsCipher> {
        let material: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
        Arc::new(XtsCipher::new(&Secret::new(material)).unwrap())
    }

    #[tokio::test]
    async fn behaves_as_a_volume() {
        for (block, unit) in [(512, 512), (4096, 4096), (4096, 512)] {
            let base: SharedVolume = Arc::new(MallocVolume::new(block, 64));
            let volume = EncryptedVolume::new(base, key(), unit).unwrap();
            crate::bdev::tests::conformance(&volume).await;
        }
    }

    #[tokio::test]
    async fn base_holds_ciphertext_in_plain64_layout() {
        let base: SharedVolume = Arc::new(MallocVolume::new(4096, 16));
        let cipher = key();
        let volume = EncryptedVolume::new(base.clone(), cipher.clone(), 512).unwrap();
        let plain: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        let (_, r) = volume.write(3, plain.clone()).await;
        r.unwrap();
        let (raw, r) = base.read(3, vec![0; 8192]).await;
        r.unwrap();
        assert_ne!(raw, plain, "the base must not hold plaintext");
        // Block 3 of 4096 bytes = 512-byte data units 24..40, each encrypted with its own number as the tweak.
        let mut expected = plain.clone();
        for (i, unit) in expected.chunks_mut(512).enumerate() {
            cipher.encrypt(24 + i as u64, unit).unwrap();
        }
        assert_eq!(raw, expected);
        let (back, r) = volume.read(3, vec![0; 8192]).await;
        r.unwrap();
        assert_eq!(back, plain);
        assert_eq!(volume.bytes(), (8192, 8192));
    }

    #[tokio::test]
    async fn zeroed_ranges_read_back_as_zeroes_and_are_not_zero_underneath() {
        let base: SharedVolume = Arc::new(MallocVolume::new(512, 4096));
        let volume = EncryptedVolume::new(base.clone(), key(), 512).unwrap();
        let (_, r) = volume.write(0, vec![0xa5; 512 * 4096]).await;
        r.unwrap();
        volume.write_zeroes(10, 3000).await.unwrap();
        let (back, r) = volume.read(0, vec![0xff; 512 * 4096]).await;
        r.unwrap();
        assert!(back[..10 * 512].iter().all(|&b| b == 0xa5));
        assert!(back[10 * 512..3010 * 512].iter().all(|&b| b == 0));
        assert!(back[3010 * 512..].iter().all(|&b| b == 0xa5));
        let (raw, r) = base.read(10, vec![0; 512]).await;
        r.unwrap();
        assert!(raw.iter().any(|&b| b != 0), "zeroes are stored encrypted");
        assert!(matches!(volume.discard(4000, 200).await, Err(VolumeError::OutOfRange { .. })));
    }

    #[test]
    fn data_unit_must_divide_the_block() {
        let base: SharedVolume = Arc::new(MallocVolume::new(512, 8));
        assert!(EncryptedVolume::new(base.clone(), key(), 4096).is_err());
        assert!(EncryptedVolume::new(base, key(), 1024).is_err());
    }
}
