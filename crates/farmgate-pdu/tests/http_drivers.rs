//! The `shelly` and `tasmota` drivers against HTTP servers (axum on 127.0.0.1) that
//! implement the documented device endpoints with real relay and meter state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use farmgate_pdu::{PduDriver, PortMeasure, PowerError, driver_for};
use farmgate_wire::{PduRecord, PortState, YamlValue};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// Test servers.

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    ShellyGen1,
    ShellyGen2,
    Tasmota,
    /// Answers 500 to everything.
    Broken,
    /// Answers 200 with a body that is not JSON.
    Garbage,
}

struct Device {
    kind: Kind,
    relays: Mutex<Vec<bool>>,
    /// Relays accept commands (HTTP 200) but never change.
    stuck: bool,
    /// Credentials the device requires (user, password).
    auth: Option<(String, String)>,
    /// Gen 1: no `/meter/<i>` endpoint (meters only in `/status`).
    no_meter_endpoint: bool,
    /// Tasmota: one relay, answered as `POWER` instead of `POWER1`.
    single: bool,
    /// Requests seen (path and query), for checks.
    log: Mutex<Vec<String>>,
}

const REALM: &str = "shellyplus2pm-a8032ab12345";
const NONCE: &str = "1700000000";

impl Device {
    fn new(kind: Kind, relays: usize) -> Device {
        Device {
            kind,
            relays: Mutex::new(vec![false; relays]),
            stuck: false,
            auth: None,
            no_meter_endpoint: false,
            single: false,
            log: Mutex::new(Vec::new()),
        }
    }

    fn relay(&self, i: usize) -> Option<bool> {
        self.relays.lock().expect("lock").get(i).copied()
    }

    fn switch(&self, i: usize, on: bool) -> Option<bool> {
        let mut relays = self.relays.lock().expect("lock");
        let r = relays.get_mut(i)?;
        let was = *r;
        if !self.stuck {
            *r = on;
        }
        Some(was)
    }
}

fn query_map(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn ok(v: Value) -> Response {
    json_response(StatusCode::OK, v)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Not Found").into_response()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Checks an `Authorization: Digest` header the way a Shelly gen 2 device does
/// (RFC 7616, SHA-256, qop auth, user admin).
fn digest_ok(headers: &HeaderMap, password: &str, uri: &str) -> bool {
    let Some(h) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(rest) = h.strip_prefix("Digest ") else {
        return false;
    };
    let params: HashMap<String, String> = rest
        .split(", ")
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect();
    let p = |k: &str| params.get(k).cloned().unwrap_or_default();
    if p("username") != "admin"
        || p("realm") != REALM
        || p("nonce") != NONCE
        || p("uri") != uri
        || p("qop") != "auth"
    {
        return false;
    }
    let ha1 = sha256_hex(&format!("admin:{REALM}:{password}"));
    let ha2 = sha256_hex(&format!("GET:{uri}"));
    let expected = sha256_hex(&format!(
        "{ha1}:{}:{}:{}:auth:{ha2}",
        p("nonce"),
        p("nc"),
        p("cnonce")
    ));
    p("response") == expected
}

fn basic_ok(headers: &HeaderMap, user: &str, password: &str) -> bool {
    use std::fmt::Write as _;
    // Base64 of "user:password", written out here to check the header.
    let raw = format!("{user}:{password}");
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in raw.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                let _ = write!(
                    b64,
                    "{}",
                    table[((n >> (18 - 6 * i)) & 63) as usize] as char
                );
            } else {
                b64.push('=');
            }
        }
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Basic {b64}").as_str())
}

