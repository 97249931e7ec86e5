//! BER encoding and decoding of SNMP v1/v2c messages (RFC 1157, RFC 3416).
//!
//! The decoder reads datagrams from the network: it never panics, bounds every length and
//! count, accepts only the fixed nesting of an SNMP message (message, PDU, variable-binding
//! list, variable binding, value) and answers errors naming the offset and what is wrong.

use std::fmt;
use std::str::FromStr;

/// The largest datagram the decoder accepts (the largest UDP payload over IPv4).
pub const MAX_MESSAGE_LEN: usize = 65_507;
/// The most variable bindings one PDU may carry.
pub const MAX_VARBINDS: usize = 256;
/// The most sub-identifiers an OID may have (RFC 2578 says 128).
pub const MAX_OID_COMPONENTS: usize = 128;

const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_NULL: u8 = 0x05;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_IP_ADDRESS: u8 = 0x40;
const TAG_COUNTER32: u8 = 0x41;
const TAG_GAUGE32: u8 = 0x42;
const TAG_TIMETICKS: u8 = 0x43;
const TAG_OPAQUE: u8 = 0x44;
const TAG_COUNTER64: u8 = 0x46;
const TAG_NO_SUCH_OBJECT: u8 = 0x80;
const TAG_NO_SUCH_INSTANCE: u8 = 0x81;
const TAG_END_OF_MIB_VIEW: u8 = 0x82;

/// An object identifier, e.g. `1.3.6.1.2.1.1.1.0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Oid(Vec<u32>);

impl Oid {
    /// Builds an OID from its sub-identifiers: 2 to 128 of them, the first 0, 1 or 2 and,
    /// when the first is 0 or 1, the second below 40 (what BER can encode).
    pub fn new(components: Vec<u32>) -> Result<Oid, String> {
        if components.len() < 2 {
            return Err("an OID needs at least two sub-identifiers".to_string());
        }
        if components.len() > MAX_OID_COMPONENTS {
            return Err(format!(
                "an OID has at most {MAX_OID_COMPONENTS} sub-identifiers, this one has {}",
                components.len()
            ));
        }
        match (components[0], components[1]) {
            (0 | 1, second) if second >= 40 => Err(format!(
                "the second sub-identifier must be below 40 when the first is 0 or 1, got {second}"
            )),
            (0..=2, _) => Ok(Oid(components)),
            (first, _) => Err(format!(
                "the first sub-identifier must be 0, 1 or 2, got {first}"
            )),
        }
    }

    /// An OID from sub-identifiers known to be valid (the crate's own constants).
    pub(crate) fn from_known(components: Vec<u32>) -> Oid {
        Oid(components)
    }

    /// The sub-identifiers.
    pub fn components(&self) -> &[u32] {
        &self.0
    }

    /// This OID with one more sub-identifier (a table column plus a row index).
    pub fn child(&self, sub: u32) -> Result<Oid, String> {
        let mut v = self.0.clone();
        v.push(sub);
        Oid::new(v)
    }

    /// Whether `prefix` is this OID or one of its ancestors.
    pub fn starts_with(&self, prefix: &Oid) -> bool {
        self.0.starts_with(&prefix.0)
    }
}

impl FromStr for Oid {
    type Err = String;

    /// Parses dotted decimal, with or without a leading dot (`.1.3.6.1.4.1.318`).
    fn from_str(s: &str) -> Result<Oid, String> {
        let body = s.trim();
        let body = body.strip_prefix('.').unwrap_or(body);
        if body.is_empty() {
            return Err("an empty OID".to_string());
        }
        let mut parts = Vec::new();
        for part in body.split('.') {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{s:?} is not a dotted-decimal OID (bad part {part:?})"
                ));
            }
            let n = part
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: sub-identifier {part} is larger than 4294967295"))?;
            parts.push(n);
        }
        Oid::new(parts).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// The value of a variable binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// INTEGER (Integer32 in SMIv2; up to 64 bits are accepted when decoding).
    Integer(i64),
    /// OCTET STRING.
    OctetString(Vec<u8>),
    /// NULL, the value of every binding in a Get or GetNext request.
    Null,
    /// OBJECT IDENTIFIER.
    ObjectId(Oid),
    /// IpAddress.
    IpAddress([u8; 4]),
    /// Counter32.
    Counter32(u32),
    /// Gauge32 (also Unsigned32).
    Gauge32(u32),
    /// TimeTicks, in hundredths of seconds.
    TimeTicks(u32),
    /// Opaque (its BER-wrapped bytes, not interpreted).
    Opaque(Vec<u8>),
    /// Counter64 (SNMPv2c only).
    Counter64(u64),
    /// The agent has no such object (SNMPv2c exception).
    NoSuchObject,
    /// The agent has the object but not this instance (SNMPv2c exception).
    NoSuchInstance,
    /// A GetNext went past the end of what the agent has (SNMPv2c exception).
    EndOfMibView,
}

