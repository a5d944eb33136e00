//! Features and asynchronous events (NVMe Base Specification 2.0, "Set Features command", "Get Features
//! command", "Feature Identifiers", "Asynchronous Event Request command").

use super::command::Sqe;

/// Feature Identifiers.
pub mod fid {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// LBA Range Type.
    pub const LBA_RANGE_TYPE: u8 = 0x03;
    /// Temperature Threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const INTERRUPT_VECTOR_CONFIGURATION: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY_NORMAL: u8 = 0x0a;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIGURATION: u8 = 0x0b;
    /// Autonomous Power State Transition.
    pub const AUTONOMOUS_POWER_STATE_TRANSITION: u8 = 0x0c;
    /// Host Memory Buffer.
    pub const HOST_MEMORY_BUFFER: u8 = 0x0d;
    /// Timestamp.
    pub const TIMESTAMP: u8 = 0x0e;
    /// Keep Alive Timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    /// Host Controlled Thermal Management.
    pub const HOST_CONTROLLED_THERMAL_MANAGEMENT: u8 = 0x10;
    /// Non-Operational Power State Config.
    pub const NON_OPERATIONAL_POWER_STATE_CONFIG: u8 = 0x11;
    /// Host Behavior Support.
    pub const HOST_BEHAVIOR_SUPPORT: u8 = 0x16;
    /// Host Identifier.
    pub const HOST_IDENTIFIER: u8 = 0x81;
    /// Reservation Notification Mask.
    pub const RESERVATION_NOTIFICATION_MASK: u8 = 0x82;
    /// Reservation Persistence.
    pub const RESERVATION_PERSISTENCE: u8 = 0x83;
}

/// Get Features Select (CDW10 bits 10:8) values.
pub mod select {
    /// Current value.
    pub const CURRENT: u8 = 0b000;
    /// Default value.
    pub const DEFAULT: u8 = 0b001;
    /// Saved value.
    pub const SAVED: u8 = 0b010;
    /// Supported capabilities (saveable, per namespace, changeable) in completion Dword 0.
    pub const SUPPORTED_CAPABILITIES: u8 = 0b011;
}

/// The fields common to Get Features and Set Features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureArgs {
    /// Feature Identifier (CDW10 bits 7:0), see [`fid`].
    pub fid: u8,
    /// Select (CDW10 bits 10:8), Get Features only, see [`select`].
    pub sel: u8,
    /// Save (CDW10 bit 31), Set Features only.
    pub save: bool,
    /// Feature specific Command Dword 11.
    pub cdw11: u32,
}

impl Sqe {
    /// The fields of a Get Features or Set Features command.
    pub fn feature(&self) -> FeatureArgs {
        let cdw10 = self.cdw10();
        FeatureArgs {
            fid: cdw10 as u8,
            sel: ((cdw10 >> 8) & 0x7) as u8,
            save: cdw10 & 1 << 31 != 0,
            cdw11: self.cdw11(),
        }
    }
}

/// Number of Queues: the 0's based counts requested in CDW11 or allocated in completion Dword 0
/// (submission queues in bits 15:0, completion queues in bits 31:16).
pub const fn number_of_queues(nsq_0based: u16, ncq_0based: u16) -> u32 {
    (ncq_0based as u32) << 16 | nsq_0based as u32
}

/// Asynchronous Event Type values (completion Dword 0 bits 2:0).
pub mod aer_type {
    /// Error status.
    pub const ERROR: u8 = 0;
    /// SMART / Health status.
    pub const SMART_HEALTH: u8 = 1;
    /// Notice.
    pub const NOTICE: u8 = 2;
    /// I/O Command Set specific status.
    pub const IO_COMMAND_SET: u8 = 6;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// Asynchronous Event Information values for [`aer_type::NOTICE`] (completion Dword 0 bits 15:8).
pub mod aer_notice {
    /// Namespace Attribute Changed; the host reads the Changed Namespace List log page.
    pub const NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// Firmware Activation Starting.
    pub const FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    /// Asymmetric Namespace Access Change.
    pub const ANA_CHANGE: u8 = 0x03;
    /// Discovery Log Page Change.
    pub const DISCOVERY_LOG_CHANGE: u8 = 0xf0;
}

/// Completion Dword 0 of an Asynchronous Event Request: event type (bits 2:0), event information
/// (bits 15:8) and the log page the host reads to clear the event (bits 23:16).
pub const fn async_event_dw0(event_type: u8, info: u8, log_page: u8) -> u32 {
    (event_type & 0x7) as u32 | (info as u32) << 8 | (log_page as u32) << 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::command::admin_opcode;
    use crate::spec::log::lid;

    #[test]
    fn namespace_changed_event() {
        let dw0 =
            async_event_dw0(aer_type::NOTICE, aer_notice::NAMESPACE_ATTRIBUTE_CHANGED, lid::CHANGED_NAMESPACE_LIST);
        assert_eq!(dw0, 0x0004_0002);
        assert_eq!(async_event_dw0(aer_type::NOTICE, aer_notice::DISCOVERY_LOG_CHANGE, lid::DISCOVERY), 0x0070_f002);
    }

    #[test]
    fn feature_fields() {
        let mut sqe = Sqe::new(admin_opcode::SET_FEATURES, 3);
        sqe.set_cdws([0x8000_0007, number_of_queues(7, 7), 0, 0, 0, 0]);
        let f = sqe.feature();
        assert_eq!((f.fid, f.save, f.cdw11), (fid::NUMBER_OF_QUEUES, true, 0x0007_0007));
        sqe.set_cdws([0x0000_030b, 0, 0, 0, 0, 0]);
        assert_eq!(sqe.feature().sel, select::SUPPORTED_CAPABILITIES);
    }
}
