//! The SNTP client against a real server (chrony's chronyd serving its local clock on a
//! loopback port, without touching the system clock) and against a tiny responder that
//! crafts bad replies. Needs the `chrony` package; runs chronyd as root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use farmgate_agent::cmdline::NtpPeer;
use farmgate_agent::ntp::{self, NtpError};
use tokio::net::UdpSocket;

const CHRONYD: &str = "/usr/sbin/chronyd";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// chronyd serving `local stratum 8` on 127.0.0.1:`port`; killed on drop.
struct Chronyd {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Chronyd {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn start() -> Chronyd {
        assert!(
            std::path::Path::new(CHRONYD).exists(),
            "{CHRONYD} is missing: install the `chrony` package"
        );
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 8\n\
                 pidfile {}\ncmdport 0\nbindcmdaddress /\n",
                dir.path().join("chronyd.pid").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("chronyd.log");
        // -x: never touch the system clock; -d: foreground, messages on stderr.
        let child = Command::new(CHRONYD)
            .arg("-x")
            .arg("-d")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHRONYD}: {e}"));
        let mut server = Chronyd {
            child,
            addr: SocketAddr::new(LOCALHOST, port),
            log,
            _dir: dir,
        };
        // Ready once it answers (bounded: 10 s).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("chronyd exited ({status}):\n{}", server.log());
            }
            if ntp::query(server.addr, Duration::from_millis(200))
                .await
                .is_ok()
            {
                return server;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chronyd did not answer on {} within 10 s:\n{}",
                server.addr,
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn query_measures_chronyd_serving_its_local_clock() {
    let server = Chronyd::start().await;
    let sample = ntp::query(server.addr, Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_eq!(sample.server, server.addr);
    assert_eq!(sample.stratum, 8, "chronyd's `local stratum 8`");
    assert!(
        sample.offset.abs() < 1.0,
        "same clock, offset {}",
        sample.offset
    );
    assert!((0.0..1.0).contains(&sample.delay), "delay {}", sample.delay);
    let skew = SystemTime::now()
        .duration_since(sample.server_time)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(2), "server time {skew:?} away");
}

#[tokio::test]
async fn sync_falls_back_to_the_dhcp_server_when_ci_gateway_does_not_resolve() {
    assert!(
        tokio::net::lookup_host(("ci-gateway", 123))
            .await
            .map(|mut a| a.next().is_none())
            .unwrap_or(true),
        "this test needs `ci-gateway` not to resolve on this machine"
    );
    let server = Chronyd::start().await;
    let port = server.addr.port();
    let gateway = NtpPeer::Host("ci-gateway".into());
    let timeout = Duration::from_secs(2);

    let sample = ntp::sync(&gateway, Some(LOCALHOST), port, false, timeout)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()))
        .expect("a sample");
    assert_eq!(sample.server, server.addr);
    assert_eq!(sample.stratum, 8);
    assert!(sample.offset.abs() < 1.0, "offset {}", sample.offset);

    // Without a fallback, the error names the peer and the failed lookup.
    let err = ntp::sync(&gateway, None, port, false, timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, NtpError::Resolve { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("ntp peer ci-gateway: cannot resolve ci-gateway: "),
        "{err}"
    );
    // Another unresolvable name does not fall back.
    let other = NtpPeer::Host("no-such-host.invalid".into());
    let err = ntp::sync(&other, Some(LOCALHOST), port, false, timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, NtpError::Resolve { .. }), "{err}");