impl Value {
    /// The value as an integer, for the numeric types.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Integer(n) => Some(n),
            Value::Counter32(n) | Value::Gauge32(n) | Value::TimeTicks(n) => Some(i64::from(n)),
            Value::Counter64(n) => i64::try_from(n).ok(),
            _ => None,
        }
    }

    /// The value as a float, for the numeric types (Counter64 may lose precision).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Counter64(n) => Some(n as f64),
            _ => self.as_i64().map(|n| n as f64),
        }
    }

    /// Whether this is one of the SNMPv2c exceptions (noSuchObject, noSuchInstance,
    /// endOfMibView).
    pub fn is_exception(&self) -> bool {
        matches!(
            self,
            Value::NoSuchObject | Value::NoSuchInstance | Value::EndOfMibView
        )
    }

    /// The SMI type name, as net-snmp's tools print it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Integer(_) => "INTEGER",
            Value::OctetString(_) => "STRING",
            Value::Null => "NULL",
            Value::ObjectId(_) => "OID",
            Value::IpAddress(_) => "IpAddress",
            Value::Counter32(_) => "Counter32",
            Value::Gauge32(_) => "Gauge32",
            Value::TimeTicks(_) => "Timeticks",
            Value::Opaque(_) => "Opaque",
            Value::Counter64(_) => "Counter64",
            Value::NoSuchObject => "noSuchObject",
            Value::NoSuchInstance => "noSuchInstance",
            Value::EndOfMibView => "endOfMibView",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Integer(n) => write!(f, "{n}"),
            Value::OctetString(b) | Value::Opaque(b) => match std::str::from_utf8(b) {
                Ok(s) if !s.chars().any(char::is_control) => write!(f, "{s:?}"),
                _ => {
                    f.write_str("0x")?;
                    for byte in b {
                        write!(f, "{byte:02x}")?;
                    }
                    Ok(())
                }
            },
            Value::Null => f.write_str("NULL"),
            Value::ObjectId(o) => write!(f, "{o}"),
            Value::IpAddress([a, b, c, d]) => write!(f, "{a}.{b}.{c}.{d}"),
            Value::Counter32(n) | Value::Gauge32(n) | Value::TimeTicks(n) => write!(f, "{n}"),
            Value::Counter64(n) => write!(f, "{n}"),
            Value::NoSuchObject | Value::NoSuchInstance | Value::EndOfMibView => {
                f.write_str(self.type_name())
            }
        }
    }
}

/// SNMP protocol version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// SNMPv1 (version field 0).
    V1,
    /// SNMPv2c (version field 1).
    V2c,
}

impl Version {
    fn wire(self) -> i64 {
        match self {
            Version::V1 => 0,
            Version::V2c => 1,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "1",
            Version::V2c => "2c",
        })
    }
}

/// The kind of a PDU, by its context tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduKind {
    /// GetRequest (0xa0).
    GetRequest,
    /// GetNextRequest (0xa1).
    GetNextRequest,
    /// GetResponse / Response (0xa2).
    Response,
    /// SetRequest (0xa3).
    SetRequest,
    /// GetBulkRequest (0xa5, SNMPv2c); its error fields are non-repeaters and max-repetitions.
    GetBulkRequest,
    /// InformRequest (0xa6).
    InformRequest,
    /// SNMPv2-Trap (0xa7).
    TrapV2,
    /// Report (0xa8).
    Report,
}

impl PduKind {
    fn tag(self) -> u8 {
        match self {
            PduKind::GetRequest => 0xa0,
            PduKind::GetNextRequest => 0xa1,
            PduKind::Response => 0xa2,
            PduKind::SetRequest => 0xa3,
            PduKind::GetBulkRequest => 0xa5,
            PduKind::InformRequest => 0xa6,
            PduKind::TrapV2 => 0xa7,
            PduKind::Report => 0xa8,
        }
    }

