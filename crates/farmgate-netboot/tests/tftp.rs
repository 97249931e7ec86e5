//! The TFTP server against the real `curl` client and a hand-written UDP client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use farmgate_netboot::TftpServer;
use farmgate_netboot::packet::{self, ErrorCode, Mode, Packet, Request, TftpOption};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

struct Served {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    cancel: CancellationToken,
}

impl Served {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Serves `<tempdir>/root`; the files are written by the caller before requesting them.
fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("root")).unwrap();
    let server = TftpServer::bind("127.0.0.1:0".parse().unwrap(), dir.path().join("root")).unwrap();
    let addr = server.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(server.serve(cancel.clone()));
    Served { addr, dir, cancel }
}

/// Pseudo-random content, so that misplaced blocks show.
fn content(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs curl on `tftp://addr/name` writing `out`; returns curl's exit code.
async fn curl(addr: SocketAddr, name: &str, out: &Path, extra: &[&str]) -> i32 {
    let url = format!("tftp://{addr}/{name}");
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-s", "--fail", "--max-time", "60"])
        .args(extra)
        .arg(&url)
        .arg("-o")
        .arg(out)
        .kill_on_drop(true);
    let status = tokio::time::timeout(Duration::from_secs(90), cmd.status())
        .await
        .unwrap_or_else(|_| panic!("curl {url} did not finish in 90 s"))
        .expect("running curl");
    status.code().unwrap_or(-1)
}

async fn fetch_identical(name: &str, len: usize, extra: &[&str]) {
    let s = serve();
    let data = content(len);
    std::fs::write(s.root().join(name), &data).unwrap();
    let out = s.dir.path().join("out");
    let code = curl(s.addr, name, &out, extra).await;
    assert_eq!(code, 0, "curl failed for {name}");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "content of {name} differs");
}

#[tokio::test]
async fn curl_small_file() {
    fetch_identical("boot.ipxe", 1000, &[]).await;
}

#[tokio::test]
async fn curl_three_mib_default_blksize() {
    fetch_identical("initrd", 3 * 1024 * 1024 + 17, &[]).await;
}

#[tokio::test]
async fn curl_three_mib_blksize_1428() {
    fetch_identical("kernel", 3 * 1024 * 1024, &["--tftp-blksize", "1428"]).await;
}

#[tokio::test]
async fn curl_exact_multiple_of_512() {
    fetch_identical("exact", 512 * 40, &[]).await;
}

#[tokio::test]
async fn curl_without_options_uses_plain_rfc1350() {
    fetch_identical("plain", 512 * 3 + 100, &["--tftp-no-options"]).await;
}

#[tokio::test]
async fn curl_empty_file() {
    fetch_identical("empty", 0, &[]).await;
}

#[tokio::test]
async fn curl_subdirectory_with_leading_slash() {
    let s = serve();
    std::fs::create_dir(s.root().join("ipxe")).unwrap();
    std::fs::write(s.root().join("ipxe/snp.efi"), b"efi").unwrap();
    let out = s.dir.path().join("out");
    assert_eq!(curl(s.addr, "/ipxe/snp.efi", &out, &[]).await, 0);
    assert_eq!(std::fs::read(&out).unwrap(), b"efi");
}

fn no_content(out: &Path) -> bool {
    std::fs::read(out).map(|c| c.is_empty()).unwrap_or(true)
}

#[tokio::test]
async fn curl_missing_file_fails() {
    let s = serve();
    let out = s.dir.path().join("out");
    let code = curl(s.addr, "missing", &out, &[]).await;
    assert_ne!(code, 0);
    assert!(no_content(&out));
}

#[tokio::test]
async fn curl_escapes_are_refused() {
    let s = serve();
    std::fs::write(s.dir.path().join("secret"), b"top secret").unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("secret"), s.root().join("link")).unwrap();
    let out = s.dir.path().join("out");
    // curl normalises `..` in URLs unless told otherwise, so send them raw.
    for name in ["../secret", "%2e%2e/secret", "sub/../../secret", "link"] {
        let code = curl(s.addr, name, &out, &["--path-as-is"]).await;
        assert_ne!(code, 0, "{name} was served");
        assert!(no_content(&out), "{name} wrote content");
    }
}

