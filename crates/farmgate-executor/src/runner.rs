//! The job runner: one OS process per running job (`farmgate run-job`).
//!
//! It owns the DUT for the job's whole life: it holds the DUT's lock, power-cycles it
//! through the PDU layer, reads its console through SALAD, matches the console patterns,
//! runs the timeouts, watchdogs and retries of the job description, writes every event to
//! the database, and exits with the job status as its exit code. Because it is its own
//! process (in its own process group) and talks to the daemon only through the database
//! and SALAD, the daemon can be restarted, even killed, while jobs run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use farmgate_job::{JobDescription, LineMatcher, PatternHit, Timeout};
use farmgate_pdu::PduDriver;
use farmgate_store::Store;
use farmgate_wire::{EventKind, JobStatus, PortState};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::console_link::{ConsoleMsg, spawn_console_link};
use crate::spec::{RunnerSpec, try_lock_dut};

/// Key in the store's key-value table marking that a job found its DUT unfit for service.
pub fn unfit_key(job_id: &str) -> String {
    format!("job:{job_id}:unfit")
}

/// Buffered writer of job events: console lines come in bursts, one transaction per
/// burst keeps SQLite fast with many runners at once.
struct EventLog {
    store: Arc<dyn Store>,
    job_id: String,
    pending: Vec<(EventKind, String)>,
}

impl EventLog {
    fn push(&mut self, kind: EventKind, payload: impl Into<String>) {
        self.pending.push((kind, payload.into()));
    }

    fn ctrl(&mut self, text: impl Into<String>) {
        let text = text.into();
        tracing::info!(job_id = %self.job_id, "{text}");
        self.push(EventKind::Ctrl, text);
    }

    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        let store = self.store.clone();
        let job_id = self.job_id.clone();
        let result =
            tokio::task::spawn_blocking(move || store.append_events(&job_id, &batch)).await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(job_id = %self.job_id, "cannot save job events: {e}"),
            Err(e) => tracing::error!(job_id = %self.job_id, "event writer failed: {e}"),
        }
    }
}

/// One of the job's timers (seed 001 / CI-tron `timeouts`), with its retry budget.
#[derive(Debug, Clone)]
struct Timer {
    name: String,
    timeout: Timeout,
    retries_used: u32,
    deadline: Option<Instant>,
}

impl Timer {
    fn new(name: impl Into<String>, timeout: &Timeout) -> Timer {
        Timer {
            name: name.into(),
            timeout: timeout.clone(),
            retries_used: 0,
            deadline: None,
        }
    }

    fn arm(&mut self, now: Instant) {
        self.deadline = self.timeout.duration.map(|d| now + d);
    }

    fn disarm(&mut self) {
        self.deadline = None;
    }
}

/// How a boot cycle ended.
enum BootEnd {
    /// Reboot the DUT and go on with the job (a retry was used).
    Retry,
    /// The job is over with this status and reason.
    Over {
        status: Option<JobStatus>,
        reason: String,
    },
}

fn human(d: Option<Duration>) -> String {
    match d {
        None => "never".into(),
        Some(d) => {
            let secs = d.as_secs_f64();
            if secs >= 3600.0 {
                format!("{:.1} h", secs / 3600.0)
            } else if secs >= 60.0 {
                format!("{:.1} min", secs / 60.0)
            } else {
                format!("{secs:.1} s")
            }
        }
    }
}

