//! driver_for, the dummy and shell drivers, and power_cycle.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use farmgate_pdu::{PowerError, driver_for, driver_names, power_cycle};
use farmgate_wire::{PduRecord, PortState, YamlValue};

fn record(driver: &str, config: &[(&str, YamlValue)]) -> PduRecord {
    PduRecord {
        driver: driver.into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    }
}

fn s(v: &str) -> YamlValue {
    YamlValue::String(v.into())
}

fn config_error(pdu: &str, rec: &PduRecord) -> String {
    match driver_for(pdu, rec) {
        Ok(d) => panic!("expected a config error, got a {} driver", d.driver_name()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn driver_names_lists_the_drivers() {
    assert_eq!(
        driver_names(),
        &[
            "vpdu",
            "dummy",
            "shell",
            "qemu",
            "snmp",
            "apc_masterswitch",
            "cyberpower",
            "shelly",
            "tasmota",
            "serial_relay"
        ]
    );
    for name in driver_names() {
        // The least each driver needs; building contacts nothing.
        let rec = match *name {
            "shell" => record(name, &[("on", s("true")), ("off", s("true"))]),
            "snmp" => record(
                name,
                &[
                    ("hostname", s("127.0.0.1")),
                    ("state_oid", s("1.3.6.1.4.1.99.1")),
                    ("on_value", s("1")),
                    ("off_value", s("2")),
                    ("outlet_count", s("8")),
                ],
            ),
            "apc_masterswitch" | "cyberpower" | "tasmota" => {
                record(name, &[("hostname", s("127.0.0.1"))])
            }
            "shelly" => record(
                name,
                &[("hostname", s("127.0.0.1")), ("generation", s("2"))],
            ),
            "serial_relay" => record(name, &[("device", s("/dev/ttyACM0"))]),
            _ => record(name, &[]),
        };
        let d = driver_for("P", &rec).expect("default config builds");
        assert_eq!(d.driver_name(), *name);
    }
}

#[test]
fn driver_for_errors_name_pdu_driver_and_key() {
    let msg = config_error("P1", &record("no_such_driver", &[]));
    assert!(
        msg.contains("P1") && msg.contains("no_such_driver") && msg.contains("vpdu"),
        "{msg}"
    );

    let msg = config_error("P2", &record("vpdu", &[("port", s("http"))]));
    assert!(
        msg.contains("P2") && msg.contains("vpdu") && msg.contains("\"port\""),
        "{msg}"
    );

    let msg = config_error(
        "P3",
        &record("vpdu", &[("hostname", s("h:1"))])
            .clone_with(("port", YamlValue::Number(2.into()))),
    );
    assert!(msg.contains("P3") && msg.contains("contradicts"), "{msg}");

    let msg = config_error("P4", &record("vpdu", &[("hostnmae", s("h"))]));
    assert!(
        msg.contains("P4") && msg.contains("hostnmae") && msg.contains("unknown key"),
        "{msg}"
    );

    let msg = config_error("P5", &record("shell", &[("off", s("true"))]));
    assert!(
        msg.contains("P5") && msg.contains("shell") && msg.contains("\"on\""),
        "{msg}"
    );

    let msg = config_error(
        "P6",
        &record("dummy", &[("ports", YamlValue::Number((-1).into()))]),
    );
    assert!(
        msg.contains("P6") && msg.contains("dummy") && msg.contains("\"ports\""),
        "{msg}"
    );

    let msg = config_error("P7", &record("vpdu", &[("timeout", s("never"))]));
    assert!(msg.contains("P7") && msg.contains("\"timeout\""), "{msg}");

    let msg = config_error(
        "P8",
        &record(
            "shell",
            &[
                ("on", s("x")),
                ("off", s("y")),
                ("ports", YamlValue::Sequence(vec![s("a;b")])),
            ],
        ),
    );
    assert!(msg.contains("P8") && msg.contains("\"ports\""), "{msg}");
}

trait With {
    fn clone_with(&self, kv: (&str, YamlValue)) -> PduRecord;
}

impl With for PduRecord {
    fn clone_with(&self, (k, v): (&str, YamlValue)) -> PduRecord {
        let mut r = self.clone();
        r.config.insert(k.to_string(), v);
        r
    }
}

#[tokio::test]
async fn dummy_remembers_within_the_process() {
    let rec = record("dummy", &[("ports", YamlValue::Number(3.into()))]);
    let d = driver_for("DUMMY-A", &rec).expect("driver");
    assert_eq!(d.ports().await.expect("ports"), vec!["0", "1", "2"]);
    assert_eq!(d.get("1").await.expect("get"), PortState::Unknown);
    d.set("1", PortState::On).await.expect("on");
    // Another driver instance for the same PDU sees the state; another PDU does not.
    let again = driver_for("DUMMY-A", &rec).expect("driver");
    assert_eq!(again.get("1").await.expect("get"), PortState::On);
    let other = driver_for("DUMMY-B", &rec).expect("driver");
    assert_eq!(other.get("1").await.expect("get"), PortState::Unknown);

    for bad in ["3", "01", "x", ""] {
        let e = d.set(bad, PortState::Off).await.expect_err(bad);
        assert!(matches!(e, PowerError::BadPort { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("DUMMY-A"), "{e}");
    }
}

fn shell_pdu(dir: &Path, extra: &[(&str, YamlValue)]) -> PduRecord {
    let d = dir.display();
    let mut config = vec![
        (
            "on",
            s(&format!(
                "echo on > {d}/port-{{port}}; echo on {{port}} >> {d}/log"
            )),
        ),
        (
            "off",
            s(&format!(
                "echo OFF > {d}/port-{{port}}; echo off {{port}} >> {d}/log"
            )),
        ),
        (
            "status",
            s(&format!("cat {d}/port-{{port}} 2>/dev/null || echo dunno")),
        ),
    ];
    config.extend(extra.iter().cloned());
    record("shell", &config)
}

fn log_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn shell_switches_and_reads_through_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = driver_for("SH", &shell_pdu(dir.path(), &[])).expect("driver");
    assert_eq!(d.driver_name(), "shell");
    assert!(d.ports().await.expect("ports").is_empty());
    assert_eq!(d.get("a-1").await.expect("get"), PortState::Unknown);
    d.set("a-1", PortState::On).await.expect("on");
    assert_eq!(d.get("a-1").await.expect("get"), PortState::On);
    d.set("a-1", PortState::Off).await.expect("off");
    assert_eq!(d.get("a-1").await.expect("get"), PortState::Off);
    assert_eq!(log_lines(dir.path()), vec!["on a-1", "off a-1"]);
}

#[tokio::test]
async fn shell_without_status_reads_unknown_and_honours_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = record(
        "shell",
        &[
            (
                "on",
                s(&format!(
                    "touch {}/$FARMGATE_PDU-$FARMGATE_PDU_PORT",
                    dir.path().display()
                )),
            ),
            ("off", s("true")),
            ("ports", YamlValue::Number(2.into())),
        ],
    );
    let d = driver_for("SH2", &rec).expect("driver");
    assert_eq!(d.ports().await.expect("ports"), vec!["0", "1"]);
    d.set("1", PortState::On).await.expect("on");
    assert!(dir.path().join("SH2-1").exists());
    assert_eq!(d.get("1").await.expect("get"), PortState::Unknown);
    let e = d.set("2", PortState::On).await.expect_err("not configured");
    assert!(matches!(e, PowerError::BadPort { .. }), "{e}");
}

#[tokio::test]
async fn shell_refuses_port_ids_that_could_inject() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = driver_for("SH", &shell_pdu(dir.path(), &[])).expect("driver");
    let evil = format!("1;touch {}/pwned", dir.path().display());
    for bad in [evil.as_str(), "$(id)", "a b", "", "x`y`"] {
        let e = d.set(bad, PortState::On).await.expect_err(bad);
        assert!(matches!(e, PowerError::BadPort { .. }), "{bad}: {e}");
    }
    assert!(!dir.path().join("pwned").exists());
    assert!(log_lines(dir.path()).is_empty());
}

#[tokio::test]
async fn shell_failures_and_timeouts_are_errors() {
    let rec = record(
        "shell",
        &[
            ("on", s("echo broken relay >&2; exit 3")),
            ("off", s("sleep 5")),
        ],
    )
    .clone_with(("timeout", YamlValue::String("0.3".into())));
    let d = driver_for("SH3", &rec).expect("driver");
    let e = d.set("4", PortState::On).await.expect_err("exit 3");
    let msg = e.to_string();
    assert!(matches!(e, PowerError::Command { .. }), "{msg}");
    assert!(
        msg.contains("SH3") && msg.contains("port 4") && msg.contains("broken relay"),
        "{msg}"
    );

    let start = Instant::now();
    let e = d.set("4", PortState::Off).await.expect_err("timeout");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(matches!(e, PowerError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("port 4 off"), "{e}");
}

#[tokio::test]
async fn power_cycle_waits_the_minimum_off_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = driver_for("PC", &shell_pdu(dir.path(), &[])).expect("driver");
    let min_off = Duration::from_millis(400);
    let start = Instant::now();
    power_cycle(d.as_ref(), "7", min_off, None)
        .await
        .expect("cycle");
    assert!(start.elapsed() >= min_off);
    assert_eq!(log_lines(dir.path()), vec!["off 7", "on 7"]);
    assert_eq!(d.get("7").await.expect("get"), PortState::On);
}

#[tokio::test]
async fn power_cycle_counts_time_already_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = driver_for("PC2", &shell_pdu(dir.path(), &[])).expect("driver");

    // Off for a while already: no off command, switched on.
    let long_ago = Instant::now()
        .checked_sub(Duration::from_secs(2))
        .expect("clock");
    power_cycle(d.as_ref(), "1", Duration::from_secs(1), Some(long_ago))
        .await
        .expect("cycle");
    assert_eq!(log_lines(dir.path()), vec!["on 1"]);

    // Off only just now: waits the rest of the minimum off time.
    let min_off = Duration::from_millis(400);
    let start = Instant::now();
    power_cycle(d.as_ref(), "2", min_off, Some(start))
        .await
        .expect("cycle");
    assert!(start.elapsed() >= min_off);
    assert_eq!(log_lines(dir.path()), vec!["on 1", "on 2"]);
}

#[tokio::test]
async fn power_cycle_stops_at_the_first_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = record(
        "shell",
        &[
            ("on", s(&format!("touch {}/on", dir.path().display()))),
            ("off", s("exit 1")),
        ],
    );
    let d = driver_for("PC3", &rec).expect("driver");
    let e = power_cycle(d.as_ref(), "1", Duration::ZERO, None)
        .await
        .expect_err("off fails");
    assert!(e.to_string().contains("switch port 1 off"), "{e}");
    assert!(!dir.path().join("on").exists());
}
