//! Dispatch benchmark: a real `farmgate serve` with many simulated DUTs and a deep queue.
//!
//! Every DUT is a simulated machine behind the vpdu server of `farmgate-testkit`, with its
//! console on a pty read by SALAD and its boot script fetched over HTTP; every job is
//! submitted over the REST API like `farmctl run -w` does, and runs in its own `run-job`
//! process. Measured:
//! - submit-to-power-on latency: from the client sending the job to the PDU switching the
//!   DUT on, paired per DUT (the k-th job started on a DUT is its k-th power-on);
//! - jobs dispatched per second while the queue is full;
//! - peak RSS of the daemon, and of the largest job runner process.
//!
//! `cargo bench -p farmgate --bench dispatch` (1,000 DUTs, 10,000 jobs); override with
//! `FARMGATE_BENCH_DUTS` and `FARMGATE_BENCH_JOBS`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Gateway, GatewayOptions, SUBMIT};
use farmgate_wire::{DutState, JobView};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `VmHWM` (peak RSS) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Largest peak RSS among the `farmgate run-job` processes alive now.
fn runner_peak_rss_kib() -> (usize, u64) {
    let mut count = 0;
    let mut max = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmd.split(|b| *b == 0).any(|a| a == b"run-job") {
            count += 1;
            max = max.max(peak_rss_kib(pid).unwrap_or(0));
        }
    }
    (count, max)
}

fn job_yaml() -> String {
    common::sim_job("print bench job; poweroff", "", "")
}

