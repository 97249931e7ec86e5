//! TFTP packets: pure parsing and encoding, no I/O.
//!
//! Covers RFC 1350 (RRQ, WRQ, DATA, ACK, ERROR) and the option extension of RFC 2347
//! (OACK) with the options `blksize` (RFC 2348), `tsize` and `timeout` (RFC 2349) and
//! `windowsize` (RFC 7440). Options this module does not know are kept as
//! [`TftpOption::Unknown`] so that a server can ignore them, as RFC 2347 asks.
//!
//! [`parse`] never panics: every malformed input gives a [`PacketError`] that says what is
//! wrong and in which packet.

use std::fmt;

/// Opcode of a read request.
pub const OP_RRQ: u16 = 1;
/// Opcode of a write request.
pub const OP_WRQ: u16 = 2;
/// Opcode of a data packet.
pub const OP_DATA: u16 = 3;
/// Opcode of an acknowledgement.
pub const OP_ACK: u16 = 4;
/// Opcode of an error packet.
pub const OP_ERROR: u16 = 5;
/// Opcode of an option acknowledgement (RFC 2347).
pub const OP_OACK: u16 = 6;

/// Smallest `blksize` allowed by RFC 2348.
pub const MIN_BLKSIZE: u16 = 8;
/// Largest `blksize` allowed by RFC 2348.
pub const MAX_BLKSIZE: u16 = 65464;
/// Block size of plain RFC 1350 transfers.
pub const DEFAULT_BLKSIZE: u16 = 512;

/// Error codes of RFC 1350 (and 8 from RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 0: not defined, see the message.
    NotDefined,
    /// 1: file not found.
    FileNotFound,
    /// 2: access violation.
    AccessViolation,
    /// 3: disk full or allocation exceeded.
    DiskFull,
    /// 4: illegal TFTP operation.
    IllegalOperation,
    /// 5: unknown transfer ID.
    UnknownTransferId,
    /// 6: file already exists.
    FileExists,
    /// 7: no such user.
    NoSuchUser,
    /// 8: option negotiation refused (RFC 2347).
    OptionNegotiation,
    /// Any other code.
    Other(u16),
}

impl ErrorCode {
    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionNegotiation => 8,
            ErrorCode::Other(c) => c,
        }
    }

    /// The code for a numeric value from the wire.
    pub fn from_code(code: u16) -> ErrorCode {
        match code {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionNegotiation,
            c => ErrorCode::Other(c),
        }
    }
}

/// Transfer mode of a request (case-insensitive on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `netascii`.
    NetAscii,
    /// `octet`.
    Octet,
    /// `mail` (obsolete, RFC 1350 only mentions it).
    Mail,
}

impl Mode {
    /// The mode name as encoded on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::NetAscii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// One option of a request or of an OACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TftpOption {
    /// `blksize` (RFC 2348), 8..=65464 bytes.
    BlkSize(u16),
    /// `tsize` (RFC 2349): 0 in a read request, the file size in the OACK.
    TSize(u64),
    /// `timeout` (RFC 2349), 1..=255 seconds.
    Timeout(u8),
    /// `windowsize` (RFC 7440), 1..=65535 blocks.
    WindowSize(u16),
    /// An option this module does not know (name in lower case).
    Unknown {
        /// Option name, lower-cased.
        name: String,
        /// Option value as sent.
        value: String,
    },
}

impl TftpOption {
    fn name(&self) -> &str {
        match self {
            TftpOption::BlkSize(_) => "blksize",
            TftpOption::TSize(_) => "tsize",
            TftpOption::Timeout(_) => "timeout",
            TftpOption::WindowSize(_) => "windowsize",
            TftpOption::Unknown { name, .. } => name,
        }
    }

    fn value(&self) -> String {
        match self {
            TftpOption::BlkSize(v) => v.to_string(),
            TftpOption::TSize(v) => v.to_string(),
            TftpOption::Timeout(v) => v.to_string(),
            TftpOption::WindowSize(v) => v.to_string(),
            TftpOption::Unknown { value, .. } => value.clone(),
        }
    }
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name as sent (not yet checked against any root).
    pub filename: String,
    /// Transfer mode.
    pub mode: Mode,
    /// Options in the order they were sent.
    pub options: Vec<TftpOption>,
}

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Read request.
    Rrq(Request),
    /// Write request.
    Wrq(Request),
    /// Data block.
    Data {
        /// Block number (wraps around after 65535).
        block: u16,
        /// Payload, at most the block size.
        data: Vec<u8>,
    },
    /// Acknowledgement of a block (0 acknowledges an OACK).
    Ack {
        /// Acknowledged block number.
        block: u16,
    },
    /// Error; ends the transfer.
    Error {
        /// Error code.
        code: ErrorCode,
        /// Human-readable message.
        message: String,
    },
    /// Option acknowledgement (RFC 2347).
    Oack(Vec<TftpOption>),
}

