//! The DHCP and TFTP servers, run by the `farmgate-netboot-serve` helper inside a network
//! namespace, against real clients in another namespace joined by a veth pair: busybox
//! udhcpc, ISC dhclient, tftp-hpa, and the helper's `probe` (a raw DHCP client that can
//! pose as PXE firmware or iPXE).
//!
//! Needs root (CI runs as root). Namespaces are named `fgdh-srv-<pid>-<n>` and
//! `fgdh-cli-<pid>-<n>`; a guard deletes them and kills every process it started.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_farmgate-netboot-serve");
const SRV_IF: &str = "fgdh-s";
const CLI_IF: &str = "fgdh-c";
const CLI_MAC: &str = "02:fd:00:00:00:01";

static NEXT: AtomicU8 = AtomicU8::new(1);

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `farmgate-netboot-serve` and its stdout lines.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    /// Waits (at most `timeout`) for a line satisfying `pred`, and returns it.
    fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("server: no expected line within {timeout:?}: {e}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A background client process, killed on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two namespaces joined by a veth pair: 10.213.<n>.1/24 on the server side, no address on
/// the client side (MAC [`CLI_MAC`]).
struct Lab {
    srv: String,
    cli: String,
    n: u8,
    dir: tempfile::TempDir,
    server: Option<Server>,
}

impl Lab {
    fn new() -> Lab {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let lab = Lab {
            srv: format!("fgdh-srv-{pid}-{n}"),
            cli: format!("fgdh-cli-{pid}-{n}"),
            n,
            dir: tempfile::tempdir().unwrap(),
            server: None,
        };
        std::fs::create_dir(lab.root()).unwrap();
        run_ok(Command::new("ip").args(["netns", "add", &lab.srv]));
        run_ok(Command::new("ip").args(["netns", "add", &lab.cli]));
        let ip_in = |ns: &str, args: &[&str]| {
            run_ok(Command::new("ip").args(["-n", ns]).args(args));
        };
        ip_in(
            &lab.srv,
            &[
                "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF, "netns", &lab.cli,
            ],
        );
        ip_in(
            &lab.srv,
            &[
                "addr",
                "add",
                &format!("{}/24", lab.server_ip()),
                "dev",
                SRV_IF,
            ],
        );
        ip_in(&lab.srv, &["link", "set", SRV_IF, "up"]);
        ip_in(&lab.srv, &["link", "set", "lo", "up"]);
        ip_in(&lab.cli, &["link", "set", CLI_IF, "address", CLI_MAC]);
        ip_in(&lab.cli, &["link", "set", CLI_IF, "up"]);
        ip_in(&lab.cli, &["link", "set", "lo", "up"]);
        lab
    }

    fn server_ip(&self) -> String {
        format!("10.213.{}.1", self.n)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn leases_file(&self) -> PathBuf {
        self.dir.path().join("leases.json")
    }

    /// Starts (or restarts) the DHCP and TFTP servers in the server namespace.
    fn start_server(&mut self) -> &Server {
        self.server = None;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.srv, BIN, "--interface", SRV_IF])
            .arg("--tftp-root")
            .arg(self.root())
            .args(["--http-port", "8080", "--leases"])
            .arg(self.leases_file())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let server = self.server.insert(Server { child, lines });
        server.wait_line(Duration::from_secs(10), |l| l == "ready");
        server
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// `ip netns exec <client ns> args…`, killed after `secs` seconds.
    fn in_client(&self, secs: u32, args: &[&str]) -> Output {
        run(Command::new("timeout")
            .arg(secs.to_string())
            .args(["ip", "netns", "exec", &self.cli])
            .args(args))
    }

    /// The helper's DHCP probe from the client namespace; its stdout lines.
    fn probe(&self, mac: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            BIN,
            "probe",
            "--interface",
            CLI_IF,
            "--mac",
            mac,
            "--timeout-ms",
            "5000",
        ];
        args.extend_from_slice(extra);
        let out = self.in_client(10, &args);
        assert!(
            out.status.success(),
            "probe {mac} {extra:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether `addr` is in the pool `from_interface` makes for 10.213.n.1/24.
    fn in_pool(&self, addr: &str) -> bool {
        let prefix = format!("10.213.{}.", self.n);
        addr.strip_prefix(&prefix)
            .and_then(|h| h.parse::<u8>().ok())
            .is_some_and(|h| (2..=254).contains(&h))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.server = None;
        for ns in [&self.srv, &self.cli] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The value of `key=` in a `key=value key=value` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}

#[test]
fn udhcpc_gets_a_pool_address_and_no_boot_file() {
    let mut lab = Lab::new();
    lab.start_server();
    let script = lab.dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"event=$1 ip=$ip siaddr=$siaddr boot_file=$boot_file\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap();
    let out = lab.in_client(
        15,
        &[
            "udhcpc", "-i", CLI_IF, "-n", "-q", "-f", "-t", "3", "-T", "2", "-s", script,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "udhcpc: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bound = stdout
        .lines()
        .find(|l| l.starts_with("event=bound"))
        .unwrap_or_else(|| panic!("udhcpc never bound: {stdout}"));
    let ip = field(bound, "ip");
    assert!(lab.in_pool(ip), "{ip} not in the pool");
    assert_eq!(field(bound, "siaddr"), lab.server_ip());
    // A plain OS client gets no boot file.
    assert_eq!(field(bound, "boot_file"), "");
    let seen = lab.server().wait_line(Duration::from_secs(5), |l| {
        l.contains("type=DHCPREQUEST") && l.contains(CLI_MAC)
    });
    assert_eq!(field(&seen, "address"), ip);
    assert_eq!(field(&seen, "boot_file"), "-");
}

#[test]
fn dhclient_gets_a_pool_address() {
    let mut lab = Lab::new();
    lab.start_server();
    let conf = lab.dir.path().join("dhclient.conf");
    let lease = lab.dir.path().join("dhclient.leases");
    let pid = lab.dir.path().join("dhclient.pid");
    std::fs::write(&conf, "").unwrap();
    // -d keeps it in the foreground (so that the guard can kill it); it is done once the
    // lease file names the address.
    let _client = Background(
        Command::new("ip")
            .args(["netns", "exec", &lab.cli, "dhclient", "-d", "-1", "-v"])
            .arg("-cf")
            .arg(&conf)
            .args(["-sf", "/bin/true", "-lf"])
            .arg(&lease)
            .arg("-pf")
            .arg(&pid)
            .arg(CLI_IF)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let address = loop {
        let text = std::fs::read_to_string(&lease).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("fixed-address "))
        {
            break a.trim_end_matches(';').to_string();
        }
        assert!(Instant::now() < deadline, "dhclient got no lease: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(lab.in_pool(&address), "{address} not in the pool");
    let seen = lab.server().wait_line(Duration::from_secs(5), |l| {
        l.contains("type=DHCPREQUEST") && l.contains(CLI_MAC)
    });
    assert_eq!(field(&seen, "address"), address);
}

#[test]
fn same_mac_keeps_its_address_across_discovers_and_restarts() {
    let mut lab = Lab::new();
    lab.start_server();
    let a = "02:00:00:00:0a:01";
    let b = "02:00:00:00:0b:02";
    let first = lab.probe(a, &["--request"]);
    let addr = field(&first[0], "address").to_string();
    assert!(lab.in_pool(&addr));
    assert_eq!(first[1], format!("ack address={addr}"));
    // Another DISCOVER from the same MAC: the same address; another MAC: another one.
    let again = lab.probe(a, &[]);
    assert_eq!(field(&again[0], "address"), addr);
    let other = lab.probe(b, &["--request"]);
    let other_addr = field(&other[0], "address").to_string();
    assert!(lab.in_pool(&other_addr));
    assert_ne!(other_addr, addr);
    // The leases file keeps both bindings across a restart.
    let saved = std::fs::read_to_string(lab.leases_file()).unwrap();
    assert!(saved.contains(a) && saved.contains(&addr), "{saved}");
    lab.start_server();
    assert_eq!(field(&lab.probe(b, &[])[0], "address"), other_addr);
    assert_eq!(field(&lab.probe(a, &[])[0], "address"), addr);
}

#[test]
fn pxe_firmware_and_ipxe_get_their_boot_files() {
    let mut lab = Lab::new();
    lab.start_server();
    let server_ip = lab.server_ip();

    let bios = lab.probe("02:00:00:00:00:b1", &["--pxe-arch", "0"]);
    assert_eq!(field(&bios[0], "file"), "undionly.kpxe");
    assert_eq!(field(&bios[0], "siaddr"), server_ip);
    let efi = lab.probe("02:00:00:00:00:e7", &["--pxe-arch", "7"]);
    assert_eq!(field(&efi[0], "file"), "ipxe.efi");

    let mac = "02:00:00:00:00:1e";
    let ipxe = lab.probe(mac, &["--pxe-arch", "0", "--ipxe", "--request"]);
    assert_eq!(
        field(&ipxe[0], "file"),
        format!(
            "http://{server_ip}:8080/api/v1/dut/{mac}/boot.ipxe?arch=${{buildarch}}&platform=${{platform}}"
        )
    );
    assert!(ipxe[1].starts_with("ack address="));
    let seen = lab.server().wait_line(Duration::from_secs(5), |l| {
        l.contains(mac) && l.contains("type=DHCPREQUEST")
    });
    assert_eq!(field(&seen, "ipxe"), "true");
    assert_eq!(field(&seen, "arch"), "0");
}

#[test]
fn tftp_hpa_fetches_a_file_and_cannot_escape_the_root() {
    let mut lab = Lab::new();
    // A file spanning many blocks, with content that shows misplaced blocks.
    let mut x: u32 = 0x9e37_79b9;
    let content: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(lab.root().join("undionly.kpxe"), &content).unwrap();
    std::fs::write(lab.dir.path().join("secret"), b"secret").unwrap();
    lab.start_server();
    run_ok(Command::new("ip").args([
        "-n",
        &lab.cli,
        "addr",
        "add",
        &format!("10.213.{}.100/24", lab.n),
        "dev",
        CLI_IF,
    ]));
    let server_ip = lab.server_ip();
    let tftp_get = |name: &str, dest: &Path| {
        lab.in_client(
            15,
            &[
                "tftp",
                "-m",
                "binary",
                &server_ip,
                "-c",
                "get",
                name,
                dest.to_str().unwrap(),
            ],
        )
    };
    let dest = lab.dir.path().join("got");
    let out = tftp_get("undionly.kpxe", &dest);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&dest).unwrap() == content, "content differs");

    let dest = lab.dir.path().join("escaped");
    let out = tftp_get("../secret", &dest);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("Error code 2"), "tftp said: {said}");
    assert_eq!(std::fs::read(&dest).unwrap_or_default(), b"");
}
