//! Power switching through farmgate's REST API vs pdudaemon's HTTP API, same "PDU".
//!
//! The PDU is a shell script in a temp dir: `pdu.sh on|off PORT` sleeps 10 ms, then
//! writes `on`/`off` into the file `pPORT`; on the broken ports (7 and 8 of 0..9) it
//! writes nothing and exits 1. Both tools run it:
//!
//! - **farmgate**: a real `farmgate serve` (the e2e harness) with a `shell` PDU `BENCH`
//!   whose `on`/`off` run the script and whose `status` reads the file (so farmgate reads
//!   each switched port back); each port has a retired machine with `pdu_off_delay: 0`
//!   (no minimum off time, as pdudaemon has none, and no jobs). Commands are
//!   `PATCH /api/v1/pdu/BENCH/port/<n>` `{"state": "on"|"off"}` with the admin token.
//! - **pdudaemon** (`python3 -m pip install pdudaemon`): its HTTP listener on loopback,
//!   one `localcmdline` PDU `bench` with `cmd_on`/`cmd_off` running the same script.
//!   Commands are `GET /power/control/on|off?hostname=bench&port=<n>`.
//!
//! Each tool gets the same sequence of commands, one at a time (like a job runner):
//! command `i` switches port `i % 10`, on during even rounds of ten, off during odd ones,
//! so every command changes the port's file (all files start `off`) and one in five hits
//! a broken port. Each command is timed from sending the request to the answer; a
//! thread polls the port's file every millisecond from the request on and records when
//! it first holds the requested state (until 1 s after the answer). Every command on a
//! broken port fails (the script exits 1 and writes nothing; the bench checks that those
//! files still read `off` at the end), every other one works (its file changes).
//!
//! `cargo bench -p farmgate --bench pdu` (the bench builds the `farmgate` binary itself);
//! `FARMGATE_BENCH_COMMANDS` (default 100) sets the commands per tool, after one untimed
//! warm-up command each.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::{ADMIN, Gateway, GatewayOptions, free_port, path_str};
use farmgate_wire::{DutRecord, PduRecord, YamlValue};

/// Ports of the PDU.
const PORTS: u32 = 10;
/// Ports whose command always fails.
const BROKEN: [u32; 2] = [7, 8];
/// Bound of one answer (farmgate retries a failing command with 0.2 + 0.4 s of backoff).
const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// How long after the answer the port's file is still watched.
const EFFECT_LIMIT: Duration = Duration::from_secs(1);
/// How often the watcher reads the port's file.
const WATCH_EVERY: Duration = Duration::from_millis(1);
/// Bound of a daemon's start.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The command-line PDU both tools run.
const SCRIPT: &str = r#"#!/bin/sh
# pdu.sh on|off PORT: a relay that takes 10 ms; ports 7 and 8 are broken.
sleep 0.01
case "$2" in
  7|8) echo "pdu.sh: port $2 does not switch" >&2; exit 1 ;;
esac
echo "$1" > "$(dirname "$0")/p$2"
"#;

/// One timed command.
#[derive(Debug)]
struct Sample {
    port: u32,
    /// HTTP status of the answer (0: no answer).
    status: u16,
    /// Request sent → answer (headers and body) received.
    answer: Duration,
    /// Request sent → the port's file first held the requested state.
    switched: Option<Duration>,
    /// Whether the file held the requested state when the answer arrived.
    switched_at_answer: bool,
}

impl Sample {
    fn reported_ok(&self) -> bool {
        self.status == 200
    }
}

/// A child process killed (and reaped) on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port_file(dir: &Path, port: u32) -> PathBuf {
    dir.join(format!("p{port}"))
}

fn reads(dir: &Path, port: u32, state: &str) -> bool {
    std::fs::read_to_string(port_file(dir, port)).is_ok_and(|s| s.trim() == state)
}

