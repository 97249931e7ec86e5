//! SNMP PDU drivers, on the project's own SNMP v1/v2c client ([`client`], [`ber`]).
//!
//! Drivers:
//! - `snmp`: generic; the outlets are rows of an integer table column: port `N` is
//!   `state_oid.N`, switched by writing `on_value`/`off_value` to `set_oid.N` and read back
//!   as `state_on_value`/`state_off_value`.
//! - `apc_masterswitch`: APC PowerNet-MIB `sPDUOutletCtl` (1.3.6.1.4.1.318.1.1.4.4.2.1.3),
//!   outletOn(1)/outletOff(2), read back from the same column; outlet count from
//!   `sPDUOutletControlTableSize.0`.
//! - `cyberpower`: CyberPower CPS-MIB ePDU: `ePDUOutletControlOutletCommand`
//!   (1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4) immediateOn(1)/immediateOff(2), read back from
//!   `ePDUOutletStatusOutletState` (…3.3.5.1.1.4) outletStatusOn(1)/outletStatusOff(2);
//!   outlet count from `ePDUIdentDeviceNumOutlets.0`; `measure` reads
//!   `ePDUOutletStatusActivePower` (W), `ePDUOutletStatusEnergy` (0.1 kWh) and
//!   `ePDUOutletStatusLoad` (0.1 A).
//!
//! Port ids are the outlet numbers, the last sub-identifier of the outlet's OIDs:
//! `port_base` to `port_base + count - 1` (`1`..`N` by default).

pub mod ber;
pub mod client;

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use farmgate_wire::PortState;

use crate::config::{Cfg, show};
use crate::{PduDriver, PortMeasure, PowerError};

pub use ber::{Oid, Value, Version};
pub use client::{SnmpClient, SnmpError};

/// How long `set` keeps reading the state back before it reports a mismatch.
pub const READBACK_WINDOW: Duration = Duration::from_secs(2);
/// Pause between two read-backs.
const READBACK_PAUSE: Duration = Duration::from_millis(200);
/// The most outlets a PDU may have here.
pub const MAX_OUTLETS: u32 = 1024;

/// APC PowerNet-MIB `sPDUOutletCtl`: write outletOn(1)/outletOff(2), reads 1 on, 2 off.
pub const APC_OUTLET_CTL: &str = "1.3.6.1.4.1.318.1.1.4.4.2.1.3";
/// APC PowerNet-MIB `sPDUOutletControlTableSize.0`: the number of outlets.
pub const APC_OUTLET_COUNT: &str = "1.3.6.1.4.1.318.1.1.4.4.1.0";
/// CyberPower CPS-MIB `ePDUOutletControlOutletCommand`: immediateOn(1)/immediateOff(2).
pub const CYBERPOWER_OUTLET_COMMAND: &str = "1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4";
/// CyberPower CPS-MIB `ePDUOutletStatusOutletState`: outletStatusOn(1)/outletStatusOff(2).
pub const CYBERPOWER_OUTLET_STATE: &str = "1.3.6.1.4.1.3808.1.1.3.3.5.1.1.4";
/// CyberPower CPS-MIB `ePDUOutletStatusLoad`: outlet current in tenths of amperes.
pub const CYBERPOWER_OUTLET_LOAD: &str = "1.3.6.1.4.1.3808.1.1.3.3.5.1.1.7";
/// CyberPower CPS-MIB `ePDUOutletStatusActivePower`: outlet power in watts.
pub const CYBERPOWER_OUTLET_POWER: &str = "1.3.6.1.4.1.3808.1.1.3.3.5.1.1.8";
/// CyberPower CPS-MIB `ePDUOutletStatusEnergy`: outlet energy in tenths of kWh.
pub const CYBERPOWER_OUTLET_ENERGY: &str = "1.3.6.1.4.1.3808.1.1.3.3.5.1.1.13";
/// CyberPower CPS-MIB `ePDUIdentDeviceNumOutlets.0`: the number of outlets.
pub const CYBERPOWER_OUTLET_COUNT: &str = "1.3.6.1.4.1.3808.1.1.3.1.8.0";

