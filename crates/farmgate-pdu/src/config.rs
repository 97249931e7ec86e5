//! Typed access to a PDU's `config` map, with errors naming PDU, driver and key.

use std::collections::BTreeMap;
use std::time::Duration;

use farmgate_wire::YamlValue;

use crate::PowerError;

/// A PDU's configuration as read by one driver.
pub(crate) struct Cfg<'a> {
    pub(crate) pdu: &'a str,
    pub(crate) driver: &'a str,
    map: &'a BTreeMap<String, YamlValue>,
}

impl<'a> Cfg<'a> {
    pub(crate) fn new(pdu: &'a str, driver: &'a str, map: &'a BTreeMap<String, YamlValue>) -> Self {
        Cfg { pdu, driver, map }
    }

    pub(crate) fn err(&self, key: &str, reason: impl Into<String>) -> PowerError {
        PowerError::BadConfig {
            pdu: self.pdu.to_string(),
            driver: self.driver.to_string(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Rejects keys the driver does not know, so a typo does not silently fall back to a default.
    pub(crate) fn only(&self, known: &[&str]) -> Result<(), PowerError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(self.err(
                k,
                format!("unknown key (this driver knows: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// The value of `key`, `None` when absent or null.
    pub(crate) fn get(&self, key: &str) -> Option<&'a YamlValue> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>, PowerError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(self.err(key, format!("expected a string, got {}", show(v)))),
            },
        }
    }

    /// An unsigned integer, written as a number or as a decimal string.
    pub(crate) fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, PowerError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match (v.as_u64(), v.as_str()) {
            (Some(n), _) => Some(n),
            (None, Some(s)) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if n <= max => Ok(Some(n)),
            Some(n) => Err(self.err(key, format!("{n} is larger than the maximum {max}"))),
            None => Err(self.err(
                key,
                format!("expected an integer between 0 and {max}, got {}", show(v)),
            )),
        }
    }

    /// A positive number of seconds (`timeout`).
    pub(crate) fn seconds(&self, key: &str) -> Result<Option<Duration>, PowerError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let secs = match (v.as_f64(), v.as_str()) {
            (Some(f), _) => Some(f),
            (None, Some(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match secs {
            Some(f) if f.is_finite() && f > 0.0 && f <= 86_400.0 => {
                Ok(Some(Duration::from_secs_f64(f)))
            }
            _ => Err(self.err(
                key,
                format!(
                    "expected a number of seconds between 0 (excluded) and 86400, got {}",
                    show(v)
                ),
            )),
        }
    }
}

/// A short rendering of a YAML value for error messages.
pub(crate) fn show(v: &YamlValue) -> String {
    match v.as_str() {
        Some(s) => format!("{s:?}"),
        None => format!("{v:?}"),
    }
}