/// Run the job `job_id` to its end; returns its status. Errors are for failures of the
/// runner itself (database unreachable, job row missing); everything about the job and
/// the DUT ends as a status with a reason.
pub async fn run_job(store: Arc<dyn Store>, job_id: &str) -> anyhow::Result<JobStatus> {
    // First of all: the daemon may cancel the job (SIGTERM) as soon as it started us.
    let cancel = CancellationToken::new();
    spawn_cancel_watchers(store.clone(), job_id.to_string(), cancel.clone());
    let row = {
        let store = store.clone();
        let id = job_id.to_string();
        tokio::task::spawn_blocking(move || store.get_job(&id))
            .await??
            .with_context(|| format!("job {job_id} is not in the database"))?
    };
    let spec_json = row
        .runner_spec_json
        .clone()
        .with_context(|| format!("job {job_id} was never assigned to a DUT"))?;
    let spec: RunnerSpec = serde_json::from_str(&spec_json)
        .with_context(|| format!("job {job_id} has an unreadable runner spec"))?;
    if let Some(status) = row.status {
        // Already over: a second runner started for a finished job has nothing to do.
        return Ok(status);
    }

    // The previous job's runner may still be exiting (it has written its result, the
    // DUT is already ours): give it a moment to release the DUT.
    let lock_deadline = Instant::now() + Duration::from_secs(30);
    let _lock = loop {
        let lock = try_lock_dut(&spec.locks_dir, &spec.dut_id)
            .with_context(|| format!("cannot open the lock of DUT {}", spec.dut_id))?;
        match lock {
            Some(lock) => break lock,
            None if Instant::now() < lock_deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => anyhow::bail!(
                "DUT {} is locked by another job runner; refusing to run job {job_id}",
                spec.dut_id
            ),
        }
    };
    {
        let store = store.clone();
        let id = job_id.to_string();
        let pid = std::process::id() as i32;
        tokio::task::spawn_blocking(move || store.set_runner_started(&id, pid)).await??;
    }

    let mut log = EventLog {
        store: store.clone(),
        job_id: job_id.to_string(),
        pending: Vec::new(),
    };
    let (status, reason, unfit) = match prepare(&spec, &row) {
        Err(why) => (JobStatus::SetupFail, why, false),
        Ok((job, driver)) => {
            log.ctrl(format!(
                "Job {job_id} runs on {} ({}), PDU {} port {}",
                spec.dut_name, spec.dut_id, spec.pdu_name, spec.port_id
            ));
            let run = JobRun {
                spec: &spec,
                job: &job,
                driver: driver.as_ref(),
                store: store.clone(),
                cancel: cancel.clone(),
            };
            let outcome = run.execute(&mut log).await;
            log.ctrl("Teardown: powering the DUT off");
            let off = tokio::time::timeout(
                job.timeouts
                    .infra_teardown
                    .duration
                    .unwrap_or(Duration::from_secs(60)),
                driver.set(&spec.port_id, PortState::Off),
            )
            .await;
            match off {
                Ok(Ok(())) => record_shutdown(&store, &spec).await,
                Ok(Err(e)) => log.ctrl(format!("Teardown: could not power the DUT off: {e}")),
                Err(_) => log.ctrl("Teardown: the PDU did not answer in time"),
            }
            outcome
        }
    };
    log.ctrl(format!("Job {job_id} is over: {status}: {reason}"));
    log.flush().await;
    let store2 = store.clone();
    let id = job_id.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if unfit {
            store2.kv_set(&unfit_key(&id), Some("1"))?;
        }
        store2.finish_job(&id, status, &reason)?;
        Ok(())
    })
    .await??;
    Ok(status)
}

fn prepare(
    spec: &RunnerSpec,
    row: &farmgate_store::JobRow,
) -> Result<(JobDescription, Box<dyn PduDriver>), String> {
    let rendered = row
        .rendered
        .as_deref()
        .ok_or_else(|| "the job was assigned without a rendered description".to_string())?;
    let mut job = farmgate_job::parse(rendered).map_err(|e| format!("job description: {e}"))?;
    if let Some(re) = &spec.default_unfit_regex {
        let re = regex::bytes::Regex::new(re)
            .map_err(|e| format!("farm-wide unfit pattern {re:?}: {e}"))?;
        job.console_patterns = job.console_patterns.with_default_unfit(Some(re));
    }
    // Through the power layer: serialized with the daemon's polls, retried, read back.
    let pdu =
        farmgate_pdu::service::Pdu::new(&spec.pdu_name, &spec.pdu, spec.pdu_locks_dir.as_deref())
            .map_err(|e| e.to_string())?;
    let driver: Box<dyn PduDriver> = Box::new(pdu);
    Ok((job, driver))
}

async fn record_shutdown(store: &Arc<dyn Store>, spec: &RunnerSpec) {
    let store = store.clone();
    let pdu = spec.pdu_name.clone();
    let port = spec.port_id.clone();
    let r = tokio::task::spawn_blocking(move || {
        store.record_port_shutdown(&pdu, &port, chrono::Utc::now())
    })
    .await;
    if let Ok(Err(e)) = r {
        tracing::warn!("cannot record the shutdown time of the port: {e}");
    }
}

