//! The `dummy` driver: ports that exist only in this process's memory.
//!
//! The state of a port is shared by every `dummy` driver of the same PDU name within one
//! process, but it is never persisted: another process (a job runner, a restarted gateway)
//! sees every port as `Unknown` until it switches it itself. `get` returns the last state
//! set in this process, `Unknown` otherwise.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use async_trait::async_trait;
use farmgate_wire::PortState;

use crate::config::Cfg;
use crate::{PduDriver, PowerError};

/// Default number of ports of a dummy PDU.
pub const DEFAULT_PORTS: u64 = 16;
/// Most ports a dummy PDU may have.
pub const MAX_PORTS: u64 = 2048;

type States = HashMap<(String, String), PortState>;

fn states() -> &'static Mutex<States> {
    static STATES: OnceLock<Mutex<States>> = OnceLock::new();
    STATES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn with_states<T>(f: impl FnOnce(&mut States) -> T) -> T {
    // A poisoned lock only means another thread panicked while holding a plain map.
    let mut guard = states().lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard)
}

/// An in-memory PDU with ports `0`..`ports-1`.
#[derive(Debug)]
pub struct DummyDriver {
    pdu: String,
    count: u64,
}

impl DummyDriver {
    /// Reads `ports` (count, default 16).
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&["ports"])?;
        let count = cfg.uint("ports", MAX_PORTS)?.unwrap_or(DEFAULT_PORTS);
        Ok(DummyDriver {
            pdu: cfg.pdu.to_string(),
            count,
        })
    }

    fn check(&self, port_id: &str) -> Result<(), PowerError> {
        let ok = !port_id.is_empty()
            && port_id.bytes().all(|b| b.is_ascii_digit())
            && port_id.parse::<u64>().is_ok_and(|n| n < self.count)
            && (port_id == "0" || !port_id.starts_with('0'));
        if ok {
            Ok(())
        } else {
            Err(PowerError::BadPort {
                pdu: self.pdu.clone(),
                port: port_id.to_string(),
                reason: format!(
                    "this dummy PDU has ports 0 to {}",
                    self.count.saturating_sub(1)
                ),
            })
        }
    }
}

#[async_trait]
impl PduDriver for DummyDriver {
    fn driver_name(&self) -> &str {
        "dummy"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        Ok((0..self.count).map(|i| i.to_string()).collect())
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        self.check(port_id)?;
        let key = (self.pdu.clone(), port_id.to_string());
        Ok(with_states(|s| {
            s.get(&key).copied().unwrap_or(PortState::Unknown)
        }))
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        self.check(port_id)?;
        if state == PortState::Unknown {
            return Err(PowerError::BadState {
                pdu: self.pdu.clone(),
                port: port_id.to_string(),
                state,
            });
        }
        tracing::debug!(pdu = %self.pdu, port = port_id, %state, "dummy PDU switch");
        with_states(|s| s.insert((self.pdu.clone(), port_id.to_string()), state));
        Ok(())
    }
}
