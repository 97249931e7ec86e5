//! The NTP packet (RFC 5905 header, as SNTP of RFC 4330 uses it) and its timestamps,
//! shared by the DUT agent's SNTP client and the gateway's SNTP server.
//!
//! [`NtpPacket::decode`] is total: any byte slice gives `Ok` (48 bytes or more; what follows
//! the header, extension fields or a MAC, is ignored) or `Err`, never a panic. Decoding
//! keeps every bit of the header, so encoding a decoded packet gives the same 48 bytes.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The NTP port.
pub const NTP_PORT: u16 = 123;
/// The length of an NTP header (extension fields and MAC after it are ignored).
pub const PACKET_LEN: usize = 48;
/// Seconds from 1900-01-01 (the start of NTP era 0) to 1970-01-01.
pub const NTP_UNIX_OFFSET: i64 = 2_208_988_800;
/// Seconds in one NTP era (2^32).
const ERA: i64 = 1 << 32;

/// Client mode.
pub const MODE_CLIENT: u8 = 3;
/// Server mode.
pub const MODE_SERVER: u8 = 4;
/// Broadcast mode.
pub const MODE_BROADCAST: u8 = 5;

/// A 64-bit NTP timestamp: seconds since 1900 (modulo 2^32) in the high 32 bits, the
/// fraction of a second in the low 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NtpTimestamp(pub u64);

impl NtpTimestamp {
    /// The timestamp of `t` (times before 1970 are clamped to 1970).
    pub fn from_system_time(t: SystemTime) -> NtpTimestamp {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = (i128::from(d.as_secs()) + i128::from(NTP_UNIX_OFFSET))
            .rem_euclid(i128::from(ERA)) as u64;
        let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
        NtpTimestamp((secs << 32) | frac)
    }

    /// Whether all 64 bits are zero (a timestamp that was not set).
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// This timestamp with the fraction cleared: the start of its second.
    pub fn whole_seconds(self) -> NtpTimestamp {
        NtpTimestamp(self.0 & 0xffff_ffff_0000_0000)
    }

    /// This timestamp as 2^-32 seconds since 1970 (negative before it). As RFC 4330 says,
    /// seconds with the top bit set are 1968–2036 (era 0) and the others 2036–2104 (era 1).
    pub fn unix_fixed(self) -> i128 {
        let secs = (self.0 >> 32) as i64;
        let secs = if secs & 0x8000_0000 != 0 {
            secs
        } else {
            secs + ERA
        };
        (i128::from(secs - NTP_UNIX_OFFSET) << 32) | i128::from(self.0 & 0xffff_ffff)
    }

    /// This timestamp as a system time (see [`NtpTimestamp::unix_fixed`] for the era).
    pub fn to_system_time(self) -> SystemTime {
        let fixed = self.unix_fixed();
        let secs = fixed >> 32;
        let nanos = ((fixed & 0xffff_ffff) * 1_000_000_000) >> 32;
        let d = Duration::new(secs.unsigned_abs() as u64, 0);
        let t = if secs >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        };
        t + Duration::from_nanos(nanos as u64)
    }
}

/// A datagram too short to hold an NTP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortPacket {
    /// The datagram's length.
    pub len: usize,
}

impl fmt::Display for ShortPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes long, an NTP packet has at least {PACKET_LEN}",
            self.len
        )
    }
}

impl std::error::Error for ShortPacket {}

/// The 48-byte header of an NTP packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NtpPacket {
    /// Leap indicator (0 to 3; 3 = clock unsynchronised).
    pub leap: u8,
    /// Version number (1 to 7 on the wire).
    pub version: u8,
    /// Association mode (3 client, 4 server, 5 broadcast).
    pub mode: u8,
    /// Stratum (0 = kiss-o'-death, 1 primary, 2–15 secondary, 16 unsynchronised).
    pub stratum: u8,
    /// Poll exponent (log2 seconds).
    pub poll: i8,
    /// Precision exponent (log2 seconds).
    pub precision: i8,
    /// Root delay, 16.16 fixed-point seconds.
    pub root_delay: u32,
    /// Root dispersion, 16.16 fixed-point seconds.
    pub root_dispersion: u32,
    /// Reference identifier (the kiss code when the stratum is 0).
    pub reference_id: [u8; 4],
    /// When the server's clock was last set.
    pub reference: NtpTimestamp,
    /// The request's transmit timestamp, echoed by the server.
    pub originate: NtpTimestamp,
    /// When the server received the request.
    pub receive: NtpTimestamp,
    /// When the sender sent the packet.
    pub transmit: NtpTimestamp,
}