    fn from_tag(tag: u8) -> Option<PduKind> {
        Some(match tag {
            0xa0 => PduKind::GetRequest,
            0xa1 => PduKind::GetNextRequest,
            0xa2 => PduKind::Response,
            0xa3 => PduKind::SetRequest,
            0xa5 => PduKind::GetBulkRequest,
            0xa6 => PduKind::InformRequest,
            0xa7 => PduKind::TrapV2,
            0xa8 => PduKind::Report,
            _ => return None,
        })
    }
}

/// One variable binding: an OID and its value.
pub type VarBind = (Oid, Value);

/// A PDU of SNMP v1/v2c (all but the v1 Trap share this shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// What kind of PDU this is.
    pub kind: PduKind,
    /// The request id a response must echo.
    pub request_id: i32,
    /// The error-status (0 is noError; see [`error_status_name`]).
    pub error_status: i32,
    /// The 1-based index of the binding the error is about (0 when none).
    pub error_index: i32,
    /// The variable bindings.
    pub varbinds: Vec<VarBind>,
}

/// A whole SNMP v1/v2c message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Protocol version.
    pub version: Version,
    /// Community string.
    pub community: Vec<u8>,
    /// The PDU.
    pub pdu: Pdu,
}

/// The name of an SNMP error-status (RFC 3416), e.g. `notWritable` for 17.
pub fn error_status_name(status: i32) -> &'static str {
    match status {
        0 => "noError",
        1 => "tooBig",
        2 => "noSuchName",
        3 => "badValue",
        4 => "readOnly",
        5 => "genErr",
        6 => "noAccess",
        7 => "wrongType",
        8 => "wrongLength",
        9 => "wrongEncoding",
        10 => "wrongValue",
        11 => "noCreation",
        12 => "inconsistentValue",
        13 => "resourceUnavailable",
        14 => "commitFailed",
        15 => "undoFailed",
        16 => "authorizationError",
        17 => "notWritable",
        18 => "inconsistentName",
        _ => "unknown error-status",
    }
}

/// Why a datagram is not a valid SNMP v1/v2c message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SNMP message at byte {offset}: {what}")]
pub struct DecodeError {
    /// Offset in the datagram where the problem was found.
    pub offset: usize,
    /// What is wrong.
    pub what: String,
}

// ---------------------------------------------------------------------------------------
// Encoding

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_len(out, content.len());
    out.extend_from_slice(content);
}

fn int_bytes(n: i64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let mut start = 0;
    // Drop leading bytes that only repeat the sign of the next one.
    while start < 7 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

fn uint_bytes(n: u64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count().min(7);
    let mut v = Vec::with_capacity(9);
    if bytes[skip] & 0x80 != 0 {
        v.push(0);
    }
    v.extend_from_slice(&bytes[skip..]);
    v
}

fn push_base128(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 10];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            break;
        }
    }
    let last = tmp.len() - 1;
    for (j, b) in tmp.iter().enumerate().skip(i) {
        out.push(if j == last { *b } else { b | 0x80 });
    }
}

fn oid_bytes(oid: &Oid) -> Vec<u8> {
    let c = oid.components();
    let mut out = Vec::with_capacity(c.len() + 4);
    // Oid::new guarantees at least two components.
    let first = u64::from(c.first().copied().unwrap_or(0));
    let second = u64::from(c.get(1).copied().unwrap_or(0));
    push_base128(&mut out, first * 40 + second);
    for &sub in c.iter().skip(2) {
        push_base128(&mut out, u64::from(sub));
    }
    out
}

fn value_tlv(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Integer(n) => push_tlv(out, TAG_INTEGER, &int_bytes(*n)),
        Value::OctetString(b) => push_tlv(out, TAG_OCTET_STRING, b),
        Value::Null => push_tlv(out, TAG_NULL, &[]),
        Value::ObjectId(o) => push_tlv(out, TAG_OID, &oid_bytes(o)),
        Value::IpAddress(a) => push_tlv(out, TAG_IP_ADDRESS, a),
        Value::Counter32(n) => push_tlv(out, TAG_COUNTER32, &uint_bytes(u64::from(*n))),
        Value::Gauge32(n) => push_tlv(out, TAG_GAUGE32, &uint_bytes(u64::from(*n))),
        Value::TimeTicks(n) => push_tlv(out, TAG_TIMETICKS, &uint_bytes(u64::from(*n))),
        Value::Opaque(b) => push_tlv(out, TAG_OPAQUE, b),
        Value::Counter64(n) => push_tlv(out, TAG_COUNTER64, &uint_bytes(*n)),
        Value::NoSuchObject => push_tlv(out, TAG_NO_SUCH_OBJECT, &[]),
        Value::NoSuchInstance => push_tlv(out, TAG_NO_SUCH_INSTANCE, &[]),
        Value::EndOfMibView => push_tlv(out, TAG_END_OF_MIB_VIEW, &[]),
    }
}

