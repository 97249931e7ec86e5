//! A small DHCPv4 server for the private DUT network, built for netbooting.
//!
//! * DISCOVER → OFFER, REQUEST → ACK or NAK, RELEASE frees the lease, DECLINE keeps the
//!   address out of the pool for [`DECLINE_HOLD`], INFORM → ACK without an address.
//! * A MAC address keeps its address while its lease lives, and afterwards as long as no
//!   other client needed it (expired leases are reused only when the pool has no never-used
//!   address left). An offered address is held for [`OFFER_HOLD`] until the REQUEST.
//! * A REQUEST for an address that is not in the pool, that another client holds, or that
//!   differs from the live lease of that MAC is answered with a NAK. A REQUEST for a free
//!   pool address from a MAC without a live lease (INIT-REBOOT after a server restart
//!   without a leases file) is granted. A REQUEST naming another server identifier is not
//!   answered (the client chose another server; an offer we held for it is dropped).
//! * Boot file: iPXE clients (user class `iPXE` or option 175) get
//!   [`DhcpServerConfig::ipxe_script_url`] with `{mac}` replaced; other PXE clients (vendor
//!   class `PXEClient…`) get a TFTP file chosen by their architecture (option 93; missing
//!   means BIOS); plain OS clients get an address only. The file goes in the `file` header
//!   field and option 67, with `siaddr` and option 66 naming [`DhcpServerConfig::server_ip`].
//! * Replies go to `255.255.255.255:client_port` when the client has no address yet or sets
//!   the broadcast flag (and always for a NAK), else to `ciaddr:client_port`. Relayed
//!   requests (`giaddr` set) are ignored: the server serves its own link only.
//! * The lease table holds at most one entry per pool address (the pool is at most
//!   [`MAX_POOL_SIZE`] addresses). With a leases file, bound leases are written to it (JSON,
//!   written to a temporary file and renamed) whenever they change, and read back at
//!   [`DhcpServer::bind`].
//! * Malformed datagrams are logged at debug level and dropped.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::dhcp::{self, BOOTREQUEST, DhcpMessage, FLAG_BROADCAST, MessageType};

/// Largest pool [`DhcpServer::bind`] accepts.
pub const MAX_POOL_SIZE: u32 = 65536;
/// Most addresses [`DhcpServerConfig::from_interface`] puts in the pool.
pub const DEFAULT_POOL_CAP: u32 = 1000;
/// How long an offered address is held for the client's REQUEST.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long a declined address stays out of the pool.
pub const DECLINE_HOLD: Duration = Duration::from_secs(600);