/// The PDU directory with the script, every port file `off`.
fn setup_pdu_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("pdu.sh");
    std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    for port in 0..PORTS {
        let f = port_file(dir, port);
        std::fs::write(&f, "off\n").with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

/// Notes in `run` a broken port whose file was written.
fn check_broken_untouched(dir: &Path, run: &mut Run) {
    for port in BROKEN {
        if !reads(dir, port, "off") {
            run.anomalies
                .push(format!("the file of broken port {port} changed"));
        }
    }
}

/// The `i`th command of the sequence: (port, state).
fn command(i: usize) -> (u32, &'static str) {
    let port = (i % PORTS as usize) as u32;
    let state = if (i / PORTS as usize).is_multiple_of(2) {
        "on"
    } else {
        "off"
    };
    (port, state)
}

/// Watches `port`'s file on a thread from now on; `stop_at` (set after the answer) ends
/// the watch, as does a hard bound.
struct Watcher {
    thread: std::thread::JoinHandle<Option<Duration>>,
    stop_at: Arc<Mutex<Option<Instant>>>,
}

impl Watcher {
    fn start(dir: &Path, port: u32, state: &'static str, start: Instant) -> Watcher {
        let stop_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let stop = stop_at.clone();
        let dir = dir.to_path_buf();
        let hard_stop = start + ANSWER_LIMIT + EFFECT_LIMIT + Duration::from_secs(1);
        let thread = std::thread::spawn(move || {
            loop {
                if reads(&dir, port, state) {
                    return Some(start.elapsed());
                }
                let now = Instant::now();
                let soft = *stop.lock().unwrap_or_else(|e| e.into_inner());
                if now >= hard_stop || soft.is_some_and(|t| now >= t) {
                    return None;
                }
                std::thread::sleep(WATCH_EVERY);
            }
        });
        Watcher { thread, stop_at }
    }

    /// Watches on for [`EFFECT_LIMIT`] at most, then returns when the file held the state.
    fn finish(self) -> anyhow::Result<Option<Duration>> {
        *self.stop_at.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + EFFECT_LIMIT);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the file watcher thread panicked"))
    }
}

/// Sends one command built by `req`, timing the answer and the file.
async fn timed(
    dir: &Path,
    port: u32,
    state: &'static str,
    req: reqwest::RequestBuilder,
) -> anyhow::Result<(Sample, String)> {
    let start = Instant::now();
    let watcher = Watcher::start(dir, port, state, start);
    let answer = async {
        let r = req.send().await?;
        let status = r.status().as_u16();
        let body = r.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    let result = tokio::time::timeout(ANSWER_LIMIT, answer).await;
    let answered = start.elapsed();
    let switched_at_answer = reads(dir, port, state);
    let switched = watcher.finish()?;
    let (status, body) = match result {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => (0, format!("request failed: {e}")),
        Err(_) => (0, format!("no answer within {ANSWER_LIMIT:?}")),
    };
    Ok((
        Sample {
            port,
            status,
            answer: answered,
            switched,
            switched_at_answer,
        },
        body,
    ))
}

/// What a tool's run gives: the samples and one answer of each kind, for the report.
struct Run {
    samples: Vec<Sample>,
    /// A body answered to a command on a broken port.
    broken_body: Option<String>,
    /// Problems seen in answers to commands that worked (wrong state in a 200...).
    anomalies: Vec<String>,
}

async fn run_farmgate(commands: usize) -> anyhow::Result<Run> {
    let gw = Gateway::start(GatewayOptions {
        ports: 1,
        ..GatewayOptions::default()
    })
    .await;
    let dir = gw.dir.path().join("bench-pdu");
    setup_pdu_dir(&dir)?;
    let script = dir.join("pdu.sh");
    let script = path_str(&script);
    let d = path_str(&dir);
    let mut db = gw.mars();
    let cfg: BTreeMap<String, YamlValue> = [
        ("on", format!("sh {script} on {{port}}")),
        ("off", format!("sh {script} off {{port}}")),
        ("status", format!("cat {d}/p{{port}}")),
        ("ports", PORTS.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), YamlValue::String(v)))
    .collect();
    db.pdus.insert(
        "BENCH".into(),
        PduRecord {
            driver: "shell".into(),
            config: cfg,
            reserved_port_ids: vec![],
            port_labels: Default::default(),
        },
    );
    for port in 0..PORTS {
        db.duts.insert(
            format!("52:54:00:bb:00:{port:02x}"),
            DutRecord {
                base_name: Some("bench".into()),
                pdu: Some("BENCH".into()),
                pdu_port_id: Some(port.to_string()),
                pdu_off_delay: 0.0,
                is_retired: true,
                ..DutRecord::default()
            },
        );
    }
    let mars = serde_yaml_ng::to_string(&db).context("serializing the MaRS DB")?;
    std::fs::write(gw.mars_path(), mars).context("writing the MaRS DB")?;

    let http = reqwest::Client::builder()
        .timeout(ANSWER_LIMIT)
        .build()
        .context("HTTP client")?;
    let base = format!("{}/api/v1/pdu/BENCH/port", gw.url());
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Ok(r) = http.get(format!("{base}/0")).send().await
            && r.status().is_success()
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "farmgate never listed PDU BENCH within {START_LIMIT:?}:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let patch = |port: u32, state: &str| {
        http.patch(format!("{base}/{port}"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "state": state }))
    };
    // Warm-up: port 0 is already off.
    let (warm, body) = timed(&dir, 0, "off", patch(0, "off")).await?;
    ensure!(
        warm.reported_ok(),
        "farmgate's warm-up command failed ({}): {body}\n{}",
        warm.status,
        gw.logs()
    );

    let mut run = Run {
        samples: Vec::with_capacity(commands),
        broken_body: None,
        anomalies: vec![],
    };
    for i in 0..commands {
        let (port, state) = command(i);
        let (sample, body) = timed(&dir, port, state, patch(port, state)).await?;
        if sample.reported_ok() {
            let v: serde_json::Value = serde_json::from_str(&body)
                .with_context(|| format!("farmgate's answer to command {i} is not JSON: {body}"))?;
            if v["state"] != state {
                run.anomalies
                    .push(format!("command {i} ({state} port {port}): 200 with {v}"));
            }
        } else if BROKEN.contains(&port) {
            run.broken_body.get_or_insert(body);
        } else {
            run.anomalies.push(format!(
                "command {i} ({state} port {port}): {} {body}",
                sample.status
            ));
        }
        run.samples.push(sample);
    }
    check_broken_untouched(&dir, &mut run);
    gw.stop().await;
    Ok(run)
}

