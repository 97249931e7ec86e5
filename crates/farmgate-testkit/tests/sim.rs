//! The simulated farm driven from outside, as the gateway would: vpdu commands over TCP,
//! the console read and written on the pty slave, boot scripts served over real HTTP by a
//! small fake gateway.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use farmgate_testkit::{
    Behaviour, OP_COUNT, OP_OFF, OP_ON, OP_STATUS, REPLY_ACK, REPLY_ERROR, REPLY_OFF, REPLY_ON,
    SimFarm, SimFarmConfig, vpdu_command,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- vpdu client

async fn vpdu(farm: &SimFarm, cmd: u32) -> u8 {
    let mut s = TcpStream::connect(farm.addr()).await.expect("connect vpdu");
    s.write_all(&cmd.to_be_bytes()).await.expect("send command");
    let mut reply = [0u8; 1];
    s.read_exact(&mut reply).await.expect("one-byte reply");
    reply[0]
}

async fn power(farm: &SimFarm, port: u32, on: bool) {
    let op = if on { OP_ON } else { OP_OFF };
    assert_eq!(vpdu(farm, vpdu_command(op, port, false)).await, REPLY_ACK);
}

// ---------------------------------------------------------------- fake gateway

/// Answers `boot.ipxe` with the queued responses in order, repeating the last one.
struct FakeGateway {
    responses: Mutex<Vec<(StatusCode, String)>>,
    requests: AtomicUsize,
    macs: Mutex<Vec<String>>,
}

async fn boot_ipxe(
    State(gw): State<Arc<FakeGateway>>,
    UrlPath(mac): UrlPath<String>,
) -> (StatusCode, String) {
    gw.requests.fetch_add(1, Ordering::SeqCst);
    gw.macs.lock().expect("macs").push(mac);
    let mut r = gw.responses.lock().expect("responses");
    if r.len() > 1 {
        r.remove(0)
    } else {
        r.first()
            .cloned()
            .unwrap_or((StatusCode::NOT_FOUND, String::new()))
    }
}

