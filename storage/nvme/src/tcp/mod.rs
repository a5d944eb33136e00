//! The NVMe/TCP transport (NVMe/TCP Transport Specification 1.0): PDU layouts, digests, a framing decoder
//! for a received byte stream and encoders for the PDUs either side sends.
//!
//! A controller decodes with [`Direction::HostToController`]: the first PDU must be an ICReq (the decoder
//! reports every PDU's type; rejecting anything else with [`PduError::PduSequence`] is the connection's
//! job), it answers with [`encode_ic_resp`] and then enables the negotiated digests on its [`Decoder`] and
//! [`TxOptions`].

mod decode;
mod digest;
mod encode;
mod pdu;
#[cfg(test)]
mod tests;

pub use decode::{Decoded, Decoder, PduError, RecvBuffer};
pub use digest::{DataDigest, crc32c, data_digest, header_digest};
pub use encode::{
    DataPdu, TxOptions, encode_c2h_data_header, encode_capsule_cmd, encode_capsule_resp, encode_h2c_data_header,
    encode_ic_req, encode_ic_resp, encode_r2t, encode_term_req, offending_header,
};
pub use pdu::{
    ADMIN_IN_CAPSULE_DATA, CH_LEN, CapsuleCmd, CapsuleResp, CommonHeader, DIGEST_LEN, DISCOVERY_PORT, DataHeader,
    Direction, FatalErrorStatus, IcReq, IcResp, MAX_PDA, MIN_MAXH2CDATA, PFV_1_0, PORT, PduHeader, PduType, R2t,
    TERM_REQ_MAX_ERROR_DATA, TERM_REQ_MAX_PLEN, TermReq, ch_offset, digest_bits, flags,
};
