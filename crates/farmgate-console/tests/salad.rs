//! SALAD against real ptys (symlinked into a tempdir matched by the glob) and real TCP
//! clients.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use farmgate_console::{ConsoleError, Salad, SaladConfig, poll_owned_fd};
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
        serde_json::json!({"tcp_port": tcp_port, "has_client": false})
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
        serde_json::json!({"tcp_port": tcp_port, "has_client": true, "client": local.to_string()})
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