async fn handle(State(dev): State<Arc<Device>>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let uri = match req.uri().path_and_query() {
        Some(pq) => pq.as_str().to_string(),
        None => path.clone(),
    };
    dev.log.lock().expect("lock").push(uri.clone());
    let q = query_map(&query);
    let headers = req.headers();
    match dev.kind {
        Kind::Broken => (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
        Kind::Garbage => (StatusCode::OK, "<html>hello</html>").into_response(),
        Kind::ShellyGen1 => shelly_gen1(&dev, &path, &q, headers),
        Kind::ShellyGen2 => shelly_gen2(&dev, &path, &q, headers, &uri),
        Kind::Tasmota => tasmota(&dev, &path, &q),
    }
}

fn shelly_gen1(
    dev: &Device,
    path: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let n = dev.relays.lock().expect("lock").len();
    if path == "/shelly" {
        return ok(json!({
            "type": "SHSW-25", "mac": "A8032AB12345", "auth": dev.auth.is_some(),
            "fw": "20230913-112003/v1.14.0-gcb84623", "num_outputs": n,
        }));
    }
    if let Some((user, password)) = &dev.auth
        && !basic_ok(headers, user, password)
    {
        return (StatusCode::UNAUTHORIZED, "401 Unauthorized").into_response();
    }
    let meter = |i: usize| {
        // Relay i draws 40 W + i when on; the counter holds 120 watt-minutes per relay.
        let on = dev.relay(i).unwrap_or(false);
        json!({
            "power": if on { 40.0 + i as f64 } else { 0.0 }, "overpower": 0.0,
            "is_valid": true, "timestamp": 0, "counters": [0.0, 0.0, 0.0],
            "total": 120 * (i + 1),
        })
    };
    if path == "/status" {
        let relays: Vec<Value> = (0..n)
            .map(|i| json!({"ison": dev.relay(i), "has_timer": false}))
            .collect();
        let meters: Vec<Value> = (0..n).map(meter).collect();
        return ok(json!({"relays": relays, "meters": meters, "uptime": 100}));
    }
    if let Some(i) = path.strip_prefix("/relay/") {
        let Some(i) = i.parse::<usize>().ok().filter(|&i| i < n) else {
            return not_found();
        };
        match q.get("turn").map(String::as_str) {
            Some("on") => {
                dev.switch(i, true);
            }
            Some("off") => {
                dev.switch(i, false);
            }
            Some(_) => return (StatusCode::BAD_REQUEST, "Bad turn!").into_response(),
            None => {}
        }
        return ok(json!({
            "ison": dev.relay(i), "has_timer": false, "timer_started": 0,
            "timer_duration": 0, "timer_remaining": 0, "overpower": false, "source": "http",
        }));
    }
    if let Some(i) = path.strip_prefix("/meter/") {
        if dev.no_meter_endpoint {
            return not_found();
        }
        return match i.parse::<usize>().ok().filter(|&i| i < n) {
            Some(i) => ok(meter(i)),
            None => not_found(),
        };
    }
    not_found()
}

fn shelly_gen2(
    dev: &Device,
    path: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    uri: &str,
) -> Response {
    let n = dev.relays.lock().expect("lock").len();
    if path == "/shelly" {
        return ok(json!({
            "name": null, "id": REALM, "mac": "A8032AB12345", "slot": 0,
            "model": "SNSW-102P16EU", "gen": 2, "fw_id": "20231107-164738/1.0.8-g",
            "ver": "1.0.8", "app": "Plus2PM", "auth_en": dev.auth.is_some(),
            "auth_domain": dev.auth.as_ref().map(|_| REALM),
        }));
    }
    if let Some((_, password)) = &dev.auth
        && !digest_ok(headers, password, uri)
    {
        let challenge =
            format!("Digest qop=\"auth\", realm=\"{REALM}\", nonce=\"{NONCE}\", algorithm=SHA-256");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "",
        )
            .into_response();
    }
    let status = |i: usize| {
        let on = dev.relay(i).unwrap_or(false);
        json!({
            "id": i, "source": "HTTP_in", "output": on,
            "apower": if on { 12.5 } else { 0.0 }, "voltage": 230.1,
            "current": if on { 0.054 } else { 0.0 }, "freq": 50.0,
            "aenergy": {"total": 1234.5 + i as f64, "by_minute": [0.0, 0.0, 0.0], "minute_ts": 1},
            "temperature": {"tC": 40.0, "tF": 104.0},
        })
    };
    let bad_id = |id: Option<&String>| {
        json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"code": -105, "message": format!("Argument 'id', value {} not found!", id.map(String::as_str).unwrap_or(""))}),
        )
    };
    let id = q
        .get("id")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&i| i < n);
    match path {
        "/rpc/Shelly.GetStatus" => {
            let mut m = serde_json::Map::new();
            for i in 0..n {
                m.insert(format!("switch:{i}"), status(i));
            }
            m.insert("sys".into(), json!({"uptime": 100}));
            ok(Value::Object(m))
        }
        "/rpc/Switch.GetStatus" => match id {
            Some(i) => ok(status(i)),
            None => bad_id(q.get("id")),
        },
        "/rpc/Switch.Set" => {
            let on = match q.get("on").map(String::as_str) {
                Some("true") => true,
                Some("false") => false,
                _ => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"code": -103, "message": "Invalid argument 'on'"}),
                    );
                }
            };
            match id {
                Some(i) => ok(json!({"was_on": dev.switch(i, on)})),
                None => bad_id(q.get("id")),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"code": 404, "message": "No handler for the method"}),
        ),
    }
}