async fn fake_gateway(responses: Vec<(StatusCode, String)>) -> (String, Arc<FakeGateway>) {
    let gw = Arc::new(FakeGateway {
        responses: Mutex::new(responses),
        requests: AtomicUsize::new(0),
        macs: Mutex::new(vec![]),
    });
    let app = axum::Router::new()
        .route("/api/v1/dut/{mac}/boot.ipxe", get(boot_ipxe))
        .route("/kernel", get(|| async { "KERNEL-IMAGE" }))
        .with_state(gw.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake gateway");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, gw)
}

fn ipxe(cmdline: &str) -> (StatusCode, String) {
    (
        StatusCode::OK,
        format!(
            "#!ipxe\necho farmgate: job test, boot 1\nkernel http://127.0.0.1:1/vmlinuz {cmdline}\nboot\n"
        ),
    )
}

fn script(s: &str) -> (StatusCode, String) {
    ipxe(&format!("console=ttyS0 farmsim.script=\"{s}\""))
}

// ---------------------------------------------------------------- console reader

/// The slave side of a console, opened like the gateway's SALAD opens it.
struct ConsoleReader {
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    tx: File,
    seen: Vec<String>,
}

impl ConsoleReader {
    fn open(path: &Path) -> ConsoleReader {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let tx = file.try_clone().expect("clone the console fd");
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        // A plain thread: blocking reads end with EIO when the farm closes the pty.
        std::thread::spawn(move || {
            for line in BufReader::new(file).lines() {
                let Ok(line) = line else { return };
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        ConsoleReader {
            lines,
            tx,
            seen: vec![],
        }
    }

    /// Wait for a line starting with `needle`; returns it.
    async fn expect(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.starts_with(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "console closed waiting for {needle:?}; saw {:#?}",
                    self.seen
                ),
                Err(_) => panic!("no {needle:?} on the console; saw {:#?}", self.seen),
            }
        }
    }

    /// Every line printed within `d`.
    async fn during(&mut self, d: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + d;
        let mut out = vec![];
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            self.seen.push(line.clone());
            out.push(line);
        }
        out
    }

    fn type_line(&mut self, line: &str) {
        self.tx
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the console");
    }
}

// ---------------------------------------------------------------- farm

async fn farm(gateway_url: &str, dir: &Path, behaviours: &[(u32, Behaviour)]) -> SimFarm {
    SimFarm::start(SimFarmConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ports: 4,
        tty_dir: dir.join("tty"),
        gateway_url: gateway_url.to_string(),
        fetch_artifacts: false,
        boot_retry: Duration::from_millis(50),
        behaviours: behaviours.iter().copied().collect::<BTreeMap<_, _>>(),
    })
    .await
    .expect("farm starts")
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn vpdu_count_on_off_status_and_bad_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, _gw) = fake_gateway(vec![script("hang")]).await;
    let farm = farm(&url, dir.path(), &[]).await;
    assert_eq!(vpdu(&farm, vpdu_command(OP_COUNT, 0, false)).await, 4);
    assert_eq!(farm.ports(), vec![0, 1, 2, 3]);
    assert_eq!(
        vpdu(&farm, vpdu_command(OP_STATUS, 2, false)).await,
        REPLY_OFF
    );
    power(&farm, 2, true).await;
    assert_eq!(
        vpdu(&farm, vpdu_command(OP_STATUS, 2, false)).await,
        REPLY_ON
    );
    assert!(farm.state(2));
    assert!(!farm.state(1));
    // The shutdown flag is accepted on an off.
    assert_eq!(vpdu(&farm, vpdu_command(OP_OFF, 2, true)).await, REPLY_ACK);
    assert_eq!(
        vpdu(&farm, vpdu_command(OP_STATUS, 2, false)).await,
        REPLY_OFF
    );
    let log: Vec<bool> = farm.power_log(2).iter().map(|(_, on)| *on).collect();
    assert_eq!(log, vec![true, false]);
    // Unknown ports are errors, for every operation but count.
    for op in [OP_ON, OP_OFF, OP_STATUS] {
        assert_eq!(vpdu(&farm, vpdu_command(op, 4, false)).await, REPLY_ERROR);
        assert_eq!(
            vpdu(&farm, vpdu_command(op, 2047, false)).await,
            REPLY_ERROR
        );
    }
    assert!(farm.set_power(9, true).is_err());
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpdu_serves_connections_concurrently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, _gw) = fake_gateway(vec![script("hang")]).await;
    let farm = farm(&url, dir.path(), &[]).await;
    // A client that connects and says nothing must not hold up the others.
    let _idle = TcpStream::connect(farm.addr()).await.expect("connect");
    let mut clients = vec![];
    for _ in 0..20 {
        let addr = farm.addr();
        clients.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&vpdu_command(OP_STATUS, 1, false).to_be_bytes())
                .await
                .expect("send");
            let mut r = [0u8; 1];
            s.read_exact(&mut r).await.expect("reply");
            r[0]
        }));
    }
    let started = Instant::now();
    for c in clients {
        assert_eq!(c.await.expect("client"), REPLY_OFF);
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_machine_netboots_and_runs_its_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, gw) = fake_gateway(vec![script(
        "print hello world; sleep 50; print TESTS PASSED; poweroff",
    )])
    .await;
    let farm = farm(&url, dir.path(), &[]).await;
    assert_eq!(farm.mac(1), "52:54:00:11:22:01");
    assert_eq!(farm.mac(10), "52:54:00:11:22:0a");
    let path = farm.console_path(1);
    assert_eq!(path, dir.path().join("tty/ttySIM1"));
    let mut console = ConsoleReader::open(&path);
    power(&farm, 1, true).await;
    assert_eq!(
        console.expect("SALAD.machine_id=").await,
        "SALAD.machine_id=52:54:00:11:22:01"
    );
    console.expect("farmgate: job test, boot 1").await;
    assert!(
        console
            .expect("Linux version")
            .await
            .contains("6.1.0-farmsim")
    );
    console
        .expect("Command line: console=ttyS0 farmsim.script=\"print hello world;")
        .await;
    assert_eq!(console.expect("hello").await, "hello world");
    console.expect("TESTS PASSED").await;
    assert_eq!(console.expect("reboot:").await, "reboot: Power Down");
    // Halted, but the port stays on as a real machine's would.
    assert!(console.during(Duration::from_millis(300)).await.is_empty());
    assert!(farm.state(1));
    assert_eq!(farm.boot_count(1), 1);
    assert_eq!(gw.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        gw.macs.lock().expect("macs").clone(),
        vec!["52:54:00:11:22:01"]
    );
    farm.shutdown().await;
    assert!(!path.exists(), "the console link is removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_script_and_retry_until_the_gateway_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, gw) = fake_gateway(vec![
        (StatusCode::NOT_FOUND, "no".into()),
        (StatusCode::CONFLICT, "busy".into()),
        (StatusCode::CONFLICT, "busy".into()),
        ipxe("console=ttyS0 quiet"),
    ])
    .await;
    let farm = farm(&url, dir.path(), &[]).await;
    let mut console = ConsoleReader::open(&farm.console_path(3));
    power(&farm, 3, true).await;
    assert!(console.expect("iPXE: boot failed").await.contains("404"));
    assert!(console.expect("iPXE: boot failed").await.contains("409"));
    console.expect("Linux version").await;
    console.expect("farmsim: booted").await;
    console.expect("reboot: Power Down").await;
    assert_eq!(gw.requests.load(Ordering::SeqCst), 4);
    // The same 409 twice in a row is printed once.
    let failures = console
        .seen
        .iter()
        .filter(|l| l.contains("boot failed"))
        .count();
    assert_eq!(failures, 2, "{:#?}", console.seen);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_boots_again_and_power_off_stops_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, gw) = fake_gateway(vec![
        script("print first; reboot"),
        script("print second; sleep 400; print too late; poweroff"),
        script("print third; panic"),
    ])
    .await;
    let farm = farm(&url, dir.path(), &[]).await;
    let mut console = ConsoleReader::open(&farm.console_path(0));
    power(&farm, 0, true).await;
    console.expect("first").await;
    console.expect("reboot: Restarting system").await;
    console.expect("SALAD.machine_id=").await;
    console.expect("second").await;
    power(&farm, 0, false).await;
    let after = console.during(Duration::from_millis(800)).await;
    assert!(
        after.is_empty(),
        "a machine switched off prints nothing: {after:?}"
    );
    assert_eq!(farm.boot_count(0), 2);
    assert_eq!(gw.requests.load(Ordering::SeqCst), 2);
    // Switched on again, it starts from scratch.
    power(&farm, 0, true).await;
    console.expect("SALAD.machine_id=52:54:00:11:22:00").await;
    console.expect("third").await;
    assert_eq!(
        console.expect("Kernel panic").await,
        "Kernel panic - not syncing: farmsim"
    );
    assert_eq!(farm.boot_count(0), 3);
    let log: Vec<bool> = farm.power_log(0).iter().map(|(_, on)| *on).collect();
    assert_eq!(log, vec![true, false, true]);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_input_copies_console_lines_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, _gw) = fake_gateway(vec![script("print ready for input; echo_input")]).await;
    let farm = farm(&url, dir.path(), &[]).await;
    let mut console = ConsoleReader::open(&farm.console_path(1));
    power(&farm, 1, true).await;
    console.expect("ready for input").await;
    console.type_line("ping 42");
    assert_eq!(console.expect("ping").await, "ping 42");
    console.type_line("second line");
    assert_eq!(console.expect("second").await, "second line");
    // Raw mode: what the gateway writes is not echoed by the pty itself, so each typed
    // line came back exactly once.
    assert_eq!(
        console.seen.iter().filter(|l| l.contains("ping")).count(),
        1
    );
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behaviours_dead_nonetboot_unfit_flaky() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, gw) = fake_gateway(vec![script("print up; poweroff")]).await;
    let farm = farm(
        &url,
        dir.path(),
        &[
            (0, Behaviour::Dead),
            (1, Behaviour::NoNetboot),
            (2, Behaviour::Unfit),
            (3, Behaviour::Flaky { fail_every: 2 }),
        ],
    )
    .await;
    let mut dead = ConsoleReader::open(&farm.console_path(0));
    let mut nonetboot = ConsoleReader::open(&farm.console_path(1));
    let mut unfit = ConsoleReader::open(&farm.console_path(2));
    let mut flaky = ConsoleReader::open(&farm.console_path(3));

    power(&farm, 0, true).await;
    power(&farm, 1, true).await;
    nonetboot.expect("SALAD.machine_id=52:54:00:11:22:01").await;
    nonetboot.expect("No bootable device").await;
    assert!(dead.during(Duration::from_millis(500)).await.is_empty());
    assert_eq!(farm.boot_count(0), 1, "a dead boot still counts");
    assert_eq!(
        gw.requests.load(Ordering::SeqCst),
        0,
        "neither fetched a script"
    );

    power(&farm, 2, true).await;
    let linux = unfit.expect("Linux version").await;
    let next = unfit.during(Duration::from_millis(500)).await;
    assert_eq!(
        next.first().map(String::as_str),
        Some("HARDWARE ERROR: simulated machine check"),
        "after {linux:?}"
    );
    // Repaired: the next boot is clean.
    // The script still runs after the error.
    assert_eq!(
        next.last().map(String::as_str),
        Some("reboot: Power Down"),
        "{next:?}"
    );
    farm.set_behaviour(2, Behaviour::Healthy);
    power(&farm, 2, false).await;
    let before = unfit.seen.len();
    power(&farm, 2, true).await;
    unfit.expect("reboot: Power Down").await;
    let second_boot = &unfit.seen[before..];
    assert!(
        second_boot.iter().any(|l| l.starts_with("Linux version")),
        "{second_boot:?}"
    );
    assert!(
        !second_boot.iter().any(|l| l.contains("HARDWARE ERROR")),
        "{second_boot:?}"
    );

    // Flaky, every 2nd boot is dead.
    power(&farm, 3, true).await;
    flaky.expect("reboot: Power Down").await;
    power(&farm, 3, false).await;
    power(&farm, 3, true).await;
    assert!(flaky.during(Duration::from_millis(500)).await.is_empty());
    power(&farm, 3, false).await;
    power(&farm, 3, true).await;
    flaky.expect("SALAD.machine_id=").await;
    flaky.expect("reboot: Power Down").await;
    assert_eq!(farm.boot_count(3), 3);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_artifacts_reports_a_missing_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, gw) = fake_gateway(vec![]).await;
    let bad = format!("#!ipxe\nkernel {url}/missing farmsim.script=\"print never\"\nboot\n");
    let good = format!(
        "#!ipxe\nkernel {url}/kernel farmsim.script=\"print fetched\"\ninitrd {url}/kernel\nboot\n"
    );
    {
        let mut r = gw.responses.lock().expect("responses");
        r.push((StatusCode::OK, bad));
        r.push((StatusCode::OK, good));
    }
    let farm = SimFarm::start(SimFarmConfig {
        tty_dir: dir.path().join("tty"),
        gateway_url: url.clone(),
        fetch_artifacts: true,
        boot_retry: Duration::from_millis(50),
        ..SimFarmConfig::default()
    })
    .await
    .expect("farm starts");
    let mut console = ConsoleReader::open(&farm.console_path(1));
    farm.set_power(1, true).expect("power on");
    let err = console.expect("iPXE: boot failed").await;
    assert!(err.contains("/missing") && err.contains("404"), "{err}");
    assert!(
        console
            .expect(&format!("{url}/kernel... ok"))
            .await
            .contains("12 bytes")
    );
    console.expect("fetched").await;
    assert!(!console.seen.iter().any(|l| l == "never"));
    farm.shutdown().await;
}