/// Why the DHCP server could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum DhcpServerError {
    /// The network interface is missing or unusable.
    #[error("interface `{name}`: {reason}")]
    Interface {
        /// The interface name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("DHCP server configuration: {0}")]
    Config(String),
    /// The leases file cannot be read, parsed or written.
    #[error("leases file {}: {reason}", path.display())]
    LeasesFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Configuration of a [`DhcpServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpServerConfig {
    /// The interface the socket is bound to (`SO_BINDTODEVICE`), when `Some`.
    pub interface: Option<String>,
    /// The listening address, normally `0.0.0.0:67`.
    pub listen: SocketAddr,
    /// The port replies are sent to, normally 68.
    pub client_port: u16,
    /// Our address on the served network: server identifier, `siaddr` and option 66.
    pub server_ip: Ipv4Addr,
    /// Prefix length of the served subnet (that of `server_ip`).
    pub prefix_len: u8,
    /// Inclusive range of addresses handed out (`server_ip` and the subnet's network and
    /// broadcast addresses are skipped when inside it).
    pub pool: (Ipv4Addr, Ipv4Addr),
    /// Default router (option 3), if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6), none when empty.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time.
    pub lease_time: Duration,
    /// TFTP file for PXE BIOS firmware (architecture 0), e.g. `undionly.kpxe`.
    pub bios_boot_file: String,
    /// TFTP file for x86 EFI firmware (architectures 6, 7 and 9), e.g. `ipxe.efi`.
    pub efi_boot_file: String,
    /// TFTP file for 64-bit ARM EFI firmware (architecture 11), if any.
    pub arm64_efi_boot_file: Option<String>,
    /// Boot file for clients that are iPXE: a URL in which `{mac}` is replaced by the
    /// client MAC (lower-case, colon-separated).
    pub ipxe_script_url: String,
    /// JSON file the bound leases are kept in across restarts, if any.
    pub leases_file: Option<PathBuf>,
}

fn prefix_mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    }
}

impl DhcpServerConfig {
    /// A configuration for the network of interface `name`: its first IPv4 address and
    /// prefix (read with `getifaddrs`), a pool of the rest of the subnet (at most
    /// [`DEFAULT_POOL_CAP`] addresses), boot files `undionly.kpxe` and `ipxe.efi`, an iPXE
    /// script URL on `http://<address>:<http_port>/api/v1/dut/{mac}/boot.ipxe` (with iPXE's
    /// `${buildarch}` and `${platform}` as query), no router, no DNS, a 1 hour lease,
    /// listening on `0.0.0.0:67` bound to the interface, replying to port 68.
    pub fn from_interface(name: &str, http_port: u16) -> Result<Self, DhcpServerError> {
        let iface_err = |reason: String| DhcpServerError::Interface {
            name: name.to_string(),
            reason,
        };
        let addrs =
            nix::ifaddrs::getifaddrs().map_err(|e| iface_err(format!("getifaddrs: {e}")))?;
        let mut seen = false;
        let mut found = None;
        for a in addrs.filter(|a| a.interface_name == name) {
            seen = true;
            let ip = a
                .address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip());
            let mask = a
                .netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip());
            if let (Some(ip), Some(mask)) = (ip, mask) {
                found = Some((ip, u32::from(mask).count_ones() as u8));
                break;
            }
        }
        let Some((ip, prefix_len)) = found else {
            return Err(iface_err(if seen {
                "has no IPv4 address".into()
            } else {
                "no such interface".into()
            }));
        };
        if prefix_len > 30 {
            return Err(iface_err(format!(
                "{ip}/{prefix_len} leaves no room for a pool of client addresses"
            )));
        }
        let mask = prefix_mask(prefix_len);
        let network = u32::from(ip) & mask;
        let broadcast = network | !mask;
        let start = network + 1;
        let mut end = (broadcast - 1).min(start + DEFAULT_POOL_CAP - 1);
        if (start..=end).contains(&u32::from(ip)) && end < broadcast - 1 {
            end += 1;
        }
        Ok(DhcpServerConfig {
            interface: Some(name.to_string()),
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
            client_port: 68,
            server_ip: ip,
            prefix_len,
            pool: (Ipv4Addr::from(start), Ipv4Addr::from(end)),
            router: None,
            dns: Vec::new(),
            lease_time: Duration::from_secs(3600),
            bios_boot_file: "undionly.kpxe".into(),
            efi_boot_file: "ipxe.efi".into(),
            arm64_efi_boot_file: None,
            ipxe_script_url: format!(
                "http://{ip}:{http_port}/api/v1/dut/{{mac}}/boot.ipxe?arch=${{buildarch}}&platform=${{platform}}"
            ),
            leases_file: None,
        })
    }

    fn subnet_mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(prefix_mask(self.prefix_len))
    }

    /// The boot file for `msg` from client `mac`, if any.
    fn boot_file_for(&self, msg: &DhcpMessage, mac: &str) -> Option<String> {
        if msg.is_ipxe() {
            return Some(self.ipxe_script_url.replace("{mac}", mac));
        }
        if !msg.is_pxe_client() {
            return None;
        }
        match msg.client_arch().unwrap_or(dhcp::ARCH_X86_BIOS) {
            dhcp::ARCH_X86_BIOS => Some(self.bios_boot_file.clone()),
            dhcp::ARCH_X86_EFI | dhcp::ARCH_X86_64_EFI | dhcp::ARCH_X86_64_EFI_ALT => {
                Some(self.efi_boot_file.clone())
            }
            dhcp::ARCH_ARM64_EFI => self.arm64_efi_boot_file.clone(),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), DhcpServerError> {
        let bad = |s: String| Err(DhcpServerError::Config(s));
        if self.prefix_len > 32 {
            return bad(format!("prefix length {} is over 32", self.prefix_len));
        }
        let (start, end) = (u32::from(self.pool.0), u32::from(self.pool.1));
        if start > end {
            return bad(format!(
                "pool start {} is after its end {}",
                self.pool.0, self.pool.1
            ));
        }
        if end - start >= MAX_POOL_SIZE {
            return bad(format!(
                "pool {}-{} has more than {MAX_POOL_SIZE} addresses",
                self.pool.0, self.pool.1
            ));
        }
        let mask = prefix_mask(self.prefix_len);
        let net = u32::from(self.server_ip) & mask;
        if start & mask != net || end & mask != net {
            return bad(format!(
                "pool {}-{} is not inside {}/{}",
                self.pool.0, self.pool.1, self.server_ip, self.prefix_len
            ));
        }
        if self.lease_time.as_secs() == 0 || self.lease_time.as_secs() > u64::from(u32::MAX) {
            return bad(format!(
                "lease time {:?} is not between 1 s and 2^32-1 s",
                self.lease_time
            ));
        }
        Ok(())
    }
}