/// Encodes a message in BER (definite, minimal lengths).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut binds = Vec::new();
    for (oid, value) in &msg.pdu.varbinds {
        let mut vb = Vec::new();
        push_tlv(&mut vb, TAG_OID, &oid_bytes(oid));
        value_tlv(&mut vb, value);
        push_tlv(&mut binds, TAG_SEQUENCE, &vb);
    }
    let mut pdu = Vec::new();
    push_tlv(
        &mut pdu,
        TAG_INTEGER,
        &int_bytes(i64::from(msg.pdu.request_id)),
    );
    push_tlv(
        &mut pdu,
        TAG_INTEGER,
        &int_bytes(i64::from(msg.pdu.error_status)),
    );
    push_tlv(
        &mut pdu,
        TAG_INTEGER,
        &int_bytes(i64::from(msg.pdu.error_index)),
    );
    push_tlv(&mut pdu, TAG_SEQUENCE, &binds);
    let mut body = Vec::new();
    push_tlv(&mut body, TAG_INTEGER, &int_bytes(msg.version.wire()));
    push_tlv(&mut body, TAG_OCTET_STRING, &msg.community);
    push_tlv(&mut body, msg.pdu.kind.tag(), &pdu);
    let mut out = Vec::with_capacity(body.len() + 4);
    push_tlv(&mut out, TAG_SEQUENCE, &body);
    out
}

// ---------------------------------------------------------------------------------------
// Decoding

/// A window `[pos, end)` of the datagram; offsets in errors are absolute.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

/// One decoded TLV: its tag and where its content lies.
struct Tlv {
    tag: u8,
    start: usize,
    end: usize,
}

fn err(offset: usize, what: impl Into<String>) -> DecodeError {
    DecodeError {
        offset,
        what: what.into(),
    }
}

impl<'a> Reader<'a> {
    fn byte(&mut self, what: &str) -> Result<u8, DecodeError> {
        if self.pos >= self.end {
            return Err(err(self.pos, format!("truncated {what}")));
        }
        let b = self
            .buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| err(self.pos, "truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn tlv(&mut self, what: &str) -> Result<Tlv, DecodeError> {
        let at = self.pos;
        let tag = self.byte(&format!("{what} (tag)"))?;
        if tag & 0x1f == 0x1f {
            return Err(err(
                at,
                format!("{what}: multi-byte tags are not used by SNMP (tag 0x{tag:02x})"),
            ));
        }
        let first = self.byte(&format!("{what} (length)"))?;
        let len = if first < 0x80 {
            usize::from(first)
        } else if first == 0x80 {
            return Err(err(
                at + 1,
                format!("{what}: indefinite lengths are not allowed in SNMP"),
            ));
        } else {
            let n = usize::from(first & 0x7f);
            if n > 4 {
                return Err(err(
                    at + 1,
                    format!("{what}: a length of {n} bytes is too long"),
                ));
            }
            let mut len = 0usize;
            for _ in 0..n {
                len = (len << 8) | usize::from(self.byte(&format!("{what} (length)"))?);
            }
            len
        };
        let remaining = self.end - self.pos;
        if len > remaining {
            return Err(err(
                at,
                format!(
                    "{what}: length {len} runs past the end of its container ({remaining} bytes left)"
                ),
            ));
        }
        let start = self.pos;
        self.pos += len;
        Ok(Tlv {
            tag,
            start,
            end: self.pos,
        })
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<Reader<'a>, DecodeError> {
        let at = self.pos;
        let t = self.tlv(what)?;
        if t.tag != tag {
            return Err(err(
                at,
                format!("{what}: expected tag 0x{tag:02x}, got 0x{:02x}", t.tag),
            ));
        }
        Ok(Reader {
            buf: self.buf,
            pos: t.start,
            end: t.end,
        })
    }

    fn content(&self, t: &Tlv) -> &'a [u8] {
        self.buf.get(t.start..t.end).unwrap_or(&[])
    }

