//! An SNTP client (RFC 4330, NTPv4 client mode) for `b2c.ntp_peer`.
//!
//! [`query`] sends one client-mode request and validates the answer: the mode must be
//! server (4) or broadcast (5), the stratum 1 to 15 (stratum 0 is a kiss-o'-death whose
//! code, such as `RATE` or `DENY`, is reported), the leap indicator must not say
//! "unsynchronised", the originate timestamp must echo the transmit timestamp of the
//! request and the server's transmit timestamp must not be zero. The clock offset and the
//! round-trip delay are computed from the four timestamps of the exchange.
//!
//! [`sync`] resolves the peer of the command line (falling back to the DHCP server's
//! address when `ci-gateway` does not resolve), queries it up to three times and, when
//! asked to (the agent running as PID 1), steps `CLOCK_REALTIME` by the offset.
//!
//! [`parse_reply`] never panics, whatever the input.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;

use crate::cmdline::NtpPeer;

pub use farmgate_wire::ntp::{
    MODE_BROADCAST, MODE_CLIENT, MODE_SERVER, NTP_PORT, NtpPacket, NtpTimestamp, PACKET_LEN,
};

/// The peer `b2c.ntp_peer=auto` stands for.
pub const POOL: &str = "pool.ntp.org";
/// The host name that falls back to the DHCP server's address when it does not resolve.
pub const GATEWAY_NAME: &str = "ci-gateway";
/// How many requests [`sync`] sends before giving up.
pub const ATTEMPTS: u32 = 3;
/// The pause between two attempts of [`sync`].
pub const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// Decodes and validates a server's reply, except for the originate timestamp (which only
/// the sender of the request knows). Total: any input gives `Ok` or `Err`, never a panic.
pub fn parse_reply(buf: &[u8]) -> Result<NtpPacket, NtpError> {
    let p = NtpPacket::decode(buf).map_err(|e| NtpError::Short { len: e.len })?;
    if !(1..=4).contains(&p.version) {
        return Err(NtpError::Version(p.version));
    }
    if p.mode != MODE_SERVER && p.mode != MODE_BROADCAST {
        return Err(NtpError::Mode(p.mode));
    }
    if p.stratum == 0 {
        return Err(NtpError::KissOfDeath {
            code: p.kiss_code(),
        });
    }
    if p.leap == 3 {
        return Err(NtpError::Unsynchronised);
    }
    if p.stratum > 15 {
        return Err(NtpError::Stratum(p.stratum));
    }
    if p.transmit.is_zero() {
        return Err(NtpError::ZeroTransmit);
    }
    Ok(p)
}

/// One measurement of the local clock against a server.
#[derive(Debug, Clone, PartialEq)]
pub struct NtpSample {
    /// The server that answered.
    pub server: SocketAddr,
    /// Server time minus local time, in seconds.
    pub offset: f64,
    /// Round-trip delay of the exchange, in seconds (never negative).
    pub delay: f64,
    /// The server's stratum.
    pub stratum: u8,
    /// The server's transmit timestamp.
    pub server_time: SystemTime,
}

