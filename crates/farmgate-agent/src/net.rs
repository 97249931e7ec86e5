//! The DUT's network, brought up by the agent itself (it runs as PID 1, without busybox
//! scripts), with boot2container's semantics:
//!
//! - with `ip=` on the kernel command line ([`B2cConfig::kernel_ip`]) the kernel configured
//!   the network: nothing to do (only `lo` is brought up);
//! - with `b2c.iface=…` options: each named interface, static (`address=`, `gateway=`,
//!   `nameserver=`, `route=`) or DHCP (`auto`/`dhcp`, or no address given), `forward`
//!   enabling IPv4 forwarding;
//! - otherwise: DHCP on the wired interfaces (`eth*`, `en*`) that appear within the
//!   timeout (drivers load asynchronously); one lease is enough.
//!
//! [`dhcp`] is a DHCPv4 client (DISCOVER, OFFER, REQUEST, ACK, with retries) on a UDP socket
//! bound to the interface; [`configure`] sets links, addresses and routes over netlink ([`netlink`]) and
//! writes `resolv.conf`.

pub mod dhcp;
pub mod netlink;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::time::Instant;

use crate::cmdline::{B2cConfig, Iface};
pub use dhcp::Lease;
use dhcp::{ClientMessage, MessageType};
use netlink::LinkInfo;

/// Errors of the network setup; each names the interface (or file) and what failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A socket or file operation failed.
    #[error("{iface}: {what}: {source}")]
    Io {
        /// Interface (or file) concerned.
        iface: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{iface}: {what}: {source}")]
    Netlink {
        /// Interface concerned.
        iface: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The interface does not exist (or did not appear in time).
    #[error("{iface}: no such network interface{detail}")]
    NoSuchInterface {
        /// Interface name.
        iface: String,
        /// Extra context (e.g. " after 10 s").
        detail: String,
    },
    /// No wired interface appeared.
    #[error("no wired network interface (eth*, en*) appeared within {} s", secs(*.timeout))]
    NoInterfaces {
        /// How long we waited.
        timeout: Duration,
    },
    /// The interface has no Ethernet hardware address.
    #[error("{iface}: hardware address {mac:02x?} is not an Ethernet address")]
    BadHardwareAddress {
        /// Interface name.
        iface: String,
        /// What the kernel reported.
        mac: Vec<u8>,
    },
    /// No DHCP server answered.
    #[error(
        "{iface}: no DHCP offer within {} s ({discovers} DISCOVERs sent{skipped})",
        secs(*.timeout)
    )]
    NoOffer {
        /// Interface name.
        iface: String,
        /// How long we waited.
        timeout: Duration,
        /// DISCOVERs sent.
        discovers: u32,
        /// E.g. ", 2 malformed replies skipped, last: …".
        skipped: String,
    },
    /// A server offered an address but did not acknowledge it.
    #[error(
        "{iface}: DHCP server {server} offered {address} but no ACK came within {} s \
         ({requests} REQUESTs sent, {naks} NAKs)",
        secs(*.timeout)
    )]
    NoAck {
        /// Interface name.
        iface: String,
        /// The last server that offered.
        server: Ipv4Addr,
        /// The address it offered.
        address: Ipv4Addr,
        /// How long we waited.
        timeout: Duration,
        /// REQUESTs sent.
        requests: u32,
        /// NAKs received.
        naks: u32,
    },
    /// A `b2c.iface` option has a value we cannot use.
    #[error("b2c.iface {iface}: {detail}")]
    BadConfig {
        /// Interface name.
        iface: String,
        /// What is wrong.
        detail: String,
    },
}

fn secs(d: Duration) -> String {
    format!("{}", (d.as_secs_f64() * 10.0).round() / 10.0)
}

fn io_err(iface: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let (iface, what) = (iface.to_string(), what.into());
    move |source| NetError::Io {
        iface,
        what,
        source,
    }
}

