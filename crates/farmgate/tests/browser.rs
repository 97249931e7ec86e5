//! Browser tests of the web dashboard: the real daemon and simulated farm of the e2e
//! harness, a real headless Chromium driven over WebDriver (Debian's chromium and
//! chromium-driver), the real `farmctl` submitting jobs.
//!
//! With `FARMGATE_SCREENSHOTS=1`, `dashboard_screenshots` writes docs/screenshots/*.png.

mod common;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port, in a process group of its own: on drop the whole group
/// (chromedriver and the Chromium it started) is killed, even when the test failed.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{CHROMEDRIVER} does not start: {e} (apt-get install chromium-driver)")
            });
        let driver = Driver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver does not listen on port {port} after 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    async fn connect(&self) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{}", self.port);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"],
                "binary": CHROMIUM,
            },
        }}});
        let v = call(
            &http,
            reqwest::Method::POST,
            &format!("{base}/session"),
            Some(caps),
        )
        .await
        .unwrap_or_else(|e| panic!("WebDriver session with {CHROMIUM}: {e}"));
        let session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("WebDriver session: no sessionId in {v}"))
            .to_string();
        Client {
            http,
            url: format!("{base}/session/{session}"),
        }
    }
}

/// One WebDriver command; answers its `value`, or the driver's error in words.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut req = http.request(method.clone(), url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = r.status();
    let text = r
        .text()
        .await
        .map_err(|e| format!("{method} {url}: body: {e}"))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{method} {url}: {e}: {text}"))?;
    if !status.is_success() {
        return Err(format!("{method} {url}: {status}: {}", v["value"]));
    }
    Ok(v["value"].clone())
}

/// A W3C WebDriver session (the few commands these tests use).
struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        call(&self.http, method, &format!("{}{path}", self.url), body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn execute(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("element {css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element (after clearing it).
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("screenshot: {e}"))
    }

    async fn close(self) {
        let _ = call(&self.http, reqwest::Method::DELETE, &self.url, None).await;
    }
}