/// Why a datagram is not a valid TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{packet}: {problem}")]
pub struct PacketError {
    /// Which packet kind was being parsed (`RRQ`, `DATA`, …, or `packet`).
    pub packet: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn err(packet: &'static str, problem: impl fmt::Display) -> PacketError {
    PacketError {
        packet,
        problem: problem.to_string(),
    }
}

/// Splits off one NUL-terminated string from `rest`.
fn take_str<'a>(
    packet: &'static str,
    what: &str,
    rest: &mut &'a [u8],
) -> Result<&'a str, PacketError> {
    let Some(nul) = rest.iter().position(|&b| b == 0) else {
        return Err(err(packet, format!("{what} is not NUL-terminated")));
    };
    let (s, tail) = rest.split_at(nul);
    *rest = tail.get(1..).unwrap_or(&[]);
    std::str::from_utf8(s).map_err(|_| err(packet, format!("{what} is not valid UTF-8")))
}

fn parse_number<T: std::str::FromStr>(
    packet: &'static str,
    name: &str,
    value: &str,
) -> Result<T, PacketError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(
            packet,
            format!("option {name} value `{value}` is not a decimal number"),
        ));
    }
    value.parse().map_err(|_| {
        err(
            packet,
            format!("option {name} value `{value}` is too large"),
        )
    })
}

fn parse_option(packet: &'static str, name: &str, value: &str) -> Result<TftpOption, PacketError> {
    let lname = name.to_ascii_lowercase();
    let range = |v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(err(
                packet,
                format!("option {lname} value {v} is outside {lo}..={hi}"),
            ))
        }
    };
    Ok(match lname.as_str() {
        "blksize" => {
            let v: u64 = parse_number(packet, &lname, value)?;
            range(v, MIN_BLKSIZE.into(), MAX_BLKSIZE.into())?;
            TftpOption::BlkSize(v as u16)
        }
        "tsize" => TftpOption::TSize(parse_number(packet, &lname, value)?),
        "timeout" => {
            let v: u64 = parse_number(packet, &lname, value)?;
            range(v, 1, 255)?;
            TftpOption::Timeout(v as u8)
        }
        "windowsize" => {
            let v: u64 = parse_number(packet, &lname, value)?;
            range(v, 1, 65535)?;
            TftpOption::WindowSize(v as u16)
        }
        _ => TftpOption::Unknown {
            name: lname,
            value: value.to_string(),
        },
    })
}

fn parse_options(packet: &'static str, mut rest: &[u8]) -> Result<Vec<TftpOption>, PacketError> {
    let mut options = Vec::new();
    while !rest.is_empty() {
        let name = take_str(packet, "option name", &mut rest)?;
        if name.is_empty() {
            return Err(err(packet, "option name is empty"));
        }
        let value = take_str(packet, &format!("value of option {name}"), &mut rest)?;
        let option = parse_option(packet, name, value)?;
        if options
            .iter()
            .any(|o: &TftpOption| o.name() == option.name())
        {
            return Err(err(packet, format!("option {} is repeated", option.name())));
        }
        options.push(option);
    }
    Ok(options)
}

fn parse_request(packet: &'static str, mut rest: &[u8]) -> Result<Request, PacketError> {
    let filename = take_str(packet, "filename", &mut rest)?;
    if filename.is_empty() {
        return Err(err(packet, "filename is empty"));
    }
    let mode_str = take_str(packet, "mode", &mut rest)?;
    let mode = match mode_str.to_ascii_lowercase().as_str() {
        "netascii" => Mode::NetAscii,
        "octet" => Mode::Octet,
        "mail" => Mode::Mail,
        _ => {
            return Err(err(
                packet,
                format!("unknown mode `{mode_str}` (netascii, octet or mail)"),
            ));
        }
    };
    let options = parse_options(packet, rest)?;
    Ok(Request {
        filename: filename.to_string(),
        mode,
        options,
    })
}

