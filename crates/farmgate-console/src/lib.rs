//! SALAD: the serial console multiplexer.
//!
//! Consoles reach SALAD in two ways:
//!
//! * **serial devices**: every `rescan_interval`, SALAD globs for serial devices (USB serial
//!   adapters, ptys, or symlinks to them), opens the new ones in raw mode and reads them;
//! * **network consoles**: when [`SaladConfig::tcpconsole_bind`] is set, SALAD listens there
//!   and every accepted TCP connection is a console stream (e.g. a QEMU serial port given as
//!   `-chardev socket,host=..,port=8100,server=off`). Output a network console prints before
//!   it is bound is kept (at most [`MAX_UNBOUND_BACKLOG`] bytes, oldest dropped) and handed
//!   to the machine right after the binding, so its clients see the boot from the first
//!   byte. At most [`MAX_UNBOUND_NET_CONSOLES`] unbound network consoles are accepted at a
//!   time. When the connection closes, the machine keeps its ports and clients with no
//!   console attached, until a console binds it again.
//!
//! Two console lines matter to SALAD itself, on both kinds of console:
//!
//! * a line containing `SALAD.ping` is answered by writing `SALAD.pong\n` to that console,
//!   so a DUT can find which of its serial ports reaches SALAD;
//! * a line containing `SALAD.machine_id=<id>` anywhere in it (the id ends at white space,
//!   and is lower-cased) binds the console to machine `<id>`. A machine bound again from
//!   another console moves to that console.
//!
//! Each machine gets two TCP listeners (OS-assigned ports, stable for the life of the
//! process), created when a console binds it or when asked with [`Salad::ensure_machine`]:
//!
//! * the **relay port** ([`MachineInfo::tcp_port`]): one client at a time receives the
//!   console's output from the moment SALAD has registered it (shown by
//!   [`MachineInfo::client`]; the kernel completes a TCP connection before SALAD accepts it,
//!   so output read in between goes to nobody), and what it sends is written to the console;
//!   a second client is told so and closed;
//! * the **log port** ([`MachineInfo::log_port`]): any number of read-only clients receive
//!   the console's output from the moment they are registered; what they send is discarded.
//!   A log client that does not keep up loses output; it never slows the console or the
//!   relay client.
//!
//! Bytes are relayed as they come; lines are only cut for the association protocol.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::termios::{self, BaudRate, ControlFlags, SetArg};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Longest line (in bytes) examined for the association protocol; longer lines are still
/// relayed, but not parsed.
pub const MAX_ASSOC_LINE: usize = 4096;

/// Longest accepted machine id.
pub const MAX_MACHINE_ID: usize = 64;

/// What SALAD writes to a console that sent `SALAD.ping`.
pub const PONG: &[u8] = b"SALAD.pong\n";

/// Most network consoles SALAD keeps open while they are not bound to a machine; further
/// connections are closed at once.
pub const MAX_UNBOUND_NET_CONSOLES: usize = 256;

/// Output (in bytes) kept from a network console before it is bound; older bytes are dropped.
pub const MAX_UNBOUND_BACKLOG: usize = 64 * 1024;

/// Most read-only clients connected to one machine's log port at a time.
pub const MAX_LOG_CLIENTS: usize = 64;
/// Log slots a dashboard viewer (`Salad::watch_console`) cannot take: kept for the
/// log port.
pub const RESERVED_LOG_SLOTS: usize = 16;

/// Chunks of console output queued for a slow relay client before the console reader waits.
const CLIENT_QUEUE: usize = 1024;
/// Chunks of console output a log client may fall behind before it loses output.
const LOG_QUEUE: usize = 256;
/// How long console output waits for a stalled relay client before that chunk is dropped.
const CLIENT_STALL: Duration = Duration::from_secs(10);
/// Read buffer of serial devices and sockets.
const READ_BUF: usize = 16 * 1024;

/// SALAD's settings.
#[derive(Debug, Clone)]
pub struct SaladConfig {
    /// Globs of serial devices to watch, e.g. `/dev/ttyUSB*`.
    pub serial_globs: Vec<String>,
    /// How often the globs are scanned for new or vanished devices.
    pub rescan_interval: Duration,
    /// Address the per-machine TCP listeners bind to.
    pub bind_host: IpAddr,
    /// Baud rate set on every serial device (e.g. 115200).
    pub baud: u32,
    /// Where to accept network consoles (CI-tron: `0.0.0.0:8100`, `SALAD_TCPCONSOLE_PORT`);
    /// `None` accepts none. Port 0 picks a free port (see [`Salad::tcpconsole_addr`]).
    pub tcpconsole_bind: Option<SocketAddr>,
}