/// Standard base64 (the screenshots WebDriver sends).
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for (i, c) in s.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return Err(format!("not base64 at byte {i}: {c:#x}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The last `n` characters of the gateway's logs, for failure messages.
fn log_tail(gw: &Gateway, n: usize) -> String {
    let logs = gw.logs();
    let start = logs.len().saturating_sub(n);
    let start = (start..logs.len())
        .find(|i| logs.is_char_boundary(*i))
        .unwrap_or(logs.len());
    logs[start..].to_string()
}

/// Polls `check` every 100 ms until it answers `Ok`; `Err` carries what was last seen.
async fn wait_until<T>(
    gw: &Gateway,
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; last seen: {last}\n--- gateway log (tail)\n{}",
                log_tail(gw, 6000)
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs JavaScript in the page (`return …`).
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script).await
}

/// The text of the console on the page: the rows of xterm.js, or its `<pre>` fallback.
async fn console_text(c: &Client) -> String {
    let v = js(
        c,
        r#"const box = document.querySelector('#console');
           if (!box) return '';
           const rows = box.querySelector('.xterm-rows');
           if (rows) return Array.from(rows.children).map(r => r.textContent).join('\n');
           const pre = box.querySelector('pre');
           return (pre || box).textContent;"#,
    )
    .await;
    v.as_str().unwrap_or_default().replace('\u{a0}', " ")
}

/// Visible text of the first element matching `css` (None when absent or hidden).
async fn visible_text(c: &Client, css: &str) -> Option<String> {
    let v = js(
        c,
        &format!(
            r#"const e = document.querySelector({});
               if (!e || e.offsetParent === null) return null;
               return e.textContent;"#,
            json!(css)
        ),
    )
    .await;
    v.as_str().map(str::to_string)
}

async fn goto(c: &Client, url: &str) {
    c.goto(url).await;
}

/// (id, state) of every DUT the API knows.
async fn api_duts(gw: &Gateway) -> Vec<(String, String)> {
    let v: Value = gw.get_json("/api/v1/duts").await;
    let mut out: Vec<(String, String)> = v["duts"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|d| {
                    (
                        d["id"].as_str().unwrap_or_default().to_string(),
                        d["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// (id, state shown) of every row of the page's DUT table.
async fn page_duts(c: &Client) -> Vec<(String, String)> {
    let v = js(
        c,
        r#"return Array.from(document.querySelectorAll('#duts tbody tr[data-dut-id]'))
             .filter(r => r.dataset.dutId)
             .map(r => [r.dataset.dutId, (r.querySelector('.state') || {}).textContent || '']);"#,
    )
    .await;
    let mut out: Vec<(String, String)> = v
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r[0].as_str().unwrap_or_default().to_string(),
                        r[1].as_str()
                            .unwrap_or_default()
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The id of the newest user job, once the gateway knows it.
async fn wait_user_job(gw: &Gateway) -> String {
    wait_until(gw, "the submitted job is listed", LIMIT, async || {
        let v: Value = gw.get_json("/api/v1/jobs?limit=20").await;
        v["jobs"]
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["kind"] == "user"))
            .and_then(|j| j["job_id"].as_str().map(str::to_string))
            .ok_or_else(|| v.to_string())
    })
    .await
}

async fn wait_job_finished(gw: &Gateway, id: &str) -> Value {
    wait_until(gw, "the job finishes", LIMIT, async || {
        let j: Value = gw.get_json(&format!("/api/v1/job/{id}")).await;
        if j["state"] == "FINISHED" {
            Ok(j)
        } else {
            Err(j.to_string())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_lists_the_duts_of_the_api() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true).dut(
        2,
        &["sim", "gpu:b"],
        true,
    ))
    .await;
    let driver = Driver::start();
    let c = driver.connect().await;
    goto(&c, &format!("{}/", gw.url())).await;
    // States may move while we look: compare the page with the API until they agree.
    let shown = wait_until(&gw, "the DUT table matches the API", LIMIT, async || {
        let api = api_duts(&gw).await;
        let page = page_duts(&c).await;
        if api.len() == 2 && page == api {
            Ok(page)
        } else {
            Err(format!("api {api:?}, page {page:?}"))
        }
    })
    .await;
    assert!(shown.iter().any(|(id, _)| *id == mac(1)), "{shown:?}");
    assert!(shown.iter().any(|(id, _)| *id == mac(2)), "{shown:?}");
    // The PDU and its ports are shown too, and nothing went wrong.
    let ports = js(
        &c,
        "return document.querySelectorAll('#pdus .pdu[data-pdu=\"SIM\"] tbody tr[data-port-id]').length;",
    )
    .await;
    assert_eq!(ports.as_u64(), Some(4), "4 ports of the SIM PDU");
    assert_eq!(visible_text(&c, "#banner").await, None, "no error banner");
    // Without a token there are no admin actions.
    assert_eq!(
        visible_text(&c, "#role").await.as_deref(),
        Some("not logged in")
    );
    assert_eq!(visible_text(&c, "#pdus button[data-action]").await, None);
    c.close().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_page_shows_the_console_live_and_the_final_status() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let driver = Driver::start();
    let c = driver.connect().await;
    let job = gw.write_job(
        "live.yml",
        &sim_job(
            "print hello from the dut; sleep 4000; print second line; poweroff",
            "",
            "",
        ),
    );
    let farmctl = gw
        .farmctl(&["run", path_str(&job)])
        .spawn()
        .expect("farmctl starts");
    let id = wait_user_job(&gw).await;
    goto(&c, &format!("{}/#/job/{id}", gw.url())).await;
    let opened_in: Value = gw.get_json(&format!("/api/v1/job/{id}")).await;

    // The first line shows while the job still runs: it is streamed, not loaded at the end.
    let (text, live) = wait_until(&gw, "the first console line", LIMIT, async || {
        let t = console_text(&c).await;
        if t.contains("hello from the dut") {
            let j: Value = gw.get_json(&format!("/api/v1/job/{id}")).await;
            Ok((t, j["state"] != "FINISHED"))
        } else {
            Err(t)
        }
    })
    .await;
    // A real terminal emulator renders it (xterm.js built into the gateway by setup).
    let xterm = js(
        &c,
        "return document.querySelector('#console .xterm-rows') !== null;",
    )
    .await;
    assert_eq!(
        xterm,
        json!(true),
        "the console is xterm.js, not the text fallback"
    );
    assert!(
        live || !text.contains("second line"),
        "the page was opened while the job was {} but showed its output only at the end:\n{text}",
        opened_in["state"]
    );
    let final_status = wait_until(&gw, "the final status", LIMIT, async || match visible_text(
        &c,
        "#job-final",
    )
    .await
    {
        Some(t) => Ok(t),
        None => Err(console_text(&c).await),
    })
    .await;
    let j = wait_job_finished(&gw, &id).await;
    let status = j["status"].as_str().expect("finished job has a status");
    assert!(
        final_status.contains(status),
        "page says {final_status:?}, API says {status}"
    );
    // The final status (REST) and the console's last line (the stream, rendered by
    // xterm.js on its next frame) come by different ways: wait for the line.
    let last_line = format!("job finished: {status}");
    let text = wait_until(&gw, "the final line in the console", LIMIT, async || {
        let t = console_text(&c).await;
        if t.contains(&last_line) {
            Ok(t)
        } else {
            Err(t)
        }
    })
    .await;
    assert!(text.contains("second line"), "{text}");
    assert!(
        text.contains("[farmgate]"),
        "gateway messages shown:\n{text}"
    );
    let out = tokio::time::timeout(LIMIT, farmctl.wait_with_output())
        .await
        .expect("farmctl ends")
        .expect("farmctl output");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("second line"),
        "farmctl saw the job too"
    );
    c.close().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_logs_in_and_retires_a_dut() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    gw.wait_state(1, farmgate_wire::DutState::Idle, LIMIT).await;
    let driver = Driver::start();
    let c = driver.connect().await;
    let id = mac(1);
    goto(&c, &format!("{}/#/dut/{id}", gw.url())).await;
    wait_until(
        &gw,
        "the DUT page shows the DUT",
        LIMIT,
        async || match visible_text(&c, "#dut-state").await {
            Some(s) if s == "IDLE" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert_eq!(
        visible_text(&c, "button[data-action=\"retire\"]").await,
        None,
        "no admin action before logging in"
    );

    // A wrong token is refused, plainly.
    c.type_into("#login-token", "not-a-token").await;
    c.click("#login-button").await;
    let banner = wait_until(&gw, "the error banner", LIMIT, async || {
        visible_text(&c, "#banner-text")
            .await
            .ok_or_else(|| "no banner".to_string())
    })
    .await;
    assert!(banner.contains("not known"), "{banner}");

    c.type_into("#login-token", ADMIN).await;
    c.click("#login-button").await;
    wait_until(
        &gw,
        "the role shows admin",
        LIMIT,
        async || match visible_text(&c, "#role").await {
            Some(r) if r == "admin" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let stored = js(&c, "return sessionStorage.getItem('farmgate.token');").await;
    assert_eq!(stored.as_str(), Some(ADMIN), "token kept for the session");

    wait_until(&gw, "the retire button shows", LIMIT, async || {
        visible_text(&c, "button[data-action=\"retire\"]")
            .await
            .ok_or_else(|| "hidden".to_string())
    })
    .await;
    c.click("button[data-action=\"retire\"]").await;
    gw.wait_state(1, farmgate_wire::DutState::Retired, LIMIT)
        .await;
    // The page follows: RETIRED, and the action offered is now "activate".
    wait_until(&gw, "the page shows RETIRED", LIMIT, async || {
        let state = visible_text(&c, "#dut-state").await;
        let activate = visible_text(&c, "button[data-action=\"activate\"]").await;
        match (&state, &activate) {
            (Some(s), Some(_)) if s == "RETIRED" => Ok(()),
            _ => Err(format!("state {state:?}, activate {activate:?}")),
        }
    })
    .await;
    // A retired machine is the admin's to type into: the console says read-write.
    wait_until(
        &gw,
        "the console is read-write",
        LIMIT,
        async || match visible_text(&c, "#console-mode").await {
            Some(m) if m.starts_with("read-write") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    c.close().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dut_page_streams_the_serial_console_over_the_websocket() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    gw.wait_state(1, farmgate_wire::DutState::Idle, LIMIT).await;
    let driver = Driver::start();
    let c = driver.connect().await;
    goto(&c, &format!("{}/#/dut/{}", gw.url(), mac(1))).await;
    wait_until(
        &gw,
        "the console WebSocket is open",
        LIMIT,
        async || match visible_text(&c, "#console-status").await {
            Some(s) if s == "live" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // Not logged in: watching only.
    let mode = visible_text(&c, "#console-mode").await.unwrap_or_default();
    assert!(mode.starts_with("read-only"), "{mode}");
    // The DUT had no job when the page loaded: what shows now came over the WebSocket.
    let job = gw.write_job(
        "ws.yml",
        &sim_job("print console line over the websocket; poweroff", "", ""),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert!(r.stdout.contains("console line over"), "{}", r.all());
    wait_until(
        &gw,
        "the live console shows the job's output",
        LIMIT,
        async || {
            let t = console_text(&c).await;
            if t.contains("console line over the websocket") {
                Ok(())
            } else {
                Err(t)
            }
        },
    )
    .await;
    c.close().await;
    gw.stop().await;
}

/// Screenshots of the three pages; written to docs/screenshots/ with FARMGATE_SCREENSHOTS=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_screenshots() {
    let gw = Gateway::start(
        GatewayOptions::default()
            .dut(1, &["sim", "gpu:a"], true)
            .dut(2, &["sim", "gpu:b"], true)
            .dut(3, &["sim"], false),
    )
    .await;
    let driver = Driver::start();
    let c = driver.connect().await;
    let write = std::env::var("FARMGATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");
    let shot = async |name: &str| {
        let png = c.screenshot().await;
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{name}: not a real PNG ({} bytes)",
            png.len()
        );
        if write {
            std::fs::create_dir_all(&dir).expect("docs/screenshots");
            std::fs::write(dir.join(name), &png).expect("write screenshot");
        }
    };

    // A finished job first, so that the lists are not empty.
    let done = gw.write_job(
        "done.yml",
        &sim_job(
            "print booting the test OS; print running 12 tests; print all 12 tests passed; poweroff",
            "",
            "",
        ),
    );
    let r = gw.farmctl_run(&["run", path_str(&done)], LIMIT).await;
    assert!(r.stderr.contains("finished"), "{}", r.all());
    let done_id = wait_user_job(&gw).await;

    // A running job, seen from its DUT's page.
    let job = gw.write_job(
        "running.yml",
        &sim_job(
            "print Linux version 6.1.0 (farmgate sim); print login: root; print running the test suite; sleep 8000; poweroff",
            "",
            "",
        ),
    );
    let _farmctl = gw
        .farmctl(&["run", path_str(&job)])
        .spawn()
        .expect("farmctl starts");
    let running = wait_until(&gw, "a DUT runs the second job", LIMIT, async || {
        let v: Value = gw.get_json("/api/v1/duts").await;
        v["duts"]
            .as_object()
            .and_then(|m| {
                m.values().find(|d| {
                    d["state"] == "RUNNING" && d["current_job"].as_str() != Some(done_id.as_str())
                })
            })
            .and_then(|d| d["id"].as_str().map(str::to_string))
            .ok_or_else(|| v.to_string())
    })
    .await;
    goto(&c, &format!("{}/", gw.url())).await;
    c.type_into("#login-token", ADMIN).await;
    c.click("#login-button").await;
    wait_until(
        &gw,
        "the role shows admin",
        LIMIT,
        async || match visible_text(&c, "#role").await {
            Some(r) if r == "admin" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    wait_until(&gw, "the overview is filled", LIMIT, async || {
        let n = js(&c, "return document.querySelectorAll('#duts tbody tr[data-dut-id]:not([data-dut-id=\"\"])').length + document.querySelectorAll('#jobs tbody tr[data-job-id]:not([data-job-id=\"\"])').length;").await;
        if n.as_u64().unwrap_or(0) >= 5 {
            Ok(())
        } else {
            Err(n.to_string())
        }
    })
    .await;
    shot("overview.png").await;

    goto(&c, &format!("{}/#/dut/{running}", gw.url())).await;
    wait_until(&gw, "the DUT console shows the job", LIMIT, async || {
        let t = console_text(&c).await;
        if t.contains("running the test suite") {
            Ok(())
        } else {
            Err(t)
        }
    })
    .await;
    shot("dut.png").await;

    goto(&c, &format!("{}/#/job/{done_id}", gw.url())).await;
    wait_until(
        &gw,
        "the job page shows the final status",
        LIMIT,
        async || {
            visible_text(&c, "#job-final")
                .await
                .ok_or_else(|| "no final status".to_string())
        },
    )
    .await;
    shot("job.png").await;
    c.close().await;
    gw.stop().await;
}