/// Cancel on SIGTERM/SIGINT, or when the daemon marks the job cancelled in the database.
fn spawn_cancel_watchers(store: Arc<dyn Store>, job_id: String, cancel: CancellationToken) {
    let c = cancel.clone();
    let stop = crate::stop_signal();
    tokio::spawn(async move {
        stop.await;
        c.cancel();
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let store = store.clone();
            let id = job_id.clone();
            let requested = tokio::task::spawn_blocking(move || store.get_job(&id))
                .await
                .ok()
                .and_then(|r| r.ok())
                .flatten()
                .is_some_and(|row| row.cancel_requested);
            if requested {
                cancel.cancel();
                return;
            }
        }
    });
}

struct JobRun<'a> {
    spec: &'a RunnerSpec,
    job: &'a JobDescription,
    driver: &'a dyn PduDriver,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
}

impl JobRun<'_> {
    /// Boot cycles until the job is over; returns (status, reason, dut unfit).
    async fn execute(&self, log: &mut EventLog) -> (JobStatus, String, bool) {
        let t = &self.job.timeouts;
        let start = Instant::now();
        let overall_deadline = t.overall.duration.map(|d| start + d);
        let mut boot_cycle = Timer::new("boot_cycle", &t.boot_cycle);
        let mut first_activity = Timer::new("first_console_activity", &t.first_console_activity);
        let mut activity = Timer::new("console_activity", &t.console_activity);
        let mut watchdogs: BTreeMap<String, Timer> = t
            .watchdogs
            .iter()
            .map(|(name, to)| (name.clone(), Timer::new(format!("watchdog {name}"), to)))
            .collect();
        let mut matcher = LineMatcher::new(&self.job.console_patterns);
        let (console_tx, mut console_rx) = mpsc::channel::<ConsoleMsg>(1024);
        let (console_task, mut console_up) = spawn_console_link(
            self.spec.salad_url.clone(),
            self.spec.dut_id.clone(),
            console_tx,
            self.cancel.child_token(),
        );
        // Power on only once the console is relayed, so the first boot lines are not
        // lost; a console that cannot be reached within infra_setup ends the job as a
        // setup failure.
        // (The borrow `wait_for` returns must not outlive this statement: the link's
        // sender cannot publish while it is held.)
        let console_wait = t.infra_setup.duration.unwrap_or(Duration::from_secs(600));
        let connected = tokio::select! {
            r = tokio::time::timeout(console_wait, console_up.wait_for(|up| *up)) => matches!(r, Ok(Ok(_))),
            _ = self.cancel.cancelled() => {
                console_task.abort();
                return (JobStatus::Incomplete, "job cancelled while connecting to the DUT's console".into(), false);
            }
        };
        if !connected {
            console_task.abort();
            return (
                JobStatus::SetupFail,
                format!(
                    "the DUT's console was not relayed by SALAD within infra_setup ({}); the DUT was not powered on",
                    human(Some(console_wait))
                ),
                false,
            );
        }
        let mut boot_index: u32 = 0;
        let mut unfit = false;
        let mut setup_retries_used: u32 = 0;

        let outcome: (Option<JobStatus>, String) = 'job: loop {
            boot_index += 1;
            {
                let store = self.store.clone();
                let id = self.spec.job_id.clone();
                let bi = boot_index;
                let _ = tokio::task::spawn_blocking(move || store.set_boot_index(&id, bi)).await;
            }
            let min_off = Duration::try_from_secs_f64(
                self.spec
                    .dut
                    .pdu_off_delay
                    .clamp(0.0, farmgate_wire::MAX_PDU_OFF_DELAY),
            )
            .unwrap_or_default();
            log.ctrl(format!(
                "Boot {boot_index}: power cycling the DUT (off for at least {})",
                human(Some(min_off))
            ));
            log.flush().await;
            // infra_setup bounds each power cycle; expiring uses one of its retries.
            let powered = loop {
                let already_off_since = self.already_off_since().await;
                let cycle = async {
                    farmgate_pdu::power_off_for(
                        self.driver,
                        &self.spec.port_id,
                        min_off,
                        already_off_since,
                    )
                    .await?;
                    // Lines that arrived up to now were printed before the power cut:
                    // the user sees them, but they belong to the previous boot and are
                    // not matched (a DUT that rebooted by itself may have started a
                    // stale boot meanwhile).
                    while let Ok(msg) = console_rx.try_recv() {
                        match msg {
                            ConsoleMsg::Note(text) => log.ctrl(text),
                            ConsoleMsg::Line(line) => log.push(
                                EventKind::JobIo,
                                String::from_utf8_lossy(&line).into_owned(),
                            ),
                        }
                    }
                    self.driver.set(&self.spec.port_id, PortState::On).await
                };
                let bounded = async {
                    match t.infra_setup.duration {
                        Some(limit) => tokio::time::timeout(limit, cycle).await.ok(),
                        None => Some(cycle.await),
                    }
                };
                let attempt = tokio::select! {
                    r = bounded => r,
                    _ = self.cancel.cancelled() => break 'job (None, "job cancelled while powering the DUT".into()),
                };
                match attempt {
                    Some(result) => break result,
                    None if setup_retries_used < t.infra_setup.retries => {
                        setup_retries_used += 1;
                        log.ctrl(format!(
                            "infra_setup timeout of {} expired while power cycling the DUT: trying again (retry {} of {})",
                            human(t.infra_setup.duration),
                            setup_retries_used,
                            t.infra_setup.retries
                        ));
                        log.flush().await;
                    }
                    None => {
                        break 'job (
                            Some(JobStatus::SetupFail),
                            format!(
                                "infra_setup timeout of {} expired while power cycling the DUT{}",
                                human(t.infra_setup.duration),
                                if t.infra_setup.retries == 0 {
                                    " (infra_setup has no retries)".to_string()
                                } else {
                                    format!(
                                        " and all {} retries of infra_setup are used",
                                        t.infra_setup.retries
                                    )
                                }
                            ),
                        );
                    }
                }
            };
            if let Err(e) = powered {
                break 'job (
                    Some(JobStatus::SetupFail),
                    format!("power cycle failed: {e}"),
                );
            }
            log.ctrl(format!(
                "Boot {boot_index}: DUT powered on, waiting for the console (first activity within {}, boot cycle {})",
                human(first_activity.timeout.duration),
                human(boot_cycle.timeout.duration)
            ));
            let now = Instant::now();
            boot_cycle.arm(now);
            first_activity.arm(now);
            activity.disarm();
            for w in watchdogs.values_mut() {
                w.disarm();
            }
            let mut flush_tick = tokio::time::interval(Duration::from_millis(100));

            let end: BootEnd = loop {
                let next = [
                    overall_deadline,
                    boot_cycle.deadline,
                    first_activity.deadline,
                    activity.deadline,
                ]
                .into_iter()
                .chain(watchdogs.values().map(|w| w.deadline))
                .flatten()
                .min();
                let sleep = async {
                    match next {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => {
                        break BootEnd::Over { status: None, reason: "job cancelled".into() };
                    }
                    msg = console_rx.recv() => {
                        let Some(msg) = msg else {
                            break BootEnd::Over { status: Some(JobStatus::Incomplete), reason: "console link closed".into() };
                        };
                        match msg {
                            ConsoleMsg::Note(text) => log.ctrl(text),
                            ConsoleMsg::Line(line) => {
                                let now = Instant::now();
                                first_activity.disarm();
                                activity.arm(now);
                                log.push(EventKind::JobIo, String::from_utf8_lossy(&line).into_owned());
                                let mut end = None;
                                for hit in matcher.feed(&line) {
                                    match hit {
                                        PatternHit::SessionEnd => {
                                            end = Some(BootEnd::Over { status: None, reason: "session_end pattern matched".into() });
                                        }
                                        PatternHit::MachineUnfit => {
                                            unfit = true;
                                            end = Some(BootEnd::Over {
                                                status: Some(JobStatus::Incomplete),
                                                reason: format!("the DUT printed a line matching machine_unfit_for_service ({}); it goes back to training", String::from_utf8_lossy(&line).trim()),
                                            });
                                        }
                                        PatternHit::SessionReboot => {
                                            log.ctrl("session_reboot pattern matched");
                                            end = Some(self.use_retry(&mut boot_cycle, log, "session_reboot matched"));
                                        }
                                        PatternHit::JobSuccess => log.ctrl("job_success pattern matched"),
                                        PatternHit::JobWarn => log.ctrl("job_warn pattern matched"),
                                        PatternHit::WatchdogStart(name) => {
                                            if let Some(w) = watchdogs.get_mut(&name) {
                                                w.arm(now);
                                                log.ctrl(format!("watchdog {name} started ({})", human(w.timeout.duration)));
                                            }
                                        }
                                        PatternHit::WatchdogReset(name) => {
                                            if let Some(w) = watchdogs.get_mut(&name)
                                                && w.deadline.is_some()
                                            {
                                                w.arm(now);
                                            }
                                        }
                                        PatternHit::WatchdogStop(name) => {
                                            if let Some(w) = watchdogs.get_mut(&name) {
                                                w.disarm();
                                                log.ctrl(format!("watchdog {name} stopped"));
                                            }
                                        }
                                    }
                                    if end.is_some() {
                                        break;
                                    }
                                }
                                if let Some(end) = end {
                                    break end;
                                }
                                if log.pending.len() >= 64 {
                                    log.flush().await;
                                }
                            }
                        }
                    }
                    _ = sleep => {
                        let now = Instant::now();
                        if overall_deadline.is_some_and(|d| d <= now) {
                            break BootEnd::Over {
                                status: Some(JobStatus::Incomplete),
                                reason: format!("overall timeout of {} expired", human(t.overall.duration)),
                            };
                        }
                        let expired: Option<&mut Timer> = if boot_cycle.deadline.is_some_and(|d| d <= now) {
                            Some(&mut boot_cycle)
                        } else if first_activity.deadline.is_some_and(|d| d <= now) {
                            Some(&mut first_activity)
                        } else if activity.deadline.is_some_and(|d| d <= now) {
                            Some(&mut activity)
                        } else {
                            watchdogs.values_mut().find(|w| w.deadline.is_some_and(|d| d <= now))
                        };
                        if let Some(timer) = expired {
                            timer.disarm();
                            let what = format!("{} timeout of {} expired", timer.name, human(timer.timeout.duration));
                            break self.use_retry(timer, log, &what);
                        }
                    }
                    _ = flush_tick.tick() => log.flush().await,
                }
            };
            log.flush().await;
            match end {
                BootEnd::Retry => continue 'job,
                BootEnd::Over { status, reason } => break 'job (status, reason),
            }
        };
        console_task.abort();
        let (status, reason) = match outcome {
            (Some(status), reason) => (status, reason),
            (None, reason) if reason.starts_with("job cancelled") => {
                (JobStatus::Incomplete, reason)
            }
            (None, reason) => {
                let status = farmgate_job::final_status(
                    &self.job.console_patterns,
                    true,
                    matcher.success_seen(),
                    matcher.warn_seen(),
                );
                let detail = match status {
                    JobStatus::Pass => "; job_success matched",
                    JobStatus::Warn => "; job_success and job_warn matched",
                    JobStatus::Fail => "; job_success did not match",
                    _ => "",
                };
                (status, format!("{reason}{detail}"))
            }
        };
        (status, reason, unfit)
    }

    /// A timer expired or the DUT rebooted by itself: use one retry of `timer`, or end
    /// the job when none is left.
    fn use_retry(&self, timer: &mut Timer, log: &mut EventLog, what: &str) -> BootEnd {
        if timer.retries_used < timer.timeout.retries {
            timer.retries_used += 1;
            log.ctrl(format!(
                "{what}: rebooting the DUT (retry {} of {} for {})",
                timer.retries_used, timer.timeout.retries, timer.name
            ));
            BootEnd::Retry
        } else {
            BootEnd::Over {
                status: Some(JobStatus::Incomplete),
                reason: if timer.timeout.retries == 0 {
                    format!("{what} ({} has no retries)", timer.name)
                } else {
                    format!(
                        "{what} and all {} retries of {} are used",
                        timer.timeout.retries, timer.name
                    )
                },
            }
        }
    }

    /// If the port was switched off by us earlier and is still off, the time it has been
    /// off already counts towards the minimum off time.
    async fn already_off_since(&self) -> Option<std::time::Instant> {
        let state = self.driver.get(&self.spec.port_id).await.ok()?;
        if state != PortState::Off {
            return None;
        }
        let store = self.store.clone();
        let pdu = self.spec.pdu_name.clone();
        let port = self.spec.port_id.clone();
        let last = tokio::task::spawn_blocking(move || store.last_port_shutdown(&pdu, &port))
            .await
            .ok()?
            .ok()??;
        let ago = (chrono::Utc::now() - last).to_std().ok()?;
        std::time::Instant::now().checked_sub(ago)
    }
}
