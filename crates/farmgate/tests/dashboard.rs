//! The dashboard's server side without a browser: `/metrics` read by a Prometheus
//! text-format parser, and the console WebSocket (live output, who may type).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use prometheus_parse::{Sample, Scrape, Value};
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(90);

async fn scrape(gw: &Gateway) -> Scrape {
    let r = gw
        .http
        .get(format!("{}/metrics", gw.url()))
        .send()
        .await
        .expect("GET /metrics");
    assert!(r.status().is_success(), "{}", r.status());
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let body = r.text().await.expect("body");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of the sample `name` whose labels include all of `want`.
fn value(s: &Scrape, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let matches = |x: &Sample| {
        x.metric == name
            && want
                .iter()
                .all(|(k, v)| x.labels.get(k).is_some_and(|l| l == *v))
    };
    s.samples
        .iter()
        .find(|x| matches(x))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_duts_jobs_boots_pdus_consoles_and_caches() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true).dut(
        2,
        &["sim"],
        true,
    ))
    .await;
    let before = scrape(&gw).await;
    assert_eq!(
        value(&before, "farmgate_duts", &[("state", "IDLE")]),
        Some(2.0)
    );
    assert_eq!(
        value(&before, "farmgate_duts", &[("state", "RUNNING")]),
        Some(0.0)
    );
    assert_eq!(value(&before, "farmgate_queue_depth", &[]), Some(0.0));
    // Every family is announced with its type.
    for (name, ty) in [
        ("farmgate_duts", "gauge"),
        ("farmgate_job_duration_seconds", "histogram"),
        ("farmgate_boot_cycles_total", "counter"),
        ("farmgate_pdu_port_state", "gauge"),
        ("farmgate_cache_requests_total", "counter"),
    ] {
        let doc = before
            .docs
            .get(name)
            .unwrap_or_else(|| panic!("no HELP for {name}"));
        assert!(!doc.is_empty());
        let body = gw.get_text("/metrics").await;
        assert!(body.contains(&format!("# TYPE {name} {ty}")), "{name} {ty}");
    }

    // Each family's samples follow its TYPE line, together (text format 0.0.4).
    let body = gw.get_text("/metrics").await;
    let mut family = String::new();
    let mut seen = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            assert!(
                seen.insert(family.clone()),
                "family {family} announced twice"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf).filter(|b| *b == family))
            .unwrap_or(name);
        assert_eq!(base, family, "sample {line:?} outside its family's group");
    }
    // A job, to be measured once it is over.
    let job = gw.write_job("m.yml", &sim_job("print metrics job; poweroff", "", ""));
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, Some(2), "COMPLETE: {}", r.all());
    let deadline = Instant::now() + LIMIT;
    let after = loop {
        let s = scrape(&gw).await;
        if value(&s, "farmgate_boot_cycles_total", &[("kind", "user")]).is_some() {
            break s;
        }
        assert!(Instant::now() < deadline, "no boot cycles counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        value(
            &after,
            "farmgate_jobs",
            &[
                ("kind", "user"),
                ("state", "FINISHED"),
                ("status", "COMPLETE")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "farmgate_boot_cycles_total", &[("kind", "user")]),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "farmgate_boot_retries_total", &[("kind", "user")]),
        Some(0.0)
    );
    let durations: Vec<&Sample> = after
        .samples
        .iter()
        .filter(|x| {
            x.metric == "farmgate_job_duration_seconds" && x.labels.get("kind") == Some("user")
        })
        .collect();
    assert_eq!(durations.len(), 1, "one histogram per kind");
    match &durations[0].value {
        Value::Histogram(h) => {
            let inf = h
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("+Inf bucket");
            assert_eq!(inf.count, 1.0);
            let mut last = 0.0;
            for b in h.iter() {
                assert!(b.count >= last, "buckets are cumulative");
                last = b.count;
            }
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // The PDU answers and its ports are read; the console bytes of the job are counted.
    let pdu = gw.mars().pdus.keys().next().cloned().expect("a PDU");
    assert_eq!(
        value(&after, "farmgate_pdu_up", &[("pdu", &pdu)]),
        Some(1.0)
    );
    assert!(
        value(
            &after,
            "farmgate_pdu_port_state",
            &[("pdu", &pdu), ("port", "1")]
        )
        .is_some()
    );
    assert!(
        value(
            &after,
            "farmgate_pdu_reads_total",
            &[("pdu", &pdu), ("result", "ok")]
        )
        .unwrap_or(0.0)
            > 0.0
    );
    let from = value(
        &after,
        "farmgate_console_bytes_total",
        &[("machine", &mac(1)), ("direction", "from_machine")],
    )
    .or_else(|| {
        value(
            &after,
            "farmgate_console_bytes_total",
            &[("machine", &mac(2)), ("direction", "from_machine")],
        )
    })
    .unwrap_or(0.0);
    assert!(from > 0.0, "console bytes of the job's DUT");
    assert_eq!(
        value(
            &after,
            "farmgate_cache_requests_total",
            &[("result", "hit")]
        ),
        Some(0.0)
    );
    assert!(value(&after, "farmgate_registry_blob_store_bytes", &[]).is_some());
    gw.stop().await;
}

async fn ws_connect(
    gw: &Gateway,
    id: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "{}/api/v1/dut/{id}/console/ws",
        gw.url().replacen("http://", "ws://", 1)
    );
    let (ws, _) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket connects in time")
        .expect("WebSocket upgrade");
    ws
}

