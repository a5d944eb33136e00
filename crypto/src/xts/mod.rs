//! AES-256-XTS (IEEE 1619), in the layout of dm-crypt's `aes-xts-plain64`: the tweak of data unit `n` is `n` as
//! a 128-bit little-endian integer, encrypted with the second half of the key.
//!
//! A data unit is processed in three passes over memory that stays in the L1 cache: its tweaks are generated and
//! XORed in (see `whiten`), all its blocks go through the `aes` crate's ECB in one call (AES-NI, VAES or ARMv8
//! AES, pipelined over many blocks at once), and the tweaks are XORed in again. Data units smaller than a group
//! (4 KiB) are batched, so a multi-unit call makes one ECB call per 4 KiB whatever the unit size.

mod gf;
mod whiten;

use std::fmt;

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc};
use zeroize::Zeroize;

use crate::{CryptoError, Secret};
use whiten::Whitening;

/// AES-256-XTS key size: two AES-256 keys.
pub const KEY_LEN: usize = 64;
/// The AES block size; data units are whole blocks.
pub const BLOCK_LEN: usize = 16;

/// Bytes processed per pass: the size of the tweak scratch and of the largest ECB call.
const GROUP: usize = 4096;
/// Initial tweaks encrypted per call while batching small data units.
const TWEAK_BATCH: usize = 16;