/// What went wrong with an NTP exchange.
#[derive(Debug, thiserror::Error)]
pub enum NtpError {
    /// The datagram is shorter than an NTP header.
    #[error("reply is {len} bytes long, an NTP packet has at least {PACKET_LEN}")]
    Short {
        /// The datagram's length.
        len: usize,
    },
    /// The version number is not 1 to 4.
    #[error("reply has NTP version {0}, expected 1 to 4")]
    Version(u8),
    /// The mode is neither server nor broadcast.
    #[error("reply has mode {0}, expected server (4) or broadcast (5)")]
    Mode(u8),
    /// Stratum 0: the server refuses to serve (`RATE`, `DENY`, `RSTR`…).
    #[error("kiss-o'-death {code:?} (stratum 0)")]
    KissOfDeath {
        /// The kiss code.
        code: String,
    },
    /// Leap indicator 3.
    #[error("the server's clock is not synchronised (leap indicator 3)")]
    Unsynchronised,
    /// Stratum 16 or more.
    #[error("the server is at stratum {0}, i.e. not synchronised")]
    Stratum(u8),
    /// The server's transmit timestamp is zero.
    #[error("reply has a zero transmit timestamp")]
    ZeroTransmit,
    /// The reply does not answer our request.
    #[error("reply's originate timestamp {got:#018x} is not our transmit timestamp {sent:#018x}")]
    OriginateMismatch {
        /// Our transmit timestamp.
        sent: u64,
        /// The reply's originate timestamp.
        got: u64,
    },
    /// No (valid) answer in time.
    #[error("no answer within {}{}", show_duration(*.timeout), .rejected.as_ref().map(|r| format!(" (ignored a reply: {r})")).unwrap_or_default())]
    Timeout {
        /// How long we waited.
        timeout: Duration,
        /// Why the last reply received meanwhile was ignored.
        rejected: Option<Box<NtpError>>,
    },
    /// A socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer's name is malformed.
    #[error("ntp peer {peer:?}: {why}")]
    BadPeer {
        /// The peer as written.
        peer: String,
        /// What is wrong.
        why: String,
    },
    /// The peer's name does not resolve.
    #[error("ntp peer {peer}: cannot resolve {host}: {why}")]
    Resolve {
        /// The peer as written.
        peer: String,
        /// The host name looked up.
        host: String,
        /// The resolver's error.
        why: String,
    },
    /// An exchange with a resolved peer failed.
    #[error("ntp peer {peer} ({addr}): {source}")]
    Peer {
        /// The peer as written.
        peer: String,
        /// The address queried.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: Box<NtpError>,
    },
    /// `clock_settime` failed.
    #[error("ntp peer {peer}: cannot set the clock (offset {offset:+.6} s): {errno}")]
    SetClock {
        /// The peer as written.
        peer: String,
        /// The offset that was to be applied.
        offset: f64,
        /// The system's error.
        errno: nix::errno::Errno,
    },
}

fn show_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A transmit timestamp: the current second, and a fraction that no one else can guess (it
/// is only matched against the reply's originate; the real send time is kept locally).
fn nonce_timestamp(now: SystemTime) -> NtpTimestamp {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        now.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let secs = NtpTimestamp::from_system_time(now).whole_seconds().0;
    let frac = h.finish() & 0xffff_ffff;
    // A zero fraction would make the whole value zero once a second… never send zero.
    NtpTimestamp(secs | frac.max(1))
}

/// Computes (offset, delay) in seconds from the four timestamps, given as 2^-32 seconds
/// since 1970: t1 request sent (local), t2 request received (server), t3 reply sent
/// (server), t4 reply received (local).
fn offset_delay(t1: i128, t2: i128, t3: i128, t4: i128) -> (f64, f64) {
    let unit = (1u64 << 32) as f64;
    let offset = ((t2 - t1) + (t3 - t4)) as f64 / 2.0 / unit;
    let delay = ((t4 - t1) - (t3 - t2)) as f64 / unit;
    (offset, delay.max(0.0))
}

fn local_fixed(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => {
            (i128::from(d.as_secs()) << 32) + ((i128::from(d.subsec_nanos()) << 32) / 1_000_000_000)
        }
        Err(e) => {
            -(((i128::from(e.duration().as_secs())) << 32)
                + ((i128::from(e.duration().subsec_nanos()) << 32) / 1_000_000_000))
        }
    }
}

