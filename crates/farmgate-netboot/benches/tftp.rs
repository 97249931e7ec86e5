//! TFTP throughput: our server (the `farmgate-netboot-serve` helper) against dnsmasq's.
//!
//! `cargo bench -p farmgate-netboot --bench tftp` (as root: dnsmasq serves TFTP on port 69
//! only, so both servers run on the loopback of a throwaway network namespace
//! `fgdh-bench-<pid>`; ours on port 6969). For each block size, each server gets
//! `FGDH_BENCH_ROUNDS` (default 3) rounds of `FGDH_BENCH_CLIENTS` (default 20) concurrent
//! `curl` downloads of a 50 MiB file; prints a markdown table of the aggregate throughput and
//! the median and slowest client time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_farmgate-netboot-serve");
const FILE_SIZE: usize = 50 * 1024 * 1024;
const OUR_PORT: u16 = 6969;
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

/// The namespace and the servers in it; dropped = killed and deleted.
struct Lab {
    ns: String,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn check(cmd: &mut Command) -> Result<(), String> {
    let st = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {st}"))
    }
}

/// One client download: its time and whether it got the whole file.
fn download(ns: &str, port: u16, blksize: Option<u16>) -> Result<Child, String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
        .args(["-w", "%{size_download}", "--max-time", "300"])
        .arg(format!("tftp://127.0.0.1:{port}/big"));
    if let Some(b) = blksize {
        cmd.args(["--tftp-blksize", &b.to_string()]);
    }
    cmd.stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run curl: {e}"))
}

/// Runs `clients` concurrent downloads; returns the wall time and each client's time.
fn round(
    ns: &str,
    port: u16,
    blksize: Option<u16>,
    clients: usize,
) -> Result<(Duration, Vec<Duration>), String> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let child = download(ns, port, blksize)?;
        handles.push(std::thread::spawn(move || -> Result<Duration, String> {
            let out = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
            let took = start.elapsed();
            let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || got != FILE_SIZE.to_string() {
                return Err(format!(
                    "curl on port {port}: {} after {got} bytes",
                    out.status
                ));
            }
            Ok(took)
        }));
    }
    let mut times = Vec::new();
    for h in handles {
        times.push(
            h.join()
                .map_err(|_| "client thread panicked".to_string())??,
        );
    }
    let wall = start.elapsed();
    if wall > ROUND_TIMEOUT {
        return Err(format!("round took {wall:?}"));
    }
    Ok((wall, times))
}

fn wait_for_tftp(ns: &str, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
            .arg(format!("tftp://127.0.0.1:{port}/small"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no TFTP server answered on port {port}"))
}

fn env_usize(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|e| format!("{name}={v}: {e}")),
        Err(_) => Ok(default),
    }
}

fn setup(dir: &Path) -> Result<Lab, String> {
    let ns = format!("fgdh-bench-{}", std::process::id());
    check(Command::new("ip").args(["netns", "add", &ns]))?;
    let mut lab = Lab {
        ns,
        children: Vec::new(),
    };
    check(Command::new("ip").args(["-n", &lab.ns, "link", "set", "lo", "up"]))?;
    let dnsmasq = Command::new("ip")
        .args(["netns", "exec", &lab.ns, "dnsmasq", "--keep-in-foreground"])
        .args([
            "--conf-file=/dev/null",
            "--port=0",
            "--enable-tftp",
            "--quiet-tftp",
        ])
        .arg(format!("--tftp-root={}", dir.display()))
        .args([
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--tftp-max=200",
        ])
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run dnsmasq: {e}"))?;
    lab.children.push(dnsmasq);
    let mut ours = Command::new("ip")
        .args(["netns", "exec", &lab.ns, BIN, "--tftp-root"])
        .arg(dir)
        .args(["--tftp-listen", &format!("127.0.0.1:{OUR_PORT}")])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {BIN}: {e}"))?;
    let stdout = ours.stdout.take();
    lab.children.push(ours);
    let mut ready = false;
    if let Some(out) = stdout {
        for line in BufReader::new(out).lines() {
            if line.map_err(|e| e.to_string())? == "ready" {
                ready = true;
                break;
            }
        }
    }
    if !ready {
        return Err(format!("{BIN} did not start"));
    }
    wait_for_tftp(&lab.ns, 69)?;
    wait_for_tftp(&lab.ns, OUR_PORT)?;
    Ok(lab)
}

fn main() -> Result<(), String> {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with no such flag,
    // and then there is nothing to check quickly.
    if !std::env::args().any(|a| a == "--bench") {
        println!("tftp bench: run with `cargo bench` (needs root)");
        return Ok(());
    }
    let clients = env_usize("FGDH_BENCH_CLIENTS", 20)?;
    let rounds = env_usize("FGDH_BENCH_ROUNDS", 3)?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut x: u32 = 0x2545_f491;
    let content: Vec<u8> = (0..FILE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(dir.path().join("big"), &content).map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("small"), b"small").map_err(|e| e.to_string())?;
    let lab = setup(dir.path())?;

    println!(
        "\n{clients} concurrent curl clients x {rounds} rounds, {} MiB file, loopback\n",
        FILE_SIZE >> 20
    );
    println!("| server | blksize | aggregate MiB/s | p50 client s | max client s |");
    println!("|---|---|---|---|---|");
    for blksize in [None, Some(1468u16)] {
        for (name, port) in [("farmgate-netboot", OUR_PORT), ("dnsmasq", 69)] {
            let mut wall = Duration::ZERO;
            let mut times = Vec::new();
            for _ in 0..rounds {
                let (w, t) = round(&lab.ns, port, blksize, clients)?;
                wall += w;
                times.extend(t);
            }
            times.sort();
            let total_mib = (FILE_SIZE * clients * rounds) as f64 / (1024.0 * 1024.0);
            let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
            let max = times.last().copied().unwrap_or_default();
            println!(
                "| {name} | {} | {:.1} | {:.2} | {:.2} |",
                blksize.map_or("512 (default)".to_string(), |b| b.to_string()),
                total_mib / wall.as_secs_f64(),
                p50.as_secs_f64(),
                max.as_secs_f64()
            );
        }
    }
    drop(lab);
    Ok(())
}
