//! SALAD against real ptys (symlinked into a tempdir matched by the glob) and real TCP
//! clients.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use farmgate_console::{ConsoleError, PONG, Salad, SaladConfig, SaladEvent, poll_owned_fd};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A simulated DUT serial port: the pty master is the DUT's side, the slave is what SALAD
/// opens through a symlink.
struct SimPort {
    master: AsyncFd<OwnedFd>,
    _slave: OwnedFd,
    link: PathBuf,
}

impl SimPort {
    fn new(dir: &Path, name: &str) -> SimPort {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        // Raw from the start, so nothing written before SALAD opens it is echoed back.
        let mut t = termios::tcgetattr(&pty.slave).expect("tcgetattr");
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t).expect("tcsetattr");
        let slave_path = nix::unistd::ttyname(&pty.slave).expect("ttyname");
        let link = dir.join(name);
        std::os::unix::fs::symlink(&slave_path, &link).expect("symlink");
        fcntl(&pty.master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
        SimPort {
            master: poll_owned_fd(pty.master).expect("register master"),
            _slave: pty.slave,
            link,
        }
    }

    async fn write(&self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self
                .master
                .async_io(Interest::WRITABLE, |f| {
                    nix::unistd::write(f, data).map_err(io::Error::from)
                })
                .await
                .expect("write to pty master");
            data = &data[n..];
        }
    }

    /// Read until the output contains `needle`; returns all that was read.
    async fn read_until(&self, needle: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + WAIT;
        while !contains(&got, needle) {
            let r = tokio::time::timeout_at(
                deadline,
                self.master.async_io(Interest::READABLE, |f| {
                    nix::unistd::read(f, &mut buf).map_err(io::Error::from)
                }),
            )
            .await;
            match r {
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("reading the pty master: {e}"),
                Err(_) => panic!(
                    "timed out waiting for {:?} on the pty; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        got
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn read_tcp_until(sock: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !contains(&got, needle) {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Ok(Ok(0)) => panic!(
                "connection closed before {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("reading the TCP client: {e}"),
            Err(_) => panic!(
                "timed out waiting for {:?} on TCP; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    got
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    salad: Salad,
    cancel: CancellationToken,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let cancel = CancellationToken::new();
        let salad = Salad::start(
            SaladConfig {
                serial_globs: vec![format!("{}/ttySIM*", dir.path().display())],
                rescan_interval: Duration::from_millis(50),
                bind_host: LOCALHOST,
                baud: 115_200,
                tcpconsole_bind: Some(SocketAddr::new(LOCALHOST, 0)),
            },
            cancel.clone(),
        )
        .await
        .expect("SALAD starts");
        Fixture { dir, salad, cancel }
    }

    /// A new pty, once SALAD has opened it.
    async fn port(&self, name: &str) -> SimPort {
        let port = SimPort::new(self.dir.path(), name);
        let link = port.link.clone();
        wait_for("SALAD to open the pty", || {
            self.salad.devices().contains(&link)
        })
        .await;
        port
    }

    /// Announce `id` on `port` and wait for the binding.
    async fn announce(&self, port: &SimPort, id: &str) -> u16 {
        port.write(format!("SALAD.machine_id={id}\n").as_bytes())
            .await;
        let lower = id.to_ascii_lowercase();
        wait_for("the machine to be bound", || {
            self.salad.device_of(&lower).as_deref() == Some(port.link.as_path())
        })
        .await;
        self.salad.machine(&lower).expect("machine exists").tcp_port
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let fx = Fixture::new().await;
    let port = fx.port("ttySIM0").await;
    port.write(b"SALAD.ping\n").await;
    let got = port.read_until(b"SALAD.pong\n").await;
    assert_eq!(got, b"SALAD.pong\n");
    // A ping split across writes is still a line.
    port.write(b"[ 3.1] SALAD.").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    port.write(b"ping\r\n").await;
    port.read_until(b"SALAD.pong\n").await;
}

#[tokio::test]
async fn machine_id_binds_the_device_and_opens_a_port() {
    let fx = Fixture::new().await;
    assert!(fx.salad.machines().is_empty());
    let port = fx.port("ttySIM1").await;
    let tcp_port = fx.announce(&port, "AA:BB").await;
    assert_ne!(tcp_port, 0);
    let machines = fx.salad.machines();
    assert_eq!(machines.len(), 1, "{machines:?}");
    let info = machines["aa:bb"];
    assert_eq!(info.tcp_port, tcp_port);
    assert!(!info.has_client);
    assert_eq!(fx.salad.device_of("AA:BB"), Some(port.link.clone()));
    // Announcing again changes nothing; the port is stable.
    fx.announce(&port, "aa:bb").await;
    assert_eq!(
        fx.salad.machine("aa:bb").map(|m| m.tcp_port),
        Some(tcp_port)
    );
    // The REST view serialises as CI-tron's does.
    let json = serde_json::to_value(info).expect("serialise");
    assert_eq!(
        json,
        serde_json::json!({"tcp_port": tcp_port, "log_port": info.log_port, "has_client": false})
    );
}

#[tokio::test]
async fn one_client_relays_both_ways_and_a_second_is_refused() {
    let fx = Fixture::new().await;
    let port = fx.port("ttySIM2").await;
    let tcp_port = fx.announce(&port, "52:54:00:11:22:01").await;

    let mut first = TcpStream::connect((LOCALHOST, tcp_port))
        .await
        .expect("connect");
    wait_for("the client to be registered", || {
        fx.salad
            .machine("52:54:00:11:22:01")
            .is_some_and(|m| m.has_client)
    })
    .await;

    // Device -> client, relayed without waiting for a newline.
    port.write(b"hello from the DUT\nno newline yet").await;
    read_tcp_until(&mut first, b"hello from the DUT\nno newline yet").await;

    // Client -> device.
    first
        .write_all(b"typed by the runner\n")
        .await
        .expect("send");
    port.read_until(b"typed by the runner\n").await;

    // A second client is told why and closed.
    let mut second = TcpStream::connect((LOCALHOST, tcp_port))
        .await
        .expect("connect");
    let mut msg = Vec::new();
    tokio::time::timeout(WAIT, second.read_to_end(&mut msg))
        .await
        .expect("refusal arrives")
        .expect("read refusal");
    assert_eq!(
        String::from_utf8_lossy(&msg),
        "SALAD: machine 52:54:00:11:22:01 already has a client\n"
    );

    // The first client is unaffected.
    port.write(b"still here\n").await;
    read_tcp_until(&mut first, b"still here\n").await;

    // Closing the first lets a new client in, which gets output from then on.
    drop(first);
    wait_for("the client slot to be freed", || {
        fx.salad
            .machine("52:54:00:11:22:01")
            .is_some_and(|m| !m.has_client)
    })
    .await;
    let mut third = TcpStream::connect((LOCALHOST, tcp_port))
        .await
        .expect("connect");
    wait_for("the new client to be registered", || {
        fx.salad
            .machine("52:54:00:11:22:01")
            .is_some_and(|m| m.has_client)
    })
    .await;
    port.write(b"for the third\n").await;
    let got = read_tcp_until(&mut third, b"for the third\n").await;
    assert!(!contains(&got, b"still here"), "{got:?}");
    third.write_all(b"back\n").await.expect("send");
    port.read_until(b"back\n").await;
}

#[tokio::test]
async fn a_waiting_client_gets_the_announcing_line_and_what_follows() {
    let fx = Fixture::new().await;
    // The runner asks for the port before the DUT has announced itself.
    let tcp_port = fx
        .salad
        .machine_port("52:54:00:11:22:07")
        .await
        .expect("port");
    let mut client = TcpStream::connect((LOCALHOST, tcp_port))
        .await
        .expect("connect");
    wait_for("the client to be registered", || {
        fx.salad
            .machine("52:54:00:11:22:07")
            .is_some_and(|m| m.has_client)
    })
    .await;
    let port = fx.port("ttySIM3").await;
    port.write(b"before binding\nSALAD.machine_id=52:54:00:11:22:07\nafter\n")
        .await;
    let got = read_tcp_until(&mut client, b"after\n").await;
    assert_eq!(got, b"SALAD.machine_id=52:54:00:11:22:07\nafter\n");
    assert_eq!(
        fx.salad.machine("52:54:00:11:22:07").map(|m| m.tcp_port),
        Some(tcp_port)
    );
}

#[tokio::test]
async fn rebinding_moves_the_machine_to_the_new_device() {
    let fx = Fixture::new().await;
    let a = fx.port("ttySIM4").await;
    let b = fx.port("ttySIM5").await;
    let tcp_port = fx.announce(&a, "m1").await;
    assert_eq!(fx.announce(&b, "m1").await, tcp_port);
    assert_eq!(fx.salad.device_of("m1"), Some(b.link.clone()));
    // Device a now announces another machine.
    let other = fx.announce(&a, "m2").await;
    assert_ne!(other, tcp_port);
    assert_eq!(fx.salad.device_of("m2"), Some(a.link.clone()));
    assert_eq!(fx.salad.device_of("m1"), Some(b.link.clone()));

    let mut client = TcpStream::connect((LOCALHOST, tcp_port))
        .await
        .expect("connect");
    wait_for("the client to be registered", || {
        fx.salad.machine("m1").is_some_and(|m| m.has_client)
    })
    .await;
    a.write(b"from a\n").await;
    b.write(b"from b\n").await;
    let got = read_tcp_until(&mut client, b"from b\n").await;
    assert!(!contains(&got, b"from a"), "{got:?}");
}

#[tokio::test]
async fn garbage_and_huge_lines_do_not_break_the_device() {
    let fx = Fixture::new().await;
    let port = fx.port("ttySIM6").await;
    port.write(b"\xff\xfe\x00\xc3(\n").await;
    port.write(&vec![b'x'; 100_000]).await;
    port.write(b"SALAD.machine_id=bad id!\n").await;
    port.write(b"\nSALAD.ping\n").await;
    port.read_until(b"SALAD.pong\n").await;
    assert!(fx.salad.machines().is_empty(), "{:?}", fx.salad.machines());
    assert!(fx.salad.devices().contains(&port.link));
}

#[tokio::test]
async fn a_vanished_device_is_closed_and_a_returning_one_reopened() {
    let fx = Fixture::new().await;
    let port = fx.port("ttySIM7").await;
    fx.announce(&port, "m7").await;
    let link = port.link.clone();
    drop(port);
    std::fs::remove_file(&link).expect("remove symlink");
    wait_for("SALAD to close the device", || {
        !fx.salad.devices().contains(&link)
    })
    .await;
    // The binding survives, so a device coming back under that name keeps its machine.
    assert_eq!(fx.salad.device_of("m7"), Some(link.clone()));
    let again = fx.port("ttySIM7").await;
    again.write(b"SALAD.ping\n").await;
    again.read_until(b"SALAD.pong\n").await;
}

#[tokio::test]
async fn machine_port_validates_and_is_stable() {
    let fx = Fixture::new().await;
    let p = fx.salad.machine_port("AB:CD").await.expect("port");
    assert_eq!(fx.salad.machine_port("ab:cd").await.expect("port"), p);
    assert_eq!(
        fx.salad.machine("ab:cd"),
        Some(farmgate_console::MachineInfo {
            tcp_port: p,
            log_port: fx.salad.machine("ab:cd").map_or(0, |m| m.log_port),
            has_client: false,
            client: None,
        })
    );
    assert!(matches!(
        fx.salad.machine_port("no spaces").await,
        Err(ConsoleError::BadMachineId(_))
    ));
    assert!(fx.salad.machine("unknown").is_none());
}

#[tokio::test]
async fn bad_configuration_is_reported() {
    let config = |globs: Vec<String>, baud| SaladConfig {
        serial_globs: globs,
        rescan_interval: Duration::from_secs(1),
        bind_host: LOCALHOST,
        baud,
        tcpconsole_bind: None,
    };
    let err = Salad::start(
        config(vec!["/dev/tty[".into()], 115_200),
        CancellationToken::new(),
    )
    .await
    .expect_err("bad glob");
    assert!(err.to_string().contains("/dev/tty["), "{err}");
    let err = Salad::start(config(vec![], 12_345), CancellationToken::new())
        .await
        .expect_err("bad baud");
    assert!(matches!(err, ConsoleError::BadBaud(12_345)), "{err}");
}

/// Regression: the kernel completes a client's TCP connection before SALAD accepts and
/// registers it, and device output read in between is relayed to nobody. A client that
/// must not miss the first bytes (the job runner, which powers the DUT on right after)
/// needs a positive signal that does not put protocol bytes on the raw console stream:
/// the REST view names the registered client's address.
#[tokio::test]
async fn the_registered_client_is_named_and_gets_all_output_from_then_on() {
    let fx = Fixture::new().await;
    let port = fx.port("ttySIM9").await;
    let tcp_port = fx.announce(&port, "52:54:00:11:22:09").await;
    assert_eq!(
        fx.salad.machine("52:54:00:11:22:09").and_then(|m| m.client),
        None
    );
    let mut sock = TcpStream::connect((LOCALHOST, tcp_port))
        .await
        .expect("connect");
    let local = sock.local_addr().expect("local addr");
    wait_for("SALAD to name this client", || {
        fx.salad.machine("52:54:00:11:22:09").and_then(|m| m.client) == Some(local)
    })
    .await;
    let info = fx.salad.machine("52:54:00:11:22:09").expect("machine");
    assert!(info.has_client);
    assert_eq!(
        serde_json::to_value(info).expect("serialise"),
        serde_json::json!({
            "tcp_port": tcp_port,
            "log_port": info.log_port,
            "has_client": true,
            "client": local.to_string(),
        })
    );
    // From the moment the client is named, the first byte the device prints reaches it.
    port.write(b"SALAD.machine_id=52:54:00:11:22:09\nfirst boot line\n")
        .await;
    let got = read_tcp_until(&mut sock, b"first boot line\n").await;
    assert!(
        got.starts_with(b"SALAD.machine_id=52:54:00:11:22:09\n"),
        "nothing before the first line, and no protocol noise: {:?}",
        String::from_utf8_lossy(&got)
    );
    drop(sock);
    wait_for("the client to be forgotten", || {
        fx.salad
            .machine("52:54:00:11:22:09")
            .is_some_and(|m| m.client.is_none() && !m.has_client)
    })
    .await;
}

// ---- network consoles, ensure_machine and log ports ----

impl Fixture {
    /// A network console connected to SALAD, once SALAD has accepted it.
    async fn net_console(&self) -> TcpStream {
        let addr = self.salad.tcpconsole_addr().expect("tcpconsole enabled");
        let sock = TcpStream::connect(addr).await.expect("connect console");
        let local = sock.local_addr().expect("local addr");
        wait_for("SALAD to accept the network console", || {
            self.salad
                .network_consoles()
                .iter()
                .any(|n| n.peer == local)
        })
        .await;
        sock
    }

    /// The machine a network console is bound to.
    fn net_machine(&self, sock: &TcpStream) -> Option<String> {
        let local = sock.local_addr().expect("local addr");
        self.salad
            .network_consoles()
            .into_iter()
            .find(|n| n.peer == local)
            .and_then(|n| n.machine_id)
    }

    /// A relay client of `id`, once SALAD has registered it.
    async fn client(&self, id: &str) -> TcpStream {
        let port = self.salad.machine(id).expect("machine").tcp_port;
        let sock = TcpStream::connect((LOCALHOST, port))
            .await
            .expect("connect");
        let local = sock.local_addr().expect("local addr");
        wait_for("SALAD to register the client", || {
            self.salad.machine(id).and_then(|m| m.client) == Some(local)
        })
        .await;
        sock
    }

    /// A log client of `id`, once SALAD has registered it as the `n`th.
    async fn log_client(&self, id: &str, n: usize) -> TcpStream {
        let port = self.salad.machine(id).expect("machine").log_port;
        let sock = TcpStream::connect((LOCALHOST, port))
            .await
            .expect("connect");
        wait_for("SALAD to register the log client", || {
            self.salad.log_clients(id) == n
        })
        .await;
        sock
    }
}

/// Assert that nothing arrives on `sock` for a while.
async fn assert_silent(sock: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(300), sock.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("{what}: connection closed"),
        Ok(Ok(n)) => panic!("{what}: got {:?}", String::from_utf8_lossy(&buf[..n])),
        Ok(Err(e)) => panic!("{what}: {e}"),
    }
}

async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<SaladEvent>,
    mut pred: impl FnMut(&SaladEvent) -> bool,
) -> SaladEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if pred(&e) => return e,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => panic!("timed out waiting for a SALAD event"),
        }
    }
}

#[tokio::test]
async fn network_console_binds_by_kernel_line_and_the_client_gets_the_boot_from_byte_one() {
    let fx = Fixture::new().await;
    let mut events = fx.salad.subscribe();
    let id = "52:54:00:11:22:01";
    fx.salad.ensure_machine(id).expect("machine");
    let mut client = fx.client(id).await;

    let mut vm = fx.net_console().await;
    let local = vm.local_addr().expect("local addr");
    assert_eq!(
        next_event(&mut events, |e| matches!(
            e,
            SaladEvent::NetworkConsoleOpened { .. }
        ))
        .await,
        SaladEvent::NetworkConsoleOpened { peer: local }
    );
    vm.write_all(b"SeaBIOS (version 1.16)\r\nBooting from ROM...\r\n")
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_silent(&mut client, "nothing before the binding").await;
    assert_eq!(fx.net_machine(&vm), None);
    // The id line arrives cut in two reads.
    vm.write_all(b"[    0.000000] Command line: console=ttyS0 SALAD.machine_")
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    vm.write_all(b"id=52:54:00:11:22:01 quiet\r\n[    0.1] after\r\n")
        .await
        .expect("send");
    let expected: &[u8] = b"SeaBIOS (version 1.16)\r\nBooting from ROM...\r\n\
        [    0.000000] Command line: console=ttyS0 SALAD.machine_id=52:54:00:11:22:01 quiet\r\n\
        [    0.1] after\r\n";
    let got = read_tcp_until(&mut client, b"after\r\n").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
    assert_eq!(fx.net_machine(&vm).as_deref(), Some(id));
    assert_eq!(
        next_event(&mut events, |e| matches!(
            e,
            SaladEvent::NetworkConsoleBound { .. }
        ))
        .await,
        SaladEvent::NetworkConsoleBound {
            machine_id: id.into(),
            peer: local
        }
    );
    // A network console has no serial device.
    assert_eq!(fx.salad.device_of(id), None);

    // The relay client's input reaches the VM's serial port.
    client.write_all(b"root\n").await.expect("send");
    read_tcp_until(&mut vm, b"root\n").await;
}

#[tokio::test]
async fn ping_on_a_network_console_is_answered() {
    let fx = Fixture::new().await;
    let mut vm = fx.net_console().await;
    vm.write_all(b"SALAD.ping\n").await.expect("send");
    let got = read_tcp_until(&mut vm, b"SALAD.pong\n").await;
    assert_eq!(got, b"SALAD.pong\n");
    vm.write_all(b"echo SALAD.").await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    vm.write_all(b"ping\r\n").await.expect("send");
    read_tcp_until(&mut vm, b"SALAD.pong\n").await;
    assert!(fx.salad.machines().is_empty());
}

#[tokio::test]
async fn a_new_network_console_with_the_same_id_takes_over() {
    let fx = Fixture::new().await;
    let mut events = fx.salad.subscribe();
    let id = "52:54:00:11:22:02";
    let mut first = fx.net_console().await;
    first
        .write_all(b"SALAD.machine_id=52:54:00:11:22:02\n")
        .await
        .expect("send");
    wait_for("the first console to be bound", || {
        fx.net_machine(&first).as_deref() == Some(id)
    })
    .await;
    let tcp_port = fx.salad.machine(id).expect("machine").tcp_port;
    let mut client = fx.client(id).await;
    first.write_all(b"first boot\n").await.expect("send");
    read_tcp_until(&mut client, b"first boot\n").await;

    // The VM reboots: QEMU reconnects before the old connection is gone.
    let mut second = fx.net_console().await;
    second
        .write_all(b"second boot\nSALAD.machine_id=52:54:00:11:22:02\n")
        .await
        .expect("send");
    let got = read_tcp_until(&mut client, b"SALAD.machine_id=52:54:00:11:22:02\n").await;
    assert_eq!(got, b"second boot\nSALAD.machine_id=52:54:00:11:22:02\n");
    assert_eq!(fx.net_machine(&second).as_deref(), Some(id));
    assert_eq!(fx.net_machine(&first), None);

    client.write_all(b"to the second\n").await.expect("send");
    read_tcp_until(&mut second, b"to the second\n").await;
    assert_silent(&mut first, "the old console gets no input").await;
    first.write_all(b"stale output\n").await.expect("send");
    second.write_all(b"fresh output\n").await.expect("send");
    let got = read_tcp_until(&mut client, b"fresh output\n").await;
    assert!(!contains(&got, b"stale"), "{got:?}");

    // The console goes away: the machine keeps its port and its client.
    let second_peer = second.local_addr().expect("local addr");
    drop(second);
    let closed = next_event(
        &mut events,
        |e| matches!(e, SaladEvent::NetworkConsoleClosed { peer, .. } if *peer == second_peer),
    )
    .await;
    assert!(
        matches!(&closed, SaladEvent::NetworkConsoleClosed { machine_id: Some(m), .. } if m == id),
        "{closed:?}"
    );
    let info = fx.salad.machine(id).expect("machine kept");
    assert_eq!(info.tcp_port, tcp_port);
    assert!(info.has_client);
    client.write_all(b"into the void\n").await.expect("send");

    // A third boot binds again and reaches the same client.
    let mut third = fx.net_console().await;
    third
        .write_all(b"SALAD.machine_id=52:54:00:11:22:02\nthird boot\n")
        .await
        .expect("send");
    read_tcp_until(&mut client, b"third boot\n").await;
    client.write_all(b"hello third\n").await.expect("send");
    let got = read_tcp_until(&mut third, b"hello third\n").await;
    assert!(!contains(&got, b"void"), "{got:?}");
}

#[tokio::test]
async fn log_port_streams_output_to_several_readers_and_ignores_their_input() {
    let fx = Fixture::new().await;
    let port = fx.port("ttySIM10").await;
    let id = "m10";
    let info_port = fx.announce(&port, id).await;
    let info = fx.salad.machine(id).expect("machine");
    assert_eq!(info.tcp_port, info_port);
    assert_ne!(info.log_port, 0);
    assert_ne!(info.log_port, info.tcp_port);
    assert_eq!(
        serde_json::to_value(info).expect("serialise")["log_port"],
        serde_json::json!(info.log_port)
    );

    let mut rw = fx.client(id).await;
    let mut log1 = fx.log_client(id, 1).await;
    let mut log2 = fx.log_client(id, 2).await;
    // Log clients do not count as the relay client.
    assert!(fx.salad.machine(id).is_some_and(|m| m.has_client));

    port.write(b"kernel says hi\n").await;
    read_tcp_until(&mut rw, b"kernel says hi\n").await;
    assert_eq!(
        read_tcp_until(&mut log1, b"hi\n").await,
        b"kernel says hi\n"
    );
    assert_eq!(
        read_tcp_until(&mut log2, b"hi\n").await,
        b"kernel says hi\n"
    );

    // What a log client sends never reaches the device.
    log1.write_all(b"rm -rf /\n").await.expect("send");
    log2.write_all(b"reboot\n").await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    rw.write_all(b"from rw\n").await.expect("send");
    let got = port.read_until(b"from rw\n").await;
    assert_eq!(got, b"from rw\n");

    // One log client leaving does not disturb the other.
    drop(log1);
    wait_for("the log client to leave", || fx.salad.log_clients(id) == 1).await;
    port.write(b"more\n").await;
    read_tcp_until(&mut log2, b"more\n").await;
    read_tcp_until(&mut rw, b"more\n").await;
}

#[tokio::test]
async fn a_stalled_log_client_does_not_slow_the_relay_client() {
    const TOTAL: usize = 32 << 20;
    let fx = Fixture::new().await;
    let id = "m11";
    let mut vm = fx.net_console().await;
    vm.write_all(b"SALAD.machine_id=m11\n").await.expect("send");
    wait_for("the console to be bound", || {
        fx.net_machine(&vm).as_deref() == Some(id)
    })
    .await;
    let mut rw = fx.client(id).await;
    // Connected and registered, but never read.
    let _stalled = fx.log_client(id, 1).await;

    let (mut vm_rd, mut vm_wr) = vm.split();
    let writer = async {
        let chunk = [b'z'; 64 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            vm_wr.write_all(&chunk).await.expect("console write");
        }
    };
    let reader = async {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < TOTAL {
            let n = rw.read(&mut buf).await.expect("client read");
            assert_ne!(n, 0, "relay closed after {got} bytes");
            assert!(buf[..n].iter().all(|b| *b == b'z'));
            got += n;
        }
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader).1
    })
    .await
    .expect("the relay client got all output in time despite the stalled log client");
    assert_eq!(got, TOTAL);
    // The console itself still works.
    // (The 32 MiB were one overlong line; a ping needs a line of its own.)
    vm_wr.write_all(b"\nSALAD.ping\n").await.expect("send");
    let mut pong = [0u8; PONG.len()];
    tokio::time::timeout(WAIT, vm_rd.read_exact(&mut pong))
        .await
        .expect("pong in time")
        .expect("read pong");
    assert_eq!(&pong, PONG);
}

