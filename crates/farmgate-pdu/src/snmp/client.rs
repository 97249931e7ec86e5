//! A small SNMP v1/v2c manager over tokio UDP: Get, GetNext and Set with request-id
//! matching, a timeout per attempt and retries.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::ber::{self, Message, Oid, Pdu, PduKind, Value, VarBind, Version};

/// The standard SNMP agent port.
pub const DEFAULT_PORT: u16 = 161;
/// Default time to wait for an answer to one attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of retries after the first attempt.
pub const DEFAULT_RETRIES: u32 = 2;

/// Why an SNMP request failed.
#[derive(Debug, thiserror::Error)]
pub enum SnmpError {
    /// The agent's host name does not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// Why.
        reason: String,
    },
    /// A socket operation failed.
    #[error("{stage} failed: {source}")]
    Io {
        /// Which step (bind, send, receive).
        stage: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No valid answer came in time.
    #[error("no answer from {addr} within {waited:?} ({attempts} attempts){}", ignored.as_ref().map(|i| format!("; ignored an answer: {i}")).unwrap_or_default())]
    Timeout {
        /// The agent address.
        addr: String,
        /// The whole time waited, over all attempts.
        waited: Duration,
        /// How many requests were sent.
        attempts: u32,
        /// The last datagram from the agent that was not a valid answer, explained.
        ignored: Option<String>,
    },
    /// The agent answered with an error-status.
    #[error("the agent answered error-status {name} ({status}) for OID {oid}")]
    Status {
        /// The error-status number.
        status: i32,
        /// Its name (`notWritable`, `noSuchName`, …).
        name: &'static str,
        /// The OID the error-index points at (all request OIDs when it points nowhere).
        oid: String,
    },
    /// The agent's answer does not fit the request.
    #[error("the agent answered {what}")]
    BadResponse {
        /// What is wrong with it.
        what: String,
    },
}

/// An SNMP v1/v2c agent and how to talk to it.
#[derive(Debug, Clone)]
pub struct SnmpClient {
    host: String,
    port: u16,
    community: String,
    version: Version,
    timeout: Duration,
    retries: u32,
}

fn next_request_id() -> i32 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let counter = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        AtomicU32::new(nanos ^ (std::process::id() << 12))
    });
    // Positive 31-bit ids: some agents mishandle negative ones.
    (counter.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff) as i32
}