#[tokio::test]
async fn start_refuses_bad_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = SimFarm::start(SimFarmConfig {
        ports: 3000,
        tty_dir: dir.path().to_path_buf(),
        ..SimFarmConfig::default()
    })
    .await
    .err()
    .expect("too many ports");
    assert!(err.to_string().contains("2048"), "{err}");
    let err = SimFarm::start(SimFarmConfig {
        ports: 2,
        tty_dir: dir.path().to_path_buf(),
        behaviours: [(5, Behaviour::Dead)].into_iter().collect(),
        ..SimFarmConfig::default()
    })
    .await
    .err()
    .expect("behaviour of a missing port");
    assert!(err.to_string().contains("port 5"), "{err}");
}

#[test]
fn behaviour_names() {
    assert_eq!("healthy".parse(), Ok(Behaviour::Healthy));
    assert_eq!("Dead".parse(), Ok(Behaviour::Dead));
    assert_eq!("nonetboot".parse(), Ok(Behaviour::NoNetboot));
    assert_eq!("unfit".parse(), Ok(Behaviour::Unfit));
    assert_eq!("flaky:3".parse(), Ok(Behaviour::Flaky { fail_every: 3 }));
    assert!("flaky:x".parse::<Behaviour>().is_err());
    assert!("grumpy".parse::<Behaviour>().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farm_sim_binary_serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_farm-sim"))
        .args(["--listen", "127.0.0.1:0", "--ports", "3", "--tty-dir"])
        .arg(dir.path().join("tty"))
        .args([
            "--gateway-url",
            "http://127.0.0.1:1",
            "--behaviour",
            "1=dead",
        ])
        .args(["--behaviour", "2=flaky:2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("farm-sim starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut first),
    )
    .await
    .expect("farm-sim prints its address")
    .expect("read stdout");
    let addr: std::net::SocketAddr = first
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&vpdu_command(OP_COUNT, 0, false).to_be_bytes())
        .await
        .expect("send");
    let mut r = [0u8; 1];
    s.read_exact(&mut r).await.expect("reply");
    assert_eq!(r[0], 3);
    assert!(dir.path().join("tty/ttySIM2").exists());
    let pid = child.id().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("farm-sim stops on SIGTERM")
        .expect("status");
    assert!(status.success(), "{status}");
    assert!(!dir.path().join("tty/ttySIM2").exists());

    // A bad behaviour is refused with a message naming it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_farm-sim"))
        .args(["--tty-dir"])
        .arg(dir.path().join("tty"))
        .args(["--behaviour", "1=grumpy"])
        .output()
        .await
        .expect("farm-sim runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("grumpy"));
}

/// Regression: a dropped farm left its `ttySIM*` links behind. The kernel hands the closed
/// ptys' /dev/pts numbers to the next ptys opened, so a SALAD that outlived its test (a
/// kept benchmark's daemon) followed the stale links into the next farm's consoles and
/// read, i.e. stole, their output: DUTs of the next run lost their console on every job.
#[tokio::test]
async fn dropping_a_farm_removes_its_console_links() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, _gw) = fake_gateway(vec![script("hang")]).await;
    let farm = farm(&url, dir.path(), &[]).await;
    let links: Vec<PathBuf> = farm.ports().iter().map(|p| farm.console_path(*p)).collect();
    for link in &links {
        assert!(std::fs::symlink_metadata(link).is_ok(), "{link:?} exists");
    }
    drop(farm);
    for link in &links {
        assert!(
            std::fs::symlink_metadata(link).is_err(),
            "{link:?} still exists after the farm was dropped"
        );
    }
}