/// What can go wrong in SALAD.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A serial glob in the configuration does not parse.
    #[error("serial port glob {glob:?} is invalid: {reason}")]
    BadGlob {
        /// The glob as configured.
        glob: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The configured baud rate is not one termios knows.
    #[error("baud rate {0} is not supported (use a standard rate such as 115200)")]
    BadBaud(u32),
    /// The rescan interval is zero.
    #[error("SALAD's rescan interval must be more than zero")]
    BadInterval,
    /// A machine id is empty, too long, or has characters outside `[A-Za-z0-9:._-]`.
    #[error("machine id {0:?} is invalid: use 1 to 64 letters, digits, ':', '.', '_' or '-'")]
    BadMachineId(String),
    /// A TCP listener of a machine cannot be created.
    #[error("cannot listen on {addr} for the console of machine {id}: {source}")]
    Listen {
        /// The machine.
        id: String,
        /// The address tried.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The network console listener cannot be created.
    #[error("cannot listen for network consoles on {addr} (SALAD_TCPCONSOLE_PORT): {source}")]
    TcpConsoleListen {
        /// The address tried.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// A serial device cannot be opened or configured.
    #[error("cannot open serial device {path}: {reason}")]
    Device {
        /// The device path as matched by the glob.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// SALAD was shut down (its cancellation token fired).
    #[error("SALAD is shutting down")]
    ShutDown,
}

/// A machine as SALAD's REST API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MachineInfo {
    /// TCP port relaying the machine's console (read-write, one client at a time).
    pub tcp_port: u16,
    /// TCP port streaming the machine's console output to any number of read-only clients.
    pub log_port: u16,
    /// Whether a client is connected to the relay port.
    pub has_client: bool,
    /// The address of the connected relay client, once SALAD has registered it (omitted
    /// when there is none). Console output is relayed to a client from this point on, never
    /// before: a client that must not miss the first bytes of a boot (a job runner) waits
    /// until this shows its own local address before powering the machine on. The TCP
    /// connection itself carries only console bytes, so `nc` users see no protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<SocketAddr>,
}

/// A network console as SALAD sees it (see [`Salad::network_consoles`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConsole {
    /// The remote end of the connection.
    pub peer: SocketAddr,
    /// The machine it is bound to, if any.
    pub machine_id: Option<String>,
}

/// A console line that means something to SALAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaladLine {
    /// The line contains `SALAD.ping`.
    Ping,
    /// The line announces `SALAD.machine_id=<id>` (id lower-cased and validated).
    MachineId(String),
}

/// Something that happened in SALAD, for observers (see [`Salad::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaladEvent {
    /// A serial device was opened.
    DeviceOpened(PathBuf),
    /// A serial device was closed; it is retried on the next scan.
    DeviceClosed {
        /// The device path.
        path: PathBuf,
        /// Why it was closed.
        reason: String,
    },
    /// A device was bound to a machine.
    Bound {
        /// The machine id.
        machine_id: String,
        /// The device path.
        device: PathBuf,
    },
    /// A network console connected.
    NetworkConsoleOpened {
        /// The remote end of the connection.
        peer: SocketAddr,
    },
    /// A network console was bound to a machine.
    NetworkConsoleBound {
        /// The machine id.
        machine_id: String,
        /// The remote end of the connection.
        peer: SocketAddr,
    },
    /// A network console disconnected (or was closed by SALAD).
    NetworkConsoleClosed {
        /// The remote end of the connection.
        peer: SocketAddr,
        /// The machine it was bound to, if any; that machine keeps its ports and clients.
        machine_id: Option<String>,
        /// Why it was closed.
        reason: String,
    },
}

const MACHINE_ID_TAG: &[u8] = b"SALAD.machine_id=";
const PING_TAG: &[u8] = b"SALAD.ping";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether `id` is an acceptable machine id: 1 to 64 characters of `[A-Za-z0-9:._-]`.
pub fn valid_machine_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MACHINE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
}

/// Parse one console line (with or without its line ending) for the association protocol.
///
/// `SALAD.machine_id=<id>` may appear anywhere on the line (e.g. in the kernel's
/// `Command line: console=ttyS0 SALAD.machine_id=52:54:00:11:22:01 quiet`); the id starts
/// after the `=` (leading white space skipped), ends at the next white space, and must be valid
/// ([`valid_machine_id`]); it is returned lower-cased. A line containing `SALAD.ping` is a
/// ping. Anything else, including invalid UTF-8, is `None`.
pub fn parse_line(line: &[u8]) -> Option<SaladLine> {
    if let Some(pos) = find(line, MACHINE_ID_TAG) {
        let rest = line[pos + MACHINE_ID_TAG.len()..].trim_ascii_start();
        let end = rest
            .iter()
            .position(u8::is_ascii_whitespace)
            .unwrap_or(rest.len());
        let rest = &rest[..end];
        if let Ok(id) = std::str::from_utf8(rest)
            && valid_machine_id(id)
        {
            return Some(SaladLine::MachineId(id.to_ascii_lowercase()));
        }
    }
    find(line, PING_TAG).map(|_| SaladLine::Ping)
}

/// Cuts device output into lines for [`parse_line`], holding at most [`MAX_ASSOC_LINE`]
/// bytes: a longer line is dropped (not parsed) up to its end.
#[derive(Debug, Default)]
struct LineBuf {
    buf: Vec<u8>,
    overflow: bool,
}

impl LineBuf {
    /// Add a segment that holds no newline, or ends with the only one.
    fn push(&mut self, segment: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + segment.len() > MAX_ASSOC_LINE {
            self.overflow = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(segment);
        }
    }

    /// End the current line; returns it unless it was too long.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let overflow = std::mem::replace(&mut self.overflow, false);
        let line = std::mem::take(&mut self.buf);
        (!overflow).then_some(line)
    }
}

fn baud_rate(baud: u32) -> Option<BaudRate> {
    Some(match baud {
        1200 => BaudRate::B1200,
        2400 => BaudRate::B2400,
        4800 => BaudRate::B4800,
        9600 => BaudRate::B9600,
        19200 => BaudRate::B19200,
        38400 => BaudRate::B38400,
        57600 => BaudRate::B57600,
        115_200 => BaudRate::B115200,
        230_400 => BaudRate::B230400,
        460_800 => BaudRate::B460800,
        500_000 => BaudRate::B500000,
        576_000 => BaudRate::B576000,
        921_600 => BaudRate::B921600,
        1_000_000 => BaudRate::B1000000,
        1_500_000 => BaudRate::B1500000,
        2_000_000 => BaudRate::B2000000,
        3_000_000 => BaudRate::B3000000,
        4_000_000 => BaudRate::B4000000,
        _ => return None,
    })
}