    // An explicit `host:port` overrides the default port; `none` does nothing.
    let explicit = NtpPeer::Host(format!("localhost:{port}"));
    let sample = ntp::sync(&explicit, None, 1, false, timeout)
        .await
        .unwrap()
        .expect("a sample");
    assert_eq!(sample.server.port(), port);
    assert_eq!(
        ntp::sync(&NtpPeer::None, Some(LOCALHOST), port, false, timeout)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn sync_reports_a_silent_peer_after_its_retries() {
    // A bound socket that never answers (so no ICMP port unreachable either).
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let peer = NtpPeer::Host(addr.to_string());
    let started = tokio::time::Instant::now();
    let err = ntp::sync(&peer, None, 123, false, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("ntp peer {addr} ({addr}): no answer within 200 ms")
    );
    // Three attempts of 200 ms with two pauses between them.
    assert!(started.elapsed() >= Duration::from_millis(600));
    let mut buf = [0u8; 100];
    let mut requests = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(50), silent.recv_from(&mut buf)).await
    {
        requests += 1;
    }
    assert_eq!(requests, ntp::ATTEMPTS);
}

/// NTP timestamp of `t` (era 0), computed independently of the code under test.
fn ntp_ts(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    ((d.as_secs() + 2_208_988_800) << 32) | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// How a crafted reply is built from the request's 48 bytes.
type Craft = dyn Fn(&[u8]) -> Vec<u8> + Send + Sync;

/// A UDP responder on loopback answering every datagram with `craft(request)`; counts
/// the requests; aborted on drop.
struct Responder {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn responder(craft: Arc<Craft>) -> Responder {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::SeqCst);
            let reply = craft(&buf[..len]);
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    Responder {
        addr,
        requests,
        task,
    }
}

/// A well-formed server reply to `req` (first byte, stratum, reference id), with the
/// server's clock `ahead` of ours.
fn reply(req: &[u8], first: u8, stratum: u8, refid: &[u8; 4], ahead: Duration) -> Vec<u8> {
    let now = ntp_ts(SystemTime::now() + ahead);
    let mut b = vec![0u8; 48];
    b[0] = first;
    b[1] = stratum;
    b[12..16].copy_from_slice(refid);
    b[24..32].copy_from_slice(&req[40..48]);
    b[32..40].copy_from_slice(&now.to_be_bytes());
    b[40..48].copy_from_slice(&now.to_be_bytes());
    b
}

#[tokio::test]
async fn a_crafted_good_reply_gives_the_servers_offset() {
    let r = responder(Arc::new(|req: &[u8]| {
        assert_eq!(req.len(), 48);
        assert_eq!(req[0], 0x23, "LI 0, version 4, client mode");
        assert_ne!(&req[40..48], &[0u8; 8], "a transmit timestamp to match");
        reply(req, 0x24, 2, b"GPS\0", Duration::from_secs(10))
    }))
    .await;
    let sample = ntp::query(r.addr, Duration::from_secs(2)).await.unwrap();
    assert!(
        (sample.offset - 10.0).abs() < 0.5,
        "offset {}",
        sample.offset
    );
    assert_eq!(sample.stratum, 2);
    let peer = NtpPeer::Host(r.addr.to_string());
    let sample = ntp::sync(&peer, None, 123, false, Duration::from_secs(2))
        .await
        .unwrap()
        .unwrap();
    assert!(
        (sample.offset - 10.0).abs() < 0.5,
        "offset {}",
        sample.offset
    );
}

#[tokio::test]
async fn kiss_of_death_is_an_error_with_its_code_and_stops_retries() {
    let r = responder(Arc::new(|req: &[u8]| {
        reply(req, 0xe4, 0, b"RATE", Duration::ZERO)
    }))
    .await;
    let err = ntp::query(r.addr, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NtpError::KissOfDeath { code } if code == "RATE"),
        "{err:?}"
    );
    let peer = NtpPeer::Host(r.addr.to_string());
    let before = r.requests.load(Ordering::SeqCst);
    let err = ntp::sync(&peer, None, 123, false, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "ntp peer {} ({}): kiss-o'-death \"RATE\" (stratum 0)",
            r.addr, r.addr
        )
    );
    assert_eq!(
        r.requests.load(Ordering::SeqCst) - before,
        1,
        "no retry after a KoD"
    );
}

#[tokio::test]
async fn bad_replies_are_errors() {
    type Case = (&'static str, Arc<Craft>, fn(&NtpError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "unsynchronised",
            Arc::new(|req: &[u8]| reply(req, 0xe4, 3, b"LOCL", Duration::ZERO)),
            |e| matches!(e, NtpError::Unsynchronised),
        ),
        (
            "stratum 16",
            Arc::new(|req: &[u8]| reply(req, 0x24, 16, b"LOCL", Duration::ZERO)),
            |e| matches!(e, NtpError::Stratum(16)),
        ),
        (
            "client mode",
            Arc::new(|req: &[u8]| reply(req, 0x23, 2, b"LOCL", Duration::ZERO)),
            |e| matches!(e, NtpError::Mode(3)),
        ),
        (
            "zero transmit",
            Arc::new(|req: &[u8]| {
                let mut b = reply(req, 0x24, 2, b"LOCL", Duration::ZERO);
                b[40..48].fill(0);
                b
            }),
            |e| matches!(e, NtpError::ZeroTransmit),
        ),
        (
            "wrong originate",
            Arc::new(|req: &[u8]| {
                let mut b = reply(req, 0x24, 2, b"LOCL", Duration::ZERO);
                b[31] ^= 1;
                b
            }),
            |e| {
                matches!(e, NtpError::Timeout { rejected: Some(r), .. }
                    if matches!(**r, NtpError::OriginateMismatch { .. }))
            },
        ),
        (
            "truncated",
            Arc::new(|req: &[u8]| reply(req, 0x24, 2, b"LOCL", Duration::ZERO)[..40].to_vec()),
            |e| {
                matches!(e, NtpError::Timeout { rejected: Some(r), .. }
                    if matches!(**r, NtpError::Short { len: 40 }))
            },
        ),
    ];
    for (what, craft, expected) in cases {
        let r = responder(craft).await;
        let err = ntp::query(r.addr, Duration::from_millis(300))
            .await
            .expect_err(what);
        assert!(expected(&err), "{what}: {err:?}");
        assert!(!err.to_string().is_empty());
    }
}
