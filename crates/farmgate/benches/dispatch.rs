//! Dispatch benchmark: a real `farmgate serve` with many simulated DUTs and a deep queue.
//!
//! Every DUT is a simulated machine behind the vpdu server of `farmgate-testkit`, with its
//! console on a pty read by SALAD and its boot script fetched over HTTP; every job is
//! submitted over the REST API like `farmctl run -w` does, and runs in its own `run-job`
//! process. Two phases:
//! - **idle farm**: jobs submitted by 8 clients to a farm of idle DUTs; measured: submit
//!   to power-on latency (client sends the job → the PDU switches a DUT on);
//! - **deep queue**: every DUT is held by a blocker job, the jobs are all submitted and
//!   queued, then the blockers are cancelled at once; measured: how fast the queue
//!   drains (power-ons per second, wall time), the latency from a DUT's release (its
//!   blocker's cancel request) to its next power-on, and the daemon's peak RSS.
//!
//! A job's power-on is the first switch-on of its DUT at or after the job started.
//!
//! `cargo bench -p farmgate --bench dispatch` (1,000 DUTs, 10,000 queued jobs, 1,000
//! idle-farm jobs); override with `FARMGATE_BENCH_DUTS`, `FARMGATE_BENCH_JOBS`,
//! `FARMGATE_BENCH_IDLE_JOBS`; `FARMGATE_BENCH_LOG` sets the daemon's log filter and
//! `FARMGATE_BENCH_KEEP=1` keeps its directory.

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

fn job_yaml(script: &str, overall_minutes: u32) -> String {
    common::sim_job(script, "", "").replace("minutes: 2", &format!("minutes: {overall_minutes}"))
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

/// Submit `n` copies of `yaml` from 8 concurrent clients; returns when each was sent.
async fn submit_many(
    http: &reqwest::Client,
    url: &str,
    yaml: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<String, Instant>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, url, yaml, next) = (
            http.clone(),
            url.to_string(),
            yaml.to_string(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let t = Instant::now();
                let id = submit(&http, &url, &yaml).await?;
                sent.push((id, t));
            }
            anyhow::Ok(sent)
        }));
    }
    let mut submitted = BTreeMap::new();
    for t in tasks {
        submitted.extend(t.await??);
    }
    Ok(submitted)
}

async fn jobs_in(http: &reqwest::Client, url: &str, state: &str) -> anyhow::Result<Vec<JobView>> {
    let body: serde_json::Value = http
        .get(format!("{url}/api/v1/jobs?state={state}&limit=10000"))
        .send()
        .await?
        .json()
        .await?;
    Ok(serde_json::from_value(body["jobs"].clone())?)
}

/// Wait until every job of `ids` is FINISHED (bounded), sampling the runners' memory.
async fn wait_finished(
    http: &reqwest::Client,
    url: &str,
    ids: &BTreeMap<String, Instant>,
    rss: &mut (usize, u64),
) -> anyhow::Result<Vec<JobView>> {
    let begin = Instant::now();
    loop {
        let (n, r) = runner_peak_rss_kib();
        rss.0 = rss.0.max(n);
        rss.1 = rss.1.max(r);
        let list = jobs_in(http, url, "FINISHED").await?;
        let done: Vec<JobView> = list
            .into_iter()
            .filter(|j| ids.contains_key(&j.job_id))
            .collect();
        if done.len() >= ids.len() {
            return Ok(done);
        }
        anyhow::ensure!(
            begin.elapsed() < Duration::from_secs(1800),
            "only {} of {} jobs finished within 30 minutes",
            done.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Clocks: the gateway's timestamps are wall-clock, the simulated PDU's are monotonic.
struct Clock {
    wall: chrono::DateTime<chrono::Utc>,
    mono: Instant,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            wall: chrono::Utc::now(),
            mono: Instant::now(),
        }
    }

    fn instant(&self, rfc3339: &str) -> Option<Instant> {
        let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
        let delta = t.with_timezone(&chrono::Utc) - self.wall;
        match delta.to_std() {
            Ok(after) => Some(self.mono + after),
            Err(_) => self.mono.checked_sub((-delta).to_std().ok()?),
        }
    }
}

/// The power-on of each job (first switch-on of its DUT at or after the job started,
/// with 5 ms of slack for the millisecond timestamps), by job id.
fn power_ons(
    gw: &Gateway,
    duts: u32,
    jobs: &[JobView],
    clock: &Clock,
) -> BTreeMap<String, Instant> {
    let mut by_dut: BTreeMap<String, Vec<&JobView>> = BTreeMap::new();
    for j in jobs {
        if let Some(d) = &j.dut_id {
            by_dut.entry(d.clone()).or_default().push(j);
        }
    }
    let mut out = BTreeMap::new();
    for port in 1..=duts {
        let Some(list) = by_dut.get(&farmgate_testkit::mac_of(port)) else {
            continue;
        };
        let ons: Vec<Instant> = gw
            .farm
            .power_log(port)
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(t, _)| t)
            .collect();
        for j in list {
            let Some(started) = j.started_at.as_deref().and_then(|t| clock.instant(t)) else {
                continue;
            };
            let from = started
                .checked_sub(Duration::from_millis(5))
                .unwrap_or(started);
            if let Some(on) = ons.iter().find(|t| **t >= from) {
                out.insert(j.job_id.clone(), *on);
            }
        }
    }
    out
}