async fn recv(sock: &UdpSocket) -> (Packet, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (len, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("no answer from the server in 5 s")
        .unwrap();
    (packet::parse(&buf[..len]).unwrap(), from)
}

fn rrq(name: &str, options: Vec<TftpOption>) -> Vec<u8> {
    Packet::Rrq(Request {
        filename: name.into(),
        mode: Mode::Octet,
        options,
    })
    .encode()
}

#[tokio::test]
async fn block_numbers_wrap_around() {
    let s = serve();
    let data = content(70_000 * 8);
    std::fs::write(s.root().join("big"), &data).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(
        &rrq("big", vec![TftpOption::BlkSize(8), TftpOption::TSize(0)]),
        s.addr,
    )
    .await
    .unwrap();
    let (oack, tid) = recv(&sock).await;
    assert_ne!(tid, s.addr, "the transfer must come from a new port");
    assert_eq!(
        oack,
        Packet::Oack(vec![TftpOption::BlkSize(8), TftpOption::TSize(560_000)])
    );
    sock.send_to(&Packet::Ack { block: 0 }.encode(), tid)
        .await
        .unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut expected: u16 = 1;
    let mut wrapped = false;
    loop {
        let (p, from) = recv(&sock).await;
        assert_eq!(from, tid);
        let Packet::Data { block, data: chunk } = p else {
            panic!("expected DATA, got {p:?}");
        };
        assert_eq!(block, expected);
        if block == 0 {
            wrapped = true;
        }
        got.extend_from_slice(&chunk);
        sock.send_to(&Packet::Ack { block }.encode(), tid)
            .await
            .unwrap();
        if chunk.len() < 8 {
            // 560,000 is a multiple of 8: the end is an empty block.
            assert!(chunk.is_empty());
            break;
        }
        expected = expected.wrapping_add(1);
    }
    assert!(wrapped, "block 0 after 65535 never came");
    assert_eq!(expected, (70_001u32 % 65536) as u16);
    assert!(got == data, "content differs");
}

#[tokio::test]
async fn lost_ack_gets_a_retransmission_and_windowsize_works() {
    let s = serve();
    let data = content(10 * 512 + 3);
    std::fs::write(s.root().join("f"), &data).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&rrq("f", vec![TftpOption::WindowSize(4)]), s.addr)
        .await
        .unwrap();
    let (oack, tid) = recv(&sock).await;
    assert_eq!(oack, Packet::Oack(vec![TftpOption::WindowSize(4)]));
    // Do not answer: the OACK comes again after the 1 s default timeout.
    let (again, _) = recv(&sock).await;
    assert_eq!(again, oack);
    sock.send_to(&Packet::Ack { block: 0 }.encode(), tid)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut next: u16 = 1;
    let mut dropped_once = false;
    loop {
        // Receive a window of up to 4 blocks.
        let mut last = None;
        for _ in 0..4 {
            let (p, _) = recv(&sock).await;
            let Packet::Data { block, data: chunk } = p else {
                panic!("expected DATA, got {p:?}");
            };
            assert_eq!(block, next);
            got.extend_from_slice(&chunk);
            next += 1;
            let end = chunk.len() < 512;
            last = Some(block);
            if end {
                break;
            }
        }
        let last = last.unwrap();
        if last == 4 && !dropped_once {
            // Pretend block 3 and 4 were lost: ack 2, the server resumes at 3.
            dropped_once = true;
            got.truncate(2 * 512);
            next = 3;
            sock.send_to(&Packet::Ack { block: 2 }.encode(), tid)
                .await
                .unwrap();
            continue;
        }
        sock.send_to(&Packet::Ack { block: last }.encode(), tid)
            .await
            .unwrap();
        if got.len() == data.len() {
            break;
        }
    }
    assert!(got == data, "content differs");
}

#[tokio::test]
async fn write_requests_are_refused() {
    let s = serve();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let wrq = Packet::Wrq(Request {
        filename: "upload".into(),
        mode: Mode::Octet,
        options: vec![],
    });
    sock.send_to(&wrq.encode(), s.addr).await.unwrap();
    let (p, _) = recv(&sock).await;
    assert_eq!(
        p,
        Packet::Error {
            code: ErrorCode::AccessViolation,
            message: "access violation: this server is read-only".into()
        }
    );
    assert!(!s.root().join("upload").exists());
}

#[tokio::test]
async fn garbage_gets_illegal_operation_and_the_server_keeps_serving() {
    let s = serve();
    std::fs::write(s.root().join("f"), b"hello").unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(b"\x00\x01no-nul", s.addr).await.unwrap();
    let (p, _) = recv(&sock).await;
    assert_eq!(
        p,
        Packet::Error {
            code: ErrorCode::IllegalOperation,
            message: "illegal operation: RRQ: filename is not NUL-terminated".into()
        }
    );
    sock.send_to(&rrq("f", vec![]), s.addr).await.unwrap();
    let (p, tid) = recv(&sock).await;
    assert_eq!(
        p,
        Packet::Data {
            block: 1,
            data: b"hello".to_vec()
        }
    );
    sock.send_to(&Packet::Ack { block: 1 }.encode(), tid)
        .await
        .unwrap();
}

#[tokio::test]
async fn escapes_get_access_violation_and_missing_files_file_not_found() {
    let s = serve();
    std::fs::write(s.dir.path().join("secret"), b"top secret").unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("secret"), s.root().join("link")).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (name, code) in [
        ("../secret", ErrorCode::AccessViolation),
        ("a\\..\\..\\secret", ErrorCode::AccessViolation),
        ("link", ErrorCode::AccessViolation),
        ("missing", ErrorCode::FileNotFound),
    ] {
        sock.send_to(&rrq(name, vec![]), s.addr).await.unwrap();
        let (p, _) = recv(&sock).await;
        let Packet::Error { code: got, message } = p else {
            panic!("{name}: expected ERROR, got {p:?}");
        };
        assert_eq!(got, code, "{name}: {message}");
    }
}

#[tokio::test]
async fn silent_client_gets_five_retransmissions_then_nothing() {
    let s = serve();
    std::fs::write(s.root().join("f"), b"hello").unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&rrq("f", vec![]), s.addr).await.unwrap();
    let mut copies = 0;
    let mut buf = vec![0u8; 1024];
    // 1 s timeout: 6 copies within ~6 s, then the transfer is abandoned.
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf)).await {
        let (len, _) = r.unwrap();
        assert_eq!(
            packet::parse(&buf[..len]).unwrap(),
            Packet::Data {
                block: 1,
                data: b"hello".to_vec()
            }
        );
        copies += 1;
    }
    assert_eq!(copies, 1 + farmgate_netboot::MAX_RETRIES);
}