/// Open a serial device non-blocking, without making it our controlling terminal, in raw
/// mode at `baud`, ignoring modem control lines.
fn open_serial(path: &Path, baud: BaudRate) -> Result<AsyncFd<OwnedFd>, ConsoleError> {
    let err = |what: &str, e: &dyn std::fmt::Display| ConsoleError::Device {
        path: path.to_path_buf(),
        reason: format!("{what}: {e}"),
    };
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("open", &e))?;
    let mut t = termios::tcgetattr(&fd).map_err(|e| err("not a terminal (tcgetattr)", &e))?;
    termios::cfmakeraw(&mut t);
    termios::cfsetspeed(&mut t, baud).map_err(|e| err("cfsetspeed", &e))?;
    t.control_flags |= ControlFlags::CLOCAL | ControlFlags::CREAD;
    termios::tcsetattr(&fd, SetArg::TCSANOW, &t).map_err(|e| err("tcsetattr", &e))?;
    poll_owned_fd(fd).map_err(|e| err("cannot poll it", &e))
}

/// Register an owned descriptor with tokio's reactor.
///
/// `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` may close its descriptor
/// while registered. An `OwnedFd` moved into the `AsyncFd` cannot: it is closed only when
/// the `AsyncFd` is dropped, which is the condition `AsyncFd::register` asks for.
#[allow(deprecated)]
pub fn poll_owned_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

/// Read from a non-blocking device. A short read means the device is drained, so its
/// readiness is cleared without another `read` that would only return `EAGAIN`.
async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|f| nix::unistd::read(f.get_ref(), buf).map_err(io::Error::from)) {
            Ok(Ok(n)) => {
                if n > 0 && n < buf.len() {
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Write all of `data` to a non-blocking device.
async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = fd
            .async_io(Interest::WRITABLE, |f| {
                nix::unistd::write(f, data).map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "device accepted no bytes",
            ));
        }
        data = &data[n..];
    }
    Ok(())
}

/// Output of an unbound network console, kept for the machine it will be bound to.
#[derive(Debug, Default)]
struct Backlog {
    buf: VecDeque<u8>,
}

impl Backlog {
    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(MAX_UNBOUND_BACKLOG)..];
        let excess = (self.buf.len() + data.len()).saturating_sub(MAX_UNBOUND_BACKLOG);
        self.buf.drain(..excess);
        self.buf.extend(data);
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).into()
    }
}

/// A console SALAD reads: a serial device (by path as matched by the glob) or a network
/// console (by connection number).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ConsoleKey {
    Serial(PathBuf),
    Net(u64),
}

struct Client {
    generation: u64,
    peer: SocketAddr,
    tx: mpsc::Sender<Bytes>,
}

struct Machine {
    port: u16,
    log_port: u16,
    client: Option<Client>,
    log: broadcast::Sender<Bytes>,
    bytes: Arc<ByteCounters>,
}

/// Console bytes of one machine since SALAD started.
#[derive(Debug, Default)]
struct ByteCounters {
    /// Output of the machine (what its console printed).
    from_machine: std::sync::atomic::AtomicU64,
    /// Input written to the machine's console by clients.
    to_machine: std::sync::atomic::AtomicU64,
}

/// Console bytes of one machine since SALAD started (see [`Salad::console_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConsoleBytes {
    /// Output of the machine's console.
    pub from_machine: u64,
    /// Input written to it by clients.
    pub to_machine: u64,
}

impl Machine {
    fn info(&self) -> MachineInfo {
        MachineInfo {
            tcp_port: self.port,
            log_port: self.log_port,
            has_client: self.client.is_some(),
            client: self.client.as_ref().map(|c| c.peer),
        }
    }
}

struct Device {
    generation: u64,
    /// Canonical path the glob match pointed to when opened.
    target: PathBuf,
    writer: Arc<ConsoleWriter>,
    cancel: CancellationToken,
}

struct NetConsole {
    peer: SocketAddr,
    writer: Arc<ConsoleWriter>,
}

/// The write side of a console, shared by its reader (for pongs) and the relay client, who
/// write to it directly; the lock keeps their writes whole and in order.
struct ConsoleWriter {
    kind: WriterKind,
    /// Fires when the console is closed, so no writer waits on it forever.
    cancel: CancellationToken,
}

enum WriterKind {
    Serial {
        fd: Arc<AsyncFd<OwnedFd>>,
        lock: tokio::sync::Mutex<()>,
    },
    Net(tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>),
}

impl ConsoleWriter {
    /// Write all of `data`; returns early (with success) if the console is closed meanwhile.
    async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        let write = async {
            match &self.kind {
                WriterKind::Serial { fd, lock } => {
                    let _guard = lock.lock().await;
                    write_all_fd(fd, data).await
                }
                WriterKind::Net(wr) => wr.lock().await.write_all(data).await,
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => Ok(()),
            r = write => r,
        }
    }
}

#[derive(Default)]
struct State {
    machines: BTreeMap<String, Machine>,
    /// Open serial devices, by path as matched by the glob.
    devices: HashMap<PathBuf, Device>,
    /// Open network consoles, by connection number.
    net: HashMap<u64, NetConsole>,
    /// Console -> machine id. A serial binding is kept while the device is closed, so a
    /// device that comes back keeps its machine; a network binding ends with its connection.
    bindings: HashMap<ConsoleKey, String>,
    next_generation: u64,
}

impl State {
    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn console_of(&self, id: &str) -> Option<&ConsoleKey> {
        self.bindings
            .iter()
            .find_map(|(key, m)| (m == id).then_some(key))
    }

    fn device_of(&self, id: &str) -> Option<&PathBuf> {
        match self.console_of(id)? {
            ConsoleKey::Serial(path) => Some(path),
            ConsoleKey::Net(_) => None,
        }
    }

    fn unbound_net_consoles(&self) -> usize {
        self.net
            .keys()
            .filter(|c| !self.bindings.contains_key(&ConsoleKey::Net(**c)))
            .count()
    }
}

/// Where a console's output goes at one moment.
#[derive(Clone, Default)]
struct Sinks {
    /// Whether the console is bound to a machine.
    bound: bool,
    client: Option<mpsc::Sender<Bytes>>,
    log: Option<broadcast::Sender<Bytes>>,
    bytes: Option<Arc<ByteCounters>>,
}

