//! The web dashboard (`/`, `/ui/…`), the browser's live console (a WebSocket on
//! SALAD's console stream), who a token is (`/api/v1/auth`) and the Prometheus
//! exposition (`/metrics`).

use std::fmt::Write as _;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;

use crate::{ApiError, ApiResult, AppState, Role, authorize, json};

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

/// xterm.js and its CSS (npm @xterm/xterm), embedded at build time (see build.rs);
/// empty when they were not installed then.
const XTERM_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xterm.js"));
const XTERM_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xterm.css"));

/// The files the dashboard loads from `/ui/vendor/` (nothing else is served there, so
/// no request path reaches another file): embedded, or from `FARMGATE_UI_VENDOR_DIR`
/// when the build had none.
const VENDOR_FILES: &[(&str, &str, &[u8])] = &[
    ("xterm.js", "text/javascript; charset=utf-8", XTERM_JS),
    ("xterm.css", "text/css; charset=utf-8", XTERM_CSS),
];

fn text(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    text("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn app_js() -> Response {
    text("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn style_css() -> Response {
    text("text/css; charset=utf-8", STYLE_CSS)
}

pub(crate) async fn vendor(
    State(st): State<AppState>,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    let Some((name, ctype, embedded)) = VENDOR_FILES.iter().find(|(n, _, _)| *n == file) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no vendor file {file:?} (only xterm.js and xterm.css)"),
        ));
    };
    let cached = [
        (header::CONTENT_TYPE, *ctype),
        (header::CACHE_CONTROL, "max-age=3600"),
    ];
    if let Some(dir) = &st.extras.ui_vendor_dir {
        let path = dir.join(name);
        return match tokio::fs::read(&path).await {
            Ok(data) => Ok((cached, data).into_response()),
            Err(e) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("FARMGATE_UI_VENDOR_DIR: {}: {e}", path.display()),
            )),
        };
    }
    if embedded.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{name} was not built in (run `npm ci` in crates/farmgate-api/ui before building, or set FARMGATE_UI_VENDOR_DIR to a directory holding xterm.js and xterm.css); the dashboard shows plain text meanwhile"
            ),
        ));
    }
    Ok((cached, *embedded).into_response())
}

/// `GET /api/v1/auth`: the role of the bearer token given (`admin`, `submit`, `none`).
pub(crate) async fn whoami(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let role = if authorize(&st, &headers, Role::Admin).is_ok() {
        "admin"
    } else if authorize(&st, &headers, Role::Submit).is_ok() {
        "submit"
    } else {
        "none"
    };
    json(&serde_json::json!({ "role": role }))
}

/// Whether an admin may type into DUT `id`'s console now: only into a machine no job
/// uses and that is set aside, RETIRED or on a reserved PDU port.
fn interactive_refusal(st: &AppState, id: &str) -> Option<String> {
    let view = match st.exec.dut(id) {
        Ok(v) => v,
        Err(e) => return Some(e.to_string()),
    };
    if let Some(job) = &view.current_job {
        return Some(format!("job {job} is using the machine"));
    }
    let reserved = match (&view.record.pdu, &view.record.pdu_port_id) {
        (Some(pdu), Some(port)) => st.exec.port_reserved(pdu, port),
        _ => false,
    };
    if view.state == farmgate_wire::DutState::Retired || reserved {
        None
    } else {
        Some(
            "the machine is in service: retire it or reserve its PDU port for interactive use"
                .into(),
        )
    }
}

/// `GET /api/v1/dut/<id>/console/ws`: the machine's console output, live, as binary
/// messages. A first text message `{"token": "<admin token>"}` asks to type too; the
/// answer is `{"mode": "read-write"}` or `{"mode": "read-only", "reason": …}`; then text
/// or binary messages are written to the console.
pub(crate) async fn console_ws(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let view = st.exec.dut(&id)?;
    let salad =
        st.extras.salad.clone().ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "this gateway relays no consoles")
        })?;
    let id = view.id;
    let Some(output) = salad.watch_console(&id) else {
        // Said on the socket, where the page shows it (a browser does not see the body
        // of a refused upgrade).
        let why = format!(
            "no console stream for machine {id}: SALAD does not know it yet, or it has too many viewers"
        );
        return Ok(ws.on_upgrade(move |mut socket| async move {
            let msg = serde_json::json!({ "error": why }).to_string();
            let _ = socket.send(Message::Text(msg.into())).await;
            let _ = socket.send(Message::Close(None)).await;
        }));
    };
    Ok(ws.on_upgrade(move |socket| console_session(st, salad, id, output, socket)))
}

