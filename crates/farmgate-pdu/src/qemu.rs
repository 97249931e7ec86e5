//! The `qemu` driver: each port of this virtual PDU powers one QEMU machine.
//!
//! Switching a port on starts `qemu-system-x86_64` daemonized (`-daemonize -pidfile`), so
//! the machine keeps running after the process that switched it on (a job runner) exits,
//! exactly like a physical machine stays powered. Switching it off kills that QEMU. The
//! state is read back from the pid file: the port is on while the process it names is
//! alive *and* is the QEMU started for this port (its command line names the pid file),
//! so a recycled pid never reads as on and is never killed.
//!
//! The machine netboots through the iPXE ROM of its NIC (Debian's `ipxe-qemu`), with the
//! MAC `52:54:00:11:22:<port as two hex digits>` (CI-tron's vpdu convention), and its
//! first serial port connects to SALAD's network console port as a TCP client, the way a
//! serial adapter is plugged into the gateway. The kernel command line farmgate serves
//! carries `SALAD.machine_id=<mac>`, which binds that console to the machine.
//!
//! Config keys (all optional):
//! - `ports`: number of machines, ports `0`..`n-1` (default 4, at most 256).
//! - `memory` (MiB, default 512), `cpus` (default 1), `disk_size` (e.g. `2G`; a qcow2
//!   disk per port is created with `qemu-img` on first use; default: no disk).
//! - `accel`: `tcg` (default), `kvm`, or `auto` (KVM when `/dev/kvm` opens and a KVM
//!   start works, TCG otherwise).
//! - `network`: `user` (default) or `tap`.
//!   - `user`: QEMU's user-mode network `net` (default `10.42.0.0/24`) where the gateway
//!     host is `host` (default `10.42.0.1`: connections to it reach the host's
//!     loopback); its built-in DHCP hands iPXE `boot_url` (default
//!     `<EXECUTOR_URL>/api/v1/dut/{mac}/boot.ipxe`, or `http://<host>:<EXECUTOR_PORT>/…`
//!     without `EXECUTOR_URL`; `{mac}` replaced). No privileges needed; nothing leaves
//!     the machine.
//!   - `tap`: the NIC is a tap device named after `tap_name` (default `fgtap{port}`),
//!     added to bridge `bridge` when given; the gateway's own DHCP/TFTP/HTTP serve it
//!     like a physical machine. Needs root (or CAP_NET_ADMIN).
//! - `nic_model`: default `virtio-net-pci`.
//! - `console`: `host:port` of SALAD's network console listener (default
//!   `127.0.0.1:<SALAD_TCPCONSOLE_PORT or 8100>`).
//! - `state_dir`: where pid files, logs and disks live (default
//!   `<FARMGATE_STATE_DIR or /var/lib/farmgate>/qemu/<pdu name>`).
//! - `qemu`: the QEMU binary (default `qemu-system-x86_64`); `extra_args`: list of extra
//!   arguments; `timeout` (seconds, default 20) bounds starting and stopping.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use farmgate_wire::PortState;
use tokio::process::Command;

use crate::config::{Cfg, show};
use crate::{PduDriver, PowerError};

/// Default time a QEMU start or stop may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest number of ports (the MAC has one byte for the port).
pub const MAX_PORTS: u64 = 256;

/// How the machine's NIC is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// QEMU user-mode networking with its built-in DHCP pointing iPXE at `boot_url`.
    User {
        /// Guest network, e.g. `10.42.0.0/24`.
        net: String,
        /// The gateway host's address inside that network.
        host: String,
        /// Boot script URL template (`{mac}` replaced).
        boot_url: String,
    },
    /// A tap device per port, optionally added to a bridge.
    Tap {
        /// Tap name template (`{port}` replaced).
        tap_name: String,
        /// Bridge to add the tap to.
        bridge: Option<String>,
    },
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation; works everywhere.
    Tcg,
    /// Hardware virtualisation.
    Kvm,
    /// KVM when it works, TCG otherwise.
    Auto,
}