    fn integer(&mut self, what: &str) -> Result<i64, DecodeError> {
        let at = self.pos;
        let t = self.tlv(what)?;
        if t.tag != TAG_INTEGER {
            return Err(err(
                at,
                format!("{what}: expected an INTEGER, got tag 0x{:02x}", t.tag),
            ));
        }
        decode_int(self.content(&t), t.start, what)
    }

    fn int32(&mut self, what: &str) -> Result<i32, DecodeError> {
        let at = self.pos;
        let n = self.integer(what)?;
        i32::try_from(n).map_err(|_| err(at, format!("{what}: {n} does not fit in 32 bits")))
    }

    fn finish(&self, what: &str) -> Result<(), DecodeError> {
        if self.pos < self.end {
            return Err(err(
                self.pos,
                format!("{} unexpected bytes after {what}", self.end - self.pos),
            ));
        }
        Ok(())
    }
}

fn decode_int(c: &[u8], at: usize, what: &str) -> Result<i64, DecodeError> {
    if c.is_empty() {
        return Err(err(at, format!("{what}: an INTEGER with no content bytes")));
    }
    if c.len() > 8 {
        return Err(err(
            at,
            format!("{what}: an INTEGER of {} bytes is too large", c.len()),
        ));
    }
    let mut n: i64 = if c[0] & 0x80 != 0 { -1 } else { 0 };
    for &b in c {
        n = (n << 8) | i64::from(b);
    }
    Ok(n)
}

fn decode_uint(c: &[u8], at: usize, bits: u32, what: &str) -> Result<u64, DecodeError> {
    if c.is_empty() {
        return Err(err(at, format!("{what}: no content bytes")));
    }
    let digits = c.iter().skip_while(|&&b| b == 0).count();
    let max_bytes = (bits / 8) as usize;
    if digits > max_bytes || c.len() > max_bytes + 1 {
        return Err(err(
            at,
            format!(
                "{what}: {} content bytes do not fit in {bits} bits",
                c.len()
            ),
        ));
    }
    let mut n = 0u64;
    for &b in c {
        n = (n << 8) | u64::from(b);
    }
    Ok(n)
}