/// What to do with one read of console output.
#[derive(Default)]
struct Routed {
    pongs: usize,
    sends: Vec<(Sinks, Bytes)>,
}

struct Inner {
    config: SaladConfig,
    baud: BaudRate,
    state: Mutex<State>,
    cancel: CancellationToken,
    events: broadcast::Sender<SaladEvent>,
    tcpconsole_addr: Option<SocketAddr>,
}

/// A running SALAD. Cheap to clone; all clones share the same state.
#[derive(Clone)]
pub struct Salad {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Salad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Salad")
            .field("config", &self.inner.config)
            .field("machines", &self.machines())
            .finish()
    }
}

impl Salad {
    /// Check the configuration, start scanning for serial devices and, when configured,
    /// accepting network consoles. Everything stops when `cancel` fires.
    pub async fn start(
        config: SaladConfig,
        cancel: CancellationToken,
    ) -> Result<Salad, ConsoleError> {
        for g in &config.serial_globs {
            glob::Pattern::new(g).map_err(|e| ConsoleError::BadGlob {
                glob: g.clone(),
                reason: e.to_string(),
            })?;
        }
        let baud = baud_rate(config.baud).ok_or(ConsoleError::BadBaud(config.baud))?;
        if config.rescan_interval.is_zero() {
            return Err(ConsoleError::BadInterval);
        }
        let tcpconsole = match config.tcpconsole_bind {
            Some(addr) => {
                let err = |source| ConsoleError::TcpConsoleListen { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(err)?;
                let local = listener.local_addr().map_err(err)?;
                Some((listener, local))
            }
            None => None,
        };
        let (events, _) = broadcast::channel(256);
        let salad = Salad {
            inner: Arc::new(Inner {
                config,
                baud,
                state: Mutex::new(State::default()),
                cancel,
                events,
                tcpconsole_addr: tcpconsole.as_ref().map(|(_, a)| *a),
            }),
        };
        tokio::spawn(salad.clone().scan_loop());
        tracing::info!(globs = ?salad.inner.config.serial_globs, "SALAD is watching serial ports");
        if let Some((listener, addr)) = tcpconsole {
            tokio::spawn(salad.clone().serve_tcpconsoles(listener));
            tracing::info!(%addr, "SALAD is accepting network consoles");
        }
        Ok(salad)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: SaladEvent) {
        let _ = self.inner.events.send(event);
    }

    /// Events (consoles opened and closed, machines bound) from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SaladEvent> {
        self.inner.events.subscribe()
    }

    /// The address network consoles connect to, if SALAD accepts them.
    pub fn tcpconsole_addr(&self) -> Option<SocketAddr> {
        self.inner.tcpconsole_addr
    }

    /// All known machines, by id.
    pub fn machines(&self) -> BTreeMap<String, MachineInfo> {
        self.state()
            .machines
            .iter()
            .map(|(id, m)| (id.clone(), m.info()))
            .collect()
    }

    /// One machine (id compared case-insensitively), if known.
    pub fn machine(&self, id: &str) -> Option<MachineInfo> {
        let id = id.to_ascii_lowercase();
        self.state().machines.get(&id).map(Machine::info)
    }

    /// The TCP port of a machine's console, creating its listeners if the machine is not
    /// known yet (so a client can wait there for the machine's console to be bound).
    pub async fn machine_port(&self, id: &str) -> Result<u16, ConsoleError> {
        self.ensure_machine(id).map(|m| m.tcp_port)
    }

    /// A machine, created (with its relay and log listeners) if it is not known yet, so a
    /// job runner can attach to its console before the machine ever printed its id. The id
    /// is compared case-insensitively and must be valid ([`valid_machine_id`]). Must be
    /// called from within the Tokio runtime SALAD runs on.
    pub fn ensure_machine(&self, id: &str) -> Result<MachineInfo, ConsoleError> {
        if !valid_machine_id(id) {
            return Err(ConsoleError::BadMachineId(id.to_string()));
        }
        if self.inner.cancel.is_cancelled() {
            return Err(ConsoleError::ShutDown);
        }
        let id = id.to_ascii_lowercase();
        let mut state = self.state();
        if let Some(m) = state.machines.get(&id) {
            return Ok(m.info());
        }
        let addr = SocketAddr::new(self.inner.config.bind_host, 0);
        let listen = || -> Result<(TcpListener, u16), ConsoleError> {
            let listen_err = |source: io::Error| ConsoleError::Listen {
                id: id.clone(),
                addr,
                source,
            };
            let std_listener = std::net::TcpListener::bind(addr).map_err(listen_err)?;
            std_listener.set_nonblocking(true).map_err(listen_err)?;
            let port = std_listener.local_addr().map_err(listen_err)?.port();
            let listener = TcpListener::from_std(std_listener).map_err(listen_err)?;
            Ok((listener, port))
        };
        let (listener, port) = listen()?;
        let (log_listener, log_port) = listen()?;
        let machine = Machine {
            port,
            log_port,
            client: None,
            log: broadcast::channel(LOG_QUEUE).0,
            bytes: Arc::new(ByteCounters::default()),
        };
        let info = machine.info();
        state.machines.insert(id.clone(), machine);
        drop(state);
        tracing::info!(machine = %id, port, log_port, "SALAD: console relay listening");
        tokio::spawn(self.clone().serve_machine(id.clone(), listener));
        tokio::spawn(self.clone().serve_log(id, log_listener));
        Ok(info)
    }

