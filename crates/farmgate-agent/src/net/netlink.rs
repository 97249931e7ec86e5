//! A minimal rtnetlink client (links listed and set up, IPv4 addresses and routes added),
//! on a plain `NETLINK_ROUTE` socket: the few messages the agent needs, without a general
//! netlink library (which would add about 2 MB to the agent's binary).
//!
//! The socket belongs to the network namespace of the thread that creates it. Requests are
//! synchronous (the kernel answers at once); every reply is bounds-checked.

use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

const AF_NETLINK: i32 = 16;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

const IFF_UP: u32 = 1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const HDR_LEN: usize = 16;

/// A link: index, name and hardware address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address (empty when the link has none).
    pub mac: Vec<u8>,
}

/// A `NETLINK_ROUTE` socket.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Appends an attribute (padded to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

/// The attributes in `b`: (type, data); stops at the first malformed one.
fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while let (Some(len), Some(kind)) = (u16_at(b, i), u16_at(b, i + 2)) {
        let len = usize::from(len);
        let Some(data) = b.get(i + 4..i + len).filter(|_| len >= 4) else {
            break;
        };
        out.push((kind & 0x3fff, data));
        i += align4(len);
    }
    out
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let sock = Socket::new(Domain::from(AF_NETLINK), Type::RAW, Some(Protocol::from(0)))?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends a request (header added) and collects the payloads of the replies until the
    /// ACK or DONE; a kernel error becomes an [`io::Error`] with its errno.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Vec::with_capacity(HDR_LEN + body.len());
        msg.extend_from_slice(&((HDR_LEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        self.sock.send(&msg)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = (&self.sock).read(&mut buf)?;
            let mut data = &buf[..n];
            while data.len() >= HDR_LEN {
                let len = u32_at(data, 0).unwrap_or(0) as usize;
                let mtype = u16_at(data, 4).unwrap_or(0);
                let mseq = u32_at(data, 8).unwrap_or(0);
                if len < HDR_LEN || len > data.len() {
                    return Err(bad(format!(
                        "netlink message of {len} bytes in {}",
                        data.len()
                    )));
                }
                let payload = &data[HDR_LEN..len];
                data = &data[align4(len).min(data.len())..];
                if mseq != seq {
                    continue;
                }
                match mtype {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = u32_at(payload, 0)
                            .map(|e| -(e as i32))
                            .ok_or_else(|| bad("truncated netlink error"))?;
                        return if errno == 0 {
                            Ok(out)
                        } else {
                            Err(io::Error::from_raw_os_error(errno))
                        };
                    }
                    _ => out.push(payload.to_vec()),
                }
            }
        }
    }

    /// All links.
    pub fn links(&mut self) -> io::Result<Vec<LinkInfo>> {
        let body = [AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let replies = self.request(RTM_GETLINK, NLM_F_DUMP, &body)?;
        let mut links = Vec::new();
        for p in replies {
            let Some(index) = u32_at(&p, 4) else { continue };
            let mut link = LinkInfo {
                index,
                name: String::new(),
                mac: Vec::new(),
            };
            for (kind, data) in attrs(p.get(16..).unwrap_or_default()) {
                match kind {
                    IFLA_IFNAME => {
                        link.name = String::from_utf8_lossy(data).trim_end_matches('\0').into()
                    }
                    IFLA_ADDRESS => link.mac = data.to_vec(),
                    _ => {}
                }
            }
            links.push(link);
        }
        Ok(links)
    }

    /// Sets the link up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut body = vec![AF_UNSPEC, 0, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
        self.request(RTM_NEWLINK, NLM_F_ACK, &body).map(drop)
    }

    /// Adds (or replaces) an IPv4 address with its broadcast address.
    pub fn add_address(&mut self, index: u32, address: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let mut body = vec![AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE];
        body.extend_from_slice(&index.to_ne_bytes());
        attr(&mut body, IFA_LOCAL, &address.octets());
        attr(&mut body, IFA_ADDRESS, &address.octets());
        if prefix_len < 31 {
            let host = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
            let brd = Ipv4Addr::from(u32::from(address) | host);
            attr(&mut body, IFA_BROADCAST, &brd.octets());
        }
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        self.request(RTM_NEWADDR, flags, &body).map(drop)
    }

    /// Adds (or replaces) a route `destination/prefix_len via gateway dev index` in the
    /// main table.
    pub fn add_route(
        &mut self,
        index: u32,
        destination: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
    ) -> io::Result<()> {
        let mut body = vec![
            AF_INET,
            prefix_len,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes());
        if prefix_len > 0 {
            attr(&mut body, RTA_DST, &destination.octets());
        }
        attr(&mut body, RTA_GATEWAY, &gateway.octets());
        attr(&mut body, RTA_OIF, &index.to_ne_bytes());
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        self.request(RTM_NEWROUTE, flags, &body).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_malformed_ones_stop() {
        let mut b = Vec::new();
        attr(&mut b, IFLA_IFNAME, b"eth0\0");
        attr(&mut b, IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]);
        assert_eq!(b.len() % 4, 0);
        let a = attrs(&b);
        assert_eq!(
            a,
            vec![
                (IFLA_IFNAME, &b"eth0\0"[..]),
                (IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1][..])
            ]
        );
        // Truncated, zero-length and oversized attributes end the walk without panicking.
        for n in 0..b.len() {
            assert!(attrs(&b[..n]).len() <= 2);
        }
        let mut z = Vec::new();
        z.extend_from_slice(&0u16.to_ne_bytes());
        z.extend_from_slice(&1u16.to_ne_bytes());
        assert!(attrs(&z).is_empty());
        let mut big = Vec::new();
        big.extend_from_slice(&400u16.to_ne_bytes());
        big.extend_from_slice(&1u16.to_ne_bytes());
        assert!(attrs(&big).is_empty());
    }
}