fn tasmota(dev: &Device, path: &str, q: &HashMap<String, String>) -> Response {
    if path != "/cm" {
        return not_found();
    }
    if let Some((user, password)) = &dev.auth
        && (q.get("user") != Some(user) || q.get("password") != Some(password))
    {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"WARNING": "Need user=<username>&password=<password>"}),
        );
    }
    let cmnd = q.get("cmnd").cloned().unwrap_or_default();
    let n = dev.relays.lock().expect("lock").len();
    let key = |i: usize| {
        if dev.single {
            "POWER".to_string()
        } else {
            format!("POWER{}", i + 1)
        }
    };
    let word = |on: bool| if on { "ON" } else { "OFF" };
    let lower = cmnd.to_ascii_lowercase();
    if lower == "status 11" {
        let mut sts = serde_json::Map::new();
        sts.insert("Time".into(), json!("2024-01-01T00:00:00"));
        sts.insert("Uptime".into(), json!("0T00:01:00"));
        for i in 0..n {
            sts.insert(key(i), json!(word(dev.relay(i).unwrap_or(false))));
        }
        return ok(json!({ "StatusSTS": Value::Object(sts) }));
    }
    if lower == "status 8" {
        // One meter per relay: lists; a single relay: plain values.
        let powers: Vec<f64> = (0..n)
            .map(|i| {
                if dev.relay(i).unwrap_or(false) {
                    20.0 * (i + 1) as f64
                } else {
                    0.0
                }
            })
            .collect();
        let energy = if n == 1 {
            json!({"TotalStartTime": "2024-01-01T00:00:00", "Total": 1.5, "Yesterday": 0.1,
                   "Today": 0.2, "Power": powers[0], "ApparentPower": powers[0],
                   "ReactivePower": 0, "Factor": 1.0, "Voltage": 231, "Current": 0.087})
        } else {
            json!({"TotalStartTime": "2024-01-01T00:00:00", "Total": [1.5, 2.25],
                   "Yesterday": [0.1, 0.1], "Today": [0.2, 0.2], "Power": powers,
                   "Factor": [1.0, 1.0], "Voltage": [231, 229], "Current": [0.087, 0.174]})
        };
        return ok(json!({"StatusSNS": {"Time": "2024-01-01T00:00:00", "ENERGY": energy}}));
    }
    if let Some(rest) = lower.strip_prefix("power") {
        let (num, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        let i = if num.is_empty() {
            Some(0)
        } else {
            num.parse::<usize>().ok().filter(|&i| i >= 1).map(|i| i - 1)
        };
        let Some(i) = i.filter(|&i| i < n) else {
            return ok(json!({"Command": "Unknown"}));
        };
        match arg {
            "" => {}
            "on" | "1" => {
                dev.switch(i, true);
            }
            "off" | "0" => {
                dev.switch(i, false);
            }
            _ => return ok(json!({"Command": "Error"})),
        }
        let mut m = serde_json::Map::new();
        m.insert(key(i), json!(word(dev.relay(i).unwrap_or(false))));
        return ok(Value::Object(m));
    }
    ok(json!({"Command": "Unknown"}))
}

