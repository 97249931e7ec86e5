//! The agent's network setup against real components, as root: two network namespaces
//! joined by a veth pair, Debian's dnsmasq as the DHCP server in one, the agent's code run
//! in a thread that entered the other (its interface renamed `eth0`, as on a DUT), the
//! result checked with `ip -n` and busybox `ping`.

use std::fs::File;
use std::net::Ipv4Addr;
use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use farmgate_agent::cmdline;
use farmgate_agent::net::{self, IfaceConfig, NetError, NetPaths, Source};
use nix::sched::CloneFlags;
use socket2::{Domain, SockAddr, Socket, Type};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair (`<server veth>` with 10.77.0.1/24 in the server
/// one, `eth0` in the client one), and the processes started in them; all of it killed and
/// deleted on drop.
struct Lab {
    server_ns: String,
    client_ns: String,
    server_if: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let lab = Lab {
            server_ns: format!("fgnet-{pid}-{n}-server"),
            client_ns: format!("fgnet-{pid}-{n}-client"),
            server_if: format!("fgs{pid}x{n}"),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let client_if = format!("fgc{pid}x{n}");
        // Registered in `lab` first so that Drop deletes them even if a later step fails.
        ip(&["netns", "add", &lab.server_ns]);
        ip(&["netns", "add", &lab.client_ns]);
        ip(&[
            "link",
            "add",
            &lab.server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
        ]);
        ip(&["link", "set", &lab.server_if, "netns", &lab.server_ns]);
        ip(&["link", "set", &client_if, "netns", &lab.client_ns]);
        ip(&[
            "-n",
            &lab.client_ns,
            "link",
            "set",
            &client_if,
            "name",
            "eth0",
        ]);
        let s = &lab.server_ns;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            &lab.server_if,
        ]);
        ip(&["-n", s, "link", "set", &lab.server_if, "up"]);
        ip(&["-n", s, "link", "set", "lo", "up"]);
        lab
    }

    /// dnsmasq serving 10.77.0.50–60 with router, DNS and NTP 10.77.0.1.
    fn start_dnsmasq(&mut self) {
        let leases = self.dir.path().join("leases");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns, "/usr/sbin/dnsmasq"])
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--pid-file=",
                "--user=root",
                &format!("--interface={}", self.server_if),
                "--bind-interfaces",
                "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,1h",
                "--dhcp-option=3,10.77.0.1",
                "--dhcp-option=6,10.77.0.1",
                "--dhcp-option=42,10.77.0.1",
                &format!("--dhcp-leasefile={}", leases.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dnsmasq");
        self.children.push(child);
        // A dnsmasq that refuses its options exits at once: say why.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(c) = self.children.last_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("dnsmasq exited with {status}: {err}");
        }
    }

    /// Runs `f` in a thread inside the client namespace, on a current-thread runtime.
    fn in_client<T: Send + 'static>(&self, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.client_ns);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns into the client netns");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
        .join()
        .expect("client thread panicked")
    }

    fn client_ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.client_ns];
        a.extend_from_slice(args);
        ip(&a)
    }

    fn ping_server_from_client(&self) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.client_ns, "/bin/busybox", "ping"])
            .args(["-c1", "-W2", "10.77.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// Stops (and joins) the garbage sender on drop.
struct Sprayer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl Sprayer {
    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Sprayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Lab {
    /// From the server namespace, broadcasts junk to port 68 every 50 ms: random bytes,
    /// truncated BOOTP replies, and well-formed replies for another transaction.
    fn spray_garbage(&self) -> Sprayer {
        let path = format!("/var/run/netns/{}", self.server_ns);
        let dev = self.server_if.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns into the server netns");
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("UDP socket");
            s.set_broadcast(true).expect("SO_BROADCAST");
            s.bind_device(Some(dev.as_bytes()))
                .expect("SO_BINDTODEVICE");
            let to: SockAddr = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68).into();
            let mut foreign = vec![0u8; 300];
            foreign[0] = 2;
            foreign[4..8].copy_from_slice(&[1, 2, 3, 4]);
            foreign[236..240].copy_from_slice(&[99, 130, 83, 99]);
            foreign[240..244].copy_from_slice(&[53, 1, 2, 255]);
            let mut truncated = foreign.clone();
            truncated.truncate(200);
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut sent = 0;
            while !stop2.load(Ordering::SeqCst) {
                let random: Vec<u8> = (0..64 + (state % 500) as usize)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                for p in [&random, &truncated, &foreign] {
                    if s.send_to(p, &to).is_ok() {
                        sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        });
        Sprayer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn in_pool(a: Ipv4Addr) -> bool {
    (Ipv4Addr::new(10, 77, 0, 50)..=Ipv4Addr::new(10, 77, 0, 60)).contains(&a)
}

#[test]
fn dhcp_from_dnsmasq_then_configure() {
    let mut lab = Lab::new();
    lab.start_dnsmasq();
    let resolv = lab.dir.path().join("etc/resolv.conf");
    let resolv2 = resolv.clone();
    let lease = lab
        .in_client(async move || {
            let lease = net::dhcp("eth0", Duration::from_secs(15)).await?;
            net::configure("eth0", &IfaceConfig::from(&lease), Some(&resolv2)).await?;
            Ok::<_, NetError>(lease)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(in_pool(lease.address), "{lease:?}");
    assert_eq!(lease.prefix_len, 24);
    assert_eq!(lease.router, Some(SERVER_IP));
    assert_eq!(lease.dns, vec![SERVER_IP]);
    assert_eq!(lease.ntp, vec![SERVER_IP]);
    assert_eq!(lease.server, SERVER_IP);
    assert_eq!(lease.lease_time, Some(Duration::from_secs(3600)));

    let addrs = lab.client_ip(&["-4", "addr", "show", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {}/24", lease.address)),
        "{addrs}"
    );
    let lo = lab.client_ip(&["-4", "addr", "show", "lo"]);
    assert!(lo.contains("inet 127.0.0.1/8"), "lo not up: {lo}");
    let routes = lab.client_ip(&["route"]);
    assert!(
        routes.contains("default via 10.77.0.1 dev eth0"),
        "{routes}"
    );
    let text = std::fs::read_to_string(&resolv).expect("resolv.conf written");
    assert!(text.lines().any(|l| l == "nameserver 10.77.0.1"), "{text}");
    assert!(
        lab.ping_server_from_client(),
        "no ping reply from 10.77.0.1"
    );
    // dnsmasq recorded the lease for our MAC.
    let leases = std::fs::read_to_string(lab.dir.path().join("leases")).unwrap_or_default();
    assert!(leases.contains(&lease.address.to_string()), "{leases}");
}

#[test]
fn a_lease_is_renewed_with_the_server() {
    let mut lab = Lab::new();
    lab.start_dnsmasq();
    let leases_file = lab.dir.path().join("leases");
    let expiry = |text: &str, addr: &str| -> u64 {
        text.lines()
            .find(|l| l.contains(addr))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no lease of {addr} in {text:?}"))
    };
    let (lease, renewed, before) = lab
        .in_client({
            let leases_file = leases_file.clone();
            async move || {
                let lease = net::dhcp("eth0", Duration::from_secs(15)).await?;
                net::configure("eth0", &IfaceConfig::from(&lease), None).await?;
                let before = std::fs::read_to_string(&leases_file).unwrap_or_default();
                // dnsmasq's lease file counts in seconds: let one go by.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let renewed = net::renew("eth0", &lease, Duration::from_secs(10)).await?;
                Ok::<_, NetError>((lease, renewed, before))
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(renewed.address, lease.address, "{renewed:?}");
    assert_eq!(renewed.lease_time, Some(Duration::from_secs(3600)));
    let addr = lease.address.to_string();
    let after = std::fs::read_to_string(&leases_file).unwrap_or_default();
    assert!(
        expiry(&after, &addr) > expiry(&before, &addr),
        "the server did not extend the lease:\nbefore {before}\nafter {after}"
    );
}

#[test]
fn bring_up_defaults_to_dhcp_on_wired_interfaces() {
    let mut lab = Lab::new();
    lab.start_dnsmasq();
    let paths = NetPaths {
        resolv_conf: lab.dir.path().join("resolv.conf"),
        ip_forward: None,
    };
    // A second wired interface without a server behind it (an unplugged NIC).
    lab.client_ip(&[
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "dangling1",
    ]);
    let paths2 = paths.clone();
    let started = Instant::now();
    let configured = lab
        .in_client(async move || {
            let cfg =
                cmdline::parse("console=ttyS0 b2c.container=docker://alpine").expect("cmdline");
            net::bring_up(&cfg, &paths2, Duration::from_secs(20)).await
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // eth0's lease in a second or two, then eth1 gets 2 s more, not the 20 s timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(configured.len(), 1, "{configured:?}");
    let c = &configured[0];
    assert_eq!(c.iface, "eth0");
    assert!(matches!(&c.source, Source::Dhcp(l) if l.server == SERVER_IP));
    let line = c.to_string();
    assert_eq!(
        line,
        format!(
            "eth0 {}/24 via 10.77.0.1 (DHCP server 10.77.0.1)",
            c.config.address
        )
    );
    let routes = lab.client_ip(&["route"]);
    assert!(
        routes.contains("default via 10.77.0.1 dev eth0"),
        "{routes}"
    );
    let text = std::fs::read_to_string(&paths.resolv_conf).expect("resolv.conf written");
    assert!(text.contains("nameserver 10.77.0.1\n"), "{text}");
    assert!(
        lab.ping_server_from_client(),
        "no ping reply from 10.77.0.1"
    );
}

#[test]
fn no_dhcp_server_is_a_clear_error_within_the_timeout() {
    let lab = Lab::new();
    let (err, elapsed) = lab.in_client(async || {
        let t = Instant::now();
        let r = net::dhcp("eth0", Duration::from_secs(3)).await;
        (r.err().map(|e| e.to_string()), t.elapsed())
    });
    let err = err.expect("no server, yet a lease");
    assert!(
        err.starts_with("eth0: no DHCP offer within 3 s ("),
        "unexpected error: {err}"
    );
    assert!(err.contains("DISCOVERs sent"), "{err}");
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_millis(4500),
        "took {elapsed:?}"
    );
}

#[test]
fn static_configuration_from_b2c_iface() {
    let lab = Lab::new();
    let paths = NetPaths {
        resolv_conf: lab.dir.path().join("resolv.conf"),
        ip_forward: Some(lab.dir.path().join("ip_forward")),
    };
    let paths2 = paths.clone();
    let configured = lab
        .in_client(async move || {
            let cfg = cmdline::parse(
                "b2c.iface=eth0,address=10.77.0.9/24,gateway=10.77.0.1,nameserver=10.77.0.1,\
                 route=10.99.0.0/16:10.77.0.254,forward",
            )
            .expect("cmdline");
            net::bring_up(&cfg, &paths2, Duration::from_secs(5)).await
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(configured.len(), 1);
    assert_eq!(configured[0].source, Source::Static);
    assert_eq!(
        configured[0].to_string(),
        "eth0 10.77.0.9/24 via 10.77.0.1 (static)"
    );
    let addrs = lab.client_ip(&["-4", "addr", "show", "eth0"]);
    assert!(addrs.contains("inet 10.77.0.9/24"), "{addrs}");
    let routes = lab.client_ip(&["route"]);
    assert!(
        routes.contains("default via 10.77.0.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.99.0.0/16 via 10.77.0.254 dev eth0"),
        "{routes}"
    );
    let text = std::fs::read_to_string(&paths.resolv_conf).expect("resolv.conf written");
    assert!(text.contains("nameserver 10.77.0.1\n"), "{text}");
    let fwd = std::fs::read_to_string(lab.dir.path().join("ip_forward")).expect("ip_forward");
    assert_eq!(fwd.trim(), "1");
    assert!(
        lab.ping_server_from_client(),
        "no ping reply from 10.77.0.1"
    );
}

#[test]
fn missing_interface_and_bad_static_values_are_named() {
    let lab = Lab::new();
    let errors = lab.in_client(async || {
        let paths = NetPaths {
            resolv_conf: Path::new("/nonexistent-fgnet/resolv.conf").into(),
            ip_forward: None,
        };
        let mut errors = Vec::new();
        for line in [
            "b2c.iface=eth7,dhcp",
            "b2c.iface=eth0,address=10.77.0.9",
            "b2c.iface=eth0,address=10.77.0.9/24,gateway=10.77.0",
        ] {
            let cfg = cmdline::parse(line).expect("cmdline");
            let r = net::bring_up(&cfg, &paths, Duration::from_millis(500)).await;
            errors.push(r.err().map(|e| e.to_string()));
        }
        // No wired interface at all: lo only, eth0 renamed away.
        errors.push(
            net::dhcp("lo", Duration::from_millis(500))
                .await
                .err()
                .map(|e| e.to_string()),
        );
        errors
    });
    let errors: Vec<String> = errors.into_iter().map(|e| e.expect("an error")).collect();
    assert_eq!(errors[0], "eth7: no such network interface (waited 0.5 s)");
    assert_eq!(
        errors[1],
        "b2c.iface eth0: address \"10.77.0.9\" has no /prefix length"
    );
    assert_eq!(
        errors[2],
        "b2c.iface eth0: gateway \"10.77.0\" is not an IPv4 address"
    );
    assert!(
        errors[3].starts_with("lo: hardware address"),
        "{}",
        errors[3]
    );
}

#[test]
fn kernel_ip_leaves_the_network_alone() {
    let lab = Lab::new();
    let paths = NetPaths {
        resolv_conf: lab.dir.path().join("resolv.conf"),
        ip_forward: None,
    };
    let configured = lab
        .in_client(async move || {
            let cfg = cmdline::parse("ip=dhcp").expect("cmdline");
            assert!(cfg.kernel_ip);
            net::bring_up(&cfg, &paths, Duration::from_secs(1)).await
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(configured.is_empty());
    assert!(!lab.dir.path().join("resolv.conf").exists());
    let addrs = lab.client_ip(&["-4", "addr", "show", "eth0"]);
    assert!(!addrs.contains("inet "), "{addrs}");
}

#[test]
fn garbage_replies_are_skipped() {
    let mut lab = Lab::new();
    let sprayer = lab.spray_garbage();
    let err = lab
        .in_client(async || net::dhcp("eth0", Duration::from_secs(2)).await.err())
        .map(|e| e.to_string())
        .expect("only garbage, yet a lease");
    assert!(
        err.starts_with("eth0: no DHCP offer within 2 s (")
            && err.contains("replies skipped, last: from 10.77.0.1:"),
        "{err}"
    );
    // With the garbage still coming, dnsmasq's OFFER and ACK are found among it.
    lab.start_dnsmasq();
    let lease = lab
        .in_client(async || net::dhcp("eth0", Duration::from_secs(15)).await)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(in_pool(lease.address), "{lease:?}");
    assert!(sprayer.stop() > 0, "no garbage was sent");
}
