//! Incremental framing of a received NVMe/TCP byte stream (NVMe/TCP Transport Specification 1.0, "PDU
//! Common Header", "PDU Digests", "PDU Data Alignment" and "Fatal Error Handling").

use core::ops::Range;

use zerocopy::FromBytes;

use super::digest::crc32c;
use super::pdu::{
    CH_LEN, CommonHeader, DIGEST_LEN, DataHeader, Direction, FatalErrorStatus, IcReq, IcResp, MAX_PDA, MIN_MAXH2CDATA,
    PFV_1_0, PduHeader, PduType, R2t, TERM_REQ_MAX_PLEN, ch_offset, flags,
};

/// A fault in the received stream. Every variant but [`PduError::DataDigest`] is a fatal transport error:
/// the receiver sends a Terminate Connection Request with [`PduError::fes`] and [`PduError::fei`] (see
/// [`super::encode_term_req`]) and closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PduError {
    /// A header field holds an invalid value; `offset` is its byte offset in the PDU header.
    #[error("the PDU header field at byte {offset} is invalid")]
    InvalidHeaderField { offset: u32 },
    /// A valid PDU arrived when the protocol does not allow it (e.g. anything before ICReq, a second ICReq,
    /// H2CData without an R2T). The decoder never returns it; the connection state machine does.
    #[error("the PDU arrived out of sequence")]
    PduSequence,
    /// The header digest does not match the header.
    #[error("the header digest {received:#010x} does not match the computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    /// Data outside the command's transfer (H2CData/C2HData offset and length). Returned by the connection
    /// state machine.
    #[error("the data transfer is out of the command's range")]
    DataOutOfRange,
    /// The PDU is longer than the receiver accepts (in-capsule data beyond IOCCSZ, H2CData beyond MAXH2CDATA).
    #[error("the PDU length {plen} exceeds the limit of {limit} bytes")]
    DataLimitExceeded { plen: u32, limit: u32 },
    /// A parameter the receiver does not support; `offset` is its byte offset in the PDU header.
    #[error("the parameter at byte {offset} is not supported")]
    UnsupportedParameter { offset: u32 },
    /// The data digest does not match the data. Not fatal: the PDU of `len` bytes is complete and the
    /// stream stays in step, so the receiver skips `len` bytes and fails command `cccid` (the Linux host and this
    /// project's target report [`crate::spec::Status::DATA_TRANSFER_ERROR`]).
    #[error("the data digest {received:#010x} of command {cccid} does not match the computed {computed:#010x}")]
    DataDigest { cccid: u16, len: usize, received: u32, computed: u32 },
}

impl PduError {
    /// Fatal Error Status for the Terminate Connection Request; `None` for a data digest error.
    pub fn fes(&self) -> Option<FatalErrorStatus> {
        Some(match self {
            Self::InvalidHeaderField { .. } => FatalErrorStatus::InvalidHeaderField,
            Self::PduSequence => FatalErrorStatus::PduSequenceError,
            Self::HeaderDigest { .. } => FatalErrorStatus::HeaderDigestError,
            Self::DataOutOfRange => FatalErrorStatus::DataTransferOutOfRange,
            Self::DataLimitExceeded { .. } => FatalErrorStatus::DataTransferLimitExceeded,
            Self::UnsupportedParameter { .. } => FatalErrorStatus::UnsupportedParameter,
            Self::DataDigest { .. } => return None,
        })
    }

    /// Fatal Error Information: the field offset for Invalid PDU Header Field and Unsupported Parameter, 0
    /// (reserved) otherwise.
    pub fn fei(&self) -> u32 {
        match self {
            Self::InvalidHeaderField { offset } | Self::UnsupportedParameter { offset } => *offset,
            _ => 0,
        }
    }

    /// Whether the connection must be terminated: true for everything but a data digest error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::DataDigest { .. })
    }
}

/// Result of [`Decoder::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer does not hold enough of the current PDU: call again once at least this many bytes (from the
    /// start of the PDU) are buffered. Before the header is validated this is the header length; after, the
    /// whole PDU length.
    NeedMore(usize),
    /// A complete, valid PDU at the start of the buffer.
    Frame {
        /// The PDU header, copied.
        header: PduHeader,
        /// Where the PDU data is in the buffer (without padding and digests); empty when there is none. For
        /// a Terminate Connection Request it is the offending PDU header.
        data: Range<usize>,
        /// Bytes of the buffer the PDU occupies (PLEN); the next PDU starts there.
        len: usize,
    },
}

/// Decoder settings for one connection; it holds no stream state, so the caller keeps the receive buffer
/// and calls [`Decoder::decode`] with whatever has arrived.
///
/// Until ICReq/ICResp are exchanged the digests are off (those PDUs never carry any); afterwards the caller
/// sets the negotiated values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    /// PDUs accepted: [`Direction::HostToController`] on a controller, [`Direction::ControllerToHost`] on a
    /// host.
    pub direction: Direction,
    /// Header digests negotiated.
    pub header_digest: bool,
    /// Data digests negotiated.
    pub data_digest: bool,
    /// Largest PLEN accepted; longer PDUs fail with [`PduError::DataLimitExceeded`]. A controller allows its
    /// SQE, digests, padding and the larger of IOCCSZ in-capsule data, 8 KiB admin in-capsule data and
    /// MAXH2CDATA.
    pub max_pdu_len: u32,
    /// The PDU data alignment this side asked its peer for (CPDA on a controller, HPDA on a host): data
    /// offsets must be multiples of (pda + 1) * 4 bytes.
    pub pda: u8,
}

