//! A small SNTP server (RFC 4330, server side) so that DUTs booted with
//! `b2c.ntp_peer=ci-gateway` can set their clock from the gateway.
//!
//! The gateway serves its own clock: client-mode (3) requests are answered in server mode
//! (4) with the configured stratum, the version of the request, the request's transmit
//! timestamp as originate timestamp and the current time as receive and transmit
//! timestamps. Anything else (short packets, other modes, versions outside 1–4) is ignored.
//! [`answer`] is the pure part; [`serve`] runs it on a UDP socket.

use std::time::SystemTime;

use farmgate_wire::ntp::{MODE_CLIENT, MODE_SERVER, NtpPacket, NtpTimestamp};
use tokio::net::UdpSocket;

pub use farmgate_wire::ntp::{NTP_PORT, PACKET_LEN};

/// The stratum the gateway announces unless told otherwise.
pub const DEFAULT_STRATUM: u8 = 3;
/// The precision announced: 2^-20 s (about a microsecond).
const PRECISION: i8 = -20;
/// Root dispersion announced: 1/16 s as 16.16 fixed point, an honest guess for a clock
/// that the gateway does not discipline itself.
const ROOT_DISPERSION: u32 = 0x0000_1000;

/// The NTP timestamp of `t` (seconds since 1900 modulo 2^32, and the fraction).
pub fn timestamp(t: SystemTime) -> u64 {
    NtpTimestamp::from_system_time(t).0
}

/// The reply to `request` at time `now`, or `None` when the datagram is not a client-mode
/// NTP request (too short, wrong mode, version outside 1–4). `stratum` is clamped to 1–15.
pub fn answer(request: &[u8], now: SystemTime, stratum: u8) -> Option<Vec<u8>> {
    let req = NtpPacket::decode(request).ok()?;
    if !(1..=4).contains(&req.version) || req.mode != MODE_CLIENT {
        return None;
    }
    let stratum = stratum.clamp(1, 15);
    let now = NtpTimestamp::from_system_time(now);
    let reply = NtpPacket {
        // Leap indicator 0 (no warning), the client's version, server mode.
        leap: 0,
        version: req.version,
        mode: MODE_SERVER,
        stratum,
        // Poll: echo the client's, within the range RFC 5905 allows.
        poll: req.poll.clamp(4, 17),
        precision: PRECISION,
        // Root delay 0: the clock is local.
        root_delay: 0,
        root_dispersion: ROOT_DISPERSION,
        // Reference id: "LOCL" for a primary server, else the conventional local-clock
        // address 127.127.1.1 (what chrony's `local` directive announces).
        reference_id: if stratum == 1 {
            *b"LOCL"
        } else {
            [127, 127, 1, 1]
        },
        // Reference time: the start of the current second.
        reference: now.whole_seconds(),
        originate: req.transmit,
        receive: now,
        transmit: now,
    };
    Some(reply.encode().to_vec())
}

/// Answers NTP requests arriving on `socket` with the local clock at `stratum` (see
/// [`answer`]) until the future is dropped. Malformed and non-client packets are ignored;
/// transient receive errors (ICMP errors surfacing on the socket) are logged and skipped.
/// Returns only on a persistent socket error.
pub async fn serve(socket: UdpSocket, stratum: u8) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                ) =>
            {
                tracing::debug!("ntp: recv_from: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let now = SystemTime::now();
        let Some(reply) = answer(buf.get(..len).unwrap_or(&[]), now, stratum) else {
            tracing::debug!(
                "ntp: ignoring a {len}-byte datagram from {peer}: not a client request"
            );
            continue;
        };
        match socket.send_to(&reply, peer).await {
            Ok(_) => tracing::debug!("ntp: answered {peer}"),
            Err(e) => tracing::debug!("ntp: reply to {peer}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use farmgate_wire::ntp::NTP_UNIX_OFFSET;

    use super::*;

    fn request(first: u8, transmit: u64) -> [u8; PACKET_LEN] {
        let mut r = [0u8; PACKET_LEN];
        r[0] = first;
        r[2] = 6;
        r[40..48].copy_from_slice(&transmit.to_be_bytes());
        r
    }

    #[test]
    fn answers_client_requests() {
        let now = UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000);
        // Version 4, client mode.
        let reply = answer(&request(0x23, 0xdead_beef_0123_4567), now, 3).unwrap();
        assert_eq!(reply.len(), PACKET_LEN);
        assert_eq!(reply[0], 0x24, "LI 0, version 4, mode 4");
        assert_eq!(reply[1], 3);
        assert_eq!(reply[2], 6);
        assert_eq!(&reply[12..16], &[127, 127, 1, 1]);
        assert_eq!(&reply[24..32], &0xdead_beef_0123_4567u64.to_be_bytes());
        let ts = timestamp(now);
        assert_eq!(ts >> 32, 1_700_000_000 + NTP_UNIX_OFFSET as u64);
        assert_eq!(ts & 0xffff_ffff, 0x8000_0000);
        assert_eq!(&reply[32..40], &ts.to_be_bytes());
        assert_eq!(&reply[40..48], &ts.to_be_bytes());
        // Version 3 is answered with version 3; stratum is clamped; stratum 1 says LOCL.
        let reply = answer(&request(0x1b, 1), now, 0).unwrap();
        assert_eq!(reply[0], 0x1c);
        assert_eq!(reply[1], 1);
        assert_eq!(&reply[12..16], b"LOCL");
        assert_eq!(answer(&request(0x23, 1), now, 200).unwrap()[1], 15);
        // Extension fields after the header do not matter.
        let mut long = request(0x23, 1).to_vec();
        long.extend_from_slice(&[0xaa; 60]);
        assert!(answer(&long, now, 3).is_some());
    }

    #[test]
    fn ignores_everything_else() {
        let now = SystemTime::now();
        let good = request(0x23, 7);
        for len in 0..PACKET_LEN {
            assert!(answer(&good[..len], now, 3).is_none(), "length {len}");
        }
        for first in 0..=255u8 {
            let version = (first >> 3) & 7;
            let mode = first & 7;
            let replied = answer(&request(first, 7), now, 3).is_some();
            assert_eq!(
                replied,
                mode == 3 && (1..=4).contains(&version),
                "{first:#x}"
            );
        }
        // Any bytes of any length up to 100: an answer only to what looks like a request.
        for len in 0..=100usize {
            for salt in 0..=255u8 {
                let buf: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(151).wrapping_add(salt))
                    .collect();
                if let Some(r) = answer(&buf, now, 3) {
                    assert_eq!(r[0] & 7, 4);
                    assert_eq!(r[24..32], buf[40..48]);
                }
            }
        }
    }
}
