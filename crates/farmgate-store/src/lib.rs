//! farmgate's store.
//!
//! * [`Store`]: jobs, job events, DUT runtime state, port shutdown times and a small
//!   key-value table, behind an object-safe trait (`Arc<dyn Store>`), so that another
//!   backend (PostgreSQL) can be added without touching the callers.
//! * [`SqliteStore`]: the SQLite implementation. Several processes (the daemon and one
//!   `run-job` process per running job) open the same file at once; the file is in WAL
//!   mode and every write is a short `BEGIN IMMEDIATE` transaction.
//! * [`MarsFile`]: the MaRS DB YAML file, loaded, validated and saved atomically, and
//!   [`watch`] to follow an admin's edits of it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, Utc};
use farmgate_wire::{
    DutState, EventKind, JobEvent, JobKind, JobState, JobStatus, JobTarget, JobView,
    TrainingProgress,
};
use serde::{Deserialize, Serialize};

mod mars;
mod sqlite;
mod watcher;

pub use mars::{MarsError, MarsFile, MarsStamp};
pub use sqlite::SqliteStore;
pub use watcher::{MarsWatcher, watch};

/// What can go wrong in a [`Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `insert_job` with the id of a job that exists already.
    #[error("a job with id {job_id} already exists")]
    DuplicateJob {
        /// The id asked for.
        job_id: String,
    },
    /// The job named does not exist.
    #[error("no job {job_id} in the database")]
    NoSuchJob {
        /// The id asked for.
        job_id: String,
    },
    /// The job is not in the state the operation needs (e.g. assigning a job that is
    /// not queued any more).
    #[error("job {job_id} is {}, expected {}", .state.as_str(), .expected.as_str())]
    WrongState {
        /// The job.
        job_id: String,
        /// Its state.
        state: JobState,
        /// The state the operation needs.
        expected: JobState,
    },
    /// The database could not be opened or prepared.
    #[error("cannot open the database {}: {message}", .path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A value read from the database makes no sense (hand edit, newer farmgate).
    #[error("unreadable value in the database: {0}")]
    Corrupt(String),
    /// The database engine failed (I/O error, lock timeout, ...).
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// A job as submitted, before any DUT is chosen ([`Store::insert_job`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Job id, unique.
    pub job_id: String,
    /// User job, training round or quick check.
    pub kind: JobKind,
    /// Wanted machine.
    pub target: JobTarget,
    /// The job description template as submitted (rendered once a DUT is chosen).
    pub template: String,
    /// The submission's metadata (`farmgate_wire::JobMetadata`), as JSON.
    pub metadata_json: String,
    /// Submission time.
    pub submitted_at: DateTime<Utc>,
    /// The job is dropped when no DUT was free by then.
    pub deadline: Option<DateTime<Utc>>,
    /// The submitter asked to wait for a busy DUT.
    pub wait: bool,
}

/// A job as stored ([`Store::get_job`]).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Job id.
    pub job_id: String,
    /// User job, training round or quick check.
    pub kind: JobKind,
    /// Wanted machine.
    pub target: JobTarget,
    /// The job description template as submitted.
    pub template: String,
    /// The description rendered for the DUT, once assigned.
    pub rendered: Option<String>,
    /// The submission's metadata, as JSON.
    pub metadata_json: String,
    /// Queue state.
    pub state: JobState,
    /// Final status, once finished.
    pub status: Option<JobStatus>,
    /// Why the job ended as it did.
    pub reason: Option<String>,
    /// DUT the job is assigned to.
    pub dut_id: Option<String>,
    /// Current boot of the job (1 for the first, 0 before it).
    pub boot_index: u32,
    /// Process id of the job runner.
    pub runner_pid: Option<i32>,
    /// The runner process took its DUT's lock and is running the job.
    pub runner_started: bool,
    /// What the runner needs (the executor's `RunnerSpec`), as JSON, once assigned.
    pub runner_spec_json: Option<String>,
    /// Someone asked for the job to be cancelled.
    pub cancel_requested: bool,
    /// Submission time.
    pub submitted_at: DateTime<Utc>,
    /// When the job left the queue (assignment), then when its runner started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// The job is dropped when no DUT was free by then.
    pub deadline: Option<DateTime<Utc>>,
    /// The submitter asked to wait for a busy DUT.
    pub wait: bool,
}

/// A number of jobs of one kind, state and status ([`Store::job_counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCount {
    /// Kind.
    pub kind: JobKind,
    /// State.
    pub state: JobState,
    /// Final status (finished jobs).
    pub status: Option<JobStatus>,
    /// How many.
    pub count: u64,
}

/// RFC 3339 text of a time, UTC, with milliseconds: the format of the REST API.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl JobRow {
    /// The job as `GET /api/v1/job/<id>` shows it.
    pub fn view(&self) -> JobView {
        JobView {
            job_id: self.job_id.clone(),
            kind: self.kind,
            state: self.state,
            status: self.status,
            reason: self.reason.clone(),
            dut_id: self.dut_id.clone(),
            target: self.target.clone(),
            submitted_at: rfc3339(self.submitted_at),
            started_at: self.started_at.map(rfc3339),
            finished_at: self.finished_at.map(rfc3339),
        }
    }
}