    /// Writes client input to machine `id`'s console (dropped when it has none open),
    /// beside the relay client: callers decide who may type (the dashboard lets an admin
    /// type only into a machine no job uses).
    pub async fn write_input(&self, id: &str, data: &[u8]) {
        let id = &id.to_ascii_lowercase();
        match self.writer_of_machine(id) {
            Some(w) => match w.write_all(data).await {
                Ok(()) => {
                    if let Some(m) = self.state().machines.get(id) {
                        m.bytes
                            .to_machine
                            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    tracing::debug!(machine = %id, "SALAD: writing client input to the console: {e}")
                }
            },
            None => tracing::debug!(machine = %id, "SALAD: no console for client input; dropped"),
        }
    }

    /// Console bytes of every machine since SALAD started.
    pub fn console_bytes(&self) -> BTreeMap<String, ConsoleBytes> {
        use std::sync::atomic::Ordering::Relaxed;
        self.state()
            .machines
            .iter()
            .map(|(id, m)| {
                (
                    id.clone(),
                    ConsoleBytes {
                        from_machine: m.bytes.from_machine.load(Relaxed),
                        to_machine: m.bytes.to_machine.load(Relaxed),
                    },
                )
            })
            .collect()
    }

    /// A read-only copy of machine `id`'s console output from now on (like a client of
    /// its log port; a receiver that lags loses output). `None` for an unknown machine
    /// or when the machine has its maximum of log clients.
    pub fn watch_console(&self, id: &str) -> Option<broadcast::Receiver<Bytes>> {
        let id = id.to_ascii_lowercase();
        let state = self.state();
        state
            .machines
            .get(&id)
            // The last slots stay for the log port's clients.
            .filter(|m| m.log.receiver_count() < MAX_LOG_CLIENTS - RESERVED_LOG_SLOTS)
            .map(|m| m.log.subscribe())
    }

    /// The serial device (as matched by the glob) bound to a machine, if any. The binding
    /// outlives the device being closed, so it may name a device that is currently gone.
    /// A machine bound to a network console has no device.
    pub fn device_of(&self, id: &str) -> Option<PathBuf> {
        let id = id.to_ascii_lowercase();
        self.state().device_of(&id).cloned()
    }

    /// The serial devices currently open, sorted.
    pub fn devices(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.state().devices.keys().cloned().collect();
        v.sort();
        v
    }

    /// The network consoles currently connected, sorted by peer address.
    pub fn network_consoles(&self) -> Vec<NetworkConsole> {
        let state = self.state();
        let mut v: Vec<NetworkConsole> = state
            .net
            .iter()
            .map(|(c, n)| NetworkConsole {
                peer: n.peer,
                machine_id: state.bindings.get(&ConsoleKey::Net(*c)).cloned(),
            })
            .collect();
        v.sort_by_key(|n| n.peer);
        v
    }

    /// How many read-only clients are registered on a machine's log port (0 for an
    /// unknown machine). Output is sent to a log client from its registration on.
    pub fn log_clients(&self, id: &str) -> usize {
        let id = id.to_ascii_lowercase();
        self.state()
            .machines
            .get(&id)
            .map_or(0, |m| m.log.receiver_count())
    }

    /// Bind `console` to machine `id`. Returns whether the binding changed.
    fn bind(&self, console: &ConsoleKey, id: &str) -> bool {
        if let Err(e) = self.ensure_machine(id) {
            tracing::warn!(machine = %id, console = ?console, "SALAD: {e}");
        }
        let mut state = self.state();
        if state.bindings.get(console).map(String::as_str) == Some(id) {
            return false;
        }
        let previous = state.console_of(id).cloned();
        state.bindings.retain(|_, m| m != id);
        let old_id = state.bindings.insert(console.clone(), id.to_string());
        let event = match console {
            ConsoleKey::Serial(path) => Some(SaladEvent::Bound {
                machine_id: id.to_string(),
                device: path.clone(),
            }),
            ConsoleKey::Net(c) => state.net.get(c).map(|n| SaladEvent::NetworkConsoleBound {
                machine_id: id.to_string(),
                peer: n.peer,
            }),
        };
        drop(state);
        tracing::info!(
            machine = %id,
            console = ?console,
            previous_console = ?previous,
            previous_machine = ?old_id,
            "SALAD: console bound"
        );
        if let Some(event) = event {
            self.emit(event);
        }
        true
    }

    /// Where output of `console` goes now: the clients of its machine, if bound.
    fn sinks_of(&self, console: &ConsoleKey) -> Sinks {
        let state = self.state();
        let Some(id) = state.bindings.get(console) else {
            return Sinks::default();
        };
        match state.machines.get(id) {
            Some(m) => Sinks {
                bound: true,
                client: m.client.as_ref().map(|c| c.tx.clone()),
                log: (m.log.receiver_count() > 0).then(|| m.log.clone()),
                bytes: Some(m.bytes.clone()),
            },
            None => Sinks {
                bound: true,
                ..Sinks::default()
            },
        }
    }

    /// Where input for machine `id` goes now: its bound console, if open.
    fn writer_of_machine(&self, id: &str) -> Option<Arc<ConsoleWriter>> {
        let state = self.state();
        match state.console_of(id)? {
            ConsoleKey::Serial(path) => state.devices.get(path).map(|d| d.writer.clone()),
            ConsoleKey::Net(c) => state.net.get(c).map(|n| n.writer.clone()),
        }
    }

    async fn scan_loop(self) {
        let mut failures: HashMap<PathBuf, String> = HashMap::new();
        loop {
            self.scan(&mut failures);
            tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                _ = tokio::time::sleep(self.inner.config.rescan_interval) => {}
            }
        }
        let mut state = self.state();
        for (_, d) in state.devices.drain() {
            d.cancel.cancel();
        }
    }

