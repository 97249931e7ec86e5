//! The power layer: serialization across instances (processes), retries, read-back,
//! and the monitor's view of a PDU that stops answering and comes back.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use farmgate_pdu::service::{DOWN_AFTER_FAILED_POLLS, Pdu, PduMonitor};
use farmgate_wire::{PduRecord, PortState, YamlValue};

/// A `shell` PDU whose ports are files `<dir>/port-<id>` holding `on` or `off`;
/// `<dir>/down` makes every command fail; `<dir>/stuck` makes `on` do nothing.
fn file_pdu(dir: &Path) -> PduRecord {
    let d = dir.display();
    let cfg = [
        (
            "on",
            format!(
                "test ! -e {d}/down && {{ test -e {d}/stuck || echo on > {d}/port-{{port}}; }}"
            ),
        ),
        (
            "off",
            format!("test ! -e {d}/down && echo off > {d}/port-{{port}}"),
        ),
        (
            "status",
            format!(
                "test ! -e {d}/down && cat {d}/port-{{port}} 2>/dev/null || {{ test ! -e {d}/down && echo off; }}"
            ),
        ),
        ("ports", "2".to_string()),
        ("timeout", "5".to_string()),
    ];
    PduRecord {
        driver: "shell".into(),
        config: cfg
            .into_iter()
            .map(|(k, v)| (k.to_string(), YamlValue::String(v)))
            .collect::<BTreeMap<_, _>>(),
        reserved_port_ids: vec![],
        port_labels: Default::default(),
    }
}

/// A shell PDU whose `on` fails when another `on` runs at the same time (a device that
/// cannot take two sessions), taking 300 ms.
fn exclusive_pdu(dir: &Path) -> PduRecord {
    let d = dir.display();
    let on = format!(
        "mkdir {d}/session || exit 1; sleep 0.3; echo on > {d}/port-{{port}}; rmdir {d}/session"
    );
    let mut r = file_pdu(dir);
    r.config.insert("on".into(), YamlValue::String(on));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_a_lock_dir_never_talk_to_the_pdu_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let locks = dir.path().join("locks");
    let rec = exclusive_pdu(dir.path());
    // Two handles on the same PDU, as the daemon and a job runner would have.
    let a = Pdu::new("P", &rec, Some(&locks)).expect("pdu a");
    let b = Pdu::new("P", &rec, Some(&locks)).expect("pdu b");
    let (ra, rb) = tokio::join!(a.set("0", PortState::On), b.set("1", PortState::On));
    ra.expect("port 0 on");
    rb.expect("port 1 on");
    // Without the lock the device refuses the second session at once; retries would
    // hide that, so the counters must show no retry at all.
    assert_eq!(a.counters().retries + b.counters().retries, 0);
    assert_eq!(a.get("1").await.expect("read"), PortState::On);
    // Without a lock dir, the same two commands collide (the control experiment).
    let c = Pdu::new("P", &rec, None).expect("pdu c");
    let d = Pdu::new("P", &rec, None).expect("pdu d");
    let _ = tokio::join!(c.set("0", PortState::On), d.set("1", PortState::On));
    assert!(
        c.counters().retries + d.counters().retries > 0,
        "unserialized sessions collided: {:?} {:?}",
        c.counters(),
        d.counters()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_that_does_not_happen_is_an_error_never_ok() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pdu = Pdu::new("P", &file_pdu(dir.path()), None).expect("pdu");
    pdu.set("0", PortState::On).await.expect("a working port");
    pdu.set("0", PortState::Off).await.expect("and off");
    std::fs::write(dir.path().join("stuck"), "").expect("stuck relay");
    let e = pdu
        .set("0", PortState::On)
        .await
        .expect_err("the relay did not switch");
    let msg = e.to_string();
    assert!(
        msg.contains("PDU P") && msg.contains("port 0") && msg.contains("still reads off"),
        "{msg}"
    );
    assert!(pdu.counters().switches_failed >= 1, "{:?}", pdu.counters());
    // A command that fails is retried, then reported.
    std::fs::write(dir.path().join("down"), "").expect("down");
    let e = pdu.set("1", PortState::Off).await.expect_err("PDU down");
    assert!(e.to_string().contains("PDU P"), "{e}");
    assert!(pdu.counters().retries >= 2, "{:?}", pdu.counters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_sees_changes_a_pdu_going_down_and_coming_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rec = file_pdu(dir.path());
    let monitor = PduMonitor::new(Duration::from_millis(100), Some(dir.path().join("locks")));
    let mut pdus = BTreeMap::new();
    pdus.insert("P".to_string(), rec);
    monitor.sync(&pdus);
    wait_for("a first poll", || {
        monitor
            .status("P")
            .is_some_and(|s| s.ports.len() == 2 && s.last_ok.is_some())
    })
    .await;
    assert_eq!(
        monitor.status("P").expect("status").ports["0"].state,
        PortState::Off
    );
    // Someone switches port 0 by hand: the next polls see it, with the time.
    std::fs::write(dir.path().join("port-0"), "on\n").expect("switch by hand");
    wait_for("the change", || {
        monitor.status("P").is_some_and(|s| {
            s.ports["0"].state == PortState::On && s.ports["0"].last_change.is_some()
        })
    })
    .await;
    // The PDU stops answering: after a few failed polls it is down, with the reason.
    std::fs::write(dir.path().join("down"), "").expect("down");
    wait_for("down", || monitor.down_reason("P").is_some()).await;
    let st = monitor.status("P").expect("status");
    assert!(st.failed_polls >= DOWN_AFTER_FAILED_POLLS);
    let why = monitor.down_reason("P").expect("reason");
    assert!(
        why.contains("does not answer since") && why.contains("exit"),
        "{why}"
    );
    // It answers again: recovery needs nobody.
    std::fs::remove_file(dir.path().join("down")).expect("up");
    wait_for("recovery", || {
        monitor.down_reason("P").is_none() && monitor.status("P").is_some_and(|s| s.error.is_none())
    })
    .await;
    // A label or a reservation changes the record, not the poller: the status goes on.
    let reads_before = monitor.status("P").expect("status").counters.reads_ok;
    assert!(reads_before > 0);
    let mut relabelled = pdus.clone();
    if let Some(r) = relabelled.get_mut("P") {
        r.port_labels.insert("0".into(), "bench 3".into());
        r.reserved_port_ids.push("1".into());
    }
    monitor.sync(&relabelled);
    let st = monitor.status("P").expect("status");
    assert!(
        st.last_ok.is_some() && st.counters.reads_ok >= reads_before,
        "{st:?}"
    );
    // A PDU removed from the MaRS DB is no longer followed.
    monitor.sync(&BTreeMap::new());
    assert!(monitor.status("P").is_none());
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
