//! SALAD against ser2net, side by side: the same ptys, the same TCP clients.
//!
//! For 1 and for 50 consoles, each relay is measured for
//! * throughput: the bench writes console-like lines into every pty master as fast as it can
//!   and counts the bytes the TCP clients receive;
//! * echo latency: a TCP client sends one byte, the bench reads it from the pty master and
//!   writes it back, the client times the round trip (all consoles at once).
//!
//! SALAD runs in this process on its own one-thread Tokio runtime; ser2net (one thread by
//! default) runs as `/usr/sbin/ser2net -n -d -u -c <yaml>`. Run with
//! `cargo bench -p farmgate-console --bench relay`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use farmgate_console::{Salad, SaladConfig, poll_owned_fd};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SER2NET: &str = "/usr/sbin/ser2net";
/// Bytes written per console, bounded in total.
const PER_CONSOLE: usize = 8 << 20;
const TOTAL_BOUND: usize = 100 << 20;
const ROUND_TRIPS: usize = 200;
const WAIT: Duration = Duration::from_secs(30);

type Res<T> = Result<T, String>;

struct Pty {
    master: AsyncFd<OwnedFd>,
    /// Held open so the pty never hangs up while relays open and close it.
    _slave: OwnedFd,
    path: PathBuf,
}

fn make_pty() -> Res<Pty> {
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
    let mut t = termios::tcgetattr(&pty.slave).map_err(|e| format!("tcgetattr: {e}"))?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr: {e}"))?;
    let path = nix::unistd::ttyname(&pty.slave).map_err(|e| format!("ttyname: {e}"))?;
    fcntl(&pty.master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(|e| format!("O_NONBLOCK: {e}"))?;
    let master = poll_owned_fd(pty.master).map_err(|e| format!("register master: {e}"))?;
    Ok(Pty {
        master,
        _slave: pty.slave,
        path,
    })
}

async fn write_master(pty: &Pty, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = pty
            .master
            .async_io(Interest::WRITABLE, |f| {
                nix::unistd::write(f, data).map_err(io::Error::from)
            })
            .await?;
        data = &data[n..];
    }
    Ok(())
}

async fn read_master(pty: &Pty, buf: &mut [u8]) -> io::Result<usize> {
    pty.master
        .async_io(Interest::READABLE, |f| {
            nix::unistd::read(f, buf).map_err(io::Error::from)
        })
        .await
}

/// Kills ser2net (and removes nothing else) when dropped.
struct Ser2net(Child);

impl Drop for Ser2net {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind((LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

#[derive(Clone, Copy, PartialEq)]
enum Relay {
    Salad,
    Ser2net { chardelay: bool },
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Salad => "SALAD",
            Relay::Ser2net { chardelay: true } => "ser2net (defaults)",
            Relay::Ser2net { chardelay: false } => "ser2net (chardelay: false)",
        }
    }
}

/// A started relay with one connected TCP client per pty.
struct Setup {
    clients: Vec<TcpStream>,
    _ser2net: Option<Ser2net>,
    _salad: Option<(CancellationToken, tempfile::TempDir)>,
}

async fn connect(addr: SocketAddr) -> Res<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
                return Ok(s);
            }
            Err(e) if start.elapsed() > WAIT => return Err(format!("connect {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Res<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > WAIT {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn setup_salad(ptys: &[Pty], rt: &tokio::runtime::Handle) -> Res<Setup> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    for (i, p) in ptys.iter().enumerate() {
        std::os::unix::fs::symlink(&p.path, dir.path().join(format!("ttyBENCH{i}")))
            .map_err(|e| format!("symlink: {e}"))?;
    }
    let cancel = CancellationToken::new();
    let config = SaladConfig {
        serial_globs: vec![format!("{}/ttyBENCH*", dir.path().display())],
        rescan_interval: Duration::from_millis(100),
        bind_host: LOCALHOST,
        baud: 115_200,
        tcpconsole_bind: None,
    };
    let salad = {
        let cancel = cancel.clone();
        rt.spawn(async move { Salad::start(config, cancel).await })
            .await
            .map_err(|e| format!("SALAD task: {e}"))?
            .map_err(|e| format!("SALAD: {e}"))?
    };
    wait_until("SALAD to open all ptys", || {
        salad.devices().len() == ptys.len()
    })
    .await?;
    for (i, p) in ptys.iter().enumerate() {
        write_master(p, format!("SALAD.machine_id=bench-{i}\n").as_bytes())
            .await
            .map_err(|e| format!("pty write: {e}"))?;
    }
    wait_until("all machines bound", || {
        salad.machines().len() == ptys.len()
    })
    .await?;
    let mut clients = Vec::new();
    for i in 0..ptys.len() {
        let id = format!("bench-{i}");
        let info = salad.machine(&id).ok_or(format!("machine {id} missing"))?;
        let sock = connect(SocketAddr::new(LOCALHOST, info.tcp_port)).await?;
        let local = sock.local_addr().map_err(|e| e.to_string())?;
        wait_until("the client to be registered", || {
            salad.machine(&id).and_then(|m| m.client) == Some(local)
        })
        .await?;
        clients.push(sock);
    }
    Ok(Setup {
        clients,
        _ser2net: None,
        _salad: Some((cancel, dir)),
    })
}

