//! Shelly smart relays over their local HTTP API, generation 1 (REST) and 2+ (RPC).
//!
//! Generation 1 (`generation: 1`):
//! - `GET /relay/<i>?turn=on|off` switches relay `i` and answers its state (`ison`);
//!   `GET /relay/<i>` reads it.
//! - `GET /meter/<i>` (or `meters[i]` of `GET /status` on devices without `/meter`) gives
//!   `power` in W and `total` in watt-minutes, reported here in Wh.
//! - The port count comes from the length of `relays` in `GET /status`.
//! - Credentials use HTTP basic authentication.
//!
//! Generation 2 and later (`generation: 2`, also 3 and 4, which speak the same RPC):
//! - `GET /rpc/Switch.Set?id=<i>&on=true|false` switches (it answers the *previous* state,
//!   so the new state is read again), `GET /rpc/Switch.GetStatus?id=<i>` reads `output`,
//!   `apower` (W), `voltage` (V), `current` (A) and `aenergy.total` (Wh).
//! - The ports are the `switch:<N>` keys of `GET /rpc/Shelly.GetStatus`.
//! - Credentials use HTTP digest authentication (RFC 7616, SHA-256); the user is always
//!   `admin` on these devices.
//!
//! Without `generation`, the driver asks `GET /shelly` once (that endpoint needs no
//! credentials) and uses its `gen` field; generation 1 devices have none.
//!
//! Config: `hostname` (`host` or `host:port`, IPv6 in brackets; required), `generation`,
//! `username` (gen 1: required with a password; gen 2: `admin`, the default), `password`,
//! `timeout` (seconds per HTTP request, default 5), `ports` (relay count; asked from the
//! device when absent). Port ids are `0`..`N-1` as Shelly numbers its relays.
//!
//! Like every HTTP driver here, `set` returns only once the device reports the requested
//! state (see [`READBACK_TIME`]).
//!
//! This module also holds the HTTP plumbing shared with [`crate::tasmota`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use farmgate_wire::PortState;
use serde_json::Value;
use sha2::Digest as _;
use tokio::sync::OnceCell;

use crate::config::Cfg;
use crate::{PduDriver, PortMeasure, PowerError};

/// Default time one HTTP request (connect, send, answer) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `set` keeps reading a port back until it shows the requested state.
pub const READBACK_TIME: Duration = Duration::from_secs(2);
/// Pause between two read-backs.
const READBACK_INTERVAL: Duration = Duration::from_millis(200);
/// Highest relay index accepted in a port id.
pub const MAX_RELAY: u64 = 255;

// ---------------------------------------------------------------------------------------
// HTTP plumbing shared by the HTTP drivers.

/// How requests authenticate.
#[derive(Debug, Clone)]
pub(crate) enum Auth {
    None,
    Basic { user: String, password: String },
    Digest { user: String, password: String },
}

/// One HTTP device: its base URL, a client with a timeout, and the PDU name for errors.
#[derive(Debug)]
pub(crate) struct Http {
    pub(crate) pdu: String,
    base: String,
    client: reqwest::Client,
    timeout: Duration,
    nonce_count: AtomicU64,
}

/// An HTTP answer: status and body.
pub(crate) struct Answer {
    pub(crate) status: reqwest::StatusCode,
    pub(crate) body: String,
}

impl Http {
    /// Reads `hostname` (required) and `timeout`.
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        let hostname = cfg
            .string("hostname")?
            .ok_or_else(|| cfg.err("hostname", "missing (the device's host or host:port)"))?;
        let hostname = hostname.trim();
        if hostname.is_empty()
            || hostname
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
        {
            return Err(cfg.err(
                "hostname",
                format!("{hostname:?} is not a host or host:port (no scheme, path or user)"),
            ));
        }
        let base = format!("http://{hostname}");
        match reqwest::Url::parse(&base) {
            Ok(u) if u.host().is_some() => {}
            _ => {
                return Err(cfg.err(
                    "hostname",
                    format!("{hostname:?} is not a valid host or host:port (IPv6 in brackets)"),
                ));
            }
        }
        let timeout = cfg.seconds("timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| cfg.err("hostname", format!("cannot build an HTTP client: {e}")))?;
        Ok(Http {
            pdu: cfg.pdu.to_string(),
            base,
            client,
            timeout,
            nonce_count: AtomicU64::new(0),
        })
    }