    /// One scan: close devices that vanished (or whose symlink now points elsewhere),
    /// open new ones.
    fn scan(&self, failures: &mut HashMap<PathBuf, String>) {
        let mut found: Vec<(PathBuf, PathBuf)> = Vec::new();
        for pattern in &self.inner.config.serial_globs {
            let paths = match glob::glob(pattern) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(glob = %pattern, "SALAD: invalid glob: {e}");
                    continue;
                }
            };
            for entry in paths {
                let Ok(path) = entry else { continue };
                if found.iter().any(|(p, _)| *p == path) {
                    continue;
                }
                // A dangling symlink or vanished device is simply not there.
                if let Ok(target) = std::fs::canonicalize(&path) {
                    found.push((path, target));
                }
            }
        }

        let mut to_open = Vec::new();
        {
            let mut state = self.state();
            let gone: Vec<PathBuf> = state
                .devices
                .iter()
                .filter(|(path, d)| !found.iter().any(|(p, t)| p == *path && *t == d.target))
                .map(|(path, _)| path.clone())
                .collect();
            for path in gone {
                if let Some(d) = state.devices.remove(&path) {
                    d.cancel.cancel();
                }
            }
            for (path, target) in &found {
                if state.devices.contains_key(path) {
                    continue;
                }
                // The same device reached through two names is opened once.
                if state.devices.values().any(|d| d.target == *target)
                    || to_open.iter().any(|(_, t)| t == target)
                {
                    continue;
                }
                to_open.push((path.clone(), target.clone()));
            }
        }
        failures.retain(|p, _| found.iter().any(|(f, _)| f == p));

        for (path, target) in to_open {
            let fd = match open_serial(&path, self.inner.baud) {
                Ok(fd) => fd,
                Err(e) => {
                    let msg = e.to_string();
                    if failures.get(&path) != Some(&msg) {
                        tracing::warn!("SALAD: {msg}; retrying on every scan");
                        failures.insert(path, msg);
                    }
                    continue;
                }
            };
            failures.remove(&path);
            let fd = Arc::new(fd);
            let cancel = self.inner.cancel.child_token();
            let writer = Arc::new(ConsoleWriter {
                kind: WriterKind::Serial {
                    fd: fd.clone(),
                    lock: tokio::sync::Mutex::new(()),
                },
                cancel: cancel.clone(),
            });
            let generation = {
                let mut state = self.state();
                let generation = state.generation();
                state.devices.insert(
                    path.clone(),
                    Device {
                        generation,
                        target,
                        writer: writer.clone(),
                        cancel: cancel.clone(),
                    },
                );
                generation
            };
            tracing::info!(device = %path.display(), "SALAD: serial device opened");
            self.emit(SaladEvent::DeviceOpened(path.clone()));
            tokio::spawn(
                self.clone()
                    .run_device(path, generation, fd, writer, cancel),
            );
        }
    }

    async fn run_device(
        self,
        path: PathBuf,
        generation: u64,
        fd: Arc<AsyncFd<OwnedFd>>,
        writer: Arc<ConsoleWriter>,
        cancel: CancellationToken,
    ) {
        let key = ConsoleKey::Serial(path.clone());
        let mut line = LineBuf::default();
        let mut buf = vec![0u8; READ_BUF];
        let reason = loop {
            tokio::select! {
                _ = cancel.cancelled() => break "device vanished or SALAD is stopping".to_string(),
                r = read_fd(&fd, &mut buf) => match r {
                    Ok(0) => break "device hung up (end of file)".to_string(),
                    Ok(n) => {
                        let routed = self.route_output(&key, &buf[..n], &mut line, None);
                        if let Err(e) = deliver(&writer, routed).await {
                            break format!("write error: {e}");
                        }
                    }
                    Err(e) => break format!("read error: {e}"),
                },
            }
        };
        cancel.cancel();
        {
            let mut state = self.state();
            if state
                .devices
                .get(&path)
                .is_some_and(|d| d.generation == generation)
            {
                state.devices.remove(&path);
            }
        }
        tracing::info!(device = %path.display(), %reason, "SALAD: serial device closed");
        self.emit(SaladEvent::DeviceClosed { path, reason });
    }

    /// Sort bytes read from a console: count pings, bind machine ids, and say which bytes
    /// go to which clients. A line that binds the console to a new machine goes whole to
    /// that machine's clients, preceded by the console's backlog (network consoles keep
    /// what they print while unbound in `backlog`).
    fn route_output(
        &self,
        console: &ConsoleKey,
        data: &[u8],
        line: &mut LineBuf,
        mut backlog: Option<&mut Backlog>,
    ) -> Routed {
        let mut routed = Routed::default();
        let mut sinks = self.sinks_of(console);
        let mut start = 0;
        let mut pos = 0;
        for segment in data.split_inclusive(|b| *b == b'\n') {
            let seg_start = pos;
            pos += segment.len();
            line.push(segment);
            if !segment.ends_with(b"\n") {
                continue;
            }
            let whole = line.take_line();
            let parsed = whole.as_deref().and_then(parse_line);
            match parsed {
                Some(SaladLine::Ping) => routed.pongs += 1,
                Some(SaladLine::MachineId(id)) => {
                    let was_bound = sinks.bound;
                    if !self.bind(console, &id) {
                        continue;
                    }
                    route(
                        &mut routed,
                        &sinks,
                        &data[start..seg_start],
                        backlog.as_deref_mut(),
                    );
                    start = pos;
                    sinks = self.sinks_of(console);
                    let first = match backlog.as_deref_mut() {
                        // What the console printed unbound, this line's start included.
                        Some(b) if !was_bound => {
                            b.push(segment);
                            b.take()
                        }
                        _ => whole.unwrap_or_else(|| segment.to_vec()),
                    };
                    route(&mut routed, &sinks, &first, None);
                }
                None => {}
            }
        }
        route(&mut routed, &sinks, &data[start..], backlog);
        routed
    }

    /// The next connection on `listener`, or `None` once SALAD stops. A failed accept
    /// (e.g. out of file descriptors) is logged, naming `what`, and retried shortly.
    async fn accept(&self, listener: &TcpListener, what: &str) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                _ = self.inner.cancel.cancelled() => return None,
                r = listener.accept() => r,
            };
            match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!("SALAD: accepting {what} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve_tcpconsoles(self, listener: TcpListener) {
        while let Some((sock, peer)) = self.accept(&listener, "a network console").await {
            let _ = sock.set_nodelay(true);
            let (rd, wr) = sock.into_split();
            let cancel = self.inner.cancel.child_token();
            let writer = Arc::new(ConsoleWriter {
                kind: WriterKind::Net(tokio::sync::Mutex::new(wr)),
                cancel: cancel.clone(),
            });
            let conn = {
                let mut state = self.state();
                if state.unbound_net_consoles() >= MAX_UNBOUND_NET_CONSOLES {
                    None
                } else {
                    let conn = state.generation();
                    state.net.insert(
                        conn,
                        NetConsole {
                            peer,
                            writer: writer.clone(),
                        },
                    );
                    Some(conn)
                }
            };
            let Some(conn) = conn else {
                tracing::warn!(
                    %peer,
                    "SALAD: {MAX_UNBOUND_NET_CONSOLES} network consoles are already waiting \
                     for a machine id; closing this one"
                );
                continue;
            };
            tracing::info!(%peer, "SALAD: network console connected");
            self.emit(SaladEvent::NetworkConsoleOpened { peer });
            tokio::spawn(self.clone().run_net_console(conn, peer, rd, writer, cancel));
        }
    }

    async fn run_net_console(
        self,
        conn: u64,
        peer: SocketAddr,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        writer: Arc<ConsoleWriter>,
        cancel: CancellationToken,
    ) {
        let key = ConsoleKey::Net(conn);
        let mut line = LineBuf::default();
        let mut backlog = Backlog::default();
        let mut buf = vec![0u8; READ_BUF];
        let reason = loop {
            tokio::select! {
                _ = cancel.cancelled() => break "SALAD is stopping".to_string(),
                r = rd.read(&mut buf) => match r {
                    Ok(0) => break "closed by the peer".to_string(),
                    Ok(n) => {
                        let routed = self.route_output(&key, &buf[..n], &mut line, Some(&mut backlog));
                        if let Err(e) = deliver(&writer, routed).await {
                            break format!("write error: {e}");
                        }
                    }
                    Err(e) => break format!("read error: {e}"),
                },
            }
        };
        cancel.cancel();
        let machine_id = {
            let mut state = self.state();
            state.net.remove(&conn);
            state.bindings.remove(&key)
        };
        tracing::info!(%peer, machine = ?machine_id, %reason, "SALAD: network console closed");
        self.emit(SaladEvent::NetworkConsoleClosed {
            peer,
            machine_id,
            reason,
        });
    }

    async fn serve_machine(self, id: String, listener: TcpListener) {
        let what = format!("a client of machine {id}");
        while let Some((sock, peer)) = self.accept(&listener, &what).await {
            let _ = sock.set_nodelay(true);
            let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
            let generation = {
                let mut state = self.state();
                let generation = state.generation();
                match state.machines.get_mut(&id) {
                    Some(m) if m.client.is_none() => {
                        m.client = Some(Client {
                            generation,
                            peer,
                            tx,
                        });
                        Some(generation)
                    }
                    _ => None,
                }
            };
            match generation {
                Some(generation) => {
                    tracing::info!(machine = %id, %peer, "SALAD: console client connected");
                    tokio::spawn(self.clone().serve_client(id.clone(), generation, sock, rx));
                }
                None => {
                    tracing::info!(machine = %id, %peer, "SALAD: refusing a second console client");
                    tokio::spawn(refuse(id.clone(), sock));
                }
            }
        }
    }

    async fn serve_client(
        self,
        id: String,
        generation: u64,
        sock: TcpStream,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let (mut rd, mut wr) = sock.into_split();
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.write_input(&id, &buf[..n]).await,
                },
                out = rx.recv() => match out {
                    Some(bytes) => {
                        if wr.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
        let mut state = self.state();
        if let Some(m) = state.machines.get_mut(&id)
            && m.client
                .as_ref()
                .is_some_and(|c| c.generation == generation)
        {
            m.client = None;
        }
        drop(state);
        tracing::info!(machine = %id, "SALAD: console client disconnected");
    }

    async fn serve_log(self, id: String, listener: TcpListener) {
        let what = format!("a log client of machine {id}");
        while let Some((sock, peer)) = self.accept(&listener, &what).await {
            let rx = {
                let state = self.state();
                state
                    .machines
                    .get(&id)
                    .filter(|m| m.log.receiver_count() < MAX_LOG_CLIENTS)
                    .map(|m| m.log.subscribe())
            };
            let Some(rx) = rx else {
                tracing::warn!(machine = %id, %peer, "SALAD: too many log clients; closing this one");
                continue;
            };
            let _ = sock.set_nodelay(true);
            tracing::info!(machine = %id, %peer, "SALAD: log client connected");
            tokio::spawn(serve_log_client(
                self.inner.cancel.clone(),
                id.clone(),
                peer,
                sock,
                rx,
            ));
        }
    }
}

