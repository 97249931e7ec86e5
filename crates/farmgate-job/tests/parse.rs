//! Parsing job descriptions: a full CI-tron-like job, defaults, durations, `continue`
//! merging, and errors naming the field and the line.

use std::time::Duration;

use farmgate_job::{JobError, parse};

const FULL: &str = r#"version: 1
deadline: "2030-05-04T12:00:00Z"
target:
  id: "52:54:00:11:22:33"
  tags: ["amdgpu:gfxversion::gfx10", "cpu:arch:x86_64"]
timeouts:
  overall:
    hours: 1
    minutes: 30
  infra_setup:
    minutes: 5
  boot_cycle:
    minutes: 20
    retries: 2
  first_console_activity:
    seconds: 45
    retries: 3
  console_activity:
    minutes: 2
    milliseconds: 500
  firmware_boot:
    seconds: 30
  watchdogs:
    tests:
      minutes: 10
      retries: 1
console_patterns:
  session_end:
    regex: "^\\[.*\\] reboot: Power Down$"
  session_reboot:
    regex: "Restarting system"
  job_success:
    regex: "Execution is over, pipeline status: 0"
  job_warn:
    regex: "WARNING: flaky"
  machine_unfit_for_service:
    regex: "EXT4-fs error"
  watchdogs:
    tests:
      start:
        regex: "deqp-runner starting"
      reset:
        regex: "Pass: \\d+"
      stop:
        regex: "deqp-runner done"
deployment:
  start:
    kernel:
      url: "http://10.42.0.1:9000/b2c/linux-x86_64"
      cmdline:
        b2c: b2c.container="-ti docker://registry.freedesktop.org/mupuf/valve-infra/machine_registration:latest register" b2c.ntp_peer=10.42.0.1
        console: console=ttyS0,115200 earlyprintk=vga
        extra: [quiet, "loglevel=6"]
    initramfs:
      base:
        url: "http://10.42.0.1:9000/b2c/initramfs.linux_amd64.cpio.xz"
      firmware:
        - url: "http://10.42.0.1:9000/fw/amdgpu.cpio"
        - url: "http://10.42.0.1:9000/fw/i915.cpio"
    dtb:
      - data: "not really a dtb"
    storage:
      http:
        - path: "/boot/(.*)"
          url: "http://10.42.0.1:9000/boot/\\1"
      tftp:
        - path: "grub.cfg"
          data: "set timeout=0"
  continue:
    kernel:
      cmdline:
        b2c: b2c.container="docker://registry.freedesktop.org/mesa/mesa/ci:latest"
    initramfs:
      firmware:
        url: "http://10.42.0.1:9000/fw/none.cpio"
proxy:
  allowed_hosts: [gitlab.freedesktop.org]
"#;

fn invalid(text: &str) -> JobError {
    match parse(text) {
        Ok(job) => panic!("accepted an invalid job: {job:?}"),
        Err(e) => e,
    }
}

/// Asserts the error is on `line` and its message contains every one of `needles`.
fn assert_error(text: &str, line: usize, needles: &[&str]) {
    let e = invalid(text);
    assert_eq!(e.line(), Some(line), "wrong line in {e}");
    let shown = e.to_string();
    for n in needles {
        assert!(shown.contains(n), "{shown:?} does not mention {n:?}");
    }
    assert!(shown.contains(&format!("line {line}")), "{shown:?}");
}

const MINIMAL: &str =
    "console_patterns: {}\ndeployment:\n  start:\n    kernel:\n      url: http://k\n";

