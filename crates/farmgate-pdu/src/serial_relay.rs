//! A USB serial power switch: one ASCII digit written to a serial device.
//!
//! The device shows up as a serial port (typically `/dev/ttyACM0`). Writing one ASCII
//! digit sets its outputs: bit 0 of the digit is the power (`1` on, `0` off), the other
//! bits drive LEDs on the board and are left at 0 here.
//!
//! **This is the one driver that cannot read back.** The device has no way to report its
//! state, so `set` cannot confirm the change and `get` returns the last state *this
//! driver wrote*: kept in `state_file` when configured (so it survives restarts of the
//! gateway), otherwise in this process's memory only. Before anything was written, `get`
//! returns `Unknown`.
//!
//! Config: `device` (path of the serial device; required), `baud` (default 115200; the tty
//! is set raw, 8N1, no flow control), `state_file` (optional path), `timeout` (seconds for
//! opening and writing, default 5). One port, id `1`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use farmgate_wire::PortState;
use nix::sys::termios::{
    BaudRate, ControlFlags, SetArg, cfmakeraw, cfsetspeed, tcdrain, tcgetattr, tcsetattr,
};

use crate::config::Cfg;
use crate::{PduDriver, PowerError};

/// Default serial speed.
pub const DEFAULT_BAUD: u64 = 115_200;
/// Default time opening the device and writing the digit may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The only port id.
pub const PORT_ID: &str = "1";

/// The serial speeds the driver can set.
fn baud_rate(baud: u64) -> Option<BaudRate> {
    Some(match baud {
        1200 => BaudRate::B1200,
        2400 => BaudRate::B2400,
        4800 => BaudRate::B4800,
        9600 => BaudRate::B9600,
        19_200 => BaudRate::B19200,
        38_400 => BaudRate::B38400,
        57_600 => BaudRate::B57600,
        115_200 => BaudRate::B115200,
        230_400 => BaudRate::B230400,
        460_800 => BaudRate::B460800,
        921_600 => BaudRate::B921600,
        _ => return None,
    })
}

/// Last written states per device path, for configurations without `state_file`.
fn memory() -> &'static Mutex<HashMap<PathBuf, PortState>> {
    static MEMORY: OnceLock<Mutex<HashMap<PathBuf, PortState>>> = OnceLock::new();
    MEMORY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A USB serial power switch.
#[derive(Debug)]
pub struct SerialRelayDriver {
    pdu: String,
    device: PathBuf,
    baud: BaudRate,
    state_file: Option<PathBuf>,
    timeout: Duration,
}

impl SerialRelayDriver {
    /// Reads `device`, `baud`, `state_file` and `timeout`.
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&["device", "baud", "state_file", "timeout"])?;
        let device = cfg
            .string("device")?
            .filter(|d| !d.trim().is_empty())
            .ok_or_else(|| cfg.err("device", "missing (the serial device, e.g. /dev/ttyACM0)"))?;
        let baud_n = cfg.uint("baud", 4_000_000)?.unwrap_or(DEFAULT_BAUD);
        let baud = baud_rate(baud_n).ok_or_else(|| {
            cfg.err(
                "baud",
                format!(
                    "{baud_n} is not a supported speed (1200, 2400, 4800, 9600, 19200, 38400, \
                     57600, 115200, 230400, 460800, 921600)"
                ),
            )
        })?;
        let state_file = cfg
            .string("state_file")?
            .map(|s| {
                if s.trim().is_empty() {
                    Err(cfg.err("state_file", "empty path"))
                } else {
                    Ok(PathBuf::from(s))
                }
            })
            .transpose()?;
        Ok(SerialRelayDriver {
            pdu: cfg.pdu.to_string(),
            device: PathBuf::from(device),
            baud,
            state_file,
            timeout: cfg.seconds("timeout")?.unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    fn check(&self, port_id: &str) -> Result<(), PowerError> {
        if port_id == PORT_ID {
            Ok(())
        } else {
            Err(PowerError::BadPort {
                pdu: self.pdu.clone(),
                port: port_id.to_string(),
                reason: format!("a serial relay has a single port, {PORT_ID}"),
            })
        }
    }

    fn io(&self, addr: &Path, action: &str, stage: &'static str, e: std::io::Error) -> PowerError {
        PowerError::Io {
            pdu: self.pdu.clone(),
            addr: addr.display().to_string(),
            action: action.to_string(),
            stage,
            source: e,
        }
    }

    fn read_state_file(&self, path: &Path) -> Result<PortState, PowerError> {
        let action = format!("read the last state of port {PORT_ID}");
        match std::fs::read_to_string(path) {
            Ok(text) => match text.trim() {
                "on" => Ok(PortState::On),
                "off" => Ok(PortState::Off),
                other => Err(PowerError::Refused {
                    pdu: self.pdu.clone(),
                    addr: path.display().to_string(),
                    action,
                    reason: format!("the state file holds {other:?}, not \"on\" or \"off\""),
                }),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(PortState::Unknown),
            Err(e) => Err(self.io(path, &action, "read state file", e)),
        }
    }

    fn write_state_file(&self, path: &Path, state: PortState) -> Result<(), PowerError> {
        let action = format!("remember the state of port {PORT_ID}");
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, format!("{state}\n"))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| self.io(path, &action, "write state file", e))
    }
}

