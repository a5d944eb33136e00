//! Netlink attributes (TLVs) on top of `netlink-packet-core`'s [`Nla`] trait: an owned tree to encode, and a
//! borrowed, bounds-checked view to decode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{Emitable, NLA_F_NESTED, Nla, NlasIterator};

use crate::FabricError;

/// One attribute to encode: raw bytes or nested attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    kind: u16,
    value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Bytes(Vec<u8>),
    Nested(Vec<Attr>),
}

impl Attr {
    pub fn bytes(kind: u16, value: impl Into<Vec<u8>>) -> Self {
        Self { kind, value: Value::Bytes(value.into()) }
    }

    pub fn u8(kind: u16, v: u8) -> Self {
        Self::bytes(kind, [v])
    }

    pub fn u16(kind: u16, v: u16) -> Self {
        Self::bytes(kind, v.to_ne_bytes())
    }

    pub fn u32(kind: u16, v: u32) -> Self {
        Self::bytes(kind, v.to_ne_bytes())
    }

    pub fn u64(kind: u16, v: u64) -> Self {
        Self::bytes(kind, v.to_ne_bytes())
    }

    /// A 16-bit value in network byte order (`__be16` attributes).
    pub fn be16(kind: u16, v: u16) -> Self {
        Self::bytes(kind, v.to_be_bytes())
    }

    /// A 32-bit value in network byte order (`__be32` attributes).
    pub fn be32(kind: u16, v: u32) -> Self {
        Self::bytes(kind, v.to_be_bytes())
    }

    /// A NUL-terminated string.
    pub fn string(kind: u16, s: &str) -> Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        Self::bytes(kind, v)
    }

    /// An address in network byte order: 4 bytes for IPv4, 16 for IPv6.
    pub fn ip(kind: u16, ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Self::bytes(kind, a.octets()),
            IpAddr::V6(a) => Self::bytes(kind, a.octets()),
        }
    }

    pub fn nested(kind: u16, children: Vec<Attr>) -> Self {
        Self { kind, value: Value::Nested(children) }
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match &self.value {
            Value::Bytes(b) => b.len(),
            Value::Nested(children) => children.as_slice().buffer_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self.value {
            Value::Bytes(_) => self.kind,
            Value::Nested(_) => self.kind | NLA_F_NESTED,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match &self.value {
            Value::Bytes(b) => buffer[..b.len()].copy_from_slice(b),
            Value::Nested(children) => children.as_slice().emit(buffer),
        }
    }
}

/// Appends the encoded attributes to `out`.
pub fn emit_all(attrs: &[Attr], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + attrs.buffer_len(), 0);
    attrs.emit(&mut out[start..]);
}

/// Decoded attributes of one level: (type without flags, value), in wire order.
#[derive(Debug, Clone, Default)]
pub struct Attrs<'a> {
    items: Vec<(u16, &'a [u8])>,
}

