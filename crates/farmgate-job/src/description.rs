//! The job description document: top level, timeouts and console patterns.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use farmgate_wire::{JobTarget, YamlValue};
use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::deployment::{Deployment, RawDeployment};
use crate::error::JobError;

/// A parsed version 1 job description.
#[derive(Debug, Clone)]
pub struct JobDescription {
    /// Format version; only 1 exists.
    pub version: u32,
    /// After this date the job is not started any more (`None`: never).
    pub deadline: Option<DateTime<Utc>>,
    /// Which machine the job wants (the client's `-i`/`-t` override it).
    pub target: JobTarget,
    /// Timers of the job, with their retries.
    pub timeouts: Timeouts,
    /// Patterns looked for in the DUT's console.
    pub console_patterns: ConsolePatterns,
    /// What the DUT boots.
    pub deployment: Deployment,
    /// The `proxy` section, kept as written.
    pub proxy: Option<YamlValue>,
}

/// One timer of the job: how long it runs and how many times its expiry may be retried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeout {
    /// How long the timer runs; `None` never expires.
    pub duration: Option<Duration>,
    /// How many times an expiry (or a `session_reboot`) may restart the boot cycle.
    pub retries: u32,
}

impl Timeout {
    /// A timeout of `duration` with no retries.
    pub fn new(duration: Duration) -> Timeout {
        Timeout {
            duration: Some(duration),
            retries: 0,
        }
    }
}

/// The timers of a job (`timeouts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole job (default 6 hours, no retries).
    pub overall: Timeout,
    /// Preparing the job before the first boot (default 25 % of `overall`).
    pub infra_setup: Timeout,
    /// Cleaning up after the job (default 25 % of `overall`).
    pub infra_teardown: Timeout,
    /// One boot cycle, from power on to session end (no default).
    pub boot_cycle: Timeout,
    /// Longest silence of the console once it started talking (no default).
    pub console_activity: Timeout,
    /// Time until the first console line of a boot (no default).
    pub first_console_activity: Timeout,
    /// Time the firmware may take to boot (no default).
    pub firmware_boot: Timeout,
    /// Timers started, reset and stopped by the console patterns of the same name.
    pub watchdogs: BTreeMap<String, Timeout>,
}

/// Default duration of the `overall` timeout.
pub const DEFAULT_OVERALL: Duration = Duration::from_secs(6 * 3600);

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::from_raw(RawTimeouts::default())
    }
}

impl Timeouts {
    fn from_raw(raw: RawTimeouts) -> Timeouts {
        let overall = raw.overall.unwrap_or(Timeout::new(DEFAULT_OVERALL));
        let quarter = Timeout {
            duration: overall.duration.map(|d| d / 4),
            retries: 0,
        };
        Timeouts {
            infra_setup: raw.infra_setup.unwrap_or_else(|| quarter.clone()),
            infra_teardown: raw.infra_teardown.unwrap_or(quarter),
            overall,
            boot_cycle: raw.boot_cycle.unwrap_or_default(),
            console_activity: raw.console_activity.unwrap_or_default(),
            first_console_activity: raw.first_console_activity.unwrap_or_default(),
            firmware_boot: raw.firmware_boot.unwrap_or_default(),
            watchdogs: raw.watchdogs,
        }
    }
}

/// The console patterns of a job (`console_patterns`), compiled for bytes.
#[derive(Debug, Clone)]
pub struct ConsolePatterns {
    /// The session is over (default: the kernel's `reboot: Power down`).
    pub session_end: regex::bytes::Regex,
    /// The DUT rebooted by itself: uses a retry of `boot_cycle`.
    pub session_reboot: Option<regex::bytes::Regex>,
    /// The job passed.
    pub job_success: Option<regex::bytes::Regex>,
    /// The job passed with warnings.
    pub job_warn: Option<regex::bytes::Regex>,
    /// The machine is not fit for service any more: abort and retrain it.
    pub machine_unfit_for_service: Option<regex::bytes::Regex>,
    /// Patterns driving the watchdog timers of the same name.
    pub watchdogs: BTreeMap<String, WatchdogPatterns>,
}

