//! Gateway overhead per job on a QEMU DUT: the same boot three ways, interleaved.
//!
//! 1. **raw direct**: `qemu-system-x86_64` with the machine arguments of the `qemu` PDU
//!    driver (TCG, 384 MiB, `-nodefaults`, virtio-net NIC on the user network) booting
//!    the kernel and initramfs with `-kernel/-initrd/-append`; timed to QEMU's exit (the
//!    guest powers off).
//! 2. **raw netboot** (the fair baseline): the same machine netbooting through its NIC's
//!    iPXE ROM from a plain static HTTP server (`python3 -m http.server`) serving an iPXE
//!    script, the kernel and the initramfs; timed to QEMU's exit.
//! 3. **farmgate**: one `farmgate serve` with that machine behind the `qemu` PDU; each
//!    round is `farmctl run examples/qemu-job.yml.j2`, timed from spawning farmctl to
//!    its exit (which must be 0, PASS). The job's events (timestamps of the runner's
//!    phases and of the console lines) give the breakdown.
//!
//! The same kernel, initramfs and kernel command line serve the three (the job's, with
//! the `SALAD.machine_id=` the gateway appends), so the difference is what the gateway
//! adds: dispatch, the power cycle (including the DUT's minimum off time,
//! `pdu_off_delay`), the console relay, teardown and reporting.
//!
//! `cargo build --release --workspace --bins && cargo bench -p farmgate --bench qemu_job`;
//! `FARMGATE_BENCH_ROUNDS` (default 5) sets the rounds per variant, after one untimed
//! warm-up round of each.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::{Gateway, GatewayOptions, path_str, qemu_mac};
use farmgate_wire::{DutState, EventKind, JobEvent};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Bound of one boot, any variant.
const LIMIT: Duration = Duration::from_secs(300);
/// Guest memory, as the harness configures its QEMU PDU.
const MEMORY_MIB: &str = "384";
/// The milestones of a boot, in the order they happen.
const MILESTONES: [&str; 4] = [
    "first console line",
    "Linux version",
    "JOB RESULT: 42",
    "reboot: Power down",
];