/// What the executor remembers about a DUT between restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DutRuntime {
    /// Where the DUT is in the state machine.
    pub state: DutState,
    /// Job assigned to it, if any.
    pub current_job: Option<String>,
    /// Boot-loop progress while training or quick-checking.
    #[serde(default)]
    pub training: Option<TrainingProgress>,
    /// When the DUT entered its state (unknown for states saved by older versions).
    #[serde(default)]
    pub state_since: Option<chrono::DateTime<chrono::Utc>>,
}

impl DutRuntime {
    /// A DUT that has just entered `state`.
    pub fn new(state: DutState) -> DutRuntime {
        DutRuntime {
            state,
            current_job: None,
            training: None,
            state_since: Some(chrono::Utc::now()),
        }
    }

    /// Moves to `state`, noting when, if it is another state.
    pub fn enter(&mut self, state: DutState) {
        if self.state != state {
            self.state = state;
            self.state_since = Some(chrono::Utc::now());
        }
    }
}

/// The store of jobs, events and runtime state.
///
/// Methods are synchronous and short; async callers run them in `spawn_blocking`.
/// Every method is safe to call from several processes sharing the same database.
pub trait Store: Send + Sync {
    /// Add a queued job. [`StoreError::DuplicateJob`] when the id is taken.
    fn insert_job(&self, job: &NewJob) -> Result<(), StoreError>;

    /// The job with this id, if any.
    fn get_job(&self, job_id: &str) -> Result<Option<JobRow>, StoreError>;

    /// Up to `limit` jobs, newest first, optionally only those in `state`.
    fn list_jobs(&self, state: Option<JobState>, limit: usize) -> Result<Vec<JobRow>, StoreError>;

    /// Queued jobs, oldest submission first (FIFO).
    fn queued_jobs(&self) -> Result<Vec<JobRow>, StoreError>;

    /// Running jobs, oldest submission first.
    fn running_jobs(&self) -> Result<Vec<JobRow>, StoreError>;

    /// Give a queued job to a DUT: QUEUED → RUNNING, with its rendered description and
    /// runner spec; sets `started_at`. [`StoreError::WrongState`] unless it was queued.
    fn assign_job(
        &self,
        job_id: &str,
        dut_id: &str,
        rendered: &str,
        runner_spec_json: &str,
    ) -> Result<(), StoreError>;

    /// Record the pid of the runner process the daemon spawned.
    fn set_runner_pid(&self, job_id: &str, pid: i32) -> Result<(), StoreError>;

    /// The runner process `pid` holds the DUT's lock and runs the job; sets `started_at`.
    fn set_runner_started(&self, job_id: &str, pid: i32) -> Result<(), StoreError>;

    /// The job is at boot number `boot_index` (from 1).
    fn set_boot_index(&self, job_id: &str, boot_index: u32) -> Result<(), StoreError>;

    /// Ask the job's runner to cancel it.
    fn request_cancel(&self, job_id: &str) -> Result<(), StoreError>;

    /// End the job: FINISHED with `status` and `reason`, plus a `session_end` event
    /// (payload: JSON of `farmgate_wire::SessionEnd`). The first result wins: returns
    /// false, changing nothing, when the job was already finished.
    fn finish_job(&self, job_id: &str, status: JobStatus, reason: &str)
    -> Result<bool, StoreError>;

    /// Append events to the job's log in one transaction; returns their sequence
    /// numbers (the first event of a job is 1).
    fn append_events(
        &self,
        job_id: &str,
        events: &[(EventKind, String)],
    ) -> Result<Vec<i64>, StoreError>;

    /// Up to `limit` events of the job with a sequence number above `after`, in order.
    fn events_after(
        &self,
        job_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, StoreError>;

    /// Every event of one kind of the job (e.g. the gateway's messages), in order.
    fn events_of_kind(&self, job_id: &str, kind: EventKind) -> Result<Vec<JobEvent>, StoreError>;

    /// How many jobs there are of each kind, state and final status.
    fn job_counts(&self) -> Result<Vec<JobCount>, StoreError>;

    /// The saved runtime state of a DUT.
    fn dut_runtime(&self, dut_id: &str) -> Result<Option<DutRuntime>, StoreError>;

    /// The saved runtime state of every DUT, by id.
    fn all_dut_runtime(&self) -> Result<BTreeMap<String, DutRuntime>, StoreError>;

    /// Save the runtime state of a DUT.
    fn set_dut_runtime(&self, dut_id: &str, rt: &DutRuntime) -> Result<(), StoreError>;

    /// Forget a DUT's runtime state (it left the MaRS DB).
    fn delete_dut_runtime(&self, dut_id: &str) -> Result<(), StoreError>;

    /// Port `port` of PDU `pdu` was switched off at `at`.
    fn record_port_shutdown(
        &self,
        pdu: &str,
        port: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// When port `port` of PDU `pdu` was last switched off, if known.
    fn last_port_shutdown(
        &self,
        pdu: &str,
        port: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Value of a key of the key-value table.
    fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Set a key (`Some`) or delete it (`None`).
    fn kv_set(&self, key: &str, value: Option<&str>) -> Result<(), StoreError>;
}
