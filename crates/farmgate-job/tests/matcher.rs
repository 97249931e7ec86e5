//! Console pattern matching and the final status table.

use farmgate_job::{ConsolePatterns, LineMatcher, PatternHit, final_status, parse};
use farmgate_wire::JobStatus;

fn patterns(yaml: &str) -> ConsolePatterns {
    parse(yaml).expect("valid job").console_patterns
}

const JOB: &str = r#"timeouts:
  watchdogs:
    tests: {minutes: 5}
console_patterns:
  session_end: {regex: "^ALL DONE"}
  session_reboot: {regex: "Restarting system"}
  job_success: {regex: "status: 0"}
  job_warn: {regex: "WARN"}
  machine_unfit_for_service: {regex: "I/O error"}
  watchdogs:
    tests:
      start: {regex: "tests: start"}
      reset: {regex: "tests: .*progress"}
      stop: {regex: "tests: stop"}
deployment: {start: {}}
"#;

#[test]
fn hits_per_line() {
    let mut m = LineMatcher::new(&patterns(JOB));
    assert!(m.feed(b"nothing interesting").is_empty());
    assert_eq!(
        m.feed(b"tests: start"),
        [PatternHit::WatchdogStart("tests".into())]
    );
    assert_eq!(
        m.feed(b"tests: 5% progress"),
        [PatternHit::WatchdogReset("tests".into())]
    );
    assert_eq!(
        m.feed(b"tests: stop"),
        [PatternHit::WatchdogStop("tests".into())]
    );
    assert_eq!(
        m.feed(b"[  3.2] Restarting system"),
        [PatternHit::SessionReboot]
    );
    assert_eq!(m.feed(b"sda: I/O error"), [PatternHit::MachineUnfit]);
    assert!(!m.success_seen() && !m.warn_seen());
    assert_eq!(m.feed(b"WARN: slow"), [PatternHit::JobWarn]);
    assert!(m.warn_seen() && !m.success_seen());
    // Not at the start of the line: session_end is anchored.
    assert!(m.feed(b"echo ALL DONE").is_empty());
    assert_eq!(m.feed(b"ALL DONE"), [PatternHit::SessionEnd]);
}

#[test]
fn result_patterns_come_before_session_end_on_the_same_line() {
    let mut m = LineMatcher::new(&patterns(JOB));
    let hits = m.feed(b"ALL DONE, status: 0, WARN");
    assert_eq!(
        hits,
        [
            PatternHit::JobSuccess,
            PatternHit::JobWarn,
            PatternHit::SessionEnd
        ]
    );
    assert!(m.success_seen() && m.warn_seen());
}

#[test]
fn matching_is_on_bytes() {
    let mut m = LineMatcher::new(&patterns(JOB));
    assert_eq!(m.feed(b"\xff\xfe status: 0 \x80"), [PatternHit::JobSuccess]);
}

#[test]
fn default_session_end_is_the_kernel_power_down() {
    let p = patterns("console_patterns: {}\ndeployment: {start: {}}\n");
    let mut m = LineMatcher::new(&p);
    assert_eq!(
        m.feed(b"[   12.345678] reboot: Power Down"),
        [PatternHit::SessionEnd]
    );
}

#[test]
fn final_status_table() {
    let with_success = patterns(JOB);
    let without = patterns("console_patterns: {}\ndeployment: {start: {}}\n");
    let cases = [
        (&with_success, false, true, false, JobStatus::Incomplete),
        (&without, false, false, false, JobStatus::Incomplete),
        (&with_success, true, true, false, JobStatus::Pass),
        (&with_success, true, true, true, JobStatus::Warn),
        (&with_success, true, false, false, JobStatus::Fail),
        (&with_success, true, false, true, JobStatus::Fail),
        (&without, true, false, false, JobStatus::Complete),
        (&without, true, false, true, JobStatus::Complete),
    ];
    for (p, ended, success, warn, expected) in cases {
        assert_eq!(
            final_status(p, ended, success, warn),
            expected,
            "ended={ended} success={success} warn={warn}"
        );
    }
}
