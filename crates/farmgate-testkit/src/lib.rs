//! A simulated farm for tests and the demo.
//!
//! [`SimFarm`] is a virtual PDU speaking CI-tron's `vpdu` TCP protocol, whose ports are
//! fake machines (DUTs). Each machine is a *client* of the gateway over its real
//! protocols: when its port is switched on it prints on its serial console (a pty whose
//! slave side is linked as `<tty_dir>/ttySIM<port>`, for the gateway's SALAD to open),
//! fetches its iPXE boot script over HTTP from `{gateway_url}/api/v1/dut/{mac}/boot.ipxe`,
//! "boots" the kernel it names and runs the `farmsim.script` of its command line.
//!
//! # The vpdu protocol
//!
//! Each TCP connection carries one command, a big-endian `u32`: bits 0-1 are the
//! operation (0 count ports, 1 on, 2 off, 3 status), bits 2-12 the port id, bit 13 a
//! shutdown flag (accepted; an off is always immediate here). The answer is one byte:
//! the port count; for status 3 (on) or 4 (off); for on/off 1 (done); 5 for an unknown
//! port. Ports are numbered from 0.
//!
//! # farmsim.script
//!
//! Commands separated by `;`: `print <text>`, `sleep <ms>`, `poweroff`, `reboot`,
//! `panic`, `hang`, `echo_input`, `register` (see [`script::Step`]). Without one, the machine runs
//! [`script::DEFAULT_SCRIPT`].
//!
//! Also the fixtures several crates' tests share: [`ports`] (free ports below the
//! ephemeral range) and [`registry`] (a real `docker-registry` on loopback).

mod console;
mod machine;
pub mod ports;
pub mod registry;
pub mod script;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub use machine::mac_of;
use machine::{Env, Port};

/// How long a vpdu client may take to send its command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// vpdu operation: count the ports.
pub const OP_COUNT: u32 = 0;
/// vpdu operation: switch a port on.
pub const OP_ON: u32 = 1;
/// vpdu operation: switch a port off.
pub const OP_OFF: u32 = 2;
/// vpdu operation: the state of a port.
pub const OP_STATUS: u32 = 3;
/// vpdu command bit: graceful shutdown requested.
pub const SHUTDOWN_FLAG: u32 = 1 << 13;
/// vpdu reply: done.
pub const REPLY_ACK: u8 = 1;
/// vpdu reply: the port is on.
pub const REPLY_ON: u8 = 3;
/// vpdu reply: the port is off.
pub const REPLY_OFF: u8 = 4;
/// vpdu reply: error (unknown port).
pub const REPLY_ERROR: u8 = 5;

/// Encode a vpdu command.
pub fn vpdu_command(op: u32, port: u32, shutdown: bool) -> u32 {
    (op & 0b11) | ((port & 0x7ff) << 2) | if shutdown { SHUTDOWN_FLAG } else { 0 }
}

/// How a simulated machine behaves when switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Netboots from the gateway and runs its script.
    #[default]
    Healthy,
    /// Never prints anything.
    Dead,
    /// Prints its firmware lines but never fetches a boot script.
    NoNetboot,
    /// Boots, then prints `HARDWARE ERROR: simulated machine check` right after
    /// `Linux version`, then runs its script.
    Unfit,
    /// Every `fail_every`-th boot (counting all boots of the port) behaves as
    /// [`Behaviour::Dead`]; the others as [`Behaviour::Healthy`].
    Flaky {
        /// The period of the failures (0: never fails).
        fail_every: u32,
    },
}

impl FromStr for Behaviour {
    type Err = String;

    /// `healthy`, `dead`, `nonetboot`, `unfit` or `flaky:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "healthy" => Ok(Behaviour::Healthy),
            "dead" => Ok(Behaviour::Dead),
            "nonetboot" => Ok(Behaviour::NoNetboot),
            "unfit" => Ok(Behaviour::Unfit),
            other => match other.strip_prefix("flaky:") {
                Some(n) => n
                    .parse::<u32>()
                    .map(|fail_every| Behaviour::Flaky { fail_every })
                    .map_err(|_| format!("flaky:N wants a whole number, not `{n}`")),
                None => Err(format!(
                    "unknown behaviour `{s}` (healthy, dead, nonetboot, unfit or flaky:N)"
                )),
            },
        }
    }
}