/// Which AES implementation the `aes` crate runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    /// VAES on 512-bit registers (with AVX-512F).
    X86Vaes512,
    /// VAES on 256-bit registers.
    X86Vaes256,
    /// AES-NI.
    X86AesNi,
    /// The ARMv8 Cryptography Extensions.
    Armv8Aes,
    /// The `aes` crate's constant-time fixsliced software implementation.
    Software,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Self::X86Vaes512 => "x86-vaes512",
            Self::X86Vaes256 => "x86-vaes256",
            Self::X86AesNi => "x86-aesni",
            Self::Armv8Aes => "armv8-aes",
            Self::Software => "software",
        }
    }

    /// Whether the CPU's AES instructions do the work.
    pub fn cpu_instructions(self) -> bool {
        self != Self::Software
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// The same detection, in the same order, as the `aes` crate's (0.9) `encrypt_with_backend`.
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
cpufeatures::new!(cpu_aes, "aes");
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
cpufeatures::new!(cpu_vaes256, "vaes");
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
cpufeatures::new!(cpu_vaes512, "avx512f", "vaes");
#[cfg(all(target_arch = "aarch64", not(miri)))]
cpufeatures::new!(cpu_aes, "aes");

/// The AES implementation the `aes` crate runs on this CPU. `--cfg aes_backend="soft"` (which forces the `aes`
/// crate's software backend) is honoured as well.
#[allow(unexpected_cfgs, reason = "`aes_backend` is the `aes` crate's configuration flag, set through RUSTFLAGS")]
pub fn engine() -> Engine {
    if cfg!(aes_backend = "soft") {
        return Engine::Software;
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        if cpu_vaes512::get() {
            return Engine::X86Vaes512;
        }
        if cpu_vaes256::get() {
            return Engine::X86Vaes256;
        }
        if cpu_aes::get() {
            return Engine::X86AesNi;
        }
    }
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    if cpu_aes::get() {
        return Engine::Armv8Aes;
    }
    Engine::Software
}

/// An AES-256-XTS key, expanded. The round keys are zeroized when dropped.
pub struct XtsCipher {
    /// Encrypts and decrypts the data.
    data: Aes256,
    /// Encrypts the tweaks.
    tweak: Aes256Enc,
    engine: Engine,
    whitening: Whitening,
}

/// Which direction a call goes.
#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

impl XtsCipher {
    /// Expands a 64-byte key: Key1 (data) is the first half, Key2 (tweak) the second, as in dm-crypt and
    /// IEEE 1619. Equal halves are refused.
    pub fn new(key: &Secret) -> Result<Self, CryptoError> {
        let key = key.expose();
        if key.len() != KEY_LEN {
            return Err(CryptoError::KeyLength { what: "an AES-256-XTS key", expected: KEY_LEN, actual: key.len() });
        }
        let (key1, key2) = key.split_at(KEY_LEN / 2);
        // Compared without an early exit, so the time taken says nothing about the key.
        let difference = key1.iter().zip(key2).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(difference) == 0 {
            return Err(CryptoError::XtsEqualHalves);
        }
        let (Ok(key1), Ok(key2)) = (<&Array<u8, _>>::try_from(key1), <&Array<u8, _>>::try_from(key2)) else {
            unreachable!("the halves of a {KEY_LEN}-byte key are 32 bytes each");
        };
        Ok(Self {
            data: Aes256::new(key1),
            tweak: Aes256Enc::new(key2),
            engine: engine(),
            whitening: Whitening::detect(),
        })
    }

    /// The AES implementation this cipher runs on.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Encrypts one data unit in place: `buf` is the whole unit, a non-zero multiple of 16 bytes.
    pub fn encrypt(&self, data_unit: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(Direction::Encrypt, data_unit, buf.len(), buf)
    }

    /// Decrypts one data unit in place.
    pub fn decrypt(&self, data_unit: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(Direction::Decrypt, data_unit, buf.len(), buf)
    }

    /// Encrypts consecutive data units of `unit_size` bytes in place: unit `i` of `buf` is data unit
    /// `first_unit + i`.
    pub fn encrypt_units(&self, first_unit: u64, unit_size: usize, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(Direction::Encrypt, first_unit, unit_size, buf)
    }

    /// Decrypts consecutive data units of `unit_size` bytes in place.
    pub fn decrypt_units(&self, first_unit: u64, unit_size: usize, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(Direction::Decrypt, first_unit, unit_size, buf)
    }

    fn units(
        &self,
        direction: Direction,
        first_unit: u64,
        unit_size: usize,
        buf: &mut [u8],
    ) -> Result<(), CryptoError> {
        if unit_size == 0 || !unit_size.is_multiple_of(BLOCK_LEN) {
            return Err(CryptoError::DataLength(format!(
                "the data unit size {unit_size} is not a non-zero multiple of the {BLOCK_LEN}-byte AES block"
            )));
        }
        if buf.is_empty() || !buf.len().is_multiple_of(unit_size) {
            return Err(CryptoError::DataLength(format!(
                "{} bytes of data are not a non-zero number of {unit_size}-byte data units",
                buf.len()
            )));
        }
        let count = (buf.len() / unit_size) as u64;
        if first_unit.checked_add(count - 1).is_none() {
            return Err(CryptoError::DataUnitOverflow { first: first_unit, count });
        }

        SCRATCH.with_borrow_mut(|scratch| self.passes(direction, first_unit, unit_size, buf, scratch));
        Ok(())
    }

    /// The passes over `buf`, already checked to be whole data units, with `scratch` for the tweaks.
    fn passes(&self, direction: Direction, first_unit: u64, unit_size: usize, buf: &mut [u8], scratch: &mut Scratch) {
        // Only the part of the scratch this call writes is cleared afterwards.
        let used = buf.len().min(GROUP);
        if unit_size <= GROUP {
            let per_group = GROUP / unit_size;
            let mut unit = first_unit;
            for group in buf.chunks_mut(per_group * unit_size) {
                for (b, batch) in group.chunks_mut(TWEAK_BATCH * unit_size).enumerate() {
                    let at = b * TWEAK_BATCH * unit_size;
                    let mut tweaks = [Array::default(); TWEAK_BATCH];
                    let tweaks = &mut tweaks[..batch.len() / unit_size];
                    for (i, tweak) in tweaks.iter_mut().enumerate() {
                        *tweak = Array::from(u128::from(unit + i as u64).to_le_bytes());
                    }
                    self.tweak.encrypt_blocks(tweaks);
                    for ((data, scratch), tweak) in batch
                        .chunks_exact_mut(unit_size)
                        .zip(scratch.0[at..].chunks_exact_mut(unit_size))
                        .zip(tweaks.iter())
                    {
                        self.whitening.whiten_in(data, u128::from_le_bytes(tweak.0), scratch);
                    }
                    unit = unit.wrapping_add(tweaks.len() as u64); // past the last unit only when done
                }
                self.ecb(direction, group);
                self.whitening.whiten_out(group, &scratch.0);
            }
        } else {
            for (i, data) in buf.chunks_exact_mut(unit_size).enumerate() {
                let mut tweak = Array::from(u128::from(first_unit + i as u64).to_le_bytes());
                self.tweak.encrypt_block(&mut tweak);
                let mut t = u128::from_le_bytes(tweak.0);
                for chunk in data.chunks_mut(GROUP) {
                    self.whitening.whiten_in(chunk, t, &mut scratch.0);
                    let last = chunk.len() - BLOCK_LEN;
                    let Ok(last) = <[u8; BLOCK_LEN]>::try_from(&scratch.0[last..chunk.len()]) else {
                        unreachable!("a chunk is whole blocks");
                    };
                    t = gf::mul_alpha(u128::from_le_bytes(last));
                    self.ecb(direction, chunk);
                    self.whitening.whiten_out(chunk, &scratch.0);
                }
            }
        }
        // A plain fill, vectorized: the buffer lives on in the thread, so the stores cannot be dropped as dead
        // (`zeroize`'s byte-wise volatile stores would cost as much as the encryption).
        scratch.0[..used].fill(0);
    }

    /// The block cipher with Key1 over whole blocks, in one call so the `aes` crate pipelines them.
    #[inline]
    fn ecb(&self, direction: Direction, data: &mut [u8]) {
        let (blocks, tail) = Array::slice_as_chunks_mut(data);
        debug_assert!(tail.is_empty());
        match direction {
            Direction::Encrypt => self.data.encrypt_blocks(blocks),
            Direction::Decrypt => self.data.decrypt_blocks(blocks),
        }
    }
}

impl fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XtsCipher").field("engine", &self.engine.name()).finish_non_exhaustive()
    }
}

