//! Tasmota relays over Tasmota's HTTP command interface `GET /cm?cmnd=<command>`.
//!
//! - `Power<N> On|Off` switches relay `N` and answers its new state, `{"POWER<N>":"ON"}`
//!   (or `{"POWER":"ON"}` on single-relay devices); `Power<N>` alone reads it.
//! - `Status 11` lists the relays (the `POWER…` keys of `StatusSTS`).
//! - `Status 8` gives the energy meter, `StatusSNS.ENERGY`: `Power` (W), `Total` (kWh,
//!   reported here in Wh), `Voltage` (V), `Current` (A). Devices with one meter per relay
//!   answer lists, indexed by relay; a single value is the device's one meter and is
//!   reported for every port.
//! - Credentials go in the query as `user` and `password` (Tasmota's web password); they
//!   never appear in messages.
//!
//! Config: `hostname` (`host` or `host:port`; required), `username` (default `admin`, the
//! only user Tasmota has), `password`, `timeout` (seconds per HTTP request, default 5),
//! `ports` (relay count; asked from the device when absent). Port ids are `1`..`N`, as
//! Tasmota numbers its relays.
//!
//! `set` returns only once the device reports the requested state (see
//! [`crate::shelly::READBACK_TIME`]).

use async_trait::async_trait;
use farmgate_wire::PortState;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::config::Cfg;
use crate::shelly::{Auth, Http, confirm, excerpt, parse_index};
use crate::{PduDriver, PortMeasure, PowerError};

/// Most relays a Tasmota device has.
pub const MAX_RELAYS: u64 = 32;

/// A Tasmota device.
#[derive(Debug)]
pub struct TasmotaDriver {
    http: Http,
    /// `user=…&password=…`, empty without credentials.
    secret_query: String,
    ports: Option<u64>,
}

/// Value of a `POWER` key.
fn parse_power(v: &Value) -> Option<PortState> {
    match v.as_str()?.to_ascii_uppercase().as_str() {
        "ON" | "1" => Some(PortState::On),
        "OFF" | "0" => Some(PortState::Off),
        _ => None,
    }
}

impl TasmotaDriver {
    /// Reads `hostname`, `username`, `password`, `timeout` and `ports`.
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&["hostname", "username", "password", "timeout", "ports"])?;
        let http = Http::from_config(cfg)?;
        let username = cfg.string("username")?;
        let password = cfg.string("password")?;
        let secret_query = match (username, password) {
            (None, None) => String::new(),
            (Some(_), None) => return Err(cfg.err("password", "missing while username is set")),
            (user, Some(p)) => {
                let user = user.unwrap_or_else(|| "admin".to_string());
                format!(
                    "user={}&password={}",
                    utf8_percent_encode(&user, NON_ALPHANUMERIC),
                    utf8_percent_encode(&p, NON_ALPHANUMERIC)
                )
            }
        };
        let ports = cfg.uint("ports", MAX_RELAYS)?;
        Ok(TasmotaDriver {
            http,
            secret_query,
            ports,
        })
    }

    fn path(command: &str) -> String {
        format!(
            "/cm?cmnd={}",
            utf8_percent_encode(command, NON_ALPHANUMERIC)
        )
    }

    /// Runs one command and returns its JSON answer, refusing Tasmota's error answers.
    async fn command(&self, command: &str, action: &str) -> Result<(String, Value), PowerError> {
        let path = Self::path(command);
        let v = self
            .http
            .get_json(&path, &self.secret_query, &Auth::None, action)
            .await?;
        if let Some(w) = v.get("WARNING") {
            return Err(self.http.refused(
                &path,
                action,
                format!("the device refused: {w} (check the username and password)"),
            ));
        }
        if v.get("Command").and_then(Value::as_str) == Some("Unknown") {
            return Err(self.http.refused(
                &path,
                action,
                format!("the device does not know the command {command:?}"),
            ));
        }
        if !v.is_object() {
            return Err(self.http.refused(
                &path,
                action,
                format!("the answer is not an object: {}", excerpt(&v.to_string())),
            ));
        }
        Ok((path, v))
    }

    /// The relay state in a `Power<N>` answer.
    fn state_in(
        &self,
        path: &str,
        action: &str,
        n: u64,
        v: &Value,
    ) -> Result<PortState, PowerError> {
        let key = format!("POWER{n}");
        let value = v
            .get(&key)
            .or_else(|| if n == 1 { v.get("POWER") } else { None });
        match value {
            Some(s) => parse_power(s).ok_or_else(|| {
                self.http
                    .refused(path, action, format!("unexpected {key} value {s}"))
            }),
            None => Err(self.http.refused(
                path,
                action,
                format!("no {key} in the answer {}", excerpt(&v.to_string())),
            )),
        }
    }

    fn index(&self, port_id: &str) -> Result<u64, PowerError> {
        parse_index(&self.http.pdu, port_id, 1, self.ports, MAX_RELAYS)
    }

    async fn read(&self, n: u64, port_id: &str) -> Result<PortState, PowerError> {
        let action = format!("read the state of port {port_id}");
        let (path, v) = self.command(&format!("Power{n}"), &action).await?;
        self.state_in(&path, &action, n, &v)
    }
}

