//! Tweak arithmetic: XTS tweaks are elements of GF(2^128) modulo x^128 + x^7 + x^2 + x + 1, stored as
//! little-endian 128-bit integers (byte 0 holds x^0..x^7), and the tweak of block `j` of a data unit is
//! `T · α^j` with α = x.

/// The reduction of x^128: x^7 + x^2 + x + 1.
pub(super) const POLY: u64 = 0x87;

/// `t · α`.
#[inline(always)]
pub(super) fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * u128::from(POLY))
}

/// `t · α^8`: the eight bits shifted out at the top are reduced as one byte (`b·(x^7 + x^2 + x + 1)`, at most
/// 15 bits, so it stays in the low word).
#[inline(always)]
pub(super) fn mul_alpha8(t: u128) -> u128 {
    let b = (t >> 120) as u64;
    (t << 8) ^ u128::from(b ^ (b << 1) ^ (b << 2) ^ (b << 7))
}

/// `t · α^n`, one step at a time (tests and set-up only).
#[cfg(test)]
pub(super) fn mul_alpha_n(mut t: u128, n: usize) -> u128 {
    for _ in 0..n {
        t = mul_alpha(t);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_doubles_and_reduces() {
        assert_eq!(mul_alpha(1), 2);
        assert_eq!(mul_alpha(1 << 127), 0x87);
        assert_eq!(mul_alpha((1 << 127) | 1), 0x85);
    }

    #[test]
    fn alpha8_is_eight_alphas() {
        let mut t: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        for _ in 0..1000 {
            assert_eq!(mul_alpha8(t), mul_alpha_n(t, 8));
            t = mul_alpha(t) ^ t.rotate_left(13);
        }
        assert_eq!(mul_alpha8(u128::MAX), mul_alpha_n(u128::MAX, 8));
    }
}
