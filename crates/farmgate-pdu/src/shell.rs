//! The `shell` driver: ports switched by running shell commands.
//!
//! Config keys: `on` and `off` (required) and `status` (optional) are command templates in
//! which `{port}` is replaced by the port id; they run with `sh -c`, with the environment
//! variables `FARMGATE_PDU` and `FARMGATE_PDU_PORT` set too. `status` prints `on` or `off`
//! (case-insensitive, surrounding blanks ignored); anything else means `Unknown`, and without
//! a `status` command every port reads `Unknown`. `ports` (optional) is a port count (ports
//! `0`..`n-1`) or a list of port ids; when given, other ports are refused. `timeout`
//! (seconds, default 10) bounds every command. A command that exits non-zero is an error.
//!
//! Port ids must match `[A-Za-z0-9_.-]+`, so substituting them cannot inject shell syntax.

use std::time::Duration;

use async_trait::async_trait;
use farmgate_wire::PortState;
use tokio::process::Command;

use crate::config::{Cfg, show};
use crate::{PduDriver, PowerError};

/// Default time a shell command may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A PDU driven by shell commands.
#[derive(Debug)]
pub struct ShellDriver {
    pdu: String,
    on: String,
    off: String,
    status: Option<String>,
    ports: Option<Vec<String>>,
    timeout: Duration,
}

/// Whether `s` is a plain token that is safe to paste into a shell command.
pub fn is_plain_port_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl ShellDriver {
    /// Reads `on`, `off`, `status`, `ports` and `timeout`.
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&["on", "off", "status", "ports", "timeout"])?;
        let template = |key: &str, required: bool| -> Result<Option<String>, PowerError> {
            match cfg.string(key)? {
                Some(s) if s.trim().is_empty() => Err(cfg.err(key, "empty command")),
                Some(s) => Ok(Some(s)),
                None if required => {
                    Err(cfg.err(key, "missing (a shell command, {port} is the port id)"))
                }
                None => Ok(None),
            }
        };
        let on = template("on", true)?.unwrap_or_default();
        let off = template("off", true)?.unwrap_or_default();
        let status = template("status", false)?;
        let ports = match cfg.get("ports") {
            None => None,
            Some(v) => match v.as_sequence() {
                Some(seq) => {
                    let mut ids = Vec::with_capacity(seq.len());
                    for item in seq {
                        let id = match (item.as_str(), item.as_u64()) {
                            (Some(s), _) => s.to_string(),
                            (None, Some(n)) => n.to_string(),
                            _ => {
                                return Err(cfg.err(
                                    "ports",
                                    format!("expected port ids, got {}", show(item)),
                                ));
                            }
                        };
                        if !is_plain_port_id(&id) {
                            return Err(cfg.err(
                                "ports",
                                format!("port id {id:?} is not made of [A-Za-z0-9_.-]"),
                            ));
                        }
                        ids.push(id);
                    }
                    Some(ids)
                }
                None => {
                    let n = cfg.uint("ports", 65_536)?.unwrap_or(0);
                    Some((0..n).map(|i| i.to_string()).collect())
                }
            },
        };
        Ok(ShellDriver {
            pdu: cfg.pdu.to_string(),
            on,
            off,
            status,
            ports,
            timeout: cfg.seconds("timeout")?.unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    fn check(&self, port_id: &str) -> Result<(), PowerError> {
        let bad = |reason: String| PowerError::BadPort {
            pdu: self.pdu.clone(),
            port: port_id.to_string(),
            reason,
        };
        if !is_plain_port_id(port_id) {
            return Err(bad(
                "shell PDU port ids may only contain letters, digits, '_', '.' and '-'".into(),
            ));
        }
        if let Some(ports) = &self.ports
            && !ports.iter().any(|p| p == port_id)
        {
            return Err(bad(format!(
                "not one of the configured ports ({})",
                ports.join(", ")
            )));
        }
        Ok(())
    }

    /// Runs `template` for `port_id` and returns its standard output.
    async fn run(&self, template: &str, port_id: &str, action: &str) -> Result<String, PowerError> {
        let command = template.replace("{port}", port_id);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&command)
            .env("FARMGATE_PDU", &self.pdu)
            .env("FARMGATE_PDU_PORT", port_id);
        crate::command::run_bounded(&self.pdu, cmd, &command, action, self.timeout).await
    }
}

#[async_trait]
impl PduDriver for ShellDriver {
    fn driver_name(&self) -> &str {
        "shell"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        Ok(self.ports.clone().unwrap_or_default())
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        self.check(port_id)?;
        let Some(template) = &self.status else {
            return Ok(PortState::Unknown);
        };
        let out = self
            .run(
                template,
                port_id,
                &format!("read the state of port {port_id}"),
            )
            .await?;
        let word = out.trim();
        Ok(if word.eq_ignore_ascii_case("on") {
            PortState::On
        } else if word.eq_ignore_ascii_case("off") {
            PortState::Off
        } else {
            PortState::Unknown
        })
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        self.check(port_id)?;
        let template = match state {
            PortState::On => &self.on,
            PortState::Off => &self.off,
            PortState::Unknown => {
                return Err(PowerError::BadState {
                    pdu: self.pdu.clone(),
                    port: port_id.to_string(),
                    state,
                });
            }
        };
        self.run(template, port_id, &format!("switch port {port_id} {state}"))
            .await
            .map(|_| ())
    }
}