/// The patterns of one watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogPatterns {
    /// Arms the watchdog.
    pub start: regex::bytes::Regex,
    /// Re-arms a running watchdog.
    pub reset: Option<regex::bytes::Regex>,
    /// Disarms the watchdog.
    pub stop: Option<regex::bytes::Regex>,
}

/// Default `session_end` pattern: what Linux prints when it powers off (`reboot: Power
/// down`; CI-tron's default spells it `Power Down`, both match).
pub const DEFAULT_SESSION_END: &str = "reboot: Power [Dd]own";

impl ConsolePatterns {
    /// Uses `unfit` (the farm-wide pattern) as `machine_unfit_for_service` when the job
    /// sets none.
    pub fn with_default_unfit(mut self, unfit: Option<regex::bytes::Regex>) -> Self {
        if self.machine_unfit_for_service.is_none() {
            self.machine_unfit_for_service = unfit;
        }
        self
    }
}

/// Parses a rendered job description (YAML, version 1).
pub fn parse(text: &str) -> Result<JobDescription, JobError> {
    if text.trim().is_empty() {
        return Err(JobError::invalid(None, "the job description is empty"));
    }
    let raw: RawJob = serde_yaml_ng::from_str(text).map_err(|e| JobError::from_yaml(&e))?;
    let timeouts = Timeouts::from_raw(raw.timeouts.unwrap_or_default());
    let patterns = raw.console_patterns;
    for name in patterns.watchdogs.keys() {
        if !timeouts.watchdogs.contains_key(name) {
            return Err(JobError::invalid(
                key_line(text, &["console_patterns", "watchdogs", name]),
                format!(
                    "console_patterns.watchdogs.{name}: there is no timeout named {name:?} \
                     in timeouts.watchdogs"
                ),
            ));
        }
    }
    let target = raw.target.unwrap_or_default();
    Ok(JobDescription {
        version: raw.version.0,
        deadline: raw.deadline.map(|d| d.0),
        target: JobTarget {
            id: target.id,
            tags: target.tags,
        },
        timeouts,
        console_patterns: ConsolePatterns {
            session_end: match patterns.session_end {
                Some(p) => p.regex.0,
                None => regex::bytes::Regex::new(DEFAULT_SESSION_END)
                    .map_err(|e| JobError::invalid(None, format!("default session_end: {e}")))?,
            },
            session_reboot: patterns.session_reboot.map(|p| p.regex.0),
            job_success: patterns.job_success.map(|p| p.regex.0),
            job_warn: patterns.job_warn.map(|p| p.regex.0),
            machine_unfit_for_service: patterns.machine_unfit_for_service.map(|p| p.regex.0),
            watchdogs: patterns
                .watchdogs
                .into_iter()
                .map(|(name, w)| {
                    (
                        name,
                        WatchdogPatterns {
                            start: w.start.regex.0,
                            reset: w.reset.map(|p| p.regex.0),
                            stop: w.stop.map(|p| p.regex.0),
                        },
                    )
                })
                .collect(),
        },
        deployment: Deployment::from_raw(raw.deployment),
        proxy: raw.proxy,
    })
}

/// Best-effort line (1-based) of a block-style key path in YAML text.
pub(crate) fn key_line(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for seg in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if parent_indent.is_some_and(|p| indent <= p) {
                break;
            }
            let key = trimmed.trim_start_matches(['"', '\'']);
            if let Some(rest) = key.strip_prefix(seg)
                && rest
                    .trim_start_matches(['"', '\''])
                    .trim_start()
                    .starts_with(':')
            {
                hit = Some((i, indent));
                break;
            }
        }
        let Some((i, indent)) = hit else {
            return found;
        };
        start = i + 1;
        parent_indent = Some(indent);
        found = Some(i + 1);
    }
    found
}

// ----- raw YAML shapes ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawJob {
    #[serde(default)]
    version: Version,
    #[serde(default)]
    deadline: Option<Deadline>,
    #[serde(default)]
    target: Option<RawTarget>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
    console_patterns: RawPatterns,
    deployment: RawDeployment,
    #[serde(default)]
    proxy: Option<YamlValue>,
}

