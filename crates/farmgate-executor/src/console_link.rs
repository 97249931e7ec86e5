//! The job runner's link to its DUT's serial console, through SALAD.
//!
//! Like CI-tron's executor, the runner asks SALAD's REST API for the machine's TCP port
//! (`GET /api/v1/machine/<id>`, which creates the relay preemptively) and connects to it.
//! When the link drops, for instance because the daemon that hosts SALAD restarts, it
//! asks again and reconnects; the job's timers keep running meanwhile. Bytes are cut into
//! lines here (CR LF or LF; a line longer than 64 KiB is cut) because the job's patterns
//! are matched per line.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest console line kept whole; longer ones are cut there.
pub const MAX_LINE: usize = 64 * 1024;

/// What the link reports to the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleMsg {
    /// One console line, without its line ending.
    Line(Vec<u8>),
    /// A note about the link itself, shown to the user as a control message.
    Note(String),
}

#[derive(Deserialize)]
struct MachineInfo {
    tcp_port: u16,
    #[serde(default)]
    has_client: bool,
    /// The client SALAD has registered (farmgate's SALAD; CI-tron's does not say).
    #[serde(default)]
    client: Option<std::net::SocketAddr>,
}

/// How long the link waits for SALAD to show it registered our connection before it
/// reports the console up anyway.
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);

/// What SALAD's REST API says of our connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// SALAD names our socket as the machine's client: it relays to us from now on.
    Ours,
    /// Another client holds the machine: SALAD refuses us.
    Taken,
    /// SALAD does not say (CI-tron's SALAD has no `client` field) or did not answer.
    Unknown,
}

/// Wait until SALAD's REST API shows `local` as the machine's registered client: only
/// from then on does SALAD relay device output to this connection. The kernel completes
/// the TCP handshake before SALAD's accept loop has registered the client, and the DUT
/// must not be powered on in between or its first lines go to nobody.
async fn wait_registered(
    client: &reqwest::Client,
    url: &str,
    local: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> Registration {
    let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
    loop {
        let info = match client.get(url).send().await {
            Ok(resp) if resp.status().is_success() => resp.json::<MachineInfo>().await.ok(),
            _ => None,
        };
        match info.and_then(|i| i.has_client.then_some(i.client)) {
            Some(Some(peer)) if peer == local => return Registration::Ours,
            Some(Some(_)) => return Registration::Taken,
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Registration::Unknown;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Registration::Unknown,
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}

/// While SALAD shows another client on the machine (typically the runner of the previous
/// job, still exiting), the link waits rather than connecting to be refused; once the
/// wait lasts this long, the user is told why nothing happens.
const PREVIOUS_CLIENT_GRACE: Duration = Duration::from_secs(5);

/// Split a byte stream into lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feed bytes; returns the complete lines they finish.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.partial);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                lines.push(line);
            } else {
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    lines.push(std::mem::take(&mut self.partial));
                }
            }
        }
        lines
    }
}

