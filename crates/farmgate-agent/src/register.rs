//! Registration (agent mode): find the serial port that is the machine's console (the
//! one where the gateway's SALAD answers `SALAD.ping` with `SALAD.pong`), bind it with
//! `SALAD.machine_id=<mac>`, and register the machine with the gateway
//! (`POST /api/v1/dut/`, seed 001), ending with CI-tron's `MaRS: Registration complete`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{self, BaudRate, SetArg};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// What SALAD answers [`PING`] with.
pub const PONG: &str = "SALAD.pong";
/// The association probe.
pub const PING: &[u8] = b"SALAD.ping\n";
/// The line CI-tron's registration prints at the end.
pub const DONE_LINE: &str = "MaRS: Registration complete";
/// Serial devices a DUT's console may be on, in the order they are tried.
pub const PORT_PATTERNS: &[&str] = &["ttyS", "ttyUSB", "ttyACM", "ttyAMA", "ttymxc", "ttyO"];

/// What can go wrong while registering.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A serial device could not be opened or set up.
    #[error("serial port {path}: {what}: {source}")]
    Port {
        /// The device.
        path: String,
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gateway could not be reached or refused the registration.
    #[error("registration with {url}: {reason}")]
    Gateway {
        /// The URL posted to.
        url: String,
        /// What went wrong (the gateway's own error text when it gave one).
        reason: String,
    },
}

/// A serial port, raw, non-blocking, at 115200 baud (SALAD's speed).
pub struct SerialPort {
    name: String,
    fd: AsyncFd<OwnedFd>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort")
            .field("name", &self.name)
            .finish()
    }
}

impl SerialPort {
    /// Opens a serial device (must be called inside a tokio runtime).
    pub fn open(path: &Path) -> Result<SerialPort, RegisterError> {
        let err = |what: &'static str| {
            let path = path.display().to_string();
            move |source: std::io::Error| RegisterError::Port { path, what, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(path)
            .map_err(err("open"))?;
        let fd = OwnedFd::from(file);
        if let Ok(mut t) = termios::tcgetattr(&fd) {
            termios::cfmakeraw(&mut t);
            let _ = termios::cfsetspeed(&mut t, BaudRate::B115200);
            termios::tcsetattr(&fd, SetArg::TCSANOW, &t)
                .map_err(|e| err("set raw 115200")(std::io::Error::from(e)))?;
        }
        Self::from_fd(path.display().to_string(), fd)
    }

    /// Wraps an open descriptor (a pty master in tests) under `name`.
    pub fn from_fd(name: String, fd: OwnedFd) -> Result<SerialPort, RegisterError> {
        let err = |what: &'static str| {
            let path = name.clone();
            move |source: std::io::Error| RegisterError::Port { path, what, source }
        };
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| err("get flags")(e.into()))?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(|e| err("set non-blocking")(e.into()))?;
        let fd = poll_owned_fd(fd).map_err(err("register with the runtime"))?;
        Ok(SerialPort { name, fd })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = self
                .fd
                .async_io(Interest::WRITABLE, |fd| {
                    nix::unistd::write(fd.as_fd(), data).map_err(std::io::Error::from)
                })
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Reads what is there (waits for at least one byte).
    pub async fn read_some(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                nix::unistd::read(fd, buf).map_err(std::io::Error::from)
            })
            .await
    }
}

/// Polls an owned descriptor. `AsyncFd::new` is deprecated because a borrowed descriptor
/// could be closed while registered; an `OwnedFd` moved into the `AsyncFd` is closed only
/// when it is dropped, which is what `AsyncFd::register` asks for.
#[allow(deprecated)]
fn poll_owned_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

/// `OpenOptions` with `O_NOCTTY`: opening a tty must not make it our controlling terminal.
trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::libc::O_NOCTTY)
    }
}

/// The serial devices of `/dev` (`dev`) a console may be on, by [`PORT_PATTERNS`] order.
pub fn candidate_ports(dev: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dev) else {
        return Vec::new();
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut out = Vec::new();
    for prefix in PORT_PATTERNS {
        let mut these: Vec<&String> = names
            .iter()
            .filter(|n| {
                n.strip_prefix(prefix).is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                })
            })
            .collect();
        these.sort_by_key(|n| n[prefix.len()..].parse::<u32>().unwrap_or(u32::MAX));
        out.extend(these.into_iter().map(|n| dev.join(n)));
    }
    out
}

/// Whether SALAD answers on `port`: sends [`PING`] and waits up to `wait` for [`PONG`].
pub async fn is_salad_console(port: &SerialPort, wait: Duration) -> bool {
    if port.write_all(PING).await.is_err() {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, port.read_some(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(PONG.len()).any(|w| w == PONG.as_bytes()) {
                    return true;
                }
                // Keep the tail only: a chatty port must not grow this without bound.
                if seen.len() > 4096 {
                    seen.drain(..seen.len() - PONG.len());
                }
            }
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

/// The first of `ports` where SALAD answers, tried in order.
pub async fn find_console(ports: Vec<SerialPort>, wait: Duration) -> Option<SerialPort> {
    for p in ports {
        if is_salad_console(&p, wait).await {
            return Some(p);
        }
    }
    None
}

/// Binds the console to the machine: SALAD reads `SALAD.machine_id=<id>` on it.
pub async fn announce(port: &SerialPort, machine_id: &str) -> std::io::Result<()> {
    port.write_all(format!("SALAD.machine_id={machine_id}\n").as_bytes())
        .await
}

/// Registers the machine with the gateway at `gateway` (`http://host:port`).
pub async fn register(
    gateway: &str,
    reg: &farmgate_wire::DutRegistration,
    timeout: Duration,
) -> Result<serde_json::Value, RegisterError> {
    let url = format!("{}/api/v1/dut/", gateway.trim_end_matches('/'));
    let fail = |reason: String| RegisterError::Gateway {
        url: url.clone(),
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
        .map_err(|e| fail(farmgate_httpc::error_chain(&e)))?;
    let resp = client
        .post(&url)
        .json(reg)
        .send()
        .await
        .map_err(|e| fail(farmgate_httpc::error_chain(&e)))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| fail(farmgate_httpc::error_chain(&e)))?;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let said = body
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(300).collect());
        return Err(fail(format!("the gateway answered {status}: {said}")));
    }
    Ok(body)
}
