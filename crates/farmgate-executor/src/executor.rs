//! The daemon side of the executor: queue, dispatch, DUT state machine, Sergeant Hartman.
//!
//! One [`Executor`] per gateway. It owns the in-memory view of every DUT's runtime state
//! (mirrored to the store on each change), the FIFO queue of waiting user jobs, and the
//! MaRS file. It never runs a job itself: it assigns a job to a DUT, writes what the job
//! needs into the store and starts a runner process (see `runner.rs`), then learns the
//! result from the store when that process exits, whether the daemon saw it exit or
//! found it finished after a restart.
//!
//! The HTTP layer calls the typed methods here (`submit`, `patch_dut`, `cancel_on_dut`,
//! ...) and maps [`ExecError`] to status codes; nothing here knows HTTP.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use farmgate_job::RenderContext;
use farmgate_store::{DutRuntime, JobRow, MarsFile, NewJob, SqliteStore, Store};
use farmgate_wire::{
    DiscoverRequest, DiscoverState, DutList, DutPatch, DutRecord, DutRegistration, DutState,
    DutView, EventKind, FullState, JobAccepted, JobEvent, JobKind, JobMetadata, JobState,
    JobStatus, JobTarget, JobView, MarsDb, PduList, PduView, PortPatch, PortState, PortView,
    TrainingProgress,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::runner::unfit_key;
use crate::spawn::{ChildSpec, spawn_detached};
use crate::spec::{RunnerSpec, dut_lock_held};

/// The built-in boot-loop job of training rounds and quick checks.
pub const BUILTIN_BOOTLOOP_JOB: &str = include_str!("../job_templates/bootloop.yml.j2");

/// Default timeout of a discovery, in seconds (seed 001).
pub const DEFAULT_DISCOVERY_TIMEOUT: f64 = 150.0;

/// Why a request to the executor failed; the API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The named thing does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// No DUT of the farm matches the job's target, busy or not (406).
    #[error("{0}")]
    NoMatch(String),
    /// Matching DUTs exist but all are busy, and the client did not ask to wait (409).
    #[error("{0}")]
    Busy(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Something failed on our side (500).
    #[error("{0}")]
    Internal(String),
    /// A device (a PDU) did not do what it was asked (502).
    #[error("{0}")]
    Device(String),
}

impl From<farmgate_store::StoreError> for ExecError {
    fn from(e: farmgate_store::StoreError) -> Self {
        ExecError::Internal(format!("database: {e}"))
    }
}

/// A user job waiting for a DUT.
#[derive(Debug, Clone)]
struct QueuedJob {
    job_id: String,
    target: JobTarget,
    deadline: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct Discovery {
    pdu: String,
    port_id: String,
    start: DateTime<Utc>,
    deadline: DateTime<Utc>,
}

/// Scheduling state, behind one lock: every decision about a DUT is taken holding it.
#[derive(Debug, Default)]
struct Sched {
    duts: BTreeMap<String, DutRuntime>,
    queue: VecDeque<QueuedJob>,
    /// After a failed training, the DUT trains again only after this time.
    training_paused_until: HashMap<String, tokio::time::Instant>,
    discovery: Option<Discovery>,
}

struct Inner {
    config: GatewayConfig,
    store: Arc<dyn Store>,
    mars_file: MarsFile,
    mars: Mutex<Arc<MarsDb>>,
    /// Serialises writers of the MaRS file (REST edits, registrations, training results).
    mars_write: Mutex<()>,
    sched: Mutex<Sched>,
    wake: Notify,
    finished_tx: mpsc::UnboundedSender<String>,
    bootloop_template: String,
    mars_watcher: Mutex<Option<farmgate_store::MarsWatcher>>,
    /// Where user jobs get their share bucket and key (none: no object store).
    job_storage: Option<Arc<dyn crate::jobspace::JobStorage>>,
    /// Polls the PDUs; the power layer of the daemon's own switches.
    pdus: farmgate_pdu::service::PduMonitor,
    /// Histograms and counters of the jobs that are over (`/metrics`).
    metrics: Mutex<crate::metrics::ExecMetrics>,
    /// The latest switch request of each port (PDU, port) by the daemon: a request
    /// still waiting (minimum off time) when a newer one came is dropped, so a late
    /// "on" never undoes an "off" asked after it.
    power_requests: Mutex<HashMap<(String, String), u64>>,
}

/// What the store remembers of a job's share space, to remove it when the job is over.
#[derive(serde::Serialize, serde::Deserialize)]
struct JobSpace {
    bucket: String,
    access_key: String,
    /// The client sent a share directory: the bucket is archived for it at the end.
    #[serde(default)]
    shared: bool,
}

/// A job id a client chose: 1 to 128 of `[A-Za-z0-9_.-]` (it names files and buckets).
fn check_job_id(id: &str) -> Result<(), ExecError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ExecError::BadRequest(format!(
            "job id {id:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Who sent a DHCP request, as the DHCP server tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpClient {
    /// A PXE ROM (option 93 without iPXE's user class).
    Firmware,
    /// iPXE.
    Ipxe,
    /// Anything else, e.g. the booted kernel's DHCP client.
    Os,
}

impl DhcpClient {
    /// Classifies a request by its iPXE user class and its PXE architecture option.
    pub fn of(is_ipxe: bool, pxe_arch: Option<u16>) -> DhcpClient {
        match (is_ipxe, pxe_arch) {
            (true, _) => DhcpClient::Ipxe,
            (false, Some(_)) => DhcpClient::Firmware,
            (false, None) => DhcpClient::Os,
        }
    }
}

fn jobspace_key(job_id: &str) -> String {
    format!("jobspace:{job_id}")
}

/// How long the archive of a job's bucket waits for its client.
const SHARE_ARCHIVE_KEPT: Duration = Duration::from_secs(24 * 3600);

/// The executor service; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of our locks is a bug; keep serving rather than cascade.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The id of this boot of the machine, to tell a gateway reboot from a daemon restart.
fn machine_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Executor {
    /// Open the store and the MaRS file, recover from a previous run, and start the
    /// background loops. They stop when `shutdown` is cancelled; running jobs do not.
    pub async fn start(
        config: GatewayConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Executor> {
        Self::start_with_storage(config, shutdown, None).await
    }

    /// [`Executor::start`], with an object store where every user job gets a bucket and
    /// a key restricted to it (see [`crate::jobspace`]).
    pub async fn start_with_storage(
        config: GatewayConfig,
        shutdown: CancellationToken,
        job_storage: Option<Arc<dyn crate::jobspace::JobStorage>>,
    ) -> anyhow::Result<Executor> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", config.state_dir.display()))?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.database_path())?);
        let mars_file = MarsFile::new(config.mars_db_file.clone());
        let mars = mars_file.load()?;
        MarsFile::validate(&mars)?;
        let bootloop_template = match &config.bootloop_job {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("EXECUTOR_BOOTLOOP_JOB: cannot read {}: {e}", path.display())
            })?,
            None => BUILTIN_BOOTLOOP_JOB.to_string(),
        };
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        let pdus = farmgate_pdu::service::PduMonitor::new(
            config.pdu_poll_interval,
            Some(config.pdu_locks_dir()),
        );
        pdus.sync(&mars.pdus);
        let inner = Arc::new(Inner {
            config,
            store,
            mars_file: MarsFile::new(mars_file.path().to_path_buf()),
            mars: Mutex::new(Arc::new(mars)),
            mars_write: Mutex::new(()),
            sched: Mutex::new(Sched::default()),
            wake: Notify::new(),
            finished_tx,
            bootloop_template,
            job_storage,
            mars_watcher: Mutex::new(None),
            pdus,
            metrics: Mutex::new(Default::default()),
            power_requests: Mutex::new(HashMap::new()),
        });
        let exec = Executor { inner };
        exec.recover()?;

        // Admin edits of the MaRS file.
        let (mars_tx, mut mars_rx) = watch::channel(exec.mars());
        let watcher = farmgate_store::watch(
            mars_file,
            Duration::from_millis(500),
            mars_tx,
            shutdown.clone(),
        );
        *lock(&exec.inner.mars_watcher) = Some(watcher);
        let e = exec.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    changed = mars_rx.changed() => {
                        if changed.is_err() { return; }
                        mars_rx.borrow_and_update();
                        // The watcher's copy is only a notification: under the write
                        // lock, the file holds the latest truth (an admin's edit or our
                        // own last write), whereas the copy may predate one of ours.
                        let fresh = {
                            let _guard = lock(&e.inner.mars_write);
                            match e.inner.mars_file.load().and_then(|db| {
                                MarsFile::validate(&db)?;
                                Ok(db)
                            }) {
                                Ok(db) if db != *e.mars() => {
                                    let db = Arc::new(db);
                                    *lock(&e.inner.mars) = db;
                                    true
                                }
                                Ok(_) => false,
                                Err(err) => {
                                    tracing::warn!("MaRS DB file changed but is not valid any more: {err}");
                                    false
                                }
                            }
                        };
                        if fresh {
                            tracing::info!("MaRS DB file changed, applying it");
                            e.settle_all();
                        }
                    }
                }
            }
        });

        // Runner exits seen by this daemon.
        let e = exec.clone();
        let sd = shutdown.clone();
        let mut finished_rx = finished_rx;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    job = finished_rx.recv() => match job {
                        Some(job_id) => e.on_runner_exit(&job_id),
                        None => return,
                    },
                }
            }
        });

        // Periodic reconciliation: runners that died or finished while we were away,
        // deadlines, discovery timeouts, paused training.
        let e = exec.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => e.reconcile(),
                    _ = e.inner.wake.notified() => {}
                }
                e.dispatch();
            }
        });
        exec.dispatch();
        Ok(exec)
    }

    /// The configuration in force.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// The store (for the API's read-only job queries).
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// The MaRS DB as last loaded or written.
    pub fn mars(&self) -> Arc<MarsDb> {
        lock(&self.inner.mars).clone()
    }

    fn hartman_enabled(&self) -> bool {
        self.inner.config.hartman_boot_count >= 0
    }

    /// Rebuild the in-memory state from the store and the MaRS file after a (re)start.
    fn recover(&self) -> anyhow::Result<()> {
        let store = &self.inner.store;
        let boot_id = machine_boot_id();
        let same_boot = store.kv_get("gateway_boot_id")?.as_deref() == Some(boot_id.as_str());
        store.kv_set("gateway_boot_id", Some(&boot_id))?;
        let saved = store.all_dut_runtime()?;
        let mars = self.mars();
        let mut s = lock(&self.inner.sched);
        for (id, record) in &mars.duts {
            let id = id.to_lowercase();
            let rt = match saved.get(&id) {
                Some(rt) if rt.current_job.is_some() => rt.clone(),
                Some(rt) if same_boot => rt.clone(),
                _ => DutRuntime::new(self.start_state(record)),
            };
            s.duts.insert(id, rt);
        }
        for job in store.queued_jobs()? {
            if job.kind == JobKind::User {
                s.queue.push_back(QueuedJob {
                    job_id: job.job_id.clone(),
                    target: job.target.clone(),
                    deadline: job.deadline,
                });
            }
        }
        if let Some(d) = store.kv_get("discovery")?
            && let Ok(d) = serde_json::from_str::<DiscoverState>(&d)
            && let (Some(pdu), Some(port_id), Some(start), Some(deadline)) =
                (d.pdu, d.port_id, d.start_date, d.deadline)
            && let (Ok(start), Ok(deadline)) = (
                DateTime::parse_from_rfc3339(&start),
                DateTime::parse_from_rfc3339(&deadline),
            )
        {
            s.discovery = Some(Discovery {
                pdu,
                port_id,
                start: start.with_timezone(&Utc),
                deadline: deadline.with_timezone(&Utc),
            });
        }
        for (id, rt) in &s.duts {
            store.set_dut_runtime(id, rt)?;
        }
        tracing::info!(
            duts = s.duts.len(),
            queued = s.queue.len(),
            same_boot,
            "executor state recovered"
        );
        Ok(())
    }

    /// The START node of seed 001's state machine.
    fn start_state(&self, record: &DutRecord) -> DutState {
        if record.is_retired {
            DutState::Retired
        } else if !self.hartman_enabled() {
            DutState::Idle
        } else if !record.ready_for_service {
            DutState::Training
        } else if self.inner.config.hartman_quick_check {
            DutState::QuickCheck
        } else {
            DutState::Idle
        }
    }

    fn save_rt(&self, id: &str, rt: &DutRuntime) {
        if let Err(e) = self.inner.store.set_dut_runtime(id, rt) {
            tracing::error!(dut_id = id, "cannot save DUT state: {e}");
        }
    }

    fn set_state(&self, s: &mut Sched, id: &str, state: DutState) {
        if let Some(rt) = s.duts.get_mut(id) {
            if rt.state != state {
                tracing::info!(dut_id = id, from = %rt.state, to = %state, "DUT state change");
                rt.enter(state);
                if state != DutState::Training && state != DutState::QuickCheck {
                    rt.training = None;
                }
            }
            let rt = rt.clone();
            self.save_rt(id, &rt);
        }
    }

    /// Apply the MaRS records to every DUT that is not busy (admin edits, REST patches).
    fn settle_all(&self) {
        let mars = self.mars();
        let mut s = lock(&self.inner.sched);
        // DUTs removed from the file.
        let gone: Vec<String> = s
            .duts
            .keys()
            .filter(|id| !mars.duts.keys().any(|k| k.eq_ignore_ascii_case(id)))
            .cloned()
            .collect();
        for id in gone {
            if let Some(rt) = s.duts.remove(&id)
                && let Some(job) = rt.current_job
            {
                self.request_cancel(&job);
            }
            let _ = self.inner.store.delete_dut_runtime(&id);
            tracing::info!(dut_id = %id, "DUT removed from the MaRS DB");
        }
        for (id, record) in &mars.duts {
            let id = id.to_lowercase();
            if let std::collections::btree_map::Entry::Vacant(slot) = s.duts.entry(id.clone()) {
                let rt = DutRuntime::new(self.start_state(record));
                tracing::info!(dut_id = %id, state = %rt.state, "new DUT");
                self.save_rt(&id, &rt);
                slot.insert(rt);
                continue;
            }
            self.settle(&mut s, &id, record);
        }
        drop(s);
        self.inner.wake.notify_one();
    }

    /// Seed 001 transitions driven by the DUT's record, for a DUT without a job.
    fn settle(&self, s: &mut Sched, id: &str, record: &DutRecord) {
        let Some(rt) = s.duts.get(id) else { return };
        if rt.current_job.is_some() {
            return; // decided when the job ends
        }
        let state = rt.state;
        let next = if record.is_retired {
            DutState::Retired
        } else if !self.hartman_enabled() {
            DutState::Idle
        } else if state == DutState::Retired {
            // Activate: back through the quick check (or training when not ready).
            if !record.ready_for_service {
                DutState::Training
            } else if self.inner.config.hartman_quick_check {
                DutState::QuickCheck
            } else {
                DutState::Idle
            }
        } else if !record.ready_for_service {
            DutState::Training
        } else if state == DutState::Training {
            DutState::Idle
        } else {
            state
        };
        self.set_state(s, id, next);
    }

    /// Find the MaRS record of a machine id, case-insensitively.
    fn record_of(mars: &MarsDb, id: &str) -> Option<(String, DutRecord)> {
        mars.duts
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(id))
            .map(|(k, v)| (k.clone(), v.clone()))
    }

    /// `FARM_NAME-base_name-N`, N counting DUTs of the same base name in id order.
    fn full_name(&self, mars: &MarsDb, id: &str) -> String {
        let Some((key, record)) = Self::record_of(mars, id) else {
            return id.to_string();
        };
        let base = record.base_name.clone().unwrap_or_else(|| "dut".into());
        let n = mars
            .duts
            .iter()
            .filter(|(_, r)| r.base_name.as_deref().unwrap_or("dut") == base)
            .position(|(k, _)| *k == key)
            .unwrap_or(0)
            + 1;
        format!("{}-{}-{}", self.inner.config.farm_name, base, n)
    }

    fn usable(record: &DutRecord) -> bool {
        record.pdu.is_some() && record.pdu_port_id.is_some()
    }

    /// Whether `port` of PDU `pdu` is reserved (set aside: nobody switches it, no job or
    /// training round uses its machine; an admin may type into that machine's console).
    pub fn port_reserved(&self, pdu: &str, port: &str) -> bool {
        self.mars()
            .pdus
            .get(pdu)
            .is_some_and(|p| p.reserved_port_ids.iter().any(|r| r == port))
    }

    /// Why a DUT cannot be used now although its state allows it: its PDU port is
    /// reserved, or its PDU does not answer (the monitor's polls fail; clears by itself
    /// when the PDU answers again).
    fn unavailable(&self, record: &DutRecord) -> Option<String> {
        let pdu = record.pdu.as_deref()?;
        if let Some(port) = record.pdu_port_id.as_deref()
            && self.port_reserved(pdu, port)
        {
            return Some(format!(
                "its port {port} of PDU {pdu} is reserved (set aside for interactive use)"
            ));
        }
        let why = self.inner.pdus.down_reason(pdu)?;
        Some(format!("PDU {pdu} {why}"))
    }

    // ----- dispatch -----------------------------------------------------------------

    /// Start what can start: Sergeant Hartman's rounds, then queued user jobs in order.
    pub fn dispatch(&self) {
        let mars = self.mars();
        let mut s = lock(&self.inner.sched);
        let now_i = tokio::time::Instant::now();
        // Training rounds and quick checks.
        let trainees: Vec<String> = s
            .duts
            .iter()
            .filter(|(_, rt)| {
                rt.current_job.is_none()
                    && matches!(rt.state, DutState::Training | DutState::QuickCheck)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in trainees {
            if s.training_paused_until.get(&id).is_some_and(|t| *t > now_i) {
                continue;
            }
            let Some((_, record)) = Self::record_of(&mars, &id) else {
                continue;
            };
            if !Self::usable(&record) || self.unavailable(&record).is_some() {
                continue;
            }
            self.start_hartman_round(&mut s, &mars, &id, &record);
        }

        // User jobs, FIFO; a job that matches no idle DUT does not block later ones.
        let mut idle: Vec<String> = s
            .duts
            .iter()
            .filter(|(_, rt)| rt.state == DutState::Idle && rt.current_job.is_none())
            .map(|(id, _)| id.clone())
            .filter(|id| {
                Self::record_of(&mars, id)
                    .is_some_and(|(_, r)| Self::usable(&r) && self.unavailable(&r).is_none())
            })
            .collect();
        if idle.is_empty() || s.queue.is_empty() {
            return;
        }
        let mut i = 0;
        while i < s.queue.len() && !idle.is_empty() {
            let job = s.queue[i].clone();
            let pick = idle.iter().position(|id| {
                Self::record_of(&mars, id).is_some_and(|(_, r)| Self::matches(&job.target, id, &r))
            });
            match pick {
                Some(pos) => {
                    let dut_id = idle.swap_remove(pos);
                    s.queue.remove(i);
                    self.assign(&mut s, &mars, &job.job_id, &dut_id);
                }
                None => i += 1,
            }
        }
    }

    fn matches(target: &JobTarget, id: &str, record: &DutRecord) -> bool {
        if let Some(want) = &target.id
            && !want.eq_ignore_ascii_case(id)
        {
            return false;
        }
        record.has_all_tags(&target.tags)
    }

    fn start_hartman_round(&self, s: &mut Sched, mars: &MarsDb, id: &str, record: &DutRecord) {
        let kind = if s.duts.get(id).map(|r| r.state) == Some(DutState::QuickCheck) {
            JobKind::QuickCheck
        } else {
            JobKind::Training
        };
        let (total, needed) = match kind {
            JobKind::QuickCheck => (1, 1),
            _ => {
                let total = self.inner.config.hartman_boot_count.max(0) as u32;
                let needed = self.inner.config.hartman_qualifying_boot_count.min(total);
                (total, needed)
            }
        };
        if total == 0 {
            // SERGENT_HARTMAN_BOOT_COUNT=0: ready as soon as registered.
            self.mark_ready(s, id, true);
            return;
        }
        let job_id = new_job_id(kind);
        let new = NewJob {
            job_id: job_id.clone(),
            kind,
            target: JobTarget {
                id: Some(id.to_string()),
                tags: vec![],
            },
            template: self.inner.bootloop_template.clone(),
            metadata_json: "{}".into(),
            submitted_at: now(),
            deadline: None,
            wait: true,
        };
        if let Err(e) = self.inner.store.insert_job(&new) {
            tracing::error!(dut_id = id, "cannot queue a boot-loop round: {e}");
            return;
        }
        if let Some(rt) = s.duts.get_mut(id)
            && rt.training.is_none()
        {
            rt.training = Some(TrainingProgress {
                rounds_done: 0,
                rounds_passed: 0,
                rounds_total: total,
                rounds_needed: needed,
            });
        }
        let _ = record;
        self.assign(s, mars, &job_id, id);
        if s.duts.get(id).is_some_and(|rt| rt.current_job.is_none()) {
            // The round could not start (bad boot-loop job, missing PDU...): do not spin.
            let why = self
                .inner
                .store
                .get_job(&job_id)
                .ok()
                .flatten()
                .and_then(|row| row.reason)
                .unwrap_or_else(|| "see the errors above".into());
            tracing::error!(
                dut_id = id,
                "boot-loop round {job_id} could not start ({why}); pausing training"
            );
            s.training_paused_until.insert(
                id.to_string(),
                tokio::time::Instant::now() + self.inner.config.hartman_retrial_delay,
            );
        }
    }

    /// Render the job for the DUT, record the assignment and start the runner.
    fn assign(&self, s: &mut Sched, mars: &MarsDb, job_id: &str, dut_id: &str) {
        self.try_assign(s, mars, job_id, dut_id);
        // A job that did not get its DUT does not keep a share space.
        let assigned = s
            .duts
            .get(dut_id)
            .is_some_and(|rt| rt.current_job.as_deref() == Some(job_id));
        if !assigned {
            self.remove_job_space(job_id);
        }
    }

    fn try_assign(&self, s: &mut Sched, mars: &MarsDb, job_id: &str, dut_id: &str) {
        let store = &self.inner.store;
        let row = match store.get_job(job_id) {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(job_id, "cannot read job: {e}");
                return;
            }
        };
        let Some((_, record)) = Self::record_of(mars, dut_id) else {
            return;
        };
        let metadata: JobMetadata = serde_json::from_str(&row.metadata_json).unwrap_or_default();
        let mut ctx = self.render_context(dut_id, &record, &metadata);
        if row.kind == JobKind::User
            && let Some(storage) = &self.inner.job_storage
        {
            let bucket = crate::jobspace::bucket_name(dut_id, job_id);
            match storage.create_space(&bucket) {
                Ok((access_key, secret_key)) => {
                    let share =
                        crate::jobspace::share_archive(&self.inner.config.state_dir, job_id, false);
                    let space = JobSpace {
                        bucket: bucket.clone(),
                        access_key: access_key.clone(),
                        shared: share.exists(),
                    };
                    let _ = store.kv_set(
                        &jobspace_key(job_id),
                        serde_json::to_string(&space).ok().as_deref(),
                    );
                    if space.shared {
                        let imported = storage.import_archive(&bucket, &share);
                        let _ = std::fs::remove_file(&share);
                        match imported {
                            Ok(n) => {
                                let _ = store.append_events(
                                    job_id,
                                    &[(
                                        EventKind::Ctrl,
                                        format!(
                                            "Share directory: {n} files put into bucket {bucket}"
                                        ),
                                    )],
                                );
                            }
                            Err(e) => {
                                let _ = store.finish_job(
                                    job_id,
                                    JobStatus::SetupFail,
                                    &format!(
                                        "cannot put the share directory into bucket {bucket}: {e}"
                                    ),
                                );
                                return;
                            }
                        }
                    }
                    ctx = ctx.job_bucket(&farmgate_job::JobBucket {
                        url: storage.url_for_duts(),
                        name: bucket,
                        access_key,
                        secret_key,
                    });
                }
                Err(e) => {
                    let _ = store.finish_job(
                        job_id,
                        JobStatus::SetupFail,
                        &format!("cannot create the job's bucket {bucket}: {e}"),
                    );
                    return;
                }
            }
        }
        let rendered = match farmgate_job::render_and_parse(&row.template, &ctx) {
            Ok((text, _job)) => text,
            Err(e) => {
                let _ = store.finish_job(
                    job_id,
                    JobStatus::SetupFail,
                    &format!("job description for {dut_id}: {e}"),
                );
                return;
            }
        };
        let (Some(pdu_name), Some(port_id)) = (record.pdu.clone(), record.pdu_port_id.clone())
        else {
            return;
        };
        let Some(pdu) = mars.pdus.get(&pdu_name).cloned() else {
            let _ = store.finish_job(
                job_id,
                JobStatus::SetupFail,
                &format!("DUT {dut_id} names PDU {pdu_name}, which the MaRS DB does not define"),
            );
            return;
        };
        let spec = RunnerSpec {
            job_id: job_id.to_string(),
            kind: row.kind,
            dut_id: dut_id.to_string(),
            dut_name: self.full_name(mars, dut_id),
            dut: record.clone(),
            pdu_name,
            pdu,
            port_id,
            salad_url: self.inner.config.salad_url.clone(),
            locks_dir: self.inner.config.locks_dir(),
            pdu_locks_dir: Some(self.inner.config.pdu_locks_dir()),
            default_unfit_regex: self.inner.config.default_unfit_regex.clone(),
        };
        let spec_json = match serde_json::to_string(&spec) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(job_id, "cannot encode runner spec: {e}");
                return;
            }
        };
        if let Err(e) = store.assign_job(job_id, dut_id, &rendered, &spec_json) {
            tracing::error!(job_id, dut_id, "cannot assign job: {e}");
            return;
        }
        let user_job = row.kind == JobKind::User;
        if let Some(rt) = s.duts.get_mut(dut_id) {
            rt.current_job = Some(job_id.to_string());
            if user_job {
                rt.enter(DutState::Queued);
            }
            let rt = rt.clone();
            self.save_rt(dut_id, &rt);
        }
        let _ = store.append_events(
            job_id,
            &[(
                EventKind::Ctrl,
                format!("Job assigned to {} ({dut_id})", spec.dut_name),
            )],
        );
        match self.spawn_runner(job_id) {
            Ok(()) => {
                if user_job {
                    self.set_state(s, dut_id, DutState::Running);
                }
            }
            Err(e) => {
                let _ = store.finish_job(
                    job_id,
                    JobStatus::SetupFail,
                    &format!("cannot start the job runner process: {e}"),
                );
                self.job_over(s, job_id);
            }
        }
    }

    fn render_context(
        &self,
        dut_id: &str,
        record: &DutRecord,
        meta: &JobMetadata,
    ) -> RenderContext {
        let c = &self.inner.config;
        RenderContext::new()
            .machine_id(dut_id)
            .machine(record)
            .http_url(&c.executor_url)
            .environ(&meta.environ)
            .executor_env_from_process()
            .var(
                "boots_default_kernel",
                c.boot_default("KERNEL", Some("IPXE"), None, None)
                    .unwrap_or_default(),
            )
            .var(
                "boots_default_initrd",
                c.boot_default("INITRD", Some("IPXE"), None, None)
                    .unwrap_or_default(),
            )
            .var(
                "boots_default_cmdline",
                c.boot_default("CMDLINE", Some("IPXE"), None, None)
                    .unwrap_or_default(),
            )
    }

    fn spawn_runner(&self, job_id: &str) -> std::io::Result<()> {
        let c = &self.inner.config;
        let exe = match &c.runner_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe()?,
        };
        let spec = ChildSpec {
            program: exe,
            args: vec![
                "run-job".into(),
                "--database".into(),
                c.database_path().display().to_string(),
                "--job-id".into(),
                job_id.into(),
            ],
            cwd: c.state_dir.clone(),
            env: vec![],
            log_file: c.runner_logs_dir().join(format!("{job_id}.log")),
        };
        let mut child = spawn_detached(&spec)?;
        if let Some(pid) = child.id() {
            let _ = self.inner.store.set_runner_pid(job_id, pid as i32);
        }
        let tx = self.inner.finished_tx.clone();
        let id = job_id.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::debug!(job_id = %id, ?status, "job runner exited");
            let _ = tx.send(id);
        });
        Ok(())
    }

    // ----- end of jobs --------------------------------------------------------------

    fn on_runner_exit(&self, job_id: &str) {
        let mut s = lock(&self.inner.sched);
        match self.inner.store.get_job(job_id) {
            Ok(Some(row))
                if row.state != JobState::Finished
                    && row.dut_id.as_deref().is_some_and(|dut| {
                        dut_lock_held(&self.inner.config.locks_dir(), dut).unwrap_or(true)
                    }) =>
            {
                // Another runner of this job holds the DUT (this one was a duplicate
                // refused by the lock): the job goes on.
                tracing::warn!(job_id, "a duplicate job runner exited; the job goes on");
                return;
            }
            Ok(Some(row)) if row.state != JobState::Finished => {
                // The runner is gone without writing a result: a cancel that stopped it
                // before it could take the signal, or a crash.
                let _ = self.inner.store.finish_job(
                    job_id,
                    JobStatus::Incomplete,
                    if row.cancel_requested {
                        "job cancelled (its runner was stopped before it could report)"
                    } else {
                        "the job runner process exited without a result (see its log in the state directory)"
                    },
                );
                if let Some(dut) = &row.dut_id {
                    self.power_off_dut_of(dut);
                }
            }
            _ => {}
        }
        self.job_over(&mut s, job_id);
        drop(s);
        self.inner.wake.notify_one();
    }

    /// A job of a DUT is finished in the store: move the DUT on.
    /// Removes the job's bucket and key, if it has them (in the background: deleting a
    /// bucket walks its files).
    fn remove_job_space(&self, job_id: &str) {
        let key = jobspace_key(job_id);
        let Some(space) = self
            .inner
            .store
            .kv_get(&key)
            .ok()
            .flatten()
            .and_then(|j| serde_json::from_str::<JobSpace>(&j).ok())
        else {
            return;
        };
        let Some(storage) = self.inner.job_storage.clone() else {
            return;
        };
        let store = self.inner.store.clone();
        let out = crate::jobspace::share_archive(&self.inner.config.state_dir, job_id, true);
        let job_id = job_id.to_string();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = out.parent() {
                let _ = std::fs::create_dir_all(dir);
                crate::jobspace::sweep_old_archives(dir, SHARE_ARCHIVE_KEPT);
            }
            // What the job left in its bucket goes back to the client (farmctl -s).
            if space.shared {
                match storage.export_archive(&space.bucket, &out) {
                    Ok(n) => {
                        tracing::debug!(job_id, files = n, "job bucket archived for the client")
                    }
                    Err(e) => {
                        tracing::warn!(job_id, bucket = %space.bucket, "cannot archive the job's bucket: {e}")
                    }
                }
            }
            match storage.remove_space(&space.bucket, &space.access_key) {
                Ok(()) => {
                    tracing::info!(job_id, bucket = %space.bucket, "job bucket and key removed");
                    let _ = store.kv_set(&key, None);
                }
                Err(e) => {
                    tracing::warn!(job_id, bucket = %space.bucket, "cannot remove the job's bucket: {e}")
                }
            }
        });
    }

    fn job_over(&self, s: &mut Sched, job_id: &str) {
        let row = match self.inner.store.get_job(job_id) {
            Ok(Some(row)) => row,
            _ => return,
        };
        let Some(dut_id) = row.dut_id.clone() else {
            return;
        };
        let Some(rt) = s.duts.get_mut(&dut_id) else {
            return;
        };
        if rt.current_job.as_deref() != Some(job_id) {
            return; // already handled
        }
        rt.current_job = None;
        self.remove_job_space(job_id);
        self.observe_job_later(&row);
        let unfit = self
            .inner
            .store
            .kv_get(&unfit_key(job_id))
            .ok()
            .flatten()
            .is_some();
        let status = row.status.unwrap_or(JobStatus::Unknown);
        tracing::info!(job_id, dut_id = %dut_id, %status, "job over");
        let mars = self.mars();
        let Some((_, record)) = Self::record_of(&mars, &dut_id) else {
            return;
        };
        match row.kind {
            JobKind::User => {
                if unfit && self.hartman_enabled() {
                    self.mark_ready(s, &dut_id, false);
                } else {
                    self.set_state(s, &dut_id, DutState::Idle);
                    self.settle(s, &dut_id, &record);
                }
            }
            JobKind::QuickCheck => {
                if status.is_success() && !unfit {
                    self.set_state(s, &dut_id, DutState::Idle);
                    self.settle(s, &dut_id, &record);
                } else {
                    self.mark_ready(s, &dut_id, false);
                }
            }
            JobKind::Training => {
                let rt = s.duts.get_mut(&dut_id).expect("checked above");
                let mut p = rt.training.unwrap_or(TrainingProgress {
                    rounds_done: 0,
                    rounds_passed: 0,
                    rounds_total: self.inner.config.hartman_boot_count.max(1) as u32,
                    rounds_needed: self.inner.config.hartman_qualifying_boot_count,
                });
                p.rounds_done += 1;
                if status.is_success() && !unfit {
                    p.rounds_passed += 1;
                }
                rt.training = Some(p);
                let rt_copy = rt.clone();
                self.save_rt(&dut_id, &rt_copy);
                let left = p.rounds_total.saturating_sub(p.rounds_done);
                if p.rounds_passed >= p.rounds_needed {
                    tracing::info!(dut_id = %dut_id, passed = p.rounds_passed, done = p.rounds_done, "training passed");
                    self.mark_ready(s, &dut_id, true);
                } else if p.rounds_passed + left < p.rounds_needed {
                    tracing::warn!(dut_id = %dut_id, passed = p.rounds_passed, done = p.rounds_done, "training failed; training again later");
                    if let Some(rt) = s.duts.get_mut(&dut_id) {
                        rt.training = None;
                        let rt = rt.clone();
                        self.save_rt(&dut_id, &rt);
                    }
                    s.training_paused_until.insert(
                        dut_id.clone(),
                        tokio::time::Instant::now() + self.inner.config.hartman_retrial_delay,
                    );
                    self.settle(s, &dut_id, &record);
                }
            }
        }
        let rt = s.duts.get(&dut_id).cloned();
        if let Some(rt) = rt {
            self.save_rt(&dut_id, &rt);
        }
    }

    /// Write `ready_for_service` to the MaRS file and move the DUT accordingly.
    fn mark_ready(&self, s: &mut Sched, dut_id: &str, ready: bool) {
        let result = self.edit_mars(|db| {
            if let Some((key, _)) = Self::record_of(db, dut_id)
                && let Some(r) = db.duts.get_mut(&key)
            {
                r.ready_for_service = ready;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(dut_id, "cannot update the MaRS DB: {e}");
        }
        let mars = self.mars();
        if let Some((_, record)) = Self::record_of(&mars, dut_id) {
            if let Some(rt) = s.duts.get_mut(dut_id) {
                rt.training = None;
                // Leave TRAINING/QUICK_CHECK so settle() recomputes from the record.
                rt.enter(if ready {
                    DutState::Idle
                } else {
                    DutState::Training
                });
                let rt = rt.clone();
                self.save_rt(dut_id, &rt);
            }
            self.settle(s, dut_id, &record);
        }
    }

    /// Edit the MaRS DB: apply `f`, validate, write the file atomically.
    fn edit_mars(
        &self,
        f: impl FnOnce(&mut MarsDb) -> Result<(), ExecError>,
    ) -> Result<Arc<MarsDb>, ExecError> {
        let _guard = lock(&self.inner.mars_write);
        let mut db = (*self.mars()).clone();
        f(&mut db)?;
        MarsFile::validate(&db).map_err(|e| ExecError::BadRequest(e.to_string()))?;
        self.inner
            .mars_file
            .save(&db)
            .map_err(|e| ExecError::Internal(e.to_string()))?;
        if let (Some(w), Some(stamp)) = (
            lock(&self.inner.mars_watcher).as_ref(),
            self.inner.mars_file.stamp(),
        ) {
            w.note_own_write(stamp);
        }
        let db = Arc::new(db);
        *lock(&self.inner.mars) = db.clone();
        Ok(db)
    }

    /// Periodic checks: dead runners, runners that finished while we were away, queue
    /// deadlines, discovery timeout.
    fn reconcile(&self) {
        self.inner.pdus.sync(&self.mars().pdus);
        let store = &self.inner.store;
        let running = match store.running_jobs() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot list running jobs: {e}");
                return;
            }
        };
        let locks = self.inner.config.locks_dir();
        for row in running {
            let Some(dut_id) = row.dut_id.clone() else {
                continue;
            };
            let held = dut_lock_held(&locks, &dut_id).unwrap_or(true);
            if held {
                continue;
            }
            // Re-read: the runner may have finished between the listing and the lock test.
            let Ok(Some(row)) = store.get_job(&row.job_id) else {
                continue;
            };
            if row.state == JobState::Finished {
                continue;
            }
            if row.runner_started {
                // The runner may have taken the lock and started after the test above:
                // runner_started is set under the lock, so test the lock again now, and
                // look at the row once more in case it finished and exited meanwhile.
                if dut_lock_held(&locks, &dut_id).unwrap_or(true) {
                    continue;
                }
                match store.get_job(&row.job_id) {
                    Ok(Some(again)) if again.state != JobState::Finished => {}
                    _ => continue,
                }
                let _ = store.finish_job(
                    &row.job_id,
                    JobStatus::Incomplete,
                    if row.cancel_requested {
                        "job cancelled (its runner was stopped before it could report)"
                    } else {
                        "the job runner process died (its DUT lock was released without a result)"
                    },
                );
                self.power_off_dut_of(&dut_id);
                let mut s = lock(&self.inner.sched);
                self.job_over(&mut s, &row.job_id);
            } else if row.runner_pid.is_none() {
                // Assigned, but the daemon stopped before starting its runner. `assign`
                // records the assignment and the runner's pid under the scheduler lock:
                // look again under it, or a job being assigned right now would get two.
                let _s = lock(&self.inner.sched);
                let Ok(Some(row)) = store.get_job(&row.job_id) else {
                    continue;
                };
                if row.state == JobState::Finished || row.runner_pid.is_some() {
                    continue;
                }
                tracing::warn!(job_id = %row.job_id, "restarting the runner of an assigned job");
                if let Err(e) = self.spawn_runner(&row.job_id) {
                    let _ = store.finish_job(
                        &row.job_id,
                        JobStatus::SetupFail,
                        &format!("cannot start the job runner process: {e}"),
                    );
                }
            } else if let Some(started) = row.started_at.or(Some(row.submitted_at)) {
                // Spawned, but never took its lock: give it 30 s before calling it dead.
                if now() - started > chrono::Duration::seconds(30) {
                    let _ = store.finish_job(
                        &row.job_id,
                        JobStatus::Incomplete,
                        "the job runner process never started",
                    );
                    let mut s = lock(&self.inner.sched);
                    self.job_over(&mut s, &row.job_id);
                }
            }
        }
        // Jobs the daemon believes running but that are finished in the store.
        let mut s = lock(&self.inner.sched);
        let current: Vec<String> = s
            .duts
            .values()
            .filter_map(|rt| rt.current_job.clone())
            .collect();
        for job_id in current {
            if let Ok(Some(row)) = store.get_job(&job_id)
                && row.state == JobState::Finished
            {
                self.job_over(&mut s, &job_id);
            }
        }
        // Deadlines of queued jobs.
        let t = now();
        let expired: Vec<String> = s
            .queue
            .iter()
            .filter(|j| j.deadline.is_some_and(|d| d <= t))
            .map(|j| j.job_id.clone())
            .collect();
        for id in expired {
            s.queue.retain(|j| j.job_id != id);
            let _ = store.finish_job(
                &id,
                JobStatus::SetupFail,
                "the job's deadline passed before a DUT was free",
            );
        }
        // Discovery timeout.
        if s.discovery.as_ref().is_some_and(|d| d.deadline <= t) {
            let d = s.discovery.take().expect("checked");
            let _ = store.kv_set("discovery", None);
            tracing::warn!(pdu = %d.pdu, port_id = %d.port_id, "discovery timed out: no machine registered");
            self.power_port_later(&d.pdu, &d.port_id, PortState::Off);
        }
    }

    fn request_cancel(&self, job_id: &str) {
        let store = &self.inner.store;
        let _ = store.request_cancel(job_id);
        if let Ok(Some(row)) = store.get_job(job_id)
            && let Some(pid) = row.runner_pid
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    // ----- API commands -------------------------------------------------------------

    /// [`Executor::submit`] with the client's share directory as a `.tar.gz` archive: it is
    /// put into the job's bucket when the job starts, and the bucket's content is archived
    /// for the client when the job is over ([`Executor::share_result`]).
    pub fn submit_with_share(
        &self,
        template: &str,
        mut metadata: JobMetadata,
        share: Option<&[u8]>,
    ) -> Result<JobAccepted, ExecError> {
        let Some(share) = share else {
            return self.submit(template, metadata);
        };
        if self.inner.job_storage.is_none() {
            return Err(ExecError::BadRequest(
                "a share directory needs the gateway's object store, which is off here (FARMGATE_S3_PORT=0)".into(),
            ));
        }
        let job_id = metadata
            .job_id
            .get_or_insert_with(|| new_job_id(JobKind::User))
            .clone();
        check_job_id(&job_id)?;
        // A resubmission of an accepted job (a client retrying after a lost answer) must
        // not touch that job's archive.
        if matches!(self.inner.store.get_job(&job_id), Ok(Some(_))) {
            return Err(ExecError::Conflict(format!(
                "a job with id {job_id} already exists"
            )));
        }
        // Saved before the job exists: it may be dispatched at once.
        let path = crate::jobspace::share_archive(&self.inner.config.state_dir, &job_id, false);
        let write = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, share));
        if let Err(e) = write {
            return Err(ExecError::Internal(format!(
                "cannot keep the share directory archive at {}: {e}",
                path.display()
            )));
        }
        let accepted = self.submit(template, metadata);
        if accepted.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        accepted
    }

    /// The archive of what a finished job left in its bucket (`farmctl -s` takes it back);
    /// `None` while the job runs or when it had no bucket.
    pub fn share_result(&self, job_id: &str) -> Result<Option<PathBuf>, ExecError> {
        self.job_row(job_id)?;
        let path = crate::jobspace::share_archive(&self.inner.config.state_dir, job_id, true);
        Ok(path.exists().then_some(path))
    }

    /// Queue a job (`POST /api/v1/jobs`).
    pub fn submit(&self, template: &str, metadata: JobMetadata) -> Result<JobAccepted, ExecError> {
        // Check the template renders and parses before accepting it, with the values of
        // a placeholder machine; it is rendered again for the DUT it runs on.
        let placeholder = DutRecord::default();
        let ctx = self.render_context("00:00:00:00:00:00", &placeholder, &metadata);
        let (_, job) = farmgate_job::render_and_parse(template, &ctx)
            .map_err(|e| ExecError::BadRequest(format!("job description: {e}")))?;
        // A command line iPXE cannot take would only show as a DUT that never boots.
        for (boot, name) in [(0, "start"), (1, "continue")] {
            crate::bootscript::check_cmdline(&job.deployment.for_boot(boot).cmdline).map_err(
                |e| {
                    ExecError::BadRequest(format!("job description: deployment.{name}.kernel: {e}"))
                },
            )?;
        }
        let target = metadata.target.clone().unwrap_or(job.target.clone());
        let job_id = match &metadata.job_id {
            Some(id) => {
                check_job_id(id)?;
                id.clone()
            }
            None => new_job_id(JobKind::User),
        };
        let mars = self.mars();
        let mut s = lock(&self.inner.sched);
        if let Some(id) = &target.id
            && Self::record_of(&mars, id).is_none()
        {
            return Err(ExecError::NotFound(format!(
                "no machine with id {id} in this farm"
            )));
        }
        let candidates: Vec<String> = mars
            .duts
            .iter()
            // A machine still in training counts: it will serve once trained, and a
            // job waiting for it (-w) is what a user who just enrolled it expects.
            .filter(|(id, r)| Self::matches(&target, id, r) && Self::usable(r) && !r.is_retired)
            .map(|(id, _)| id.to_lowercase())
            .collect();
        if candidates.is_empty() {
            return Err(ExecError::NoMatch(format!(
                "no machine of this farm (retired ones aside) matches the target (id: {}, tags: [{}])",
                target.id.as_deref().unwrap_or("any"),
                target.tags.join(", ")
            )));
        }
        let free = candidates.iter().any(|id| {
            s.duts
                .get(id)
                .is_some_and(|rt| rt.state == DutState::Idle && rt.current_job.is_none())
        });
        if !free && !metadata.wait {
            return Err(ExecError::Busy(format!(
                "all {} matching machine(s) are busy or still training; submit with --wait to queue",
                candidates.len()
            )));
        }
        let new = NewJob {
            job_id: job_id.clone(),
            kind: JobKind::User,
            target: target.clone(),
            template: template.to_string(),
            metadata_json: serde_json::to_string(&metadata)
                .map_err(|e| ExecError::Internal(e.to_string()))?,
            submitted_at: now(),
            deadline: job.deadline,
            wait: metadata.wait,
        };
        self.inner.store.insert_job(&new).map_err(|e| match e {
            farmgate_store::StoreError::DuplicateJob { .. } => {
                ExecError::Conflict(format!("a job with id {job_id} already exists"))
            }
            e => ExecError::from(e),
        })?;
        let _ = self.inner.store.append_events(
            &job_id,
            &[(EventKind::Ctrl, format!("Job {job_id} queued"))],
        );
        s.queue.push_back(QueuedJob {
            job_id: job_id.clone(),
            target,
            deadline: job.deadline,
        });
        drop(s);
        self.dispatch();
        let row = self.inner.store.get_job(&job_id)?;
        Ok(JobAccepted {
            job_id,
            dut_id: row.as_ref().and_then(|r| r.dut_id.clone()),
            state: row.map(|r| r.state).unwrap_or(JobState::Queued),
        })
    }

    /// `GET /api/v1/job/<id>`.
    pub fn job(&self, job_id: &str) -> Result<JobView, ExecError> {
        self.inner
            .store
            .get_job(job_id)?
            .map(|r| r.view())
            .ok_or_else(|| ExecError::NotFound(format!("no job {job_id}")))
    }

    /// The full row of a job (for the boot script and the API).
    pub fn job_row(&self, job_id: &str) -> Result<JobRow, ExecError> {
        self.inner
            .store
            .get_job(job_id)?
            .ok_or_else(|| ExecError::NotFound(format!("no job {job_id}")))
    }

    /// `GET /api/v1/jobs`.
    pub fn jobs(&self, state: Option<JobState>, limit: usize) -> Result<Vec<JobView>, ExecError> {
        Ok(self
            .inner
            .store
            .list_jobs(state, limit)?
            .iter()
            .map(|r| r.view())
            .collect())
    }

    /// Events of a job after `after` (`GET /api/v1/job/<id>/events`).
    pub fn events(
        &self,
        job_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, ExecError> {
        Ok(self.inner.store.events_after(job_id, after, limit)?)
    }

    /// Cancel a job, queued or running.
    pub fn cancel_job(&self, job_id: &str) -> Result<(), ExecError> {
        let row = self.job_row(job_id)?;
        match row.state {
            JobState::Finished => Err(ExecError::Conflict(format!("job {job_id} is already over"))),
            JobState::Queued => {
                let mut s = lock(&self.inner.sched);
                s.queue.retain(|j| j.job_id != job_id);
                self.inner.store.finish_job(
                    job_id,
                    JobStatus::Incomplete,
                    "job cancelled before it started",
                )?;
                Ok(())
            }
            JobState::Running => {
                self.request_cancel(job_id);
                Ok(())
            }
        }
    }

    /// `POST /api/v1/dut/<id>/cancel_job`.
    pub fn cancel_on_dut(&self, dut_id: &str) -> Result<Option<String>, ExecError> {
        let s = lock(&self.inner.sched);
        let rt = s
            .duts
            .get(&dut_id.to_lowercase())
            .ok_or_else(|| ExecError::NotFound(format!("no machine with id {dut_id}")))?;
        let job = rt.current_job.clone();
        drop(s);
        if let Some(job) = &job {
            self.request_cancel(job);
        }
        Ok(job)
    }

    fn view_of(&self, mars: &MarsDb, s: &Sched, id: &str, record: &DutRecord) -> DutView {
        let rt = s.duts.get(&id.to_lowercase());
        DutView {
            id: id.to_string(),
            full_name: self.full_name(mars, id),
            state: rt.map(|r| r.state).unwrap_or(DutState::Idle),
            current_job: rt.and_then(|r| r.current_job.clone()),
            training: rt.and_then(|r| r.training),
            state_since: rt.and_then(|r| r.state_since).map(|t| t.to_rfc3339()),
            unavailable: self.unavailable(record),
            record: record.clone(),
        }
    }

    /// `GET /api/v1/duts`.
    pub fn duts(&self) -> DutList {
        let mars = self.mars();
        let s = lock(&self.inner.sched);
        DutList {
            duts: mars
                .duts
                .iter()
                .map(|(id, r)| (id.clone(), self.view_of(&mars, &s, id, r)))
                .collect(),
        }
    }

    /// `GET /api/v1/dut/<id>`.
    pub fn dut(&self, id: &str) -> Result<DutView, ExecError> {
        let mars = self.mars();
        let s = lock(&self.inner.sched);
        let (key, record) = Self::record_of(&mars, id)
            .ok_or_else(|| ExecError::NotFound(format!("no machine with id {id}")))?;
        Ok(self.view_of(&mars, &s, &key, &record))
    }

    /// `PATCH /api/v1/dut/<id>`.
    pub fn patch_dut(&self, id: &str, patch: DutPatch) -> Result<DutView, ExecError> {
        if let Some(d) = patch.pdu_off_delay
            && !(d.is_finite() && (0.0..=farmgate_wire::MAX_PDU_OFF_DELAY).contains(&d))
        {
            return Err(ExecError::BadRequest(format!(
                "pdu_off_delay {d}: expected a number of seconds from 0 to {}",
                farmgate_wire::MAX_PDU_OFF_DELAY
            )));
        }
        self.edit_mars(|db| {
            let (key, _) = Self::record_of(db, id)
                .ok_or_else(|| ExecError::NotFound(format!("no machine with id {id}")))?;
            let r = db.duts.get_mut(&key).expect("found above");
            if let Some(v) = patch.comment {
                r.comment = Some(v);
            }
            if let Some(v) = patch.is_retired {
                r.is_retired = v;
            }
            if let Some(v) = patch.pdu_off_delay {
                r.pdu_off_delay = v;
            }
            if let Some(v) = patch.ready_for_service {
                r.ready_for_service = v;
            }
            if let Some(v) = patch.manual_tags {
                r.manual_tags = v;
            }
            if let Some(v) = patch.pdu {
                r.pdu = Some(v);
            }
            if let Some(v) = patch.pdu_port_id {
                r.pdu_port_id = Some(v);
            }
            Ok(())
        })?;
        self.settle_all();
        self.dut(id)
    }

    /// `DELETE /api/v1/dut/<id>`.
    pub fn delete_dut(&self, id: &str) -> Result<(), ExecError> {
        self.edit_mars(|db| {
            let (key, _) = Self::record_of(db, id)
                .ok_or_else(|| ExecError::NotFound(format!("no machine with id {id}")))?;
            db.duts.remove(&key);
            Ok(())
        })?;
        self.settle_all();
        Ok(())
    }

    /// `POST /api/v1/dut/` (registration by the machine itself). A new machine takes the
    /// PDU port of the discovery in progress; a known one gets its generated fields
    /// updated (seed 001: manual fields are never set here).
    pub fn register_dut(&self, reg: DutRegistration) -> Result<DutView, ExecError> {
        let id = reg.id.trim().to_lowercase();
        if !is_mac(&id) {
            return Err(ExecError::BadRequest(format!(
                "id {:?}: expected a MAC address like 52:54:00:11:22:0a",
                reg.id
            )));
        }
        let discovery = lock(&self.inner.sched).discovery.clone();
        let mut took_discovery = false;
        self.edit_mars(|db| {
            let key = Self::record_of(db, &id).map(|(k, _)| k);
            let r = match key {
                Some(k) => db.duts.get_mut(&k).expect("found"),
                None => {
                    let r = db.duts.entry(id.clone()).or_default();
                    r.pdu_off_delay = self.inner.config.default_pdu_off_delay;
                    r.first_seen = Some(now().format("%Y-%m-%d %H:%M:%S%.6f").to_string());
                    if let Some(d) = &discovery {
                        // A virtual machine is off the moment its QEMU is killed: no
                        // minimum off time (CI-tron users' complaint: 30 s on VMs).
                        if db.pdus.get(&d.pdu).is_some_and(|p| p.driver == "qemu") {
                            r.pdu_off_delay = 0.0;
                        }
                        r.pdu = Some(d.pdu.clone());
                        r.pdu_port_id = Some(d.port_id.clone());
                        took_discovery = true;
                    }
                    r
                }
            };
            if reg.base_name.is_some() {
                r.base_name = reg.base_name.clone();
            }
            if reg.ip_address.is_some() {
                r.ip_address = reg.ip_address.clone();
            }
            r.tags = reg.tags.clone();
            if reg.local_tty_device.is_some() {
                r.local_tty_device = reg.local_tty_device.clone();
            }
            Ok(())
        })?;
        if took_discovery {
            let mut s = lock(&self.inner.sched);
            if let Some(d) = s.discovery.take() {
                let _ = self.inner.store.kv_set("discovery", None);
                tracing::info!(dut_id = %id, pdu = %d.pdu, port_id = %d.port_id, "discovered machine registered");
                self.power_port_later(&d.pdu, &d.port_id, PortState::Off);
            }
        }
        self.settle_all();
        self.dut(&id)
    }

    /// `GET /api/v1/dut/discover`.
    pub fn discovery(&self) -> DiscoverState {
        let s = lock(&self.inner.sched);
        match &s.discovery {
            None => DiscoverState::default(),
            Some(d) => DiscoverState {
                pdu: Some(d.pdu.clone()),
                port_id: Some(d.port_id.clone()),
                start_date: Some(d.start.to_rfc3339()),
                deadline: Some(d.deadline.to_rfc3339()),
            },
        }
    }

    /// `POST /api/v1/dut/discover`: power the port on and wait for a machine to register.
    pub fn start_discovery(&self, req: DiscoverRequest) -> Result<DiscoverState, ExecError> {
        let mars = self.mars();
        let pdu = mars.pdus.get(&req.pdu).ok_or_else(|| {
            ExecError::NotFound(format!("no PDU named {} in the MaRS DB", req.pdu))
        })?;
        if pdu.reserved_port_ids.contains(&req.port_id) {
            return Err(ExecError::Conflict(format!(
                "port {} of PDU {} is reserved",
                req.port_id, req.pdu
            )));
        }
        if let Some((id, _)) = mars.duts.iter().find(|(_, r)| {
            r.pdu.as_deref() == Some(req.pdu.as_str())
                && r.pdu_port_id.as_deref() == Some(req.port_id.as_str())
        }) {
            return Err(ExecError::Conflict(format!(
                "port {} of PDU {} already powers machine {id}",
                req.port_id, req.pdu
            )));
        }
        let timeout = req.timeout.unwrap_or(DEFAULT_DISCOVERY_TIMEOUT);
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= 86_400.0) {
            return Err(ExecError::BadRequest(format!(
                "timeout {timeout}: expected a positive number of seconds, at most a day (86400)"
            )));
        }
        let start = now();
        let d = Discovery {
            pdu: req.pdu.clone(),
            port_id: req.port_id.clone(),
            start,
            deadline: start + chrono::Duration::milliseconds((timeout * 1000.0) as i64),
        };
        {
            let mut s = lock(&self.inner.sched);
            if s.discovery.is_some() {
                return Err(ExecError::Conflict(
                    "a discovery is already in progress; DELETE /api/v1/dut/discover first".into(),
                ));
            }
            s.discovery = Some(d);
        }
        let state = self.discovery();
        let _ = self
            .inner
            .store
            .kv_set("discovery", serde_json::to_string(&state).ok().as_deref());
        self.power_port_later(&req.pdu, &req.port_id, PortState::On);
        Ok(state)
    }

    /// `DELETE /api/v1/dut/discover`.
    pub fn stop_discovery(&self) {
        let d = lock(&self.inner.sched).discovery.take();
        let _ = self.inner.store.kv_set("discovery", None);
        if let Some(d) = d {
            self.power_port_later(&d.pdu, &d.port_id, PortState::Off);
        }
    }

    /// What is left of a port's minimum off time (the `pdu_off_delay` of the machine on
    /// it, or the default) since it was last switched off: a port is never switched on
    /// again before.
    fn min_off_wait(&self, pdu_name: &str, port_id: &str) -> Result<MinOffWait, ExecError> {
        let min_off = self
            .mars()
            .duts
            .values()
            .find(|r| {
                r.pdu.as_deref() == Some(pdu_name) && r.pdu_port_id.as_deref() == Some(port_id)
            })
            .map(|r| r.pdu_off_delay)
            .unwrap_or(farmgate_wire::DEFAULT_PDU_OFF_DELAY);
        let remaining = match self.inner.store.last_port_shutdown(pdu_name, port_id)? {
            Some(off_at) => {
                let off_for = (now() - off_at).to_std().unwrap_or_default();
                Duration::try_from_secs_f64(min_off.clamp(0.0, farmgate_wire::MAX_PDU_OFF_DELAY))
                    .unwrap_or_default()
                    .saturating_sub(off_for)
            }
            None => Duration::ZERO,
        };
        Ok(MinOffWait {
            pdu: pdu_name.to_string(),
            port: port_id.to_string(),
            remaining,
        })
    }

    fn power_port_later(&self, pdu_name: &str, port_id: &str, state: PortState) {
        self.power_port_later_unless_busy(pdu_name, port_id, state, None);
    }

    /// Switches a port in the background, through the power layer, after the minimum
    /// off time for an "on". Dropped when a newer request for the port came meanwhile,
    /// or, with `dut`, when that DUT has a job by then (its runner owns the power).
    fn power_port_later_unless_busy(
        &self,
        pdu_name: &str,
        port_id: &str,
        state: PortState,
        dut: Option<&str>,
    ) {
        let pdu = match self.pdu_handle(pdu_name) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let (key, ticket) = self.new_power_request(pdu_name, port_id);
        let port_id = port_id.to_string();
        let wait = match state {
            PortState::On => self.min_off_wait(pdu.name(), &port_id).ok(),
            _ => None,
        };
        let me = self.clone();
        let dut = dut.map(str::to_lowercase);
        tokio::spawn(async move {
            if let Some(w) = wait {
                w.sleep().await;
            }
            if lock(&me.inner.power_requests).get(&key) != Some(&ticket) {
                tracing::debug!(pdu = %pdu.name(), port = %port_id, %state, "power request superseded by a newer one");
                return;
            }
            if let Some(d) = &dut
                && lock(&me.inner.sched)
                    .duts
                    .get(d)
                    .is_some_and(|rt| rt.current_job.is_some())
            {
                tracing::debug!(pdu = %pdu.name(), port = %port_id, "power-off skipped: the DUT has a new job");
                return;
            }
            match pdu.set(&port_id, state).await {
                Ok(()) => {
                    me.inner.pdus.note_state(pdu.name(), &port_id, state);
                    if state == PortState::Off {
                        let _ = me
                            .inner
                            .store
                            .record_port_shutdown(pdu.name(), &port_id, now());
                    }
                }
                Err(e) => {
                    tracing::error!("cannot switch {} port {port_id} {state}: {e}", pdu.name())
                }
            }
        });
    }

    /// Measures a job that is over (its gateway messages are read off the lock).
    fn observe_job_later(&self, row: &farmgate_store::JobRow) {
        let (me, row) = (self.clone(), row.clone());
        tokio::task::spawn_blocking(move || {
            let ctrl = me
                .inner
                .store
                .events_of_kind(&row.job_id, farmgate_wire::EventKind::Ctrl)
                .unwrap_or_default();
            lock(&me.inner.metrics).observe_job(&row, &ctrl);
        });
    }

    /// What `/metrics` shows of the executor: DUTs, queue, jobs, PDUs.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mars = self.mars();
        let (duts, queue_depth) = {
            let s = lock(&self.inner.sched);
            let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut unavailable = 0;
            for (id, rt) in &s.duts {
                *by_state.entry(rt.state.as_str()).or_default() += 1;
                if Self::record_of(&mars, id).is_some_and(|(_, r)| self.unavailable(&r).is_some()) {
                    unavailable += 1;
                }
            }
            ((by_state, unavailable), s.queue.len() as u64)
        };
        let oldest_queued = self
            .inner
            .store
            .queued_jobs()
            .ok()
            .and_then(|q| q.iter().map(|j| j.submitted_at).min())
            .map(|t| (now() - t).num_milliseconds().max(0) as f64 / 1000.0);
        let pdus = mars
            .pdus
            .keys()
            .filter_map(|name| Some((name.clone(), self.inner.pdus.status(name)?)))
            .collect();
        MetricsSnapshot {
            duts_by_state: duts
                .0
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            duts_unavailable: duts.1,
            queue_depth,
            oldest_queued_seconds: oldest_queued,
            job_counts: self.inner.store.job_counts().unwrap_or_default(),
            jobs: lock(&self.inner.metrics).clone(),
            pdus,
        }
    }

    /// Switches a DUT off whose job ended without its runner's teardown.
    fn power_off_dut_of(&self, dut_id: &str) {
        let mars = self.mars();
        if let Some((_, r)) = Self::record_of(&mars, dut_id)
            && let (Some(pdu), Some(port)) = (&r.pdu, &r.pdu_port_id)
        {
            self.power_port_later_unless_busy(pdu, port, PortState::Off, Some(dut_id));
        }
    }

    /// The power layer's handle on a PDU of the MaRS DB.
    fn pdu_handle(&self, name: &str) -> Result<farmgate_pdu::service::Pdu, ExecError> {
        if let Some(p) = self.inner.pdus.pdu(name) {
            return Ok(p);
        }
        let mars = self.mars();
        let record = mars
            .pdus
            .get(name)
            .ok_or_else(|| ExecError::NotFound(format!("no PDU named {name}")))?;
        farmgate_pdu::service::Pdu::new(name, record, Some(&self.inner.config.pdu_locks_dir()))
            .map_err(|e| ExecError::Internal(e.to_string()))
    }

    /// `GET /api/v1/dut/<id>/quick_check`: whether a quick check is queued or running.
    pub fn quick_check_pending(&self, id: &str) -> Result<bool, ExecError> {
        let s = lock(&self.inner.sched);
        let rt = s
            .duts
            .get(&id.to_lowercase())
            .ok_or_else(|| ExecError::NotFound(format!("no machine with id {id}")))?;
        Ok(rt.state == DutState::QuickCheck)
    }

    /// `POST /api/v1/dut/<id>/quick_check`: queue a quick check (when the DUT is idle).
    pub fn queue_quick_check(&self, id: &str) -> Result<bool, ExecError> {
        let mut s = lock(&self.inner.sched);
        let key = id.to_lowercase();
        let rt = s
            .duts
            .get(&key)
            .ok_or_else(|| ExecError::NotFound(format!("no machine with id {id}")))?;
        match rt.state {
            DutState::QuickCheck => Ok(true),
            DutState::Idle if rt.current_job.is_none() => {
                self.set_state(&mut s, &key, DutState::QuickCheck);
                drop(s);
                self.inner.wake.notify_one();
                Ok(true)
            }
            other => Err(ExecError::Conflict(format!(
                "machine {id} is {other}; a quick check can be queued only when it is IDLE"
            ))),
        }
    }

    /// A DHCP request from a DUT on the private network, from `client`. For a machine
    /// running a job it is written in the job's log: a request from the firmware or
    /// iPXE is where the firmware boot is known complete.
    pub fn note_dhcp_request(
        &self,
        mac: &str,
        client: DhcpClient,
        address: Option<std::net::Ipv4Addr>,
    ) {
        let id = mac.to_lowercase();
        let current = lock(&self.inner.sched)
            .duts
            .get(&id)
            .and_then(|rt| rt.current_job.clone());
        let addr = address
            .map(|a| format!(" (address {a})"))
            .unwrap_or_default();
        tracing::debug!(machine = %id, ?client, ?address, "DHCP request");
        if let Some(job_id) = current {
            let text = match client {
                DhcpClient::Os => format!("DHCP request from the DUT's OS{addr}"),
                DhcpClient::Firmware => {
                    format!("firmware boot complete: DHCP request from firmware{addr}")
                }
                DhcpClient::Ipxe => format!("firmware boot complete: DHCP request from iPXE{addr}"),
            };
            if let Err(e) = self
                .inner
                .store
                .append_events(&job_id, &[(EventKind::Ctrl, text)])
            {
                tracing::debug!(job_id, "cannot log the DHCP request: {e}");
            }
        }
    }

    /// A file of the running job's `deployment.storage.http` (`tftp` false) or
    /// `storage.tftp` (`tftp` true) for machine `mac`, for its current boot.
    pub fn storage_file(
        &self,
        mac: &str,
        tftp: bool,
        path: &str,
    ) -> Result<crate::storage::StorageContent, ExecError> {
        let id = mac.to_lowercase();
        let job_id = lock(&self.inner.sched)
            .duts
            .get(&id)
            .and_then(|rt| rt.current_job.clone())
            .ok_or_else(|| {
                ExecError::NotFound(format!("machine {id} has no job running: no storage"))
            })?;
        let row = self.job_row(&job_id)?;
        let rendered = row
            .rendered
            .as_ref()
            .ok_or_else(|| ExecError::NotFound(format!("job {job_id} has not started")))?;
        let job = farmgate_job::parse(rendered)
            .map_err(|e| ExecError::Internal(format!("job {job_id}: {e}")))?;
        let step = job.deployment.for_boot(row.boot_index.saturating_sub(1));
        let files = if tftp {
            &step.storage.tftp
        } else {
            &step.storage.http
        };
        crate::storage::find(files, path)
            .map_err(|e| ExecError::NotFound(format!("job {job_id} on {id}: {e}")))
    }

    /// The iPXE script a DUT gets when it netboots (`/api/v1/dut/<id>/boot.ipxe`).
    ///
    /// `arch` and `platform` are what iPXE reports (`${buildarch}`: `x86_64`, `i386`,
    /// `arm64`, `arm32`; `${platform}`: `pcbios`, `efi`); they select the most specific
    /// `BOOTS_DEFAULT_*` variable for machines that boot the default configuration.
    /// Values made of anything but letters, digits and `_` are ignored.
    pub fn boot_script(
        &self,
        mac: &str,
        arch: Option<&str>,
        platform: Option<&str>,
    ) -> Result<String, ExecError> {
        let id = mac.to_lowercase();
        let word = |v: Option<&str>| {
            v.filter(|v| {
                !v.is_empty()
                    && v.len() <= 16
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
            .map(str::to_string)
        };
        let (arch, platform) = (word(arch), word(platform));
        let (arch, platform) = (arch.as_deref(), platform.as_deref());
        let current = lock(&self.inner.sched)
            .duts
            .get(&id)
            .and_then(|rt| rt.current_job.clone());
        if let Some(job_id) = current {
            let row = self.job_row(&job_id)?;
            if let Some(rendered) = &row.rendered {
                let job = farmgate_job::parse(rendered)
                    .map_err(|e| ExecError::Internal(format!("job {job_id}: {e}")))?;
                let step = job.deployment.for_boot(row.boot_index.saturating_sub(1));
                return crate::bootscript::render(&id, &job_id, row.boot_index, &step)
                    .map_err(ExecError::BadRequest);
            }
        }
        let known = Self::record_of(&self.mars(), &id).is_some();
        let discovering = lock(&self.inner.sched).discovery.is_some();
        if !known || discovering {
            let c = &self.inner.config;
            let kernel = c
                .boot_default("KERNEL", Some("IPXE"), arch, platform)
                .unwrap_or_default();
            let initrd = c.boot_default("INITRD", Some("IPXE"), arch, platform);
            let cmdline = c
                .boot_default("CMDLINE", Some("IPXE"), arch, platform)
                .unwrap_or_default();
            return Ok(crate::bootscript::render_default(
                &id,
                &kernel,
                initrd.as_deref(),
                &cmdline,
            ));
        }
        Err(ExecError::NotFound(format!(
            "machine {id} has no job running: nothing to boot"
        )))
    }

    // ----- PDUs ---------------------------------------------------------------------

    async fn pdu_view(&self, mars: &MarsDb, name: &str) -> Result<PduView, ExecError> {
        let record = mars
            .pdus
            .get(name)
            .ok_or_else(|| ExecError::NotFound(format!("no PDU named {name}")))?;
        let monitor = &self.inner.pdus;
        // A PDU just added (REST) is followed at once; the fresh MaRS DB, not the
        // caller's snapshot, so an older snapshot never reverts a newer record.
        monitor.sync(&self.mars().pdus);
        let mut status = monitor.status(name);
        if status
            .as_ref()
            .is_some_and(|s| s.last_ok.is_none() && s.failed_polls == 0)
        {
            // Asked before the first poll finished: read it now (bounded).
            let _ = tokio::time::timeout(Duration::from_secs(10), monitor.poll_now(name)).await;
            status = monitor.status(name);
        }
        let mut view = PduView {
            name: name.to_string(),
            driver: record.driver.clone(),
            ports: BTreeMap::new(),
            error: None,
            down: None,
            last_ok: None,
            counters: Default::default(),
        };
        let Some(st) = status else {
            view.error = Some(format!("PDU {name} is not polled yet"));
            return Ok(view);
        };
        let rfc3339 =
            |t: std::time::SystemTime| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339();
        view.error = st.error.clone();
        view.down = st.down_reason();
        view.last_ok = st.last_ok.map(rfc3339);
        view.counters = st.counters;
        for (port_id, port) in st.ports {
            let dut = mars.duts.iter().find(|(_, r)| {
                r.pdu.as_deref() == Some(name) && r.pdu_port_id.as_deref() == Some(&port_id)
            });
            let last = self
                .inner
                .store
                .last_port_shutdown(name, &port_id)
                .ok()
                .flatten();
            view.ports.insert(
                port_id.clone(),
                PortView {
                    port_id: port_id.clone(),
                    label: record
                        .port_labels
                        .get(&port_id)
                        .cloned()
                        .or_else(|| dut.map(|(id, _)| self.full_name(mars, id))),
                    state: port.state,
                    reserved: record.reserved_port_ids.contains(&port_id),
                    min_off_time: dut
                        .map(|(_, r)| r.pdu_off_delay)
                        .unwrap_or(farmgate_wire::DEFAULT_PDU_OFF_DELAY),
                    last_shutdown: last.map(|t| t.to_rfc3339()),
                    last_change: port.last_change.map(rfc3339),
                    measure: port.measure,
                    instant_power: port.measure.and_then(|m| m.power_w),
                    energy: port.measure.and_then(|m| m.energy_wh),
                    last_polled: st.last_ok.map(rfc3339),
                },
            );
        }
        Ok(view)
    }

    /// `POST /api/v1/pdus`: adds a PDU to the MaRS DB once the gateway has talked to it
    /// (its driver built from the configuration, its ports listed).
    pub async fn add_pdu(&self, reg: farmgate_wire::PduRegistration) -> Result<PduView, ExecError> {
        let name = reg.name.trim().to_string();
        if name.is_empty() || name.contains('/') {
            return Err(ExecError::BadRequest(format!(
                "PDU name {:?}: expected a non-empty name without '/'",
                reg.name
            )));
        }
        if self.mars().pdus.contains_key(&name) {
            return Err(ExecError::Conflict(format!(
                "a PDU named {name} exists already"
            )));
        }
        let record = farmgate_wire::PduRecord {
            driver: reg.driver,
            config: reg.config,
            reserved_port_ids: reg.reserved_port_ids,
            port_labels: Default::default(),
        };
        let pdu = farmgate_pdu::service::Pdu::new(
            &name,
            &record,
            Some(&self.inner.config.pdu_locks_dir()),
        )
        .map_err(|e| ExecError::BadRequest(e.to_string()))?;
        let ports = tokio::time::timeout(Duration::from_secs(30), pdu.ports())
            .await
            .map_err(|_| {
                ExecError::Device(format!("PDU {name} did not list its ports within 30 s"))
            })?
            .map_err(|e| ExecError::Device(format!("the PDU was not added: {e}")))?;
        tracing::info!(pdu = %name, driver = %record.driver, ports = ports.len(), "PDU added");
        let db = self.edit_mars(|db| {
            if db.pdus.contains_key(&name) {
                return Err(ExecError::Conflict(format!(
                    "a PDU named {name} exists already"
                )));
            }
            db.pdus.insert(name.clone(), record);
            Ok(())
        })?;
        self.pdu_view(&db, &name).await
    }

    /// `DELETE /api/v1/pdu/<name>`: removes a PDU no machine uses.
    pub fn remove_pdu(&self, name: &str) -> Result<(), ExecError> {
        self.edit_mars(|db| {
            if db.pdus.remove(name).is_none() {
                return Err(ExecError::NotFound(format!("no PDU named {name}")));
            }
            let users: Vec<&String> = db
                .duts
                .iter()
                .filter(|(_, r)| r.pdu.as_deref() == Some(name))
                .map(|(id, _)| id)
                .collect();
            if !users.is_empty() {
                return Err(ExecError::Conflict(format!(
                    "PDU {name} powers machines {users:?}: move or delete them first"
                )));
            }
            Ok(())
        })?;
        Ok(())
    }

    /// `GET /api/v1/pdus`.
    pub async fn pdus(&self) -> PduList {
        let mars = self.mars();
        let mut list = PduList::default();
        for name in mars.pdus.keys() {
            if let Ok(v) = self.pdu_view(&mars, name).await {
                list.pdus.insert(name.clone(), v);
            }
        }
        list
    }

    /// `GET /api/v1/pdu/<name>`.
    pub async fn pdu(&self, name: &str) -> Result<PduView, ExecError> {
        let mars = self.mars();
        self.pdu_view(&mars, name).await
    }

    /// `GET /api/v1/pdu/<name>/port/<id>`.
    pub async fn port(&self, name: &str, port_id: &str) -> Result<PortView, ExecError> {
        let view = self.pdu(name).await?;
        match view.ports.get(port_id) {
            Some(p) => Ok(p.clone()),
            None => Err(match (view.down, view.error) {
                (Some(down), _) => ExecError::Device(format!("PDU {name} {down}")),
                (None, Some(e)) if view.ports.is_empty() => ExecError::Device(e),
                _ => ExecError::NotFound(format!("PDU {name} has no port {port_id}")),
            }),
        }
    }

    /// `PATCH /api/v1/pdu/<name>/port/<id>`.
    pub async fn patch_port(
        &self,
        name: &str,
        port_id: &str,
        patch: PortPatch,
    ) -> Result<PortView, ExecError> {
        let mars = self.mars();
        if !mars.pdus.contains_key(name) {
            return Err(ExecError::NotFound(format!("no PDU named {name}")));
        }
        // Every field is checked before anything changes: a refused PATCH changes nothing.
        let mut patch = patch;
        if let Some(label) = &patch.label {
            let label = label.trim().to_string();
            if label.len() > 200 || label.chars().any(char::is_control) {
                return Err(ExecError::BadRequest(
                    "label: expected one line of at most 200 bytes, without control characters"
                        .into(),
                ));
            }
            patch.label = Some(label);
        }
        if let Some(d) = patch.min_off_time
            && !(d.is_finite() && (0.0..=farmgate_wire::MAX_PDU_OFF_DELAY).contains(&d))
        {
            return Err(ExecError::BadRequest(format!(
                "min_off_time {d}: expected a number of seconds from 0 to {}",
                farmgate_wire::MAX_PDU_OFF_DELAY
            )));
        }
        if patch.state == Some(PortState::Unknown) {
            return Err(ExecError::BadRequest("state: expected on or off".into()));
        }
        let dut = mars
            .duts
            .iter()
            .find(|(_, r)| {
                r.pdu.as_deref() == Some(name) && r.pdu_port_id.as_deref() == Some(port_id)
            })
            .map(|(id, _)| id.clone());
        if patch.min_off_time.is_some() && dut.is_none() {
            return Err(ExecError::Conflict(format!(
                "no machine on {name} port {port_id}: min_off_time belongs to a machine"
            )));
        }
        if let Some(reserved) = patch.reserved {
            self.edit_mars(|db| {
                let p = db
                    .pdus
                    .get_mut(name)
                    .ok_or_else(|| ExecError::NotFound(format!("no PDU named {name}")))?;
                p.reserved_port_ids.retain(|p| p != port_id);
                if reserved {
                    p.reserved_port_ids.push(port_id.to_string());
                }
                Ok(())
            })?;
        }
        if let Some(label) = patch.label {
            self.edit_mars(|db| {
                let p = db
                    .pdus
                    .get_mut(name)
                    .ok_or_else(|| ExecError::NotFound(format!("no PDU named {name}")))?;
                if label.is_empty() {
                    p.port_labels.remove(port_id);
                } else {
                    p.port_labels.insert(port_id.to_string(), label.clone());
                }
                Ok(())
            })?;
        }
        if let Some(min_off) = patch.min_off_time {
            let dut = dut.clone().ok_or_else(|| {
                ExecError::Conflict(format!(
                    "no machine on {name} port {port_id}: min_off_time belongs to a machine"
                ))
            })?;
            self.patch_dut(
                &dut,
                DutPatch {
                    pdu_off_delay: Some(min_off),
                    ..DutPatch::default()
                },
            )?;
        }
        if let Some(state) = patch.state {
            if state == PortState::Unknown {
                return Err(ExecError::BadRequest("state: expected on or off".into()));
            }
            self.port_switchable(name, port_id, dut.as_deref())?;
            let pdu = self.pdu_handle(name)?;
            if state == PortState::On {
                self.min_off_wait(name, port_id)?.sleep().await;
                // Still free after the wait? A job or a reservation may have come.
                self.port_switchable(name, port_id, dut.as_deref())?;
            }
            // Newer than any background request of the daemon for this port.
            self.new_power_request(name, port_id);
            pdu.set(port_id, state)
                .await
                .map_err(|e| ExecError::Device(e.to_string()))?;
            self.inner.pdus.note_state(name, port_id, state);
            if state == PortState::Off {
                let _ = self.inner.store.record_port_shutdown(name, port_id, now());
            }
        }
        self.port(name, port_id).await
    }

    /// Registers a switch request for a port: its key and ticket. A background request
    /// whose ticket is no longer the latest when it is due is dropped.
    fn new_power_request(&self, pdu: &str, port: &str) -> ((String, String), u64) {
        let key = (pdu.to_string(), port.to_string());
        let mut reqs = lock(&self.inner.power_requests);
        let n = reqs.entry(key.clone()).or_insert(0);
        *n += 1;
        (key, *n)
    }

    /// Whether an admin may switch a port now: not reserved, no job on its machine.
    fn port_switchable(
        &self,
        name: &str,
        port_id: &str,
        dut: Option<&str>,
    ) -> Result<(), ExecError> {
        if self.port_reserved(name, port_id) {
            return Err(ExecError::Conflict(format!(
                "port {port_id} of PDU {name} is reserved; un-reserve it first"
            )));
        }
        if let Some(dut) = dut {
            let busy = lock(&self.inner.sched)
                .duts
                .get(&dut.to_lowercase())
                .is_some_and(|rt| rt.current_job.is_some());
            if busy {
                return Err(ExecError::Conflict(format!(
                    "machine {dut} on port {port_id} is running a job; cancel it first"
                )));
            }
        }
        Ok(())
    }

    /// `GET /api/v1/full-state`.
    pub async fn full_state(&self) -> FullState {
        FullState {
            pdus: self.pdus().await.pdus,
            duts: self.duts().duts,
            discover: self.discovery(),
        }
    }

    /// Paths a test or the demo may want to show the user.
    pub fn runner_log_path(&self, job_id: &str) -> PathBuf {
        self.inner
            .config
            .runner_logs_dir()
            .join(format!("{job_id}.log"))
    }
}

/// What the executor knows for `/metrics` at one moment.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// DUTs per state.
    pub duts_by_state: BTreeMap<String, u64>,
    /// DUTs whose PDU does not answer.
    pub duts_unavailable: u64,
    /// User jobs waiting for a DUT.
    pub queue_depth: u64,
    /// How long the oldest of them has waited.
    pub oldest_queued_seconds: Option<f64>,
    /// Jobs in the store by kind, state and status.
    pub job_counts: Vec<farmgate_store::JobCount>,
    /// Histograms and counters of jobs that are over (since the daemon started).
    pub jobs: crate::metrics::ExecMetrics,
    /// Each PDU's last polled status.
    pub pdus: BTreeMap<String, farmgate_pdu::service::PduStatus>,
}