    /// The URL of `path` (path and query, already encoded) as shown in messages.
    pub(crate) fn shown(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// An error about the answer to `path`.
    pub(crate) fn refused(
        &self,
        path: &str,
        action: &str,
        reason: impl Into<String>,
    ) -> PowerError {
        PowerError::Refused {
            pdu: self.pdu.clone(),
            addr: self.shown(path),
            action: action.to_string(),
            reason: reason.into(),
        }
    }

    fn transport_error(&self, path: &str, action: &str, e: reqwest::Error) -> PowerError {
        if e.is_timeout() {
            return PowerError::Timeout {
                pdu: self.pdu.clone(),
                addr: self.shown(path),
                action: action.to_string(),
                timeout: self.timeout,
            };
        }
        let stage = if e.is_connect() {
            "connect"
        } else if e.is_body() || e.is_decode() {
            "receive"
        } else {
            "request"
        };
        // The URL may carry credentials (Tasmota): never show reqwest's copy of it.
        let e = e.without_url();
        let source = match std::error::Error::source(&e) {
            Some(inner) => std::io::Error::other(format!("{e}: {inner}")),
            None => std::io::Error::other(e.to_string()),
        };
        PowerError::Io {
            pdu: self.pdu.clone(),
            addr: self.shown(path),
            action: action.to_string(),
            stage,
            source,
        }
    }

    /// GETs `path` (plus `secret_query`, appended to the query but never shown) and
    /// returns the status and body, whatever the status.
    pub(crate) async fn request(
        &self,
        path: &str,
        secret_query: &str,
        auth: &Auth,
        action: &str,
    ) -> Result<Answer, PowerError> {
        let url = if secret_query.is_empty() {
            self.shown(path)
        } else if path.contains('?') {
            format!("{}&{secret_query}", self.shown(path))
        } else {
            format!("{}?{secret_query}", self.shown(path))
        };
        let mut req = self.client.get(&url);
        if let Auth::Basic { user, password } = auth {
            req = req.basic_auth(user, Some(password));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(path, action, e))?;
        let resp = match auth {
            Auth::Digest { user, password }
                if resp.status() == reqwest::StatusCode::UNAUTHORIZED =>
            {
                let challenge = resp
                    .headers()
                    .get_all(reqwest::header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find(|v| v.trim_start().to_ascii_lowercase().starts_with("digest"))
                    .map(str::to_string);
                let Some(challenge) = challenge else {
                    return Err(self.refused(
                        path,
                        action,
                        "HTTP 401 Unauthorized without a digest challenge",
                    ));
                };
                let uri = path.to_string();
                let nc = self.nonce_count.fetch_add(1, Ordering::Relaxed) + 1;
                let header = digest_authorization(&challenge, user, password, "GET", &uri, nc)
                    .map_err(|r| self.refused(path, action, r))?;
                self.client
                    .get(&url)
                    .header(reqwest::header::AUTHORIZATION, header)
                    .send()
                    .await
                    .map_err(|e| self.transport_error(path, action, e))?
            }
            _ => resp,
        };
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| self.transport_error(path, action, e))?;
        tracing::debug!(pdu = %self.pdu, url = %self.shown(path), %status, "HTTP PDU exchange");
        Ok(Answer { status, body })
    }

    /// GETs `path` and parses a successful answer as JSON; any other status, or a body
    /// that is not JSON, is an error naming the URL.
    pub(crate) async fn get_json(
        &self,
        path: &str,
        secret_query: &str,
        auth: &Auth,
        action: &str,
    ) -> Result<Value, PowerError> {
        let answer = self.request(path, secret_query, auth, action).await?;
        self.json_of(path, action, answer)
    }

    /// Checks the status of `answer` and parses its body.
    pub(crate) fn json_of(
        &self,
        path: &str,
        action: &str,
        answer: Answer,
    ) -> Result<Value, PowerError> {
        if !answer.status.is_success() {
            let hint = if answer.status == reqwest::StatusCode::UNAUTHORIZED {
                " (check the username and password in the PDU config)"
            } else {
                ""
            };
            return Err(self.refused(
                path,
                action,
                format!("HTTP {}{hint}: {}", answer.status, excerpt(&answer.body)),
            ));
        }
        serde_json::from_str(&answer.body).map_err(|e| {
            self.refused(
                path,
                action,
                format!("the answer is not JSON ({e}): {}", excerpt(&answer.body)),
            )
        })
    }
}

/// The start of a body, for error messages.
pub(crate) fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return "(empty body)".to_string();
    }
    let mut s: String = body.chars().take(200).collect();
    if s.len() < body.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// The parameters of a `WWW-Authenticate: Digest …` header.
