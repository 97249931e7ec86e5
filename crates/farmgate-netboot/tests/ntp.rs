//! The SNTP server against a real client: chrony's `chronyd -Q` (query-only mode, which
//! prints the measured offset and never touches the clock). Needs the `chrony` package.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use farmgate_netboot::ntp;
use tokio::net::UdpSocket;

const CHRONYD: &str = "/usr/sbin/chronyd";

/// The server running on a loopback port; aborted on drop.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(stratum: u8) -> Server {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(ntp::serve(socket, stratum));
    Server { addr, task }
}

/// Runs `chronyd -Q` against `addr` and returns its output (stdout and stderr).
async fn chronyd_query(addr: SocketAddr) -> (bool, String) {
    assert!(
        std::path::Path::new(CHRONYD).exists(),
        "{CHRONYD} is missing: install the `chrony` package"
    );
    let server = format!(
        "server {} port {} iburst minpoll -6 maxpoll -6",
        addr.ip(),
        addr.port()
    );
    let child = tokio::process::Command::new(CHRONYD)
        .args(["-Q", "-t", "10", &server])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {CHRONYD}: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("chronyd -Q did not exit within 20 s")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The offset in "System clock wrong by X seconds (ignored)".
fn reported_offset(text: &str) -> Option<f64> {
    let rest = text.split("System clock wrong by ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[tokio::test]
async fn chronyd_reads_an_offset_near_zero_from_our_server() {
    let server = start(3).await;
    let (ok, text) = chronyd_query(server.addr).await;
    assert!(ok, "chronyd -Q failed against {}:\n{text}", server.addr);
    let offset =
        reported_offset(&text).unwrap_or_else(|| panic!("no offset in chronyd's output:\n{text}"));
    assert!(offset.abs() < 0.5, "offset {offset} s:\n{text}");
    assert!(!server.task.is_finished(), "the server stopped");
}

#[tokio::test]
async fn chronyd_finds_no_source_when_nothing_answers() {
    // The counter-check of the test above: the same client against a port where no one
    // answers does not report an offset, so the offset above did come from our server.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent = socket.local_addr().unwrap();
    let (ok, text) = chronyd_query(silent).await;
    assert!(!ok, "chronyd -Q succeeded against a silent port:\n{text}");
    assert_eq!(reported_offset(&text), None, "{text}");
}

#[tokio::test]
async fn garbage_is_ignored_and_the_server_keeps_answering() {
    let server = start(5).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(server.addr).await.unwrap();
    let mut buf = [0u8; 512];

    // Short packets, a server-mode packet, a version-0 packet, noise.
    let mut server_mode = [0u8; 48];
    server_mode[0] = 0x24;
    let mut version0 = [0u8; 48];
    version0[0] = 0x03;
    for junk in [
        &b""[..],
        &b"x"[..],
        &[0x23u8; 47][..],
        &server_mode[..],
        &version0[..],
        &[0xffu8; 300][..],
    ] {
        client.send(junk).await.unwrap();
    }
    let r = tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await;
    assert!(r.is_err(), "the server answered junk: {r:?}");

    // A real request still gets its answer.
    let mut req = [0u8; 48];
    req[0] = 0x23;
    req[40..48].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    let before = ntp::timestamp(SystemTime::now());
    client.send(&req).await.unwrap();
    let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
        .await
        .expect("no answer within 2 s")
        .unwrap();
    let after = ntp::timestamp(SystemTime::now());
    assert_eq!(len, 48);
    assert_eq!(buf[0], 0x24);
    assert_eq!(buf[1], 5);
    assert_eq!(&buf[24..32], &0x0102_0304_0506_0708u64.to_be_bytes());
    let transmit = u64::from_be_bytes(buf[40..48].try_into().unwrap());
    assert!(
        (before..=after).contains(&transmit),
        "{before:#x} <= {transmit:#x} <= {after:#x}"
    );
}