impl<'a> Attrs<'a> {
    /// Splits `buf` into attributes; malformed lengths are an error, never a panic.
    pub fn parse(buf: &'a [u8]) -> Result<Self, FabricError> {
        let mut items = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            let kind = nla.kind();
            let len = usize::from(nla.length()) - 4;
            let inner = nla.into_inner();
            items.push((kind, &inner[4..4 + len]));
        }
        Ok(Self { items })
    }

    /// The first attribute of type `kind`.
    pub fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.items.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, &'a [u8])> + '_ {
        self.items.iter().copied()
    }

    pub fn nested(&self, kind: u16) -> Result<Option<Attrs<'a>>, FabricError> {
        self.get(kind).map(Attrs::parse).transpose()
    }

    pub fn u8(&self, kind: u16) -> Result<Option<u8>, FabricError> {
        self.fixed::<1>(kind).map(|v| v.map(|b| b[0]))
    }

    pub fn u16(&self, kind: u16) -> Result<Option<u16>, FabricError> {
        self.fixed::<2>(kind).map(|v| v.map(u16::from_ne_bytes))
    }

    pub fn u32(&self, kind: u16) -> Result<Option<u32>, FabricError> {
        self.fixed::<4>(kind).map(|v| v.map(u32::from_ne_bytes))
    }

    pub fn be16(&self, kind: u16) -> Result<Option<u16>, FabricError> {
        self.fixed::<2>(kind).map(|v| v.map(u16::from_be_bytes))
    }

    pub fn be32(&self, kind: u16) -> Result<Option<u32>, FabricError> {
        self.fixed::<4>(kind).map(|v| v.map(u32::from_be_bytes))
    }

    pub fn mac(&self, kind: u16) -> Result<Option<[u8; 6]>, FabricError> {
        self.fixed::<6>(kind)
    }

    pub fn ipv4(&self, kind: u16) -> Result<Option<Ipv4Addr>, FabricError> {
        self.fixed::<4>(kind).map(|v| v.map(Ipv4Addr::from))
    }

    pub fn ipv6(&self, kind: u16) -> Result<Option<Ipv6Addr>, FabricError> {
        self.fixed::<16>(kind).map(|v| v.map(Ipv6Addr::from))
    }

    /// A NUL-terminated (or unterminated) UTF-8 string.
    pub fn string(&self, kind: u16) -> Result<Option<String>, FabricError> {
        let Some(v) = self.get(kind) else { return Ok(None) };
        let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
        String::from_utf8(v[..end].to_vec())
            .map(Some)
            .map_err(|_| FabricError::Decode(format!("attribute {kind} is not UTF-8")))
    }

    fn fixed<const N: usize>(&self, kind: u16) -> Result<Option<[u8; N]>, FabricError> {
        let Some(v) = self.get(kind) else { return Ok(None) };
        v.try_into()
            .map(Some)
            .map_err(|_| FabricError::Decode(format!("attribute {kind} has {} bytes, expected {N}", v.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_round_trip_with_padding() {
        let attrs = vec![
            Attr::string(1, "flower"),
            Attr::nested(2, vec![Attr::u8(9, 6), Attr::be16(19, 80), Attr::nested(3, vec![Attr::u32(7, 42)])]),
            Attr::bytes(4, [1, 2, 3, 4, 5, 6]),
        ];
        let mut out = Vec::new();
        emit_all(&attrs, &mut out);
        assert_eq!(out.len() % 4, 0);
        // "flower\0" is 7 bytes: header 4 + 7 = 11, padded to 12.
        assert_eq!(&out[..4], &[11, 0, 1, 0]);
        let top = Attrs::parse(&out).unwrap();
        assert_eq!(top.string(1).unwrap().as_deref(), Some("flower"));
        assert_eq!(top.mac(4).unwrap(), Some([1, 2, 3, 4, 5, 6]));
        let opts = top.nested(2).unwrap().unwrap();
        assert_eq!(opts.u8(9).unwrap(), Some(6));
        assert_eq!(opts.be16(19).unwrap(), Some(80));
        assert_eq!(opts.nested(3).unwrap().unwrap().u32(7).unwrap(), Some(42));
        // The nested flag is set on the wire and masked when decoding.
        let flagged = u16::from_ne_bytes([out[14], out[15]]);
        assert_eq!(flagged, 2 | NLA_F_NESTED);
        assert_eq!(top.get(99), None);
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(Attrs::parse(&[2, 0, 1]).is_err(), "short header");
        assert!(Attrs::parse(&[40, 0, 1, 0, 0, 0, 0, 0]).is_err(), "length past the buffer");
        assert!(Attrs::parse(&[2, 0, 1, 0]).is_err(), "length below the header");
        let a = Attrs::parse(&[6, 0, 1, 0, 7, 7, 0, 0]).unwrap();
        assert!(a.u32(1).is_err(), "wrong width");
        assert!(Attrs::parse(&[]).unwrap().get(1).is_none());
    }
}