/// A running test server; stops when dropped.
struct Server {
    addr: String,
    dev: Arc<Device>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(dev: Device) -> Server {
    let dev = Arc::new(dev);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let app = Router::new().fallback(handle).with_state(dev.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { addr, dev, task }
}

/// A server that accepts connections and never answers.
async fn silent_server() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn s(v: &str) -> YamlValue {
    YamlValue::String(v.into())
}

fn n(v: u64) -> YamlValue {
    YamlValue::Number(v.into())
}

fn driver(pdu: &str, name: &str, config: &[(&str, YamlValue)]) -> Box<dyn PduDriver> {
    let rec = PduRecord {
        driver: name.into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    };
    match driver_for(pdu, &rec) {
        Ok(d) => d,
        Err(e) => panic!("driver {name} for {pdu}: {e}"),
    }
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

async fn switch_and_check(d: &dyn PduDriver, port: &str, dev: &Device, index: usize) {
    d.set(port, PortState::On).await.expect("switch on");
    assert_eq!(dev.relay(index), Some(true), "device relay {index} is on");
    assert_eq!(d.get(port).await.expect("get"), PortState::On);
    d.set(port, PortState::Off).await.expect("switch off");
    assert_eq!(dev.relay(index), Some(false), "device relay {index} is off");
    assert_eq!(d.get(port).await.expect("get"), PortState::Off);
}

// ---------------------------------------------------------------------------------------
// Shelly generation 1.

#[tokio::test]
async fn shelly_gen1_switches_reads_and_measures() {
    let server = serve(Device::new(Kind::ShellyGen1, 2)).await;
    // No `generation`: the driver asks /shelly, which has no `gen` field on gen 1.
    let d = driver("SHELLY1", "shelly", &[("hostname", s(&server.addr))]);
    assert_eq!(d.driver_name(), "shelly");
    assert_eq!(d.ports().await.expect("ports"), vec!["0", "1"]);
    switch_and_check(d.as_ref(), "1", &server.dev, 1).await;
    assert_eq!(server.dev.relay(0), Some(false), "relay 0 untouched");
    assert!(
        server
            .dev
            .log
            .lock()
            .expect("lock")
            .iter()
            .any(|r| r == "/relay/1?turn=on"),
        "the documented endpoint was used"
    );

    d.set("1", PortState::On).await.expect("on");
    let m = d.measure("1").await.expect("measure").expect("a meter");
    assert!(close(m.power_w, 41.0), "{m:?}");
    // 240 watt-minutes = 4 Wh.
    assert!(close(m.energy_wh, 4.0), "{m:?}");
    assert_eq!((m.current_a, m.voltage_v), (None, None));

    for bad in ["2", "01", "x", ""] {
        let d2 = driver(
            "SHELLY1",
            "shelly",
            &[("hostname", s(&server.addr)), ("ports", n(2))],
        );
        let e = d2.set(bad, PortState::On).await.expect_err(bad);
        assert!(matches!(e, PowerError::BadPort { .. }), "{bad}: {e}");
    }
    let e = d.set("0", PortState::Unknown).await.expect_err("unknown");
    assert!(matches!(e, PowerError::BadState { .. }), "{e}");
}

#[tokio::test]
async fn shelly_gen1_basic_auth_and_status_meters() {
    let mut dev = Device::new(Kind::ShellyGen1, 1);
    dev.auth = Some(("farm".into(), "s3cret".into()));
    dev.no_meter_endpoint = true;
    let server = serve(dev).await;

    // Without credentials: 401, reported with the URL and a hint.
    let anon = driver("SHELLY-AUTH", "shelly", &[("hostname", s(&server.addr))]);
    let e = anon.set("0", PortState::On).await.expect_err("401");
    let msg = e.to_string();
    assert!(
        msg.contains("SHELLY-AUTH")
            && msg.contains("401")
            && msg.contains(&format!("http://{}/relay/0?turn=on", server.addr)),
        "{msg}"
    );
    assert_eq!(server.dev.relay(0), Some(false));

    // Wrong password: 401 too, and the password is not in the message.
    let wrong = driver(
        "SHELLY-AUTH",
        "shelly",
        &[
            ("hostname", s(&server.addr)),
            ("generation", n(1)),
            ("username", s("farm")),
            ("password", s("guess")),
        ],
    );
    let msg = wrong.get("0").await.expect_err("401").to_string();
    assert!(msg.contains("401") && !msg.contains("guess"), "{msg}");

    let d = driver(
        "SHELLY-AUTH",
        "shelly",
        &[
            ("hostname", s(&server.addr)),
            ("generation", n(1)),
            ("username", s("farm")),
            ("password", s("s3cret")),
        ],
    );
    switch_and_check(d.as_ref(), "0", &server.dev, 0).await;
    d.set("0", PortState::On).await.expect("on");
    // No /meter/0 here: the meter comes from /status.
    let m = d.measure("0").await.expect("measure").expect("a meter");
    assert!(close(m.power_w, 40.0) && close(m.energy_wh, 2.0), "{m:?}");
}

#[tokio::test]
async fn shelly_relay_that_does_not_switch_fails_set() {
    for kind in [Kind::ShellyGen1, Kind::ShellyGen2] {
        let mut dev = Device::new(kind, 1);
        dev.stuck = true;
        let server = serve(dev).await;
        let d = driver("STUCK", "shelly", &[("hostname", s(&server.addr))]);
        let start = Instant::now();
        let e = d.set("0", PortState::On).await.expect_err("stuck relay");
        let msg = e.to_string();
        assert!(
            msg.contains("STUCK")
                && msg.contains("port 0")
                && msg.contains("expected on")
                && msg.contains("seen off"),
            "{msg}"
        );
        // It retried for about 2 s, then gave up.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
            "{took:?}"
        );
        let reads = server
            .dev
            .log
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| *r == "/relay/0" || *r == "/rpc/Switch.GetStatus?id=0")
            .count();
        assert!(reads >= 3, "read back several times, got {reads}");
    }
}

// ---------------------------------------------------------------------------------------
// Shelly generation 2.

#[tokio::test]
async fn shelly_gen2_switches_reads_and_measures() {
    let server = serve(Device::new(Kind::ShellyGen2, 2)).await;
    let d = driver("SHELLY2", "shelly", &[("hostname", s(&server.addr))]);
    assert_eq!(d.ports().await.expect("ports"), vec!["0", "1"]);
    switch_and_check(d.as_ref(), "0", &server.dev, 0).await;
    assert!(
        server
            .dev
            .log
            .lock()
            .expect("lock")
            .iter()
            .any(|r| r == "/rpc/Switch.Set?id=0&on=true"),
        "the documented RPC was used"
    );

    let m = d.measure("1").await.expect("measure").expect("a meter");
    assert_eq!(
        m,
        PortMeasure {
            power_w: Some(0.0),
            energy_wh: Some(1235.5),
            current_a: Some(0.0),
            voltage_v: Some(230.1),
        }
    );
    d.set("1", PortState::On).await.expect("on");
    let m = d.measure("1").await.expect("measure").expect("a meter");
    assert!(
        close(m.power_w, 12.5) && close(m.current_a, 0.054) && close(m.energy_wh, 1235.5),
        "{m:?}"
    );

    // A port the device does not have: its RPC error is reported.
    let msg = d.get("7").await.expect_err("no switch:7").to_string();
    assert!(
        msg.contains("SHELLY2") && msg.contains("Switch.GetStatus?id=7") && msg.contains("500"),
        "{msg}"
    );
}

#[tokio::test]
async fn shelly_gen2_digest_auth() {
    let mut dev = Device::new(Kind::ShellyGen2, 1);
    dev.auth = Some(("admin".into(), "pa ss".into()));
    let server = serve(dev).await;

    let anon = driver("SHELLY2-AUTH", "shelly", &[("hostname", s(&server.addr))]);
    let msg = anon.get("0").await.expect_err("401").to_string();
    assert!(msg.contains("SHELLY2-AUTH") && msg.contains("401"), "{msg}");

    let wrong = driver(
        "SHELLY2-AUTH",
        "shelly",
        &[("hostname", s(&server.addr)), ("password", s("nope"))],
    );
    let msg = wrong.get("0").await.expect_err("401").to_string();
    assert!(msg.contains("401") && !msg.contains("nope"), "{msg}");

    let d = driver(
        "SHELLY2-AUTH",
        "shelly",
        &[
            ("hostname", s(&server.addr)),
            ("generation", n(2)),
            ("password", s("pa ss")),
        ],
    );
    switch_and_check(d.as_ref(), "0", &server.dev, 0).await;
    assert_eq!(d.ports().await.expect("ports"), vec!["0"]);
}

#[test]
fn shelly_config_errors() {
    let bad = |cfg: &[(&str, YamlValue)]| {
        let rec = PduRecord {
            driver: "shelly".into(),
            config: cfg
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            reserved_port_ids: vec![],
            port_labels: Default::default(),
        };
        match driver_for("CFG", &rec) {
            Ok(_) => panic!("expected a config error for {cfg:?}"),
            Err(e) => e.to_string(),
        }
    };
    let msg = bad(&[]);
    assert!(msg.contains("CFG") && msg.contains("\"hostname\""), "{msg}");
    let msg = bad(&[("hostname", s("http://h/x"))]);
    assert!(msg.contains("\"hostname\""), "{msg}");
    let msg = bad(&[("hostname", s("h")), ("generation", n(7))]);
    assert!(msg.contains("\"generation\""), "{msg}");
    let msg = bad(&[("hostname", s("h")), ("username", s("u"))]);
    assert!(msg.contains("\"password\""), "{msg}");
    let msg = bad(&[
        ("hostname", s("h")),
        ("generation", n(1)),
        ("password", s("p")),
    ]);
    assert!(msg.contains("\"username\""), "{msg}");
    let msg = bad(&[
        ("hostname", s("h")),
        ("generation", n(2)),
        ("username", s("bob")),
        ("password", s("p")),
    ]);
    assert!(
        msg.contains("\"username\"") && msg.contains("admin"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// Tasmota.

#[tokio::test]
async fn tasmota_switches_reads_and_measures() {
    let server = serve(Device::new(Kind::Tasmota, 2)).await;
    let d = driver("TASMOTA", "tasmota", &[("hostname", s(&server.addr))]);
    assert_eq!(d.driver_name(), "tasmota");
    assert_eq!(d.ports().await.expect("ports"), vec!["1", "2"]);
    switch_and_check(d.as_ref(), "2", &server.dev, 1).await;
    assert!(
        server
            .dev
            .log
            .lock()
            .expect("lock")
            .iter()
            .any(|r| r == "/cm?cmnd=Power2%20On"),
        "the documented command was used"
    );

    d.set("2", PortState::On).await.expect("on");
    let m = d.measure("2").await.expect("measure").expect("a meter");
    // Total 2.25 kWh = 2250 Wh.
    assert!(
        close(m.power_w, 40.0)
            && close(m.energy_wh, 2250.0)
            && close(m.voltage_v, 229.0)
            && close(m.current_a, 0.174),
        "{m:?}"
    );
    let m = d.measure("1").await.expect("measure").expect("a meter");
    assert!(close(m.power_w, 0.0) && close(m.energy_wh, 1500.0), "{m:?}");

    for bad in ["0", "33", "01", "x"] {
        let e = d.get(bad).await.expect_err(bad);
        assert!(matches!(e, PowerError::BadPort { .. }), "{bad}: {e}");
    }
    // Port 3 is a valid Tasmota id, but this device does not know Power3.
    let msg = d.get("3").await.expect_err("no relay 3").to_string();
    assert!(msg.contains("TASMOTA") && msg.contains("Power3"), "{msg}");
}

#[tokio::test]
async fn tasmota_single_relay_and_credentials() {
    let mut dev = Device::new(Kind::Tasmota, 1);
    dev.single = true;
    dev.auth = Some(("admin".into(), "t&p=1".into()));
    let server = serve(dev).await;

    let anon = driver("TASMOTA1", "tasmota", &[("hostname", s(&server.addr))]);
    let msg = anon
        .set("1", PortState::On)
        .await
        .expect_err("401")
        .to_string();
    assert!(
        msg.contains("TASMOTA1") && msg.contains("401") && msg.contains("/cm?cmnd=Power1%20On"),
        "{msg}"
    );

    let wrong = driver(
        "TASMOTA1",
        "tasmota",
        &[("hostname", s(&server.addr)), ("password", s("wrongpw"))],
    );
    let msg = wrong.get("1").await.expect_err("401").to_string();
    assert!(
        msg.contains("401") && !msg.contains("wrongpw") && !msg.contains("user=admin"),
        "the password is not shown: {msg}"
    );

    let d = driver(
        "TASMOTA1",
        "tasmota",
        &[
            ("hostname", s(&server.addr)),
            ("username", s("admin")),
            ("password", s("t&p=1")),
        ],
    );
    // {"POWER":"ON"} answers on a single-relay device.
    assert_eq!(d.ports().await.expect("ports"), vec!["1"]);
    switch_and_check(d.as_ref(), "1", &server.dev, 0).await;
    d.set("1", PortState::On).await.expect("on");
    let m = d.measure("1").await.expect("measure").expect("a meter");
    assert_eq!(
        m,
        PortMeasure {
            power_w: Some(20.0),
            energy_wh: Some(1500.0),
            current_a: Some(0.087),
            voltage_v: Some(231.0),
        }
    );
}

#[tokio::test]
async fn tasmota_relay_that_does_not_switch_fails_set() {
    let mut dev = Device::new(Kind::Tasmota, 2);
    dev.stuck = true;
    let server = serve(dev).await;
    let d = driver("TSTUCK", "tasmota", &[("hostname", s(&server.addr))]);
    let msg = d
        .set("1", PortState::On)
        .await
        .expect_err("stuck")
        .to_string();
    assert!(
        msg.contains("TSTUCK")
            && msg.contains("port 1")
            && msg.contains("expected on")
            && msg.contains("seen off"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// Broken devices.

#[tokio::test]
async fn http_500_and_bad_json_are_errors() {
    let broken = serve(Device::new(Kind::Broken, 0)).await;
    for name in ["shelly", "tasmota"] {
        let mut cfg = vec![("hostname", s(&broken.addr))];
        if name == "shelly" {
            cfg.push(("generation", n(2)));
        }
        let d = driver("BROKEN", name, &cfg);
        let msg = d
            .set("1", PortState::On)
            .await
            .expect_err("500")
            .to_string();
        assert!(
            msg.contains("BROKEN")
                && msg.contains("500")
                && msg.contains("internal error")
                && msg.contains(&format!("http://{}/", broken.addr)),
            "{name}: {msg}"
        );
    }
    // Generation detection fails too, naming /shelly.
    let d = driver("BROKEN", "shelly", &[("hostname", s(&broken.addr))]);
    let msg = d.get("0").await.expect_err("500").to_string();
    assert!(msg.contains("/shelly") && msg.contains("500"), "{msg}");

    let garbage = serve(Device::new(Kind::Garbage, 0)).await;
    for name in ["shelly", "tasmota"] {
        let d = driver("GARBAGE", name, &[("hostname", s(&garbage.addr))]);
        let msg = d.get("1").await.expect_err("not JSON").to_string();
        assert!(
            msg.contains("GARBAGE") && msg.contains("not JSON") && msg.contains("<html>"),
            "{name}: {msg}"
        );
    }
}

#[tokio::test]
async fn silent_device_times_out() {
    let (addr, task) = silent_server().await;
    struct Abort(JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _guard = Abort(task);
    for name in ["shelly", "tasmota"] {
        let d = driver(
            "SILENT",
            name,
            &[("hostname", s(&addr)), ("timeout", s("0.5"))],
        );
        let start = Instant::now();
        let e = d.set("1", PortState::Off).await.expect_err("timeout");
        assert!(matches!(e, PowerError::Timeout { .. }), "{name}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("SILENT") && msg.contains(&addr) && msg.contains("no answer"),
            "{msg}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }
    // Nothing listens: a connection error naming the URL.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_addr = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let d = driver("DOWN", "tasmota", &[("hostname", s(&closed_addr))]);
    let msg = d.get("1").await.expect_err("refused").to_string();
    assert!(
        msg.contains("DOWN") && msg.contains(&closed_addr) && msg.contains("connect"),
        "{msg}"
    );
}