const COMMON_KEYS: &[&str] = &["hostname", "community", "version", "timeout", "retries"];

/// How the number of outlets is known.
#[derive(Debug, Clone)]
enum OutletCount {
    Fixed(u32),
    Oid(Oid),
}

/// A measured quantity: a base OID (port index appended) and the factor to SI units.
#[derive(Debug, Clone)]
struct Meter {
    oid: Oid,
    scale: f64,
}

/// An SNMP-switched PDU (drivers `snmp`, `apc_masterswitch`, `cyberpower`).
#[derive(Debug)]
pub struct SnmpDriver {
    driver: &'static str,
    pdu: String,
    client: SnmpClient,
    count: OutletCount,
    known_count: Mutex<Option<u32>>,
    state_oid: Oid,
    set_oid: Oid,
    on_value: i64,
    off_value: i64,
    state_on: i64,
    state_off: i64,
    port_base: u32,
    power: Option<Meter>,
    energy: Option<Meter>,
    current: Option<Meter>,
}

fn const_oid(s: &str) -> Oid {
    // The preset constants above are valid OIDs (a unit test checks); the fallback keeps
    // this panic-free.
    s.parse().unwrap_or_else(|_| Oid::from_known(vec![0, 0]))
}

fn oid_key(cfg: &Cfg<'_>, key: &str) -> Result<Option<Oid>, PowerError> {
    cfg.string(key)?
        .map(|s| s.parse::<Oid>().map_err(|e| cfg.err(key, e)))
        .transpose()
}

fn int_key(cfg: &Cfg<'_>, key: &str) -> Result<Option<i64>, PowerError> {
    Ok(cfg.uint(key, i32::MAX as u64)?.map(|n| n as i64))
}

fn float_key(cfg: &Cfg<'_>, key: &str) -> Result<Option<f64>, PowerError> {
    let Some(v) = cfg.get(key) else {
        return Ok(None);
    };
    let f = match (v.as_f64(), v.as_str()) {
        (Some(f), _) => Some(f),
        (None, Some(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match f {
        Some(f) if f.is_finite() => Ok(Some(f)),
        _ => Err(cfg.err(key, format!("expected a number, got {}", show(v)))),
    }
}

/// Reads the common keys into a client.
fn client_from_config(cfg: &Cfg<'_>) -> Result<SnmpClient, PowerError> {
    let hostname = cfg.string("hostname")?.ok_or_else(|| {
        cfg.err(
            "hostname",
            "missing: the PDU's host name or address (host or host:port)",
        )
    })?;
    let (host, port) = split_host_port(&hostname).map_err(|e| cfg.err("hostname", e))?;
    let community = cfg
        .string("community")?
        .unwrap_or_else(|| "private".to_string());
    let version = match cfg.get("version") {
        None => Version::V2c,
        Some(v) => {
            let text = match (v.as_u64(), v.as_str()) {
                (Some(n), _) => n.to_string(),
                (None, Some(s)) => s.trim().trim_start_matches(['v', 'V']).to_string(),
                _ => String::new(),
            };
            match text.as_str() {
                "1" => Version::V1,
                "2c" | "2" => Version::V2c,
                _ => {
                    return Err(cfg.err(
                        "version",
                        format!("expected \"1\" or \"2c\", got {}", show(v)),
                    ));
                }
            }
        }
    };
    let mut client = SnmpClient::new(
        host,
        port.unwrap_or(client::DEFAULT_PORT),
        community,
        version,
    );
    if let Some(t) = cfg.seconds("timeout")? {
        client = client.with_timeout(t);
    }
    if let Some(r) = cfg.uint("retries", 20)? {
        client = client.with_retries(r as u32);
    }
    Ok(client)
}

/// Splits `host`, `host:port` or `[v6]:port`.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty host name".to_string());
    }
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} is not a UDP port (1-65535)")),
        Ok(n) => Ok(n),
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ']'"))?;
        return match after {
            "" => Ok((host.to_string(), None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host.to_string(), Some(parse_port(p)?))),
                None => Err(format!("{s:?}: unexpected {after:?} after ']'")),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s.to_string(), None)),
        1 => {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            if h.is_empty() {
                return Err(format!("{s:?}: empty host name"));
            }
            Ok((h.to_string(), Some(parse_port(p)?)))
        }
        // A bare IPv6 address.
        _ => Ok((s.to_string(), None)),
    }
}