/// How to build a [`SimFarm`].
#[derive(Debug, Clone)]
pub struct SimFarmConfig {
    /// Where the vpdu server listens (port 0: any free port, see [`SimFarm::addr`]).
    pub listen: SocketAddr,
    /// Number of PDU ports, hence of machines (ports `0..ports`; at most 2,048, the
    /// vpdu port field's range; the protocol's count answer is one byte, so a client asking
    /// a farm of more than 255 ports how many it has is told 255).
    pub ports: u32,
    /// Where the `ttySIM<port>` links to the console ptys are made.
    pub tty_dir: PathBuf,
    /// Base URL of the gateway, e.g. `http://127.0.0.1:8000`.
    pub gateway_url: String,
    /// Also download the kernel and initrds named by boot scripts.
    pub fetch_artifacts: bool,
    /// Pause between netboot attempts while the gateway does not answer 200.
    pub boot_retry: Duration,
    /// Behaviour per port; ports not listed are [`Behaviour::Healthy`].
    pub behaviours: BTreeMap<u32, Behaviour>,
}

impl Default for SimFarmConfig {
    fn default() -> Self {
        SimFarmConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ports: 4,
            tty_dir: std::env::temp_dir().join("farm-sim-tty"),
            gateway_url: "http://127.0.0.1:8000".into(),
            fetch_artifacts: false,
            boot_retry: Duration::from_secs(1),
            behaviours: BTreeMap::new(),
        }
    }
}

struct Shared {
    env: Arc<Env>,
    ports: BTreeMap<u32, Arc<Port>>,
}

impl Shared {
    fn port(&self, port: u32) -> anyhow::Result<&Arc<Port>> {
        self.ports
            .get(&port)
            .with_context(|| format!("the simulated farm has no port {port}"))
    }

    /// Run one vpdu command, returning its one-byte reply.
    fn command(&self, cmd: u32) -> u8 {
        let op = cmd & 0b11;
        let port_id = (cmd >> 2) & 0x7ff;
        if op == OP_COUNT {
            return u8::try_from(self.ports.len()).unwrap_or(u8::MAX);
        }
        let Some(port) = self.ports.get(&port_id) else {
            tracing::warn!("vpdu: command {cmd:#x} names unknown port {port_id}");
            return REPLY_ERROR;
        };
        match op {
            OP_ON => {
                port.set_power(&self.env, true);
                REPLY_ACK
            }
            OP_OFF => {
                port.set_power(&self.env, false);
                REPLY_ACK
            }
            _ => {
                if port.state().on {
                    REPLY_ON
                } else {
                    REPLY_OFF
                }
            }
        }
    }
}