fn block_of(packet: &'static str, rest: &[u8]) -> Result<u16, PacketError> {
    match rest {
        [hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(err(packet, "too short for a block number")),
    }
}

/// Parses one datagram. Never panics.
pub fn parse(buf: &[u8]) -> Result<Packet, PacketError> {
    let (opcode, rest) = match buf {
        [hi, lo, rest @ ..] => (u16::from_be_bytes([*hi, *lo]), rest),
        _ => {
            return Err(err(
                "packet",
                format!("{} bytes is too short for an opcode", buf.len()),
            ));
        }
    };
    match opcode {
        OP_RRQ => parse_request("RRQ", rest).map(Packet::Rrq),
        OP_WRQ => parse_request("WRQ", rest).map(Packet::Wrq),
        OP_DATA => {
            let block = block_of("DATA", rest)?;
            let data = rest.get(2..).unwrap_or(&[]);
            if data.len() > usize::from(MAX_BLKSIZE) {
                return Err(err(
                    "DATA",
                    format!("payload of {} bytes exceeds {MAX_BLKSIZE}", data.len()),
                ));
            }
            Ok(Packet::Data {
                block,
                data: data.to_vec(),
            })
        }
        OP_ACK => {
            let block = block_of("ACK", rest)?;
            if rest.len() != 2 {
                return Err(err(
                    "ACK",
                    format!("{} trailing bytes after the block number", rest.len() - 2),
                ));
            }
            Ok(Packet::Ack { block })
        }
        OP_ERROR => {
            let code = block_of("ERROR", rest).map_err(|_| err("ERROR", "too short for a code"))?;
            let mut tail = rest.get(2..).unwrap_or(&[]);
            let Some(nul) = tail.iter().position(|&b| b == 0) else {
                return Err(err("ERROR", "message is not NUL-terminated"));
            };
            let message = String::from_utf8_lossy(&tail[..nul]).into_owned();
            tail = &tail[nul + 1..];
            if !tail.is_empty() {
                return Err(err(
                    "ERROR",
                    format!("{} trailing bytes after the message", tail.len()),
                ));
            }
            Ok(Packet::Error {
                code: ErrorCode::from_code(code),
                message,
            })
        }
        OP_OACK => parse_options("OACK", rest).map(Packet::Oack),
        other => Err(err("packet", format!("unknown opcode {other}"))),
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn push_options(out: &mut Vec<u8>, options: &[TftpOption]) {
    for o in options {
        push_str(out, o.name());
        push_str(out, &o.value());
    }
}

impl Packet {
    /// Encodes the packet for the wire.
    ///
    /// Strings containing NUL bytes cannot be represented; they are cut at the first NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let cut = |s: &str| s.split('\0').next().unwrap_or("").to_string();
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                let op = if matches!(self, Packet::Rrq(_)) {
                    OP_RRQ
                } else {
                    OP_WRQ
                };
                out.extend_from_slice(&op.to_be_bytes());
                push_str(&mut out, &cut(&r.filename));
                push_str(&mut out, r.mode.as_str());
                push_options(&mut out, &r.options);
            }
            Packet::Data { block, data } => {
                out.reserve(4 + data.len());
                out.extend_from_slice(&OP_DATA.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&OP_ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&OP_ERROR.to_be_bytes());
                out.extend_from_slice(&code.code().to_be_bytes());
                push_str(&mut out, &cut(message));
            }
            Packet::Oack(options) => {
                out.extend_from_slice(&OP_OACK.to_be_bytes());
                push_options(&mut out, options);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(p: Packet) {
        let bytes = p.encode();
        assert_eq!(parse(&bytes), Ok(p));
    }

    #[test]
    fn round_trips() {
        round_trip(Packet::Rrq(Request {
            filename: "ipxe/undionly.kpxe".into(),
            mode: Mode::Octet,
            options: vec![
                TftpOption::BlkSize(1428),
                TftpOption::TSize(0),
                TftpOption::Timeout(3),
                TftpOption::WindowSize(16),
                TftpOption::Unknown {
                    name: "x-vendor".into(),
                    value: "1".into(),
                },
            ],
        }));
        round_trip(Packet::Wrq(Request {
            filename: "up".into(),
            mode: Mode::NetAscii,
            options: vec![],
        }));
        round_trip(Packet::Data {
            block: 65535,
            data: vec![0, 1, 2, 255],
        });
        round_trip(Packet::Data {
            block: 0,
            data: vec![],
        });
        round_trip(Packet::Ack { block: 7 });
        round_trip(Packet::Error {
            code: ErrorCode::FileNotFound,
            message: "file not found".into(),
        });
        round_trip(Packet::Error {
            code: ErrorCode::Other(99),
            message: String::new(),
        });
        round_trip(Packet::Oack(vec![
            TftpOption::TSize(123456789),
            TftpOption::BlkSize(8),
        ]));
    }

    #[test]
    fn known_wire_bytes() {
        assert_eq!(
            parse(b"\x00\x01boot.ipxe\x00OcTeT\x00BLKSIZE\x001468\x00").unwrap(),
            Packet::Rrq(Request {
                filename: "boot.ipxe".into(),
                mode: Mode::Octet,
                options: vec![TftpOption::BlkSize(1468)],
            })
        );
        assert_eq!(Packet::Ack { block: 258 }.encode(), b"\x00\x04\x01\x02");
        assert_eq!(
            Packet::Error {
                code: ErrorCode::AccessViolation,
                message: "no".into()
            }
            .encode(),
            b"\x00\x05\x00\x02no\x00"
        );
    }

    fn problem(buf: &[u8]) -> String {
        match parse(buf) {
            Ok(p) => panic!("{buf:?} parsed as {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn hostile_inputs_are_named_errors() {
        assert_eq!(problem(b""), "packet: 0 bytes is too short for an opcode");
        assert_eq!(
            problem(b"\x01"),
            "packet: 1 bytes is too short for an opcode"
        );
        assert_eq!(problem(b"\x00\x09"), "packet: unknown opcode 9");
        assert_eq!(
            problem(b"\x00\x01abc"),
            "RRQ: filename is not NUL-terminated"
        );
        assert_eq!(problem(b"\x00\x01\x00octet\x00"), "RRQ: filename is empty");
        assert_eq!(
            problem(b"\x00\x01a\x00octet"),
            "RRQ: mode is not NUL-terminated"
        );
        assert_eq!(
            problem(b"\x00\x02a\x00binary\x00"),
            "WRQ: unknown mode `binary` (netascii, octet or mail)"
        );
        assert_eq!(
            problem(b"\x00\x01\xff\xfe\x00octet\x00"),
            "RRQ: filename is not valid UTF-8"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00blksize\x00"),
            "RRQ: value of option blksize is not NUL-terminated"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00blksize\x007\x00"),
            "RRQ: option blksize value 7 is outside 8..=65464"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00blksize\x0065465\x00"),
            "RRQ: option blksize value 65465 is outside 8..=65464"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00timeout\x000\x00"),
            "RRQ: option timeout value 0 is outside 1..=255"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00windowsize\x0065536\x00"),
            "RRQ: option windowsize value 65536 is outside 1..=65535"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00tsize\x00-1\x00"),
            "RRQ: option tsize value `-1` is not a decimal number"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00tsize\x0099999999999999999999999\x00"),
            "RRQ: option tsize value `99999999999999999999999` is too large"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00tsize\x000\x00TSIZE\x000\x00"),
            "RRQ: option tsize is repeated"
        );
        assert_eq!(
            problem(b"\x00\x01a\x00octet\x00\x000\x00"),
            "RRQ: option name is empty"
        );
        assert_eq!(
            problem(b"\x00\x03\x00"),
            "DATA: too short for a block number"
        );
        assert_eq!(
            problem(b"\x00\x04\x00"),
            "ACK: too short for a block number"
        );
        assert_eq!(
            problem(b"\x00\x04\x00\x01\x00"),
            "ACK: 1 trailing bytes after the block number"
        );
        assert_eq!(problem(b"\x00\x05\x00"), "ERROR: too short for a code");
        assert_eq!(
            problem(b"\x00\x05\x00\x01oops"),
            "ERROR: message is not NUL-terminated"
        );
        assert_eq!(
            problem(b"\x00\x06blksize\x00abc\x00"),
            "OACK: option blksize value `abc` is not a decimal number"
        );
        let mut huge = vec![0, 3, 0, 1];
        huge.resize(4 + usize::from(MAX_BLKSIZE) + 1, 0);
        assert_eq!(problem(&huge), "DATA: payload of 65465 bytes exceeds 65464");
    }

    #[test]
    fn every_short_prefix_and_byte_flip_is_handled() {
        let good = Packet::Rrq(Request {
            filename: "a/b".into(),
            mode: Mode::Octet,
            options: vec![TftpOption::BlkSize(512), TftpOption::TSize(0)],
        })
        .encode();
        let mut parsed_ok = 0;
        for len in 0..=good.len() {
            if parse(&good[..len]).is_ok() {
                parsed_ok += 1;
            }
            for i in 0..len {
                for b in [0u8, 0xff, b'9'] {
                    let mut m = good[..len].to_vec();
                    m[i] = b;
                    let _ = parse(&m);
                }
            }
        }
        // Only the full packet and the cut after a whole option pair / the mode parse.
        assert_eq!(parsed_ok, 3);
    }
}
