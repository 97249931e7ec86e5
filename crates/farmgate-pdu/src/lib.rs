//! PDU drivers and the power-cycle helper.
//!
//! A PDU (power distribution unit) switches the power of the test machines. The MaRS DB
//! describes each PDU with a driver name and a driver-specific `config` map;
//! [`driver_for`] turns such a record into a [`PduDriver`]. Drivers:
//!
//! - `vpdu`: CI-tron's virtual PDU TCP protocol ([`vpdu`]); config `hostname` (default
//!   `localhost`, may be `host:port`), `port` (default 9191), `timeout` (seconds, default 5).
//! - `dummy`: in-memory ports that forget their state between processes ([`dummy`]);
//!   config `ports` (count, default 16).
//! - `shell`: shell command templates ([`shell`]); config `on`, `off`, `status`, `ports`,
//!   `timeout`.
//! - `qemu`: a virtual PDU whose ports are QEMU machines that netboot like physical DUTs
//!   ([`qemu`]); config `ports`, `memory`, `cpus`, `disk_size`, `accel`, `network`, …
//! - `snmp`, `apc_masterswitch`, `cyberpower`: SNMP v1/v2c PDUs, generic and the APC
//!   PowerNet-MIB / CyberPower CPS-MIB presets ([`snmp`]); config `hostname`, `community`,
//!   `version`, `timeout`, `retries`, `outlet_count`, and for `snmp` the OIDs and values.
//! - `shelly`: Shelly relays over HTTP, generation 1 REST or 2+ RPC ([`shelly`]); config
//!   `hostname`, `generation`, `username`, `password`, `timeout`, `ports`.
//! - `tasmota`: Tasmota relays over HTTP `/cm?cmnd=` ([`tasmota`]); config `hostname`,
//!   `username`, `password`, `timeout`, `ports`.
//! - `serial_relay`: a USB serial power switch driven by one ASCII digit ([`serial_relay`]);
//!   config `device`, `baud`, `state_file`, `timeout`. The one driver that cannot read
//!   back: `get` returns the last state it wrote.
//!
//! Every network or process operation has a timeout, so a dead PDU never blocks forever.

mod command;
mod config;
mod docs;
pub mod dummy;
mod error;
pub mod qemu;
pub mod service;
pub mod shell;
// SNMP modules
pub mod snmp;
// HTTP and serial modules
pub mod serial_relay;
pub mod shelly;
pub mod tasmota;
pub mod vpdu;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use farmgate_wire::{PduRecord, PortState};

pub use docs::driver_docs;
pub use error::PowerError;

/// One PDU, able to list its ports and read and switch their power.
#[async_trait]
pub trait PduDriver: Send + Sync {
    /// The driver name as written in the MaRS DB (`vpdu`, `dummy`, `shell`).
    fn driver_name(&self) -> &str;
    /// The ids of the PDU's ports.
    async fn ports(&self) -> Result<Vec<String>, PowerError>;
    /// The power state of a port (`Unknown` when the driver cannot read it back).
    async fn get(&self, port_id: &str) -> Result<PortState, PowerError>;
    /// Switches a port on or off (`Unknown` is refused).
    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError>;
    /// What the PDU measures on a port (power, energy…), for the devices that can;
    /// `Ok(None)` when this driver or this device measures nothing.
    async fn measure(&self, _port_id: &str) -> Result<Option<PortMeasure>, PowerError> {
        Ok(None)
    }
}

pub use farmgate_wire::PortMeasure;

const DRIVER_NAMES: &[&str] = &[
    "vpdu",
    "dummy",
    "shell",
    "qemu",
    // SNMP drivers
    "snmp",
    "apc_masterswitch",
    "cyberpower",
    // HTTP and serial drivers
    "shelly",
    "tasmota",
    "serial_relay",
];

/// The names of the drivers this build knows.
pub fn driver_names() -> &'static [&'static str] {
    DRIVER_NAMES
}

/// Builds the driver of the PDU `pdu_name` from its MaRS DB record.
///
/// An unknown driver or a bad configuration is an error naming the PDU, the driver and the
/// offending configuration key. Nothing is contacted here: a PDU that is down only fails
/// when it is used.
pub fn driver_for(pdu_name: &str, record: &PduRecord) -> Result<Box<dyn PduDriver>, PowerError> {
    let cfg = config::Cfg::new(pdu_name, &record.driver, &record.config);
    Ok(match record.driver.as_str() {
        "vpdu" => Box::new(vpdu::VpduDriver::from_config(&cfg)?),
        "dummy" => Box::new(dummy::DummyDriver::from_config(&cfg)?),
        "shell" => Box::new(shell::ShellDriver::from_config(&cfg)?),
        "qemu" => Box::new(qemu::QemuDriver::from_config(&cfg)?),
        // SNMP drivers
        "snmp" => Box::new(snmp::SnmpDriver::generic_from_config(&cfg)?),
        "apc_masterswitch" => Box::new(snmp::SnmpDriver::apc_from_config(&cfg)?),
        "cyberpower" => Box::new(snmp::SnmpDriver::cyberpower_from_config(&cfg)?),
        // HTTP and serial drivers
        "shelly" => Box::new(shelly::ShellyDriver::from_config(&cfg)?),
        "tasmota" => Box::new(tasmota::TasmotaDriver::from_config(&cfg)?),
        "serial_relay" => Box::new(serial_relay::SerialRelayDriver::from_config(&cfg)?),
        other => {
            return Err(PowerError::UnknownDriver {
                pdu: pdu_name.to_string(),
                driver: other.to_string(),
                known: DRIVER_NAMES.join(", "),
            });
        }
    })
}

/// Power-cycles a port: switches it off (unless `already_off_since` says it has been off
/// since then), waits until it has been off for at least `min_off`, then switches it on.
///
/// `already_off_since` must only be given when the port is known to be off; the time it
/// has been off already counts towards `min_off`.
pub async fn power_cycle(
    driver: &dyn PduDriver,
    port_id: &str,
    min_off: Duration,
    already_off_since: Option<Instant>,
) -> Result<(), PowerError> {
    power_off_for(driver, port_id, min_off, already_off_since).await?;
    driver.set(port_id, PortState::On).await
}

/// The first half of [`power_cycle`]: the port is off and has been for at least
/// `min_off` when this returns, ready to be switched on. For callers that have
/// something to do between the two halves (a job runner forgets the console output of
/// the previous boot there).
pub async fn power_off_for(
    driver: &dyn PduDriver,
    port_id: &str,
    min_off: Duration,
    already_off_since: Option<Instant>,
) -> Result<(), PowerError> {
    let off_since = match already_off_since {
        Some(since) => since,
        None => {
            driver.set(port_id, PortState::Off).await?;
            Instant::now()
        }
    };
    let remaining = min_off.saturating_sub(off_since.elapsed());
    if !remaining.is_zero() {
        tracing::debug!(
            port = port_id,
            ?remaining,
            "waiting for the minimum off time"
        );
        tokio::time::sleep(remaining).await;
    }
    Ok(())
}