/// The tweaks of one group between the two passes, one buffer per thread (so a call does not clear 4 KiB of
/// stack first). They are derived from the key: the part a call used is cleared when it returns, and the buffer
/// when its thread ends.
#[repr(align(64))]
struct Scratch([u8; GROUP]);

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const { std::cell::RefCell::new(Scratch([0; GROUP])) };
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    /// IEEE 1619-2007 Annex B, AES-256 key (Key1 = the digits of e, Key2 = of pi), 512-byte data units of
    /// 00..ff twice.
    const KEY: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";
    /// Vector 10: data unit 0xff.
    const VECTOR_10: &str = concat!(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44",
        "680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
        "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7d",
        "e8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
        "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6",
        "dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
        "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b",
        "11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
        "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493",
        "c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
        "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    );
    /// Vector 11: data unit 0xffff.
    const VECTOR_11: &str = concat!(
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11e1d0225438e093242d6db274fde801d4",
        "cae06f2092c728b2478559df58e837c2469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d",
        "3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b2013fd0eeb8c2b8e3d8d240ccae2d4c9832",
        "0a7442e1c8d75a42d6e6cfa4c2eca1798d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a",
        "aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c69aac049921871ebb65301a4619ca80ec",
        "b485a31d744223ce8ddc2394828d6a80470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a",
        "bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab018bfca75ca096f2d531f3d1619e785f1",
        "ada437cab92e980558b3dce1474afb75bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63",
        "094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a7e20dbdf308b2461d97c0ec0024a2715",
        "055249cf3b478ddd4740de654f75ca686e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090",
        "54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
    );

    fn cipher() -> XtsCipher {
        XtsCipher::new(&Secret::new(hex(KEY))).unwrap()
    }

    #[test]
    fn ieee_1619_vectors() {
        let plain: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for (unit, want) in [(0xff, VECTOR_10), (0xffff, VECTOR_11)] {
            let mut buf = plain.clone();
            cipher().encrypt(unit, &mut buf).unwrap();
            assert_eq!(buf, hex(want), "data unit {unit:#x}");
            cipher().decrypt(unit, &mut buf).unwrap();
            assert_eq!(buf, plain);
        }
    }

    #[test]
    fn multi_unit_calls_equal_unit_calls() {
        let c = cipher();
        for unit in [16, 512, 4096, 8192] {
            let data: Vec<u8> = (0..unit * 37).map(|i| (i * 31 % 251) as u8).collect();
            let mut whole = data.clone();
            c.encrypt_units(1000, unit, &mut whole).unwrap();
            let mut pieces = data.clone();
            for (i, piece) in pieces.chunks_mut(unit).enumerate() {
                c.encrypt(1000 + i as u64, piece).unwrap();
            }
            assert_eq!(whole, pieces, "unit {unit}");
            c.decrypt_units(1000, unit, &mut whole).unwrap();
            assert_eq!(whole, data, "unit {unit}");
        }
    }

    #[test]
    fn a_flipped_bit_garbles_one_block_only() {
        let c = cipher();
        let plain = vec![7u8; 4096];
        let mut buf = plain.clone();
        c.encrypt(9, &mut buf).unwrap();
        buf[100] ^= 0x10;
        c.decrypt(9, &mut buf).unwrap();
        let changed: Vec<usize> = (0..256).filter(|b| buf[b * 16..b * 16 + 16] != plain[b * 16..b * 16 + 16]).collect();
        assert_eq!(changed, vec![6]);
    }

    #[test]
    fn bad_keys_and_lengths_are_refused() {
        assert!(matches!(XtsCipher::new(&Secret::new(vec![1; 32])), Err(CryptoError::KeyLength { .. })));
        assert!(matches!(XtsCipher::new(&Secret::new(vec![1; 64])), Err(CryptoError::XtsEqualHalves)));
        let c = cipher();
        assert!(c.encrypt(0, &mut [0; 15]).is_err());
        assert!(c.encrypt(0, &mut []).is_err());
        assert!(c.encrypt_units(0, 512, &mut [0; 700]).is_err());
        assert!(c.encrypt_units(0, 0, &mut [0; 512]).is_err());
        assert!(matches!(c.encrypt_units(u64::MAX, 512, &mut [0; 1024]), Err(CryptoError::DataUnitOverflow { .. })));
        assert!(c.encrypt_units(u64::MAX, 512, &mut [0; 512]).is_ok());
        let shown = format!("{c:?}");
        assert!(shown.contains("engine") && !shown.contains("27, 24"), "{shown}");
    }
}
