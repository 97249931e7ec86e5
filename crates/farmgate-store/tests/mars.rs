//! The MaRS DB file and its watcher, on real files.

use std::sync::Arc;
use std::time::Duration;

use farmgate_store::{MarsError, MarsFile, watch};
use farmgate_wire::{DutRecord, MarsDb, PduRecord};
use tokio_util::sync::CancellationToken;

const GOOD: &str = "\
pdus:
  VPDU:
    driver: vpdu
    config:
      hostname: localhost:9191
duts:
  de:ad:be:ef:ca:fe:
    base_name: gfx9
    tags: [amdgpu:gfx9]
    pdu: VPDU
    pdu_port_id: 1
    ready_for_service: true
";

fn file_in(dir: &tempfile::TempDir) -> MarsFile {
    MarsFile::new(dir.path().join("mars_db.yaml"))
}

#[test]
fn missing_or_empty_file_is_an_empty_db() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_in(&dir);
    assert_eq!(f.load().unwrap(), MarsDb::default());
    assert!(f.stamp().is_none());
    std::fs::write(f.path(), "# nothing yet\n").unwrap();
    assert_eq!(f.load().unwrap(), MarsDb::default());
}

#[test]
fn load_save_round_trip_and_stamp_changes() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_in(&dir);
    std::fs::write(f.path(), GOOD).unwrap();
    let db = f.load().unwrap();
    MarsFile::validate(&db).unwrap();
    assert_eq!(
        db.duts["de:ad:be:ef:ca:fe"].pdu_port_id.as_deref(),
        Some("1")
    );
    let s1 = f.stamp().expect("file exists");
    assert_eq!(f.stamp(), Some(s1));

    let mut db2 = db.clone();
    db2.duts.get_mut("de:ad:be:ef:ca:fe").unwrap().comment = Some("flaky fan".into());
    f.save(&db2).unwrap();
    assert_eq!(f.load().unwrap(), db2);
    assert_ne!(f.stamp(), Some(s1));
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["mars_db.yaml"]);
}

#[test]
fn bad_yaml_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_in(&dir);
    std::fs::write(
        f.path(),
        "pdus:\n  VPDU:\n    driver: vpdu\n  bad: [unclosed\n",
    )
    .unwrap();
    let err = f.load().unwrap_err();
    match &err {
        MarsError::Yaml { path, line, .. } => {
            assert_eq!(path, f.path());
            assert!(matches!(line, Some(4) | Some(5)), "line {line:?}");
        }
        other => panic!("expected a YAML error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("mars_db.yaml"), "{text}");
    assert!(text.contains("line"), "{text}");

    // Unknown top-level key: the layout is wrong, the line is still given.
    std::fs::write(f.path(), "pdus: {}\nduts: {}\nbogus: 1\n").unwrap();
    match f.load().unwrap_err() {
        MarsError::Yaml { line, .. } => assert_eq!(line, Some(3)),
        other => panic!("expected a YAML error, got {other:?}"),
    }
}

#[test]
fn duplicate_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_in(&dir);
    std::fs::write(
        f.path(),
        "duts:\n  aa:bb:\n    base_name: one\n  aa:bb:\n    base_name: two\n",
    )
    .unwrap();
    let err = f.load().unwrap_err();
    assert!(matches!(err, MarsError::Yaml { .. }), "{err}");
}

#[test]
fn validate_names_the_dut_and_what_is_wrong() {
    let mut db = MarsDb::default();
    db.pdus.insert(
        "VPDU".into(),
        PduRecord {
            driver: "vpdu".into(),
            config: Default::default(),
            reserved_port_ids: vec![],
            port_labels: Default::default(),
        },
    );
    let on = |pdu: &str, port: &str| DutRecord {
        pdu: Some(pdu.into()),
        pdu_port_id: Some(port.into()),
        ..DutRecord::default()
    };
    db.duts.insert("aa:01".into(), on("VPDU", "1"));
    MarsFile::validate(&db).unwrap();

    let mut bad = db.clone();
    bad.duts.insert("aa:02".into(), on("NOPE", "1"));
    let err = MarsFile::validate(&bad).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("aa:02") && text.contains("NOPE"), "{text}");
    // It converts into anyhow.
    let any: anyhow::Error = err.into();
    assert!(any.to_string().contains("NOPE"));

    let mut bad = db.clone();
    bad.duts.insert("AA:01".into(), on("VPDU", "2"));
    let text = MarsFile::validate(&bad).unwrap_err().to_string();
    assert!(text.contains("AA:01") && text.contains("aa:01"), "{text}");

    let mut bad = db.clone();
    bad.duts.insert("aa:03".into(), on("VPDU", "1"));
    let text = MarsFile::validate(&bad).unwrap_err().to_string();
    assert!(text.contains("aa:03") && text.contains("port 1"), "{text}");

    let mut bad = db.clone();
    bad.duts.get_mut("aa:01").unwrap().pdu_off_delay = -1.0;
    let text = MarsFile::validate(&bad).unwrap_err().to_string();
    assert!(text.contains("pdu_off_delay"), "{text}");

    let mut bad = db;
    bad.duts.get_mut("aa:01").unwrap().pdu_port_id = None;
    let text = MarsFile::validate(&bad).unwrap_err().to_string();
    assert!(
        text.contains("aa:01") && text.contains("pdu_port_id"),
        "{text}"
    );
}