#[tokio::test]
async fn ensure_machine_before_the_first_boot_then_bind_later() {
    let fx = Fixture::new().await;
    assert!(matches!(
        fx.salad.ensure_machine("bad id"),
        Err(ConsoleError::BadMachineId(_))
    ));
    assert!(matches!(
        fx.salad.ensure_machine(&"x".repeat(65)),
        Err(ConsoleError::BadMachineId(_))
    ));
    let info = fx.salad.ensure_machine("Host-3").expect("machine");
    assert_ne!(info.tcp_port, 0);
    assert_ne!(info.log_port, 0);
    assert!(!info.has_client);
    assert_eq!(fx.salad.ensure_machine("host-3").expect("again"), info);
    assert_eq!(
        fx.salad.machine_port("HOST-3").await.expect("port"),
        info.tcp_port
    );
    assert_eq!(fx.salad.machines().len(), 1);
    assert_eq!(fx.salad.device_of("host-3"), None);

    let mut rw = fx.client("host-3").await;
    let mut log = fx.log_client("host-3", 1).await;
    // Input before any console is bound goes nowhere, and nothing breaks.
    rw.write_all(b"early typing\n").await.expect("send");

    let port = fx.port("ttySIM12").await;
    port.write(b"noise\nSALAD.machine_id=HOST-3\nlogin: ").await;
    let want: &[u8] = b"SALAD.machine_id=HOST-3\nlogin: ";
    assert_eq!(read_tcp_until(&mut rw, b"login: ").await, want);
    assert_eq!(read_tcp_until(&mut log, b"login: ").await, want);
    assert_eq!(
        fx.salad.machine("host-3").expect("machine").tcp_port,
        info.tcp_port
    );
    rw.write_all(b"root\n").await.expect("send");
    let got = port.read_until(b"root\n").await;
    assert!(!contains(&got, b"early"), "{got:?}");
}

#[tokio::test]
async fn unbound_network_consoles_are_capped() {
    let fx = Fixture::new().await;
    let addr = fx.salad.tcpconsole_addr().expect("tcpconsole enabled");
    let mut held = Vec::new();
    for _ in 0..farmgate_console::MAX_UNBOUND_NET_CONSOLES {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    wait_for("SALAD to accept them all", || {
        fx.salad.network_consoles().len() == farmgate_console::MAX_UNBOUND_NET_CONSOLES
    })
    .await;
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, extra.read(&mut buf))
        .await
        .expect("the extra console is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A bound console frees a place.
    held[0]
        .write_all(b"SALAD.machine_id=cap-0\n")
        .await
        .expect("send");
    wait_for("the console to be bound", || {
        fx.salad.machine("cap-0").is_some()
    })
    .await;
    let mut another = fx.net_console().await;
    another.write_all(b"SALAD.ping\n").await.expect("send");
    read_tcp_until(&mut another, b"SALAD.pong\n").await;
}
