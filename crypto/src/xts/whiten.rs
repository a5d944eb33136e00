//! The two whitening passes around the block cipher: before it, the tweaks of a data unit are generated,
//! XORed into its blocks and kept in a scratch buffer; after it, the scratch is XORed in again.
//!
//! Tweaks are generated in independent chains (tweak `j + n` is tweak `j` times α^n) so that the steps do not
//! wait on each other, several tweaks per vector register where the CPU has the instructions for it: AVX-512
//! with VPCLMULQDQ (4 tweaks per register, 4 chains), AVX2 with VPCLMULQDQ (2 tweaks, 8 chains), NEON with
//! PMULL (1 tweak, 8 chains). The carry-less multiply reduces the bits shifted out at the top in one
//! instruction. Elsewhere, 8 chains of 128-bit integers.

use super::gf::{mul_alpha, mul_alpha8};

/// Which implementation of the passes runs. Chosen once per cipher by [`Whitening::detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Whitening {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(all(target_arch = "aarch64", target_endian = "little", not(miri)))]
    Neon,
}

#[cfg(target_arch = "x86_64")]
cpufeatures::new!(cpu_avx512_clmul, "avx512f", "vpclmulqdq");
#[cfg(target_arch = "x86_64")]
cpufeatures::new!(cpu_avx2_clmul, "avx2", "vpclmulqdq");
#[cfg(all(target_arch = "aarch64", target_endian = "little", not(miri)))]
cpufeatures::new!(cpu_pmull, "aes");

impl Whitening {
    /// The fastest implementation this CPU runs.
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if cpu_avx512_clmul::get() {
                return Self::Avx512;
            }
            if cpu_avx2_clmul::get() {
                return Self::Avx2;
            }
        }
        #[cfg(all(target_arch = "aarch64", target_endian = "little", not(miri)))]
        if cpu_pmull::get() {
            return Self::Neon;
        }
        Self::Portable
    }

    /// Every implementation this CPU runs (for tests comparing them).
    #[cfg(test)]
    pub(super) fn available() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if cpu_avx2_clmul::get() {
                all.push(Self::Avx2);
            }
            if cpu_avx512_clmul::get() {
                all.push(Self::Avx512);
            }
        }
        #[cfg(all(target_arch = "aarch64", target_endian = "little", not(miri)))]
        if cpu_pmull::get() {
            all.push(Self::Neon);
        }
        all
    }

    /// XORs `t·α^j` into block `j` of `data` and stores it as block `j` of `tweaks`. Both are whole 16-byte
    /// blocks, `tweaks` at least as long as `data`.
    #[inline]
    pub(super) fn whiten_in(self, data: &mut [u8], t: u128, tweaks: &mut [u8]) {
        debug_assert!(data.len().is_multiple_of(16) && tweaks.len() >= data.len());
        let tweaks = &mut tweaks[..data.len()];
        match self {
            Self::Portable => whiten_in_portable(data, t, tweaks),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is only chosen when the CPU has AVX2 and VPCLMULQDQ (`detect`, `available`).
            Self::Avx2 => unsafe { x86::whiten_in_avx2(data, t, tweaks) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only chosen when the CPU has AVX-512F and VPCLMULQDQ.
            Self::Avx512 => unsafe { x86::whiten_in_avx512(data, t, tweaks) },
            #[cfg(all(target_arch = "aarch64", target_endian = "little", not(miri)))]
            // SAFETY: `Neon` is only chosen when the CPU has the AES extension (which brings PMULL).
            Self::Neon => unsafe { neon::whiten_in(data, t, tweaks) },
        }
    }

    /// XORs `tweaks` into `data` (same length).
    #[inline]
    pub(super) fn whiten_out(self, data: &mut [u8], tweaks: &[u8]) {
        let tweaks = &tweaks[..data.len()];
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `whiten_in`.
            Self::Avx2 => unsafe { x86::xor_avx2(data, tweaks) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `whiten_in`.
            Self::Avx512 => unsafe { x86::xor_avx512(data, tweaks) },
            _ => xor(data, tweaks),
        }
    }
}

/// `data ^= tweaks`, written for the auto-vectorizer (NEON is baseline on aarch64; x86 compiles it again with
/// AVX2 and AVX-512 enabled).
#[inline(always)]
fn xor(data: &mut [u8], tweaks: &[u8]) {
    let (data, data_tail) = data.as_chunks_mut::<16>();
    let (tweaks, _) = tweaks.as_chunks::<16>();
    debug_assert!(data_tail.is_empty());
    for (d, t) in data.iter_mut().zip(tweaks) {
        *d = (u128::from_ne_bytes(*d) ^ u128::from_ne_bytes(*t)).to_ne_bytes();
    }
}

