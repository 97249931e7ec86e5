//! The SQLite store on real database files.

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use farmgate_store::{DutRuntime, JobRow, NewJob, SqliteStore, Store, StoreError};
use farmgate_wire::{
    DutState, EventKind, JobKind, JobState, JobStatus, JobTarget, SessionEnd, TrainingProgress,
};

fn new_job(id: &str) -> NewJob {
    NewJob {
        job_id: id.to_string(),
        kind: JobKind::User,
        target: JobTarget {
            id: None,
            tags: vec!["amdgpu:gfx9".into()],
        },
        template: "version: 1\n".into(),
        metadata_json: r#"{"version":1}"#.into(),
        submitted_at: Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap(),
        deadline: Some(Utc.with_ymd_and_hms(2024, 5, 1, 13, 0, 0).unwrap()),
        wait: true,
    }
}

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("farmgate.db")).expect("open store")
}

fn job(store: &dyn Store, id: &str) -> JobRow {
    store.get_job(id).expect("get_job").expect("job exists")
}

#[test]
fn job_life_cycle_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);

    store.insert_job(&new_job("j1")).unwrap();
    let row = job(&store, "j1");
    assert_eq!(row.job_id, "j1");
    assert_eq!(row.kind, JobKind::User);
    assert_eq!(row.target.tags, vec!["amdgpu:gfx9".to_string()]);
    assert_eq!(row.template, "version: 1\n");
    assert_eq!(row.metadata_json, r#"{"version":1}"#);
    assert_eq!(row.state, JobState::Queued);
    assert_eq!(row.status, None);
    assert_eq!(row.dut_id, None);
    assert_eq!(row.rendered, None);
    assert_eq!(row.boot_index, 0);
    assert_eq!(row.runner_pid, None);
    assert!(!row.runner_started);
    assert!(!row.cancel_requested);
    assert!(row.wait);
    assert_eq!(row.submitted_at, new_job("j1").submitted_at);
    assert_eq!(row.deadline, new_job("j1").deadline);
    assert_eq!(row.started_at, None);
    assert!(store.get_job("nope").unwrap().is_none());

    // Duplicate id.
    match store.insert_job(&new_job("j1")) {
        Err(StoreError::DuplicateJob { job_id }) => assert_eq!(job_id, "j1"),
        other => panic!("expected DuplicateJob, got {other:?}"),
    }

    store
        .assign_job("j1", "aa:bb:cc:dd:ee:ff", "rendered text", r#"{"spec":1}"#)
        .unwrap();
    let row = job(&store, "j1");
    assert_eq!(row.state, JobState::Running);
    assert_eq!(row.dut_id.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
    assert_eq!(row.rendered.as_deref(), Some("rendered text"));
    assert_eq!(row.runner_spec_json.as_deref(), Some(r#"{"spec":1}"#));
    assert!(row.started_at.is_some());
    // A running job cannot be assigned again.
    assert!(matches!(
        store.assign_job("j1", "x", "r", "{}"),
        Err(StoreError::WrongState {
            state: JobState::Running,
            ..
        })
    ));
    assert!(matches!(
        store.assign_job("nope", "x", "r", "{}"),
        Err(StoreError::NoSuchJob { .. })
    ));

    store.set_runner_pid("j1", 4242).unwrap();
    assert_eq!(job(&store, "j1").runner_pid, Some(4242));
    store.set_runner_started("j1", 4343).unwrap();
    let row = job(&store, "j1");
    assert_eq!(row.runner_pid, Some(4343));
    assert!(row.runner_started);
    store.set_boot_index("j1", 3).unwrap();
    assert_eq!(job(&store, "j1").boot_index, 3);
    store.request_cancel("j1").unwrap();
    assert!(job(&store, "j1").cancel_requested);
    assert!(matches!(
        store.set_boot_index("nope", 1),
        Err(StoreError::NoSuchJob { .. })
    ));

    assert_eq!(store.running_jobs().unwrap().len(), 1);
    assert!(
        store
            .finish_job("j1", JobStatus::Pass, "job_success matched")
            .unwrap()
    );
    let row = job(&store, "j1");
    assert_eq!(row.state, JobState::Finished);
    assert_eq!(row.status, Some(JobStatus::Pass));
    assert_eq!(row.reason.as_deref(), Some("job_success matched"));
    assert!(row.finished_at.is_some());
    assert!(store.running_jobs().unwrap().is_empty());

    let view = row.view();
    assert_eq!(view.job_id, "j1");
    assert_eq!(view.status, Some(JobStatus::Pass));
    assert_eq!(view.submitted_at, "2024-05-01T12:00:00.000Z");
    assert!(view.finished_at.is_some());
}

#[test]
fn queue_is_fifo_and_listing_filters_by_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for (i, id) in ["c", "a", "b", "d"].iter().enumerate() {
        let mut j = new_job(id);
        // Same submission time for all: the order of insertion decides.
        j.kind = if i == 3 {
            JobKind::Training
        } else {
            JobKind::User
        };
        store.insert_job(&j).unwrap();
    }
    let ids = |rows: Vec<JobRow>| rows.into_iter().map(|r| r.job_id).collect::<Vec<_>>();
    assert_eq!(ids(store.queued_jobs().unwrap()), ["c", "a", "b", "d"]);
    assert_eq!(job(&store, "d").kind, JobKind::Training);

    store.assign_job("a", "dut1", "r", "{}").unwrap();
    store
        .finish_job("b", JobStatus::Incomplete, "cancelled")
        .unwrap();
    assert_eq!(ids(store.queued_jobs().unwrap()), ["c", "d"]);
    assert_eq!(ids(store.running_jobs().unwrap()), ["a"]);
    assert_eq!(
        ids(store.list_jobs(None, 100).unwrap()),
        ["d", "b", "a", "c"]
    );
    assert_eq!(ids(store.list_jobs(None, 2).unwrap()), ["d", "b"]);
    assert_eq!(
        ids(store.list_jobs(Some(JobState::Finished), 100).unwrap()),
        ["b"]
    );
    assert_eq!(
        ids(store.list_jobs(Some(JobState::Queued), 100).unwrap()),
        ["d", "c"]
    );
}

#[test]
fn finish_job_twice_keeps_the_first_result() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.insert_job(&new_job("j")).unwrap();
    store.assign_job("j", "dut", "r", "{}").unwrap();
    assert!(store.finish_job("j", JobStatus::Fail, "first").unwrap());
    assert!(!store.finish_job("j", JobStatus::Pass, "second").unwrap());
    let row = job(&store, "j");
    assert_eq!(row.status, Some(JobStatus::Fail));
    assert_eq!(row.reason.as_deref(), Some("first"));

    // Exactly one session_end event, carrying the first result.
    let ends: Vec<_> = store
        .events_after("j", 0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.msg_type == EventKind::SessionEnd)
        .collect();
    assert_eq!(ends.len(), 1);
    let end: SessionEnd = serde_json::from_str(&ends[0].payload).unwrap();
    assert_eq!(end.status, JobStatus::Fail);
    assert_eq!(end.reason, "first");

    assert!(matches!(
        store.finish_job("nope", JobStatus::Pass, "x"),
        Err(StoreError::NoSuchJob { .. })
    ));
}

#[test]
fn events_are_ordered_and_after_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.insert_job(&new_job("j")).unwrap();
    store.insert_job(&new_job("other")).unwrap();
    let seqs = store
        .append_events(
            "j",
            &[
                (EventKind::Ctrl, "queued".into()),
                (EventKind::JobIo, "line 1".into()),
            ],
        )
        .unwrap();
    assert_eq!(seqs, [1, 2]);
    // Another job's events are numbered on their own.
    assert_eq!(
        store
            .append_events("other", &[(EventKind::Ctrl, "x".into())])
            .unwrap(),
        [1]
    );
    let seqs = store
        .append_events("j", &[(EventKind::JobIo, "line 2".into())])
        .unwrap();
    assert_eq!(seqs, [3]);
    assert!(store.append_events("j", &[]).unwrap().is_empty());
    assert!(matches!(
        store.append_events("nope", &[(EventKind::Ctrl, "x".into())]),
        Err(StoreError::NoSuchJob { .. })
    ));
    store.finish_job("j", JobStatus::Complete, "done").unwrap();

    let all = store.events_after("j", 0, 100).unwrap();
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let payloads: Vec<&str> = all.iter().take(3).map(|e| e.payload.as_str()).collect();
    assert_eq!(payloads, ["queued", "line 1", "line 2"]);
    assert_eq!(all[1].msg_type, EventKind::JobIo);
    assert_eq!(all[3].msg_type, EventKind::SessionEnd);
    assert!(chrono::DateTime::parse_from_rfc3339(&all[0].date).is_ok());

    let rest = store.events_after("j", 2, 100).unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    let limited = store.events_after("j", 0, 2).unwrap();
    assert_eq!(limited.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(store.events_after("j", 4, 100).unwrap().is_empty());
}

#[test]
fn dut_runtime_ports_and_kv_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);

    let training = DutRuntime {
        state: DutState::Training,
        current_job: Some("training-1".into()),
        training: Some(TrainingProgress {
            rounds_done: 2,
            rounds_passed: 1,
            rounds_total: 100,
            rounds_needed: 100,
        }),
        state_since: Some(chrono::Utc::now()),
    };
    let idle = DutRuntime::new(DutState::Idle);
    store.set_dut_runtime("aa", &training).unwrap();
    store.set_dut_runtime("bb", &idle).unwrap();
    assert_eq!(store.dut_runtime("aa").unwrap(), Some(training.clone()));
    assert_eq!(store.dut_runtime("zz").unwrap(), None);
    store.set_dut_runtime("aa", &idle).unwrap();
    let all = store.all_dut_runtime().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["aa"], idle);
    store.delete_dut_runtime("aa").unwrap();
    assert_eq!(store.dut_runtime("aa").unwrap(), None);
    assert_eq!(store.all_dut_runtime().unwrap().len(), 1);

    assert_eq!(store.last_port_shutdown("VPDU", "1").unwrap(), None);
    let t1 = Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap() + Duration::microseconds(123_456);
    store.record_port_shutdown("VPDU", "1", t1).unwrap();
    assert_eq!(store.last_port_shutdown("VPDU", "1").unwrap(), Some(t1));
    assert_eq!(store.last_port_shutdown("VPDU", "2").unwrap(), None);
    let t2 = t1 + Duration::seconds(10);
    store.record_port_shutdown("VPDU", "1", t2).unwrap();
    assert_eq!(store.last_port_shutdown("VPDU", "1").unwrap(), Some(t2));

    assert_eq!(store.kv_get("k").unwrap(), None);
    store.kv_set("k", Some("v1")).unwrap();
    assert_eq!(store.kv_get("k").unwrap().as_deref(), Some("v1"));
    store.kv_set("k", Some("v2")).unwrap();
    assert_eq!(store.kv_get("k").unwrap().as_deref(), Some("v2"));
    store.kv_set("k", None).unwrap();
    assert_eq!(store.kv_get("k").unwrap(), None);
    // Deleting a missing key is fine.
    store.kv_set("k", None).unwrap();
}