/// Sends one client-mode request to `server` and waits up to `timeout` for its answer.
///
/// Replies that do not match the request (wrong originate timestamp, malformed packets)
/// are ignored while waiting; if nothing valid arrives, the timeout error tells why the
/// last of them was ignored. A kiss-o'-death or an unsynchronised server that answers our
/// request is an error at once.
pub async fn query(server: SocketAddr, timeout: Duration) -> Result<NtpSample, NtpError> {
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    let deadline = tokio::time::Instant::now() + timeout;

    let t1 = SystemTime::now();
    let nonce = nonce_timestamp(t1);
    let request = NtpPacket {
        version: 4,
        mode: MODE_CLIENT,
        transmit: nonce,
        ..NtpPacket::default()
    };
    socket.send(&request.encode()).await?;

    let mut buf = [0u8; 1024];
    let mut rejected = None;
    loop {
        let len = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => {
                return Err(NtpError::Timeout {
                    timeout,
                    rejected: rejected.map(Box::new),
                });
            }
            Ok(r) => r?,
        };
        let t4 = SystemTime::now();
        let datagram = buf.get(..len).unwrap_or(&[]);
        // The originate check comes first: an error about someone else's packet must not
        // end the exchange.
        if let Ok(p) = NtpPacket::decode(datagram)
            && p.originate != nonce
        {
            tracing::debug!("ntp: {server}: ignoring a reply to another request");
            rejected = Some(NtpError::OriginateMismatch {
                sent: nonce.0,
                got: p.originate.0,
            });
            continue;
        }
        let reply = match parse_reply(datagram) {
            Ok(p) => p,
            Err(e @ NtpError::Short { .. }) => {
                tracing::debug!("ntp: {server}: ignoring a reply: {e}");
                rejected = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let (offset, delay) = offset_delay(
            local_fixed(t1),
            reply.receive.unix_fixed(),
            reply.transmit.unix_fixed(),
            local_fixed(t4),
        );
        return Ok(NtpSample {
            server,
            offset,
            delay,
            stratum: reply.stratum,
            server_time: reply.transmit.to_system_time(),
        });
    }
}

/// Splits a `b2c.ntp_peer` host into a host (or address) and a port: `host`, `host:port`,
/// an IPv4 or IPv6 address, `[v6]` or `[v6]:port`.
fn split_host_port(peer: &str, default_port: u16) -> Result<(String, u16), NtpError> {
    let bad = |why: &str| NtpError::BadPeer {
        peer: peer.to_string(),
        why: why.to_string(),
    };
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))
    };
    if peer.is_empty() {
        return Err(bad("empty host"));
    }
    if let Ok(ip) = peer.parse::<IpAddr>() {
        return Ok((ip.to_string(), default_port));
    }
    if let Some(rest) = peer.strip_prefix('[') {
        let Some((addr, tail)) = rest.split_once(']') else {
            return Err(bad("missing `]`"));
        };
        let ip: Ipv6Addr = addr
            .parse()
            .map_err(|_| bad("not an IPv6 address between [ ]"))?;
        let port = match tail {
            "" => default_port,
            t => port_of(t.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?)?,
        };
        return Ok((ip.to_string(), port));
    }
    let (host, port) = match peer.split_once(':') {
        None => (peer, default_port),
        Some((h, p)) => (h, port_of(p)?),
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(bad("not a host name, `host:port` or an IP address"));
    }
    Ok((host.to_string(), port))
}

/// Resolves `peer` to the addresses to query.
async fn resolve(
    shown: &str,
    peer: &str,
    fallback: Option<IpAddr>,
    port: u16,
) -> Result<Vec<SocketAddr>, NtpError> {
    let (host, port) = split_host_port(peer, port)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let looked_up = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map(|it| it.collect::<Vec<_>>());
    let why = match looked_up {
        Ok(addrs) if !addrs.is_empty() => return Ok(addrs),
        Ok(_) => "no address".to_string(),
        Err(e) => e.to_string(),
    };
    match fallback {
        Some(ip) if host == GATEWAY_NAME => {
            tracing::info!(
                "ntp: {host} does not resolve ({why}), using the DHCP server {ip} instead"
            );
            Ok(vec![SocketAddr::new(ip, port)])
        }
        _ => Err(NtpError::Resolve {
            peer: shown.to_string(),
            host,
            why,
        }),
    }
}

