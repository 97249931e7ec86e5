//! [`Store`] on SQLite.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use farmgate_wire::{EventKind, JobEvent, JobKind, JobState, JobStatus, JobTarget, SessionEnd};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::{DutRuntime, JobRow, NewJob, Store, StoreError, rfc3339};

/// Version of the schema below, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    target_json      TEXT NOT NULL,
    template         TEXT NOT NULL,
    rendered         TEXT,
    metadata_json    TEXT NOT NULL,
    state            TEXT NOT NULL,
    status           TEXT,
    reason           TEXT,
    dut_id           TEXT,
    boot_index       INTEGER NOT NULL DEFAULT 0,
    runner_pid       INTEGER,
    runner_started   INTEGER NOT NULL DEFAULT 0,
    runner_spec_json TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    submitted_at     TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    deadline         TEXT,
    wait             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS job_events (
    job_id   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    date     TEXT NOT NULL,
    msg_type TEXT NOT NULL,
    payload  TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dut_runtime (
    dut_id TEXT PRIMARY KEY,
    json   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS port_shutdowns (
    pdu     TEXT NOT NULL,
    port    TEXT NOT NULL,
    at      TEXT NOT NULL,
    PRIMARY KEY (pdu, port)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const JOB_COLS: &str = "job_id, kind, target_json, template, rendered, metadata_json, state, \
     status, reason, dut_id, boot_index, runner_pid, runner_started, runner_spec_json, \
     cancel_requested, submitted_at, started_at, finished_at, deadline, wait";

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// [`Store`] in an SQLite database file; one connection, serialised by a mutex.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

/// Times are stored as fixed-width RFC 3339 UTC text, so they sort as text.
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_ts(what: &str, s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("{what} {s:?}: {e}")))
}

fn parse_opt_ts(what: &str, s: Option<String>) -> Result<Option<DateTime<Utc>>, StoreError> {
    s.map(|s| parse_ts(what, &s)).transpose()
}

fn corrupt(job_id: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("job {job_id}: {what}: {e}"))
}

/// The columns of a `jobs` row as stored, before interpretation.
struct RawJob {
    job_id: String,
    kind: String,
    target_json: String,
    template: String,
    rendered: Option<String>,
    metadata_json: String,
    state: String,
    status: Option<String>,
    reason: Option<String>,
    dut_id: Option<String>,
    boot_index: i64,
    runner_pid: Option<i64>,
    runner_started: bool,
    runner_spec_json: Option<String>,
    cancel_requested: bool,
    submitted_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    deadline: Option<String>,
    wait: bool,
}

impl RawJob {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawJob> {
        Ok(RawJob {
            job_id: r.get(0)?,
            kind: r.get(1)?,
            target_json: r.get(2)?,
            template: r.get(3)?,
            rendered: r.get(4)?,
            metadata_json: r.get(5)?,
            state: r.get(6)?,
            status: r.get(7)?,
            reason: r.get(8)?,
            dut_id: r.get(9)?,
            boot_index: r.get(10)?,
            runner_pid: r.get(11)?,
            runner_started: r.get(12)?,
            runner_spec_json: r.get(13)?,
            cancel_requested: r.get(14)?,
            submitted_at: r.get(15)?,
            started_at: r.get(16)?,
            finished_at: r.get(17)?,
            deadline: r.get(18)?,
            wait: r.get(19)?,
        })
    }