/// A running simulated farm. Dropping it stops its machines and its server.
pub struct SimFarm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl SimFarm {
    /// Open the consoles, link them in `tty_dir`, and start the vpdu server. All ports
    /// start off.
    pub async fn start(config: SimFarmConfig) -> anyhow::Result<SimFarm> {
        if config.ports > 2048 {
            bail!(
                "a simulated farm has at most 2048 ports (the vpdu port field has 11 bits), not {}",
                config.ports
            );
        }
        if let Some(port) = config.behaviours.keys().find(|p| **p >= config.ports) {
            bail!(
                "a behaviour is given for port {port}, but the farm has ports 0..{}",
                config.ports
            );
        }
        std::fs::create_dir_all(&config.tty_dir)
            .with_context(|| format!("creating {}", config.tty_dir.display()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let env = Arc::new(Env {
            gateway_url: config.gateway_url.clone(),
            fetch_artifacts: config.fetch_artifacts,
            boot_retry: config.boot_retry,
            http,
        });
        let mut ports = BTreeMap::new();
        for id in 0..config.ports {
            let link = config.tty_dir.join(format!("ttySIM{id}"));
            let console = console::Console::open(&link)
                .with_context(|| format!("the console of port {id}"))?;
            let behaviour = config.behaviours.get(&id).copied().unwrap_or_default();
            ports.insert(id, Arc::new(Port::new(id, console, behaviour)));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("vpdu server: binding {}", config.listen))?;
        let addr = listener.local_addr().context("vpdu server address")?;
        let shared = Arc::new(Shared { env, ports });
        let mut tasks = Vec::new();
        for port in shared.ports.values() {
            let port = port.clone();
            tasks.push(tokio::spawn(async move { port.console.pump_input().await }));
        }
        tasks.push(tokio::spawn(serve(listener, shared.clone())));
        tracing::info!(
            "simulated farm: vpdu on {addr}, {} ports, consoles in {}",
            config.ports,
            config.tty_dir.display()
        );
        Ok(SimFarm {
            addr,
            shared,
            tasks: Mutex::new(tasks),
        })
    }

    /// The address the vpdu server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port ids, in order.
    pub fn ports(&self) -> Vec<u32> {
        self.shared.ports.keys().copied().collect()
    }

    fn port(&self, port: u32) -> Option<&Arc<Port>> {
        self.shared.ports.get(&port)
    }

    /// Change how the machine on `port` behaves from its next boot.
    pub fn set_behaviour(&self, port: u32, behaviour: Behaviour) {
        match self.port(port) {
            Some(p) => p.state().behaviour = behaviour,
            None => tracing::warn!("set_behaviour: the simulated farm has no port {port}"),
        }
    }

    /// Every on (`true`) and off (`false`) command received for `port`, in order.
    pub fn power_log(&self, port: u32) -> Vec<(Instant, bool)> {
        self.port(port)
            .map(|p| p.state().log.clone())
            .unwrap_or_default()
    }

    /// How many times the machine on `port` started booting (power-ons and reboots).
    pub fn boot_count(&self, port: u32) -> u32 {
        self.port(port).map(|p| p.state().boots).unwrap_or(0)
    }

    /// Whether `port` is switched on.
    pub fn state(&self, port: u32) -> bool {
        self.port(port).is_some_and(|p| p.state().on)
    }

    /// Switch `port` on or off directly, as a vpdu command would.
    pub fn set_power(&self, port: u32, on: bool) -> anyhow::Result<()> {
        self.shared.port(port)?.set_power(&self.shared.env, on);
        Ok(())
    }

    /// The `<tty_dir>/ttySIM<port>` link to the console of `port` (the pty slave).
    pub fn console_path(&self, port: u32) -> PathBuf {
        match self.port(port) {
            Some(p) => p.console.link().to_path_buf(),
            None => PathBuf::from(format!("/nonexistent/ttySIM{port}")),
        }
    }

    /// The MAC address (machine id) of the machine on `port`: `52:54:00:11:22:XX`.
    pub fn mac(&self, port: u32) -> String {
        mac_of(port)
    }

    /// Stop the server and every machine, and remove the console links. The ptys stay
    /// open until the farm is dropped.
    pub async fn shutdown(&self) {
        let tasks = self.stop();
        for task in tasks {
            let _ = task.await;
        }
        for port in self.shared.ports.values() {
            port.console.unlink();
        }
    }

    fn stop(&self) -> Vec<JoinHandle<()>> {
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in &tasks {
            task.abort();
        }
        for port in self.shared.ports.values() {
            port.halt();
        }
        tasks
    }
}

impl Drop for SimFarm {
    fn drop(&mut self) {
        self.stop();
        // The ptys close with the farm and the kernel hands their /dev/pts numbers to the
        // next ptys opened; a link left behind would lead whoever still scans it (a SALAD
        // that outlived its test) to another farm's console.
        for port in self.shared.ports.values() {
            port.console.unlink();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &shared).await {
                        tracing::warn!("vpdu: client {peer}: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("vpdu: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    let mut buf = [0u8; 4];
    tokio::time::timeout(COMMAND_TIMEOUT, stream.read_exact(&mut buf))
        .await
        .context("no command within 5 s")?
        .context("reading the 4-byte command")?;
    let cmd = u32::from_be_bytes(buf);
    let reply = shared.command(cmd);
    tracing::debug!("vpdu: command {cmd:#010x} -> {reply}");
    stream
        .write_all(&[reply])
        .await
        .context("writing the reply")?;
    stream.flush().await.context("flushing the reply")?;
    Ok(())
}
