//! The power layer every switch and read goes through: [`Pdu`] serializes the access to
//! one PDU (also across processes: the gateway and its job runners), retries failures
//! with backoff, re-creates a failing driver and counts what happened; [`PduMonitor`]
//! polls every PDU of the MaRS DB (about once a second), keeps the last state of each
//! port with the time it changed and what the PDU measures, and says which PDUs do not
//! answer, so the REST API answers at once and the scheduler leaves their DUTs alone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use farmgate_wire::{PduCounters, PduRecord, PortState};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::{PduDriver, PortMeasure, PowerError, driver_for};

/// Tries of one operation before its error is reported (the first one included).
const TRIES: u32 = 3;
/// Wait before the second try; doubled at each further try.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// How long a switched port may take to read back in its new state.
pub const READBACK_TIME: Duration = Duration::from_secs(2);
/// Consecutive failed polls after which a PDU counts as not answering.
pub const DOWN_AFTER_FAILED_POLLS: u32 = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors that a new try cannot fix: the configuration or the request is wrong.
fn is_permanent(e: &PowerError) -> bool {
    matches!(
        e,
        PowerError::UnknownDriver { .. }
            | PowerError::BadConfig { .. }
            | PowerError::BadPort { .. }
            | PowerError::BadState { .. }
    )
}

/// One PDU behind the power layer. Cheap to clone.
#[derive(Clone)]
pub struct Pdu {
    inner: Arc<PduInner>,
}

struct PduInner {
    name: String,
    record: PduRecord,
    driver: tokio::sync::Mutex<Box<dyn PduDriver>>,
    lock_file: Option<PathBuf>,
    counters: Mutex<PduCounters>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("name", &self.inner.name)
            .field("driver", &self.inner.record.driver)
            .finish()
    }
}

/// The lock file of PDU `name` in `dir` (the name is hex-encoded: any name is a safe
/// file name).
fn lock_path(dir: &Path, name: &str) -> PathBuf {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("pdu-{hex}.lock"))
}

impl Pdu {
    /// The PDU `name` of the MaRS DB. With `lock_dir`, every operation holds an exclusive
    /// `flock` on a file there for its duration, so the processes sharing that directory
    /// (the gateway and its job runners) never talk to the PDU at the same time.
    pub fn new(name: &str, record: &PduRecord, lock_dir: Option<&Path>) -> Result<Pdu, PowerError> {
        let driver = driver_for(name, record)?;
        if let Some(dir) = lock_dir {
            std::fs::create_dir_all(dir).map_err(|source| PowerError::Io {
                pdu: name.to_string(),
                addr: dir.display().to_string(),
                action: "create the PDU lock directory".into(),
                stage: "mkdir",
                source,
            })?;
        }
        Ok(Pdu {
            inner: Arc::new(PduInner {
                name: name.to_string(),
                record: record.clone(),
                driver: tokio::sync::Mutex::new(driver),
                lock_file: lock_dir.map(|d| lock_path(d, name)),
                counters: Mutex::new(PduCounters::default()),
            }),
        })
    }

    /// The PDU's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The MaRS record it was built from.
    pub fn record(&self) -> &PduRecord {
        &self.inner.record
    }

    /// What happened on this PDU so far.
    pub fn counters(&self) -> PduCounters {
        *lock(&self.inner.counters)
    }

