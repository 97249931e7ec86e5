//! The DHCPv4 client's packets (RFC 2131/2132): DISCOVER and REQUEST built, OFFER, ACK and
//! NAK parsed. Parsing never panics: a reply that is truncated, malformed or not for us is
//! an [`Err`] with the reason, and the client skips it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use farmgate_wire::dhcp::{
    BOOTREPLY, BOOTREQUEST, CHADDR_OFFSET, COOKIE_OFFSET, FILE_LEN, FILE_OFFSET, FLAG_BROADCAST,
    HTYPE_ETHERNET, MIN_MESSAGE_LEN, OPT_END, OPTIONS_OFFSET, OVERLOAD_FILE, OVERLOAD_SNAME,
    SIADDR_OFFSET, SNAME_LEN, SNAME_OFFSET, XID_OFFSET, YIADDR_OFFSET,
};
pub use farmgate_wire::dhcp::{
    CLIENT_PORT, MAGIC_COOKIE, MessageType, OPT_BROADCAST, OPT_CLIENT_ID, OPT_DNS, OPT_DOMAIN,
    OPT_HOSTNAME, OPT_LEASE_TIME, OPT_MAX_MESSAGE_SIZE, OPT_MESSAGE_TYPE, OPT_NTP, OPT_OVERLOAD,
    OPT_PARAMETER_REQUEST_LIST, OPT_REQUESTED_IP, OPT_ROUTER, OPT_SERVER_ID, OPT_SUBNET_MASK,
    SERVER_PORT,
};

/// The options the client asks for (option 55).
pub const REQUESTED_OPTIONS: [u8; 8] = [
    OPT_SUBNET_MASK,
    OPT_ROUTER,
    OPT_DNS,
    OPT_HOSTNAME,
    OPT_DOMAIN,
    OPT_BROADCAST,
    OPT_NTP,
    OPT_LEASE_TIME,
];

/// A client message to build: DISCOVER, or REQUEST of an offered address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// [`MessageType::Discover`] or [`MessageType::Request`].
    pub kind: MessageType,
    /// Transaction id.
    pub xid: u32,
    /// Client hardware (Ethernet) address.
    pub mac: [u8; 6],
    /// Seconds since the client started.
    pub secs: u16,
    /// REQUEST: the offered address (option 50).
    pub requested_ip: Option<Ipv4Addr>,
    /// REQUEST: the chosen server (option 54).
    pub server_id: Option<Ipv4Addr>,
    /// `ciaddr`: the client's address, when it renews a lease it holds (RFC 2131
    /// RENEWING/REBINDING: no options 50 and 54 then).
    pub ciaddr: Option<Ipv4Addr>,
}

impl ClientMessage {
    /// The message on the wire (at least 300 bytes, broadcast flag set).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; OPTIONS_OFFSET];
        b[0] = BOOTREQUEST;
        b[1] = HTYPE_ETHERNET;
        b[2] = 6;
        b[XID_OFFSET..XID_OFFSET + 4].copy_from_slice(&self.xid.to_be_bytes());
        b[8..10].copy_from_slice(&self.secs.to_be_bytes());
        b[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
        if let Some(ip) = self.ciaddr {
            b[12..16].copy_from_slice(&ip.octets());
        }
        b[CHADDR_OFFSET..CHADDR_OFFSET + 6].copy_from_slice(&self.mac);
        b[COOKIE_OFFSET..OPTIONS_OFFSET].copy_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, self.kind.code()]);
        b.extend_from_slice(&[OPT_CLIENT_ID, 7, 1]);
        b.extend_from_slice(&self.mac);
        b.extend_from_slice(&[OPT_MAX_MESSAGE_SIZE, 2]);
        b.extend_from_slice(&1500u16.to_be_bytes());
        if let Some(ip) = self.requested_ip {
            b.extend_from_slice(&[OPT_REQUESTED_IP, 4]);
            b.extend_from_slice(&ip.octets());
        }
        if let Some(ip) = self.server_id {
            b.extend_from_slice(&[OPT_SERVER_ID, 4]);
            b.extend_from_slice(&ip.octets());
        }
        b.extend_from_slice(&[OPT_PARAMETER_REQUEST_LIST, REQUESTED_OPTIONS.len() as u8]);
        b.extend_from_slice(&REQUESTED_OPTIONS);
        b.push(OPT_END);
        if b.len() < MIN_MESSAGE_LEN {
            b.resize(MIN_MESSAGE_LEN, 0);
        }
        b
    }
}