fn decode_oid(c: &[u8], at: usize, what: &str) -> Result<Oid, DecodeError> {
    if c.is_empty() {
        return Err(err(
            at,
            format!("{what}: an OBJECT IDENTIFIER with no content bytes"),
        ));
    }
    let mut subs: Vec<u64> = Vec::new();
    let mut cur: u64 = 0;
    let mut in_progress = false;
    for (i, &b) in c.iter().enumerate() {
        if !in_progress && b == 0x80 {
            return Err(err(
                at + i,
                format!("{what}: sub-identifier with a leading 0x80 byte"),
            ));
        }
        if cur > u64::from(u32::MAX) {
            return Err(err(
                at + i,
                format!("{what}: sub-identifier larger than 32 bits"),
            ));
        }
        cur = (cur << 7) | u64::from(b & 0x7f);
        in_progress = b & 0x80 != 0;
        if !in_progress {
            subs.push(cur);
            cur = 0;
            // The first encoded sub-identifier holds two components.
            if subs.len() + 1 > MAX_OID_COMPONENTS {
                return Err(err(
                    at + i,
                    format!("{what}: more than {MAX_OID_COMPONENTS} sub-identifiers"),
                ));
            }
        }
    }
    if in_progress {
        return Err(err(
            at + c.len(),
            format!("{what}: the last sub-identifier is cut off"),
        ));
    }
    let mut comps = Vec::with_capacity(subs.len() + 1);
    let first = subs.first().copied().unwrap_or(0);
    let (a, b) = match first {
        0..=39 => (0, first),
        40..=79 => (1, first - 40),
        _ => (2, first - 80),
    };
    comps.push(a);
    comps.push(b);
    comps.extend(subs.iter().skip(1).copied());
    let comps = comps
        .into_iter()
        .map(|n| {
            u32::try_from(n).map_err(|_| {
                err(
                    at,
                    format!("{what}: sub-identifier {n} larger than 32 bits"),
                )
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Oid::new(comps).map_err(|e| err(at, format!("{what}: {e}")))
}

fn decode_value(r: &mut Reader<'_>, what: &str) -> Result<Value, DecodeError> {
    let at = r.pos;
    let t = r.tlv(what)?;
    let c = r.content(&t);
    let empty = |v: Value| {
        if c.is_empty() {
            Ok(v)
        } else {
            Err(err(
                t.start,
                format!(
                    "{what}: {} must have no content, has {} bytes",
                    v.type_name(),
                    c.len()
                ),
            ))
        }
    };
    let u32_of = |n: u64| {
        u32::try_from(n).map_err(|_| err(t.start, format!("{what}: {n} does not fit in 32 bits")))
    };
    match t.tag {
        TAG_INTEGER => Ok(Value::Integer(decode_int(c, t.start, what)?)),
        TAG_OCTET_STRING => Ok(Value::OctetString(c.to_vec())),
        TAG_NULL => empty(Value::Null),
        TAG_OID => Ok(Value::ObjectId(decode_oid(c, t.start, what)?)),
        TAG_IP_ADDRESS => match <[u8; 4]>::try_from(c) {
            Ok(a) => Ok(Value::IpAddress(a)),
            Err(_) => Err(err(
                t.start,
                format!("{what}: an IpAddress must have 4 bytes, has {}", c.len()),
            )),
        },
        TAG_COUNTER32 => Ok(Value::Counter32(u32_of(decode_uint(
            c, t.start, 32, what,
        )?)?)),
        TAG_GAUGE32 => Ok(Value::Gauge32(u32_of(decode_uint(c, t.start, 32, what)?)?)),
        TAG_TIMETICKS => Ok(Value::TimeTicks(u32_of(decode_uint(
            c, t.start, 32, what,
        )?)?)),
        TAG_OPAQUE => Ok(Value::Opaque(c.to_vec())),
        TAG_COUNTER64 => Ok(Value::Counter64(decode_uint(c, t.start, 64, what)?)),
        TAG_NO_SUCH_OBJECT => empty(Value::NoSuchObject),
        TAG_NO_SUCH_INSTANCE => empty(Value::NoSuchInstance),
        TAG_END_OF_MIB_VIEW => empty(Value::EndOfMibView),
        other => Err(err(
            at,
            format!("{what}: unknown value type tag 0x{other:02x}"),
        )),
    }
}

/// Decodes one datagram as an SNMP v1/v2c message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    if buf.len() > MAX_MESSAGE_LEN {
        return Err(err(
            0,
            format!(
                "{} bytes is more than the {MAX_MESSAGE_LEN} a message may have",
                buf.len()
            ),
        ));
    }
    let mut top = Reader {
        buf,
        pos: 0,
        end: buf.len(),
    };
    let mut msg = top.expect(TAG_SEQUENCE, "message")?;
    top.finish("the message")?;

    let at = msg.pos;
    let version = match msg.integer("version")? {
        0 => Version::V1,
        1 => Version::V2c,
        3 => return Err(err(at, "SNMPv3 messages are not supported")),
        v => return Err(err(at, format!("unknown SNMP version field {v}"))),
    };
    let community = msg.expect(TAG_OCTET_STRING, "community")?;
    let community = buf
        .get(community.pos..community.end)
        .unwrap_or(&[])
        .to_vec();

    let at = msg.pos;
    let t = msg.tlv("PDU")?;
    let kind = match PduKind::from_tag(t.tag) {
        Some(k) => k,
        None if t.tag == 0xa4 => return Err(err(at, "SNMPv1 Trap PDUs are not supported")),
        None => return Err(err(at, format!("unknown PDU type tag 0x{:02x}", t.tag))),
    };
    msg.finish("the PDU")?;
    let mut pdu = Reader {
        buf,
        pos: t.start,
        end: t.end,
    };
    let request_id = pdu.int32("request-id")?;
    let error_status = pdu.int32("error-status")?;
    let error_index = pdu.int32("error-index")?;
    let mut list = pdu.expect(TAG_SEQUENCE, "variable-bindings")?;
    pdu.finish("the variable-bindings")?;

    let mut varbinds = Vec::new();
    while !list.is_empty() {
        if varbinds.len() >= MAX_VARBINDS {
            return Err(err(
                list.pos,
                format!("more than {MAX_VARBINDS} variable bindings"),
            ));
        }
        let n = varbinds.len() + 1;
        let mut vb = list.expect(TAG_SEQUENCE, &format!("variable binding {n}"))?;
        let at = vb.pos;
        let t = vb.tlv(&format!("name of variable binding {n}"))?;
        if t.tag != TAG_OID {
            return Err(err(
                at,
                format!(
                    "name of variable binding {n}: expected an OBJECT IDENTIFIER, got tag 0x{:02x}",
                    t.tag
                ),
            ));
        }
        let oid = decode_oid(
            vb.content(&t),
            t.start,
            &format!("name of variable binding {n}"),
        )?;
        let value = decode_value(&mut vb, &format!("value of variable binding {n} ({oid})"))?;
        vb.finish(&format!("variable binding {n}"))?;
        varbinds.push((oid, value));
    }
    Ok(Message {
        version,
        community,
        pdu: Pdu {
            kind,
            request_id,
            error_status,
            error_index,
            varbinds,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(s: &str) -> Oid {
        s.parse().expect("test OID")
    }

    #[test]
    fn encodes_a_get_request_like_net_snmp() {
        // snmpget -v2c -c public host 1.3.6.1.2.1.1.1.0 with request-id 1.
        let msg = Message {
            version: Version::V2c,
            community: b"public".to_vec(),
            pdu: Pdu {
                kind: PduKind::GetRequest,
                request_id: 1,
                error_status: 0,
                error_index: 0,
                varbinds: vec![(oid("1.3.6.1.2.1.1.1.0"), Value::Null)],
            },
        };
        let bytes = encode(&msg);
        let expected: &[u8] = &[
            0x30, 0x26, 0x02, 0x01, 0x01, 0x04, 0x06, b'p', b'u', b'b', b'l', b'i', b'c', 0xa0,
            0x19, 0x02, 0x01, 0x01, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00, 0x30, 0x0e, 0x30, 0x0c,
            0x06, 0x08, 0x2b, 0x06, 0x01, 0x02, 0x01, 0x01, 0x01, 0x00, 0x05, 0x00,
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode(&bytes), Ok(msg));
    }

    #[test]
    fn values_round_trip() {
        let values = vec![
            Value::Integer(0),
            Value::Integer(-1),
            Value::Integer(128),
            Value::Integer(-129),
            Value::Integer(i64::MIN),
            Value::Integer(i64::MAX),
            Value::OctetString(vec![0; 300]),
            Value::ObjectId(oid("2.999.4294967295")),
            Value::IpAddress([127, 0, 0, 1]),
            Value::Counter32(u32::MAX),
            Value::Gauge32(0x80),
            Value::TimeTicks(12345),
            Value::Counter64(u64::MAX),
            Value::NoSuchObject,
            Value::NoSuchInstance,
            Value::EndOfMibView,
        ];
        let msg = Message {
            version: Version::V1,
            community: b"private".to_vec(),
            pdu: Pdu {
                kind: PduKind::Response,
                request_id: i32::MIN,
                error_status: 17,
                error_index: 2,
                varbinds: values
                    .into_iter()
                    .map(|v| (oid("1.3.6.1.4.1.318.1"), v))
                    .collect(),
            },
        };
        assert_eq!(decode(&encode(&msg)), Ok(msg));
    }

    #[test]
    fn malformed_messages_are_errors_naming_the_problem() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "truncated message"),
            (&[0x30, 0x80], "indefinite"),
            (&[0x30, 0x85, 1, 1, 1, 1, 1], "too long"),
            (&[0x30, 0x05, 0x02, 0x01], "runs past"),
            (&[0x30, 0x03, 0x02, 0x01, 0x03], "SNMPv3"),
            (&[0x30, 0x02, 0x02, 0x00], "no content"),
            (&[0x30, 0x00, 0x00], "unexpected bytes after the message"),
            (
                &[0x30, 0x07, 0x02, 0x01, 0x01, 0x04, 0x00, 0xa4, 0x00],
                "Trap",
            ),
        ];
        for (bytes, needle) in cases {
            let e = decode(bytes).expect_err("malformed input decoded");
            assert!(e.to_string().contains(needle), "{bytes:02x?}: {e}");
        }
    }

    #[test]
    fn oid_parsing_checks_its_input() {
        assert_eq!(oid(".1.3.6.1").to_string(), "1.3.6.1");
        for bad in ["", "1", "1..3", "3.1", "1.40", "1.3.x", "1.3.4294967296"] {
            assert!(bad.parse::<Oid>().is_err(), "{bad:?} parsed");
        }
    }
}