fn nl_err(iface: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let (iface, what) = (iface.to_string(), what.into());
    move |source| NetError::Netlink {
        iface,
        what,
        source,
    }
}

/// A static route: `destination/prefix_len via`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRoute {
    /// Destination network.
    pub destination: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Gateway.
    pub via: Ipv4Addr,
}

/// An interface's IPv4 configuration, from a DHCP lease or from `b2c.iface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceConfig {
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Default route via this gateway.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers (for `resolv.conf`).
    pub nameservers: Vec<Ipv4Addr>,
    /// DNS search domain (for `resolv.conf`).
    pub search: Option<String>,
    /// Extra routes.
    pub routes: Vec<StaticRoute>,
}

impl From<&Lease> for IfaceConfig {
    fn from(l: &Lease) -> IfaceConfig {
        IfaceConfig {
            address: l.address,
            prefix_len: l.prefix_len,
            gateway: l.router,
            nameservers: l.dns.clone(),
            search: l.domain.clone(),
            routes: Vec::new(),
        }
    }
}

fn parse_ip(iface: &str, what: &str, s: &str) -> Result<Ipv4Addr, NetError> {
    s.parse().map_err(|_| NetError::BadConfig {
        iface: iface.into(),
        detail: format!("{what} {s:?} is not an IPv4 address"),
    })
}

fn parse_cidr(iface: &str, what: &str, s: &str) -> Result<(Ipv4Addr, u8), NetError> {
    let bad = |detail: String| NetError::BadConfig {
        iface: iface.into(),
        detail,
    };
    if what == "route" && s == "default" {
        return Ok((Ipv4Addr::UNSPECIFIED, 0));
    }
    let Some((ip, len)) = s.split_once('/') else {
        return Err(bad(format!("{what} {s:?} has no /prefix length")));
    };
    let ip = parse_ip(iface, what, ip)?;
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| bad(format!("{what} {s:?}: prefix length is not 0..=32")))?;
    Ok((ip, len))
}

/// The static part of a `b2c.iface` besides the address.
struct Extras {
    gateway: Option<Ipv4Addr>,
    nameservers: Vec<Ipv4Addr>,
    routes: Vec<StaticRoute>,
}

/// The static part of a `b2c.iface`: gateway, nameservers and routes (the address is the
/// caller's, from `address=` or a lease).
fn static_extras(i: &Iface) -> Result<Extras, NetError> {
    let gateway = i
        .gateway
        .as_deref()
        .map(|g| parse_ip(&i.name, "gateway", g))
        .transpose()?;
    let nameservers = i
        .nameservers
        .iter()
        .map(|n| parse_ip(&i.name, "nameserver", n))
        .collect::<Result<Vec<_>, _>>()?;
    let routes = i
        .routes
        .iter()
        .map(|r| {
            let (destination, prefix_len) = parse_cidr(&i.name, "route", &r.destination)?;
            let via = parse_ip(&i.name, "route gateway", &r.via)?;
            Ok(StaticRoute {
                destination,
                prefix_len,
                via,
            })
        })
        .collect::<Result<Vec<_>, NetError>>()?;
    Ok(Extras {
        gateway,
        nameservers,
        routes,
    })
}

/// The static configuration of a `b2c.iface` with `address=`.
pub fn static_config(i: &Iface) -> Result<IfaceConfig, NetError> {
    let Some(address) = i.address.as_deref() else {
        return Err(NetError::BadConfig {
            iface: i.name.clone(),
            detail: "no address= for a static configuration".into(),
        });
    };
    let (address, prefix_len) = parse_cidr(&i.name, "address", address)?;
    let Extras {
        gateway,
        nameservers,
        routes,
    } = static_extras(i)?;
    Ok(IfaceConfig {
        address,
        prefix_len,
        gateway,
        nameservers,
        search: None,
        routes,
    })
}