async fn run_pdudaemon(commands: usize) -> anyhow::Result<Run> {
    let tmp = tempfile::tempdir().context("temp dir")?;
    let dir = tmp.path().join("bench-pdu");
    setup_pdu_dir(&dir)?;
    let script = dir.join("pdu.sh");
    let script = path_str(&script);
    let port = free_port();
    let conf = serde_json::json!({
        "daemon": {
            "hostname": "127.0.0.1",
            "port": port,
            "listener": "http",
            "logging_level": "INFO",
        },
        "pdus": {
            "bench": {
                "driver": "localcmdline",
                // The HTTP listener passes the port as a string: `%d` would raise.
                "cmd_on": format!("sh {script} on %s"),
                "cmd_off": format!("sh {script} off %s"),
            }
        }
    });
    let conf_path = tmp.path().join("pdudaemon.conf");
    std::fs::write(&conf_path, conf.to_string()).context("writing pdudaemon.conf")?;
    let log_path = tmp.path().join("pdudaemon.log");
    let log = std::fs::File::create(&log_path).context("creating pdudaemon.log")?;
    let child = std::process::Command::new("pdudaemon")
        .arg("--conf")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log")?)
        .stderr(log)
        .spawn()
        .context("starting pdudaemon (python3 -m pip install pdudaemon)")?;
    let mut daemon = Reaped(child);
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let http = reqwest::Client::builder()
        .timeout(ANSWER_LIMIT)
        .build()
        .context("HTTP client")?;
    let base = format!("http://127.0.0.1:{port}/power/control");
    let deadline = Instant::now() + START_LIMIT;
    loop {
        // Without parameters it answers 500 "Invalid request": it listens.
        if http.get(format!("{base}/on")).send().await.is_ok() {
            break;
        }
        if let Ok(Some(status)) = daemon.0.try_wait() {
            bail!("pdudaemon exited at start ({status}):\n{}", logs());
        }
        ensure!(
            Instant::now() < deadline,
            "pdudaemon did not answer within {START_LIMIT:?}:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let get = |port: u32, state: &str| {
        http.get(format!("{base}/{state}"))
            .query(&[("hostname", "bench"), ("port", &port.to_string())])
    };
    let (warm, body) = timed(&dir, 0, "off", get(0, "off")).await?;
    ensure!(
        warm.reported_ok(),
        "pdudaemon's warm-up command failed ({}): {body}\n{}",
        warm.status,
        logs()
    );

    let mut run = Run {
        samples: Vec::with_capacity(commands),
        broken_body: None,
        anomalies: vec![],
    };
    for i in 0..commands {
        let (port, state) = command(i);
        let (sample, body) = timed(&dir, port, state, get(port, state)).await?;
        if BROKEN.contains(&port) {
            run.broken_body
                .get_or_insert(format!("{} {}", sample.status, body.trim()));
        } else if !sample.reported_ok() {
            run.anomalies.push(format!(
                "command {i} ({state} port {port}): {} {body}",
                sample.status
            ));
        }
        run.samples.push(sample);
    }
    check_broken_untouched(&dir, &mut run);
    drop(daemon);
    Ok(run)
}

/// Nearest-rank percentile `p` (0..=100) of `v`, in ms.
fn pct(v: &[Duration], p: f64) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    format!("{:.1}", s[rank.min(s.len()) - 1].as_secs_f64() * 1000.0)
}