impl SnmpClient {
    /// A client for the agent at `host:port`, with the default timeout and retries.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        community: impl Into<String>,
        version: Version,
    ) -> Self {
        SnmpClient {
            host: host.into(),
            port,
            community: community.into(),
            version,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
        }
    }

    /// Sets the time to wait for an answer to each attempt.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how many times a request is sent again after the first attempt went unanswered.
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// `host:port` of the agent (IPv6 literals in brackets).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The longest a request can take: every attempt timing out.
    pub fn max_wait(&self) -> Duration {
        self.timeout.saturating_mul(self.retries.saturating_add(1))
    }

    /// GetRequest: the values of `oids`, in order. SNMPv2c exceptions (noSuchObject…) are
    /// returned as values; an error-status is an error.
    pub async fn get(&self, oids: &[Oid]) -> Result<Vec<VarBind>, SnmpError> {
        let binds: Vec<VarBind> = oids.iter().map(|o| (o.clone(), Value::Null)).collect();
        let answer = self.request(PduKind::GetRequest, binds).await?;
        check_names(oids, &answer)?;
        Ok(answer)
    }

    /// GetNextRequest: for each OID, the next object the agent has and its value.
    pub async fn get_next(&self, oids: &[Oid]) -> Result<Vec<VarBind>, SnmpError> {
        let binds: Vec<VarBind> = oids.iter().map(|o| (o.clone(), Value::Null)).collect();
        let answer = self.request(PduKind::GetNextRequest, binds).await?;
        if answer.len() != oids.len() {
            return Err(SnmpError::BadResponse {
                what: format!("{} bindings to a GetNext of {}", answer.len(), oids.len()),
            });
        }
        Ok(answer)
    }

    /// SetRequest: writes the values; returns the agent's answer bindings.
    pub async fn set(&self, binds: &[VarBind]) -> Result<Vec<VarBind>, SnmpError> {
        let oids: Vec<Oid> = binds.iter().map(|(o, _)| o.clone()).collect();
        let answer = self.request(PduKind::SetRequest, binds.to_vec()).await?;
        check_names(&oids, &answer)?;
        Ok(answer)
    }

    async fn resolve(&self) -> Result<SocketAddr, SnmpError> {
        let resolve_err = |reason: String| SnmpError::Resolve {
            host: self.host.clone(),
            reason,
        };
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| resolve_err(e.to_string()))?;
        addrs
            .next()
            .ok_or_else(|| resolve_err("no address".to_string()))
    }

    /// Sends one request (again on each timeout) and returns the bindings of the matching
    /// response.
    async fn request(
        &self,
        kind: PduKind,
        varbinds: Vec<VarBind>,
    ) -> Result<Vec<VarBind>, SnmpError> {
        let target = self.resolve().await?;
        let local: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local)
            .await
            .map_err(|source| SnmpError::Io {
                stage: "bind",
                source,
            })?;
        let request_id = next_request_id();
        let oids: Vec<Oid> = varbinds.iter().map(|(o, _)| o.clone()).collect();
        let msg = Message {
            version: self.version,
            community: self.community.as_bytes().to_vec(),
            pdu: Pdu {
                kind,
                request_id,
                error_status: 0,
                error_index: 0,
                varbinds,
            },
        };
        let datagram = ber::encode(&msg);
        let mut buf = vec![0u8; 65_536];
        let mut ignored: Option<String> = None;
        let attempts = self.retries.saturating_add(1);
        for attempt in 1..=attempts {
            socket
                .send_to(&datagram, target)
                .await
                .map_err(|source| SnmpError::Io {
                    stage: "send",
                    source,
                })?;
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                let (n, from) =
                    match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                        Err(_) => break,
                        Ok(Ok(got)) => got,
                        Ok(Err(source)) => {
                            return Err(SnmpError::Io {
                                stage: "receive",
                                source,
                            });
                        }
                    };
                if from != target {
                    continue;
                }
                let answer = match ber::decode(buf.get(..n).unwrap_or(&[])) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(agent = %self.addr(), error = %e, "ignoring an undecodable datagram");
                        ignored = Some(e.to_string());
                        continue;
                    }
                };
                if answer.pdu.request_id != request_id {
                    continue;
                }
                if answer.pdu.kind != PduKind::Response {
                    ignored = Some(format!("a {:?} PDU instead of a Response", answer.pdu.kind));
                    continue;
                }
                if answer.pdu.error_status != 0 {
                    let index = answer.pdu.error_index;
                    let oid = usize::try_from(index)
                        .ok()
                        .and_then(|i| i.checked_sub(1))
                        .and_then(|i| oids.get(i))
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| {
                            oids.iter()
                                .map(|o| o.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        });
                    return Err(SnmpError::Status {
                        status: answer.pdu.error_status,
                        name: ber::error_status_name(answer.pdu.error_status),
                        oid,
                    });
                }
                tracing::trace!(agent = %self.addr(), attempt, request_id, "SNMP answer");
                return Ok(answer.pdu.varbinds);
            }
        }
        Err(SnmpError::Timeout {
            addr: self.addr(),
            waited: self.max_wait(),
            attempts,
            ignored,
        })
    }
}

/// Checks that a Get or Set answer names the requested OIDs, in order.
fn check_names(requested: &[Oid], answer: &[VarBind]) -> Result<(), SnmpError> {
    if answer.len() != requested.len() {
        return Err(SnmpError::BadResponse {
            what: format!(
                "{} bindings to a request of {}",
                answer.len(),
                requested.len()
            ),
        });
    }
    for (want, (got, _)) in requested.iter().zip(answer) {
        if want != got {
            return Err(SnmpError::BadResponse {
                what: format!("OID {got} where {want} was asked"),
            });
        }
    }
    Ok(())
}
