//! CI-tron's virtual PDU (`vpdu`) TCP protocol.
//!
//! One TCP connection per command. The client sends a 4-byte big-endian word:
//! bits 0-1 are the operation (0 count ports, 1 on, 2 off, 3 status), bits 2-12 the port id
//! (0-2047) and bit 13 asks the server to shut down (never set here). The server answers one
//! byte: the port count; for status 3 (on), 4 (off) or 5 (error); for on and off 1 (done).
//! Any other answer (the reference server says 0 for a port out of range) is an error.

use std::time::Duration;

use async_trait::async_trait;
use farmgate_wire::PortState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Cfg;
use crate::{PduDriver, PowerError};

/// Default TCP port of the vpdu server.
pub const DEFAULT_PORT: u16 = 9191;
/// Default time a whole exchange (connect, send, answer) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Highest port id the protocol can carry (11 bits).
pub const MAX_PORT_ID: u16 = 0x7ff;

const OP_COUNT: u32 = 0;
const OP_ON: u32 = 1;
const OP_OFF: u32 = 2;
const OP_STATUS: u32 = 3;

const REPLY_ACK: u8 = 1;
const REPLY_ON: u8 = 3;
const REPLY_OFF: u8 = 4;
const REPLY_ERROR: u8 = 5;

/// Encodes one vpdu command word (without the shutdown bit).
pub fn encode_command(operation: u32, port_id: u16) -> u32 {
    (operation & 0x3) | ((u32::from(port_id) & u32::from(MAX_PORT_ID)) << 2)
}

/// A vpdu server reached over TCP.
#[derive(Debug)]
pub struct VpduDriver {
    pdu: String,
    host: String,
    port: u16,
    timeout: Duration,
}