/// Synchronises with `b2c.ntp_peer`: `None` does nothing (`Ok(None)`), `Auto` queries
/// [`POOL`], `Host` queries the given `host`, `host:port` or address (`port` when none is
/// given; [`NTP_PORT`] in production). If `ci-gateway` does not resolve, `fallback` (the
/// DHCP server's address) is used instead.
///
/// Up to [`ATTEMPTS`] requests are sent, [`RETRY_PAUSE`] apart, each waiting `timeout`;
/// a kiss-o'-death stops at once. With `set_clock`, `CLOCK_REALTIME` is stepped by the
/// measured offset (needs `CAP_SYS_TIME`: only the agent running as PID 1 asks for it).
pub async fn sync(
    peer: &NtpPeer,
    fallback: Option<IpAddr>,
    port: u16,
    set_clock: bool,
    timeout: Duration,
) -> Result<Option<NtpSample>, NtpError> {
    let name = match peer {
        NtpPeer::None => return Ok(None),
        NtpPeer::Auto => POOL,
        NtpPeer::Host(h) => h.as_str(),
    };
    let addrs = resolve(name, name, fallback, port).await?;
    let mut last = None;
    'attempts: for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        for &addr in &addrs {
            match query(addr, timeout).await {
                Ok(sample) => {
                    last = Some(Ok(sample));
                    break 'attempts;
                }
                Err(e) => {
                    tracing::debug!("ntp: {name} ({addr}), attempt {}: {e}", attempt + 1);
                    let stop = matches!(e, NtpError::KissOfDeath { .. });
                    last = Some(Err(NtpError::Peer {
                        peer: name.to_string(),
                        addr,
                        source: Box::new(e),
                    }));
                    if stop {
                        break 'attempts;
                    }
                }
            }
        }
    }
    let sample = match last {
        Some(r) => r?,
        None => {
            return Err(NtpError::BadPeer {
                peer: name.to_string(),
                why: "resolved to no address".into(),
            });
        }
    };
    tracing::info!(
        "ntp: {name} ({}) stratum {}: offset {:+.6} s, delay {:.6} s",
        sample.server,
        sample.stratum,
        sample.offset,
        sample.delay
    );
    if set_clock {
        step_clock(name, sample.offset)?;
    }
    Ok(Some(sample))
}

/// Steps `CLOCK_REALTIME` by `offset` seconds.
fn step_clock(peer: &str, offset: f64) -> Result<(), NtpError> {
    let err = |errno| NtpError::SetClock {
        peer: peer.to_string(),
        offset,
        errno,
    };
    if !offset.is_finite() {
        return Err(err(nix::errno::Errno::EINVAL));
    }
    let now = local_fixed(SystemTime::now());
    let target = now + (offset * (1u64 << 32) as f64) as i128;
    if target < 0 {
        return Err(err(nix::errno::Errno::EINVAL));
    }
    let secs = (target >> 32) as u64;
    let nanos = (((target & 0xffff_ffff) * 1_000_000_000) >> 32) as u32;
    let ts = nix::sys::time::TimeSpec::from(Duration::new(secs, nanos));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(err)?;
    tracing::info!("ntp: clock stepped by {offset:+.6} s");
    Ok(())
}

