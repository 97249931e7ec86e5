//! What the executor measures for Prometheus (`GET /metrics` renders it): histograms
//! of queue waits, job durations and boot cycle durations, counters of boot cycles and
//! retries, observed once per job when it is over (counters restart with the daemon,
//! as Prometheus expects).

use std::collections::BTreeMap;

use farmgate_store::JobRow;
use farmgate_wire::{EventKind, JobEvent};

/// Bucket bounds of the wait and duration histograms, in seconds.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets (the `+Inf` bucket is `count`).
    pub bounds: &'static [f64],
    /// Observations at or below each bound (cumulative, as Prometheus wants them).
    pub cumulative: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            cumulative: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.cumulative[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Everything the executor measured, by job kind (`user`, `training`, `quick_check`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecMetrics {
    /// Submission to assignment.
    pub queue_wait: BTreeMap<String, Histogram>,
    /// Start to end.
    pub job_duration: BTreeMap<String, Histogram>,
    /// From a boot's power cycle to the next one (or to the end of the job).
    pub boot_cycle: BTreeMap<String, Histogram>,
    /// Boot cycles of the jobs that are over.
    pub boot_cycles: BTreeMap<String, u64>,
    /// Boot cycles beyond each job's first (retries).
    pub boot_retries: BTreeMap<String, u64>,
}

fn secs(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0
}

/// Whether a gateway message starts a boot cycle ("Boot N: power cycling …").
fn starts_boot(e: &JobEvent) -> bool {
    e.msg_type == EventKind::Ctrl
        && e.payload.starts_with("Boot ")
        && e.payload.contains(": power cycling")
}

impl ExecMetrics {
    /// Takes in a job that is over, with its gateway messages.
    pub fn observe_job(&mut self, row: &JobRow, ctrl_events: &[JobEvent]) {
        let kind = row.kind.as_str().to_string();
        fn of<'a>(m: &'a mut BTreeMap<String, Histogram>, kind: &str) -> &'a mut Histogram {
            m.entry(kind.to_string())
                .or_insert_with(|| Histogram::new(SECONDS_BUCKETS))
        }
        // Every kind seen gets its three histograms, observed or not.
        let wait = of(&mut self.queue_wait, &kind);
        if let Some(started) = row.started_at {
            wait.observe(secs(row.submitted_at, started));
        }
        let duration = of(&mut self.job_duration, &kind);
        if let (Some(started), Some(finished)) = (row.started_at, row.finished_at) {
            duration.observe(secs(started, finished));
        }
        let boots: Vec<chrono::DateTime<chrono::Utc>> = ctrl_events
            .iter()
            .filter(|e| starts_boot(e))
            .filter_map(|e| chrono::DateTime::parse_from_rfc3339(&e.date).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
            .collect();
        let boot = of(&mut self.boot_cycle, &kind);
        for (i, start) in boots.iter().enumerate() {
            if let Some(end) = boots.get(i + 1).copied().or(row.finished_at) {
                boot.observe(secs(*start, end));
            }
        }
        let cycles = boots.len() as u64;
        *self.boot_cycles.entry(kind.clone()).or_default() += cycles;
        *self.boot_retries.entry(kind).or_default() += cycles.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_ignores_nonsense() {
        let mut h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 5.0, 50.0, f64::NAN, -1.0] {
            h.observe(v);
        }
        assert_eq!(h.cumulative, vec![2, 3]);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 56.5);
    }
}
