//! Matching console lines against the job's patterns, and the job's final status.

use farmgate_wire::JobStatus;

use crate::description::ConsolePatterns;

/// A console pattern that matched a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternHit {
    /// `session_end`: the job is over.
    SessionEnd,
    /// `session_reboot`: the DUT rebooted by itself.
    SessionReboot,
    /// `job_success`.
    JobSuccess,
    /// `job_warn`.
    JobWarn,
    /// `machine_unfit_for_service`.
    MachineUnfit,
    /// The `start` pattern of this watchdog.
    WatchdogStart(String),
    /// The `reset` pattern of this watchdog.
    WatchdogReset(String),
    /// The `stop` pattern of this watchdog.
    WatchdogStop(String),
}

/// Matches console lines against a job's patterns and remembers whether `job_success`
/// and `job_warn` were ever seen.
#[derive(Debug, Clone)]
pub struct LineMatcher {
    patterns: ConsolePatterns,
    success_seen: bool,
    warn_seen: bool,
}

impl LineMatcher {
    /// A matcher for these patterns.
    pub fn new(patterns: &ConsolePatterns) -> LineMatcher {
        LineMatcher {
            patterns: patterns.clone(),
            success_seen: false,
            warn_seen: false,
        }
    }

    /// The patterns matching one console line (without its newline).
    ///
    /// Hits come in this order: `job_success`, `job_warn`, watchdogs (by name: start,
    /// reset, stop), `machine_unfit_for_service`, `session_reboot`, `session_end`; so a
    /// caller stopping at the first hit that ends the boot has recorded the job's
    /// result first.
    pub fn feed(&mut self, line: &[u8]) -> Vec<PatternHit> {
        let p = &self.patterns;
        let is = |re: &Option<regex::bytes::Regex>| re.as_ref().is_some_and(|r| r.is_match(line));
        let mut hits = Vec::new();
        if is(&p.job_success) {
            self.success_seen = true;
            hits.push(PatternHit::JobSuccess);
        }
        if is(&p.job_warn) {
            self.warn_seen = true;
            hits.push(PatternHit::JobWarn);
        }
        for (name, w) in &p.watchdogs {
            if w.start.is_match(line) {
                hits.push(PatternHit::WatchdogStart(name.clone()));
            }
            if is(&w.reset) {
                hits.push(PatternHit::WatchdogReset(name.clone()));
            }
            if is(&w.stop) {
                hits.push(PatternHit::WatchdogStop(name.clone()));
            }
        }
        if is(&p.machine_unfit_for_service) {
            hits.push(PatternHit::MachineUnfit);
        }
        if is(&p.session_reboot) {
            hits.push(PatternHit::SessionReboot);
        }
        if p.session_end.is_match(line) {
            hits.push(PatternHit::SessionEnd);
        }
        hits
    }

    /// Whether `job_success` matched a line so far.
    pub fn success_seen(&self) -> bool {
        self.success_seen
    }

    /// Whether `job_warn` matched a line so far.
    pub fn warn_seen(&self) -> bool {
        self.warn_seen
    }
}

/// The status of a job whose boots are over (CI-tron's rules).
///
/// No `session_end` → INCOMPLETE; with a `job_success` pattern → PASS, WARN when
/// `job_warn` also matched, FAIL when `job_success` did not match; without one →
/// COMPLETE.
pub fn final_status(
    patterns: &ConsolePatterns,
    session_ended: bool,
    success_seen: bool,
    warn_seen: bool,
) -> JobStatus {
    if !session_ended {
        JobStatus::Incomplete
    } else if patterns.job_success.is_none() {
        JobStatus::Complete
    } else if !success_seen {
        JobStatus::Fail
    } else if warn_seen {
        JobStatus::Warn
    } else {
        JobStatus::Pass
    }
}