/// Queue `bytes` for `sinks` (if bound) or keep them in the backlog (if unbound).
fn route(routed: &mut Routed, sinks: &Sinks, bytes: &[u8], backlog: Option<&mut Backlog>) {
    if bytes.is_empty() {
        return;
    }
    if sinks.bound {
        if let Some(c) = &sinks.bytes {
            c.from_machine
                .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if sinks.client.is_some() || sinks.log.is_some() {
            routed
                .sends
                .push((sinks.clone(), Bytes::copy_from_slice(bytes)));
        }
    } else if let Some(b) = backlog {
        b.push(bytes);
    }
}

/// Send console output to a machine's clients: log clients never wait (a lagging one
/// loses output); the relay client is waited for a while if its queue is full.
/// Answers the pings of one read (on the console itself) and forwards its output to the
/// machine's clients; an error is a failed write to the console.
async fn deliver(writer: &ConsoleWriter, routed: Routed) -> io::Result<()> {
    for _ in 0..routed.pongs {
        writer.write_all(PONG).await?;
    }
    for (sinks, bytes) in routed.sends {
        forward(&sinks, bytes).await;
    }
    Ok(())
}

async fn forward(sinks: &Sinks, bytes: Bytes) {
    if let Some(log) = &sinks.log {
        let _ = log.send(bytes.clone());
    }
    let Some(tx) = &sinks.client else { return };
    match tx.try_send(bytes) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(bytes)) => {
            if tokio::time::timeout(CLIENT_STALL, tx.send(bytes))
                .await
                .is_err()
            {
                tracing::warn!("SALAD: console client stalled; dropped some console output");
            }
        }
    }
}