/// boot2container's wired interfaces: `eth*` and `en*`.
pub fn is_wired(name: &str) -> bool {
    name.starts_with("eth") || name.starts_with("en")
}

/// The netlink socket (in the calling thread's network namespace), errors naming the
/// interface.
struct Nl(netlink::Netlink);

impl Nl {
    fn new(iface: &str) -> Result<Nl, NetError> {
        netlink::Netlink::open()
            .map(Nl)
            .map_err(nl_err(iface, "opening a netlink socket"))
    }

    fn link(&mut self, iface: &str) -> Result<LinkInfo, NetError> {
        self.0
            .links()
            .map_err(nl_err(iface, "listing links"))?
            .into_iter()
            .find(|l| l.name == iface)
            .ok_or_else(|| NetError::NoSuchInterface {
                iface: iface.into(),
                detail: String::new(),
            })
    }

    fn up(&mut self, iface: &str, index: u32) -> Result<(), NetError> {
        self.0
            .set_up(index)
            .map_err(nl_err(iface, "setting the link up"))
    }
}

/// Waits until at least one interface whose name passes `filter` exists (polling netlink
/// every 100 ms; when they had to be waited for, a last look 300 ms later collects NICs
/// probed together; interfaces there at the first look are taken at once), and returns
/// their names, sorted; empty when none appeared within `timeout`.
pub async fn wait_for_interfaces(filter: impl Fn(&str) -> bool, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let Ok(mut nl) = netlink::Netlink::open() else {
        return Vec::new();
    };
    let mut list = || -> Vec<String> {
        let mut names: Vec<String> = nl
            .links()
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.name)
            .filter(|n| filter(n))
            .collect();
        names.sort();
        names
    };
    let mut first = true;
    loop {
        let names = list();
        if !names.is_empty() && first {
            // There before we looked: their drivers were probed together (the modules
            // loaded by the cold plug), nothing more is coming.
            return names;
        }
        first = false;
        if !names.is_empty() {
            tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(300)))
                .await;
            let again = list();
            return if again.len() >= names.len() {
                again
            } else {
                names
            };
        }
        if Instant::now() >= deadline {
            return names;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(100))).await;
    }
}

