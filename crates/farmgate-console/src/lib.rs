//! SALAD: the serial console multiplexer.
//!
//! Every `rescan_interval`, SALAD globs for serial devices (USB serial adapters, ptys, or
//! symlinks to them), opens the new ones in raw mode and reads them. Two console lines
//! matter to SALAD itself:
//!
//! * a line containing `SALAD.ping` is answered by writing `SALAD.pong\n` to the device, so
//!   a DUT can find which of its serial ports reaches SALAD;
//! * a line containing `SALAD.machine_id=<id>` binds the device to machine `<id>`
//!   (lower-cased). A machine bound again from another device moves to that device.
//!
//! Each machine gets one TCP listener (OS-assigned port, stable for the life of the
//! process). One client at a time receives the device's output from the moment SALAD has
//! registered it (shown by [`MachineInfo::client`]; the kernel completes a TCP connection
//! before SALAD accepts it, so output read in between goes to nobody), and what it sends is
//! written to the device; a second client is told so and closed. Bytes are relayed as they
//! come; lines are only cut for the association protocol.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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

/// What SALAD writes to a device that sent `SALAD.ping`.
pub const PONG: &[u8] = b"SALAD.pong\n";

/// Chunks of device output queued for a slow client before the device reader waits.
const CLIENT_QUEUE: usize = 1024;
/// Chunks of client input queued for a device before the client reader waits.
const DEVICE_QUEUE: usize = 64;
/// How long device output waits for a stalled client before that chunk is dropped.
const CLIENT_STALL: Duration = Duration::from_secs(10);

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
    /// The TCP listener of a machine cannot be created.
    #[error("cannot listen on {addr} for the console of machine {id}: {source}")]
    Listen {
        /// The machine.
        id: String,
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
    /// TCP port relaying the machine's console.
    pub tcp_port: u16,
    /// Whether a client is connected to that port.
    pub has_client: bool,
    /// The address of the connected client, once SALAD has registered it (omitted when
    /// there is none). Device output is relayed to a client from this point on, never
    /// before: a client that must not miss the first bytes of a boot (a job runner) waits
    /// until this shows its own local address before powering the machine on. The TCP
    /// connection itself carries only console bytes, so `nc` users see no protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<SocketAddr>,
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
/// `SALAD.machine_id=<id>` may follow other text on the line (e.g. a kernel timestamp); the
/// id is the rest of the line, trimmed of white space, and must be valid
/// ([`valid_machine_id`]); it is returned lower-cased. A line containing `SALAD.ping` is a
/// ping. Anything else, including invalid UTF-8, is `None`.
pub fn parse_line(line: &[u8]) -> Option<SaladLine> {
    if let Some(pos) = find(line, MACHINE_ID_TAG) {
        let rest = line[pos + MACHINE_ID_TAG.len()..].trim_ascii();
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

struct Client {
    generation: u64,
    peer: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
}

struct Machine {
    port: u16,
    client: Option<Client>,
}

impl Machine {
    fn info(&self) -> MachineInfo {
        MachineInfo {
            tcp_port: self.port,
            has_client: self.client.is_some(),
            client: self.client.as_ref().map(|c| c.peer),
        }
    }
}

struct Device {
    generation: u64,
    /// Canonical path the glob match pointed to when opened.
    target: PathBuf,
    writer: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    machines: BTreeMap<String, Machine>,
    /// Open devices, by path as matched by the glob.
    devices: HashMap<PathBuf, Device>,
    /// Device path -> machine id; kept while the device is closed, so a device that comes
    /// back keeps its machine.
    bindings: HashMap<PathBuf, String>,
    next_generation: u64,
}

impl State {
    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn device_of(&self, id: &str) -> Option<&PathBuf> {
        self.bindings
            .iter()
            .find_map(|(path, m)| (m == id).then_some(path))
    }
}

struct Inner {
    config: SaladConfig,
    baud: BaudRate,
    state: Mutex<State>,
    cancel: CancellationToken,
    events: broadcast::Sender<SaladEvent>,
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
    /// Check the configuration and start scanning for serial devices. Everything stops
    /// when `cancel` fires.
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
        let (events, _) = broadcast::channel(256);
        let salad = Salad {
            inner: Arc::new(Inner {
                config,
                baud,
                state: Mutex::new(State::default()),
                cancel,
                events,
            }),
        };
        tokio::spawn(salad.clone().scan_loop());
        tracing::info!(globs = ?salad.inner.config.serial_globs, "SALAD is watching serial ports");
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

    /// Events (devices opened and closed, machines bound) from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SaladEvent> {
        self.inner.events.subscribe()
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

    /// The TCP port of a machine's console, creating its listener if the machine is not
    /// known yet (so a client can wait there for the machine's device to be bound).
    pub async fn machine_port(&self, id: &str) -> Result<u16, ConsoleError> {
        self.ensure_machine(id)
    }

    /// The serial device (as matched by the glob) bound to a machine, if any. The binding
    /// outlives the device being closed, so it may name a device that is currently gone.
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

    fn ensure_machine(&self, id: &str) -> Result<u16, ConsoleError> {
        if !valid_machine_id(id) {
            return Err(ConsoleError::BadMachineId(id.to_string()));
        }
        if self.inner.cancel.is_cancelled() {
            return Err(ConsoleError::ShutDown);
        }
        let id = id.to_ascii_lowercase();
        let mut state = self.state();
        if let Some(m) = state.machines.get(&id) {
            return Ok(m.port);
        }
        let addr = SocketAddr::new(self.inner.config.bind_host, 0);
        let listen_err = |source: io::Error| ConsoleError::Listen {
            id: id.clone(),
            addr,
            source,
        };
        let std_listener = std::net::TcpListener::bind(addr).map_err(listen_err)?;
        std_listener.set_nonblocking(true).map_err(listen_err)?;
        let port = std_listener.local_addr().map_err(listen_err)?.port();
        let listener = TcpListener::from_std(std_listener).map_err(listen_err)?;
        state
            .machines
            .insert(id.clone(), Machine { port, client: None });
        drop(state);
        tracing::info!(machine = %id, port, "SALAD: console relay listening");
        tokio::spawn(self.clone().serve_machine(id, listener));
        Ok(port)
    }

    /// Bind `device` to machine `id`. Returns whether the binding changed.
    fn bind(&self, device: &Path, id: &str) -> bool {
        if let Err(e) = self.ensure_machine(id) {
            tracing::warn!(machine = %id, device = %device.display(), "SALAD: {e}");
        }
        let mut state = self.state();
        if state.bindings.get(device).map(String::as_str) == Some(id) {
            return false;
        }
        let previous = state.device_of(id).cloned();
        state.bindings.retain(|_, m| m != id);
        let old_id = state.bindings.insert(device.to_path_buf(), id.to_string());
        drop(state);
        tracing::info!(
            machine = %id,
            device = %device.display(),
            previous_device = ?previous,
            previous_machine = ?old_id,
            "SALAD: console bound"
        );
        self.emit(SaladEvent::Bound {
            machine_id: id.to_string(),
            device: device.to_path_buf(),
        });
        true
    }

    /// Where output of `device` goes now: the client of its machine, if any.
    fn client_of_device(&self, device: &Path) -> Option<mpsc::Sender<Vec<u8>>> {
        let state = self.state();
        let id = state.bindings.get(device)?;
        state
            .machines
            .get(id)?
            .client
            .as_ref()
            .map(|c| c.tx.clone())
    }

    /// Where input for machine `id` goes now: its bound device, if open.
    fn writer_of_machine(&self, id: &str) -> Option<mpsc::Sender<Vec<u8>>> {
        let state = self.state();
        let path = state.device_of(id)?;
        state.devices.get(path).map(|d| d.writer.clone())
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
            let (writer, rx) = mpsc::channel(DEVICE_QUEUE);
            let cancel = self.inner.cancel.child_token();
            let generation = {
                let mut state = self.state();
                let generation = state.generation();
                state.devices.insert(
                    path.clone(),
                    Device {
                        generation,
                        target,
                        writer,
                        cancel: cancel.clone(),
                    },
                );
                generation
            };
            tracing::info!(device = %path.display(), "SALAD: serial device opened");
            self.emit(SaladEvent::DeviceOpened(path.clone()));
            tokio::spawn(self.clone().run_device(path, generation, fd, rx, cancel));
        }
    }

    async fn run_device(
        self,
        path: PathBuf,
        generation: u64,
        fd: AsyncFd<OwnedFd>,
        mut rx: mpsc::Receiver<Vec<u8>>,
        cancel: CancellationToken,
    ) {
        let mut line = LineBuf::default();
        let mut buf = vec![0u8; 4096];
        let reason = loop {
            tokio::select! {
                _ = cancel.cancelled() => break "device vanished or SALAD is stopping".to_string(),
                r = fd.async_io(Interest::READABLE, |f| {
                    nix::unistd::read(f, &mut buf).map_err(io::Error::from)
                }) => match r {
                    Ok(0) => break "device hung up (end of file)".to_string(),
                    Ok(n) => {
                        if let Err(e) = self.handle_output(&path, &buf[..n], &mut line, &fd, &cancel).await {
                            break format!("write error: {e}");
                        }
                    }
                    Err(e) => break format!("read error: {e}"),
                },
                msg = rx.recv() => match msg {
                    Some(bytes) => {
                        let r = tokio::select! {
                            _ = cancel.cancelled() => Ok(()),
                            r = write_all_fd(&fd, &bytes) => r,
                        };
                        if let Err(e) = r {
                            break format!("write error: {e}");
                        }
                    }
                    None => break "device writer dropped".to_string(),
                },
            }
        };
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

    /// Handle bytes read from a device: answer pings, bind machine ids, relay the bytes to
    /// the machine's client. A line that binds the device to a new machine is relayed whole
    /// to that machine's client.
    async fn handle_output(
        &self,
        path: &Path,
        data: &[u8],
        line: &mut LineBuf,
        fd: &AsyncFd<OwnedFd>,
        cancel: &CancellationToken,
    ) -> io::Result<()> {
        let mut target = self.client_of_device(path);
        let mut pending: Vec<u8> = Vec::with_capacity(data.len());
        for segment in data.split_inclusive(|b| *b == b'\n') {
            line.push(segment);
            if segment.ends_with(b"\n") {
                let whole = line.take_line();
                let parsed = whole.as_deref().and_then(parse_line);
                if parsed == Some(SaladLine::Ping) {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        r = write_all_fd(fd, PONG) => r?,
                    }
                }
                if let Some(SaladLine::MachineId(id)) = parsed
                    && self.bind(path, &id)
                {
                    forward(target.as_ref(), std::mem::take(&mut pending)).await;
                    target = self.client_of_device(path);
                    // The line itself goes to the new machine's client, whole even when it
                    // was cut across reads.
                    pending = whole.unwrap_or_else(|| segment.to_vec());
                    continue;
                }
            }
            pending.extend_from_slice(segment);
        }
        forward(target.as_ref(), pending).await;
        Ok(())
    }

    async fn serve_machine(self, id: String, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                r = listener.accept() => r,
            };
            let (sock, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(machine = %id, "SALAD: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
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
        mut rx: mpsc::Receiver<Vec<u8>>,
    ) {
        let (mut rd, mut wr) = sock.into_split();
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => match self.writer_of_machine(&id) {
                        Some(w) => {
                            let _ = w.send(buf[..n].to_vec()).await;
                        }
                        None => tracing::debug!(machine = %id, "SALAD: no device for client input; dropped"),
                    },
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
}

/// Send device output to a client, waiting a while if its queue is full.
async fn forward(target: Option<&mpsc::Sender<Vec<u8>>>, bytes: Vec<u8>) {
    let Some(tx) = target else { return };
    if bytes.is_empty() {
        return;
    }
    match tokio::time::timeout(CLIENT_STALL, tx.send(bytes)).await {
        Ok(_) => {}
        Err(_) => tracing::warn!("SALAD: console client stalled; dropped some console output"),
    }
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
    fn bad_machine_ids_are_rejected() {
        assert_eq!(parse_line(b"SALAD.machine_id=\n"), None);
        assert_eq!(parse_line(b"SALAD.machine_id=   \n"), None);
        assert_eq!(parse_line(b"SALAD.machine_id=a b\n"), None);
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