fn challenge_params(header: &str) -> Vec<(String, String)> {
    farmgate_httpc::auth_params(header).1
}

/// The `Authorization` header answering a digest `challenge` (RFC 7616: SHA-256 or MD5,
/// qop `auth` or none).
fn digest_authorization(
    challenge: &str,
    user: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u64,
) -> Result<String, String> {
    let params = challenge_params(challenge);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let realm = get("realm").ok_or("the digest challenge has no realm")?;
    let nonce = get("nonce").ok_or("the digest challenge has no nonce")?;
    let algorithm = get("algorithm").unwrap_or("MD5");
    let hash: fn(&str) -> String = match algorithm.to_ascii_uppercase().as_str() {
        "SHA-256" => |s| hex::encode(sha2::Sha256::digest(s.as_bytes())),
        "MD5" => |s| hex::encode(md5::Md5::digest(s.as_bytes())),
        other => return Err(format!("unsupported digest algorithm {other:?}")),
    };
    let qop = match get("qop") {
        None => None,
        Some(q) if q.split(',').any(|x| x.trim() == "auth") => Some("auth"),
        Some(q) => return Err(format!("unsupported digest qop {q:?} (only auth)")),
    };
    let ha1 = hash(&format!("{user}:{realm}:{password}"));
    let ha2 = hash(&format!("{method}:{uri}"));
    let nc = format!("{nc:08x}");
    let cnonce = make_cnonce();
    let response = match qop {
        Some(q) => hash(&format!("{ha1}:{nonce}:{nc}:{cnonce}:{q}:{ha2}")),
        None => hash(&format!("{ha1}:{nonce}:{ha2}")),
    };
    let mut header = format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
         algorithm={algorithm}, response=\"{response}\""
    );
    if let Some(q) = qop {
        header.push_str(&format!(", qop={q}, nc={nc}, cnonce=\"{cnonce}\""));
    }
    if let Some(opaque) = get("opaque") {
        header.push_str(&format!(", opaque=\"{opaque}\""));
    }
    Ok(header)
}

fn make_cnonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let seed = format!("{nanos}:{}:{n}", std::process::id());
    hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..8])
}

/// Reads a port back until it shows `expected`: `first` is the state the device's answer
/// to the command already gave (if any); `read` reads the port again. Gives up after
/// [`READBACK_TIME`] with an error naming the PDU, port, expected and seen state.
pub(crate) async fn confirm<F, Fut>(
    http: &Http,
    path: &str,
    port_id: &str,
    expected: PortState,
    first: Option<PortState>,
    mut read: F,
) -> Result<(), PowerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<PortState, PowerError>>,
{
    let mut seen = first;
    if seen == Some(expected) {
        return Ok(());
    }
    let deadline = Instant::now() + READBACK_TIME;
    loop {
        if seen.is_some() {
            tokio::time::sleep(READBACK_INTERVAL).await;
        }
        let state = read().await?;
        if state == expected {
            return Ok(());
        }
        seen = Some(state);
        if Instant::now() >= deadline {
            break;
        }
    }
    let seen = seen.unwrap_or(PortState::Unknown);
    Err(http.refused(
        path,
        &format!("switch port {port_id} {expected}"),
        format!(
            "the device accepted the command but port {port_id} still reads {seen} after \
             {READBACK_TIME:?} (expected {expected}, seen {seen})"
        ),
    ))
}