/// Brings the interface up and gets a DHCPv4 lease on it within `timeout`: DISCOVERs with
/// backoff (1, 2, 4, 4… s), the first OFFER REQUESTed (up to 3 times), a NAK or a silent
/// server restarting from DISCOVER. Malformed or foreign replies are skipped.
pub async fn dhcp(iface: &str, timeout: Duration) -> Result<Lease, NetError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut nl = Nl::new(iface)?;
    let link = nl.link(iface)?;
    let mac: [u8; 6] = link
        .mac
        .as_slice()
        .try_into()
        .ok()
        .filter(|m| *m != [0; 6])
        .ok_or_else(|| NetError::BadHardwareAddress {
            iface: iface.into(),
            mac: link.mac.clone(),
        })?;
    nl.up(iface, link.index)?;
    drop(nl);

    let sock = dhcp_socket(iface)?;
    let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, dhcp::SERVER_PORT);
    let mut discovers = 0u32;
    let mut requests = 0u32;
    let mut naks = 0u32;
    let mut skipped = 0u32;
    let mut last_skip = String::new();
    let mut last_offer: Option<(Ipv4Addr, Ipv4Addr)> = None;
    let mut xid = new_xid(&mac);
    let mut buf = vec![0u8; 4096];
    let secs_since = || u16::try_from(start.elapsed().as_secs()).unwrap_or(u16::MAX);

    'discover: while Instant::now() < deadline {
        xid = xid.wrapping_mul(0x9e37_79b9).wrapping_add(discovers);
        let msg = ClientMessage {
            kind: MessageType::Discover,
            xid,
            mac,
            secs: secs_since(),
            requested_ip: None,
            server_id: None,
            ciaddr: None,
        };
        // A send error (no carrier yet…) is like a lost packet: retried.
        if let Err(e) = sock.send_to(&msg.encode(), server).await {
            tracing::debug!("{iface}: sending DHCPDISCOVER: {e}");
        }
        discovers += 1;
        let wait = Duration::from_secs(1 << discovers.min(3).saturating_sub(1));
        let until = deadline.min(Instant::now() + wait);
        // Wait for an OFFER.
        let offer = loop {
            match recv_reply(&sock, &mut buf, until, xid, &mac).await {
                Recv::Timeout => continue 'discover,
                Recv::Skipped(why) => {
                    skipped += 1;
                    last_skip = why;
                }
                Recv::Reply(r) if r.kind == MessageType::Offer => match r.lease() {
                    Ok(l) => break l,
                    Err(why) => {
                        skipped += 1;
                        last_skip = format!("OFFER: {why}");
                    }
                },
                Recv::Reply(_) => {}
            }
        };
        last_offer = Some((offer.server, offer.address));
        tracing::debug!("{iface}: OFFER of {} from {}", offer.address, offer.server);
        // REQUEST it.
        for attempt in 0..3u32 {
            if Instant::now() >= deadline {
                break 'discover;
            }
            let msg = ClientMessage {
                kind: MessageType::Request,
                xid,
                mac,
                secs: secs_since(),
                requested_ip: Some(offer.address),
                server_id: Some(offer.server),
                ciaddr: None,
            };
            if let Err(e) = sock.send_to(&msg.encode(), server).await {
                tracing::debug!("{iface}: sending DHCPREQUEST: {e}");
            }
            requests += 1;
            let until = deadline.min(Instant::now() + Duration::from_secs(1 << attempt));
            loop {
                match recv_reply(&sock, &mut buf, until, xid, &mac).await {
                    Recv::Timeout => break,
                    Recv::Skipped(why) => {
                        skipped += 1;
                        last_skip = why;
                    }
                    Recv::Reply(r) if r.kind == MessageType::Ack => match r.lease() {
                        Ok(mut l) => {
                            if r.server_id().is_none() {
                                l.server = offer.server;
                            }
                            return Ok(l);
                        }
                        Err(why) => {
                            skipped += 1;
                            last_skip = format!("ACK: {why}");
                        }
                    },
                    Recv::Reply(r) if r.kind == MessageType::Nak => {
                        naks += 1;
                        tracing::debug!("{iface}: NAK from {:?}", r.server_id());
                        continue 'discover;
                    }
                    Recv::Reply(_) => {}
                }
            }
        }
    }
    match last_offer {
        Some((server, address)) => Err(NetError::NoAck {
            iface: iface.into(),
            server,
            address,
            timeout,
            requests,
            naks,
        }),
        None => Err(NetError::NoOffer {
            iface: iface.into(),
            timeout,
            discovers,
            skipped: if skipped == 0 {
                String::new()
            } else {
                format!(", {skipped} replies skipped, last: {last_skip}")
            },
        }),
    }
}