/// Asks for write access with `token`; returns the server's answer.
async fn ask_mode<S>(ws: &mut S, token: &str) -> HashMap<String, String>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    let _ = ws
        .send(Message::Text(
            serde_json::json!({"token": token}).to_string().into(),
        ))
        .await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(t.as_str()).expect("mode answer is JSON");
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no mode answer: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_websocket_streams_output_and_lets_an_admin_type_only_into_a_machine_set_aside() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let id = mac(1);
    let mut ws = ws_connect(&gw, &id).await;
    // The job's console output arrives live on the socket.
    let job = gw.write_job(
        "ws.yml",
        &sim_job("print hello through the websocket; poweroff", "", ""),
    );
    let run = gw
        .farmctl(&["run", path_str(&job)])
        .spawn()
        .expect("farmctl");
    let mut seen = String::new();
    let deadline = Instant::now() + LIMIT;
    while !seen.contains("hello through the websocket") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("console output did not arrive ({other:?}); so far: {seen}"),
        }
    }
    let out = tokio::time::timeout(LIMIT, run.wait_with_output())
        .await
        .expect("job ends")
        .expect("farmctl");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not the admin token: read-only. The admin, on a machine in service: read-only too.
    let m = ask_mode(&mut ws, "not-the-token").await;
    assert_eq!(m["mode"], "read-only");
    assert!(m["reason"].contains("not the admin token"), "{m:?}");
    let m = ask_mode(&mut ws, ADMIN).await;
    assert_eq!(m["mode"], "read-only");
    assert!(m["reason"].contains("in service"), "{m:?}");
    let _ = ws.close(None).await;
    let typed = |s: &prometheus_parse::Scrape| {
        value(
            s,
            "farmgate_console_bytes_total",
            &[("machine", &id), ("direction", "to_machine")],
        )
        .unwrap_or(0.0)
    };
    let before = typed(&scrape(&gw).await);
    // Set aside (retired): the admin may type, and the keystrokes reach the console.
    let r = gw
        .http
        .patch(format!("{}/api/v1/dut/{id}", gw.url()))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"is_retired": true}))
        .send()
        .await
        .expect("retire");
    assert!(r.status().is_success(), "{}", r.status());
    let mut ws = ws_connect(&gw, &id).await;
    let m = ask_mode(&mut ws, ADMIN).await;
    assert_eq!(m["mode"], "read-write", "{m:?}");
    ws.send(Message::Text("uname -a\r".into()))
        .await
        .expect("type");
    let deadline = Instant::now() + LIMIT;
    loop {
        let now = typed(&scrape(&gw).await);
        if now >= before + 9.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keystrokes never reached the console ({now} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An unknown machine has no console socket.
    let url = format!(
        "{}/api/v1/dut/00:11:22:33:44:55/console/ws",
        gw.url().replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404)
        }
        other => panic!("expected a 404, got {:?}", other.map(|_| ())),
    }
    gw.stop().await;
}