#[test]
fn full_job_parses() {
    let job = parse(FULL).expect("the full job is valid");
    assert_eq!(job.version, 1);
    assert_eq!(
        job.deadline.map(|d| d.to_rfc3339()),
        Some("2030-05-04T12:00:00+00:00".to_string())
    );
    assert_eq!(job.target.id.as_deref(), Some("52:54:00:11:22:33"));
    assert_eq!(job.target.tags.len(), 2);

    let t = &job.timeouts;
    assert_eq!(t.overall.duration, Some(Duration::from_secs(5400)));
    assert_eq!(t.overall.retries, 0);
    assert_eq!(t.infra_setup.duration, Some(Duration::from_secs(300)));
    // Not set: a quarter of overall.
    assert_eq!(t.infra_teardown.duration, Some(Duration::from_secs(1350)));
    assert_eq!(t.boot_cycle.duration, Some(Duration::from_secs(1200)));
    assert_eq!(t.boot_cycle.retries, 2);
    assert_eq!(t.first_console_activity.retries, 3);
    assert_eq!(
        t.console_activity.duration,
        Some(Duration::from_millis(120_500))
    );
    assert_eq!(t.firmware_boot.duration, Some(Duration::from_secs(30)));
    assert_eq!(
        t.watchdogs["tests"].duration,
        Some(Duration::from_secs(600))
    );
    assert_eq!(t.watchdogs["tests"].retries, 1);

    let p = &job.console_patterns;
    assert_eq!(p.session_end.as_str(), r"^\[.*\] reboot: Power Down$");
    assert_eq!(
        p.job_success.as_ref().map(|r| r.as_str()),
        Some("Execution is over, pipeline status: 0")
    );
    assert!(p.session_reboot.is_some() && p.job_warn.is_some());
    assert!(p.machine_unfit_for_service.is_some());
    let w = &p.watchdogs["tests"];
    assert_eq!(w.start.as_str(), "deqp-runner starting");
    assert_eq!(w.reset.as_ref().map(|r| r.as_str()), Some(r"Pass: \d+"));

    let start = job.deployment.for_boot(0);
    assert_eq!(
        start.kernel.as_ref().and_then(|k| k.url.as_deref()),
        Some("http://10.42.0.1:9000/b2c/linux-x86_64")
    );
    // Categories in name order (b2c, console, extra), lists joined with spaces.
    assert_eq!(
        start.cmdline,
        "b2c.container=\"-ti docker://registry.freedesktop.org/mupuf/valve-infra/machine_registration:latest register\" b2c.ntp_peer=10.42.0.1 console=ttyS0,115200 earlyprintk=vga quiet loglevel=6"
    );
    let initrds: Vec<_> = start
        .initramfs
        .iter()
        .filter_map(|a| a.url.as_deref())
        .collect();
    assert_eq!(
        initrds,
        [
            "http://10.42.0.1:9000/b2c/initramfs.linux_amd64.cpio.xz",
            "http://10.42.0.1:9000/fw/amdgpu.cpio",
            "http://10.42.0.1:9000/fw/i915.cpio",
        ]
    );
    assert_eq!(start.dtb[0].data.as_deref(), Some("not really a dtb"));
    assert_eq!(start.storage.http[0].path, "/boot/(.*)");
    assert_eq!(
        start.storage.http[0].artifact.url.as_deref(),
        Some(r"http://10.42.0.1:9000/boot/\1")
    );
    assert_eq!(
        start.storage.tftp[0].artifact.data.as_deref(),
        Some("set timeout=0")
    );
    assert!(job.proxy.is_some());
}

#[test]
fn continue_is_start_merged_with_its_overrides() {
    let job = parse(FULL).expect("valid");
    let start = job.deployment.for_boot(0);
    let later = job.deployment.for_boot(1);
    assert_eq!(later, job.deployment.for_boot(7));
    // The kernel comes from start, the b2c category of the command line is replaced,
    // the other categories are kept.
    assert_eq!(later.kernel, start.kernel);
    assert_eq!(
        later.cmdline,
        "b2c.container=\"docker://registry.freedesktop.org/mesa/mesa/ci:latest\" console=ttyS0,115200 earlyprintk=vga quiet loglevel=6"
    );
    let initrds: Vec<_> = later
        .initramfs
        .iter()
        .filter_map(|a| a.url.as_deref())
        .collect();
    assert_eq!(
        initrds,
        [
            "http://10.42.0.1:9000/b2c/initramfs.linux_amd64.cpio.xz",
            "http://10.42.0.1:9000/fw/none.cpio",
        ]
    );
    assert_eq!(later.dtb, start.dtb);
    assert_eq!(later.storage, start.storage);
}

#[test]
fn continue_list_replaces_and_kernel_source_overrides() {
    let job = parse(
        "console_patterns: {}\ndeployment:\n  start:\n    kernel:\n      url: http://a/k\n      cmdline: [a, b]\n    initramfs: [{url: http://a/i}]\n  continue:\n    kernel:\n      url: http://b/k\n    initramfs: []\n",
    )
    .expect("valid");
    let later = job.deployment.for_boot(1);
    assert_eq!(
        later.kernel.and_then(|k| k.url).as_deref(),
        Some("http://b/k")
    );
    assert_eq!(later.cmdline, "a b");
    assert!(later.initramfs.is_empty());
}

#[test]
fn no_continue_means_start_every_boot() {
    let job = parse(MINIMAL).expect("valid");
    assert!(job.deployment.continue_.is_none());
    assert_eq!(job.deployment.for_boot(3), job.deployment.start);
}

#[test]
fn step_level_cmdline_is_accepted() {
    let job = parse(
        "console_patterns: {}\ndeployment:\n  start:\n    kernel: {url: http://k}\n    cmdline: {b: two, a: one}\n",
    )
    .expect("valid");
    assert_eq!(job.deployment.start.cmdline, "one two");
}