struct Version(u32);

impl Default for Version {
    fn default() -> Self {
        Version(1)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v != 1 {
            return Err(de::Error::custom(format!(
                "version: only version 1 is supported, not {v}"
            )));
        }
        Ok(Version(v))
    }
}

struct Deadline(DateTime<Utc>);

impl<'de> Deserialize<'de> for Deadline {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_datetime(&s).map(Deadline).ok_or_else(|| {
            de::Error::custom(format!(
                "deadline: {s:?} is not a date and time (use e.g. 2025-01-31T18:00:00Z)"
            ))
        })
    }
}

fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f %:z"] {
        if let Ok(d) = DateTime::parse_from_str(s, fmt) {
            return Some(d.with_timezone(&Utc));
        }
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(d.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawTarget {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawTimeouts {
    #[serde(default)]
    overall: Option<Timeout>,
    #[serde(default)]
    infra_setup: Option<Timeout>,
    #[serde(default)]
    infra_teardown: Option<Timeout>,
    #[serde(default)]
    boot_cycle: Option<Timeout>,
    #[serde(default)]
    console_activity: Option<Timeout>,
    #[serde(default)]
    first_console_activity: Option<Timeout>,
    #[serde(default)]
    firmware_boot: Option<Timeout>,
    #[serde(default)]
    watchdogs: BTreeMap<String, Timeout>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawTimeout {
    #[serde(default)]
    days: Option<Amount>,
    #[serde(default)]
    hours: Option<Amount>,
    #[serde(default)]
    minutes: Option<Amount>,
    #[serde(default)]
    seconds: Option<Amount>,
    #[serde(default)]
    milliseconds: Option<Amount>,
    #[serde(default)]
    retries: u32,
}

/// A non-negative, finite amount of a duration unit.
struct Amount(f64);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(de::Error::custom(format!(
                "durations must be finite and not negative, not {v}"
            )));
        }
        Ok(Amount(v))
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawTimeout::deserialize(d)?;
        let parts = [
            (raw.days, 86_400.0),
            (raw.hours, 3_600.0),
            (raw.minutes, 60.0),
            (raw.seconds, 1.0),
            (raw.milliseconds, 0.001),
        ];
        let mut any = false;
        let mut secs = 0.0;
        for (amount, unit) in parts {
            if let Some(Amount(v)) = amount {
                any = true;
                secs += v * unit;
            }
        }
        let duration = if any {
            Some(Duration::try_from_secs_f64(secs).map_err(|_| {
                de::Error::custom(format!("a timeout of {secs} seconds is too long"))
            })?)
        } else {
            None
        };
        Ok(Timeout {
            duration,
            retries: raw.retries,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawPatterns {
    #[serde(default)]
    session_end: Option<RawPattern>,
    #[serde(default)]
    session_reboot: Option<RawPattern>,
    #[serde(default)]
    job_success: Option<RawPattern>,
    #[serde(default)]
    job_warn: Option<RawPattern>,
    #[serde(default)]
    machine_unfit_for_service: Option<RawPattern>,
    #[serde(default)]
    watchdogs: BTreeMap<String, RawWatchdog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawPattern {
    regex: Pattern,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
struct RawWatchdog {
    start: RawPattern,
    #[serde(default)]
    reset: Option<RawPattern>,
    #[serde(default)]
    stop: Option<RawPattern>,
}

/// A regular expression compiled at deserialization, so its errors carry the location.
struct Pattern(regex::bytes::Regex);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        regex::bytes::RegexBuilder::new(&s)
            .size_limit(1 << 20)
            .build()
            .map(Pattern)
            .map_err(|e| de::Error::custom(format!("regex {s:?} is invalid: {}", OneLine(&e))))
    }
}

/// Displays an error on one line (regex errors draw a caret on several lines).
struct OneLine<'a>(&'a dyn fmt::Display);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        let last = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        let last = last.trim();
        f.write_str(last.strip_prefix("error: ").unwrap_or(last))
    }
}