fn fixed_count(cfg: &Cfg<'_>) -> Result<Option<u32>, PowerError> {
    match cfg.uint("outlet_count", u64::from(MAX_OUTLETS))? {
        Some(0) => Err(cfg.err("outlet_count", "a PDU needs at least one outlet")),
        Some(n) => Ok(Some(n as u32)),
        None => Ok(None),
    }
}

impl SnmpDriver {
    /// The generic `snmp` driver. Keys: the common ones (`hostname`, `community`,
    /// `version`, `timeout`, `retries`), `outlet_count` or `outlet_count_oid`, `state_oid`,
    /// `set_oid`, `on_value`, `off_value`, `state_on_value`, `state_off_value`,
    /// `port_base`, `power_oid`, `power_scale`, `energy_oid`, `energy_scale`,
    /// `current_oid`, `current_scale`.
    pub(crate) fn generic_from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        let mut known = COMMON_KEYS.to_vec();
        known.extend([
            "outlet_count",
            "outlet_count_oid",
            "state_oid",
            "set_oid",
            "on_value",
            "off_value",
            "state_on_value",
            "state_off_value",
            "port_base",
            "power_oid",
            "power_scale",
            "energy_oid",
            "energy_scale",
            "current_oid",
            "current_scale",
        ]);
        cfg.only(&known)?;
        let client = client_from_config(cfg)?;
        let count = match (fixed_count(cfg)?, oid_key(cfg, "outlet_count_oid")?) {
            (Some(_), Some(_)) => {
                return Err(cfg.err(
                    "outlet_count_oid",
                    "give either outlet_count or outlet_count_oid, not both",
                ));
            }
            (Some(n), None) => OutletCount::Fixed(n),
            (None, Some(oid)) => OutletCount::Oid(oid),
            (None, None) => {
                return Err(cfg.err(
                    "outlet_count",
                    "missing: give outlet_count (a number) or outlet_count_oid",
                ));
            }
        };
        let state_oid = oid_key(cfg, "state_oid")?.ok_or_else(|| {
            cfg.err(
                "state_oid",
                "missing: the base OID of the outlet state column",
            )
        })?;
        let set_oid = oid_key(cfg, "set_oid")?.unwrap_or_else(|| state_oid.clone());
        let on_value = int_key(cfg, "on_value")?.ok_or_else(|| {
            cfg.err(
                "on_value",
                "missing: the integer written to switch an outlet on",
            )
        })?;
        let off_value = int_key(cfg, "off_value")?.ok_or_else(|| {
            cfg.err(
                "off_value",
                "missing: the integer written to switch an outlet off",
            )
        })?;
        if on_value == off_value {
            return Err(cfg.err("off_value", "must differ from on_value"));
        }
        let state_on = int_key(cfg, "state_on_value")?.unwrap_or(on_value);
        let state_off = int_key(cfg, "state_off_value")?.unwrap_or(off_value);
        if state_on == state_off {
            return Err(cfg.err("state_off_value", "must differ from state_on_value"));
        }
        let port_base = cfg
            .uint("port_base", u64::from(u32::MAX - MAX_OUTLETS))?
            .unwrap_or(1) as u32;
        let meter = |oid_key_name: &str, scale_key: &str| -> Result<Option<Meter>, PowerError> {
            let scale = float_key(cfg, scale_key)?;
            match oid_key(cfg, oid_key_name)? {
                Some(oid) => Ok(Some(Meter {
                    oid,
                    scale: scale.unwrap_or(1.0),
                })),
                None if scale.is_some() => {
                    Err(cfg.err(scale_key, format!("given without {oid_key_name}")))
                }
                None => Ok(None),
            }
        };
        Ok(SnmpDriver {
            driver: "snmp",
            pdu: cfg.pdu.to_string(),
            client,
            count,
            known_count: Mutex::new(None),
            state_oid,
            set_oid,
            on_value,
            off_value,
            state_on,
            state_off,
            port_base,
            power: meter("power_oid", "power_scale")?,
            energy: meter("energy_oid", "energy_scale")?,
            current: meter("current_oid", "current_scale")?,
        })
    }

    fn preset(
        cfg: &Cfg<'_>,
        driver: &'static str,
        count_oid: &str,
        set: &str,
        state: &str,
    ) -> Result<Self, PowerError> {
        let mut known = COMMON_KEYS.to_vec();
        known.push("outlet_count");
        cfg.only(&known)?;
        let client = client_from_config(cfg)?;
        let count = match fixed_count(cfg)? {
            Some(n) => OutletCount::Fixed(n),
            None => OutletCount::Oid(const_oid(count_oid)),
        };
        Ok(SnmpDriver {
            driver,
            pdu: cfg.pdu.to_string(),
            client,
            count,
            known_count: Mutex::new(None),
            state_oid: const_oid(state),
            set_oid: const_oid(set),
            on_value: 1,
            off_value: 2,
            state_on: 1,
            state_off: 2,
            port_base: 1,
            power: None,
            energy: None,
            current: None,
        })
    }

    /// The `apc_masterswitch` preset. Keys: the common ones and `outlet_count` (default:
    /// read from the PDU).
    pub(crate) fn apc_from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        Self::preset(
            cfg,
            "apc_masterswitch",
            APC_OUTLET_COUNT,
            APC_OUTLET_CTL,
            APC_OUTLET_CTL,
        )
    }

    /// The `cyberpower` preset. Keys: the common ones and `outlet_count` (default: read
    /// from the PDU).
    pub(crate) fn cyberpower_from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        let mut d = Self::preset(
            cfg,
            "cyberpower",
            CYBERPOWER_OUTLET_COUNT,
            CYBERPOWER_OUTLET_COMMAND,
            CYBERPOWER_OUTLET_STATE,
        )?;
        d.power = Some(Meter {
            oid: const_oid(CYBERPOWER_OUTLET_POWER),
            scale: 1.0,
        });
        d.energy = Some(Meter {
            oid: const_oid(CYBERPOWER_OUTLET_ENERGY),
            scale: 100.0,
        });
        d.current = Some(Meter {
            oid: const_oid(CYBERPOWER_OUTLET_LOAD),
            scale: 0.1,
        });
        Ok(d)
    }

    /// The SNMP client this driver talks through.
    pub fn client(&self) -> &SnmpClient {
        &self.client
    }

    fn map_err(&self, action: &str, oid: &str, e: SnmpError) -> PowerError {
        let addr = self.client.addr();
        let action = format!("{action} (OID {oid})");
        match e {
            SnmpError::Timeout {
                waited,
                ignored: None,
                ..
            } => PowerError::Timeout {
                pdu: self.pdu.clone(),
                addr,
                action,
                timeout: waited,
            },
            SnmpError::Io { stage, source } => PowerError::Io {
                pdu: self.pdu.clone(),
                addr,
                action,
                stage,
                source,
            },
            other => PowerError::Refused {
                pdu: self.pdu.clone(),
                addr,
                action,
                reason: other.to_string(),
            },
        }
    }

    fn refused(&self, action: &str, reason: String) -> PowerError {
        PowerError::Refused {
            pdu: self.pdu.clone(),
            addr: self.client.addr(),
            action: action.to_string(),
            reason,
        }
    }

    /// One GET of one OID; exceptions (noSuchObject…) are errors.
    async fn get_one(&self, oid: &Oid, action: &str) -> Result<Value, PowerError> {
        let mut binds = self
            .client
            .get(std::slice::from_ref(oid))
            .await
            .map_err(|e| self.map_err(action, &oid.to_string(), e))?;
        let value = binds.pop().map(|(_, v)| v).unwrap_or(Value::Null);
        if value.is_exception() {
            return Err(self.refused(
                action,
                format!("the agent has no object {oid} ({})", value.type_name()),
            ));
        }
        Ok(value)
    }

    async fn outlet_count(&self) -> Result<u32, PowerError> {
        let oid = match &self.count {
            OutletCount::Fixed(n) => return Ok(*n),
            OutletCount::Oid(oid) => oid,
        };
        if let Ok(guard) = self.known_count.lock()
            && let Some(n) = *guard
        {
            return Ok(n);
        }
        let action = "read the number of outlets";
        let value = self.get_one(oid, action).await?;
        let n = match value.as_i64() {
            Some(n) if (1..=i64::from(MAX_OUTLETS)).contains(&n) => n as u32,
            _ => {
                return Err(self.refused(
                    action,
                    format!("OID {oid} holds {} {value}, not an outlet count between 1 and {MAX_OUTLETS}", value.type_name()),
                ));
            }
        };
        if let Ok(mut guard) = self.known_count.lock() {
            *guard = Some(n);
        }
        Ok(n)
    }

    /// The outlet index of a port id, checked against the outlet count.
    async fn index(&self, port_id: &str) -> Result<u32, PowerError> {
        let count = self.outlet_count().await?;
        let last = u64::from(self.port_base) + u64::from(count) - 1;
        let bad = || PowerError::BadPort {
            pdu: self.pdu.clone(),
            port: port_id.to_string(),
            reason: format!("this PDU's ports are {} to {last}", self.port_base),
        };
        if port_id.is_empty() || port_id.len() > 10 || !port_id.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        match port_id.parse::<u64>() {
            Ok(n) if n >= u64::from(self.port_base) && n <= last => Ok(n as u32),
            _ => Err(bad()),
        }
    }

    fn port_oid(&self, base: &Oid, index: u32, action: &str) -> Result<Oid, PowerError> {
        base.child(index)
            .map_err(|e| self.refused(action, format!("cannot build the OID: {e}")))
    }

    async fn read_state(
        &self,
        port_id: &str,
        index: u32,
    ) -> Result<(PortState, Value), PowerError> {
        let action = format!("read the state of port {port_id}");
        let oid = self.port_oid(&self.state_oid, index, &action)?;
        let value = self.get_one(&oid, &action).await?;
        let state = match value.as_i64() {
            Some(n) if n == self.state_on => PortState::On,
            Some(n) if n == self.state_off => PortState::Off,
            Some(n) => {
                tracing::debug!(pdu = %self.pdu, port = port_id, value = n, "outlet state neither on nor off");
                PortState::Unknown
            }
            None => {
                return Err(self.refused(
                    &action,
                    format!(
                        "OID {oid} holds {} {value}, not an integer state",
                        value.type_name()
                    ),
                ));
            }
        };
        Ok((state, value))
    }

    async fn read_meter(
        &self,
        meter: &Option<Meter>,
        index: u32,
        port_id: &str,
    ) -> Result<Option<f64>, PowerError> {
        let Some(m) = meter else {
            return Ok(None);
        };
        let action = format!("measure port {port_id}");
        let oid = self.port_oid(&m.oid, index, &action)?;
        let value = match self.client.get(std::slice::from_ref(&oid)).await {
            Ok(mut binds) => binds.pop().map(|(_, v)| v).unwrap_or(Value::Null),
            // SNMPv1 agents say noSuchName for a column the device does not have.
            Err(SnmpError::Status { status: 2, .. }) => return Ok(None),
            Err(e) => return Err(self.map_err(&action, &oid.to_string(), e)),
        };
        if value.is_exception() {
            return Ok(None);
        }
        match value.as_f64() {
            Some(f) => Ok(Some(f * m.scale)),
            None => Err(self.refused(
                &action,
                format!(
                    "OID {oid} holds {} {value}, not a number",
                    value.type_name()
                ),
            )),
        }
    }
}