#[test]
fn defaults() {
    let job = parse(MINIMAL).expect("valid");
    assert_eq!(job.version, 1);
    assert!(job.deadline.is_none());
    assert_eq!(job.target.id, None);
    assert!(job.target.tags.is_empty());
    let t = &job.timeouts;
    assert_eq!(t.overall.duration, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(t.overall.retries, 0);
    assert_eq!(t.infra_setup.duration, Some(Duration::from_secs(5400)));
    assert_eq!(t.infra_teardown.duration, Some(Duration::from_secs(5400)));
    assert_eq!(t.boot_cycle.duration, None);
    assert_eq!(t.console_activity.duration, None);
    assert_eq!(t.first_console_activity.duration, None);
    assert!(t.watchdogs.is_empty());
    let p = &job.console_patterns;
    assert_eq!(p.session_end.as_str(), "reboot: Power [Dd]own");
    assert!(p.session_end.is_match(b"[    3.141592] reboot: Power down"));
    assert!(p.job_success.is_none() && p.machine_unfit_for_service.is_none());
    assert_eq!(job.deployment.start.cmdline, "");
}

#[test]
fn durations_add_up_and_an_entry_without_one_never_expires() {
    let job = parse(
        "timeouts:\n  overall:\n    days: 1\n    hours: 2\n    minutes: 3\n    seconds: 4.5\n    milliseconds: 250\n  boot_cycle:\n    retries: 4\nconsole_patterns: {}\ndeployment: {start: {}}\n",
    )
    .expect("valid");
    let t = &job.timeouts;
    assert_eq!(
        t.overall.duration,
        Some(Duration::from_millis(((86_400 + 7200 + 180) * 1000) + 4750))
    );
    assert_eq!(t.boot_cycle.duration, None);
    assert_eq!(t.boot_cycle.retries, 4);
    assert_eq!(t.infra_setup.duration, t.overall.duration.map(|d| d / 4));
}

#[test]
fn overall_without_duration_never_expires_nor_infra() {
    let job = parse("timeouts: {overall: {}}\nconsole_patterns: {}\ndeployment: {start: {}}\n")
        .expect("valid");
    assert_eq!(job.timeouts.overall.duration, None);
    assert_eq!(job.timeouts.infra_setup.duration, None);
}

#[test]
fn unfit_default_only_when_the_job_sets_none() {
    let farm = regex::bytes::Regex::new("farm unfit").expect("regex");
    let job = parse(MINIMAL).expect("valid");
    let p = job.console_patterns.with_default_unfit(Some(farm.clone()));
    assert_eq!(
        p.machine_unfit_for_service
            .map(|r| r.as_str().to_string())
            .as_deref(),
        Some("farm unfit")
    );
    let job = parse(FULL).expect("valid");
    let p = job.console_patterns.with_default_unfit(Some(farm));
    assert_eq!(
        p.machine_unfit_for_service
            .map(|r| r.as_str().to_string())
            .as_deref(),
        Some("EXT4-fs error")
    );
}

#[test]
fn deadline_formats() {
    for (text, expected) in [
        ("2030-01-02T03:04:05+01:00", "2030-01-02T02:04:05+00:00"),
        ("2030-01-02 03:04:05", "2030-01-02T03:04:05+00:00"),
        ("2030-01-02", "2030-01-02T00:00:00+00:00"),
    ] {
        let job = parse(&format!("deadline: {text}\n{MINIMAL}")).expect("valid");
        assert_eq!(
            job.deadline.map(|d| d.to_rfc3339()).as_deref(),
            Some(expected),
            "{text}"
        );
    }
}

// ----- errors ----------------------------------------------------------------------------

#[test]
fn unknown_top_level_key() {
    assert_error(
        &format!("{MINIMAL}colour: blue\n"),
        6,
        &["unknown field `colour`"],
    );
}

#[test]
fn unknown_nested_key_names_its_parent() {
    let text = "timeouts:\n  boot_cycle:\n    minutes: 3\n    hourz: 1\nconsole_patterns: {}\ndeployment: {start: {}}\n";
    assert_error(text, 4, &["timeouts.boot_cycle", "unknown field `hourz`"]);
    let text =
        "console_patterns:\n  job_success:\n    regex: ok\n    flags: i\ndeployment: {start: {}}\n";
    assert_error(
        text,
        4,
        &["console_patterns.job_success", "unknown field `flags`"],
    );
    let text = "console_patterns: {}\ndeployment:\n  start:\n    kernel:\n      url: http://k\n      cmd_line: quiet\n";
    assert_error(
        text,
        6,
        &["deployment.start.kernel", "unknown field `cmd_line`"],
    );
    let text = "console_patterns: {}\ndeployment:\n  start:\n    initramfs:\n      - url: http://i\n        sha: 12\n";
    assert_error(
        text,
        6,
        &["deployment.start.initramfs[0]", "unknown field `sha`"],
    );
    let text = "console_patterns: {}\ndeployment:\n  start:\n    initramfs:\n      base:\n        url: http://i\n        sha: 12\n";
    assert_error(
        text,
        7,
        &["deployment.start.initramfs.base", "unknown field `sha`"],
    );
}

#[test]
fn negative_retries() {
    let text = "timeouts:\n  boot_cycle:\n    minutes: 3\n    retries: -1\nconsole_patterns: {}\ndeployment: {start: {}}\n";
    assert_error(text, 4, &["timeouts.boot_cycle.retries", "-1"]);
}

#[test]
fn negative_duration() {
    let text = "timeouts:\n  watchdogs:\n    tests:\n      minutes: -3\nconsole_patterns: {}\ndeployment: {start: {}}\n";
    assert_error(text, 4, &["timeouts.watchdogs.tests", "negative"]);
}

#[test]
fn bad_type() {
    let text =
        "timeouts:\n  overall:\n    hours: soon\nconsole_patterns: {}\ndeployment: {start: {}}\n";
    assert_error(text, 3, &["timeouts.overall.hours", "soon"]);
    let text = "target:\n  tags: gpu\nconsole_patterns: {}\ndeployment: {start: {}}\n";
    assert_error(text, 2, &["target.tags"]);
}

#[test]
fn bad_regex() {
    let text =
        "console_patterns:\n  session_end:\n    regex: \"(unclosed\"\ndeployment: {start: {}}\n";
    assert_error(
        text,
        3,
        &[
            "console_patterns.session_end",
            "(unclosed",
            "unclosed group",
        ],
    );
    let text = "console_patterns:\n  watchdogs:\n    w:\n      start:\n        regex: \"[z-a]\"\ntimeouts:\n  watchdogs:\n    w: {seconds: 1}\ndeployment: {start: {}}\n";
    assert_error(text, 5, &["console_patterns.watchdogs.w.start", "[z-a]"]);
}

#[test]
fn watchdog_pattern_without_timeout() {
    let text = "console_patterns:\n  session_end:\n    regex: end\n  watchdogs:\n    tests:\n      start:\n        regex: go\ndeployment: {start: {}}\n";
    assert_error(
        text,
        5,
        &["console_patterns.watchdogs.tests", "timeouts.watchdogs"],
    );
}

#[test]
fn missing_required_sections() {
    let e = invalid("deployment: {start: {}}\n");
    assert!(
        e.to_string().contains("missing field `console_patterns`"),
        "{e}"
    );
    assert!(e.line().is_some(), "{e}");
    let e = invalid("console_patterns: {}\n");
    assert!(e.to_string().contains("missing field `deployment`"), "{e}");
    assert_error(
        "console_patterns: {}\ndeployment:\n  continue: {}\n",
        3,
        &["deployment", "missing field `start`"],
    );
    let e = invalid("");
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn unsupported_version() {
    assert_error(&format!("version: 2\n{MINIMAL}"), 1, &["version", "2"]);
}

#[test]
fn artifacts_need_exactly_one_source() {
    let text = "console_patterns: {}\ndeployment:\n  start:\n    initramfs:\n      - url: http://i\n        data: inline\n";
    assert_error(
        text,
        5,
        &[
            "deployment.start.initramfs",
            "exactly one of url, data or archive",
        ],
    );
    let text = "console_patterns: {}\ndeployment:\n  start:\n    storage:\n      tftp:\n        - path: a\n";
    assert_error(
        text,
        6,
        &["deployment.start.storage.tftp", "\"a\"", "exactly one"],
    );
}

#[test]
fn both_cmdlines_refused() {
    let text = "console_patterns: {}\ndeployment:\n  start:\n    kernel:\n      url: http://k\n      cmdline: a\n    cmdline: b\n";
    let e = invalid(text);
    assert!(e.to_string().contains("kernel.cmdline"), "{e}");
    assert!(e.line().is_some(), "{e}");
}

#[test]
fn bad_deadline() {
    assert_error(
        &format!("deadline: tomorrow\n{MINIMAL}"),
        1,
        &["deadline", "tomorrow"],
    );
}

#[test]
fn yaml_syntax_error_has_a_line() {
    let e = invalid("console_patterns: {}\ndeployment:\n  start: [\n");
    assert!(e.line().is_some(), "{e}");
}

#[test]
fn hostile_inputs_are_refused_without_panicking() {
    let laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n";
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let regex_bomb = "console_patterns:\n  job_success:\n    regex: \"(((a{100}){100}){100}){100}\"\ndeployment: {start: {}}\n";
    for text in [
        laughs,
        deep.as_str(),
        regex_bomb,
        "\u{0}",
        "---\n...\n---\n",
        "!!binary aGk=",
    ] {
        assert!(parse(text).is_err(), "accepted {text:?}");
    }
}