impl VpduDriver {
    /// Reads `hostname` (default `localhost`, may carry `:port`), `port` (default 9191)
    /// and `timeout` (seconds, default 5).
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&["hostname", "port", "timeout"])?;
        let hostname = cfg
            .string("hostname")?
            .unwrap_or_else(|| "localhost".to_string());
        let (host, port_in_host) =
            split_host_port(&hostname).map_err(|e| cfg.err("hostname", e))?;
        let port_key = cfg
            .uint("port", u64::from(u16::MAX))?
            .map(|p| u16::try_from(p).map_err(|_| cfg.err("port", "out of range")))
            .transpose()?;
        let port = match (port_in_host, port_key) {
            (Some(a), Some(b)) if a != b => {
                return Err(cfg.err(
                    "port",
                    format!("{b} contradicts the port {a} given in hostname {hostname:?}"),
                ));
            }
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => DEFAULT_PORT,
        };
        if port == 0 {
            return Err(cfg.err("port", "port 0 cannot be connected to"));
        }
        Ok(VpduDriver {
            pdu: cfg.pdu.to_string(),
            host,
            port,
            timeout: cfg.seconds("timeout")?.unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn port_number(&self, port_id: &str) -> Result<u16, PowerError> {
        let bad = |reason: &str| PowerError::BadPort {
            pdu: self.pdu.clone(),
            port: port_id.to_string(),
            reason: reason.to_string(),
        };
        if port_id.is_empty() || !port_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("vpdu port ids are integers from 0 to 2047"));
        }
        match port_id.parse::<u16>() {
            Ok(n) if n <= MAX_PORT_ID => Ok(n),
            _ => Err(bad("vpdu port ids are integers from 0 to 2047")),
        }
    }

    /// Sends one command on a fresh connection and returns the one-byte answer.
    async fn exchange(&self, word: u32, action: &str) -> Result<u8, PowerError> {
        let addr = self.addr();
        let io = |stage: &'static str, source: std::io::Error| PowerError::Io {
            pdu: self.pdu.clone(),
            addr: addr.clone(),
            action: action.to_string(),
            stage,
            source,
        };
        let talk = async {
            let mut stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| io("connect", e))?;
            stream
                .write_all(&word.to_be_bytes())
                .await
                .map_err(|e| io("send", e))?;
            let mut answer = [0u8; 1];
            let n = stream
                .read(&mut answer)
                .await
                .map_err(|e| io("receive", e))?;
            if n == 0 {
                return Err(PowerError::Refused {
                    pdu: self.pdu.clone(),
                    addr: addr.clone(),
                    action: action.to_string(),
                    reason: "the PDU closed the connection without answering".to_string(),
                });
            }
            Ok(answer[0])
        };
        let answer = tokio::time::timeout(self.timeout, talk)
            .await
            .map_err(|_| PowerError::Timeout {
                pdu: self.pdu.clone(),
                addr: addr.clone(),
                action: action.to_string(),
                timeout: self.timeout,
            })??;
        tracing::debug!(pdu = %self.pdu, %addr, command = word, answer, "vpdu exchange");
        Ok(answer)
    }

    fn refused(&self, action: &str, answer: u8) -> PowerError {
        let reason = match answer {
            REPLY_ERROR => "the PDU reported an error (answer 5)".to_string(),
            0 => "the PDU rejected the command (answer 0: port out of range or bad command)"
                .to_string(),
            other => format!("unexpected answer {other}"),
        };
        PowerError::Refused {
            pdu: self.pdu.clone(),
            addr: self.addr(),
            action: action.to_string(),
            reason,
        }
    }
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port`; a bare IPv6 address has no port.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty host name".to_string());
    }
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{p:?} in {s:?} is not a TCP port number"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ']'"))?;
        if host.is_empty() {
            return Err(format!("{s:?}: empty host name"));
        }
        return match after {
            "" => Ok((host.to_string(), None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host.to_string(), Some(parse_port(p)?))),
                None => Err(format!("{s:?}: unexpected text after ']'")),
            },
        };
    }
    match s.matches(':').count() {
        1 => {
            let (host, p) = s.split_once(':').unwrap_or((s, ""));
            if host.is_empty() {
                return Err(format!("{s:?}: empty host name"));
            }
            Ok((host.to_string(), Some(parse_port(p)?)))
        }
        _ => Ok((s.to_string(), None)),
    }
}

#[async_trait]
impl PduDriver for VpduDriver {
    fn driver_name(&self) -> &str {
        "vpdu"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        let n = self
            .exchange(encode_command(OP_COUNT, 0), "count the ports")
            .await?;
        Ok((0..u32::from(n)).map(|i| i.to_string()).collect())
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        let port = self.port_number(port_id)?;
        let action = format!("read the state of port {port_id}");
        match self
            .exchange(encode_command(OP_STATUS, port), &action)
            .await?
        {
            REPLY_ON => Ok(PortState::On),
            REPLY_OFF => Ok(PortState::Off),
            other => Err(self.refused(&action, other)),
        }
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        let port = self.port_number(port_id)?;
        let op = match state {
            PortState::On => OP_ON,
            PortState::Off => OP_OFF,
            PortState::Unknown => {
                return Err(PowerError::BadState {
                    pdu: self.pdu.clone(),
                    port: port_id.to_string(),
                    state,
                });
            }
        };
        let action = format!("switch port {port_id} {state}");
        match self.exchange(encode_command(op, port), &action).await? {
            REPLY_ACK => Ok(()),
            other => Err(self.refused(&action, other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("localhost"), Ok(("localhost".into(), None)));
        assert_eq!(
            split_host_port("10.0.0.1:9292"),
            Ok(("10.0.0.1".into(), Some(9292)))
        );
        assert_eq!(split_host_port("::1"), Ok(("::1".into(), None)));
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1".into(), Some(80))));
        assert!(split_host_port("host:x").is_err());
        assert!(split_host_port("[::1").is_err());
        assert!(split_host_port("").is_err());
    }

    #[test]
    fn command_encoding() {
        assert_eq!(encode_command(OP_OFF, 2), 0x0a);
        assert_eq!(encode_command(OP_ON, 2), 0x09);
        assert_eq!(encode_command(OP_STATUS, 2047), 0x1fff);
        assert_eq!(encode_command(OP_COUNT, 0), 0);
    }
}