async fn console_session(
    st: AppState,
    salad: farmgate_console::Salad,
    id: String,
    mut output: tokio::sync::broadcast::Receiver<bytes::Bytes>,
    socket: WebSocket,
) {
    let (mut tx, mut rx) = socket.split();
    let mut admin = false;
    loop {
        tokio::select! {
            out = output.recv() => match out {
                Ok(b) => {
                    if tx.send(Message::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let note = format!("\r\n[farmgate: {n} pieces of console output lost: this viewer was too slow]\r\n");
                    if tx.send(Message::Binary(note.into_bytes().into())).await.is_err() {
                        break;
                    }
                }
                Err(RecvError::Closed) => break,
            },
            msg = rx.next() => {
                let input: Vec<u8> = match msg {
                    Some(Ok(Message::Text(t))) => {
                        if !admin && let Some(token) = token_request(t.as_str()) {
                            let mut headers = HeaderMap::new();
                            if let Ok(v) = format!("Bearer {token}").parse() {
                                headers.insert(header::AUTHORIZATION, v);
                            }
                            let answer = if authorize(&st, &headers, Role::Admin).is_err() {
                                serde_json::json!({"mode": "read-only", "reason": "that is not the admin token"})
                            } else {
                                admin = true;
                                match interactive_refusal(&st, &id) {
                                    None => serde_json::json!({"mode": "read-write"}),
                                    Some(why) => serde_json::json!({"mode": "read-only", "reason": why}),
                                }
                            };
                            if tx.send(Message::Text(answer.to_string().into())).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        t.as_str().as_bytes().to_vec()
                    }
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                // Checked at every keystroke: a job may have taken the machine since.
                if admin && interactive_refusal(&st, &id).is_none() {
                    salad.write_input(&id, &input).await;
                }
            }
        }
    }
}

/// The token of a `{"token": "…"}` message.
fn token_request(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("token")?.as_str().map(str::to_string)
}

/// Text-format writer with the HELP/TYPE lines written once per family.
struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, l: &[(&str, &str)], v: f64) {
        let _ = writeln!(self.out, "{name}{} {}", labels(l), num(v));
    }

    fn histogram(
        &mut self,
        name: &str,
        l: &[(&str, &str)],
        h: &farmgate_executor::metrics::Histogram,
    ) {
        for (b, c) in h.bounds.iter().zip(&h.cumulative) {
            let le = num(*b);
            let mut with = l.to_vec();
            with.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with, *c as f64);
        }
        let mut with = l.to_vec();
        with.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &with, h.count as f64);
        self.sample(&format!("{name}_sum"), l, h.sum);
        self.sample(&format!("{name}_count"), l, h.count as f64);
    }
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    let snap = {
        let exec = st.exec.clone();
        match tokio::task::spawn_blocking(move || exec.metrics()).await {
            Ok(s) => s,
            Err(e) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}"))
                    .into_response();
            }
        }
    };
    let mut x = Exposition { out: String::new() };

    x.family("farmgate_duts", "gauge", "DUTs in each state.");
    for state in [
        "RETIRED",
        "QUICK_CHECK",
        "TRAINING",
        "IDLE",
        "QUEUED",
        "RUNNING",
    ] {
        let n = snap.duts_by_state.get(state).copied().unwrap_or(0);
        x.sample("farmgate_duts", &[("state", state)], n as f64);
    }
    x.family(
        "farmgate_duts_unavailable",
        "gauge",
        "DUTs whose PDU does not answer.",
    );
    x.sample(
        "farmgate_duts_unavailable",
        &[],
        snap.duts_unavailable as f64,
    );
    x.family(
        "farmgate_queue_depth",
        "gauge",
        "User jobs waiting for a DUT.",
    );
    x.sample("farmgate_queue_depth", &[], snap.queue_depth as f64);
    x.family(
        "farmgate_queue_oldest_wait_seconds",
        "gauge",
        "How long the oldest queued job has waited (0 when none waits).",
    );
    x.sample(
        "farmgate_queue_oldest_wait_seconds",
        &[],
        snap.oldest_queued_seconds.unwrap_or(0.0),
    );
    x.family(
        "farmgate_jobs",
        "gauge",
        "Jobs in the database by kind, state and final status.",
    );
    for c in &snap.job_counts {
        let status = c.status.map(|s| s.to_string()).unwrap_or_default();
        x.sample(
            "farmgate_jobs",
            &[
                ("kind", c.kind.as_str()),
                ("state", c.state.as_str()),
                ("status", &status),
            ],
            c.count as f64,
        );
    }
    let jobs = &snap.jobs;
    for (name, help, map) in [
        (
            "farmgate_job_queue_wait_seconds",
            "Submission to assignment, jobs over since the gateway started.",
            &jobs.queue_wait,
        ),
        (
            "farmgate_job_duration_seconds",
            "Start to end of the jobs over since the gateway started.",
            &jobs.job_duration,
        ),
        (
            "farmgate_boot_cycle_duration_seconds",
            "From a boot's power cycle to the next one or the end of its job.",
            &jobs.boot_cycle,
        ),
    ] {
        x.family(name, "histogram", help);
        for (kind, h) in map {
            x.histogram(name, &[("kind", kind)], h);
        }
    }
    x.family(
        "farmgate_boot_cycles_total",
        "counter",
        "Boot cycles of the jobs over since the gateway started.",
    );
    for (kind, n) in &jobs.boot_cycles {
        x.sample("farmgate_boot_cycles_total", &[("kind", kind)], *n as f64);
    }
    x.family(
        "farmgate_boot_retries_total",
        "counter",
        "Boot cycles beyond each job's first (retries).",
    );
    for (kind, n) in &jobs.boot_retries {
        x.sample("farmgate_boot_retries_total", &[("kind", kind)], *n as f64);
    }

    x.family(
        "farmgate_pdu_up",
        "gauge",
        "1 when the PDU answers its polls, 0 when it does not.",
    );
    for (pdu, s) in &snap.pdus {
        x.sample(
            "farmgate_pdu_up",
            &[("pdu", pdu)],
            if s.down_reason().is_some() { 0.0 } else { 1.0 },
        );
    }
    x.family(
        "farmgate_pdu_port_state",
        "gauge",
        "Port power as last read: 1 on, 0 off, -1 unknown.",
    );
    for (pdu, s) in &snap.pdus {
        for (port, p) in &s.ports {
            let v = match p.state {
                farmgate_wire::PortState::On => 1.0,
                farmgate_wire::PortState::Off => 0.0,
                farmgate_wire::PortState::Unknown => -1.0,
            };
            x.sample(
                "farmgate_pdu_port_state",
                &[("pdu", pdu), ("port", port)],
                v,
            );
        }
    }
    type Pick = fn(&farmgate_wire::PortMeasure) -> Option<f64>;
    let measures: [(&str, &str, Pick); 4] = [
        (
            "farmgate_pdu_port_power_watts",
            "Active power of a port, where the PDU measures it.",
            |m| m.power_w,
        ),
        (
            "farmgate_pdu_port_energy_watt_hours",
            "Energy counter of a port, where the PDU measures it.",
            |m| m.energy_wh,
        ),
        (
            "farmgate_pdu_port_current_amperes",
            "Current of a port, where the PDU measures it.",
            |m| m.current_a,
        ),
        (
            "farmgate_pdu_port_voltage_volts",
            "Voltage of a port, where the PDU measures it.",
            |m| m.voltage_v,
        ),
    ];
    for (name, help, pick) in measures {
        x.family(name, "gauge", help);
        for (pdu, s) in &snap.pdus {
            for (port, p) in &s.ports {
                if let Some(v) = p.measure.as_ref().and_then(pick) {
                    x.sample(name, &[("pdu", pdu), ("port", port)], v);
                }
            }
        }
    }
    x.family("farmgate_pdu_switches_total", "counter", "Switch commands of the gateway daemon (REST, discovery, power-offs; the switches of job processes are not counted here) by result, after retries.");
    for (pdu, s) in &snap.pdus {
        let c = &s.counters;
        x.sample(
            "farmgate_pdu_switches_total",
            &[("pdu", pdu), ("result", "ok")],
            c.switches_ok as f64,
        );
        x.sample(
            "farmgate_pdu_switches_total",
            &[("pdu", pdu), ("result", "failed")],
            c.switches_failed as f64,
        );
    }
    x.family(
        "farmgate_pdu_reads_total",
        "counter",
        "PDU reads of the gateway daemon (its polls) by result.",
    );
    for (pdu, s) in &snap.pdus {
        let c = &s.counters;
        x.sample(
            "farmgate_pdu_reads_total",
            &[("pdu", pdu), ("result", "ok")],
            c.reads_ok as f64,
        );
        x.sample(
            "farmgate_pdu_reads_total",
            &[("pdu", pdu), ("result", "failed")],
            c.reads_failed as f64,
        );
    }
    x.family(
        "farmgate_pdu_retries_total",
        "counter",
        "PDU operations of the gateway daemon tried again after a failure.",
    );
    for (pdu, s) in &snap.pdus {
        x.sample(
            "farmgate_pdu_retries_total",
            &[("pdu", pdu)],
            s.counters.retries as f64,
        );
    }

    if let Some(salad) = &st.extras.salad {
        x.family(
            "farmgate_console_bytes_total",
            "counter",
            "Console bytes relayed, by machine and direction.",
        );
        for (machine, b) in salad.console_bytes() {
            x.sample(
                "farmgate_console_bytes_total",
                &[("machine", &machine), ("direction", "from_machine")],
                b.from_machine as f64,
            );
            x.sample(
                "farmgate_console_bytes_total",
                &[("machine", &machine), ("direction", "to_machine")],
                b.to_machine as f64,
            );
        }
    }
    if let Some(cache) = &st.extras.cache {
        let c = cache.stats();
        x.family("farmgate_cache_requests_total", "counter", "Artifact cache requests: hit (from disk), miss (started a download), coalesced (joined one).");
        x.sample(
            "farmgate_cache_requests_total",
            &[("result", "hit")],
            c.hits as f64,
        );
        x.sample(
            "farmgate_cache_requests_total",
            &[("result", "miss")],
            c.misses as f64,
        );
        x.sample(
            "farmgate_cache_requests_total",
            &[("result", "coalesced")],
            c.coalesced as f64,
        );
        x.family(
            "farmgate_cache_upstream_bytes_total",
            "counter",
            "Bytes the artifact cache fetched upstream.",
        );
        x.sample(
            "farmgate_cache_upstream_bytes_total",
            &[],
            c.upstream_bytes as f64,
        );
        x.family(
            "farmgate_cache_upstream_errors_total",
            "counter",
            "Failed upstream fetches of the artifact cache.",
        );
        x.sample(
            "farmgate_cache_upstream_errors_total",
            &[],
            c.upstream_errors as f64,
        );
        x.family(
            "farmgate_cache_evictions_total",
            "counter",
            "Artifact cache entries evicted to stay under its size bound.",
        );
        x.sample("farmgate_cache_evictions_total", &[], c.evictions as f64);
        x.family(
            "farmgate_cache_bytes",
            "gauge",
            "Bytes of complete artifact cache entries.",
        );
        x.sample("farmgate_cache_bytes", &[], c.bytes as f64);
        x.family(
            "farmgate_cache_entries",
            "gauge",
            "Complete artifact cache entries.",
        );
        x.sample("farmgate_cache_entries", &[], c.entries as f64);
    }
    if let Some(reg) = &st.extras.registry {
        let r = reg.stats();
        x.family(
            "farmgate_registry_requests_total",
            "counter",
            "Registry cache requests by object and result.",
        );
        x.sample(
            "farmgate_registry_requests_total",
            &[("object", "manifest"), ("result", "hit")],
            r.manifest_hits as f64,
        );
        x.sample(
            "farmgate_registry_requests_total",
            &[("object", "manifest"), ("result", "miss")],
            r.manifest_misses as f64,
        );
        x.sample(
            "farmgate_registry_requests_total",
            &[("object", "blob"), ("result", "hit")],
            r.blob_hits as f64,
        );
        x.sample(
            "farmgate_registry_requests_total",
            &[("object", "blob"), ("result", "miss")],
            r.blob_misses as f64,
        );
        x.sample(
            "farmgate_registry_requests_total",
            &[("object", "blob"), ("result", "coalesced")],
            r.coalesced as f64,
        );
        x.family(
            "farmgate_registry_upstream_bytes_total",
            "counter",
            "Bytes the registry cache fetched upstream.",
        );
        x.sample(
            "farmgate_registry_upstream_bytes_total",
            &[],
            r.upstream_bytes as f64,
        );
        x.family(
            "farmgate_registry_evicted_bytes_total",
            "counter",
            "Blob bytes evicted to stay under the registry cache's bound.",
        );
        x.sample(
            "farmgate_registry_evicted_bytes_total",
            &[],
            r.evicted_bytes as f64,
        );
        x.family(
            "farmgate_registry_blob_store_bytes",
            "gauge",
            "Bytes of cached blobs.",
        );
        x.sample(
            "farmgate_registry_blob_store_bytes",
            &[],
            r.blob_store_bytes as f64,
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        x.out,
    )
        .into_response()
}