/// A valid request the server saw, given to the `on_seen` callback of [`DhcpServer::serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSeen {
    /// Client MAC, lower-case and colon-separated.
    pub mac: String,
    /// The message type of the request.
    pub message: MessageType,
    /// PXE client architecture (option 93), if sent.
    pub arch: Option<u16>,
    /// Whether the client is iPXE.
    pub is_ipxe: bool,
    /// The address offered or acknowledged, if any.
    pub address: Option<Ipv4Addr>,
    /// The boot file given, if any.
    pub boot_file: Option<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    Offered,
    Bound,
}

#[derive(Debug, Clone)]
struct Lease {
    addr: u32,
    /// Unix seconds.
    expires: u64,
    state: LeaseState,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseRecord {
    mac: String,
    address: Ipv4Addr,
    /// Unix seconds.
    expires: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseFile {
    leases: Vec<LeaseRecord>,
}

/// Why a REQUEST is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal(String);

/// The lease table: allocation logic only, no I/O. Times are Unix seconds.
#[derive(Debug)]
struct Leases {
    start: u32,
    end: u32,
    excluded: Vec<u32>,
    lease_secs: u64,
    by_mac: HashMap<String, Lease>,
    by_addr: HashMap<u32, String>,
    declined: HashMap<u32, u64>,
}

impl Leases {
    fn new(cfg: &DhcpServerConfig) -> Leases {
        let mask = prefix_mask(cfg.prefix_len);
        let net = u32::from(cfg.server_ip) & mask;
        let mut excluded = vec![u32::from(cfg.server_ip)];
        if cfg.prefix_len < 31 {
            excluded.push(net);
            excluded.push(net | !mask);
        }
        Leases {
            start: u32::from(cfg.pool.0),
            end: u32::from(cfg.pool.1),
            excluded,
            lease_secs: cfg.lease_time.as_secs(),
            by_mac: HashMap::new(),
            by_addr: HashMap::new(),
            declined: HashMap::new(),
        }
    }

    fn in_pool(&self, a: u32) -> bool {
        (self.start..=self.end).contains(&a) && !self.excluded.contains(&a)
    }

    /// Whether `a` may be given to `mac` (`None`: to a client holding nothing) at `now`.
    fn usable_by(&self, a: u32, mac: Option<&str>, now: u64) -> bool {
        if !self.in_pool(a) || self.declined.get(&a).is_some_and(|&until| until > now) {
            return false;
        }
        match self.by_addr.get(&a) {
            None => true,
            Some(holder) if Some(holder.as_str()) == mac => true,
            Some(holder) => self.by_mac.get(holder).is_none_or(|l| l.expires <= now),
        }
    }

    fn assign(&mut self, mac: &str, a: u32, expires: u64, state: LeaseState) {
        if let Some(old) = self.by_mac.remove(mac) {
            self.by_addr.remove(&old.addr);
        }
        if let Some(other) = self.by_addr.remove(&a) {
            self.by_mac.remove(&other);
        }
        self.declined.remove(&a);
        self.by_mac.insert(
            mac.to_string(),
            Lease {
                addr: a,
                expires,
                state,
            },
        );
        self.by_addr.insert(a, mac.to_string());
    }

    /// A free address: a never-used one first, else the one whose holder expired longest ago.
    fn free_address(&self, now: u64) -> Option<u32> {
        let mut best: Option<(u64, u32)> = None;
        for a in self.start..=self.end {
            if !self.usable_by(a, None, now) {
                continue;
            }
            let expired = match self.by_addr.get(&a) {
                Some(holder) => self.by_mac.get(holder).map_or(0, |l| l.expires),
                None => match self.declined.get(&a) {
                    // Declined once, but long enough ago.
                    Some(&until) => until,
                    None => return Some(a),
                },
            };
            if best.is_none_or(|(e, _)| expired < e) {
                best = Some((expired, a));
            }
        }
        best.map(|(_, a)| a)
    }

    /// The address to offer `mac`, held for [`OFFER_HOLD`]; `None` when the pool is full.
    fn offer(&mut self, mac: &str, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        let current = self.by_mac.get(mac).cloned();
        let addr = match (&current, requested.map(u32::from)) {
            (Some(l), _) if self.usable_by(l.addr, Some(mac), now) => l.addr,
            (_, Some(r)) if self.usable_by(r, Some(mac), now) => r,
            _ => self.free_address(now)?,
        };
        let (expires, state) = match current {
            Some(l) if l.addr == addr && l.state == LeaseState::Bound && l.expires > now => {
                (l.expires, LeaseState::Bound)
            }
            _ => (now + OFFER_HOLD.as_secs(), LeaseState::Offered),
        };
        self.assign(mac, addr, expires, state);
        Some(Ipv4Addr::from(addr))
    }

    /// Binds `addr` to `mac` for a lease time, or says why not.
    fn request(&mut self, mac: &str, addr: Ipv4Addr, now: u64) -> Result<Ipv4Addr, Refusal> {
        let a = u32::from(addr);
        if !self.in_pool(a) {
            return Err(Refusal(format!("{addr} is not in the pool")));
        }
        if let Some(l) = self.by_mac.get(mac)
            && l.addr != a
            && l.expires > now
        {
            return Err(Refusal(format!(
                "{mac} holds {}, not {addr}",
                Ipv4Addr::from(l.addr)
            )));
        }
        if !self.usable_by(a, Some(mac), now) {
            return Err(Refusal(format!(
                "{addr} is leased to another client or was declined"
            )));
        }
        self.assign(mac, a, now + self.lease_secs, LeaseState::Bound);
        Ok(addr)
    }

    /// Drops an offer held for `mac` (it chose another server).
    fn forget_offer(&mut self, mac: &str) {
        if let Some(l) = self.by_mac.get(mac)
            && l.state == LeaseState::Offered
        {
            let a = l.addr;
            self.by_mac.remove(mac);
            self.by_addr.remove(&a);
        }
    }

    /// Ends the lease of `mac` on `addr`; true when there was one.
    fn release(&mut self, mac: &str, addr: Ipv4Addr, now: u64) -> bool {
        match self.by_mac.get_mut(mac) {
            Some(l) if l.addr == u32::from(addr) && l.expires > now => {
                l.expires = now;
                true
            }
            _ => false,
        }
    }

    /// Marks `addr` unusable for [`DECLINE_HOLD`]; true when it is a pool address.
    fn decline(&mut self, mac: &str, addr: Ipv4Addr, now: u64) -> bool {
        let a = u32::from(addr);
        if !self.in_pool(a) {
            return false;
        }
        if self.by_addr.get(&a).is_some_and(|holder| holder == mac) {
            self.by_addr.remove(&a);
            self.by_mac.remove(mac);
        }
        self.declined.insert(a, now + DECLINE_HOLD.as_secs());
        true
    }

    /// Live bound leases, by address.
    fn active(&self, now: u64) -> Vec<(String, Ipv4Addr)> {
        let mut v: Vec<(String, Ipv4Addr)> = self
            .by_mac
            .iter()
            .filter(|(_, l)| l.state == LeaseState::Bound && l.expires > now)
            .map(|(m, l)| (m.clone(), Ipv4Addr::from(l.addr)))
            .collect();
        v.sort_by_key(|(_, a)| *a);
        v
    }

    fn to_file(&self) -> LeaseFile {
        let mut leases: Vec<LeaseRecord> = self
            .by_mac
            .iter()
            .filter(|(_, l)| l.state == LeaseState::Bound)
            .map(|(m, l)| LeaseRecord {
                mac: m.clone(),
                address: Ipv4Addr::from(l.addr),
                expires: l.expires,
            })
            .collect();
        leases.sort_by_key(|r| r.address);
        LeaseFile { leases }
    }

    /// Adds the records of a leases file; entries outside the pool or clashing with an
    /// earlier one are skipped with a warning.
    fn load(&mut self, file: LeaseFile, path: &Path) {
        for r in file.leases {
            let a = u32::from(r.address);
            if !self.in_pool(a) {
                tracing::warn!(
                    "dhcp: leases file {}: {} for {} is not in the pool; skipped",
                    path.display(),
                    r.address,
                    r.mac
                );
                continue;
            }
            if self.by_addr.contains_key(&a) || self.by_mac.contains_key(&r.mac) {
                tracing::warn!(
                    "dhcp: leases file {}: {} for {} clashes with an earlier entry; skipped",
                    path.display(),
                    r.address,
                    r.mac
                );
                continue;
            }
            self.assign(&r.mac, a, r.expires, LeaseState::Bound);
        }
    }
}

fn read_leases_file(path: &Path) -> Result<Option<LeaseFile>, DhcpServerError> {
    let err = |reason: String| DhcpServerError::LeasesFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(format!("not a leases file: {e}")))
}

fn write_leases_file(path: &Path, file: &LeaseFile) -> Result<(), DhcpServerError> {
    let err = |reason: String| DhcpServerError::LeasesFile {
        path: path.to_path_buf(),
        reason,
    };
    let json = serde_json::to_vec_pretty(file).map_err(|e| err(e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, json).map_err(|e| err(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| err(format!("renaming {}: {e}", tmp.display())))
}

/// What to do about one request.
struct Outcome {
    reply: Option<(DhcpMessage, Ipv4Addr)>,
    seen: DhcpSeen,
    leases_changed: bool,
}

/// A bound, not yet serving, DHCP server.
#[derive(Debug)]
pub struct DhcpServer {
    socket: std::net::UdpSocket,
    cfg: DhcpServerConfig,
    leases: Arc<Mutex<Leases>>,
}

fn lock(leases: &Mutex<Leases>) -> MutexGuard<'_, Leases> {
    leases.lock().unwrap_or_else(|e| e.into_inner())
}

impl DhcpServer {
    /// Checks the configuration, loads the leases file (if configured and present) and
    /// binds the socket (`SO_REUSEADDR`, `SO_BROADCAST`, and `SO_BINDTODEVICE` when an
    /// interface is given).
    pub async fn bind(cfg: DhcpServerConfig) -> Result<Self, DhcpServerError> {
        cfg.validate()?;
        let mut leases = Leases::new(&cfg);
        if let Some(path) = &cfg.leases_file
            && let Some(file) = read_leases_file(path)?
        {
            leases.load(file, path);
        }
        let io_err = |what: &str| {
            let what = format!("DHCP socket on {}: {what}", cfg.listen);
            move |source| DhcpServerError::Io { what, source }
        };
        let domain = socket2::Domain::for_address(cfg.listen);
        let socket =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
                .map_err(io_err("socket"))?;
        socket
            .set_reuse_address(true)
            .map_err(io_err("SO_REUSEADDR"))?;
        socket.set_broadcast(true).map_err(io_err("SO_BROADCAST"))?;
        if let Some(name) = &cfg.interface {
            socket
                .bind_device(Some(name.as_bytes()))
                .map_err(|e| DhcpServerError::Interface {
                    name: name.clone(),
                    reason: format!("SO_BINDTODEVICE: {e}"),
                })?;
        }
        socket.set_nonblocking(true).map_err(io_err("O_NONBLOCK"))?;
        socket.bind(&cfg.listen.into()).map_err(io_err("bind"))?;
        Ok(DhcpServer {
            socket: socket.into(),
            cfg,
            leases: Arc::new(Mutex::new(leases)),
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The live bound leases as (MAC, address), sorted by address.
    pub fn leases(&self) -> Vec<(String, Ipv4Addr)> {
        lock(&self.leases).active(unix_now())
    }

    /// Answers requests until `cancel` is cancelled, calling `on_seen` for every valid
    /// request (after its reply is sent).
    pub async fn serve(
        self,
        cancel: CancellationToken,
        on_seen: impl Fn(DhcpSeen) + Send + Sync + 'static,
    ) -> io::Result<()> {
        let socket = UdpSocket::from_std(self.socket)?;
        let mut buf = vec![0u8; 65536];
        loop {
            let Some((len, peer)) = crate::recv_or_cancel(&socket, &mut buf, &cancel, "dhcp").await
            else {
                return Ok(());
            };
            let datagram = buf.get(..len).unwrap_or(&[]);
            let msg = match dhcp::parse(datagram) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("dhcp: dropped a malformed datagram from {peer}: {e}");
                    continue;
                }
            };
            let outcome = {
                let mut leases = lock(&self.leases);
                handle(&self.cfg, &mut leases, &msg, unix_now())
            };
            let outcome = match outcome {
                Ok(o) => o,
                Err(why) => {
                    tracing::debug!("dhcp: dropped a message from {peer}: {why}");
                    continue;
                }
            };
            if outcome.leases_changed
                && let Some(path) = &self.cfg.leases_file
            {
                let file = lock(&self.leases).to_file();
                if let Err(e) = write_leases_file(path, &file) {
                    tracing::warn!("dhcp: {e}");
                }
            }
            if let Some((reply, dest)) = outcome.reply {
                let to = SocketAddr::new(IpAddr::V4(dest), self.cfg.client_port);
                if let Err(e) = socket.send_to(&reply.encode(), to).await {
                    tracing::warn!(
                        "dhcp: sending {} to {to} for {}: {e}",
                        reply
                            .message_type()
                            .map_or("reply".to_string(), |t| t.to_string()),
                        outcome.seen.mac
                    );
                }
            }
            on_seen(outcome.seen);
        }
    }
}

/// The server's decisions for a sequence of datagrams, without sockets: each datagram
/// is parsed and answered as [`DhcpServer::serve`] would, against one lease table
/// (fresh, no leases file; time advances one second per datagram). Returns, per
/// datagram, the encoded reply and its destination, or `None` when it is dropped.
/// For the fuzz target of the request handling and for tests.
pub fn answer_sequence(
    cfg: &DhcpServerConfig,
    datagrams: &[&[u8]],
) -> Vec<Option<(Vec<u8>, Ipv4Addr)>> {
    let mut cfg = cfg.clone();
    cfg.leases_file = None;
    let mut leases = Leases::new(&cfg);
    let start = unix_now();
    datagrams
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let msg = dhcp::parse(d).ok()?;
            let outcome = handle(&cfg, &mut leases, &msg, start + i as u64).ok()?;
            outcome.reply.map(|(m, dest)| (m.encode(), dest))
        })
        .collect()
}

/// Decides the answer to `msg`. `Err` says why the message is dropped as invalid.
fn handle(
    cfg: &DhcpServerConfig,
    leases: &mut Leases,
    msg: &DhcpMessage,
    now: u64,
) -> Result<Outcome, String> {
    if msg.op != BOOTREQUEST {
        return Err(format!("op {} is not BOOTREQUEST", msg.op));
    }
    if msg.giaddr != Ipv4Addr::UNSPECIFIED {
        return Err(format!(
            "relayed through {} (relays are not served)",
            msg.giaddr
        ));
    }
    let mac = msg
        .client_mac()
        .ok_or_else(|| format!("htype {} hlen {} is not Ethernet", msg.htype, msg.hlen))?;
    let kind = msg
        .message_type()
        .ok_or_else(|| "no valid message type (option 53)".to_string())?;
    let mut seen = DhcpSeen {
        mac: mac.clone(),
        message: kind,
        arch: msg.client_arch(),
        is_ipxe: msg.is_ipxe(),
        address: None,
        boot_file: None,
    };
    let mut leases_changed = false;
    let ours = msg.server_id().is_none_or(|s| s == cfg.server_ip);
    let reply_kind = match kind {
        MessageType::Discover => match leases.offer(&mac, msg.requested_ip(), now) {
            Some(a) => Some((MessageType::Offer, a)),
            None => {
                tracing::warn!("dhcp: pool exhausted: no address to offer {mac}");
                None
            }
        },
        MessageType::Request if !ours => {
            leases.forget_offer(&mac);
            None
        }
        MessageType::Request => {
            let wanted = msg
                .requested_ip()
                .or_else(|| (msg.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(msg.ciaddr));
            match wanted {
                None => Some((MessageType::Nak, Ipv4Addr::UNSPECIFIED)),
                Some(w) => match leases.request(&mac, w, now) {
                    Ok(a) => {
                        leases_changed = true;
                        Some((MessageType::Ack, a))
                    }
                    Err(Refusal(why)) => {
                        tracing::info!("dhcp: NAK to {mac}: {why}");
                        Some((MessageType::Nak, Ipv4Addr::UNSPECIFIED))
                    }
                },
            }
        }
        MessageType::Release => {
            leases_changed = leases.release(&mac, msg.ciaddr, now);
            None
        }
        MessageType::Decline => {
            if let Some(a) = msg.requested_ip() {
                tracing::warn!("dhcp: {mac} declined {a}: it is in use on the network");
                leases_changed = leases.decline(&mac, a, now);
            }
            None
        }
        MessageType::Inform => Some((MessageType::Ack, Ipv4Addr::UNSPECIFIED)),
        MessageType::Offer | MessageType::Ack | MessageType::Nak => {
            return Err(format!("{kind} is a server message"));
        }
    };
    let reply = reply_kind.map(|(rk, addr)| {
        let mut r = DhcpMessage::reply(msg, rk, addr, cfg.server_ip);
        if rk == MessageType::Nak {
            return (r, Ipv4Addr::BROADCAST);
        }
        r.set_subnet_mask(cfg.subnet_mask());
        if let Some(router) = cfg.router {
            r.set_routers(&[router]);
        }
        if !cfg.dns.is_empty() {
            r.set_dns_servers(&cfg.dns);
        }
        if kind != MessageType::Inform {
            let secs = leases
                .by_mac
                .get(&mac)
                .filter(|l| l.state == LeaseState::Bound && l.expires > now)
                .map_or(leases.lease_secs, |l| l.expires - now);
            r.set_lease_time(u32::try_from(secs).unwrap_or(u32::MAX));
            seen.address = Some(addr);
        }
        if let Some(file) = cfg.boot_file_for(msg, &mac) {
            r.set_boot_file(&file);
            r.set_next_server(cfg.server_ip);
            r.set_tftp_server_name(&cfg.server_ip.to_string());
            seen.boot_file = Some(file);
        }
        let dest = if msg.ciaddr == Ipv4Addr::UNSPECIFIED || msg.flags & FLAG_BROADCAST != 0 {
            Ipv4Addr::BROADCAST
        } else {
            msg.ciaddr
        };
        (r, dest)
    });
    if let Some((r, _)) = &reply {
        tracing::info!(
            "dhcp: {} to {mac}: address {} boot file {:?}",
            r.message_type().map_or("reply".into(), |t| t.to_string()),
            r.yiaddr,
            seen.boot_file
        );
    }
    Ok(Outcome {
        reply,
        seen,
        leases_changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DhcpServerConfig {
        DhcpServerConfig {
            interface: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            client_port: 68,
            server_ip: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
            pool: (Ipv4Addr::new(10, 0, 0, 0), Ipv4Addr::new(10, 0, 0, 3)),
            router: None,
            dns: vec![],
            lease_time: Duration::from_secs(3600),
            bios_boot_file: "undionly.kpxe".into(),
            efi_boot_file: "ipxe.efi".into(),
            arm64_efi_boot_file: None,
            ipxe_script_url: "http://10.0.0.1:80/{mac}/boot.ipxe".into(),
            leases_file: None,
        }
    }

    const A2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const A3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    #[test]
    fn pool_skips_network_and_server_and_fills_up() {
        // Pool .0-.3: .0 is the network address, .1 ours: only .2 and .3 are given.
        let mut l = Leases::new(&cfg());
        assert_eq!(l.offer("m1", None, 100), Some(A2));
        assert_eq!(l.offer("m2", None, 100), Some(A3));
        assert_eq!(l.offer("m3", None, 100), None);
        // The same MAC gets the same address again.
        assert_eq!(l.offer("m1", None, 120), Some(A2));
        // Offers not followed by a REQUEST lapse after OFFER_HOLD (m2's first: m1's was
        // renewed at 120).
        assert_eq!(l.offer("m3", None, 100 + 61), Some(A3));
        assert_eq!(l.offer("m4", None, 100 + 61), None);
    }

    #[test]
    fn request_binds_and_naks() {
        let mut l = Leases::new(&cfg());
        assert_eq!(l.offer("m1", None, 0), Some(A2));
        assert_eq!(l.request("m1", A2, 1), Ok(A2));
        assert_eq!(l.active(2), vec![("m1".to_string(), A2)]);
        // Another client cannot take it.
        assert_eq!(
            l.request("m2", A2, 2),
            Err(Refusal(
                "10.0.0.2 is leased to another client or was declined".into()
            ))
        );
        // m1 cannot switch while its lease lives; out-of-pool is refused.
        assert_eq!(
            l.request("m1", A3, 2),
            Err(Refusal("m1 holds 10.0.0.2, not 10.0.0.3".into()))
        );
        assert_eq!(
            l.request("m2", Ipv4Addr::new(10, 0, 0, 1), 2),
            Err(Refusal("10.0.0.1 is not in the pool".into()))
        );
        // INIT-REBOOT of an unknown MAC for a free address is granted.
        assert_eq!(l.request("m2", A3, 2), Ok(A3));
        // The bound lease outlives the offer hold, and is offered again to its MAC.
        assert_eq!(l.offer("m3", None, 1000), None);
        assert_eq!(l.offer("m1", None, 1000), Some(A2));
        // After it expires the address can go to someone else.
        assert_eq!(l.offer("m3", None, 1 + 3600), Some(A2));
    }

    #[test]
    fn requested_address_is_honoured_when_free() {
        let mut l = Leases::new(&cfg());
        assert_eq!(l.offer("m1", Some(A3), 0), Some(A3));
        assert_eq!(l.offer("m2", Some(A3), 0), Some(A2));
    }

    #[test]
    fn release_and_decline() {
        let mut l = Leases::new(&cfg());
        l.offer("m1", None, 0);
        l.request("m1", A2, 0).unwrap();
        assert!(!l.release("m1", A3, 1));
        assert!(l.release("m1", A2, 1));
        assert!(l.active(2).is_empty());
        // Released but unused: the same MAC gets it back; never-used addresses go first
        // to others.
        assert_eq!(l.offer("m2", None, 2), Some(A3));
        assert_eq!(l.offer("m1", None, 2), Some(A2));
        assert!(l.decline("m1", A2, 3));
        assert_eq!(l.offer("m1", None, 3), None);
        // Once the decline hold is over, the address is given again.
        assert_eq!(l.offer("m3", Some(A2), 3 + 601), Some(A2));
        assert!(!l.decline("m1", Ipv4Addr::new(192, 168, 0, 1), 3));
    }

    #[test]
    fn leases_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut l = Leases::new(&cfg());
        l.offer("m1", None, 0);
        l.request("m1", A2, 0).unwrap();
        l.offer("m2", None, 0); // only offered: not saved
        write_leases_file(&path, &l.to_file()).unwrap();
        let mut again = Leases::new(&cfg());
        again.load(read_leases_file(&path).unwrap().unwrap(), &path);
        assert_eq!(again.active(1), vec![("m1".to_string(), A2)]);
        assert_eq!(again.offer("m2", None, 1), Some(A3));

        std::fs::write(&path, "{").unwrap();
        let e = read_leases_file(&path).err().unwrap().to_string();
        assert!(e.starts_with(&format!(
            "leases file {}: not a leases file",
            path.display()
        )));
        assert!(
            read_leases_file(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
    }

    fn request(kind: MessageType, mac: [u8; 6]) -> DhcpMessage {
        let mut m = DhcpMessage::new(BOOTREQUEST);
        m.htype = dhcp::HTYPE_ETHERNET;
        m.hlen = 6;
        m.xid = 7;
        m.chaddr[..6].copy_from_slice(&mac);
        m.set_message_type(kind);
        m
    }

    #[test]
    fn boot_file_by_client_kind() {
        let c = cfg();
        let mut l = Leases::new(&c);
        let mac = [2, 0, 0, 0, 0, 0xab];
        let file = |m: &DhcpMessage, l: &mut Leases| {
            let o = handle(&c, l, m, 0).unwrap();
            let (r, dest) = o.reply.unwrap();
            assert_eq!(dest, Ipv4Addr::BROADCAST);
            assert_eq!(r.boot_file(), o.seen.boot_file);
            r.boot_file()
        };
        let mut m = request(MessageType::Discover, mac);
        assert_eq!(file(&m, &mut l), None);
        m.set_vendor_class("PXEClient:Arch:00000:UNDI:002001");
        m.set_option(dhcp::OPT_CLIENT_ARCH, &[0, 0]).unwrap();
        assert_eq!(file(&m, &mut l).as_deref(), Some("undionly.kpxe"));
        m.set_option(dhcp::OPT_CLIENT_ARCH, &[0, 7]).unwrap();
        assert_eq!(file(&m, &mut l).as_deref(), Some("ipxe.efi"));
        m.set_option(dhcp::OPT_CLIENT_ARCH, &[0, 11]).unwrap();
        assert_eq!(file(&m, &mut l), None);
        m.set_option(dhcp::OPT_USER_CLASS, b"iPXE").unwrap();
        assert_eq!(
            file(&m, &mut l).as_deref(),
            Some("http://10.0.0.1:80/02:00:00:00:00:ab/boot.ipxe")
        );
    }

    #[test]
    fn invalid_and_foreign_messages() {
        let c = cfg();
        let mut l = Leases::new(&c);
        let mut m = request(MessageType::Discover, [2, 0, 0, 0, 0, 1]);
        m.op = dhcp::BOOTREPLY;
        assert_eq!(
            handle(&c, &mut l, &m, 0).err().unwrap(),
            "op 2 is not BOOTREQUEST"
        );
        let m = request(MessageType::Offer, [2, 0, 0, 0, 0, 1]);
        assert_eq!(
            handle(&c, &mut l, &m, 0).err().unwrap(),
            "DHCPOFFER is a server message"
        );
        // A REQUEST for another server: silent, and our offer is dropped.
        let d = request(MessageType::Discover, [2, 0, 0, 0, 0, 1]);
        assert_eq!(handle(&c, &mut l, &d, 0).unwrap().seen.address, Some(A2));
        let mut r = request(MessageType::Request, [2, 0, 0, 0, 0, 1]);
        r.set_server_id(Ipv4Addr::new(10, 0, 0, 9));
        r.set_option(dhcp::OPT_REQUESTED_IP, &A2.octets()).unwrap();
        assert!(handle(&c, &mut l, &r, 0).unwrap().reply.is_none());
        assert!(l.by_mac.is_empty());
        // INFORM from a configured client: ACK without yiaddr, unicast.
        let mut i = request(MessageType::Inform, [2, 0, 0, 0, 0, 1]);
        i.ciaddr = Ipv4Addr::new(10, 0, 0, 50);
        let (ack, dest) = handle(&c, &mut l, &i, 0).unwrap().reply.unwrap();
        assert_eq!(ack.message_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(dest, Ipv4Addr::new(10, 0, 0, 50));
    }
}