fn statuses(jobs: &[JobView]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for j in jobs {
        *out.entry(j.status.map(|s| s.to_string()).unwrap_or_default())
            .or_default() += 1;
    }
    out
}

async fn run() -> anyhow::Result<()> {
    let duts = env_usize("FARMGATE_BENCH_DUTS", 1000) as u32;
    let jobs = env_usize("FARMGATE_BENCH_JOBS", 10_000);
    let idle_jobs = env_usize("FARMGATE_BENCH_IDLE_JOBS", 1000);
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
    let gw = Gateway::start(opts).await;
    let daemon_pid = gw.daemon.as_ref().map(|c| c.id()).unwrap_or(0);
    let url = gw.url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let clock = Clock::now();
    let mut rss = (0usize, 0u64);

    wait_duts(&http, &url, duts, DutState::Idle, setup).await?;
    println!(
        "setup: {duts} DUTs idle after {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // Phase 1: idle farm.
    let short = job_yaml("print bench job; poweroff", 2);
    let t = Instant::now();
    let sent = submit_many(&http, &url, &short, idle_jobs).await?;
    let done = wait_finished(&http, &url, &sent, &mut rss).await?;
    let idle_wall = t.elapsed();
    let ons = power_ons(&gw, duts, &done, &clock);
    let mut idle_lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, s)| ons.get(id).map(|on| on.saturating_duration_since(*s)))
        .collect();
    idle_lat.sort();
    let idle_status = statuses(&done);
    println!(
        "idle farm: {idle_jobs} jobs in {:.1} s",
        idle_wall.as_secs_f64()
    );

    // Phase 2: deep queue. Hold every DUT with a blocker, queue the jobs, release.
    let blocker = job_yaml("print blocker; hang", 60);
    let blockers = submit_many(&http, &url, &blocker, duts as usize).await?;
    wait_duts(&http, &url, duts, DutState::Running, Instant::now()).await?;
    let t = Instant::now();
    let queued_ids = submit_many(&http, &url, &short, jobs).await?;
    let submit_wall = t.elapsed();
    let depth = jobs_in(&http, &url, "QUEUED").await?.len();
    println!(
        "deep queue: {jobs} jobs submitted in {:.1} s ({:.0} submits/s), {depth} queued",
        submit_wall.as_secs_f64(),
        jobs as f64 / submit_wall.as_secs_f64()
    );
    let release = Instant::now();
    let mut cancelled_at: BTreeMap<String, Instant> = BTreeMap::new();
    {
        let ids: Vec<String> = blockers.keys().cloned().collect();
        let chunks: Vec<Vec<String>> = ids
            .chunks(ids.len().div_ceil(8).max(1))
            .map(|c| c.to_vec())
            .collect();
        let mut tasks = Vec::new();
        for chunk in chunks {
            let (http, url) = (http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for id in chunk {
                    let t = Instant::now();
                    let r = http
                        .post(format!("{url}/api/v1/job/{id}/cancel"))
                        .bearer_auth(SUBMIT)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "cancel {id}: {}", r.status());
                    out.push((id, t));
                }
                anyhow::Ok(out)
            }));
        }
        for t in tasks {
            cancelled_at.extend(t.await??);
        }
    }
    let done = wait_finished(&http, &url, &queued_ids, &mut rss).await?;
    let drain_wall = release.elapsed();
    // (The blockers are older than the last 10,000 jobs the list endpoint returns.)
    let mut blockers_done = Vec::new();
    for id in blockers.keys() {
        let view: JobView = http
            .get(format!("{url}/api/v1/job/{id}"))
            .send()
            .await?
            .json()
            .await?;
        blockers_done.push(view);
    }
    let daemon_rss = peak_rss_kib(daemon_pid).unwrap_or(0);
    let ons = power_ons(&gw, duts, &done, &clock);
    let mut on_times: Vec<Instant> = ons.values().copied().collect();
    on_times.sort();
    let dispatch_rate = match (on_times.first(), on_times.last()) {
        (Some(a), Some(b)) if b > a => on_times.len() as f64 / (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    // Release-to-power-on: a DUT's blocker cancel request → its first queued job's power-on.
    let mut release_lat = Vec::new();
    for b in &blockers_done {
        let (Some(dut), Some(cancel)) = (&b.dut_id, cancelled_at.get(&b.job_id)) else {
            continue;
        };
        let first_on = done
            .iter()
            .filter(|j| j.dut_id.as_ref() == Some(dut))
            .filter_map(|j| ons.get(&j.job_id))
            .min();
        if let Some(on) = first_on {
            release_lat.push(on.saturating_duration_since(*cancel));
        }
    }
    release_lat.sort();
    let deep_status = statuses(&done);

    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| simulated DUTs | {duts} |");
    println!("| idle farm: jobs (statuses) | {idle_jobs} ({idle_status:?}) |");
    println!(
        "| idle farm: submit-to-power-on p50 / p99 | {} / {} |",
        ms(percentile(&idle_lat, 0.50)),
        ms(percentile(&idle_lat, 0.99))
    );
    println!("| deep queue: jobs queued at release (statuses) | {depth} ({deep_status:?}) |");
    println!(
        "| deep queue: release-to-power-on p50 / p99 (first queued job of each DUT) | {} / {} |",
        ms(percentile(&release_lat, 0.50)),
        ms(percentile(&release_lat, 0.99))
    );
    println!("| deep queue: jobs dispatched per second (power-ons/s) | {dispatch_rate:.1} |");
    println!(
        "| deep queue: drained in | {:.1} s ({:.1} jobs/s) |",
        drain_wall.as_secs_f64(),
        jobs as f64 / drain_wall.as_secs_f64()
    );
    println!(
        "| daemon peak RSS | {:.1} MiB |",
        daemon_rss as f64 / 1024.0
    );
    println!(
        "| job runner peak RSS (largest; up to {} at once) | {:.1} MiB |",
        rss.0,
        rss.1 as f64 / 1024.0
    );
    let bad: Vec<&JobView> = done
        .iter()
        .chain(&blockers_done)
        .filter(|j| {
            !matches!(
                j.status,
                Some(farmgate_wire::JobStatus::Complete | farmgate_wire::JobStatus::Incomplete)
            )
        })
        .collect();
    for j in bad.iter().take(5) {
        println!("unexpected: {} {:?}: {:?}", j.job_id, j.status, j.reason);
    }
    anyhow::ensure!(
        ons.len() == jobs && idle_lat.len() == idle_jobs,
        "paired only {} of {jobs} queued and {} of {idle_jobs} idle-farm jobs with a power-on",
        ons.len(),
        idle_lat.len()
    );
    if std::env::var_os("FARMGATE_BENCH_KEEP").is_some() {
        // Keep the directory, not the daemon: a leftover daemon's SALAD would read the
        // consoles of the next run's farm (recycled /dev/pts numbers).
        let mut gw = gw;
        println!("kept: {}", gw.dir.path().display());
        gw.kill_daemon();
        gw.farm.shutdown().await;
        std::mem::forget(gw);
        return Ok(());
    }
    gw.stop().await;
    Ok(())
}

async fn wait_duts(
    http: &reqwest::Client,
    url: &str,
    duts: u32,
    state: DutState,
    since: Instant,
) -> anyhow::Result<()> {
    loop {
        let list: serde_json::Value = http
            .get(format!("{url}/api/v1/duts"))
            .send()
            .await?
            .json()
            .await?;
        let n = list["duts"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter(|d| d["state"] == state.to_string())
                    .count()
            })
            .unwrap_or(0);
        if n == duts as usize {
            return Ok(());
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(600),
            "only {n} of {duts} DUTs became {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