/// Renews `lease` on `iface` (RFC 2131's REBINDING: a REQUEST with the address as
/// `ciaddr`, broadcast, so that any server of the network may answer), returning the
/// renewed lease; a NAK or silence within `timeout` is an error.
pub async fn renew(iface: &str, lease: &Lease, timeout: Duration) -> Result<Lease, NetError> {
    let deadline = Instant::now() + timeout;
    let mut nl = Nl::new(iface)?;
    let link = nl.link(iface)?;
    let mac: [u8; 6] =
        link.mac
            .as_slice()
            .try_into()
            .ok()
            .ok_or_else(|| NetError::BadHardwareAddress {
                iface: iface.into(),
                mac: link.mac.clone(),
            })?;
    drop(nl);
    let sock = dhcp_socket(iface)?;
    let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, dhcp::SERVER_PORT);
    let mut buf = vec![0u8; 4096];
    let mut xid = new_xid(&mac);
    let mut requests = 0u32;
    while Instant::now() < deadline {
        xid = xid.wrapping_add(1);
        let msg = ClientMessage {
            kind: MessageType::Request,
            xid,
            mac,
            secs: 0,
            requested_ip: None,
            server_id: None,
            ciaddr: Some(lease.address),
        };
        if let Err(e) = sock.send_to(&msg.encode(), server).await {
            tracing::debug!("{iface}: sending the renewing DHCPREQUEST: {e}");
        }
        requests += 1;
        let until = deadline.min(Instant::now() + Duration::from_secs(2));
        loop {
            match recv_reply(&sock, &mut buf, until, xid, &mac).await {
                Recv::Timeout => break,
                Recv::Skipped(_) => {}
                Recv::Reply(r) if r.kind == MessageType::Ack => {
                    if let Ok(mut l) = r.lease() {
                        if r.server_id().is_none() {
                            l.server = lease.server;
                        }
                        return Ok(l);
                    }
                }
                Recv::Reply(r) if r.kind == MessageType::Nak => {
                    return Err(NetError::NoAck {
                        iface: iface.into(),
                        server: r.server_id().unwrap_or(lease.server),
                        address: lease.address,
                        timeout,
                        requests,
                        naks: 1,
                    });
                }
                Recv::Reply(_) => {}
            }
        }
    }
    Err(NetError::NoAck {
        iface: iface.into(),
        server: lease.server,
        address: lease.address,
        timeout,
        requests,
        naks: 0,
    })
}

/// Keeps `lease` on `iface` for as long as the task runs: renewed at half its time (at
/// least every 30 s), retried every 30 s when the renewal fails. Leases without a
/// time (infinite) are left alone.
pub async fn keep_lease(iface: String, mut lease: Lease) {
    loop {
        let Some(time) = lease.lease_time else {
            return;
        };
        tokio::time::sleep((time / 2).max(Duration::from_secs(30))).await;
        loop {
            match renew(&iface, &lease, Duration::from_secs(10)).await {
                Ok(l) => {
                    if l.address != lease.address {
                        println!(
                            "farm-agent: {iface}: the DHCP server renewed with another address ({}, was {}): keeping the old one",
                            l.address, lease.address
                        );
                    }
                    lease.lease_time = l.lease_time;
                    break;
                }
                Err(e) => {
                    println!("farm-agent: renewing the DHCP lease: {e}");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        }
    }
}

/// A transaction id that differs between boots and machines (time and MAC mixed).
fn new_xid(mac: &[u8; 6]) -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    let m = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    now ^ m.rotate_left(13) ^ std::process::id()
}

fn dhcp_socket(iface: &str) -> Result<tokio::net::UdpSocket, NetError> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(io_err(iface, "creating the DHCP socket"))?;
    s.set_reuse_address(true)
        .map_err(io_err(iface, "setting SO_REUSEADDR"))?;
    s.set_broadcast(true)
        .map_err(io_err(iface, "setting SO_BROADCAST"))?;
    s.bind_device(Some(iface.as_bytes()))
        .map_err(io_err(iface, "binding the DHCP socket to the interface"))?;
    s.set_nonblocking(true)
        .map_err(io_err(iface, "making the DHCP socket non-blocking"))?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT).into())
        .map_err(io_err(iface, "binding 0.0.0.0:68"))?;
    tokio::net::UdpSocket::from_std(s.into()).map_err(io_err(iface, "registering the DHCP socket"))
}

enum Recv {
    Timeout,
    Skipped(String),
    Reply(dhcp::Reply),
}

async fn recv_reply(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
    until: Instant,
    xid: u32,
    mac: &[u8; 6],
) -> Recv {
    match tokio::time::timeout_at(until, sock.recv_from(buf)).await {
        Err(_) => Recv::Timeout,
        Ok(Err(e)) => {
            // Transient (ICMP errors and such): do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Recv::Skipped(format!("receive error: {e}"))
        }
        Ok(Ok((n, from))) => match dhcp::parse_reply(&buf[..n], xid, mac) {
            Ok(r) => Recv::Reply(r),
            Err(why) => Recv::Skipped(format!("from {from}: {why}")),
        },
    }
}