impl Decoder {
    /// A decoder for PDUs sent in `direction`, before digest negotiation, with no alignment requirement.
    pub const fn new(direction: Direction, max_pdu_len: u32) -> Self {
        Self { direction, header_digest: false, data_digest: false, max_pdu_len, pda: 0 }
    }

    /// Frames and validates the PDU at the start of `buf`.
    ///
    /// Checks, in order: a known PDU type sent in [`Decoder::direction`]; HLEN equal to the type's fixed
    /// length; HDGSTF matching the negotiated header digest; the header digest; PLEN at least the header
    /// and at most the limit; PDO 0 exactly when there is no data, otherwise past the header and digest,
    /// aligned to the PDA and inside the PDU; DDGSTF matching the negotiated data digest for PDUs with data;
    /// the type specific header fields; and, once the whole PDU is buffered, the data digest.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, PduError> {
        let Ok((ch, _)) = CommonHeader::read_from_prefix(buf) else {
            return Ok(Decoded::NeedMore(CH_LEN));
        };
        let pdu_type = PduType::from_u8(ch.pdu_type())
            .filter(|t| t.direction() == self.direction)
            .ok_or(invalid(ch_offset::TYPE))?;
        if ch.hlen() != pdu_type.header_len() {
            return Err(invalid(ch_offset::HLEN));
        }
        let hdgst = ch.flags() & flags::HDGSTF != 0;
        let ddgst = ch.flags() & flags::DDGSTF != 0;
        if hdgst != (pdu_type.has_digests() && self.header_digest) {
            return Err(invalid(ch_offset::FLAGS));
        }

        let hlen = usize::from(ch.hlen());
        let header_end = hlen + if hdgst { DIGEST_LEN } else { 0 };
        if buf.len() < header_end {
            return Ok(Decoded::NeedMore(header_end));
        }
        if hdgst {
            let received = read_u32(&buf[hlen..header_end]);
            let computed = crc32c(&buf[..hlen]);
            if received != computed {
                return Err(PduError::HeaderDigest { received, computed });
            }
        }

        let plen = ch.plen();
        let term_req = matches!(pdu_type, PduType::H2CTermReq | PduType::C2HTermReq);
        if pdu_type.may_carry_data() && plen > self.max_pdu_len {
            return Err(PduError::DataLimitExceeded { plen, limit: self.max_pdu_len });
        }
        if term_req && plen > TERM_REQ_MAX_PLEN {
            return Err(invalid(ch_offset::PLEN));
        }
        let plen_usize = plen as usize;
        if plen_usize < header_end {
            return Err(invalid(ch_offset::PLEN));
        }

        let (data, data_end) = self.locate_data(pdu_type, &ch, header_end, plen_usize, ddgst)?;
        let header = parse_header(pdu_type, buf, data.len())?;
        if buf.len() < plen_usize {
            return Ok(Decoded::NeedMore(plen_usize));
        }
        if ddgst {
            let received = read_u32(&buf[data_end..data_end + DIGEST_LEN]);
            let computed = crc32c(&buf[data.clone()]);
            if received != computed {
                let cccid = header.command_id().unwrap_or_default();
                return Err(PduError::DataDigest { cccid, len: plen_usize, received, computed });
            }
        }
        Ok(Decoded::Frame { header, data, len: plen_usize })
    }

    /// The PDU data range and where it ends (the data digest, if any, follows), from PDO, PLEN and DDGSTF.
    fn locate_data(
        &self,
        pdu_type: PduType,
        ch: &CommonHeader,
        header_end: usize,
        plen: usize,
        ddgst: bool,
    ) -> Result<(Range<usize>, usize), PduError> {
        if matches!(pdu_type, PduType::H2CTermReq | PduType::C2HTermReq) {
            // The offending header follows the TermReq header directly; PDO is not used and no digests apply.
            if ddgst {
                return Err(invalid(ch_offset::FLAGS));
            }
            return Ok((header_end..plen, plen));
        }
        let pdo = usize::from(ch.pdo());
        if pdo == 0 {
            if matches!(pdu_type, PduType::H2CData | PduType::C2HData) {
                return Err(invalid(ch_offset::PDO));
            }
            if ddgst {
                return Err(invalid(ch_offset::FLAGS));
            }
            if plen != header_end {
                return Err(invalid(ch_offset::PLEN));
            }
            return Ok((header_end..header_end, header_end));
        }
        if !pdu_type.may_carry_data() {
            return Err(invalid(ch_offset::PDO));
        }
        if ddgst != self.data_digest {
            return Err(invalid(ch_offset::FLAGS));
        }
        let align = (usize::from(self.pda.min(MAX_PDA)) + 1) * 4;
        if pdo < header_end || !pdo.is_multiple_of(align) {
            return Err(invalid(ch_offset::PDO));
        }
        let data_end = plen.checked_sub(if ddgst { DIGEST_LEN } else { 0 }).ok_or(invalid(ch_offset::PLEN))?;
        if data_end < pdo {
            return Err(invalid(ch_offset::PLEN));
        }
        if data_end == pdo {
            // PDO says data follows, but there is none.
            return Err(invalid(ch_offset::PDO));
        }
        Ok((pdo..data_end, data_end))
    }
}