/// Start the link task. It stops when `cancel` fires or the receiver is dropped.
pub fn spawn_console_link(
    salad_url: String,
    machine_id: String,
    tx: mpsc::Sender<ConsoleMsg>,
    cancel: CancellationToken,
) -> (JoinHandle<()>, watch::Receiver<bool>) {
    let (up_tx, up_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let host = reqwest::Url::parse(&salad_url)
            .ok()
            .and_then(|u| u.host_str().map(String::from))
            .unwrap_or_else(|| "127.0.0.1".into());
        let url = format!(
            "{}/api/v1/machine/{}",
            salad_url.trim_end_matches('/'),
            machine_id
        );
        let mut was_connected = false;
        let mut complained = false;
        let mut held_since: Option<tokio::time::Instant> = None;
        loop {
            if cancel.is_cancelled() || tx.is_closed() {
                return;
            }
            let info = match client.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => resp.json::<MachineInfo>().await.ok(),
                _ => None,
            };
            if let Some(info) = &info
                && info.has_client
            {
                let since = *held_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= PREVIOUS_CLIENT_GRACE && !complained {
                    complained = true;
                    let _ = tx
                        .send(ConsoleMsg::Note(format!(
                            "the console of {machine_id} is held by another client; waiting for it"
                        )))
                        .await;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }
            held_since = None;
            let port = info.map(|m| m.tcp_port);
            let stream = match port {
                Some(port) => TcpStream::connect((host.as_str(), port)).await.ok(),
                None => None,
            };
            match stream {
                Some(mut stream) => {
                    let registered = match stream.local_addr() {
                        Ok(local) => wait_registered(&client, &url, local, &cancel).await,
                        Err(_) => Registration::Unknown,
                    };
                    if cancel.is_cancelled() {
                        return;
                    }
                    if registered == Registration::Taken {
                        // Another client took the console between our look and our
                        // connection: SALAD refuses us. Not up; back to waiting.
                        drop(stream);
                        continue;
                    }
                    if registered == Registration::Unknown {
                        tracing::debug!(machine = %machine_id, "SALAD did not show this link as the console client; going on");
                    }
                    let _ = up_tx.send(true);
                    if was_connected || complained {
                        let _ = tx
                            .send(ConsoleMsg::Note("console link re-established".into()))
                            .await;
                    }
                    was_connected = true;
                    complained = false;
                    let mut splitter = LineSplitter::default();
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = stream.read(&mut buf) => r,
                        };
                        match n {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                for line in splitter.feed(&buf[..n]) {
                                    if tx.send(ConsoleMsg::Line(line)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    let _ = up_tx.send(false);
                    let _ = tx
                        .send(ConsoleMsg::Note(
                            "console link lost, reconnecting to SALAD".into(),
                        ))
                        .await;
                }
                None => {
                    if !complained {
                        complained = true;
                        let _ = tx
                            .send(ConsoleMsg::Note(format!(
                                "cannot reach the console of {machine_id} through SALAD at {salad_url} yet; retrying"
                            )))
                            .await;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
    (task, up_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lf_and_crlf_and_keeps_partials() {
        let mut s = LineSplitter::default();
        assert_eq!(
            s.feed(b"one\r\ntwo\nthr"),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        assert_eq!(s.feed(b"ee\n"), vec![b"three".to_vec()]);
        assert!(s.feed(b"").is_empty());
    }

    /// A SALAD stand-in: its REST answer names the registered client only once the test
    /// says so, like a real SALAD whose accept loop runs late under load.
    async fn fake_salad() -> (
        String,
        watch::Sender<Option<std::net::SocketAddr>>,
        mpsc::Receiver<tokio::net::TcpStream>,
    ) {
        use tokio::io::AsyncWriteExt;
        let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_port = relay.local_addr().unwrap().port();
        let (conn_tx, conn_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((sock, _)) = relay.accept().await {
                let _ = conn_tx.send(sock).await;
            }
        });
        let (reg_tx, reg_rx) = watch::channel(None::<std::net::SocketAddr>);
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", rest.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = rest.accept().await {
                let reg = reg_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let client = *reg.borrow();
                    let body = match client {
                        Some(c) => format!(
                            r#"{{"tcp_port":{relay_port},"has_client":true,"client":"{c}"}}"#
                        ),
                        None => format!(r#"{{"tcp_port":{relay_port},"has_client":false}}"#),
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        (url, reg_tx, conn_rx)
    }

    /// Regression: the link reported the console up as soon as its TCP connection was
    /// established, before SALAD had registered it; the runner then powered the DUT on and
    /// the first lines (often the whole short boot) were relayed to nobody.
    #[tokio::test]
    async fn the_link_is_up_only_once_salad_has_registered_it() {
        let (url, register, mut conns) = fake_salad().await;
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let (task, mut up) = spawn_console_link(url, "aa:bb".into(), tx, cancel.clone());
        let mut sock = tokio::time::timeout(Duration::from_secs(5), conns.recv())
            .await
            .expect("the link connects")
            .expect("a connection");
        // Connected at the TCP level, not registered by SALAD: not up, however long.
        let early = tokio::time::timeout(Duration::from_millis(300), up.wait_for(|u| *u))
            .await
            .is_ok();
        assert!(!early, "the link is up before SALAD registered it");
        // SALAD registers our connection (the stand-in sees the link's local address as
        // the peer of the accepted socket).
        register.send(Some(sock.peer_addr().unwrap())).unwrap();
        tokio::time::timeout(Duration::from_secs(2), up.wait_for(|u| *u))
            .await
            .expect("up once registered")
            .expect("link alive");
        use tokio::io::AsyncWriteExt;
        sock.write_all(b"first line\n").await.unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a line")
            .expect("link alive");
        assert_eq!(msg, ConsoleMsg::Line(b"first line".to_vec()));
        cancel.cancel();
        let _ = task.await;
    }

    #[test]
    fn cuts_endless_lines() {
        let mut s = LineSplitter::default();
        let lines = s.feed(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }
}