/// Configures `iface` over netlink: `lo` and the link up, the address (replacing an
/// identical one), the default route via the gateway and the extra routes (replacing
/// existing ones); then, when `resolv_conf` is given, writes it.
pub async fn configure(
    iface: &str,
    config: &IfaceConfig,
    resolv_conf: Option<&Path>,
) -> Result<(), NetError> {
    let mut nl = Nl::new(iface)?;
    if let Ok(lo) = nl.link("lo") {
        nl.up("lo", lo.index)?;
    }
    let link = nl.link(iface)?;
    nl.up(iface, link.index)?;
    nl.0.add_address(link.index, config.address, config.prefix_len)
        .map_err(nl_err(
            iface,
            format!("adding address {}/{}", config.address, config.prefix_len),
        ))?;
    let routes = config
        .gateway
        .map(|via| StaticRoute {
            destination: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            via,
        })
        .into_iter()
        .chain(config.routes.iter().cloned());
    for r in routes {
        nl.0.add_route(link.index, r.destination, r.prefix_len, r.via)
            .map_err(nl_err(
                iface,
                format!(
                    "adding route {}/{} via {}",
                    r.destination, r.prefix_len, r.via
                ),
            ))?;
    }
    if let Some(path) = resolv_conf {
        write_resolv_conf(path, &config.nameservers, config.search.as_deref())?;
    }
    Ok(())
}

/// Writes `resolv.conf` (its directory created when missing).
pub fn write_resolv_conf(
    path: &Path,
    nameservers: &[Ipv4Addr],
    search: Option<&str>,
) -> Result<(), NetError> {
    let mut text = String::from("# written by farm-agent\n");
    if let Some(s) = search {
        text += &format!("search {s}\n");
    }
    for n in nameservers {
        text += &format!("nameserver {n}\n");
    }
    let name = path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(&name, "creating its directory"))?;
    }
    std::fs::write(path, text).map_err(io_err(&name, "writing"))
}

/// How an interface got its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// From this DHCP lease.
    Dhcp(Lease),
    /// From `b2c.iface`.
    Static,
}

/// An interface [`bring_up`] configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// Interface name.
    pub iface: String,
    /// What was set.
    pub config: IfaceConfig,
    /// Where it came from.
    pub source: Source,
}

impl fmt::Display for Configured {
    /// `eth0 10.42.0.23/24 via 10.42.0.1 (DHCP server 10.42.0.1)`, or `(static)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        write!(f, "{} {}/{}", self.iface, c.address, c.prefix_len)?;
        if let Some(g) = c.gateway {
            write!(f, " via {g}")?;
        }
        match &self.source {
            Source::Dhcp(l) => write!(f, " (DHCP server {})", l.server),
            Source::Static => write!(f, " (static)"),
        }
    }
}

/// Where [`bring_up`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPaths {
    /// `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    /// `/proc/sys/net/ipv4/ip_forward` (`None`: `forward` is not applied).
    pub ip_forward: Option<PathBuf>,
}

impl Default for NetPaths {
    fn default() -> NetPaths {
        NetPaths {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            ip_forward: Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward")),
        }
    }
}

/// Without `b2c.iface`: how long the other wired interfaces may still take once one has
/// its lease.
const WIRED_GRACE: Duration = Duration::from_secs(2);