fn max_ms(v: &[Duration]) -> String {
    v.iter()
        .max()
        .map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}

fn report(runs: &[(&str, &Run)]) {
    println!();
    println!(
        "| tool | answer p50 ms | answer p99 ms | answer max ms | answer p50 ms, working / broken ports | switched (file) p50 ms | switched p99 ms | switched max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, run) in runs {
        let all: Vec<Duration> = run.samples.iter().map(|s| s.answer).collect();
        let working: Vec<Duration> = run
            .samples
            .iter()
            .filter(|s| !BROKEN.contains(&s.port))
            .map(|s| s.answer)
            .collect();
        let broken: Vec<Duration> = run
            .samples
            .iter()
            .filter(|s| BROKEN.contains(&s.port))
            .map(|s| s.answer)
            .collect();
        let switched: Vec<Duration> = run
            .samples
            .iter()
            .filter(|s| !BROKEN.contains(&s.port))
            .filter_map(|s| s.switched)
            .collect();
        println!(
            "| {name} | {} | {} | {} | {} / {} | {} | {} | {} |",
            pct(&all, 50.0),
            pct(&all, 99.0),
            max_ms(&all),
            pct(&working, 50.0),
            pct(&broken, 50.0),
            pct(&switched, 50.0),
            pct(&switched, 99.0),
            max_ms(&switched),
        );
    }
    println!();
    println!(
        "| tool | commands | failed (broken port) | of those reported failed | worked | of those 200 with the port switched | worked but reported failed |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, run) in runs {
        let (broken, working): (Vec<&Sample>, Vec<&Sample>) =
            run.samples.iter().partition(|s| BROKEN.contains(&s.port));
        let reported = broken.iter().filter(|s| !s.reported_ok()).count();
        // A command on a working port worked when its file changed (all do, see below).
        let worked: Vec<&&Sample> = working.iter().filter(|s| s.switched.is_some()).collect();
        let ok_switched = worked
            .iter()
            .filter(|s| s.reported_ok() && s.switched_at_answer)
            .count();
        let false_failures = worked.iter().filter(|s| !s.reported_ok()).count();
        println!(
            "| {name} | {} | {} | {reported}/{} | {} | {ok_switched}/{} | {false_failures} |",
            run.samples.len(),
            broken.len(),
            broken.len(),
            worked.len(),
            worked.len(),
        );
        let never = working.len() - worked.len();
        if never > 0 {
            println!("{name}: {never} commands on working ports never switched their port");
        }
    }
    println!();
    for (name, run) in runs {
        if let Some(b) = &run.broken_body {
            println!("{name}, answer to a command on a broken port: {}", b.trim());
        }
        for a in &run.anomalies {
            println!("{name}, unexpected: {a}");
        }
    }
}

/// The installed pdudaemon's version, as pip knows it.
fn pdudaemon_version() -> String {
    std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('pdudaemon'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "(version unknown)".into())
}

async fn run() -> anyhow::Result<()> {
    let commands: usize = std::env::var("FARMGATE_BENCH_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    println!(
        "pdu bench: {commands} sequential on/off commands per tool over {PORTS} ports, ports {BROKEN:?} broken; {}",
        machine()
    );
    let farmgate = run_farmgate(commands).await.context("farmgate run")?;
    println!("farmgate: done");
    let pdudaemon = run_pdudaemon(commands).await.context("pdudaemon run")?;
    println!("pdudaemon: done");
    let label = format!("pdudaemon {}", pdudaemon_version());
    report(&[("farmgate", &farmgate), (label.as_str(), &pdudaemon)]);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("pdu: benchmark");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
