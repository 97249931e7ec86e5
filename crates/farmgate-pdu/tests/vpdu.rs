//! The vpdu driver against a small vpdu server on a real TCP socket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farmgate_pdu::{PowerError, driver_for};
use farmgate_wire::{PduRecord, PortState, YamlValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A vpdu server speaking CI-tron's protocol; port states are 3 (on) or 4 (off).
struct Server {
    addr: SocketAddr,
    states: Arc<Mutex<Vec<u8>>>,
    words: Arc<Mutex<Vec<u32>>>,
}

async fn server(ports: usize, error_port: Option<usize>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let states = Arc::new(Mutex::new(vec![4u8; ports]));
    let words = Arc::new(Mutex::new(Vec::new()));
    let (st, wd) = (states.clone(), words.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (st, wd) = (st.clone(), wd.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if sock.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let word = u32::from_be_bytes(buf);
                wd.lock().expect("lock").push(word);
                let op = word & 3;
                let port = ((word >> 2) & 0x7ff) as usize;
                let reply = {
                    let mut states = st.lock().expect("lock");
                    if op == 0 {
                        states.len() as u8
                    } else if port >= states.len() {
                        0
                    } else if Some(port) == error_port {
                        5
                    } else {
                        match op {
                            1 => {
                                states[port] = 3;
                                1
                            }
                            2 => {
                                states[port] = 4;
                                1
                            }
                            _ => states[port],
                        }
                    }
                };
                let _ = sock.write_all(&[reply]).await;
            });
        }
    });
    Server {
        addr,
        states,
        words,
    }
}

fn record(config: &[(&str, YamlValue)]) -> PduRecord {
    PduRecord {
        driver: "vpdu".into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    }
}

fn at(addr: SocketAddr) -> PduRecord {
    record(&[("hostname", YamlValue::String(addr.to_string()))])
}

#[tokio::test]
async fn counts_switches_and_reads_ports() {
    let srv = server(4, None).await;
    let d = driver_for("VPDU", &at(srv.addr)).expect("driver");
    assert_eq!(d.driver_name(), "vpdu");
    assert_eq!(d.ports().await.expect("ports"), vec!["0", "1", "2", "3"]);

    assert_eq!(d.get("2").await.expect("status"), PortState::Off);
    d.set("2", PortState::On).await.expect("on");
    assert_eq!(srv.states.lock().expect("lock")[2], 3);
    assert_eq!(d.get("2").await.expect("status"), PortState::On);
    d.set("2", PortState::Off).await.expect("off");
    assert_eq!(d.get("2").await.expect("status"), PortState::Off);

    // The wire words follow the protocol: count, status 2, on 2, status 2, off 2, status 2.
    assert_eq!(
        *srv.words.lock().expect("lock"),
        vec![0x00, 0x0b, 0x09, 0x0b, 0x0a, 0x0b]
    );
}

#[tokio::test]
async fn host_and_port_given_separately() {
    let srv = server(2, None).await;
    let rec = record(&[
        ("hostname", YamlValue::String("127.0.0.1".into())),
        ("port", YamlValue::Number(srv.addr.port().into())),
    ]);
    let d = driver_for("VPDU", &rec).expect("driver");
    d.set("1", PortState::On).await.expect("on");
    assert_eq!(srv.states.lock().expect("lock")[1], 3);
}

#[tokio::test]
async fn error_answers_are_errors_naming_pdu_and_port() {
    let srv = server(4, Some(3)).await;
    let d = driver_for("RACK1", &at(srv.addr)).expect("driver");

    let e = d.get("3").await.expect_err("status error");
    let msg = e.to_string();
    assert!(matches!(e, PowerError::Refused { .. }), "{msg}");
    assert!(msg.contains("RACK1") && msg.contains("port 3"), "{msg}");

    let e = d.set("3", PortState::On).await.expect_err("on error");
    assert!(e.to_string().contains("switch port 3 on"), "{e}");

    // The server answers 0 for a port it does not have.
    let e = d.set("9", PortState::Off).await.expect_err("out of range");
    assert!(e.to_string().contains("port 9"), "{e}");
}

#[tokio::test]
async fn bad_port_ids_are_refused_without_contacting_the_pdu() {
    let srv = server(4, None).await;
    let d = driver_for("VPDU", &at(srv.addr)).expect("driver");
    for bad in ["abc", "2048", "-1", "", "1 ", "+1"] {
        let e = d.set(bad, PortState::On).await.expect_err(bad);
        assert!(matches!(e, PowerError::BadPort { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("VPDU"), "{e}");
    }
    let e = d.set("1", PortState::Unknown).await.expect_err("unknown");
    assert!(matches!(e, PowerError::BadState { .. }), "{e}");
    assert!(srv.words.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn dead_pdu_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let d = driver_for("GONE", &at(addr)).expect("driver");
    let e = d.ports().await.expect_err("connection refused");
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            PowerError::Io {
                stage: "connect",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("GONE") && msg.contains(&addr.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn silent_pdu_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accept connections and never answer.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let rec = record(&[
        ("hostname", YamlValue::String(addr.to_string())),
        ("timeout", YamlValue::String("0.3".into())),
    ]);
    let d = driver_for("MUTE", &rec).expect("driver");
    let start = Instant::now();
    let e = d.get("1").await.expect_err("timeout");
    assert!(start.elapsed() >= Duration::from_millis(300));
    let msg = e.to_string();
    assert!(matches!(e, PowerError::Timeout { .. }), "{msg}");
    assert!(msg.contains("MUTE") && msg.contains("port 1"), "{msg}");
}

#[tokio::test]
async fn pdu_closing_without_answer_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 4];
            let _ = sock.read_exact(&mut buf).await;
            drop(sock);
        }
    });
    let d = driver_for("RUDE", &at(addr)).expect("driver");
    let e = d.set("0", PortState::On).await.expect_err("closed");
    assert!(e.to_string().contains("without answering"), "{e}");
}