/// Sets up one `b2c.iface`.
async fn bring_up_iface(i: &Iface, timeout: Duration) -> Result<Configured, NetError> {
    let (config, source) = if i.dhcp || i.address.is_none() {
        let lease = dhcp(&i.name, timeout).await?;
        let mut config = IfaceConfig::from(&lease);
        let extras = static_extras(i)?;
        config.gateway = extras.gateway.or(config.gateway);
        config.nameservers.extend(extras.nameservers);
        config.routes = extras.routes;
        (config, Source::Dhcp(lease))
    } else {
        (static_config(i)?, Source::Static)
    };
    configure(&i.name, &config, None).await?;
    Ok(Configured {
        iface: i.name.clone(),
        config,
        source,
    })
}

/// Brings the network up with boot2container's semantics (see the module documentation):
/// `timeout` bounds the wait for interfaces and each DHCP exchange (interfaces are set up
/// concurrently). Named `b2c.iface`s must all succeed; by default one wired interface
/// with a lease is enough (the others get 2 s more once it has it; their failures are
/// logged). `resolv.conf` gets the
/// nameservers of all configured interfaces.
pub async fn bring_up(
    cfg: &B2cConfig,
    paths: &NetPaths,
    timeout: Duration,
) -> Result<Vec<Configured>, NetError> {
    if cfg.kernel_ip {
        let mut nl = Nl::new("lo")?;
        let lo = nl.link("lo")?;
        nl.up("lo", lo.index)?;
        return Ok(Vec::new());
    }
    let configured = if cfg.ifaces.is_empty() {
        let names = wait_for_interfaces(is_wired, timeout).await;
        if names.is_empty() {
            return Err(NetError::NoInterfaces { timeout });
        }
        let ifaces: Vec<Iface> = names
            .into_iter()
            .map(|name| Iface {
                name,
                dhcp: true,
                ..Iface::default()
            })
            .collect();
        let mut pending: FuturesUnordered<_> =
            ifaces.iter().map(|i| bring_up_iface(i, timeout)).collect();
        let mut ok = Vec::new();
        let mut first_err = None;
        // Once one interface has a lease, the others (unplugged ones never answer) get
        // WIRED_GRACE more, not the whole timeout.
        let mut grace: Option<Instant> = None;
        loop {
            let next = match grace {
                None => pending.next().await,
                Some(g) => match tokio::time::timeout_at(g, pending.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        tracing::warn!(
                            "farm-agent: network: {} other interface(s) without a lease yet, \
                             not waiting for them",
                            pending.len()
                        );
                        break;
                    }
                },
            };
            match next {
                None => break,
                Some(Ok(c)) => {
                    ok.push(c);
                    grace.get_or_insert(Instant::now() + WIRED_GRACE);
                }
                Some(Err(e)) => {
                    tracing::warn!("farm-agent: network: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        ok.sort_by(|a, b| a.iface.cmp(&b.iface));
        match (ok.is_empty(), first_err) {
            (true, Some(e)) => return Err(e),
            _ => ok,
        }
    } else {
        for i in &cfg.ifaces {
            let wanted = i.name.clone();
            if wait_for_interfaces(move |n| n == wanted, timeout)
                .await
                .is_empty()
            {
                return Err(NetError::NoSuchInterface {
                    iface: i.name.clone(),
                    detail: format!(" (waited {} s)", secs(timeout)),
                });
            }
        }
        futures_util::future::join_all(cfg.ifaces.iter().map(|i| bring_up_iface(i, timeout)))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
    };
    if let Some(path) = &paths.ip_forward
        && cfg.ifaces.iter().any(|i| i.forward)
    {
        let name = path.display().to_string();
        std::fs::write(path, "1\n").map_err(io_err(&name, "enabling IPv4 forwarding"))?;
    }
    let mut nameservers: Vec<Ipv4Addr> = Vec::new();
    for n in configured.iter().flat_map(|c| &c.config.nameservers) {
        if !nameservers.contains(n) {
            nameservers.push(*n);
        }
    }
    let search = configured.iter().find_map(|c| c.config.search.as_deref());
    write_resolv_conf(&paths.resolv_conf, &nameservers, search)?;
    Ok(configured)
}