async fn submit(http: &reqwest::Client, url: &str, yaml: &str) -> anyhow::Result<String> {
    let metadata = serde_json::json!({ "version": 1, "wait": true });
    let form = reqwest::multipart::Form::new()
        .text("metadata", metadata.to_string())
        .text("job", yaml.to_string());
    let r = http
        .post(format!("{url}/api/v1/jobs"))
        .bearer_auth(SUBMIT)
        .multipart(form)
        .send()
        .await?;
    let status = r.status();
    let body: serde_json::Value = r.json().await?;
    anyhow::ensure!(status.is_success(), "submit answered {status}: {body}");
    body["job_id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow::anyhow!("no job_id in {body}"))
}

async fn run() -> anyhow::Result<()> {
    let duts = env_usize("FARMGATE_BENCH_DUTS", 1000) as u32;
    let jobs = env_usize("FARMGATE_BENCH_JOBS", 10_000);
    farmgate_executor::raise_fd_limit()?;

    let mut opts = GatewayOptions {
        ports: duts + 1,
        off_delay: 0.0,
        ..GatewayOptions::default()
    };
    for port in 1..=duts {
        opts = opts.dut(port, &["sim"], true);
    }
    let log = std::env::var("FARMGATE_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    opts = opts.env("FARMGATE_LOG", &log);
    let setup = Instant::now();
    let mut gw = Gateway::start(opts).await;
    let daemon_pid = gw.daemon.as_ref().map(|c| c.id()).unwrap_or(0);
    let url = gw.url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;

    // All DUTs idle before the clock starts.
    loop {
        let list: serde_json::Value = http
            .get(format!("{url}/api/v1/duts"))
            .send()
            .await?
            .json()
            .await?;
        let idle = list["duts"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter(|d| d["state"] == DutState::Idle.to_string())
                    .count()
            })
            .unwrap_or(0);
        if idle == duts as usize {
            break;
        }
        anyhow::ensure!(
            setup.elapsed() < Duration::from_secs(300),
            "only {idle} of {duts} DUTs became IDLE"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "setup: {duts} DUTs idle after {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // Submit everything from 8 concurrent clients, remembering when each job was sent.
    let yaml = Arc::new(job_yaml());
    let start = Instant::now();
    let (wall_ref, instant_ref) = (chrono::Utc::now(), Instant::now());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, url, yaml, next) = (http.clone(), url.clone(), yaml.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                let t = Instant::now();
                let id = submit(&http, &url, &yaml).await?;
                sent.push((id, t));
            }
            anyhow::Ok(sent)
        }));
    }
    let mut submitted: BTreeMap<String, Instant> = BTreeMap::new();
    for t in tasks {
        submitted.extend(t.await??);
    }
    let submit_wall = start.elapsed();
    println!(
        "submitted {jobs} jobs in {:.1} s ({:.0} submits/s)",
        submit_wall.as_secs_f64(),
        jobs as f64 / submit_wall.as_secs_f64()
    );

    // Wait for the queue to drain, sampling the runners' memory on the way.
    let mut runner_rss = 0u64;
    let mut max_runners = 0usize;
    let finished: Vec<JobView> = loop {
        let (n, rss) = runner_peak_rss_kib();
        max_runners = max_runners.max(n);
        runner_rss = runner_rss.max(rss);
        let body: serde_json::Value = http
            .get(format!("{url}/api/v1/jobs?state=FINISHED&limit=10000"))
            .send()
            .await?
            .json()
            .await?;
        let list: Vec<JobView> = serde_json::from_value(body["jobs"].clone())?;
        let done = list
            .iter()
            .filter(|j| submitted.contains_key(&j.job_id))
            .count();
        if done >= jobs {
            break list;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(3600),
            "only {done} of {jobs} jobs finished within an hour"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let wall = start.elapsed();
    let daemon_rss = peak_rss_kib(daemon_pid).unwrap_or(0);

    // Pair jobs with power-ons, per DUT, in start order.
    let mut per_dut: BTreeMap<String, Vec<&JobView>> = BTreeMap::new();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for j in finished
        .iter()
        .filter(|j| submitted.contains_key(&j.job_id))
    {
        *statuses
            .entry(j.status.map(|s| s.to_string()).unwrap_or_default())
            .or_default() += 1;
        if j.status != Some(farmgate_wire::JobStatus::Complete) {
            *failures
                .entry(j.reason.clone().unwrap_or_default())
                .or_default() += 1;
        }
        if let Some(d) = &j.dut_id {
            per_dut.entry(d.clone()).or_default().push(j);
        }
    }
    // A job's power-on is the first one on its DUT at or after the job started (the
    // gateway's wall clock, converted to this process's monotonic clock; 5 ms of slack
    // for the millisecond precision of the timestamps).
    let to_instant = |rfc3339: &str| -> Option<Instant> {
        let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
        let delta = t.with_timezone(&chrono::Utc) - wall_ref;
        match delta.to_std() {
            Ok(after) => Some(instant_ref + after),
            Err(_) => instant_ref.checked_sub((-delta).to_std().ok()?),
        }
    };
    let mut latencies = Vec::new();
    let mut first_wave = Vec::new();
    let mut power_ons = Vec::new();
    for port in 1..=duts {
        let mac = farmgate_testkit::mac_of(port);
        let ons: Vec<Instant> = gw
            .farm
            .power_log(port)
            .into_iter()
            .filter(|(t, on)| *on && *t >= start)
            .map(|(t, _)| t)
            .collect();
        if let Some(list) = per_dut.get_mut(&mac) {
            list.sort_by(|a, b| a.started_at.cmp(&b.started_at));
            for (k, job) in list.iter().enumerate() {
                let (Some(sent), Some(started)) = (
                    submitted.get(&job.job_id),
                    job.started_at.as_deref().and_then(to_instant),
                ) else {
                    continue;
                };
                let slack = started
                    .checked_sub(Duration::from_millis(5))
                    .unwrap_or(started);
                if let Some(on) = ons.iter().find(|t| **t >= slack) {
                    latencies.push(on.saturating_duration_since(*sent));
                    if k == 0 {
                        first_wave.push(on.saturating_duration_since(*sent));
                    }
                }
            }
        }
        power_ons.extend(ons);
    }
    latencies.sort();
    first_wave.sort();
    power_ons.sort();
    // Dispatch rate: power-ons per second between the first and the last power-on.
    let dispatch_rate = match (power_ons.first(), power_ons.last()) {
        (Some(a), Some(b)) if b > a => power_ons.len() as f64 / (*b - *a).as_secs_f64(),
        _ => 0.0,
    };

    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| simulated DUTs | {duts} |");
    println!("| jobs | {jobs} ({statuses:?}) |");
    println!(
        "| submit-to-power-on p50 / p99 (all jobs, includes queueing) | {} / {} |",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99))
    );
    println!(
        "| submit-to-power-on p50 / p99 (first job of each of {} DUTs) | {} / {} |",
        first_wave.len(),
        ms(percentile(&first_wave, 0.50)),
        ms(percentile(&first_wave, 0.99))
    );
    println!("| jobs dispatched per second (power-ons/s) | {dispatch_rate:.1} |");
    println!(
        "| jobs completed per second (wall {:.1} s) | {:.1} |",
        wall.as_secs_f64(),
        jobs as f64 / wall.as_secs_f64()
    );
    println!(
        "| daemon peak RSS | {:.1} MiB |",
        daemon_rss as f64 / 1024.0
    );
    println!(
        "| job runner peak RSS (largest; up to {max_runners} at once) | {:.1} MiB |",
        runner_rss as f64 / 1024.0
    );
    for (reason, n) in &failures {
        println!("not COMPLETE ({n}): {reason}");
    }
    if let Some(j) = finished.iter().find(|j| {
        submitted.contains_key(&j.job_id) && j.status != Some(farmgate_wire::JobStatus::Complete)
    }) {
        let events = http
            .get(format!("{url}/api/v1/job/{}/events", j.job_id))
            .send()
            .await?
            .text()
            .await?;
        println!("events of {} on {:?}:\n{events}", j.job_id, j.dut_id);
        if let Some(port) = (1..=duts).find(|p| Some(farmgate_testkit::mac_of(*p)) == j.dut_id) {
            let log: Vec<String> = gw
                .farm
                .power_log(port)
                .iter()
                .map(|(t, on)| {
                    format!(
                        "{:.3}:{}",
                        t.saturating_duration_since(start).as_secs_f64(),
                        if *on { "on" } else { "off" }
                    )
                })
                .collect();
            println!("power log of port {port}: {log:?}");
        }
        if std::env::var_os("FARMGATE_BENCH_KEEP").is_some() {
            println!("kept: {}", gw.dir.path().display());
            // Keep the directory, not the daemon: a leftover daemon's SALAD would read the
            // consoles of the next run's farm (recycled /dev/pts numbers behind the kept
            // `ttySIM*` links).
            gw.kill_daemon();
            gw.farm.shutdown().await;
            std::mem::forget(gw);
            return Ok(());
        }
    }
    anyhow::ensure!(
        latencies.len() == jobs,
        "paired only {} of {jobs} jobs with a power-on",
        latencies.len()
    );
    gw.stop().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("dispatch: benchmark");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