/// Opens the tty, sets it raw at `baud`, writes `digit` and waits until it is sent.
fn write_digit(
    device: &Path,
    baud: BaudRate,
    digit: u8,
    deadline: Instant,
) -> Result<(), (&'static str, std::io::Error)> {
    let mut tty = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
        .open(device)
        .map_err(|e| ("open", e))?;
    let configure = |tty: &std::fs::File| -> nix::Result<()> {
        let mut t = tcgetattr(tty)?;
        cfmakeraw(&mut t);
        cfsetspeed(&mut t, baud)?;
        t.control_flags |= ControlFlags::CLOCAL | ControlFlags::CREAD;
        t.control_flags &= !(ControlFlags::CSTOPB | ControlFlags::PARENB);
        tcsetattr(tty, SetArg::TCSANOW, &t)
    };
    configure(&tty).map_err(|e| ("configure", std::io::Error::from(e)))?;
    loop {
        match tty.write(&[digit]) {
            Ok(1) => break,
            Ok(_) => {
                return Err((
                    "write",
                    std::io::Error::new(ErrorKind::WriteZero, "the device took no byte"),
                ));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err((
                        "write",
                        std::io::Error::new(ErrorKind::TimedOut, "output buffer full"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(("write", e)),
        }
    }
    tcdrain(&tty).map_err(|e| ("drain", std::io::Error::from(e)))
}

#[async_trait]
impl PduDriver for SerialRelayDriver {
    fn driver_name(&self) -> &str {
        "serial_relay"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        Ok(vec![PORT_ID.to_string()])
    }

    /// The last state this driver wrote (the device cannot be read), `Unknown` if none.
    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        self.check(port_id)?;
        match &self.state_file {
            Some(path) => self.read_state_file(path),
            None => {
                let map = memory().lock().unwrap_or_else(|p| p.into_inner());
                Ok(map.get(&self.device).copied().unwrap_or(PortState::Unknown))
            }
        }
    }

    /// Writes the digit; the state is then remembered, not read back.
    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        self.check(port_id)?;
        let digit = match state {
            PortState::On => b'1',
            PortState::Off => b'0',
            PortState::Unknown => {
                return Err(PowerError::BadState {
                    pdu: self.pdu.clone(),
                    port: port_id.to_string(),
                    state,
                });
            }
        };
        let action = format!("switch port {port_id} {state}");
        let device = self.device.clone();
        let baud = self.baud;
        let deadline = Instant::now() + self.timeout;
        let job = tokio::task::spawn_blocking(move || write_digit(&device, baud, digit, deadline));
        let timeout = PowerError::Timeout {
            pdu: self.pdu.clone(),
            addr: self.device.display().to_string(),
            action: action.clone(),
            timeout: self.timeout,
        };
        match tokio::time::timeout(self.timeout, job).await {
            Err(_) => return Err(timeout),
            Ok(Err(join)) => {
                return Err(self.io(&self.device, &action, "write", std::io::Error::other(join)));
            }
            Ok(Ok(Err((stage, e)))) => return Err(self.io(&self.device, &action, stage, e)),
            Ok(Ok(Ok(()))) => {}
        }
        tracing::debug!(pdu = %self.pdu, device = %self.device.display(), %state, "serial relay written");
        match &self.state_file {
            Some(path) => self.write_state_file(path, state),
            None => {
                memory()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.device.clone(), state);
                Ok(())
            }
        }
    }
}