/// A port id `0`..`count-1` (or any index up to `max` when the count is not configured),
/// written without leading zeros.
pub(crate) fn parse_index(
    pdu: &str,
    port_id: &str,
    first: u64,
    count: Option<u64>,
    max: u64,
) -> Result<u64, PowerError> {
    let bad = |reason: String| PowerError::BadPort {
        pdu: pdu.to_string(),
        port: port_id.to_string(),
        reason,
    };
    let last = count.map(|c| c + first - 1).unwrap_or(max);
    let range = if last < first {
        "this PDU has no ports".to_string()
    } else {
        format!("port ids are integers from {first} to {last}")
    };
    let ok_form = !port_id.is_empty()
        && port_id.bytes().all(|b| b.is_ascii_digit())
        && (port_id == "0" || !port_id.starts_with('0'));
    match port_id.parse::<u64>() {
        Ok(n) if ok_form && n >= first && n <= last => Ok(n),
        _ => Err(bad(range)),
    }
}

/// A number at `pointer` in `v`, if there is one.
pub(crate) fn number(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

// ---------------------------------------------------------------------------------------
// The Shelly driver.

/// A Shelly relay (generation 1 REST or generation 2+ RPC API).
#[derive(Debug)]
pub struct ShellyDriver {
    http: Http,
    generation: OnceCell<u8>,
    credentials: Option<(Option<String>, String)>,
    ports: Option<u64>,
}

impl ShellyDriver {
    /// Reads `hostname`, `generation`, `username`, `password`, `timeout` and `ports`.
    pub(crate) fn from_config(cfg: &Cfg<'_>) -> Result<Self, PowerError> {
        cfg.only(&[
            "hostname",
            "generation",
            "username",
            "password",
            "timeout",
            "ports",
        ])?;
        let http = Http::from_config(cfg)?;
        let generation = OnceCell::new();
        if let Some(g) = cfg.uint("generation", 4)? {
            if g == 0 {
                return Err(cfg.err(
                    "generation",
                    "expected 1 (REST API) or 2 (RPC API; 3 and 4 also speak it)",
                ));
            }
            // Cannot fail: the cell is new.
            let _ = generation.set(g as u8);
        }
        let username = cfg.string("username")?;
        let password = cfg.string("password")?;
        let credentials = match (username, password) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(cfg.err("password", "missing while username is set"));
            }
            (user, Some(p)) => Some((user, p)),
        };
        if let Some((user, _)) = &credentials {
            match (generation.get().copied(), user.as_deref()) {
                (Some(1), None) => {
                    return Err(cfg.err(
                        "username",
                        "missing: generation 1 devices need a username with the password",
                    ));
                }
                (Some(g), Some(u)) if g >= 2 && u != "admin" => {
                    return Err(cfg.err(
                        "username",
                        format!(
                            "{u:?}: generation 2 devices only know the user \"admin\" \
                             (leave username out)"
                        ),
                    ));
                }
                _ => {}
            }
        }
        let ports = cfg.uint("ports", MAX_RELAY + 1)?;
        Ok(ShellyDriver {
            http,
            generation,
            credentials,
            ports,
        })
    }

    /// The API generation: configured, or asked from `GET /shelly` once.
    async fn generation(&self) -> Result<u8, PowerError> {
        self.generation
            .get_or_try_init(|| async {
                let path = "/shelly";
                let action = "ask the device its API generation";
                let v = self.http.get_json(path, "", &Auth::None, action).await?;
                if !v.is_object() {
                    return Err(self
                        .http
                        .refused(path, action, "the answer is not an object"));
                }
                match v.get("gen") {
                    None => Ok(1),
                    Some(g) => match g.as_u64() {
                        Some(g @ 1..=4) => Ok(g as u8),
                        _ => Err(self.http.refused(
                            path,
                            action,
                            format!("unknown generation {g} in the answer"),
                        )),
                    },
                }
            })
            .await
            .copied()
    }

    async fn auth(&self) -> Result<(u8, Auth), PowerError> {
        let generation = self.generation().await?;
        let auth = match &self.credentials {
            None => Auth::None,
            Some((user, password)) if generation == 1 => match user {
                Some(user) => Auth::Basic {
                    user: user.clone(),
                    password: password.clone(),
                },
                None => {
                    return Err(PowerError::BadConfig {
                        pdu: self.http.pdu.clone(),
                        driver: "shelly".to_string(),
                        key: "username".to_string(),
                        reason: "missing: this is a generation 1 device, which needs a \
                                 username with the password"
                            .to_string(),
                    });
                }
            },
            Some((user, password)) => Auth::Digest {
                user: user.clone().unwrap_or_else(|| "admin".to_string()),
                password: password.clone(),
            },
        };
        Ok((generation, auth))
    }

    fn index(&self, port_id: &str) -> Result<u64, PowerError> {
        parse_index(&self.http.pdu, port_id, 0, self.ports, MAX_RELAY)
    }

    async fn read(
        &self,
        generation: u8,
        auth: &Auth,
        i: u64,
        port_id: &str,
    ) -> Result<PortState, PowerError> {
        let action = format!("read the state of port {port_id}");
        if generation == 1 {
            let path = format!("/relay/{i}");
            let v = self.http.get_json(&path, "", auth, &action).await?;
            gen1_state(&self.http, &path, &action, &v)
        } else {
            let path = format!("/rpc/Switch.GetStatus?id={i}");
            let v = self.http.get_json(&path, "", auth, &action).await?;
            match v.get("output").and_then(Value::as_bool) {
                Some(true) => Ok(PortState::On),
                Some(false) => Ok(PortState::Off),
                None => Err(self.http.refused(
                    &path,
                    &action,
                    format!(
                        "no boolean \"output\" in the answer {}",
                        excerpt(&v.to_string())
                    ),
                )),
            }
        }
    }
}