async fn setup_ser2net(ptys: &[Pty], chardelay: bool, dir: &Path) -> Res<Setup> {
    let mut yaml = String::from("%YAML 1.1\n---\n");
    let mut ports = Vec::new();
    for (i, p) in ptys.iter().enumerate() {
        let port = free_port()?;
        ports.push(port);
        yaml.push_str(&format!(
            "connection: &con{i}\n  accepter: tcp,127.0.0.1,{port}\n  \
             connector: serialdev,{},115200n81,local\n  options:\n    kickolduser: true\n",
            p.path.display()
        ));
        if !chardelay {
            yaml.push_str("    chardelay: false\n");
        }
    }
    let conf = dir.join("ser2net.yaml");
    std::fs::write(&conf, yaml).map_err(|e| format!("write {}: {e}", conf.display()))?;
    let child = Command::new(SER2NET)
        .args(["-n", "-d", "-u", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{SER2NET}: {e}"))?;
    let guard = Ser2net(child);
    let mut clients = Vec::new();
    for port in ports {
        clients.push(connect(SocketAddr::new(LOCALHOST, port)).await?);
    }
    Ok(Setup {
        clients,
        _ser2net: Some(guard),
        _salad: None,
    })
}

/// Make sure every relay path is open end to end: a marker written to the pty reaches the
/// client. ser2net opens the device only once a client connects, so retry.
async fn sync(ptys: &[Pty], clients: &mut [TcpStream]) -> Res<()> {
    for (i, (p, c)) in ptys.iter().zip(clients.iter_mut()).enumerate() {
        let marker = format!("sync-{i}\n");
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        write_master(p, marker.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        while !got.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            if start.elapsed() > WAIT {
                return Err(format!("console {i} never relayed its marker"));
            }
            match tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
                Ok(Ok(0)) => return Err(format!("console {i}: connection closed")),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(format!("console {i}: {e}")),
                Err(_) => write_master(p, marker.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?,
            }
        }
        // Let repeated markers drain.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await
        {
            if n == 0 {
                return Err(format!("console {i}: connection closed"));
            }
        }
    }
    Ok(())
}

/// MiB/s received by all clients together.
async fn throughput(ptys: &[Pty], clients: &mut [TcpStream], per_console: usize) -> Res<f64> {
    let mut line = vec![b'x'; 79];
    line.push(b'\n');
    let chunk: Vec<u8> = line.iter().copied().cycle().take(80 * 512).collect();
    let start = Instant::now();
    let writers = ptys.iter().map(|p| {
        let chunk = &chunk;
        async move {
            let mut left = per_console;
            while left > 0 {
                let n = left.min(chunk.len());
                write_master(p, &chunk[..n])
                    .await
                    .map_err(|e| e.to_string())?;
                left -= n;
            }
            Ok::<(), String>(())
        }
    });
    let readers = clients.iter_mut().enumerate().map(|(i, c)| async move {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < per_console {
            match c.read(&mut buf).await {
                Ok(0) => return Err(format!("console {i} closed after {got} bytes")),
                Ok(n) => got += n,
                Err(e) => return Err(format!("console {i}: {e}")),
            }
        }
        Ok::<(), String>(())
    });
    let run = async {
        let (w, r) = tokio::join!(
            futures_join_all(writers.collect()),
            futures_join_all(readers.collect())
        );
        w.into_iter().chain(r).collect::<Res<Vec<()>>>()
    };
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .map_err(|_| "throughput run timed out".to_string())??;
    let secs = start.elapsed().as_secs_f64();
    Ok((per_console * ptys.len()) as f64 / (1 << 20) as f64 / secs)
}

/// Wait for all futures (spawned onto the current runtime so they run in parallel).
async fn futures_join_all<F>(futs: Vec<F>) -> Vec<Res<()>>
where
    F: std::future::Future<Output = Res<()>>,
{
    // The futures borrow local data, so they are polled here rather than spawned.
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<Res<()>>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *o = Some(r),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap_or(Ok(()))).collect()
}

/// Round-trip times in µs, all consoles at once.
async fn latency(ptys: &[Pty], clients: &mut [TcpStream]) -> Res<Vec<f64>> {
    let stop = CancellationToken::new();
    let echoes = ptys.iter().map(|p| {
        let stop = stop.clone();
        async move {
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = read_master(p, &mut buf) => {
                        let n = r.map_err(|e| e.to_string())?;
                        write_master(p, &buf[..n]).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
    });
    let rtts = std::sync::Mutex::new(Vec::new());
    let pingers = clients.iter_mut().enumerate().map(|(i, c)| {
        let rtts = &rtts;
        async move {
            let mut b = [0u8; 1];
            for _ in 0..ROUND_TRIPS {
                let t = Instant::now();
                c.write_all(b"e")
                    .await
                    .map_err(|e| format!("console {i}: {e}"))?;
                match c.read(&mut b).await {
                    Ok(1) => {}
                    Ok(n) => return Err(format!("console {i}: read {n} bytes")),
                    Err(e) => return Err(format!("console {i}: {e}")),
                }
                let us = t.elapsed().as_secs_f64() * 1e6;
                if std::env::var_os("BENCH_DEBUG").is_some() && us > 5000.0 {
                    eprintln!("console {i}: slow round trip {us:.0} µs");
                }
                rtts.lock().map_err(|e| e.to_string())?.push(us);
            }
            Ok::<(), String>(())
        }
    });
    let run = async {
        let pings = async {
            let r = futures_join_all(pingers.collect()).await;
            stop.cancel();
            r
        };
        let (e, p) = tokio::join!(futures_join_all(echoes.collect()), pings);
        e.into_iter().chain(p).collect::<Res<Vec<()>>>()
    };
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .map_err(|_| "latency run timed out".to_string())??;
    let mut v = rtts.into_inner().map_err(|e| e.to_string())?;
    v.sort_by(f64::total_cmp);
    Ok(v)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    relay: &'static str,
    consoles: usize,
    mib_s: f64,
    p50: f64,
    p99: f64,
}

async fn measure(relay: Relay, n: usize, salad_rt: &tokio::runtime::Handle) -> Res<Row> {
    let ptys: Vec<Pty> = (0..n).map(|_| make_pty()).collect::<Res<_>>()?;
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut setup = match relay {
        Relay::Salad => setup_salad(&ptys, salad_rt).await?,
        Relay::Ser2net { chardelay } => setup_ser2net(&ptys, chardelay, dir.path()).await?,
    };
    sync(&ptys, &mut setup.clients).await?;
    let per_console = PER_CONSOLE.min(TOTAL_BOUND / n);
    let mib_s = throughput(&ptys, &mut setup.clients, per_console).await?;
    let rtts = latency(&ptys, &mut setup.clients).await?;
    if let Some((cancel, _)) = setup._salad.take() {
        cancel.cancel();
    }
    Ok(Row {
        relay: relay.name(),
        consoles: n,
        mib_s,
        p50: percentile(&rtts, 0.50),
        p99: percentile(&rtts, 0.99),
    })
}

fn main() {
    // SALAD gets one worker thread of its own, like ser2net's default.
    let salad_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("salad")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the Tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-driver")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the Tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let have_ser2net = Path::new(SER2NET).exists();
    if !have_ser2net {
        eprintln!("{SER2NET} is not installed; measuring SALAD only");
    }
    let mut rows = Vec::new();
    let mut failed = false;
    let mut failures = Vec::new();
    // Each relay is measured `rounds` times, interleaved, and its best round is kept: this
    // machine may be busy with other work, which only ever makes a round slower.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for n in [1, 50] {
        let mut relays = vec![Relay::Salad];
        if have_ser2net {
            relays.push(Relay::Ser2net { chardelay: true });
            relays.push(Relay::Ser2net { chardelay: false });
        }
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        relays.retain(|r| only.is_empty() || r.name().starts_with(only.as_str()));
        let mut best: Vec<Option<Row>> = relays.iter().map(|_| None).collect();
        for round in 0..rounds {
            for (relay, best) in relays.iter().zip(best.iter_mut()) {
                eprintln!("round {round}: {} with {n} console(s)", relay.name());
                match rt.block_on(measure(*relay, n, salad_rt.handle())) {
                    Ok(row) => {
                        eprintln!(
                            "  {:.1} MiB/s, p50 {:.0} µs, p99 {:.0} µs",
                            row.mib_s, row.p50, row.p99
                        );
                        *best = Some(match best.take() {
                            None => row,
                            Some(b) => Row {
                                mib_s: b.mib_s.max(row.mib_s),
                                p50: b.p50.min(row.p50),
                                p99: b.p99.min(row.p99),
                                ..b
                            },
                        });
                    }
                    Err(e) => {
                        eprintln!("{} with {n} console(s) failed: {e}", relay.name());
                        failures.push(format!("{} with {n} console(s): {e}", relay.name()));
                    }
                }
            }
        }
        for (relay, best) in relays.iter().zip(best) {
            match best {
                Some(row) => rows.push(row),
                None => {
                    eprintln!("{} with {n} console(s): no round succeeded", relay.name());
                    failed = true;
                }
            }
        }
    }
    println!();
    println!(
        "| relay | consoles | throughput (MiB/s, all consoles) | echo p50 (µs) | echo p99 (µs) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.0} |",
            r.relay, r.consoles, r.mib_s, r.p50, r.p99
        );
    }
    println!(
        "\n{} MiB per console (at most {} MiB in all), {ROUND_TRIPS} round trips per console; \
         best of {rounds} interleaved rounds per figure.",
        PER_CONSOLE >> 20,
        TOTAL_BOUND >> 20
    );
    for f in &failures {
        println!("- failed round (not counted): {f}");
    }
    if failed {
        std::process::exit(1);
    }
}