/// Stream console output to one read-only client, discarding what it sends.
async fn serve_log_client(
    cancel: CancellationToken,
    id: String,
    peer: SocketAddr,
    sock: TcpStream,
    mut rx: broadcast::Receiver<Bytes>,
) {
    let (mut rd, mut wr) = sock.into_split();
    let mut sink = vec![0u8; 1024];
    let mut lost: u64 = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = rd.read(&mut sink) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            out = rx.recv() => match out {
                Ok(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => lost += n,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    tracing::info!(machine = %id, %peer, lost_chunks = lost, "SALAD: log client disconnected");
}

/// Tell a second client that the machine is taken, then close.
async fn refuse(id: String, mut sock: TcpStream) {
    let msg = format!("SALAD: machine {id} already has a client\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        sock.write_all(msg.as_bytes()).await?;
        sock.shutdown().await?;
        // Drain what the client sent so closing does not reset the connection and lose
        // the message.
        let mut sink = [0u8; 1024];
        while sock.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_is_found_anywhere_in_a_line() {
        assert_eq!(parse_line(b"SALAD.ping\n"), Some(SaladLine::Ping));
        assert_eq!(parse_line(b"SALAD.ping"), Some(SaladLine::Ping));
        assert_eq!(
            parse_line(b"[  1.0] echo SALAD.ping\r\n"),
            Some(SaladLine::Ping)
        );
        assert_eq!(parse_line(b"SALAD.pong\n"), None);
        assert_eq!(parse_line(b""), None);
        assert_eq!(parse_line(b"hello\n"), None);
    }

    #[test]
    fn machine_id_is_lowercased_and_trimmed() {
        assert_eq!(
            parse_line(b"SALAD.machine_id=52:54:00:11:22:01\n"),
            Some(SaladLine::MachineId("52:54:00:11:22:01".into()))
        );
        assert_eq!(
            parse_line(b"boot: SALAD.machine_id=AA:BB:CC \r\n"),
            Some(SaladLine::MachineId("aa:bb:cc".into()))
        );
        assert_eq!(
            parse_line(b"SALAD.machine_id=host-1.lab_2"),
            Some(SaladLine::MachineId("host-1.lab_2".into()))
        );
    }

    #[test]
    fn machine_id_ends_at_white_space() {
        assert_eq!(
            parse_line(
                b"[    0.000000] Command line: console=ttyS0 SALAD.machine_id=52:54:00:11:22:01 quiet\r\n"
            ),
            Some(SaladLine::MachineId("52:54:00:11:22:01".into()))
        );
        assert_eq!(
            parse_line(b"SALAD.machine_id=a\tb\n"),
            Some(SaladLine::MachineId("a".into()))
        );
    }

    #[test]
    fn backlog_keeps_the_newest_bytes() {
        let mut b = Backlog::default();
        b.push(&vec![b'a'; MAX_UNBOUND_BACKLOG - 1]);
        b.push(b"xyz");
        assert_eq!(b.buf.len(), MAX_UNBOUND_BACKLOG);
        let all = b.take();
        assert!(all.ends_with(b"axyz"));
        assert_eq!(all.len(), MAX_UNBOUND_BACKLOG);
        assert!(b.take().is_empty());
    }

    #[test]
    fn bad_machine_ids_are_rejected() {
        assert_eq!(parse_line(b"SALAD.machine_id=\n"), None);
        assert_eq!(parse_line(b"SALAD.machine_id=   \n"), None);
        assert_eq!(parse_line(b"SALAD.machine_id=a;b c\n"), None);
        assert_eq!(parse_line(b"SALAD.machine_id=a/b\n"), None);
        assert_eq!(parse_line(b"SALAD.machine_id=\xff\xfe\n"), None);
        let long = format!("SALAD.machine_id={}\n", "a".repeat(65));
        assert_eq!(parse_line(long.as_bytes()), None);
        let max = format!("SALAD.machine_id={}\n", "a".repeat(64));
        assert_eq!(
            parse_line(max.as_bytes()),
            Some(SaladLine::MachineId("a".repeat(64)))
        );
    }

    #[test]
    fn invalid_utf8_around_a_ping_still_pings() {
        assert_eq!(
            parse_line(b"\xff\x00SALAD.ping\xc3\n"),
            Some(SaladLine::Ping)
        );
    }

    #[test]
    fn valid_machine_id_checks_charset_and_length() {
        assert!(valid_machine_id("52:54:00:11:22:01"));
        assert!(!valid_machine_id(""));
        assert!(!valid_machine_id("x;rm"));
        assert!(!valid_machine_id(&"x".repeat(65)));
    }

    #[test]
    fn line_buffer_drops_overlong_lines_only() {
        let mut lb = LineBuf::default();
        lb.push(&vec![b'x'; MAX_ASSOC_LINE]);
        lb.push(b"SALAD.ping\n");
        assert_eq!(lb.take_line(), None);
        lb.push(b"SALAD.");
        lb.push(b"ping\n");
        assert_eq!(lb.take_line().as_deref(), Some(&b"SALAD.ping\n"[..]));
    }

    #[test]
    fn baud_rates_map_to_termios() {
        assert_eq!(baud_rate(115_200), Some(BaudRate::B115200));
        assert_eq!(baud_rate(12345), None);
    }
}
