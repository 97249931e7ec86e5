//! The `serial_relay` driver writing to a real pty: the test reads what the device would
//! receive from the master side.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use farmgate_pdu::{PduDriver, PowerError, driver_for};
use farmgate_wire::{PduRecord, PortState, YamlValue};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::openpty;

/// A pty pair; the slave stays open here so the master keeps reading while the driver
/// opens and closes the slave.
struct Pty {
    master: std::fs::File,
    _slave: OwnedFd,
    path: PathBuf,
}

fn pty() -> Pty {
    let p = openpty(None, None).expect("openpty");
    let path = nix::unistd::ttyname(&p.slave).expect("slave name");
    let flags = fcntl(&p.master, FcntlArg::F_GETFL).expect("flags");
    fcntl(
        &p.master,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .expect("nonblocking master");
    Pty {
        master: std::fs::File::from(p.master),
        _slave: p.slave,
        path,
    }
}

impl Pty {
    /// Everything the device received within `wait` (stops early once `want` bytes came).
    fn received(&mut self, want: usize, wait: Duration) -> Vec<u8> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while Instant::now() < deadline && out.len() < want {
            match self.master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("reading the pty master: {e}"),
            }
        }
        out
    }
}

fn driver(pdu: &str, config: &[(&str, YamlValue)]) -> Result<Box<dyn PduDriver>, PowerError> {
    let rec = PduRecord {
        driver: "serial_relay".into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    };
    driver_for(pdu, &rec)
}

fn s(v: &str) -> YamlValue {
    YamlValue::String(v.into())
}

#[tokio::test]
async fn writes_one_digit_and_remembers_the_state() {
    let mut pty = pty();
    let dir = tempfile::tempdir().expect("tempdir");
    let state_file = dir.path().join("relay.state");
    let cfg = [
        ("device", s(&pty.path.display().to_string())),
        ("baud", YamlValue::Number(9600.into())),
        ("state_file", s(&state_file.display().to_string())),
    ];
    let d = driver("USBRELAY", &cfg).expect("driver");
    assert_eq!(d.driver_name(), "serial_relay");
    assert_eq!(d.ports().await.expect("ports"), vec!["1"]);
    assert_eq!(d.get("1").await.expect("get"), PortState::Unknown);

    d.set("1", PortState::On).await.expect("on");
    assert_eq!(pty.received(2, Duration::from_millis(500)), b"1");
    assert_eq!(d.get("1").await.expect("get"), PortState::On);

    d.set("1", PortState::Off).await.expect("off");
    assert_eq!(pty.received(2, Duration::from_millis(500)), b"0");
    assert_eq!(d.get("1").await.expect("get"), PortState::Off);

    d.set("1", PortState::On).await.expect("on again");
    assert_eq!(pty.received(1, Duration::from_secs(2)), b"1");

    // A new driver (a restarted gateway) reads the state file.
    let again = driver("USBRELAY", &cfg).expect("driver");
    assert_eq!(again.get("1").await.expect("get"), PortState::On);
    assert_eq!(
        std::fs::read_to_string(&state_file)
            .expect("state file")
            .trim(),
        "on"
    );

    // A corrupt state file is an error naming it.
    std::fs::write(&state_file, "maybe\n").expect("write");
    let msg = again.get("1").await.expect_err("corrupt").to_string();
    assert!(
        msg.contains("USBRELAY") && msg.contains("relay.state") && msg.contains("maybe"),
        "{msg}"
    );

    for bad in ["0", "2", ""] {
        let e = d.set(bad, PortState::On).await.expect_err(bad);
        assert!(matches!(e, PowerError::BadPort { .. }), "{bad}: {e}");
    }
    let e = d.set("1", PortState::Unknown).await.expect_err("unknown");
    assert!(matches!(e, PowerError::BadState { .. }), "{e}");
    // Nothing was written by the refused calls.
    assert!(pty.received(1, Duration::from_millis(200)).is_empty());
}

#[tokio::test]
async fn without_state_file_the_state_lives_in_the_process() {
    let mut pty = pty();
    let cfg = [("device", s(&pty.path.display().to_string()))];
    let d = driver("USBRELAY-MEM", &cfg).expect("driver");
    assert_eq!(d.get("1").await.expect("get"), PortState::Unknown);
    d.set("1", PortState::Off).await.expect("off");
    assert_eq!(pty.received(1, Duration::from_secs(2)), b"0");
    let again = driver("USBRELAY-MEM", &cfg).expect("driver");
    assert_eq!(again.get("1").await.expect("get"), PortState::Off);
}

#[tokio::test]
async fn missing_device_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("ttyACM9");
    let d = driver(
        "USBRELAY-GONE",
        &[("device", s(&missing.display().to_string()))],
    )
    .expect("driver");
    let msg = d
        .set("1", PortState::On)
        .await
        .expect_err("no device")
        .to_string();
    assert!(
        msg.contains("USBRELAY-GONE") && msg.contains("ttyACM9") && msg.contains("open"),
        "{msg}"
    );
    assert_eq!(d.get("1").await.expect("get"), PortState::Unknown);

    // A regular file is not a tty: configuring it fails, naming the path.
    let plain = dir.path().join("not-a-tty");
    std::fs::write(&plain, "").expect("write");
    let d = driver(
        "USBRELAY-FILE",
        &[("device", s(&plain.display().to_string()))],
    )
    .expect("driver");
    let msg = d
        .set("1", PortState::On)
        .await
        .expect_err("not a tty")
        .to_string();
    assert!(
        msg.contains("not-a-tty") && msg.contains("configure"),
        "{msg}"
    );
}

#[test]
fn config_errors_name_the_key() {
    let msg = driver("SR", &[]).err().expect("missing device").to_string();
    assert!(msg.contains("SR") && msg.contains("\"device\""), "{msg}");
    let msg = driver(
        "SR",
        &[
            ("device", s("/dev/null")),
            ("baud", YamlValue::Number(1234.into())),
        ],
    )
    .err()
    .expect("bad baud")
    .to_string();
    assert!(msg.contains("\"baud\"") && msg.contains("1234"), "{msg}");
    let msg = driver("SR", &[("device", s("/dev/null")), ("ports", s("2"))])
        .err()
        .expect("unknown key")
        .to_string();
    assert!(msg.contains("\"ports\""), "{msg}");
}