#[async_trait]
impl PduDriver for SnmpDriver {
    fn driver_name(&self) -> &str {
        self.driver
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        let count = self.outlet_count().await?;
        Ok((0..count)
            .map(|i| (u64::from(self.port_base) + u64::from(i)).to_string())
            .collect())
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        let index = self.index(port_id).await?;
        Ok(self.read_state(port_id, index).await?.0)
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        let value = match state {
            PortState::On => self.on_value,
            PortState::Off => self.off_value,
            PortState::Unknown => {
                return Err(PowerError::BadState {
                    pdu: self.pdu.clone(),
                    port: port_id.to_string(),
                    state,
                });
            }
        };
        let index = self.index(port_id).await?;
        let action = format!("switch port {port_id} {state}");
        let oid = self.port_oid(&self.set_oid, index, &action)?;
        self.client
            .set(&[(oid.clone(), Value::Integer(value))])
            .await
            .map_err(|e| self.map_err(&action, &oid.to_string(), e))?;
        let start = tokio::time::Instant::now();
        loop {
            let (seen, raw) = self.read_state(port_id, index).await?;
            if seen == state {
                return Ok(());
            }
            if start.elapsed() >= READBACK_WINDOW {
                let state_oid = self.port_oid(&self.state_oid, index, &action)?;
                return Err(self.refused(
                    &action,
                    format!(
                        "wrote {value} to {oid}, but port {port_id} reads back {seen} ({state_oid} = {raw}) \
                         instead of {state} after {:?}",
                        start.elapsed()
                    ),
                ));
            }
            tokio::time::sleep(READBACK_PAUSE).await;
        }
    }