/// A server reply for this client (xid and hardware address checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// OFFER, ACK or NAK.
    pub kind: MessageType,
    /// `yiaddr`: the address offered or acknowledged.
    pub your_ip: Ipv4Addr,
    /// `siaddr`: next server (fallback for a missing server id).
    pub server_ip: Ipv4Addr,
    /// Options by code (repeated options concatenated, RFC 3396).
    pub options: BTreeMap<u8, Vec<u8>>,
}

/// Reads the options of `area` (at offset `base` of the message) into `out`, concatenating
/// repeated ones; errors on an option that does not fit.
fn read_options(area: &[u8], base: usize, out: &mut BTreeMap<u8, Vec<u8>>) -> Result<(), String> {
    for o in farmgate_wire::dhcp::options(area, base) {
        let o = o.map_err(|e| e.to_string())?;
        out.entry(o.code).or_default().extend_from_slice(o.data);
    }
    Ok(())
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses a datagram received on port 68: `Err` (with the reason) when it is not a
/// well-formed OFFER/ACK/NAK for transaction `xid` and hardware address `mac`.
pub fn parse_reply(data: &[u8], xid: u32, mac: &[u8; 6]) -> Result<Reply, String> {
    if data.len() < OPTIONS_OFFSET {
        return Err(format!("{} bytes, shorter than a BOOTP header", data.len()));
    }
    if data[0] != BOOTREPLY {
        return Err(format!("op {} is not BOOTREPLY", data[0]));
    }
    let got_xid = u32::from_be_bytes([
        data[XID_OFFSET],
        data[XID_OFFSET + 1],
        data[XID_OFFSET + 2],
        data[XID_OFFSET + 3],
    ]);
    if got_xid != xid {
        return Err(format!("xid {got_xid:#010x} is not ours ({xid:#010x})"));
    }
    if data[CHADDR_OFFSET..CHADDR_OFFSET + 6] != mac[..] {
        return Err("chaddr is not our hardware address".into());
    }
    if data[COOKIE_OFFSET..OPTIONS_OFFSET] != MAGIC_COOKIE {
        return Err("no DHCP magic cookie".into());
    }
    let mut options = BTreeMap::new();
    read_options(&data[OPTIONS_OFFSET..], OPTIONS_OFFSET, &mut options)?;
    // Option overload (RFC 2131 4.1): `file` first, then `sname`.
    let overload = options
        .get(&OPT_OVERLOAD)
        .and_then(|v| v.first().copied())
        .unwrap_or(0);
    if overload & OVERLOAD_FILE != 0 {
        let file = &data[FILE_OFFSET..FILE_OFFSET + FILE_LEN];
        read_options(file, FILE_OFFSET, &mut options)?;
    }
    if overload & OVERLOAD_SNAME != 0 {
        let sname = &data[SNAME_OFFSET..SNAME_OFFSET + SNAME_LEN];
        read_options(sname, SNAME_OFFSET, &mut options)?;
    }
    let kind = match options.get(&OPT_MESSAGE_TYPE).map(Vec::as_slice) {
        Some([code]) => MessageType::from_code(*code)
            .filter(|k| matches!(k, MessageType::Offer | MessageType::Ack | MessageType::Nak))
            .ok_or_else(|| format!("message type {code} is not OFFER/ACK/NAK"))?,
        Some(v) => return Err(format!("message type option has {} bytes", v.len())),
        None => return Err("no message type option (BOOTP, not DHCP)".into()),
    };
    Ok(Reply {
        kind,
        your_ip: ip_at(data, YIADDR_OFFSET),
        server_ip: ip_at(data, SIADDR_OFFSET),
        options,
    })
}

/// What the client got from its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length (from the subnet mask; the classful default without one).
    pub prefix_len: u8,
    /// The first router, if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// The server's identifier (option 54).
    pub server: Ipv4Addr,
    /// NTP servers (option 42).
    pub ntp: Vec<Ipv4Addr>,
    /// Host name (option 12).
    pub hostname: Option<String>,
    /// Domain name (option 15).
    pub domain: Option<String>,
    /// Lease time (option 51; `None`: infinite or not given).
    pub lease_time: Option<Duration>,
}