/// Copies the header out of `buf` and checks the type specific fields.
fn parse_header(pdu_type: PduType, buf: &[u8], data_len: usize) -> Result<PduHeader, PduError> {
    Ok(match pdu_type {
        PduType::IcReq => {
            let h: IcReq = read(buf)?;
            check_pfv_and_pda(h.pfv(), h.hpda())?;
            PduHeader::IcReq(h)
        }
        PduType::IcResp => {
            let h: IcResp = read(buf)?;
            check_pfv_and_pda(h.pfv(), h.cpda())?;
            if h.maxh2cdata() < MIN_MAXH2CDATA || !h.maxh2cdata().is_multiple_of(4) {
                return Err(invalid(12));
            }
            PduHeader::IcResp(h)
        }
        PduType::H2CTermReq => PduHeader::H2CTermReq(read(buf)?),
        PduType::C2HTermReq => PduHeader::C2HTermReq(read(buf)?),
        PduType::CapsuleCmd => PduHeader::CapsuleCmd(read(buf)?),
        PduType::CapsuleResp => PduHeader::CapsuleResp(read(buf)?),
        PduType::H2CData | PduType::C2HData => {
            let h: DataHeader = read(buf)?;
            if h.datal() as usize != data_len {
                return Err(invalid(16));
            }
            if pdu_type == PduType::C2HData {
                if h.success() && !h.last() {
                    return Err(invalid(ch_offset::FLAGS));
                }
                PduHeader::C2HData(h)
            } else {
                PduHeader::H2CData(h)
            }
        }
        PduType::R2T => {
            let h: R2t = read(buf)?;
            if h.r2tl() == 0 {
                return Err(invalid(16));
            }
            PduHeader::R2T(h)
        }
    })
}

fn check_pfv_and_pda(pfv: u16, pda: u8) -> Result<(), PduError> {
    if pfv != PFV_1_0 {
        return Err(PduError::UnsupportedParameter { offset: 8 });
    }
    if pda > MAX_PDA {
        return Err(invalid(10));
    }
    Ok(())
}

/// Copies a header out of `buf`; `decode` has made sure `buf` holds HLEN bytes, so this does not fail.
fn read<T: FromBytes>(buf: &[u8]) -> Result<T, PduError> {
    T::read_from_prefix(buf).map(|(header, _)| header).map_err(|_| invalid(ch_offset::HLEN))
}

fn invalid(offset: u32) -> PduError {
    PduError::InvalidHeaderField { offset }
}

fn read_u32(bytes: &[u8]) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(le)
}

/// The receive window of a PDU stream: `data[start..end]` holds bytes received and not yet consumed. Bytes are
/// read into [`RecvBuffer::spare`]; whole PDUs are consumed from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvBuffer {
    /// The buffer; only `start..end` holds received bytes.
    pub data: Vec<u8>,
    /// First unconsumed byte.
    pub start: usize,
    /// One past the last received byte.
    pub end: usize,
}

impl RecvBuffer {
    /// An empty window over `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self { data: vec![0; capacity], start: 0, end: 0 }
    }

    /// The bytes received and not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Where the next read lands.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.data[self.end..]
    }

    /// Makes room for the current PDU after the decoder answered [`Decoded::NeedMore`] with `total` bytes:
    /// moves the pending bytes to the front when the PDU would not fit behind them, and grows the buffer when
    /// the PDU is larger than all of it (the decoder bounds `total` by its PDU length limit).
    pub fn make_room(&mut self, total: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.start + total > self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if total > self.data.len() {
                self.data.resize(total.next_power_of_two(), 0);
            }
        }
    }
}

#[cfg(test)]
mod recv_buffer_tests {
    use super::RecvBuffer;

    #[test]
    fn compacts_and_grows() {
        let mut rx = RecvBuffer::new(16);
        rx.spare()[..12].copy_from_slice(b"abcdefghijkl");
        rx.end = 12;
        rx.start = 10;
        // A PDU of 8 bytes starting at "kl" does not fit behind them: moved to the front.
        rx.make_room(8);
        assert_eq!((rx.start, rx.end, rx.pending()), (0, 2, &b"kl"[..]));
        // Larger than the buffer: grown to a power of two.
        rx.make_room(40);
        assert_eq!(rx.data.len(), 64);
        assert_eq!(rx.pending(), b"kl");
        rx.start = rx.end;
        rx.make_room(4);
        assert_eq!((rx.start, rx.end), (0, 0));
    }
}