impl fmt::Display for NtpSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stratum {}: offset {:+.6} s, delay {:.6} s",
            self.server, self.stratum, self.offset, self.delay
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(originate: NtpTimestamp) -> NtpPacket {
        let now = NtpTimestamp::from_system_time(SystemTime::now());
        NtpPacket {
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            reference_id: *b"LOCL",
            originate,
            receive: now,
            transmit: now,
            ..NtpPacket::default()
        }
    }

    #[test]
    fn parse_reply_is_total_on_truncated_input_and_any_first_bytes() {
        let good = reply(NtpTimestamp(42)).encode();
        for len in 0..PACKET_LEN {
            assert!(
                matches!(parse_reply(&good[..len]), Err(NtpError::Short { len: l }) if l == len),
                "length {len}"
            );
        }
        assert_eq!(parse_reply(&good).unwrap().originate, NtpTimestamp(42));
        // Trailing extension fields are ignored.
        let mut long = good.to_vec();
        long.extend_from_slice(&[0xff; 100]);
        assert!(parse_reply(&long).is_ok());
        // Every value of the first two bytes: no panic, and anything accepted satisfies the
        // checks. (Decoding arbitrary bytes is tested in farmgate_wire::ntp, and by the
        // ntp_reply fuzz target.)
        for first in 0..=255u8 {
            for stratum in [0u8, 1, 8, 15, 16, 255] {
                let mut b = good;
                b[0] = first;
                b[1] = stratum;
                if let Ok(p) = parse_reply(&b) {
                    assert!(p.mode == 4 || p.mode == 5);
                    assert!((1..=15).contains(&p.stratum));
                    assert_ne!(p.leap, 3);
                }
            }
        }
    }

    #[test]
    fn parse_reply_rejects_bad_fields() {
        let mut p = reply(NtpTimestamp(1));
        p.stratum = 0;
        p.leap = 3;
        p.reference_id = *b"RATE";
        assert_eq!(
            parse_reply(&p.encode()).unwrap_err().to_string(),
            "kiss-o'-death \"RATE\" (stratum 0)"
        );
        let mut p = reply(NtpTimestamp(1));
        p.leap = 3;
        assert!(matches!(
            parse_reply(&p.encode()),
            Err(NtpError::Unsynchronised)
        ));
        let mut p = reply(NtpTimestamp(1));
        p.stratum = 16;
        assert!(matches!(
            parse_reply(&p.encode()),
            Err(NtpError::Stratum(16))
        ));
        let mut p = reply(NtpTimestamp(1));
        p.mode = MODE_CLIENT;
        assert!(matches!(parse_reply(&p.encode()), Err(NtpError::Mode(3))));
        let mut p = reply(NtpTimestamp(1));
        p.version = 0;
        assert!(matches!(
            parse_reply(&p.encode()),
            Err(NtpError::Version(0))
        ));
        let mut p = reply(NtpTimestamp(1));
        p.transmit = NtpTimestamp(0);
        assert!(matches!(
            parse_reply(&p.encode()),
            Err(NtpError::ZeroTransmit)
        ));
    }

    #[test]
    fn offset_and_delay_follow_the_standard_formulas() {
        let s = |x: f64| (x * (1u64 << 32) as f64) as i128;
        // Server 10 s ahead, 0.1 s each way, 0.05 s of server processing.
        let (offset, delay) = offset_delay(s(100.0), s(110.1), s(110.15), s(100.25));
        assert!((offset - 10.0).abs() < 1e-6, "{offset}");
        assert!((delay - 0.2).abs() < 1e-6, "{delay}");
    }

    #[test]
    fn peers_split_into_host_and_port() {
        let ok = |p: &str| split_host_port(p, 123).unwrap();
        assert_eq!(ok("ci-gateway"), ("ci-gateway".into(), 123));
        assert_eq!(ok("ci-gateway:1123"), ("ci-gateway".into(), 1123));
        assert_eq!(ok("10.0.0.1"), ("10.0.0.1".into(), 123));
        assert_eq!(ok("10.0.0.1:9"), ("10.0.0.1".into(), 9));
        assert_eq!(ok("fe80::1"), ("fe80::1".into(), 123));
        assert_eq!(ok("[::1]:5123"), ("::1".into(), 5123));
        assert_eq!(ok("[::1]"), ("::1".into(), 123));
        for bad in [
            "", ":1", "host:0", "host:x", "[::1", "[nope]", "[::1]x", "a b", "h:1:2",
        ] {
            assert!(split_host_port(bad, 123).is_err(), "{bad:?}");
        }
    }
}