/// The prefix length of a contiguous netmask (`None` for a non-contiguous one).
pub fn prefix_from_mask(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

fn ips(v: Option<&Vec<u8>>) -> Vec<Ipv4Addr> {
    v.map(|v| {
        v.chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect()
    })
    .unwrap_or_default()
}

fn text(v: Option<&Vec<u8>>) -> Option<String> {
    let v = v?;
    let s = String::from_utf8_lossy(v);
    let s = s.trim_end_matches('\0').trim();
    (!s.is_empty()).then(|| s.to_string())
}

impl Reply {
    /// The server identifier (option 54, else `siaddr`).
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        ips(self.options.get(&OPT_SERVER_ID))
            .first()
            .copied()
            .or_else(|| (!self.server_ip.is_unspecified()).then_some(self.server_ip))
    }

    /// The lease this OFFER or ACK describes; `Err` when it has no usable address.
    pub fn lease(&self) -> Result<Lease, String> {
        if self.your_ip.is_unspecified()
            || self.your_ip.is_broadcast()
            || self.your_ip.is_multicast()
        {
            return Err(format!("unusable address {}", self.your_ip));
        }
        let server = self.server_id().ok_or("no server identifier")?;
        let prefix_len = match self.options.get(&OPT_SUBNET_MASK).map(Vec::as_slice) {
            Some(&[a, b, c, d]) => prefix_from_mask(Ipv4Addr::new(a, b, c, d))
                .ok_or_else(|| format!("non-contiguous subnet mask {a}.{b}.{c}.{d}"))?,
            Some(v) => return Err(format!("subnet mask option has {} bytes", v.len())),
            None => match self.your_ip.octets()[0] {
                0..=127 => 8,
                128..=191 => 16,
                _ => 24,
            },
        };
        let lease_time = match self.options.get(&OPT_LEASE_TIME).map(Vec::as_slice) {
            Some(&[a, b, c, d]) => match u32::from_be_bytes([a, b, c, d]) {
                u32::MAX => None,
                s => Some(Duration::from_secs(u64::from(s))),
            },
            _ => None,
        };
        Ok(Lease {
            address: self.your_ip,
            prefix_len,
            router: ips(self.options.get(&OPT_ROUTER)).first().copied(),
            dns: ips(self.options.get(&OPT_DNS)),
            server,
            ntp: ips(self.options.get(&OPT_NTP)),
            hostname: text(self.options.get(&OPT_HOSTNAME)),
            domain: text(self.options.get(&OPT_DOMAIN)),
            lease_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const XID: u32 = 0xdead_beef;

    /// A server reply as a server would write it.
    fn reply(kind: u8, options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; OPTIONS_OFFSET];
        b[0] = 2;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&XID.to_be_bytes());
        b[16..20].copy_from_slice(&[10, 77, 0, 55]);
        b[20..24].copy_from_slice(&[10, 77, 0, 1]);
        b[28..34].copy_from_slice(&MAC);
        b[COOKIE_OFFSET..OPTIONS_OFFSET].copy_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind]);
        for (code, data) in options {
            b.push(*code);
            b.push(data.len() as u8);
            b.extend_from_slice(data);
        }
        b.push(255);
        b.resize(b.len().max(300), 0);
        b
    }

    fn full_ack() -> Vec<u8> {
        reply(
            5,
            &[
                (OPT_SERVER_ID, &[10, 77, 0, 1]),
                (OPT_SUBNET_MASK, &[255, 255, 255, 0]),
                (OPT_ROUTER, &[10, 77, 0, 1, 10, 77, 0, 2]),
                (OPT_DNS, &[10, 77, 0, 1, 1, 1, 1, 1]),
                (OPT_NTP, &[10, 77, 0, 1]),
                (OPT_HOSTNAME, b"dut-3"),
                (OPT_DOMAIN, b"farm.test\0"),
                (OPT_LEASE_TIME, &3600u32.to_be_bytes()),
            ],
        )
    }

    #[test]
    fn discover_and_request_encoding() {
        let d = ClientMessage {
            kind: MessageType::Discover,
            xid: XID,
            mac: MAC,
            secs: 3,
            requested_ip: None,
            server_id: None,
            ciaddr: None,
        }
        .encode();
        assert_eq!(d.len(), 300);
        assert_eq!(&d[0..3], &[1, 1, 6]);
        assert_eq!(&d[4..8], &XID.to_be_bytes());
        assert_eq!(&d[8..10], &[0, 3]);
        assert_eq!(&d[10..12], &[0x80, 0]);
        assert_eq!(&d[28..34], &MAC);
        assert_eq!(&d[236..240], &MAGIC_COOKIE);
        let mut opts = BTreeMap::new();
        read_options(&d[240..], 240, &mut opts).expect("our own options parse");
        assert_eq!(opts[&OPT_MESSAGE_TYPE], vec![1]);
        assert_eq!(
            opts[&OPT_PARAMETER_REQUEST_LIST],
            REQUESTED_OPTIONS.to_vec()
        );
        assert!(opts[&OPT_PARAMETER_REQUEST_LIST].contains(&OPT_NTP));
        assert!(!opts.contains_key(&OPT_REQUESTED_IP));

        let r = ClientMessage {
            kind: MessageType::Request,
            xid: XID,
            mac: MAC,
            secs: 0,
            requested_ip: Some(Ipv4Addr::new(10, 77, 0, 55)),
            server_id: Some(Ipv4Addr::new(10, 77, 0, 1)),
            ciaddr: None,
        }
        .encode();
        assert_eq!(&r[12..16], &[0, 0, 0, 0]);
        // Renewing: ciaddr is the held address, no options 50/54.
        let renew = ClientMessage {
            kind: MessageType::Request,
            xid: XID,
            mac: MAC,
            secs: 0,
            requested_ip: None,
            server_id: None,
            ciaddr: Some(Ipv4Addr::new(10, 77, 0, 55)),
        }
        .encode();
        assert_eq!(&renew[12..16], &[10, 77, 0, 55]);
        let mut ropts = BTreeMap::new();
        read_options(&renew[240..], 240, &mut ropts).expect("our own options parse");
        assert!(!ropts.contains_key(&OPT_REQUESTED_IP) && !ropts.contains_key(&OPT_SERVER_ID));
        let mut opts = BTreeMap::new();
        read_options(&r[240..], 240, &mut opts).expect("our own options parse");
        assert_eq!(opts[&OPT_MESSAGE_TYPE], vec![3]);
        assert_eq!(opts[&OPT_REQUESTED_IP], vec![10, 77, 0, 55]);
        assert_eq!(opts[&OPT_SERVER_ID], vec![10, 77, 0, 1]);
        assert_eq!(opts[&OPT_CLIENT_ID], [&[1u8][..], &MAC].concat());
    }

    #[test]
    fn ack_parsed_into_lease() {
        let r = parse_reply(&full_ack(), XID, &MAC).expect("a valid ACK");
        assert_eq!(r.kind, MessageType::Ack);
        let l = r.lease().expect("a usable lease");
        assert_eq!(l.address, Ipv4Addr::new(10, 77, 0, 55));
        assert_eq!(l.prefix_len, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(
            l.dns,
            vec![Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert_eq!(l.ntp, vec![Ipv4Addr::new(10, 77, 0, 1)]);
        assert_eq!(l.server, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(l.hostname.as_deref(), Some("dut-3"));
        assert_eq!(l.domain.as_deref(), Some("farm.test"));
        assert_eq!(l.lease_time, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn offer_nak_and_defaults() {
        let offer = parse_reply(&reply(2, &[]), XID, &MAC).expect("a valid OFFER");
        assert_eq!(offer.kind, MessageType::Offer);
        // No server id option: siaddr; no mask: classful (10/8).
        let l = offer.lease().expect("lease from siaddr");
        assert_eq!(l.server, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(l.prefix_len, 8);
        assert_eq!(l.router, None);
        let nak = parse_reply(&reply(6, &[]), XID, &MAC).expect("a valid NAK");
        assert_eq!(nak.kind, MessageType::Nak);
    }

    #[test]
    fn split_and_overloaded_options() {
        // RFC 3396: a long option split in two is concatenated.
        let mut b = reply(5, &[(OPT_DNS, &[10, 0, 0, 1]), (OPT_DNS, &[10, 0, 0, 2])]);
        // Option overload: the router is in the `file` field.
        let end = b.iter().rposition(|&x| x == 255).expect("END");
        b.truncate(end);
        b.extend_from_slice(&[OPT_OVERLOAD, 1, 1, 255]);
        b[108..114].copy_from_slice(&[OPT_ROUTER, 4, 10, 0, 0, 254]);
        b[114] = 255;
        let l = parse_reply(&b, XID, &MAC)
            .expect("valid")
            .lease()
            .expect("lease");
        assert_eq!(
            l.dns,
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 0, 254)));
    }

    #[test]
    fn replies_not_for_us_are_skipped() {
        let ack = full_ack();
        assert!(
            parse_reply(&ack, XID + 1, &MAC)
                .unwrap_err()
                .contains("xid")
        );
        let other_mac = [2, 0, 0, 0, 0, 1];
        assert!(
            parse_reply(&ack, XID, &other_mac)
                .unwrap_err()
                .contains("chaddr")
        );
        let mut req = ack.clone();
        req[0] = 1;
        assert!(
            parse_reply(&req, XID, &MAC)
                .unwrap_err()
                .contains("BOOTREPLY")
        );
        let mut nocookie = ack.clone();
        nocookie[236] = 0;
        assert!(
            parse_reply(&nocookie, XID, &MAC)
                .unwrap_err()
                .contains("cookie")
        );
        // BOOTP reply without a message type; a DISCOVER-typed reply.
        let mut bootp = ack.clone();
        bootp.truncate(240);
        bootp.push(255);
        assert!(
            parse_reply(&bootp, XID, &MAC)
                .unwrap_err()
                .contains("message type")
        );
        assert!(parse_reply(&reply(1, &[]), XID, &MAC).is_err());
        // Unusable lease contents.
        let zero = {
            let mut b = full_ack();
            b[16..20].copy_from_slice(&[0, 0, 0, 0]);
            b
        };
        let r = parse_reply(&zero, XID, &MAC).expect("well-formed");
        assert!(r.lease().unwrap_err().contains("unusable"));
        let bad_mask = reply(5, &[(OPT_SUBNET_MASK, &[255, 0, 255, 0])]);
        let r = parse_reply(&bad_mask, XID, &MAC).expect("well-formed");
        assert!(r.lease().unwrap_err().contains("non-contiguous"));
        let short_mask = reply(5, &[(OPT_SUBNET_MASK, &[255, 255])]);
        let r = parse_reply(&short_mask, XID, &MAC).expect("well-formed");
        assert!(r.lease().is_err());
    }

    #[test]
    fn truncated_and_garbage_never_panic() {
        let ack = full_ack();
        // Every truncation of a valid ACK: an error or a reply, never a panic.
        let mut errors = 0;
        for n in 0..ack.len() {
            match parse_reply(&ack[..n], XID, &MAC) {
                Ok(r) => {
                    let _ = r.lease();
                }
                Err(_) => errors += 1,
            }
        }
        assert!(errors >= OPTIONS_OFFSET, "short prefixes must be rejected");
        assert!(
            parse_reply(&ack[..100], XID, &MAC)
                .unwrap_err()
                .contains("shorter")
        );
        // An option whose length runs past the end.
        let mut b = ack[..OPTIONS_OFFSET].to_vec();
        b.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, 5, OPT_DNS, 200, 1, 2]);
        assert!(
            parse_reply(&b, XID, &MAC)
                .unwrap_err()
                .contains("length 200 runs past the end")
        );
        let mut b = ack[..OPTIONS_OFFSET].to_vec();
        b.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, 5, OPT_DNS]);
        assert!(
            parse_reply(&b, XID, &MAC)
                .unwrap_err()
                .contains("length byte is missing")
        );
        // Pseudo-random garbage after a valid header, deterministic (xorshift).
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..5000 {
            let mut b = ack[..OPTIONS_OFFSET].to_vec();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 400) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.push(state as u8);
            }
            if let Ok(r) = parse_reply(&b, XID, &MAC) {
                let _ = r.lease();
                let _ = r.server_id();
            }
        }
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_from_mask(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(
            prefix_from_mask(Ipv4Addr::new(255, 255, 255, 255)),
            Some(32)
        );
        assert_eq!(prefix_from_mask(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(prefix_from_mask(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
        assert_eq!(prefix_from_mask(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