#[test]
fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        store.insert_job(&new_job("j")).unwrap();
        store.kv_set("gateway_boot_id", Some("abc")).unwrap();
    }
    let store = open(&dir);
    assert_eq!(job(&store, "j").state, JobState::Queued);
    assert_eq!(
        store.kv_get("gateway_boot_id").unwrap().as_deref(),
        Some("abc")
    );
}

#[test]
fn two_handles_on_one_file_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    // As the daemon and a job runner process would.
    let daemon: Arc<dyn Store> = Arc::new(open(&dir));
    let runner: Arc<dyn Store> = Arc::new(open(&dir));

    daemon.insert_job(&new_job("j")).unwrap();
    daemon.assign_job("j", "dut", "r", "{}").unwrap();
    let row = job(runner.as_ref(), "j");
    assert_eq!(row.state, JobState::Running);

    runner.set_runner_started("j", 77).unwrap();
    assert!(job(daemon.as_ref(), "j").runner_started);
    daemon.request_cancel("j").unwrap();
    assert!(job(runner.as_ref(), "j").cancel_requested);

    // Both write events concurrently: every event lands, numbered without gaps.
    let writers: Vec<_> = [daemon.clone(), runner.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    store
                        .append_events("j", &[(EventKind::Ctrl, format!("w{w} e{i}"))])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let events = daemon.events_after("j", 0, 1000).unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<i64>>()
    );

    runner.kv_set("job:j:unfit", Some("1")).unwrap();
    assert!(runner.finish_job("j", JobStatus::Fail, "runner").unwrap());
    assert!(
        !daemon
            .finish_job("j", JobStatus::Incomplete, "daemon")
            .unwrap()
    );
    assert_eq!(job(daemon.as_ref(), "j").reason.as_deref(), Some("runner"));
    assert_eq!(daemon.kv_get("job:j:unfit").unwrap().as_deref(), Some("1"));

    daemon
        .record_port_shutdown("P", "3", Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap())
        .unwrap();
    assert!(runner.last_port_shutdown("P", "3").unwrap().is_some());
}

#[test]
fn many_handles_can_create_the_same_new_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let openers: Vec<_> = (0..6)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let store = SqliteStore::open(&path).expect("open");
                store
                    .insert_job(&new_job(&format!("j{i}")))
                    .expect("insert");
            })
        })
        .collect();
    for o in openers {
        o.join().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.queued_jobs().unwrap().len(), 6);
}

#[test]
fn in_memory_store_works() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.insert_job(&new_job("m")).unwrap();
    assert_eq!(job(&store, "m").job_id, "m");
}

#[test]
fn open_names_the_file_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("farmgate.db");
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("missing-dir"), "{err}");
}