/// Entry `n` (1-based) of a per-relay list, or the single value.
fn channel(energy: &Value, key: &str, n: u64) -> Option<f64> {
    match energy.get(key)? {
        Value::Array(list) => list.get(usize::try_from(n - 1).ok()?)?.as_f64(),
        v => v.as_f64(),
    }
}

#[async_trait]
impl PduDriver for TasmotaDriver {
    fn driver_name(&self) -> &str {
        "tasmota"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        if let Some(n) = self.ports {
            return Ok((1..=n).map(|i| i.to_string()).collect());
        }
        let action = "list the relays";
        let (path, v) = self.command("Status 11", action).await?;
        let Some(sts) = v.get("StatusSTS").and_then(Value::as_object) else {
            return Err(self.http.refused(
                &path,
                action,
                format!(
                    "no StatusSTS object in the answer {}",
                    excerpt(&v.to_string())
                ),
            ));
        };
        let mut count = 0u64;
        for key in sts.keys() {
            if let Some(rest) = key.strip_prefix("POWER") {
                if rest.is_empty() {
                    count = count.max(1);
                } else if let Ok(n) = rest.parse::<u64>() {
                    count = count.max(n.min(MAX_RELAYS));
                }
            }
        }
        Ok((1..=count).map(|i| i.to_string()).collect())
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        let n = self.index(port_id)?;
        self.read(n, port_id).await
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        let n = self.index(port_id)?;
        let word = match state {
            PortState::On => "On",
            PortState::Off => "Off",
            PortState::Unknown => {
                return Err(PowerError::BadState {
                    pdu: self.http.pdu.clone(),
                    port: port_id.to_string(),
                    state,
                });
            }
        };
        let action = format!("switch port {port_id} {state}");
        let (path, v) = self.command(&format!("Power{n} {word}"), &action).await?;
        let first = self.state_in(&path, &action, n, &v)?;
        confirm(&self.http, &path, port_id, state, Some(first), || {
            self.read(n, port_id)
        })
        .await
    }

    async fn measure(&self, port_id: &str) -> Result<Option<PortMeasure>, PowerError> {
        let n = self.index(port_id)?;
        let action = format!("read the meter of port {port_id}");
        let (_, v) = self.command("Status 8", &action).await?;
        let Some(energy) = v.pointer("/StatusSNS/ENERGY") else {
            return Ok(None);
        };
        let m = PortMeasure {
            power_w: channel(energy, "Power", n),
            energy_wh: channel(energy, "Total", n).map(|kwh| kwh * 1000.0),
            current_a: channel(energy, "Current", n),
            voltage_v: channel(energy, "Voltage", n),
        };
        Ok((m != PortMeasure::default()).then_some(m))
    }
}