/// The job's kernel command line as the gateway serves it to port 0's machine.
fn cmdline() -> String {
    let mac = qemu_mac(0);
    format!(
        "console=ttyS0,115200 panic=-1 farmgate.run=\"echo Hello from {mac}; echo JOB RESULT: $((40+2))\" SALAD.machine_id={mac}"
    )
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn signed_secs(a: Duration, b: Duration) -> String {
    format!("{:+.2}", a.as_secs_f64() - b.as_secs_f64())
}

/// Median (the mean of the two middle values for an even count), min, max.
fn stats(values: &[Duration]) -> (Duration, Duration, Duration) {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    let n = v.len();
    let p50 = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    (p50, v[0], v[n - 1])
}

/// One timed boot: milestone name → time since the start; `end` is QEMU's or farmctl's
/// exit.
#[derive(Default, Debug)]
struct Round {
    marks: BTreeMap<String, Duration>,
    end: Duration,
}

impl Round {
    /// Records the console milestones `line` (seen `at`) is the first of.
    fn console_line(&mut self, line: &str, at: Duration) {
        if line.trim().is_empty() {
            return;
        }
        self.marks.entry(MILESTONES[0].to_string()).or_insert(at);
        for m in &MILESTONES[1..] {
            if line.contains(m) {
                self.marks.entry(m.to_string()).or_insert(at);
            }
        }
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

/// `python3 -m http.server` on loopback serving `dir`; waits until it answers.
async fn http_server(dir: &Path, port: u16) -> anyhow::Result<Reaped> {
    let child = std::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg("--directory")
        .arg(dir)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting python3 -m http.server")?;
    let server = Reaped(child);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/boot.ipxe"))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(server);
        }
        ensure!(
            Instant::now() < deadline,
            "python3 -m http.server on 127.0.0.1:{port} did not answer within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Arguments common to both raw variants: the driver's machine, minus its SALAD console,
/// monitor, log and daemonizing; the serial port on stdout instead.
fn raw_machine_args(netdev: &str) -> Vec<String> {
    let mac = qemu_mac(0);
    [
        "-accel",
        "tcg",
        "-m",
        MEMORY_MIB,
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-user-config",
        "-no-reboot",
        "-serial",
        "stdio",
        "-netdev",
        netdev,
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={mac}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs one raw QEMU boot to QEMU's exit, timing the console milestones.
async fn raw_boot(what: &str, args: &[String]) -> anyhow::Result<Round> {
    let start = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child
        .stdout
        .take()
        .context("qemu-system-x86_64 has no stdout pipe")?;
    let mut stderr = child
        .stderr
        .take()
        .context("qemu-system-x86_64 has no stderr pipe")?;
    let mut round = Round::default();
    let mut console = Vec::new();
    let run = async {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .await
                .context("reading QEMU's serial port")?;
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            round.console_line(&line, start.elapsed());
            console.push(line);
        }
        let status = child.wait().await.context("waiting for QEMU")?;
        anyhow::Ok(status)
    };
    let status = tokio::time::timeout(LIMIT, run)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: QEMU did not power off within {LIMIT:?}"))??;
    round.end = start.elapsed();
    let mut err = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err).await;
    let ok = status.success() && MILESTONES.iter().all(|m| round.marks.contains_key(*m));
    if !ok {
        bail!(
            "{what}: QEMU ended with {status} and milestones {:?}\nconsole:\n{}\nstderr:\n{err}",
            round.marks,
            console.concat()
        );
    }
    Ok(round)
}

/// Milestones of a farmgate job, from its events.
const PHASES: [&str; 6] = [
    "runner started",
    "power cycle started",
    "DUT powered on",
    "teardown started",
    "job over",
    "session_end",
];

fn parse_events(body: &str) -> anyhow::Result<Vec<JobEvent>> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l:?}")))
        .collect()
}

/// Runs the job once with farmctl; the round's marks come from its events.
async fn farmgate_job(
    gw: &Gateway,
    job: &Path,
    job_id: &str,
) -> anyhow::Result<(Round, Vec<(Duration, String)>)> {
    let wall = chrono::Utc::now();
    let start = Instant::now();
    let child = gw
        .farmctl(&["run", "-j", job_id, path_str(job)])
        .spawn()
        .context("starting farmctl")?;
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "farmctl run did not finish within {LIMIT:?}:\n{}",
                gw.logs()
            )
        })?
        .context("waiting for farmctl")?;
    let mut round = Round {
        end: start.elapsed(),
        ..Round::default()
    };
    if out.status.code() != Some(0) {
        bail!(
            "farmctl run ended with {} (0 = PASS expected)\n--- stdout\n{}\n--- stderr\n{}\n--- gateway\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            gw.logs()
        );
    }
    let body = gw
        .http
        .get(format!("{}/api/v1/job/{job_id}/events", gw.url()))
        .send()
        .await
        .context("GET events")?
        .error_for_status()
        .context("GET events")?
        .text()
        .await
        .context("reading events")?;
    let mut ctrl = Vec::new();
    for e in parse_events(&body)? {
        let date = chrono::DateTime::parse_from_rfc3339(&e.date)
            .with_context(|| format!("event {} has a bad date {:?}", e.seq, e.date))?
            .with_timezone(&chrono::Utc);
        // Events before the spawn (clock granularity) count as at the spawn.
        let at = (date - wall).to_std().unwrap_or(Duration::ZERO);
        let p = e.payload.as_str();
        let mut mark = |name: &str| {
            round.marks.entry(name.to_string()).or_insert(at);
        };
        match e.msg_type {
            EventKind::JobIo => round.console_line(p, at),
            EventKind::SessionEnd => mark(PHASES[5]),
            EventKind::Ctrl => {
                if p.starts_with("Job ") && p.contains(" runs on ") {
                    mark(PHASES[0]);
                } else if p.starts_with("Boot 1: power cycling") {
                    mark(PHASES[1]);
                } else if p.starts_with("Boot 1: DUT powered on") {
                    mark(PHASES[2]);
                } else if p.starts_with("Teardown:") {
                    mark(PHASES[3]);
                } else if p.starts_with("Job ") && p.contains(" is over") {
                    mark(PHASES[4]);
                }
                ctrl.push((at, p.to_string()));
            }
        }
    }
    Ok((round, ctrl))
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    Direct,
    Netboot,
    Farmgate,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "raw QEMU, direct kernel boot",
            Variant::Netboot => "raw QEMU, iPXE netboot (static HTTP)",
            Variant::Farmgate => "farmgate (farmctl run, spawn to exit)",
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let rounds = env_usize("FARMGATE_BENCH_ROUNDS", 5).max(1);
    let setup = Instant::now();
    let gw = Gateway::start(GatewayOptions::default().qemu_dut(0, &["qemu"], true)).await;
    let mac = qemu_mac(0);
    gw.wait_dut_id(&mac, "IDLE", Duration::from_secs(60), |d| {
        d.state == DutState::Idle
    })
    .await;
    let off_delay = gw
        .mars()
        .duts
        .get(&mac)
        .map(|d| d.pdu_off_delay)
        .context("the QEMU DUT is not in the MaRS file")?;
    let off = Duration::from_secs_f64(off_delay.max(0.0));
    println!(
        "setup: gateway up, DUT {mac} idle after {:.1} s (pdu_off_delay {off_delay} s)",
        setup.elapsed().as_secs_f64()
    );

    // The raw variants boot the very files the gateway serves at /boot/.
    let tftp = gw.dir.path().join("tftp");
    let raw = tempfile::tempdir().context("temp dir")?;
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::copy(tftp.join(f), raw.path().join(f))
            .with_context(|| format!("copying {} to {}", f, raw.path().display()))?;
    }
    let port = common::free_port();
    let base = format!("http://10.42.0.1:{port}");
    std::fs::write(
        raw.path().join("boot.ipxe"),
        format!(
            "#!ipxe\nkernel {base}/vmlinuz {}\ninitrd {base}/initramfs.cpio.gz\nboot\n",
            cmdline()
        ),
    )
    .context("writing boot.ipxe")?;
    let _server = http_server(raw.path(), port).await?;
    let kernel: PathBuf = raw.path().join("vmlinuz");
    let initrd: PathBuf = raw.path().join("initramfs.cpio.gz");
    let mut direct_args = raw_machine_args("user,id=n0,net=10.42.0.0/24,host=10.42.0.1");
    direct_args.extend([
        "-kernel".to_string(),
        path_str(&kernel).to_string(),
        "-initrd".into(),
        path_str(&initrd).to_string(),
        "-append".into(),
        cmdline(),
    ]);
    let mut netboot_args = raw_machine_args(&format!(
        "user,id=n0,net=10.42.0.0/24,host=10.42.0.1,bootfile={base}/boot.ipxe"
    ));
    netboot_args.extend(["-boot".to_string(), "order=n,strict=on".into()]);
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-job.yml.j2");

    let variants = [Variant::Direct, Variant::Netboot, Variant::Farmgate];
    let mut results: BTreeMap<Variant, Vec<Round>> = BTreeMap::new();
    let mut timelines = Vec::new();
    for round in 0..=rounds {
        let warmup = round == 0;
        // Rotate the order so that no variant always runs right after another.
        for k in 0..variants.len() {
            let v = variants[(round + k) % variants.len()];
            let r = match v {
                Variant::Direct => raw_boot(v.name(), &direct_args).await?,
                Variant::Netboot => raw_boot(v.name(), &netboot_args).await?,
                Variant::Farmgate => {
                    let id = format!("bench-qemu-{}-{round}", std::process::id());
                    let (r, ctrl) = farmgate_job(&gw, &job, &id).await?;
                    timelines.push((round, ctrl));
                    // The next job must find the DUT idle, as a user's next job would.
                    gw.wait_dut_id(&mac, "IDLE", Duration::from_secs(60), |d| {
                        d.state == DutState::Idle
                    })
                    .await;
                    r
                }
            };
            println!(
                "{} {round}: {:<40} {} s",
                if warmup { "warm-up" } else { "round" },
                v.name(),
                secs(r.end)
            );
            if !warmup {
                results.entry(v).or_default().push(r);
            }
        }
    }

    let ends = |v: Variant| -> Vec<Duration> {
        results
            .get(&v)
            .map(|rs| rs.iter().map(|r| r.end).collect())
            .unwrap_or_default()
    };
    let (direct, _, _) = stats(&ends(Variant::Direct));
    let (netboot, _, _) = stats(&ends(Variant::Netboot));
    let fg_ends = ends(Variant::Farmgate);
    let (farmgate, _, _) = stats(&fg_ends);
    let fg_minus: Vec<Duration> = fg_ends.iter().map(|d| d.saturating_sub(off)).collect();

    println!();
    println!(
        "{rounds} rounds per variant (after 1 warm-up round each), interleaved; TCG, {MEMORY_MIB} MiB, 1 vCPU"
    );
    println!();
    println!("| variant | p50 (s) | min (s) | max (s) |");
    println!("|---|---|---|---|");
    let row = |name: &str, values: &[Duration]| {
        let (p50, min, max) = stats(values);
        println!("| {name} | {} | {} | {} |", secs(p50), secs(min), secs(max));
    };
    for v in variants {
        row(v.name(), &ends(v));
    }
    row(
        &format!("farmgate minus pdu_off_delay ({off_delay} s)"),
        &fg_minus,
    );
    println!();
    let (fg_minus_p50, _, _) = stats(&fg_minus);
    println!(
        "overhead (p50): farmgate − raw netboot = {} s ({} s without pdu_off_delay); farmgate − raw direct = {} s ({} s without pdu_off_delay); goal < 0.5 s",
        signed_secs(farmgate, netboot),
        signed_secs(fg_minus_p50, netboot),
        signed_secs(farmgate, direct),
        signed_secs(fg_minus_p50, direct),
    );

    // The minimum off time is only waited when the DUT was switched off less than
    // pdu_off_delay ago (a job right after another's teardown).
    let cycles: Vec<Duration> = results
        .get(&Variant::Farmgate)
        .map(|rs| {
            rs.iter()
                .filter_map(|r| {
                    Some(
                        r.marks
                            .get(PHASES[2])?
                            .saturating_sub(*r.marks.get(PHASES[1])?),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let waited = cycles.iter().filter(|c| **c >= off.mul_f64(0.9)).count();
    let (cycle_p50, cycle_min, cycle_max) = stats(&cycles);
    println!(
        "farmgate power cycle (\"power cycling\" → \"powered on\" events): p50 {} s, min {} s, max {} s; the minimum off time ({off_delay} s) was waited in {waited} of {} rounds (only when the DUT was switched off less than pdu_off_delay before)",
        secs(cycle_p50),
        secs(cycle_min),
        secs(cycle_max),
        cycles.len()
    );

    // Where the time goes: p50 of each milestone, per variant, from each one's start.
    println!();
    println!("| milestone (s from start, p50) | raw direct | raw netboot | farmgate |");
    println!("|---|---|---|---|");
    let mark = |v: Variant, m: &str| -> String {
        let values: Vec<Duration> = results
            .get(&v)
            .map(|rs| rs.iter().filter_map(|r| r.marks.get(m).copied()).collect())
            .unwrap_or_default();
        if values.is_empty() {
            "–".into()
        } else {
            secs(stats(&values).0)
        }
    };
    let order: Vec<&str> = PHASES[..3]
        .iter()
        .chain(MILESTONES.iter())
        .chain(PHASES[3..].iter())
        .copied()
        .collect();
    for m in order {
        println!(
            "| {m} | {} | {} | {} |",
            mark(Variant::Direct, m),
            mark(Variant::Netboot, m),
            mark(Variant::Farmgate, m)
        );
    }
    println!(
        "| end (QEMU exit / farmctl exit) | {} | {} | {} |",
        secs(direct),
        secs(netboot),
        secs(farmgate)
    );

    // Differences between consecutive farmgate milestones, per round.
    println!();
    println!(
        "farmgate intervals per round (s): spawn→runner | runner→power-on | power-on→1st line | 1st line→Power down | Power down→session_end | session_end→farmctl exit"
    );
    let chain = [
        PHASES[0],
        PHASES[2],
        MILESTONES[0],
        MILESTONES[3],
        PHASES[5],
    ];
    for (i, r) in results
        .get(&Variant::Farmgate)
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let mut prev = Duration::ZERO;
        let mut parts = Vec::new();
        for m in chain {
            match r.marks.get(m) {
                Some(t) => {
                    parts.push(secs(t.saturating_sub(prev)));
                    prev = *t;
                }
                None => parts.push("?".into()),
            }
        }
        parts.push(secs(r.end.saturating_sub(prev)));
        println!("  round {}: {}", i + 1, parts.join(" | "));
    }
    if let Some((round, ctrl)) = timelines.iter().find(|(r, _)| *r == 1) {
        println!();
        println!("executor messages of round {round} (s from farmctl's spawn):");
        for (at, p) in ctrl {
            println!("  {:>6} {p}", secs(*at));
        }
    }
    gw.stop().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("qemu_job: benchmark");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
