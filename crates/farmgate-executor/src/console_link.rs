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
}

/// How long the link waits for SALAD to notice that the previous client of the machine
/// (typically the runner of the previous job, now exited) is gone, before connecting
/// anyway. Connecting too early gets the connection refused after it was accepted, and
/// the first lines of the boot would be lost.
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
        let mut busy_since: Option<tokio::time::Instant> = None;
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
                && busy_since
                    .get_or_insert_with(tokio::time::Instant::now)
                    .elapsed()
                    < PREVIOUS_CLIENT_GRACE
            {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }
            busy_since = None;
            let port = info.map(|m| m.tcp_port);
            let stream = match port {
                Some(port) => TcpStream::connect((host.as_str(), port)).await.ok(),
                None => None,
            };
            match stream {
                Some(mut stream) => {
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

    #[test]
    fn cuts_endless_lines() {
        let mut s = LineSplitter::default();
        let lines = s.feed(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }
}
