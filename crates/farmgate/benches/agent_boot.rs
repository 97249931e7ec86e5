//! Boot to first container: the DUT agent's initramfs vs a minimal busybox init, on the
//! same kernel, interleaved.
//!
//! 1. **busybox init**: the test initramfs (busybox, the NIC modules, an `/init`) with
//!    `farmgate.net farmgate.run="echo FIRST-$((1+1))"`: network up by DHCP, then the
//!    first command: what a minimal init does before any work.
//! 2. **farm-agent**: the image `farmgate image build` publishes (farm-agent as `/init`,
//!    crun, busybox, the cache tools, network and disk modules), with a `b2c.container`
//!    running `echo FIRST-$((1+1))` in a one-layer busybox image pulled from a
//!    docker-registry on the host (reached at QEMU's 10.0.2.2): the agent mounts, loads
//!    the modules, brings the network up by DHCP, pulls, unpacks and runs the container.
//!
//! Each round boots `qemu-system-x86_64` (TCG, 512 MiB, `-kernel/-initrd`) and times
//! from spawning QEMU to the line `FIRST-2` on its serial console (computed on the
//! machine, so the kernel's own command line cannot match it).
//!
//! `cargo build --profile agent -p farmgate-agent && cargo build --release --workspace --bins
//! && cargo bench -p farmgate --bench agent_boot`;
//! `FARMGATE_BENCH_ROUNDS` (default 5) rounds per variant after one untimed warm-up each;
//! `FARMGATE_BENCH_CONSOLE=1` prints each machine's console up to the marker.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{farm_agent_exe, farmgate_exe, mkinitramfs_exe, upstream_with_busybox_image};

const LIMIT: Duration = Duration::from_secs(180);
const MARKER: &str = "FIRST-2";

/// Builds an initramfs into `dir` with these extra programs.
fn initramfs(dir: &Path, binaries: &[&Path]) -> anyhow::Result<()> {
    let mut cmd = Command::new(mkinitramfs_exe());
    cmd.arg("--out").arg(dir);
    for b in binaries {
        cmd.arg("--binary").arg(b);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "farmgate-mkinitramfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `farmgate image build --out dir` with the workspace's farm-agent.
fn agent_image(dir: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new(farmgate_exe());
    cmd.args([
        "image",
        "build",
        "--gateway-url",
        "http://10.0.2.2:1",
        "--out",
    ])
    .arg(dir)
    .env_remove("FARM_NAME");
    // The agent of the `agent` profile when built (what users put in their image),
    // else the one beside farmgate.
    let small = farmgate_exe()
        .parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("agent/farm-agent"));
    match small.filter(|p| p.is_file()) {
        Some(p) => cmd.arg("--agent").arg(p),
        None => cmd.arg("--agent").arg(farm_agent_exe()),
    };
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "farmgate image build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

/// Seconds from spawning QEMU with `kernel` and `initrd` to [`MARKER`] on its console.
fn boot(kernel: &Path, initrd: &Path, append: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = Arc::new(Mutex::new(String::new()));
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let seen = Arc::new(Mutex::new(None::<f64>));
    let reader = {
        let (out, seen) = (out.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                o.push_str(&String::from_utf8_lossy(&buf[..n]));
                if o.contains(MARKER) {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    s.get_or_insert(started.elapsed().as_secs_f64());
                }
            }
        })
    };
    let result = loop {
        // Copied out: the reader takes `out` then `seen`, this loop must not hold `seen`
        // while it takes `out`.
        let seen_at = *seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = seen_at {
            if std::env::var_os("FARMGATE_BENCH_CONSOLE").is_some() {
                // What the machine printed, for the phases' timestamps.
                std::thread::sleep(Duration::from_millis(200));
                println!("{}", out.lock().unwrap_or_else(|e| e.into_inner()));
            }
            break Ok(t);
        }
        if child.try_wait()?.is_some() || started.elapsed() > LIMIT {
            break Err(anyhow::anyhow!(
                "no {MARKER} on the console:\n{}",
                out.lock().unwrap_or_else(|e| e.into_inner())
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    result
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let p50 = s[s.len() / 2];
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    (p50, mean, s[s.len() - 1])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("FARMGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let up = upstream_with_busybox_image().await;
    let work = tempfile::tempdir()?;
    let plain = work.path().join("plain");
    let with_agent = work.path().join("agent");
    initramfs(&plain, &[])?;
    agent_image(&with_agent)?;
    let arch = std::env::consts::ARCH;
    let plain_files = (plain.join("vmlinuz"), plain.join("initramfs.cpio.gz"));
    let agent_files = (
        with_agent.join(format!("default_{arch}_kernel")),
        with_agent.join(format!("default_{arch}_initrd")),
    );
    let busybox = "console=ttyS0 panic=-1 quiet farmgate.net farmgate.run=\"echo FIRST-$((1+1))\"";
    let agent_line = format!(
        "console=ttyS0 panic=-1 quiet b2c.container=\"--tls-verify=false docker://10.0.2.2:{}/test/box:v1 sh -c 'echo FIRST-$((1+1))'\"",
        up.port
    );
    let plain_boot = || boot(&plain_files.0, &plain_files.1, busybox);
    let agent_boot = || boot(&agent_files.0, &agent_files.1, &agent_line);
    // Warm-up (page cache, first pull into the registry's cache).
    plain_boot()?;
    agent_boot()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let x = plain_boot()?;
        let y = agent_boot()?;
        println!("round {round}: busybox init {x:.2} s, farm-agent {y:.2} s");
        a.push(x);
        b.push(y);
    }
    let (ap, am, ax) = stats(&a);
    let (bp, bm, bx) = stats(&b);
    println!("| variant | p50 s | mean s | max s |");
    println!("|---|---|---|---|");
    println!("| busybox init (network up, first command) | {ap:.2} | {am:.2} | {ax:.2} |");
    println!("| farm-agent (pull + crun, first container) | {bp:.2} | {bm:.2} | {bx:.2} |");
    println!("difference of the medians: {:.2} s", bp - ap);
    Ok(())
}
