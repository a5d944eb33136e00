//! Controller properties read and written with Property Get/Set over fabrics (NVMe Base Specification 2.0,
//! "Controller Registers": Offset 0h CAP, 8h VS, 14h CC, 1Ch CSTS, 20h NSSR).

/// Controller Capabilities, 8 bytes.
pub const CAP: u32 = 0x00;
/// Version, 4 bytes.
pub const VS: u32 = 0x08;
/// Controller Configuration, 4 bytes.
pub const CC: u32 = 0x14;
/// Controller Status, 4 bytes.
pub const CSTS: u32 = 0x1c;
/// NVM Subsystem Reset, 4 bytes (optional).
pub const NSSR: u32 = 0x20;

/// Version value `major.minor.tertiary` as in VS and Identify Controller VER.
pub const fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
    (major as u32) << 16 | (minor as u32) << 8 | tertiary as u32
}

/// The fields of CAP a fabrics controller reports (NVMe Base Specification 2.0, "Offset 0h: CAP – Controller
/// Capabilities").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Maximum Queue Entries Supported (bits 15:0), 0's based.
    pub mqes: u16,
    /// Contiguous Queues Required (bit 16).
    pub cqr: bool,
    /// Timeout (bits 31:24) in 500 ms units: how long the host waits for CSTS.RDY to change.
    pub timeout_500ms: u8,
    /// Doorbell Stride (bits 35:32); 0 over fabrics.
    pub dstrd: u8,
    /// Command Sets Supported bit 37: the NVM Command Set.
    pub css_nvm: bool,
    /// Command Sets Supported bit 43: I/O Command Sets selected by CSI (Identify CNS 05h/06h in use).
    pub css_io_command_sets: bool,
    /// Memory Page Size Minimum (bits 51:48): 2^(12 + MPSMIN) bytes.
    pub mpsmin: u8,
    /// Memory Page Size Maximum (bits 55:52).
    pub mpsmax: u8,
}

impl Capabilities {
    /// Encodes the 64-bit CAP value.
    pub const fn to_bits(&self) -> u64 {
        self.mqes as u64
            | (self.cqr as u64) << 16
            | (self.timeout_500ms as u64) << 24
            | ((self.dstrd & 0xf) as u64) << 32
            | (self.css_nvm as u64) << 37
            | (self.css_io_command_sets as u64) << 43
            | ((self.mpsmin & 0xf) as u64) << 48
            | ((self.mpsmax & 0xf) as u64) << 52
    }

    /// Decodes a CAP value (fields not listed here are dropped).
    pub const fn from_bits(cap: u64) -> Self {
        Self {
            mqes: cap as u16,
            cqr: cap & 1 << 16 != 0,
            timeout_500ms: (cap >> 24) as u8,
            dstrd: ((cap >> 32) & 0xf) as u8,
            css_nvm: cap & 1 << 37 != 0,
            css_io_command_sets: cap & 1 << 43 != 0,
            mpsmin: ((cap >> 48) & 0xf) as u8,
            mpsmax: ((cap >> 52) & 0xf) as u8,
        }
    }
}

/// Shutdown Notification (CC.SHN) and Shutdown Status (CSTS.SHST) values.
pub mod shutdown {
    /// CC.SHN: no notification; CSTS.SHST: normal operation.
    pub const NONE: u8 = 0b00;
    /// CC.SHN: normal shutdown notification; CSTS.SHST: shutdown processing occurring.
    pub const NORMAL_OR_OCCURRING: u8 = 0b01;
    /// CC.SHN: abrupt shutdown notification; CSTS.SHST: shutdown processing complete.
    pub const ABRUPT_OR_COMPLETE: u8 = 0b10;
}

/// Controller Configuration as written by the host (NVMe Base Specification 2.0, "Offset 14h: CC –
/// Controller Configuration").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControllerConfig(pub u32);

impl ControllerConfig {
    /// Enable (bit 0).
    pub const fn en(self) -> bool {
        self.0 & 1 != 0
    }

    /// I/O Command Set Selected (bits 6:4): 000b NVM, 110b all supported I/O command sets, 111b admin only.
    pub const fn css(self) -> u8 {
        ((self.0 >> 4) & 0x7) as u8
    }

    /// Memory Page Size (bits 10:7): 2^(12 + MPS) bytes.
    pub const fn mps(self) -> u8 {
        ((self.0 >> 7) & 0xf) as u8
    }

    /// Arbitration Mechanism Selected (bits 13:11).
    pub const fn ams(self) -> u8 {
        ((self.0 >> 11) & 0x7) as u8
    }

    /// Shutdown Notification (bits 15:14), see [`shutdown`].
    pub const fn shn(self) -> u8 {
        ((self.0 >> 14) & 0x3) as u8
    }

    /// I/O Submission Queue Entry Size (bits 19:16) as a power of two (6 for 64 bytes).
    pub const fn iosqes(self) -> u8 {
        ((self.0 >> 16) & 0xf) as u8
    }

    /// I/O Completion Queue Entry Size (bits 23:20) as a power of two (4 for 16 bytes).
    pub const fn iocqes(self) -> u8 {
        ((self.0 >> 20) & 0xf) as u8
    }
}

/// Controller Status as reported by the controller (NVMe Base Specification 2.0, "Offset 1Ch: CSTS –
/// Controller Status").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControllerStatus {
    /// Ready (bit 0).
    pub rdy: bool,
    /// Controller Fatal Status (bit 1).
    pub cfs: bool,
    /// Shutdown Status (bits 3:2), see [`shutdown`].
    pub shst: u8,
}

impl ControllerStatus {
    /// Encodes the 32-bit CSTS value.
    pub const fn to_bits(&self) -> u32 {
        self.rdy as u32 | (self.cfs as u32) << 1 | ((self.shst & 0x3) as u32) << 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_bits() {
        let cap = Capabilities {
            mqes: 127,
            cqr: true,
            timeout_500ms: 30,
            dstrd: 0,
            css_nvm: true,
            css_io_command_sets: false,
            mpsmin: 0,
            mpsmax: 4,
        };
        // MQES 127, CQR, TO 15 s, CSS bit 37, MPSMAX 64 KiB.
        assert_eq!(cap.to_bits(), 0x0040_0020_1e01_007f);
        assert_eq!(Capabilities::from_bits(cap.to_bits()), cap);
    }

    #[test]
    fn cc_and_csts_bits() {
        // What the Linux host writes to enable: EN, CSS NVM, MPS 4 KiB, round robin, IOSQES 6, IOCQES 4.
        let cc = ControllerConfig(0x0046_0001);
        assert!(cc.en());
        assert_eq!((cc.css(), cc.mps(), cc.ams(), cc.shn(), cc.iosqes(), cc.iocqes()), (0, 0, 0, 0, 6, 4));
        assert_eq!(ControllerConfig(1 << 14).shn(), shutdown::NORMAL_OR_OCCURRING);
        let csts = ControllerStatus { rdy: true, cfs: false, shst: shutdown::ABRUPT_OR_COMPLETE };
        assert_eq!(csts.to_bits(), 0b1001);
        assert_eq!(version(1, 4, 0), 0x0001_0400);
    }
}