    /// Takes the cross-process lock (blocking, so on the blocking pool).
    async fn cross_process_lock(
        &self,
    ) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, PowerError> {
        let Some(path) = self.inner.lock_file.clone() else {
            return Ok(None);
        };
        let pdu = self.inner.name.clone();
        let shown = path_shown(&path);
        let io = move |stage: &'static str, source: std::io::Error| PowerError::Io {
            pdu: pdu.clone(),
            addr: shown.clone(),
            action: "lock the PDU for this process".into(),
            stage,
            source,
        };
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(|e| io("open", e))?;
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map(Some)
                .map_err(|(_, errno)| io("flock", std::io::Error::from(errno)))
        })
        .await
        .map_err(|e| PowerError::Io {
            pdu: self.inner.name.clone(),
            addr: path_shown(&path),
            action: "lock the PDU for this process".into(),
            stage: "join",
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Runs `op` on the driver, serialized, with up to `tries` tries, backoff and a new
    /// driver after a failure. Counts retries and re-initializations, not results: the
    /// callers count those once per operation.
    async fn run(&self, op: Op<'_>, tries: u32) -> Result<Out, PowerError> {
        let mut backoff = FIRST_BACKOFF;
        let mut tried = 0;
        loop {
            tried += 1;
            let result = {
                let mut driver = self.inner.driver.lock().await;
                match self.cross_process_lock().await {
                    Err(e) => Err(e),
                    Ok(_flock) => {
                        let r = op.call(driver.as_ref()).await;
                        if r.as_ref().is_err_and(|e| !is_permanent(e))
                            && let Ok(fresh) = driver_for(&self.inner.name, &self.inner.record)
                        {
                            // A driver that failed may hold a broken connection or session.
                            *driver = fresh;
                            lock(&self.inner.counters).reinits += 1;
                        }
                        r
                    }
                }
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if is_permanent(&e) || tried >= tries => return Err(e),
                Err(e) => {
                    tracing::debug!(pdu = %self.inner.name, "trying again after: {e}");
                    lock(&self.inner.counters).retries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    fn count_read<T>(&self, r: &Result<T, PowerError>) {
        let mut c = lock(&self.inner.counters);
        if r.is_ok() {
            c.reads_ok += 1;
        } else {
            c.reads_failed += 1;
        }
    }

    /// The PDU's port ids.
    pub async fn ports(&self) -> Result<Vec<String>, PowerError> {
        let r = self.run(Op::Ports, TRIES).await.map(|o| match o {
            Out::Ports(p) => p,
            _ => Vec::new(),
        });
        self.count_read(&r);
        r
    }

    /// A port's state, read from the PDU.
    pub async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        let r = self.read_state(port_id).await;
        self.count_read(&r);
        r
    }

    async fn read_state(&self, port_id: &str) -> Result<PortState, PowerError> {
        self.run(Op::Get(port_id), TRIES).await.map(|o| match o {
            Out::State(s) => s,
            _ => PortState::Unknown,
        })
    }

    /// Switches a port; returns once the port reads back in that state (for about
    /// [`READBACK_TIME`]; a driver that cannot read a state, `Unknown`, is trusted).
    pub async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        let r = self.switch(port_id, state).await;
        let mut c = lock(&self.inner.counters);
        if r.is_ok() {
            c.switches_ok += 1;
        } else {
            c.switches_failed += 1;
        }
        r
    }

    async fn switch(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        self.run(Op::Set(port_id, state), TRIES).await?;
        let deadline = tokio::time::Instant::now() + READBACK_TIME;
        loop {
            let seen = self.read_state(port_id).await?;
            if seen == state || seen == PortState::Unknown {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PowerError::Refused {
                    pdu: self.inner.name.clone(),
                    addr: format!("driver {}", self.inner.record.driver),
                    action: format!("switch port {port_id} {state}"),
                    reason: format!(
                        "the command succeeded but the port still reads {seen} after {READBACK_TIME:?}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the PDU measures on a port, if it can. Tried once: a device that cannot
    /// measure a port is still switching it fine, and must not slow the polls.
    pub async fn measure(&self, port_id: &str) -> Result<Option<PortMeasure>, PowerError> {
        self.run(Op::Measure(port_id), 1).await.map(|o| match o {
            Out::Measure(m) => m,
            _ => None,
        })
    }
}

/// One driver operation.
#[derive(Clone, Copy)]
enum Op<'a> {
    Ports,
    Get(&'a str),
    Set(&'a str, PortState),
    Measure(&'a str),
}

/// Its result.
enum Out {
    Ports(Vec<String>),
    State(PortState),
    Done,
    Measure(Option<PortMeasure>),
}

impl Op<'_> {
    async fn call(&self, d: &dyn PduDriver) -> Result<Out, PowerError> {
        Ok(match *self {
            Op::Ports => Out::Ports(d.ports().await?),
            Op::Get(p) => Out::State(d.get(p).await?),
            Op::Set(p, s) => {
                d.set(p, s).await?;
                Out::Done
            }
            Op::Measure(p) => Out::Measure(d.measure(p).await?),
        })
    }
}

/// The drivers are used through [`Pdu`] wherever a `&dyn PduDriver` is expected (the
/// power-cycle helpers, the job runner).
#[async_trait::async_trait]
impl PduDriver for Pdu {
    fn driver_name(&self) -> &str {
        &self.inner.record.driver
    }
    async fn ports(&self) -> Result<Vec<String>, PowerError> {
        Pdu::ports(self).await
    }
    async fn get(&self, port_id: &str) -> Result<PortState, PowerError> {
        Pdu::get(self, port_id).await
    }
    async fn set(&self, port_id: &str, state: PortState) -> Result<(), PowerError> {
        Pdu::set(self, port_id, state).await
    }
    async fn measure(&self, port_id: &str) -> Result<Option<PortMeasure>, PowerError> {
        Pdu::measure(self, port_id).await
    }
}

fn path_shown(p: &Path) -> String {
    p.display().to_string()
}

/// One port as last polled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortStatus {
    /// The state read back.
    pub state: PortState,
    /// When the state last changed (as seen by polls and switches of this process).
    pub last_change: Option<SystemTime>,
    /// What the PDU measured, when it can.
    pub measure: Option<PortMeasure>,
}

/// One PDU as last polled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PduStatus {
    /// Ports by id (empty until a poll succeeded).
    pub ports: BTreeMap<String, PortStatus>,
    /// The error of the last poll, if it failed.
    pub error: Option<String>,
    /// Failed polls in a row.
    pub failed_polls: u32,
    /// Since when polls fail (first failure of the current run).
    pub failing_since: Option<SystemTime>,
    /// Last successful poll.
    pub last_ok: Option<SystemTime>,
    /// Counters of the PDU's operations.
    pub counters: PduCounters,
}

impl PduStatus {
    fn new() -> Self {
        PduStatus {
            ports: BTreeMap::new(),
            error: None,
            failed_polls: 0,
            failing_since: None,
            last_ok: None,
            counters: PduCounters::default(),
        }
    }

    /// Why the PDU counts as not answering (after [`DOWN_AFTER_FAILED_POLLS`] failed polls
    /// in a row), with the last error and since when; `None` when it answers.
    pub fn down_reason(&self) -> Option<String> {
        if self.failed_polls < DOWN_AFTER_FAILED_POLLS {
            return None;
        }
        let since = self
            .failing_since
            .map(|t| {
                chrono::DateTime::<chrono::Utc>::from(t)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .unwrap_or_default();
        Some(format!(
            "does not answer since {since} ({} failed polls): {}",
            self.failed_polls,
            self.error.as_deref().unwrap_or("unknown error")
        ))
    }
}

struct Watched {
    /// What the poller was built from: a change of driver or config restarts it (labels
    /// and reserved ports do not).
    driver: String,
    config: BTreeMap<String, farmgate_wire::YamlValue>,
    /// `None` when the configuration is refused (the status says why).
    pdu: Option<Pdu>,
    task: Option<JoinHandle<()>>,
    /// Held during a poll, so an on-demand poll joins the one in progress.
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// Polls every PDU, keeps their last known state. Cheap to clone.
#[derive(Clone)]
pub struct PduMonitor {
    inner: Arc<MonitorInner>,
}

struct MonitorInner {
    interval: Duration,
    lock_dir: Option<PathBuf>,
    status: Mutex<HashMap<String, PduStatus>>,
    watched: Mutex<HashMap<String, Watched>>,
}

impl Drop for MonitorInner {
    fn drop(&mut self) {
        for (_, w) in lock(&self.watched).drain() {
            if let Some(t) = w.task {
                t.abort();
            }
        }
    }
}

impl PduMonitor {
    /// A monitor polling every `interval`; `lock_dir` as in [`Pdu::new`].
    pub fn new(interval: Duration, lock_dir: Option<PathBuf>) -> PduMonitor {
        PduMonitor {
            inner: Arc::new(MonitorInner {
                interval,
                lock_dir,
                status: Mutex::new(HashMap::new()),
                watched: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Follows the PDUs of the MaRS DB: starts polling new ones, restarts those whose
    /// driver or configuration changed, stops those that are gone. Must run inside a
    /// tokio runtime.
    pub fn sync(&self, pdus: &BTreeMap<String, PduRecord>) {
        let mut watched = lock(&self.inner.watched);
        watched.retain(|name, w| {
            let keep = pdus
                .get(name)
                .is_some_and(|r| r.driver == w.driver && r.config == w.config);
            if !keep {
                if let Some(t) = &w.task {
                    t.abort();
                }
                lock(&self.inner.status).remove(name);
            }
            keep
        });
        lock(&self.inner.status)
            .retain(|name, _| watched.contains_key(name) || pdus.contains_key(name));
        for (name, record) in pdus {
            if watched.contains_key(name) {
                continue;
            }
            let gate = Arc::new(tokio::sync::Mutex::new(()));
            let (pdu, task) = match Pdu::new(name, record, self.inner.lock_dir.as_deref()) {
                Ok(pdu) => {
                    lock(&self.inner.status).insert(name.clone(), PduStatus::new());
                    let me = Arc::downgrade(&self.inner);
                    let task = tokio::spawn(poll_loop(me, pdu.clone(), gate.clone()));
                    (Some(pdu), Some(task))
                }
                Err(e) => {
                    tracing::warn!(pdu = %name, "PDU not polled: {e}");
                    let mut st = PduStatus::new();
                    st.error = Some(e.to_string());
                    st.failed_polls = DOWN_AFTER_FAILED_POLLS;
                    st.failing_since = Some(SystemTime::now());
                    lock(&self.inner.status).insert(name.clone(), st);
                    (None, None)
                }
            };
            watched.insert(
                name.clone(),
                Watched {
                    driver: record.driver.clone(),
                    config: record.config.clone(),
                    pdu,
                    task,
                    gate,
                },
            );
        }
    }

    /// The power layer's handle on PDU `name`, when the monitor follows it.
    pub fn pdu(&self, name: &str) -> Option<Pdu> {
        lock(&self.inner.watched).get(name)?.pdu.clone()
    }

    /// The last known status of PDU `name`.
    pub fn status(&self, name: &str) -> Option<PduStatus> {
        let mut st = lock(&self.inner.status).get(name).cloned()?;
        if let Some(p) = self.pdu(name) {
            st.counters = p.counters();
        }
        Some(st)
    }

    /// Why PDU `name` counts as not answering, if it does.
    pub fn down_reason(&self, name: &str) -> Option<String> {
        lock(&self.inner.status).get(name)?.down_reason()
    }

    /// Records a state seen by a switch of this process (so the next answer does not
    /// wait for a poll).
    pub fn note_state(&self, name: &str, port_id: &str, state: PortState) {
        if let Some(st) = lock(&self.inner.status).get_mut(name) {
            update_port(st, port_id, state);
        }
    }

    /// Makes sure PDU `name` was polled once (the REST API's first answer): joins the
    /// poll in progress, or polls when none was ever tried. Never stacks polls.
    pub async fn poll_now(&self, name: &str) {
        let tried = |m: &Self| {
            lock(&m.inner.status)
                .get(name)
                .is_none_or(|s| s.last_ok.is_some() || s.failed_polls > 0)
        };
        if tried(self) {
            return;
        }
        let Some((pdu, gate)) = lock(&self.inner.watched)
            .get(name)
            .and_then(|w| Some((w.pdu.clone()?, w.gate.clone())))
        else {
            return;
        };
        let _polling = gate.lock().await;
        if !tried(self) {
            poll_once(&self.inner, &pdu).await;
        }
    }
}

fn update_port(st: &mut PduStatus, port_id: &str, state: PortState) {
    let now = SystemTime::now();
    match st.ports.get_mut(port_id) {
        Some(p) if p.state != state => {
            p.state = state;
            p.last_change = Some(now);
        }
        Some(_) => {}
        None => {
            st.ports.insert(
                port_id.to_string(),
                PortStatus {
                    state,
                    last_change: None,
                    measure: None,
                },
            );
        }
    }
}

async fn poll_once(inner: &MonitorInner, pdu: &Pdu) {
    let result: Result<Vec<(String, PortState, Option<PortMeasure>)>, PowerError> = async {
        let mut out = Vec::new();
        for port in pdu.ports().await? {
            let state = pdu.get(&port).await?;
            // A device that cannot measure one port is still switching it fine.
            let measure = pdu.measure(&port).await.ok().flatten();
            out.push((port, state, measure));
        }
        Ok(out)
    }
    .await;
    let mut all = lock(&inner.status);
    let Some(st) = all.get_mut(pdu.name()) else {
        return;
    };
    match result {
        Ok(ports) => {
            if st.failed_polls >= DOWN_AFTER_FAILED_POLLS {
                tracing::info!(pdu = %pdu.name(), "PDU answers again");
            }
            st.failed_polls = 0;
            st.failing_since = None;
            st.error = None;
            st.last_ok = Some(SystemTime::now());
            let ids: Vec<&String> = ports.iter().map(|(p, _, _)| p).collect();
            st.ports.retain(|k, _| ids.contains(&k));
            for (port, state, measure) in ports {
                update_port(st, &port, state);
                if let Some(p) = st.ports.get_mut(&port) {
                    p.measure = measure;
                }
            }
        }
        Err(e) => {
            st.failed_polls = st.failed_polls.saturating_add(1);
            st.failing_since.get_or_insert_with(SystemTime::now);
            st.error = Some(e.to_string());
            if st.failed_polls == DOWN_AFTER_FAILED_POLLS {
                tracing::warn!(pdu = %pdu.name(), "PDU does not answer: {e}");
            }
        }
    }
}

async fn poll_loop(me: std::sync::Weak<MonitorInner>, pdu: Pdu, gate: Arc<tokio::sync::Mutex<()>>) {
    loop {
        let Some(inner) = me.upgrade() else { return };
        let interval = inner.interval;
        {
            let _polling = gate.lock().await;
            poll_once(&inner, &pdu).await;
        }
        drop(inner);
        tokio::time::sleep(interval).await;
    }
}
