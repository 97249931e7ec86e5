//! The `qemu` driver with a real QEMU: a port switched on is a daemonized QEMU whose
//! serial port connects to the console address; its state is read back from the process;
//! switching it off kills it. Configuration errors name the key.

use std::collections::BTreeMap;
use std::time::Duration;

use farmgate_pdu::{PowerError, driver_for};
use farmgate_wire::{PduRecord, PortState, YamlValue};

fn record(config: &[(&str, &str)]) -> PduRecord {
    PduRecord {
        driver: "qemu".into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), YamlValue::String(v.to_string())))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    }
}

fn config_error(config: &[(&str, &str)]) -> String {
    match driver_for("VM", &record(config)) {
        Ok(_) => panic!("expected a config error for {config:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configurations_name_the_key() {
    for (config, key) in [
        (vec![("accel", "hvf")], "accel"),
        (vec![("memory", "16")], "memory"),
        (vec![("network", "slirp")], "network"),
        (vec![("console", "nowhere")], "console"),
        (vec![("boot_url", "http://a b")], "boot_url"),
        (vec![("ports", "300")], "ports"),
        (vec![("colour", "blue")], "colour"),
    ] {
        let e = config_error(&config);
        assert!(e.contains(&format!("{key:?}")), "{config:?}: {e}");
        assert!(e.contains("PDU VM (driver qemu)"), "{e}");
    }
}

#[tokio::test]
async fn ports_are_numbers_below_the_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = driver_for(
        "VM",
        &record(&[
            ("ports", "2"),
            ("state_dir", dir.path().to_str().expect("utf-8")),
        ]),
    )
    .expect("driver");
    assert_eq!(d.ports().await.expect("ports"), vec!["0", "1"]);
    assert_eq!(d.get("1").await.expect("state"), PortState::Off);
    for bad in ["2", "x", "-1"] {
        match d.get(bad).await {
            Err(PowerError::BadPort { port, .. }) => assert_eq!(port, bad),
            other => panic!("port {bad}: {other:?}"),
        }
    }
}

/// Kills the QEMU of port 0 if a failed assertion left it running (it is a daemon).
struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("port-0.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("port-0.pid"))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test]
async fn a_port_switched_on_is_a_running_qemu_until_switched_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _guard = KillOnDrop(dir.path().to_path_buf());
    // SALAD's network console port, as far as QEMU is concerned.
    let console = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = console.local_addr().expect("addr").to_string();
    let d = driver_for(
        "VM",
        &record(&[
            ("ports", "1"),
            ("memory", "128"),
            ("console", &addr),
            ("state_dir", dir.path().to_str().expect("utf-8")),
            ("boot_url", "http://10.42.0.1:1/api/v1/dut/{mac}/boot.ipxe"),
        ]),
    )
    .expect("driver");
    d.set("0", PortState::On).await.expect("switched on");
    assert_eq!(d.get("0").await.expect("state"), PortState::On);
    // Its serial port connects to the console listener, like an adapter plugged in.
    let (_conn, _) = tokio::time::timeout(Duration::from_secs(20), console.accept())
        .await
        .expect("QEMU connects its serial port within 20 s")
        .expect("accept");
    let pid: i32 = std::fs::read_to_string(dir.path().join("port-0.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("mac=52:54:00:11:22:00"), "{cmdline}");
    assert!(cmdline.contains("-accel tcg"), "{cmdline}");
    // Switching on again is a no-op, not a second machine.
    d.set("0", PortState::On).await.expect("still on");
    d.set("0", PortState::Off).await.expect("switched off");
    assert_eq!(d.get("0").await.expect("state"), PortState::Off);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty()),
        "QEMU {pid} is gone"
    );
    // A stale pid file (a machine that died by itself) reads as off.
    std::fs::write(dir.path().join("port-0.pid"), "1\n").expect("write");
    assert_eq!(d.get("0").await.expect("state"), PortState::Off);
}

#[tokio::test]
async fn a_qemu_that_cannot_start_is_an_error_with_its_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rec = record(&[("state_dir", dir.path().to_str().expect("utf-8"))]);
    rec.config.insert(
        "extra_args".into(),
        YamlValue::Sequence(vec![YamlValue::String("-no-such-option".into())]),
    );
    let d = driver_for("VM", &rec).expect("driver");
    let _guard = KillOnDrop(dir.path().to_path_buf());
    let e = d.set("0", PortState::On).await.expect_err("cannot start");
    let msg = e.to_string();
    assert!(msg.contains("cannot switch port 0 on"), "{msg}");
    assert!(
        msg.contains("no-such-option"),
        "QEMU's own complaint is shown: {msg}"
    );
    assert_eq!(d.get("0").await.expect("state"), PortState::Off);
}