/// A virtual PDU whose ports are QEMU machines.
#[derive(Debug)]
pub struct QemuDriver {
    pdu: String,
    ports: u64,
    memory_mib: u64,
    cpus: u64,
    disk_size: Option<String>,
    accel: Accel,
    network: Network,
    nic_model: String,
    console: String,
    state_dir: PathBuf,
    qemu: String,
    extra_args: Vec<String>,
    timeout: Duration,
}

/// The MAC address of the machine on `port` (CI-tron's vpdu convention).
pub fn mac_of(port: u64) -> String {
    format!("52:54:00:11:22:{:02x}", port & 0xff)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

impl QemuDriver {
    /// Reads the configuration (see the module documentation).
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&[
            "ports",
            "memory",
            "cpus",
            "disk_size",
            "accel",
            "network",
            "net",
            "host",
            "boot_url",
            "tap_name",
            "bridge",
            "nic_model",
            "console",
            "state_dir",
            "qemu",
            "extra_args",
            "timeout",
        ])?;
        let ports = cfg.uint("ports", MAX_PORTS)?.unwrap_or(4);
        let memory_mib = cfg.uint("memory", 1 << 20)?.unwrap_or(512);
        if memory_mib < 64 {
            return Err(cfg.err("memory", format!("{memory_mib} MiB is too little to boot")));
        }
        let cpus = cfg.uint("cpus", 256)?.unwrap_or(1).max(1);
        let plain = |key: &str, value: &str| -> Result<(), PowerError> {
            if value.is_empty() || value.chars().any(|c| c == ',' || c.is_whitespace()) {
                Err(cfg.err(
                    key,
                    format!("{value:?} must be non-empty, without commas or spaces"),
                ))
            } else {
                Ok(())
            }
        };
        let disk_size = cfg.string("disk_size")?;
        if let Some(d) = &disk_size {
            plain("disk_size", d)?;
        }
        let accel = match cfg.string("accel")?.as_deref() {
            None | Some("tcg") => Accel::Tcg,
            Some("kvm") => Accel::Kvm,
            Some("auto") => Accel::Auto,
            Some(other) => {
                return Err(cfg.err("accel", format!("{other:?}: use tcg, kvm or auto")));
            }
        };
        let network = match cfg.string("network")?.as_deref() {
            None | Some("user") => {
                let net = cfg.string("net")?.unwrap_or_else(|| "10.42.0.0/24".into());
                let host = cfg.string("host")?.unwrap_or_else(|| "10.42.0.1".into());
                plain("net", &net)?;
                plain("host", &host)?;
                let boot_url = cfg.string("boot_url")?.unwrap_or_else(|| {
                    let base = env_or(
                        "EXECUTOR_URL",
                        &format!("http://{host}:{}", env_or("EXECUTOR_PORT", "80")),
                    );
                    format!(
                        "{}/api/v1/dut/{{mac}}/boot.ipxe",
                        base.trim_end_matches('/')
                    )
                });
                plain("boot_url", &boot_url)?;
                Network::User {
                    net,
                    host,
                    boot_url,
                }
            }
            Some("tap") => {
                let tap_name = cfg
                    .string("tap_name")?
                    .unwrap_or_else(|| "fgtap{port}".into());
                plain("tap_name", &tap_name)?;
                let bridge = cfg.string("bridge")?;
                if let Some(b) = &bridge {
                    plain("bridge", b)?;
                }
                Network::Tap { tap_name, bridge }
            }
            Some(other) => {
                return Err(cfg.err("network", format!("{other:?}: use user or tap")));
            }
        };
        let nic_model = cfg
            .string("nic_model")?
            .unwrap_or_else(|| "virtio-net-pci".into());
        plain("nic_model", &nic_model)?;
        let console = cfg
            .string("console")?
            .unwrap_or_else(|| format!("127.0.0.1:{}", env_or("SALAD_TCPCONSOLE_PORT", "8100")));
        if console
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(cfg.err("console", format!("{console:?} is not host:port")));
        }
        plain("console", &console)?;
        let state_dir = match cfg.string("state_dir")? {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(env_or("FARMGATE_STATE_DIR", "/var/lib/farmgate"))
                .join("qemu")
                .join(cfg.pdu),
        };
        let extra_args = match cfg.get("extra_args") {
            None => Vec::new(),
            Some(v) => match v.as_sequence() {
                Some(seq) => seq
                    .iter()
                    .map(|item| {
                        item.as_str().map(String::from).ok_or_else(|| {
                            cfg.err(
                                "extra_args",
                                format!("expected strings, got {}", show(item)),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
                None => {
                    return Err(cfg.err(
                        "extra_args",
                        format!("expected a list of strings, got {}", show(v)),
                    ));
                }
            },
        };
        Ok(QemuDriver {
            pdu: cfg.pdu.to_string(),
            ports,
            memory_mib,
            cpus,
            disk_size,
            accel,
            network,
            nic_model,
            console,
            state_dir,
            qemu: cfg
                .string("qemu")?
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            extra_args,
            timeout: cfg.seconds("timeout")?.unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    fn port_number(&self, port_id: &str) -> Result<u64, PowerError> {
        let bad = |reason: String| PowerError::BadPort {
            pdu: self.pdu.clone(),
            port: port_id.to_string(),
            reason,
        };
        let n: u64 = port_id
            .parse()
            .map_err(|_| bad("qemu PDU ports are numbers".into()))?;
        if n >= self.ports {
            return Err(bad(format!(
                "this PDU has ports 0 to {}",
                self.ports.saturating_sub(1)
            )));
        }
        Ok(n)
    }

    fn pid_file(&self, port: u64) -> PathBuf {
        self.state_dir.join(format!("port-{port}.pid"))
    }

    fn fail(&self, action: &str, command: &str, reason: String) -> PowerError {
        PowerError::Command {
            pdu: self.pdu.clone(),
            action: action.to_string(),
            command: command.to_string(),
            reason,
        }
    }

    /// The QEMU process running for `port`, if any.
    fn running_pid(&self, port: u64) -> Option<i32> {
        let pid_file = self.pid_file(port);
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if pid <= 1 {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = pid_file.to_string_lossy();
        let matches = cmdline.split(|b| *b == 0).any(|arg| arg == ours.as_bytes());
        // A zombie still has its cmdline empty; it is off.
        matches.then_some(pid)
    }

    /// The command line that starts the machine of `port`.
    pub fn command_line(&self, port: u64, kvm: bool) -> Vec<String> {
        let mac = mac_of(port);
        let dir = &self.state_dir;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("{}-port-{port},process=farmgate-qemu-{port}", self.pdu),
            "-accel".into(),
            if kvm { "kvm" } else { "tcg" }.into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-vga".into(),
            "none".into(),
            "-no-user-config".into(),
            "-boot".into(),
            "order=n,strict=on".into(),
            "-chardev".into(),
            {
                let (host, port_s) = self
                    .console
                    .rsplit_once(':')
                    .unwrap_or(("127.0.0.1", "8100"));
                format!("socket,id=salad,host={host},port={port_s},server=off,reconnect=1")
            },
            "-serial".into(),
            "chardev:salad".into(),
            "-monitor".into(),
            format!(
                "unix:{},server=on,wait=off",
                dir.join(format!("port-{port}.monitor")).display()
            ),
            "-D".into(),
            dir.join(format!("port-{port}.log")).display().to_string(),
        ];
        match &self.network {
            Network::User {
                net,
                host,
                boot_url,
            } => {
                args.push("-netdev".into());
                args.push(format!(
                    "user,id=n0,net={net},host={host},bootfile={}",
                    boot_url.replace("{mac}", &mac)
                ));
            }
            Network::Tap { tap_name, .. } => {
                args.push("-netdev".into());
                args.push(format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    tap_name.replace("{port}", &port.to_string())
                ));
            }
        }
        args.push("-device".into());
        args.push(format!("{},netdev=n0,mac={mac}", self.nic_model));
        if self.disk_size.is_some() {
            args.push("-drive".into());
            args.push(format!(
                "file={},if=virtio,format=qcow2",
                dir.join(format!("port-{port}.qcow2")).display()
            ));
        }
        args.push("-daemonize".into());
        args.push("-pidfile".into());
        args.push(self.pid_file(port).display().to_string());
        args.extend(self.extra_args.iter().cloned());
        args
    }

    async fn run(&self, program: &str, args: &[String], action: &str) -> Result<(), PowerError> {
        let shown = format!("{program} {}", args.join(" "));
        let mut cmd = Command::new(program);
        cmd.args(args);
        crate::command::run_bounded(&self.pdu, cmd, &shown, action, self.timeout)
            .await
            .map(|_| ())
    }

    fn kvm_usable(&self) -> bool {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    }

    async fn power_on(&self, port: u64) -> Result<(), PowerError> {
        let action = format!("switch port {port} on");
        if self.running_pid(port).is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.state_dir).map_err(|e| {
            self.fail(
                &action,
                "mkdir",
                format!("cannot create {}: {e}", self.state_dir.display()),
            )
        })?;
        if let Some(size) = &self.disk_size {
            let disk = self.state_dir.join(format!("port-{port}.qcow2"));
            if !disk.exists() {
                let args = vec![
                    "create".to_string(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    disk.display().to_string(),
                    size.clone(),
                ];
                self.run("qemu-img", &args, &action).await?;
            }
        }
        let kvm = match self.accel {
            Accel::Tcg => false,
            Accel::Kvm => true,
            Accel::Auto => self.kvm_usable(),
        };
        let started = self
            .run(&self.qemu, &self.command_line(port, kvm), &action)
            .await;
        match started {
            Err(e) if kvm && self.accel == Accel::Auto => {
                tracing::warn!(pdu = %self.pdu, port, error = %e, "KVM start failed, using TCG");
                self.run(&self.qemu, &self.command_line(port, false), &action)
                    .await?;
            }
            other => other?,
        }
        if let Network::Tap {
            tap_name,
            bridge: Some(bridge),
        } = &self.network
        {
            let tap = tap_name.replace("{port}", &port.to_string());
            let args: Vec<String> = ["link", "set", &tap, "master", bridge, "up"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            if let Err(e) = self.run("ip", &args, &action).await {
                let _ = self.power_off(port).await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn power_off(&self, port: u64) -> Result<(), PowerError> {
        let action = format!("switch port {port} off");
        let Some(pid) = self.running_pid(port) else {
            let _ = std::fs::remove_file(self.pid_file(port));
            return Ok(());
        };
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        ) && e != nix::errno::Errno::ESRCH
        {
            return Err(self.fail(&action, &format!("kill -KILL {pid}"), e.to_string()));
        }
        let deadline = Instant::now() + self.timeout;
        while self.running_pid(port).is_some() || process_alive(pid) {
            if Instant::now() > deadline {
                return Err(PowerError::Timeout {
                    pdu: self.pdu.clone(),
                    addr: format!("QEMU pid {pid}"),
                    action,
                    timeout: self.timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(self.pid_file(port));
        Ok(())
    }

    /// Where this PDU keeps its pid files, logs and disks.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

/// Whether `pid` is a live process (not a zombie).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state is the field after the command name in parentheses.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(
                state.and_then(|s| s.chars().next()),
                Some('Z') | Some('X') | None
            )
        }
    }
}

#[async_trait]
impl PduDriver for QemuDriver {
    fn driver_name(&self) -> &str {
        "qemu"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        Ok((0..self.ports).map(|p| p.to_string()).collect())
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        let port = self.port_number(port_id)?;
        Ok(if self.running_pid(port).is_some() {
            PortState::On
        } else {
            PortState::Off
        })
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        let port = self.port_number(port_id)?;
        match state {
            PortState::On => self.power_on(port).await,
            PortState::Off => self.power_off(port).await,
            PortState::Unknown => Err(PowerError::BadState {
                pdu: self.pdu.clone(),
                port: port_id.to_string(),
                state,
            }),
        }
    }
}