    fn into_row(self) -> Result<JobRow, StoreError> {
        let id = self.job_id.as_str();
        let kind: JobKind = self.kind.parse().map_err(|e| corrupt(id, "kind", e))?;
        let target: JobTarget =
            serde_json::from_str(&self.target_json).map_err(|e| corrupt(id, "target", e))?;
        let state: JobState = self.state.parse().map_err(|e| corrupt(id, "state", e))?;
        let status = self
            .status
            .map(|s| s.parse::<JobStatus>())
            .transpose()
            .map_err(|e| corrupt(id, "status", e))?;
        let boot_index =
            u32::try_from(self.boot_index).map_err(|e| corrupt(id, "boot_index", e))?;
        let runner_pid = self
            .runner_pid
            .map(i32::try_from)
            .transpose()
            .map_err(|e| corrupt(id, "runner_pid", e))?;
        let submitted_at = parse_ts(&format!("job {id}: submitted_at"), &self.submitted_at)?;
        let started_at = parse_opt_ts(&format!("job {id}: started_at"), self.started_at)?;
        let finished_at = parse_opt_ts(&format!("job {id}: finished_at"), self.finished_at)?;
        let deadline = parse_opt_ts(&format!("job {id}: deadline"), self.deadline)?;
        Ok(JobRow {
            job_id: self.job_id,
            kind,
            target,
            template: self.template,
            rendered: self.rendered,
            metadata_json: self.metadata_json,
            state,
            status,
            reason: self.reason,
            dut_id: self.dut_id,
            boot_index,
            runner_pid,
            runner_started: self.runner_started,
            runner_spec_json: self.runner_spec_json,
            cancel_requested: self.cancel_requested,
            submitted_at,
            started_at,
            finished_at,
            deadline,
            wait: self.wait,
        })
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database file at `path`: WAL mode, 30 s busy
    /// timeout, schema created or checked. Other processes may have it open too.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| open_err(e.to_string()))?;
        set_wal(&conn).map_err(|e| open_err(format!("cannot switch to WAL mode: {e}")))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| open_err(e.to_string()))?;
        let mut store = SqliteStore {
            conn: Mutex::new(conn),
        };
        store.init_schema().map_err(|e| open_err(e.to_string()))?;
        Ok(store)
    }

    /// A private database in memory (tests, one-shot tools).
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory().map_err(|e| StoreError::Open {
            path: ":memory:".into(),
            message: e.to_string(),
        })?;
        let mut store = SqliteStore {
            conn: Mutex::new(conn),
        };
        store.init_schema()?;
        Ok(store)
    }

    fn init_schema(&mut self) -> Result<(), StoreError> {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the database has schema version {version}, this farmgate knows up to \
                 {SCHEMA_VERSION}: it was written by a newer farmgate"
            )));
        }
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
    }

    /// Events of a job after `after`, all kinds or one, in order.
    fn select_events(
        &self,
        job_id: &str,
        kind: Option<EventKind>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, date, msg_type, payload FROM job_events \
             WHERE job_id = ?1 AND seq > ?2 AND (?3 IS NULL OR msg_type = ?3) \
             ORDER BY seq LIMIT ?4",
        )?;
        let raws = stmt
            .query_map(
                params![job_id, after, kind.map(|k| k.as_str()), limit],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter()
            .map(|(seq, date, msg_type, payload)| {
                let msg_type = msg_type
                    .parse::<EventKind>()
                    .map_err(|e| corrupt(job_id, &format!("event {seq}"), e))?;
                Ok(JobEvent {
                    seq,
                    date,
                    msg_type,
                    payload,
                })
            })
            .collect()
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves no transaction open (dropping a
        // transaction rolls it back), so the connection is still usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn jobs_where(
        &self,
        clause: &str,
        p: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<JobRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs {clause}"))?;
        let raws = stmt
            .query_map(p, RawJob::from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        raws.into_iter().map(RawJob::into_row).collect()
    }

    /// Run `sql` (an UPDATE of one job by `job_id`, the last parameter);
    /// [`StoreError::NoSuchJob`] when no row matched.
    fn update_job(
        &self,
        job_id: &str,
        sql: &str,
        p: &[&dyn rusqlite::ToSql],
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(sql, p)?;
        if n == 0 {
            return Err(StoreError::NoSuchJob {
                job_id: job_id.to_string(),
            });
        }
        Ok(())
    }
}

/// Switch to WAL, retrying while another process holds the lock that change needs
/// (only when the file is being created by several processes at once).
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let mut tries = 0;
    loop {
        let r: rusqlite::Result<String> =
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0));
        match r {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 300 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

fn job_state_of(
    tx: &rusqlite::Transaction<'_>,
    job_id: &str,
) -> Result<Option<JobState>, StoreError> {
    let state: Option<String> = tx
        .query_row("SELECT state FROM jobs WHERE job_id = ?1", [job_id], |r| {
            r.get(0)
        })
        .optional()?;
    state
        .map(|s| {
            s.parse::<JobState>()
                .map_err(|e| corrupt(job_id, "state", e))
        })
        .transpose()
}

/// Append events inside an open transaction; the caller checked that the job exists.
fn append_in(
    tx: &rusqlite::Transaction<'_>,
    job_id: &str,
    events: &[(EventKind, String)],
) -> Result<Vec<i64>, StoreError> {
    let last: i64 = tx.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM job_events WHERE job_id = ?1",
        [job_id],
        |r| r.get(0),
    )?;
    let date = rfc3339(Utc::now());
    let mut stmt = tx.prepare_cached(
        "INSERT INTO job_events (job_id, seq, date, msg_type, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut seqs = Vec::with_capacity(events.len());
    for (i, (kind, payload)) in events.iter().enumerate() {
        let seq = last + 1 + i as i64;
        stmt.execute(params![job_id, seq, date, kind.as_str(), payload])?;
        seqs.push(seq);
    }
    Ok(seqs)
}

impl Store for SqliteStore {
    fn insert_job(&self, job: &NewJob) -> Result<(), StoreError> {
        let target = serde_json::to_string(&job.target)
            .map_err(|e| StoreError::Corrupt(format!("job {}: target: {e}", job.job_id)))?;
        let n = self.conn().execute(
            "INSERT INTO jobs (job_id, kind, target_json, template, metadata_json, state, \
             submitted_at, deadline, wait) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (job_id) DO NOTHING",
            params![
                job.job_id,
                job.kind.as_str(),
                target,
                job.template,
                job.metadata_json,
                JobState::Queued.as_str(),
                ts(job.submitted_at),
                job.deadline.map(ts),
                job.wait,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::DuplicateJob {
                job_id: job.job_id.clone(),
            });
        }
        Ok(())
    }

    fn get_job(&self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        Ok(self
            .jobs_where("WHERE job_id = ?1", &[&job_id])?
            .into_iter()
            .next())
    }

    fn list_jobs(&self, state: Option<JobState>, limit: usize) -> Result<Vec<JobRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match state {
            Some(st) => self.jobs_where(
                "WHERE state = ?1 ORDER BY id DESC LIMIT ?2",
                &[&st.as_str(), &limit],
            ),
            None => self.jobs_where("ORDER BY id DESC LIMIT ?1", &[&limit]),
        }
    }

    fn queued_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        self.jobs_where(
            "WHERE state = ?1 ORDER BY id",
            &[&JobState::Queued.as_str()],
        )
    }

    fn running_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        self.jobs_where(
            "WHERE state = ?1 ORDER BY id",
            &[&JobState::Running.as_str()],
        )
    }

    fn assign_job(
        &self,
        job_id: &str,
        dut_id: &str,
        rendered: &str,
        runner_spec_json: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        match job_state_of(&tx, job_id)? {
            None => {
                return Err(StoreError::NoSuchJob {
                    job_id: job_id.to_string(),
                });
            }
            Some(JobState::Queued) => {}
            Some(state) => {
                return Err(StoreError::WrongState {
                    job_id: job_id.to_string(),
                    state,
                    expected: JobState::Queued,
                });
            }
        }
        tx.execute(
            "UPDATE jobs SET state = ?1, dut_id = ?2, rendered = ?3, runner_spec_json = ?4, \
             started_at = ?5 WHERE job_id = ?6",
            params![
                JobState::Running.as_str(),
                dut_id,
                rendered,
                runner_spec_json,
                ts(Utc::now()),
                job_id
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn set_runner_pid(&self, job_id: &str, pid: i32) -> Result<(), StoreError> {
        self.update_job(
            job_id,
            "UPDATE jobs SET runner_pid = ?1 WHERE job_id = ?2",
            &[&pid, &job_id],
        )
    }

    fn set_runner_started(&self, job_id: &str, pid: i32) -> Result<(), StoreError> {
        self.update_job(
            job_id,
            "UPDATE jobs SET runner_pid = ?1, runner_started = 1, started_at = ?2 \
             WHERE job_id = ?3",
            &[&pid, &ts(Utc::now()), &job_id],
        )
    }

    fn set_boot_index(&self, job_id: &str, boot_index: u32) -> Result<(), StoreError> {
        self.update_job(
            job_id,
            "UPDATE jobs SET boot_index = ?1 WHERE job_id = ?2",
            &[&boot_index, &job_id],
        )
    }

    fn request_cancel(&self, job_id: &str) -> Result<(), StoreError> {
        self.update_job(
            job_id,
            "UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?1",
            &[&job_id],
        )
    }

    fn finish_job(
        &self,
        job_id: &str,
        status: JobStatus,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let payload = serde_json::to_string(&SessionEnd {
            status,
            reason: reason.to_string(),
        })
        .map_err(|e| corrupt(job_id, "session_end", e))?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        match job_state_of(&tx, job_id)? {
            None => {
                return Err(StoreError::NoSuchJob {
                    job_id: job_id.to_string(),
                });
            }
            Some(JobState::Finished) => return Ok(false),
            Some(_) => {}
        }
        tx.execute(
            "UPDATE jobs SET state = ?1, status = ?2, reason = ?3, finished_at = ?4 \
             WHERE job_id = ?5",
            params![
                JobState::Finished.as_str(),
                status.as_str(),
                reason,
                ts(Utc::now()),
                job_id
            ],
        )?;
        append_in(&tx, job_id, &[(EventKind::SessionEnd, payload)])?;
        tx.commit()?;
        Ok(true)
    }

    fn append_events(
        &self,
        job_id: &str,
        events: &[(EventKind, String)],
    ) -> Result<Vec<i64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if job_state_of(&tx, job_id)?.is_none() {
            return Err(StoreError::NoSuchJob {
                job_id: job_id.to_string(),
            });
        }
        let seqs = append_in(&tx, job_id, events)?;
        tx.commit()?;
        Ok(seqs)
    }

    fn events_after(
        &self,
        job_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, StoreError> {
        self.select_events(job_id, None, after, limit)
    }

    fn events_of_kind(&self, job_id: &str, kind: EventKind) -> Result<Vec<JobEvent>, StoreError> {
        self.select_events(job_id, Some(kind), 0, usize::MAX)
    }

    fn dut_runtime(&self, dut_id: &str) -> Result<Option<DutRuntime>, StoreError> {
        let json: Option<String> = self
            .conn()
            .query_row(
                "SELECT json FROM dut_runtime WHERE dut_id = ?1",
                [dut_id],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|j| parse_runtime(dut_id, &j)).transpose()
    }

    fn job_counts(&self) -> Result<Vec<crate::JobCount>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT kind, state, status, COUNT(*) FROM jobs GROUP BY kind, state, status",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(kind, state, status, count)| {
                let what = "job counts";
                Ok(crate::JobCount {
                    kind: kind.parse().map_err(|e| corrupt(what, "kind", e))?,
                    state: state.parse().map_err(|e| corrupt(what, "state", e))?,
                    status: status
                        .map(|s| s.parse())
                        .transpose()
                        .map_err(|e| corrupt(what, "status", e))?,
                    count: u64::try_from(count).unwrap_or(0),
                })
            })
            .collect()
    }

    fn all_dut_runtime(&self) -> Result<BTreeMap<String, DutRuntime>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT dut_id, json FROM dut_runtime")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, json)| {
                let rt = parse_runtime(&id, &json)?;
                Ok((id, rt))
            })
            .collect()
    }

    fn set_dut_runtime(&self, dut_id: &str, rt: &DutRuntime) -> Result<(), StoreError> {
        let json = serde_json::to_string(rt)
            .map_err(|e| StoreError::Corrupt(format!("runtime state of DUT {dut_id}: {e}")))?;
        self.conn().execute(
            "INSERT INTO dut_runtime (dut_id, json) VALUES (?1, ?2) \
             ON CONFLICT (dut_id) DO UPDATE SET json = excluded.json",
            params![dut_id, json],
        )?;
        Ok(())
    }

    fn delete_dut_runtime(&self, dut_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM dut_runtime WHERE dut_id = ?1", [dut_id])?;
        Ok(())
    }

    fn record_port_shutdown(
        &self,
        pdu: &str,
        port: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO port_shutdowns (pdu, port, at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (pdu, port) DO UPDATE SET at = excluded.at",
            params![pdu, port, ts(at)],
        )?;
        Ok(())
    }

    fn last_port_shutdown(
        &self,
        pdu: &str,
        port: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let at: Option<String> = self
            .conn()
            .query_row(
                "SELECT at FROM port_shutdowns WHERE pdu = ?1 AND port = ?2",
                [pdu, port],
                |r| r.get(0),
            )
            .optional()?;
        parse_opt_ts(&format!("shutdown time of PDU {pdu} port {port}"), at)
    }

    fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn kv_set(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let conn = self.conn();
        match value {
            Some(v) => conn.execute(
                "INSERT INTO kv (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, v],
            )?,
            None => conn.execute("DELETE FROM kv WHERE key = ?1", [key])?,
        };
        Ok(())
    }
}

fn parse_runtime(dut_id: &str, json: &str) -> Result<DutRuntime, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("runtime state of DUT {dut_id}: {e}")))
}