/// The rest of a port's minimum off time, to wait before switching it on.
struct MinOffWait {
    pdu: String,
    port: String,
    remaining: Duration,
}

impl MinOffWait {
    async fn sleep(self) {
        if !self.remaining.is_zero() {
            tracing::info!(
                pdu = %self.pdu,
                port = %self.port,
                remaining = ?self.remaining,
                "waiting for the port's minimum off time"
            );
            tokio::time::sleep(self.remaining).await;
        }
    }
}

/// A new job id: kind prefix, UTC time, random suffix (sortable, unique).
pub fn new_job_id(kind: JobKind) -> String {
    use rand::Rng;
    let prefix = match kind {
        JobKind::User => "job",
        JobKind::Training => "training",
        JobKind::QuickCheck => "quickcheck",
    };
    let suffix: u32 = rand::rng().random();
    format!("{prefix}-{}-{suffix:08x}", now().format("%Y%m%d%H%M%S%3f"))
}

/// `aa:bb:cc:dd:ee:ff`, hex digits in either case.
pub fn is_mac(id: &str) -> bool {
    let parts: Vec<&str> = id.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_bootloop_job_renders_with_and_without_initrd() {
        for initrd in ["", "http://gw/initrd"] {
            let ctx = RenderContext::new()
                .machine_id("52:54:00:11:22:01")
                .var("boots_default_kernel", "http://gw/kernel")
                .var("boots_default_initrd", initrd)
                .var(
                    "boots_default_cmdline",
                    "console=ttyS0 farmsim.script=\"print hi; poweroff\"",
                );
            let (text, job) = farmgate_job::render_and_parse(BUILTIN_BOOTLOOP_JOB, &ctx)
                .unwrap_or_else(|e| panic!("initrd {initrd:?}: {e}"));
            let step = job.deployment.for_boot(0);
            assert_eq!(
                step.initramfs.len(),
                usize::from(!initrd.is_empty()),
                "{text}"
            );
            assert!(
                step.cmdline
                    .contains("farmsim.script=\"print hi; poweroff\""),
                "{text}"
            );
            assert_eq!(job.target.id.as_deref(), Some("52:54:00:11:22:01"));
        }
    }

    #[test]
    fn job_ids_are_unique_and_tagged_by_kind() {
        let a = new_job_id(JobKind::User);
        let b = new_job_id(JobKind::User);
        assert_ne!(a, b);
        assert!(a.starts_with("job-"));
        assert!(new_job_id(JobKind::Training).starts_with("training-"));
    }

    #[test]
    fn mac_check() {
        assert!(is_mac("52:54:00:11:22:0a"));
        assert!(is_mac("DE:AD:BE:EF:CA:FE"));
        assert!(!is_mac("52:54:00:11:22"));
        assert!(!is_mac("52:54:00:11:22:0g"));
        assert!(!is_mac("../../etc/passwd"));
    }
}
