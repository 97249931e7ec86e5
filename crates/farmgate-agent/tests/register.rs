//! Finding the console by SALAD's ping/pong and binding it, against the gateway's real
//! SALAD on ptys (the pty master is the DUT's serial port, SALAD opens the slave).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use farmgate_agent::register::{
    SerialPort, announce, candidate_ports, find_console, is_salad_console,
};
use farmgate_console::{Salad, SaladConfig};
use nix::sys::termios::{self, SetArg};
use tokio_util::sync::CancellationToken;

/// A pty whose slave is linked as `dir/name` (for SALAD's glob when `watched`); returns
/// the DUT's side.
fn dut_port(dir: &Path, name: &str) -> (SerialPort, OwnedFd) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut t = termios::tcgetattr(&pty.slave).expect("tcgetattr");
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t).expect("tcsetattr");
    let slave_path = nix::unistd::ttyname(&pty.slave).expect("ttyname");
    std::os::unix::fs::symlink(&slave_path, dir.join(name)).expect("symlink");
    let port = SerialPort::from_fd(name.to_string(), pty.master).expect("serial port");
    (port, pty.slave)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_the_port_where_salad_answers_and_gets_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    let salad = Salad::start(
        SaladConfig {
            serial_globs: vec![format!("{}/ttySIM*", dir.path().display())],
            rescan_interval: Duration::from_millis(50),
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            baud: 115_200,
            tcpconsole_bind: None,
        },
        cancel.clone(),
    )
    .await
    .expect("SALAD starts");
    // ttyOTHER0 is a serial port nobody listens to; ttySIM0 is wired to the gateway.
    let (other, _o) = dut_port(dir.path(), "ttyOTHER0");
    let (console, _c) = dut_port(dir.path(), "ttySIM0");
    // SALAD opens the device on its next scan.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while salad.devices().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SALAD never opened the pty"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!is_salad_console(&other, Duration::from_millis(500)).await);
    let found = find_console(vec![other, console], Duration::from_secs(5))
        .await
        .expect("the port SALAD answers on");
    assert_eq!(found.name(), "ttySIM0");
    // Announcing the machine binds that console to it.
    announce(&found, "52:54:00:aa:bb:cc")
        .await
        .expect("announce");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while salad.machine("52:54:00:aa:bb:cc").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "machine never bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(salad.device_of("52:54:00:aa:bb:cc").is_some());
    cancel.cancel();
}

#[test]
fn candidate_ports_come_in_a_sensible_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    for n in [
        "ttyUSB1", "ttyS10", "ttyS2", "ttyACM0", "ttyUSB0", "tty0", "ttyS", "null", "ttySx",
    ] {
        std::fs::write(dir.path().join(n), "").expect("touch");
    }
    let names: Vec<String> = candidate_ports(dir.path())
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["ttyS2", "ttyS10", "ttyUSB0", "ttyUSB1", "ttyACM0"]);
    assert!(candidate_ports(Path::new("/nonexistent")).is_empty());
}

#[tokio::test]
async fn opening_a_missing_device_names_it() {
    let e = SerialPort::open(Path::new("/dev/ttyNOSUCH9")).expect_err("missing device");
    let msg = e.to_string();
    assert!(
        msg.contains("/dev/ttyNOSUCH9") && msg.contains("open"),
        "{msg}"
    );
}