async fn wait_for<F: Fn(&MarsDb) -> bool>(
    rx: &mut tokio::sync::watch::Receiver<Arc<MarsDb>>,
    f: F,
) {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|db| f(db)))
        .await
        .expect("the watcher sent the change in time")
        .expect("watcher alive");
}

#[tokio::test]
async fn watch_picks_up_edits_and_keeps_the_last_good_db() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_in(&dir);
    std::fs::write(f.path(), GOOD).unwrap();
    let db = f.load().unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(db));
    let cancel = CancellationToken::new();
    let watcher = watch(f.clone(), Duration::from_millis(20), tx, cancel.clone());

    // An admin's edit (in place, not atomic).
    std::fs::write(
        f.path(),
        GOOD.replace("base_name: gfx9", "base_name: gfx10"),
    )
    .unwrap();
    wait_for(&mut rx, |db| {
        db.duts["de:ad:be:ef:ca:fe"].base_name.as_deref() == Some("gfx10")
    })
    .await;

    // An invalid edit: broken YAML, then a DUT on a PDU that does not exist.
    std::fs::write(f.path(), "duts: [oops\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(f.path(), GOOD.replace("pdu: VPDU", "pdu: GONE")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!rx.has_changed().unwrap(), "an invalid edit was sent");
    assert_eq!(
        rx.borrow().duts["de:ad:be:ef:ca:fe"].base_name.as_deref(),
        Some("gfx10")
    );

    // Fixing the file is picked up again.
    std::fs::write(
        f.path(),
        GOOD.replace("base_name: gfx9", "base_name: gfx11"),
    )
    .unwrap();
    wait_for(&mut rx, |db| {
        db.duts["de:ad:be:ef:ca:fe"].base_name.as_deref() == Some("gfx11")
    })
    .await;

    // The daemon's own write is not echoed.
    let mut own = (**rx.borrow()).clone();
    own.duts.get_mut("de:ad:be:ef:ca:fe").unwrap().comment = Some("own".into());
    rx.mark_unchanged();
    f.save(&own).unwrap();
    watcher.note_own_write(f.stamp().unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // (A tick between save and note_own_write may reload it; it then carries the
    // same content, so either way the channel holds no stale or foreign db.)
    if rx.has_changed().unwrap() {
        assert_eq!(**rx.borrow_and_update(), own);
    }

    // An admin edit after it is picked up.
    let mut admin = own.clone();
    admin.duts.get_mut("de:ad:be:ef:ca:fe").unwrap().comment = Some("admin".into());
    std::fs::write(f.path(), serde_yaml_ng::to_string(&admin).unwrap()).unwrap();
    wait_for(&mut rx, |db| {
        db.duts["de:ad:be:ef:ca:fe"].comment.as_deref() == Some("admin")
    })
    .await;

    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(f.path(), GOOD).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rx.borrow().duts["de:ad:be:ef:ca:fe"].comment.as_deref(),
        Some("admin"),
        "a cancelled watcher still reloaded"
    );
}

#[tokio::test]
async fn own_write_noted_is_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let f = file_in(&dir);
    std::fs::write(f.path(), GOOD).unwrap();
    let db = f.load().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(db.clone()));
    let cancel = CancellationToken::new();
    // Long interval: the write and the note happen before the first poll.
    let watcher = watch(f.clone(), Duration::from_millis(300), tx, cancel.clone());
    let mut own = db.clone();
    own.duts.get_mut("de:ad:be:ef:ca:fe").unwrap().comment = Some("own".into());
    f.save(&own).unwrap();
    watcher.note_own_write(f.stamp().unwrap());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "the daemon's own write was echoed"
    );
    assert_eq!(**rx.borrow(), db);
    cancel.cancel();
}