/// Chains of the portable pass: tweak `j + 8` is tweak `j` times α^8.
const CHAINS: usize = 8;

fn whiten_in_portable(data: &mut [u8], t: u128, tweaks: &mut [u8]) {
    let mut chain = [0u128; CHAINS];
    chain[0] = t;
    for i in 1..CHAINS {
        chain[i] = mul_alpha(chain[i - 1]);
    }
    let (data, _) = data.as_chunks_mut::<16>();
    let (tweaks, _) = tweaks.as_chunks_mut::<16>();
    for (data, tweaks) in data.chunks_mut(CHAINS).zip(tweaks.chunks_mut(CHAINS)) {
        for ((d, tw), c) in data.iter_mut().zip(tweaks.iter_mut()).zip(chain.iter_mut()) {
            *d = (u128::from_le_bytes(*d) ^ *c).to_le_bytes();
            *tw = c.to_le_bytes();
            *c = mul_alpha8(*c);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::super::gf::POLY;
    use super::xor;

    #[target_feature(enable = "avx512f")]
    pub(super) fn xor_avx512(data: &mut [u8], tweaks: &[u8]) {
        xor(data, tweaks);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn xor_avx2(data: &mut [u8], tweaks: &[u8]) {
        xor(data, tweaks);
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn m128(t: u128) -> __m128i {
        // Lanes are little-endian: the low 64 bits of the tweak go to the low lane.
        _mm_set_epi64x((t >> 64) as u64 as i64, t as u64 as i64)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load512(src: &[u8; 64]) -> __m512i {
        // SAFETY: `src` is 64 readable bytes; the load has no alignment requirement.
        unsafe { _mm512_loadu_si512(src.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store512(dst: &mut [u8; 64], v: __m512i) {
        // SAFETY: `dst` is 64 writable bytes; the store has no alignment requirement.
        unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) }
    }

    /// Each 128-bit lane of `v` times α^k, `k` per 64-bit half (both halves of a lane equal, below 57): the
    /// lane shifted left by k, the bits crossing from the low half into the high half carried over, and the k
    /// bits shifted out at the top multiplied by x^7 + x^2 + x + 1 (carry-less) into the low half.
    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn mul_alpha_var512(v: __m512i, k: __m512i, poly: __m512i) -> __m512i {
        let out = _mm512_srlv_epi64(v, _mm512_sub_epi64(_mm512_set1_epi64(64), k));
        // The low half's outgoing bits, moved to the high half; the low half zeroed.
        let carry = _mm512_maskz_shuffle_epi32::<0x4e>(0xcccc, out);
        // The high half's outgoing bits times the polynomial (fits in the low half).
        let reduced = _mm512_clmulepi64_epi128::<0x01>(out, poly);
        _mm512_ternarylogic_epi64::<0x96>(_mm512_sllv_epi64(v, k), carry, reduced)
    }

    /// Each 128-bit lane of `v` times α^16.
    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn mul_alpha16_512(v: __m512i, poly: __m512i) -> __m512i {
        let out = _mm512_srli_epi64::<48>(v);
        let carry = _mm512_maskz_shuffle_epi32::<0x4e>(0xcccc, out);
        let reduced = _mm512_clmulepi64_epi128::<0x01>(out, poly);
        _mm512_ternarylogic_epi64::<0x96>(_mm512_slli_epi64::<16>(v), carry, reduced)
    }

    /// Four registers of four tweaks: register `q` holds tweaks `4q..4q+4`, each chain steps by α^16.
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    pub(super) fn whiten_in_avx512(data: &mut [u8], t: u128, tweaks: &mut [u8]) {
        let poly = _mm512_set1_epi64(POLY as i64);
        let base = _mm512_broadcast_i32x4(m128(t));
        let powers =
            |q: i64| _mm512_setr_epi64(4 * q, 4 * q, 4 * q + 1, 4 * q + 1, 4 * q + 2, 4 * q + 2, 4 * q + 3, 4 * q + 3);
        let mut v = [0, 1, 2, 3].map(|q| mul_alpha_var512(base, powers(q), poly));

        let (data, data_tail) = data.as_chunks_mut::<64>();
        let (tweaks, tweaks_tail) = tweaks.as_chunks_mut::<64>();
        let mut data = data.chunks_exact_mut(4);
        let mut tweaks = tweaks.chunks_exact_mut(4);
        for (d, tw) in (&mut data).zip(&mut tweaks) {
            for q in 0..4 {
                let x = _mm512_xor_si512(load512(&d[q]), v[q]);
                store512(&mut d[q], x);
                store512(&mut tw[q], v[q]);
            }
            for vq in &mut v {
                *vq = mul_alpha16_512(*vq, poly);
            }
        }
        // Up to three more groups of four blocks, then up to three blocks.
        let mut next = 0;
        for (d, tw) in data.into_remainder().iter_mut().zip(tweaks.into_remainder()) {
            store512(d, _mm512_xor_si512(load512(d), v[next]));
            store512(tw, v[next]);
            next += 1;
        }
        if !data_tail.is_empty() {
            let mut rest = [0u8; 64];
            store512(&mut rest, v[next]);
            let rest = &rest[..data_tail.len()];
            tweaks_tail.copy_from_slice(rest);
            super::xor(data_tail, rest);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn load256(src: &[u8; 32]) -> __m256i {
        // SAFETY: `src` is 32 readable bytes; the load has no alignment requirement.
        unsafe { _mm256_loadu_si256(src.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn store256(dst: &mut [u8; 32], v: __m256i) {
        // SAFETY: `dst` is 32 writable bytes; the store has no alignment requirement.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), v) }
    }

    /// As `mul_alpha_var512`, on two lanes.
    #[inline]
    #[target_feature(enable = "avx2,vpclmulqdq")]
    fn mul_alpha_var256(v: __m256i, k: __m256i, poly: __m256i) -> __m256i {
        let out = _mm256_srlv_epi64(v, _mm256_sub_epi64(_mm256_set1_epi64x(64), k));
        let carry = _mm256_bslli_epi128::<8>(out);
        let reduced = _mm256_clmulepi64_epi128::<0x01>(out, poly);
        _mm256_xor_si256(_mm256_xor_si256(_mm256_sllv_epi64(v, k), carry), reduced)
    }

    #[inline]
    #[target_feature(enable = "avx2,vpclmulqdq")]
    fn mul_alpha16_256(v: __m256i, poly: __m256i) -> __m256i {
        let out = _mm256_srli_epi64::<48>(v);
        let carry = _mm256_bslli_epi128::<8>(out);
        let reduced = _mm256_clmulepi64_epi128::<0x01>(out, poly);
        _mm256_xor_si256(_mm256_xor_si256(_mm256_slli_epi64::<16>(v), carry), reduced)
    }

    /// Eight registers of two tweaks: register `q` holds tweaks `2q, 2q+1`, each chain steps by α^16.
    #[target_feature(enable = "avx2,vpclmulqdq")]
    pub(super) fn whiten_in_avx2(data: &mut [u8], t: u128, tweaks: &mut [u8]) {
        let poly = _mm256_set1_epi64x(POLY as i64);
        let base = _mm256_broadcastsi128_si256(m128(t));
        let powers = |q: i64| _mm256_setr_epi64x(2 * q, 2 * q, 2 * q + 1, 2 * q + 1);
        let mut v = [0, 1, 2, 3, 4, 5, 6, 7].map(|q| mul_alpha_var256(base, powers(q), poly));

        let (data, data_tail) = data.as_chunks_mut::<32>();
        let (tweaks, tweaks_tail) = tweaks.as_chunks_mut::<32>();
        let mut data = data.chunks_exact_mut(8);
        let mut tweaks = tweaks.chunks_exact_mut(8);
        for (d, tw) in (&mut data).zip(&mut tweaks) {
            for q in 0..8 {
                let x = _mm256_xor_si256(load256(&d[q]), v[q]);
                store256(&mut d[q], x);
                store256(&mut tw[q], v[q]);
            }
            for vq in &mut v {
                *vq = mul_alpha16_256(*vq, poly);
            }
        }
        // Up to seven more pairs of blocks, then maybe one block.
        let mut next = 0;
        for (d, tw) in data.into_remainder().iter_mut().zip(tweaks.into_remainder()) {
            store256(d, _mm256_xor_si256(load256(d), v[next]));
            store256(tw, v[next]);
            next += 1;
        }
        if !data_tail.is_empty() {
            let mut rest = [0u8; 32];
            store256(&mut rest, v[next]);
            let rest = &rest[..data_tail.len()];
            tweaks_tail.copy_from_slice(rest);
            super::xor(data_tail, rest);
        }
    }
}

#[cfg(all(target_arch = "aarch64", target_endian = "little", not(miri)))]
mod neon {
    use core::arch::aarch64::*;

    use super::super::gf::{POLY, mul_alpha};
    use super::CHAINS;

    #[inline]
    #[target_feature(enable = "neon")]
    fn load(src: &[u8; 16]) -> uint64x2_t {
        // SAFETY: `src` is 16 readable bytes; `ld1` of bytes has no alignment requirement.
        let bytes = unsafe { vld1q_u8(src.as_ptr()) };
        vreinterpretq_u64_u8(bytes)
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn store(dst: &mut [u8; 16], v: uint64x2_t) {
        let bytes = vreinterpretq_u8_u64(v);
        // SAFETY: `dst` is 16 writable bytes; `st1` of bytes has no alignment requirement.
        unsafe { vst1q_u8(dst.as_mut_ptr(), bytes) }
    }

    /// `v · α^8`: shifted left by 8 with the low half's top byte carried into the high half, and the high
    /// half's top byte times x^7 + x^2 + x + 1 (PMULL2) into the low half.
    #[inline]
    #[target_feature(enable = "neon,aes")]
    fn mul_alpha8(v: uint64x2_t, poly: uint64x2_t) -> uint64x2_t {
        let out = vshrq_n_u64::<56>(v);
        let carry = vextq_u64::<1>(vdupq_n_u64(0), out);
        let reduced = vreinterpretq_u64_p128(vmull_high_p64(vreinterpretq_p64_u64(out), vreinterpretq_p64_u64(poly)));
        veorq_u64(veorq_u64(vshlq_n_u64::<8>(v), carry), reduced)
    }

    /// Eight chains of one tweak each, stepping by α^8.
    #[target_feature(enable = "neon,aes")]
    pub(super) fn whiten_in(data: &mut [u8], t: u128, tweaks: &mut [u8]) {
        let poly = vdupq_n_u64(POLY);
        let mut first = t;
        let mut v = [vdupq_n_u64(0); CHAINS];
        for vq in &mut v {
            *vq = load(&first.to_le_bytes());
            first = mul_alpha(first);
        }
        let (data, _) = data.as_chunks_mut::<16>();
        let (tweaks, _) = tweaks.as_chunks_mut::<16>();
        for (data, tweaks) in data.chunks_mut(CHAINS).zip(tweaks.chunks_mut(CHAINS)) {
            for ((d, tw), vq) in data.iter_mut().zip(tweaks.iter_mut()).zip(v.iter_mut()) {
                store(d, veorq_u64(load(d), *vq));
                store(tw, *vq);
                *vq = mul_alpha8(*vq, poly);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gf::mul_alpha_n;
    use super::*;

    fn reference(data: &[u8], t: u128) -> (Vec<u8>, Vec<u8>) {
        let mut out = data.to_vec();
        let mut tweaks = vec![0; data.len()];
        for (j, (block, tweak)) in out.chunks_exact_mut(16).zip(tweaks.chunks_exact_mut(16)).enumerate() {
            let tj = mul_alpha_n(t, j);
            let x = u128::from_le_bytes(block.try_into().unwrap()) ^ tj;
            block.copy_from_slice(&x.to_le_bytes());
            tweak.copy_from_slice(&tj.to_le_bytes());
        }
        (out, tweaks)
    }

    #[test]
    fn every_implementation_matches_the_definition() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let available = Whitening::available();
        assert!(available.contains(&Whitening::detect()));
        for blocks in (0..=70).chain([255, 256, 257]) {
            for round in 0..4 {
                let t = match round {
                    0 => u128::MAX,
                    1 => 1 << 127,
                    _ => (u128::from(next()) << 64) | u128::from(next()),
                };
                let data: Vec<u8> = (0..blocks * 16).map(|_| next() as u8).collect();
                let (want, want_tweaks) = reference(&data, t);
                for &w in &available {
                    let mut got = data.clone();
                    let mut tweaks = vec![0; data.len() + 32];
                    w.whiten_in(&mut got, t, &mut tweaks);
                    assert_eq!(got, want, "{w:?} {blocks} blocks");
                    assert_eq!(&tweaks[..data.len()], &want_tweaks[..], "{w:?} {blocks} blocks");
                    assert!(tweaks[data.len()..].iter().all(|&b| b == 0), "{w:?} wrote past the data");
                    w.whiten_out(&mut got, &tweaks);
                    assert_eq!(got, data, "{w:?} {blocks} blocks");
                }
            }
        }
    }
}