    async fn measure(&self, port_id: &str) -> Result<Option<PortMeasure>, PowerError> {
        if self.power.is_none() && self.energy.is_none() && self.current.is_none() {
            return Ok(None);
        }
        let index = self.index(port_id).await?;
        Ok(Some(PortMeasure {
            power_w: self.read_meter(&self.power, index, port_id).await?,
            energy_wh: self.read_meter(&self.energy, index, port_id).await?,
            current_a: self.read_meter(&self.current, index, port_id).await?,
            voltage_v: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_oids_parse() {
        for s in [
            APC_OUTLET_CTL,
            APC_OUTLET_COUNT,
            CYBERPOWER_OUTLET_COMMAND,
            CYBERPOWER_OUTLET_STATE,
            CYBERPOWER_OUTLET_LOAD,
            CYBERPOWER_OUTLET_POWER,
            CYBERPOWER_OUTLET_ENERGY,
            CYBERPOWER_OUTLET_COUNT,
        ] {
            assert_eq!(const_oid(s).to_string(), s);
        }
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("pdu1"), Ok(("pdu1".to_string(), None)));
        assert_eq!(
            split_host_port("pdu1:1161"),
            Ok(("pdu1".to_string(), Some(1161)))
        );
        assert_eq!(
            split_host_port("[::1]:162"),
            Ok(("::1".to_string(), Some(162)))
        );
        assert_eq!(
            split_host_port("fe80::1"),
            Ok(("fe80::1".to_string(), None))
        );
        assert!(split_host_port("pdu1:0").is_err());
        assert!(split_host_port("pdu1:x").is_err());
        assert!(split_host_port("").is_err());
    }
}
