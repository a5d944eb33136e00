//! Header and data digests: CRC32C (Castagnoli) over the PDU header or the PDU data, transmitted
//! little-endian (NVMe/TCP Transport Specification 1.0, "PDU Digests"; the same CRC as iSCSI, RFC 3720).

/// CRC32C of `bytes`, hardware accelerated where the CPU has CRC32 instructions (SSE 4.2, Armv8 CRC).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The HDGST field for a PDU header: CRC32C of the HLEN header bytes, little-endian.
pub fn header_digest(header: &[u8]) -> [u8; 4] {
    crc32c(header).to_le_bytes()
}

/// Incremental data digest, for PDU data sent or received in several pieces (e.g. a volume buffer's pages)
/// without copying them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataDigest(u32);

impl DataDigest {
    /// An empty digest.
    pub const fn new() -> Self {
        Self(0)
    }

    /// Continues the digest over `bytes`.
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        self.0 = crc32c::crc32c_append(self.0, bytes);
        self
    }

    /// The CRC32C so far.
    pub const fn value(&self) -> u32 {
        self.0
    }

    /// The DDGST field: the CRC32C little-endian.
    pub const fn to_bytes(&self) -> [u8; 4] {
        self.0.to_le_bytes()
    }
}

/// The DDGST field over PDU data given as consecutive pieces.
pub fn data_digest<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> [u8; 4] {
    let mut digest = DataDigest::new();
    for piece in pieces {
        digest.update(piece);
    }
    digest.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_test_vectors() {
        // The CRC-32C check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        // RFC 3720 appendix B.4: 32 bytes of zeroes give the bytes aa 36 91 8a on the wire, i.e. the CRC
        // 0x8a9136aa transmitted little-endian, exactly how NVMe/TCP (and the Linux kernel's
        // put_unaligned_le32(~crc32c(~0, ...))) writes its digests.
        assert_eq!(header_digest(&[0u8; 32]), [0xaa, 0x36, 0x91, 0x8a]);
        // RFC 3720 B.4: 32 bytes of 0xff and the ascending 0..31 sequence.
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46dd_794e);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let one_shot = crc32c(&data).to_le_bytes();
        assert_eq!(data_digest([&data[..1], &data[1..4096], &data[4096..]]), one_shot);
        assert_eq!(data_digest(data.chunks(333)), one_shot);
        assert_eq!(DataDigest::new().to_bytes(), crc32c(&[]).to_le_bytes());
    }
}