fn gen1_state(http: &Http, path: &str, action: &str, v: &Value) -> Result<PortState, PowerError> {
    match v.get("ison").and_then(Value::as_bool) {
        Some(true) => Ok(PortState::On),
        Some(false) => Ok(PortState::Off),
        None => Err(http.refused(
            path,
            action,
            format!(
                "no boolean \"ison\" in the answer {}",
                excerpt(&v.to_string())
            ),
        )),
    }
}

#[async_trait]
impl PduDriver for ShellyDriver {
    fn driver_name(&self) -> &str {
        "shelly"
    }

    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        if let Some(n) = self.ports {
            return Ok((0..n).map(|i| i.to_string()).collect());
        }
        let (generation, auth) = self.auth().await?;
        let action = "list the relays";
        if generation == 1 {
            let path = "/status";
            let v = self.http.get_json(path, "", &auth, action).await?;
            match v.get("relays").and_then(Value::as_array) {
                Some(relays) => Ok((0..relays.len()).map(|i| i.to_string()).collect()),
                None => Err(self.http.refused(
                    path,
                    action,
                    "no \"relays\" list in the answer (set `ports` in the PDU config)",
                )),
            }
        } else {
            let path = "/rpc/Shelly.GetStatus";
            let v = self.http.get_json(path, "", &auth, action).await?;
            let Some(map) = v.as_object() else {
                return Err(self
                    .http
                    .refused(path, action, "the answer is not an object"));
            };
            let mut ids: Vec<u64> = map
                .keys()
                .filter_map(|k| k.strip_prefix("switch:"))
                .filter_map(|n| n.parse().ok())
                .collect();
            ids.sort_unstable();
            Ok(ids.into_iter().map(|i| i.to_string()).collect())
        }
    }

    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        let i = self.index(port_id)?;
        let (generation, auth) = self.auth().await?;
        self.read(generation, &auth, i, port_id).await
    }

    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        let i = self.index(port_id)?;
        let (word, on) = match state {
            PortState::On => ("on", "true"),
            PortState::Off => ("off", "false"),
            PortState::Unknown => {
                return Err(PowerError::BadState {
                    pdu: self.http.pdu.clone(),
                    port: port_id.to_string(),
                    state,
                });
            }
        };
        let (generation, auth) = self.auth().await?;
        let action = format!("switch port {port_id} {state}");
        let (path, first) = if generation == 1 {
            let path = format!("/relay/{i}?turn={word}");
            let v = self.http.get_json(&path, "", &auth, &action).await?;
            let first = gen1_state(&self.http, &path, &action, &v)?;
            (path, Some(first))
        } else {
            let path = format!("/rpc/Switch.Set?id={i}&on={on}");
            // The answer is the previous state (`was_on`): read the new one.
            self.http.get_json(&path, "", &auth, &action).await?;
            (path, None)
        };
        confirm(&self.http, &path, port_id, state, first, || {
            self.read(generation, &auth, i, port_id)
        })
        .await
    }

    async fn measure(&self, port_id: &str) -> Result<Option<PortMeasure>, PowerError> {
        let i = self.index(port_id)?;
        let (generation, auth) = self.auth().await?;
        let action = format!("read the meter of port {port_id}");
        if generation >= 2 {
            let path = format!("/rpc/Switch.GetStatus?id={i}");
            let v = self.http.get_json(&path, "", &auth, &action).await?;
            let m = PortMeasure {
                power_w: number(&v, "/apower"),
                energy_wh: number(&v, "/aenergy/total"),
                current_a: number(&v, "/current"),
                voltage_v: number(&v, "/voltage"),
            };
            return Ok((m != PortMeasure::default()).then_some(m));
        }
        let path = format!("/meter/{i}");
        let answer = self.http.request(&path, "", &auth, &action).await?;
        let (path, meter) = if answer.status == reqwest::StatusCode::NOT_FOUND {
            let path = "/status".to_string();
            let v = self.http.get_json(&path, "", &auth, &action).await?;
            let meter = v
                .get("meters")
                .and_then(Value::as_array)
                .and_then(|m| m.get(i as usize))
                .cloned();
            (path, meter)
        } else {
            let v = self.http.json_of(&path, &action, answer)?;
            (path, Some(v))
        };
        let Some(meter) = meter else {
            return Ok(None);
        };
        if !meter.is_object() {
            return Err(self.http.refused(
                &path,
                &action,
                format!(
                    "the meter is not an object: {}",
                    excerpt(&meter.to_string())
                ),
            ));
        }
        let m = PortMeasure {
            power_w: number(&meter, "/power"),
            // Generation 1 counts watt-minutes.
            energy_wh: number(&meter, "/total").map(|wmin| wmin / 60.0),
            current_a: None,
            voltage_v: None,
        };
        Ok((m != PortMeasure::default()).then_some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_rfc7616_example() {
        // RFC 7616 section 3.9.1 example, MD5 and SHA-256 variants share the inputs.
        let params = challenge_params(
            "Digest realm=\"http-auth@example.org\", qop=\"auth, auth-int\", \
             algorithm=SHA-256, nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", \
             opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"",
        );
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("realm").as_deref(), Some("http-auth@example.org"));
        assert_eq!(get("qop").as_deref(), Some("auth, auth-int"));
        assert_eq!(get("algorithm").as_deref(), Some("SHA-256"));
        let header = digest_authorization(
            "Digest realm=\"r\", nonce=\"n\", algorithm=SHA-256, qop=\"auth\"",
            "admin",
            "pw",
            "GET",
            "/rpc/Switch.Set?id=0&on=true",
            1,
        )
        .expect("header");
        assert!(header.contains("nc=00000001"), "{header}");
        assert!(
            header.contains("uri=\"/rpc/Switch.Set?id=0&on=true\""),
            "{header}"
        );
        assert!(digest_authorization("Digest realm=\"r\"", "a", "b", "GET", "/", 1).is_err());
    }

    #[test]
    fn port_indexes() {
        assert_eq!(parse_index("P", "0", 0, Some(2), 255).ok(), Some(0));
        assert!(parse_index("P", "2", 0, Some(2), 255).is_err());
        assert!(parse_index("P", "01", 0, None, 255).is_err());
        assert!(parse_index("P", "0", 1, None, 32).is_err());
        assert_eq!(parse_index("P", "32", 1, None, 32).ok(), Some(32));
    }
}