impl NtpPacket {
    /// Decodes the header of `buf` (extension fields and MAC after it are ignored),
    /// checking only the length.
    pub fn decode(buf: &[u8]) -> Result<NtpPacket, ShortPacket> {
        let Some(b) = buf.first_chunk::<PACKET_LEN>() else {
            return Err(ShortPacket { len: buf.len() });
        };
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let ts_at =
            |i: usize| NtpTimestamp((u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4)));
        Ok(NtpPacket {
            leap: b[0] >> 6,
            version: (b[0] >> 3) & 7,
            mode: b[0] & 7,
            stratum: b[1],
            poll: b[2] as i8,
            precision: b[3] as i8,
            root_delay: u32_at(4),
            root_dispersion: u32_at(8),
            reference_id: [b[12], b[13], b[14], b[15]],
            reference: ts_at(16),
            originate: ts_at(24),
            receive: ts_at(32),
            transmit: ts_at(40),
        })
    }

    /// The 48 bytes of this header (leap, version and mode are masked to their 2, 3 and 3
    /// bits).
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = ((self.leap & 3) << 6) | ((self.version & 7) << 3) | (self.mode & 7);
        b[1] = self.stratum;
        b[2] = self.poll as u8;
        b[3] = self.precision as u8;
        b[4..8].copy_from_slice(&self.root_delay.to_be_bytes());
        b[8..12].copy_from_slice(&self.root_dispersion.to_be_bytes());
        b[12..16].copy_from_slice(&self.reference_id);
        b[16..24].copy_from_slice(&self.reference.0.to_be_bytes());
        b[24..32].copy_from_slice(&self.originate.0.to_be_bytes());
        b[32..40].copy_from_slice(&self.receive.0.to_be_bytes());
        b[40..48].copy_from_slice(&self.transmit.0.to_be_bytes());
        b
    }

    /// The kiss code (the reference identifier as text, `?` for bytes that are not
    /// printable ASCII, trailing ones dropped) of a stratum-0 packet.
    pub fn kiss_code(&self) -> String {
        self.reference_id
            .iter()
            .map(|&c| {
                if c.is_ascii_graphic() {
                    char::from(c)
                } else {
                    '?'
                }
            })
            .collect::<String>()
            .trim_end_matches('?')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_is_total_and_encode_gives_the_bytes_back() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as u8
        };
        for len in [0usize, 1, 47, 48, 49, 120] {
            for _ in 0..300 {
                let buf: Vec<u8> = (0..len).map(|_| next()).collect();
                match NtpPacket::decode(&buf) {
                    Ok(p) => {
                        assert!(len >= PACKET_LEN);
                        assert_eq!(&p.encode()[..], &buf[..PACKET_LEN]);
                    }
                    Err(e) => assert_eq!(e, ShortPacket { len }),
                }
            }
        }
        assert_eq!(
            ShortPacket { len: 3 }.to_string(),
            "3 bytes long, an NTP packet has at least 48"
        );
    }

    #[test]
    fn fields_sit_where_rfc_5905_puts_them() {
        let p = NtpPacket {
            leap: 3,
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            poll: 6,
            precision: -20,
            root_delay: 0x0102_0304,
            root_dispersion: 0x0506_0708,
            reference_id: *b"LOCL",
            reference: NtpTimestamp(0x1111_1111_2222_2222),
            originate: NtpTimestamp(0x3333_3333_4444_4444),
            receive: NtpTimestamp(0x5555_5555_6666_6666),
            transmit: NtpTimestamp(0x7777_7777_8888_8888),
        };
        let b = p.encode();
        assert_eq!(b[0], 0xe4);
        assert_eq!(&b[1..4], &[2, 6, 0xec]);
        assert_eq!(&b[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[12..16], b"LOCL");
        assert_eq!(&b[40..48], &0x7777_7777_8888_8888u64.to_be_bytes());
        assert_eq!(NtpPacket::decode(&b), Ok(p));
        let kiss = NtpPacket {
            reference_id: [b'R', b'A', 0, 0],
            ..NtpPacket::default()
        };
        assert_eq!(kiss.kiss_code(), "RA");
    }

    #[test]
    fn timestamps_round_trip_across_eras() {
        for secs in [
            0u64,
            1_700_000_000,
            2_085_978_495,
            2_085_978_496,
            4_000_000_000,
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, 123_456_789);
            let back = NtpTimestamp::from_system_time(t).to_system_time();
            let diff = back.duration_since(t).unwrap_or_else(|e| e.duration());
            assert!(diff < Duration::from_nanos(2), "{secs}: {diff:?}");
        }
        // 2036-02-07T06:28:16Z is second 0 of era 1.
        assert_eq!(
            NtpTimestamp::from_system_time(UNIX_EPOCH + Duration::from_secs(2_085_978_496)).0,
            0
        );
        let half = NtpTimestamp::from_system_time(UNIX_EPOCH + Duration::new(1, 500_000_000));
        assert_eq!(half.0 >> 32, 1 + NTP_UNIX_OFFSET as u64);
        assert_eq!(half.0 & 0xffff_ffff, 0x8000_0000);
        assert_eq!(half.whole_seconds().0, (1 + NTP_UNIX_OFFSET as u64) << 32);
        assert!(NtpTimestamp::default().is_zero() && !half.is_zero());
    }
}
