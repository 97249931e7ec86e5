//! End-to-end tests: the real daemon, the real farmctl, simulated DUTs speaking the
//! gateway's real protocols (vpdu over TCP, console on ptys through SALAD, boot scripts
//! over HTTP). Each test builds its own gateway.

mod common;

use std::time::{Duration, Instant};

use common::*;
use farmgate_testkit::Behaviour;
use farmgate_wire::{DutState, JobStatus};

const LIMIT: Duration = Duration::from_secs(90);

fn code(s: JobStatus) -> Option<i32> {
    Some(s.exit_code())
}

const PASS_FAIL_WARN: &str = r#"  job_success:
    regex: "TESTS PASSED"
  job_warn:
    regex: "WARNING:"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_passes_and_console_is_streamed_live() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim", "gpu:a"], true)).await;
    let job = gw.write_job(
        "pass.yml",
        &sim_job(
            "print running tests; print TESTS PASSED; poweroff",
            PASS_FAIL_WARN,
            "",
        ),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}\n{}", r.all(), gw.logs());
    assert!(r.stdout.contains("TESTS PASSED"), "{}", r.all());
    assert!(
        r.stdout.contains("SALAD.machine_id=52:54:00:11:22:01"),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("power cycling"), "{}", r.all());
    assert!(r.stderr.contains("finished: PASS"), "{}", r.all());
    let d = gw.wait_state(1, DutState::Idle, LIMIT).await;
    assert!(d.current_job.is_none());
    // The DUT was switched on once for the job and off at teardown.
    let log = gw.farm.power_log(1);
    assert!(log.iter().any(|(_, on)| *on), "{log:?}");
    assert_eq!(log.last().map(|(_, on)| *on), Some(false), "{log:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_fails_warns_and_completes() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let fail = gw.write_job(
        "fail.yml",
        &sim_job("print 3 tests failed; poweroff", PASS_FAIL_WARN, ""),
    );
    let r = gw.farmctl_run(&["run", "-w", path_str(&fail)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Fail), "{}", r.all());

    let warn = gw.write_job(
        "warn.yml",
        &sim_job(
            "print WARNING: flaky; print TESTS PASSED; poweroff",
            PASS_FAIL_WARN,
            "",
        ),
    );
    let r = gw.farmctl_run(&["run", "-w", path_str(&warn)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Warn), "{}", r.all());

    let complete = gw.write_job("complete.yml", &sim_job("print hello; poweroff", "", ""));
    let r = gw
        .farmctl_run(&["run", "-w", path_str(&complete)], LIMIT)
        .await;
    assert_eq!(r.code, code(JobStatus::Complete), "{}", r.all());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_without_retries_end_the_job_incomplete() {
    let gw = Gateway::start(
        GatewayOptions::default()
            .dut(1, &["sim"], true)
            .behaviour(1, Behaviour::Dead),
    )
    .await;
    // A dead machine prints nothing: first_console_activity expires.
    let job = gw.write_job(
        "dead.yml",
        &sim_job(
            "poweroff",
            "",
            "  first_console_activity:\n    seconds: 1\n",
        ),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr
            .contains("first_console_activity timeout of 1.0 s expired"),
        "{}",
        r.all()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_console_activity_and_infra_setup_timeouts_retry_then_give_up() {
    let gw = Gateway::start(
        GatewayOptions::default()
            .dut(1, &["sim"], true)
            .behaviour(1, Behaviour::Dead),
    )
    .await;
    let job = gw.write_job(
        "dead-retry.yml",
        &sim_job(
            "poweroff",
            "",
            "  first_console_activity:\n    seconds: 1\n    retries: 1\n",
        ),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr.contains("retry 1 of 1 for first_console_activity"),
        "{}",
        r.all()
    );
    assert_eq!(gw.farm.boot_count(1), 2, "booted once, retried once");

    // The DUT must stay off 2 s between boots, but the job allows 0.5 s of setup: each
    // power cycle overruns infra_setup; after its retry the job is a setup failure.
    gw.farm.set_behaviour(1, Behaviour::Healthy);
    let r = gw
        .http
        .patch(format!("{}/api/v1/dut/{}", gw.url(), mac(1)))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"pdu_off_delay": 2.0}))
        .send()
        .await
        .expect("PATCH dut");
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let job = gw.write_job(
        "slow-setup.yml",
        &sim_job(
            "poweroff",
            "",
            "  infra_setup:\n    milliseconds: 500\n    retries: 1\n",
        ),
    );
    let before = gw.farm.boot_count(1);
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::SetupFail), "{}", r.all());
    assert!(r.stderr.contains("(retry 1 of 1)"), "{}", r.all());
    assert!(
        r.stderr.contains("all 1 retries of infra_setup are used"),
        "{}",
        r.all()
    );
    assert_eq!(gw.farm.boot_count(1), before, "never powered on");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_activity_and_boot_cycle_without_retries_end_at_once() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let cases = [
        (
            "print starting; hang",
            "  console_activity:\n    seconds: 1\n",
            "console_activity timeout of 1.0 s expired (console_activity has no retries)",
        ),
        (
            "print a; sleep 300; print b; sleep 300; print c; sleep 300; print d; sleep 300; print e; sleep 5000",
            "  boot_cycle:\n    seconds: 1\n",
            "boot_cycle timeout of 1.0 s expired (boot_cycle has no retries)",
        ),
    ];
    for (script, timeouts, expected) in cases {
        let job = gw.write_job("no-retry.yml", &sim_job(script, "", timeouts));
        let before = gw.farm.boot_count(1);
        let r = gw.farmctl_run(&["run", "-w", path_str(&job)], LIMIT).await;
        assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
        assert!(r.stderr.contains(expected), "{expected}\n{}", r.all());
        assert_eq!(gw.farm.boot_count(1) - before, 1, "no second boot");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mars_file_edits_apply_live_and_bad_edits_are_ignored() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = gw.write_job(
        "gpu.yml",
        &sim_job("print hi; poweroff", "", "").replace("tags: [sim]", "tags: [sim, gpu:new]"),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, Some(7), "no machine has gpu:new yet: {}", r.all());
    assert!(r.stderr.contains("406"), "{}", r.all());

    // A broken edit is reported and ignored: the farm keeps its last good database.
    let good = std::fs::read_to_string(gw.mars_path()).expect("read mars");
    std::fs::write(gw.mars_path(), "duts: [unclosed\n").expect("write mars");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = gw
        .farmctl_run(
            &[
                "run",
                "-w",
                path_str(&gw.write_job("plain.yml", &sim_job("print hi; poweroff", "", ""))),
            ],
            LIMIT,
        )
        .await;
    assert_eq!(
        r.code,
        code(JobStatus::Complete),
        "the last good MaRS DB stays in force: {}",
        r.all()
    );
    assert!(
        gw.logs().contains("line"),
        "the bad edit is reported with its line"
    );

    // The admin adds the tag by editing the file; the gateway picks it up by itself.
    let mut db: farmgate_wire::MarsDb = serde_yaml_ng::from_str(&good).expect("yaml");
    db.duts
        .get_mut(&mac(1))
        .expect("dut 1")
        .tags
        .push("gpu:new".into());
    std::fs::write(gw.mars_path(), serde_yaml_ng::to_string(&db).expect("yaml")).expect("write");
    gw.wait_dut(1, "tagged gpu:new by the file edit", LIMIT, |d| {
        d.record.tags.iter().any(|t| t == "gpu:new")
    })
    .await;
    let r = gw.farmctl_run(&["run", "-w", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Complete), "{}", r.all());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_activity_and_boot_cycle_timeouts_retry_then_give_up() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    // Goes silent after one line: console_activity expires, is retried once, expires again.
    let job = gw.write_job(
        "silent.yml",
        &sim_job(
            "print starting; hang",
            "",
            "  console_activity:\n    seconds: 1\n    retries: 1\n",
        ),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr.contains("retry 1 of 1 for console_activity"),
        "{}",
        r.all()
    );
    assert!(
        r.stderr
            .contains("all 1 retries of console_activity are used"),
        "{}",
        r.all()
    );
    assert_eq!(gw.farm.boot_count(1), 2, "booted once, retried once");

    // The boot cycle never ends: boot_cycle expires, retried twice.
    let job = gw.write_job(
        "cycle.yml",
        &sim_job(
            "print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 100; print alive; sleep 5000",
            "",
            "  boot_cycle:\n    seconds: 1\n    retries: 2\n",
        ),
    );
    let before = gw.farm.boot_count(1);
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr.contains("retry 2 of 2 for boot_cycle"),
        "{}",
        r.all()
    );
    assert_eq!(gw.farm.boot_count(1) - before, 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_that_succeeds_uses_continue_deployment_and_overall_timeout() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    // First boot hangs silently; the retry boots the `continue` deployment, which passes.
    let job = r#"version: 1
target:
  tags: [sim]
timeouts:
  first_console_activity:
    seconds: 5
  console_activity:
    seconds: 1
    retries: 1
console_patterns:
  session_end:
    regex: "reboot: Power Down"
  job_success:
    regex: "second boot ok"
deployment:
  start:
    kernel:
      url: "http://127.0.0.1:1/vmlinuz"
      cmdline: 'farmsim.script="print first boot; hang"'
  continue:
    kernel:
      url: "http://127.0.0.1:1/vmlinuz"
      cmdline: 'farmsim.script="print second boot ok; poweroff"'
"#;
    let path = gw.write_job("continue.yml", job);
    let r = gw.farmctl_run(&["run", path_str(&path)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}", r.all());
    assert!(r.stdout.contains("first boot"), "{}", r.all());

    // overall expires whatever the retries.
    let path = gw.write_job(
        "overall.yml",
        &sim_job("print x; hang", "", "").replace("minutes: 2", "seconds: 2"),
    );
    let r = gw.farmctl_run(&["run", path_str(&path)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr.contains("overall timeout of 2.0 s expired"),
        "{}",
        r.all()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_expires_without_then_with_a_retry() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = r#"version: 1
target:
  tags: [sim]
timeouts:
  watchdogs:
    heartbeat:
      seconds: 1
console_patterns:
  session_end:
    regex: "reboot: Power Down"
  watchdogs:
    heartbeat:
      start:
        regex: "HB start"
      reset:
        regex: "HB"
      stop:
        regex: "HB stop"
deployment:
  start:
    kernel:
      url: "http://127.0.0.1:1/vmlinuz"
      cmdline: 'farmsim.script="print HB start; sleep 300; print HB; sleep 300; print HB; hang"'
"#;
    let path = gw.write_job("wd.yml", job);
    let r = gw.farmctl_run(&["run", path_str(&path)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr
            .contains("watchdog heartbeat timeout of 1.0 s expired"),
        "{}",
        r.all()
    );

    // With a retry: the first boot's heartbeat stops, the DUT is rebooted into the
    // `continue` deployment, whose heartbeat is stopped cleanly before the end.
    let job = job
        .replace("      seconds: 1\n", "      seconds: 1\n      retries: 1\n")
        .replace(
            "console_patterns:\n",
            "console_patterns:\n  job_success:\n    regex: \"all good\"\n",
        )
        + "  continue:\n    kernel:\n      url: \"http://127.0.0.1:1/vmlinuz\"\n      cmdline: 'farmsim.script=\"print HB start; print HB; print HB stop; sleep 1500; print all good; poweroff\"'\n";
    let path = gw.write_job("wd-retry.yml", &job);
    let r = gw.farmctl_run(&["run", path_str(&path)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}", r.all());
    assert!(
        r.stderr.contains("retry 1 of 1 for watchdog heartbeat"),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.contains("watchdog heartbeat stopped"),
        "{}",
        r.all()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reboot_power_cycles_and_uses_a_retry() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = r#"version: 1
target:
  tags: [sim]
timeouts:
  boot_cycle:
    minutes: 1
    retries: 1
console_patterns:
  session_end:
    regex: "reboot: Power Down"
  session_reboot:
    regex: "reboot: Restarting system"
  job_success:
    regex: "after reboot"
deployment:
  start:
    kernel:
      url: "http://127.0.0.1:1/vmlinuz"
      cmdline: 'farmsim.script="print installing; reboot"'
  continue:
    kernel:
      url: "http://127.0.0.1:1/vmlinuz"
      cmdline: 'farmsim.script="print after reboot; poweroff"'
"#;
    let path = gw.write_job("reboot.yml", job);
    let r = gw.farmctl_run(&["run", path_str(&path)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}", r.all());
    assert!(
        r.stderr.contains("session_reboot pattern matched"),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("Boot 2"), "{}", r.all());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfit_machine_goes_back_to_training_then_idle() {
    let gw = Gateway::start(
        GatewayOptions::default()
            .dut(1, &["sim"], true)
            .behaviour(1, Behaviour::Unfit)
            .env(
                "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
                "HARDWARE ERROR",
            ),
    )
    .await;
    let job = gw.write_job(
        "unfit.yml",
        &sim_job("print TESTS PASSED; poweroff", PASS_FAIL_WARN, ""),
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Incomplete), "{}", r.all());
    assert!(
        r.stderr.contains("machine_unfit_for_service"),
        "{}",
        r.all()
    );
    // Back to training; training keeps failing while the machine is unfit.
    let d = gw.dut(1).await;
    assert_eq!(d.state, DutState::Training, "{d:?}");
    assert!(!gw.mars().duts[&mac(1)].ready_for_service);
    // Repaired: training passes and the machine is in service again.
    gw.farm.set_behaviour(1, Behaviour::Healthy);
    gw.wait_state(1, DutState::Idle, LIMIT).await;
    assert!(gw.mars().duts[&mac(1)].ready_for_service);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_machine_trains_then_serves() {
    let gw = Gateway::start(
        GatewayOptions::default()
            .dut(2, &["sim"], false)
            .env("SERGENT_HARTMAN_BOOT_COUNT", "3")
            .env("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "3"),
    )
    .await;
    let d = gw.dut(2).await;
    assert!(
        matches!(d.state, DutState::Training),
        "a machine not ready for service trains first: {d:?}"
    );
    let d = gw.wait_state(2, DutState::Idle, LIMIT).await;
    assert!(d.record.ready_for_service);
    assert!(
        gw.mars().duts[&mac(2)].ready_for_service,
        "written to the MaRS file"
    );
    assert_eq!(
        gw.farm.boot_count(2),
        3,
        "three boot-loop rounds:\n{}",
        gw.logs()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmctl_dut_discover_says_when_no_machine_registers() {
    // The default boot of the harness does not register: nothing ever appears.
    let gw = Gateway::start(GatewayOptions::default()).await;
    let r = gw
        .farmctl_run_as(
            ADMIN,
            &[
                "dut",
                "discover",
                "--pdu",
                "SIM",
                "--port",
                "4",
                "--timeout",
                "2",
                "--wait",
            ],
            LIMIT,
        )
        .await;
    assert_eq!(r.code, Some(1), "{}", r.all());
    assert!(
        r.stderr
            .contains("no machine registered on SIM port 4 within 2 s"),
        "{}",
        r.all()
    );
    // Without the admin token: refused, and said so.
    let r = gw
        .farmctl_run(&["dut", "discover", "--pdu", "SIM", "--port", "4"], LIMIT)
        .await;
    assert_ne!(r.code, Some(0), "{}", r.all());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_enrolls_a_blank_port_which_registers_trains_and_serves() {
    // Port 3 is in no MaRS entry: the admin only knows which PDU port the new machine
    // is plugged into. The default boot configuration runs the (simulated)
    // registration program, then the boot-loop check.
    let gw = Gateway::start(
        GatewayOptions::default()
            .env(
                "BOOTS_DEFAULT_CMDLINE",
                "console=ttyS0 farmsim.script=\"register; print bootloop round; poweroff\"",
            )
            .env("SERGENT_HARTMAN_BOOT_COUNT", "2")
            .env("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "2")
            .env("FARMGATE_DEFAULT_PDU_OFF_DELAY", "0.2"),
    )
    .await;
    let discover = |token: &'static str| {
        gw.http
            .post(format!("{}/api/v1/dut/discover", gw.url()))
            .bearer_auth(token)
            .json(&serde_json::json!({"pdu": "SIM", "port_id": 3, "timeout": 60}))
            .send()
    };
    let r = discover(SUBMIT).await.expect("POST discover");
    assert_eq!(r.status(), 403, "discovery is an admin action");

    // What the admin types: the machine powers up, registers, is bound to SIM port 3
    // and trains; farmctl follows it until it is IDLE.
    let r = gw
        .farmctl_run_as(
            ADMIN,
            &[
                "dut",
                "discover",
                "--pdu",
                "SIM",
                "--port",
                "3",
                "--timeout",
                "60",
                "--wait",
            ],
            LIMIT,
        )
        .await;
    assert_eq!(r.code, Some(0), "{}\n{}", r.all(), gw.logs());
    assert!(r.all().contains("discovering SIM port 3"), "{}", r.all());
    assert!(r.all().contains("is IDLE"), "{}", r.all());
    let list = gw.farmctl_run(&["dut", "list"], LIMIT).await;
    assert_eq!(list.code, Some(0), "{}", list.all());
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with(&mac(3)) && l.contains("IDLE") && l.contains("SIM:3")),
        "{}",
        list.all()
    );
    let view = gw.wait_state(3, DutState::Idle, LIMIT).await;
    assert_eq!(view.record.pdu.as_deref(), Some("SIM"));
    assert_eq!(view.record.pdu_port_id.as_deref(), Some("3"));
    assert!(view.record.ready_for_service);
    assert_eq!(
        view.record.pdu_off_delay, 0.2,
        "FARMGATE_DEFAULT_PDU_OFF_DELAY"
    );
    assert_eq!(view.full_name, "testfarm-sim-1");
    assert!(
        view.record.tags.iter().any(|t| t == "farmsim:port:3"),
        "{view:?}"
    );
    let saved = &gw.mars().duts[&mac(3)];
    assert_eq!(
        saved.pdu_port_id.as_deref(),
        Some("3"),
        "written to the MaRS file"
    );
    assert!(saved.ready_for_service);
    // One boot for the registration, then two training rounds (each registers again,
    // which only refreshes the record).
    assert!(
        gw.farm.boot_count(3) >= 2,
        "boots: {}",
        gw.farm.boot_count(3)
    );
    // The discovery is over.
    let d: farmgate_wire::DiscoverState = gw.get_json("/api/v1/dut/discover").await;
    assert!(d.pdu.is_none(), "{d:?}");

    // And it serves jobs.
    let job = gw.write_job(
        "after-enroll.yml",
        &sim_job("print hello; poweroff", "", ""),
    );
    let r = gw
        .farmctl_run(&["run", "-i", &mac(3), path_str(&job)], LIMIT)
        .await;
    assert_eq!(r.code, code(JobStatus::Complete), "{}", r.all());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_running_job() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = gw.write_job(
        "long.yml",
        &sim_job("print working; sleep 60000; poweroff", "", ""),
    );
    let child = gw
        .farmctl(&["run", "-j", "long-job-1", path_str(&job)])
        .spawn()
        .expect("farmctl");
    gw.wait_state(1, DutState::Running, LIMIT).await;
    let r = gw.farmctl_run(&["cancel", "long-job-1"], LIMIT).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("farmctl ends")
        .expect("output");
    assert_eq!(out.status.code(), code(JobStatus::Incomplete));
    let view = gw.job("long-job-1").await;
    assert_eq!(view.status, Some(JobStatus::Incomplete));
    let reason = view.reason.unwrap_or_default();
    assert!(reason.contains("cancelled"), "{reason}\n{}", gw.logs());
    gw.wait_state(1, DutState::Idle, LIMIT).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_machine_and_busy_with_and_without_wait() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = gw.write_job(
        "pass.yml",
        &sim_job("print TESTS PASSED; poweroff", PASS_FAIL_WARN, ""),
    );
    let r = gw
        .farmctl_run(&["run", "-t", "no-such-gpu", path_str(&job)], LIMIT)
        .await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(r.stderr.contains("406"), "{}", r.all());
    assert!(r.stderr.contains("no-such-gpu"), "{}", r.all());

    let long = gw.write_job(
        "long.yml",
        &sim_job("print busy; sleep 3000; poweroff", "", ""),
    );
    let first = gw
        .farmctl(&["run", path_str(&long)])
        .spawn()
        .expect("farmctl");
    gw.wait_state(1, DutState::Running, LIMIT).await;
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, Some(7), "busy without -w is refused: {}", r.all());
    assert!(r.stderr.contains("409"), "{}", r.all());
    // With -w, it waits for the machine and runs.
    let r = gw.farmctl_run(&["run", "-w", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}", r.all());
    let out = first.wait_with_output().await.expect("first job");
    assert_eq!(out.status.code(), code(JobStatus::Complete));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_while_a_job_runs_loses_nothing() {
    let mut gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = gw.write_job(
        "survive.yml",
        &sim_job(
            "print part one; sleep 4000; print part two; print TESTS PASSED; poweroff",
            PASS_FAIL_WARN,
            "",
        ),
    );
    let child = gw
        .farmctl(&["run", "-j", "survivor", path_str(&job)])
        .spawn()
        .expect("farmctl");
    gw.wait_state(1, DutState::Running, LIMIT).await;
    gw.kill_daemon();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.start_daemon().await;
    let out = tokio::time::timeout(LIMIT, child.wait_with_output()).await;
    let Ok(out) = out else {
        panic!(
            "farmctl did not end; job: {:?}\n{}",
            gw.job("survivor").await,
            gw.logs()
        );
    };
    let out = out.expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        code(JobStatus::Pass),
        "{stdout}\n{stderr}\n{}",
        gw.logs()
    );
    assert!(stdout.contains("part two"), "{stdout}");
    let view = gw.job("survivor").await;
    assert_eq!(view.status, Some(JobStatus::Pass));
    gw.wait_state(1, DutState::Idle, LIMIT).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_and_checked() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = gw.write_job("pass.yml", &sim_job("poweroff", "", ""));
    let mut cmd = tokio::process::Command::new(farmctl_exe());
    let out = cmd
        .args(["--url", &gw.url(), "run", path_str(&job)])
        .env_remove("FARMGATE_TOKEN")
        .output()
        .await
        .expect("farmctl");
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = tokio::process::Command::new(farmctl_exe())
        .args([
            "--url",
            &gw.url(),
            "--token",
            "wrong",
            "run",
            path_str(&job),
        ])
        .output()
        .await
        .expect("farmctl");
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    // The submit token cannot retire a machine; the admin token can.
    let r = gw.farmctl_run(&["retire", &mac(1)], LIMIT).await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    let out = tokio::process::Command::new(farmctl_exe())
        .args(["--url", &gw.url(), "--token", ADMIN, "retire", &mac(1)])
        .output()
        .await
        .expect("farmctl");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.wait_state(1, DutState::Retired, LIMIT).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_is_refused_with_the_line() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    let job = gw.write_job(
        "bad.yml",
        "version: 1\nconsole_patterns:\n  session_end:\n    regex: x\ndeployment:\n  start:\n    kernel:\n      url: http://x/k\ntimeouts:\n  overall:\n    minutes: ten\n",
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(r.stderr.contains("400"), "{}", r.all());
    assert!(r.stderr.contains("line 11"), "{}", r.all());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_serves_the_boot_root_and_nothing_outside_it() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let root = gw.dir.path().join("tftp");
    std::fs::write(root.join("ipxe.efi"), b"not really ipxe\n").expect("write");
    std::fs::write(gw.dir.path().join("secret"), b"secret\n").expect("write");
    let fetch = |name: &str| {
        let out = gw.dir.path().join("fetched");
        let _ = std::fs::remove_file(&out);
        let status = std::process::Command::new("curl")
            .args(["-s", "--fail", "--path-as-is", "--max-time", "10", "-o"])
            .arg(&out)
            .arg(format!("tftp://127.0.0.1:{}/{name}", gw.tftp_port))
            .status()
            .expect("curl runs");
        (status.success(), std::fs::read(&out).unwrap_or_default())
    };
    assert_eq!(fetch("ipxe.efi"), (true, b"not really ipxe\n".to_vec()));
    let (ok, body) = fetch("../secret");
    assert!(
        !ok && body.is_empty(),
        "a path outside BOOTS_TFTP_ROOT is refused"
    );
    let (ok, _) = fetch("missing.efi");
    assert!(!ok, "a missing file is an error");
    // PXE firmware's iPXE comes from Debian's ipxe package (scripts/setup.sh installs
    // it), copied into the root at start.
    let (ok, body) = fetch("undionly.kpxe");
    assert!(ok, "undionly.kpxe is served");
    assert_eq!(
        body,
        std::fs::read("/usr/lib/ipxe/undionly.kpxe").expect("Debian's ipxe package")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_that_stops_answering_makes_its_duts_unavailable_until_it_answers() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    // A second PDU, driven by shell commands over files: `down` makes it fail,
    // `stuck` makes its relay ignore "on".
    let dir = gw.dir.path().join("flaky");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = dir.display();
    let mut db = gw.mars();
    let cfg: std::collections::BTreeMap<String, farmgate_wire::YamlValue> = [
        (
            "on",
            format!(
                "test ! -e {d}/down && {{ test -e {d}/stuck || {{ echo on > {d}/p{{port}}; date +%s.%N >> {d}/on.log; }}; }}"
            ),
        ),
        (
            "off",
            format!("test ! -e {d}/down && echo off > {d}/p{{port}} && date +%s.%N >> {d}/off.log"),
        ),
        (
            "status",
            format!("test ! -e {d}/down && {{ cat {d}/p{{port}} 2>/dev/null || echo off; }}"),
        ),
        ("ports", "2".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), farmgate_wire::YamlValue::String(v)))
    .collect();
    db.pdus.insert(
        "FLAKY".into(),
        farmgate_wire::PduRecord {
            driver: "shell".into(),
            config: cfg,
            reserved_port_ids: vec![],
            port_labels: Default::default(),
        },
    );
    let mut rec = db.duts.get(&mac(1)).expect("dut 1").clone();
    rec.pdu = Some("FLAKY".into());
    rec.pdu_port_id = Some("0".into());
    rec.pdu_off_delay = 1.5;
    let flaky_dut = "52:54:00:aa:bb:01".to_string();
    db.duts.insert(flaky_dut.clone(), rec);
    std::fs::write(gw.mars_path(), serde_yaml_ng::to_string(&db).expect("yaml")).expect("write");

    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(ADMIN);
    let port_url = format!("{}/api/v1/pdu/FLAKY/port/0", gw.url());
    // The PDU is followed: its ports and states answer from the monitor.
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = gw.http.get(&port_url).send().await.expect("GET port");
        if r.status().is_success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "FLAKY never listed: {}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A switch answers once the port reads back on.
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"state": "on"}))
        .send()
        .await
        .expect("PATCH on");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["state"], "on", "{v}");
    assert_eq!(
        std::fs::read_to_string(dir.join("p0")).unwrap_or_default(),
        "on\n"
    );
    // Off, then a relay that does not switch: never a 200.
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"state": "off"}))
        .send()
        .await
        .expect("PATCH off");
    assert_eq!(r.status(), 200);
    // On again: not before the machine's minimum off time (its pdu_off_delay, 1.5 s)
    // since the off, as the commands' own clock shows.
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"state": "on"}))
        .send()
        .await
        .expect("PATCH on again");
    assert_eq!(r.status(), 200);
    let last = |f: &str| -> f64 {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_default()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no time in {f}"))
    };
    let off_for = last("on.log") - last("off.log");
    assert!(off_for >= 1.4, "switched on again after {off_for} s off");
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"state": "off"}))
        .send()
        .await
        .expect("PATCH off again");
    assert_eq!(r.status(), 200);
    std::fs::write(dir.join("stuck"), "").expect("stuck");
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"state": "on"}))
        .send()
        .await
        .expect("PATCH on, stuck");
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap_or_default();
    assert!(
        body.contains("PDU FLAKY") && body.contains("port 0") && body.contains("still reads off"),
        "{body}"
    );
    std::fs::remove_file(dir.join("stuck")).expect("unstuck");

    // A reserved port sets its machine aside: no job, no training, and it says why.
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"reserved": true}))
        .send()
        .await
        .expect("reserve");
    assert_eq!(r.status(), 200);
    let dut: farmgate_wire::DutView = gw.get_json(&format!("/api/v1/dut/{flaky_dut}")).await;
    assert!(
        dut.unavailable
            .as_deref()
            .is_some_and(|w| w.contains("reserved")),
        "{dut:?}"
    );
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"reserved": false, "label": "bad\u{1b}[2J"}))
        .send()
        .await
        .expect("bad label");
    assert_eq!(r.status(), 400, "a control character in a label is refused");
    let dut: farmgate_wire::DutView = gw.get_json(&format!("/api/v1/dut/{flaky_dut}")).await;
    assert!(dut.unavailable.is_some(), "a refused PATCH changes nothing");
    let r = admin(gw.http.patch(&port_url))
        .json(&serde_json::json!({"reserved": false}))
        .send()
        .await
        .expect("release");
    assert_eq!(r.status(), 200);
    let dut: farmgate_wire::DutView = gw.get_json(&format!("/api/v1/dut/{flaky_dut}")).await;
    assert!(dut.unavailable.is_none(), "{dut:?}");

    // The PDU stops answering: its DUT is unavailable, with the reason; the other
    // DUT is not affected.
    std::fs::write(dir.join("down"), "").expect("down");
    let deadline = Instant::now() + LIMIT;
    let why = loop {
        let duts: farmgate_wire::DutList = gw.get_json("/api/v1/duts").await;
        if let Some(w) = duts
            .duts
            .get(&flaky_dut)
            .and_then(|d| d.unavailable.clone())
        {
            assert!(duts.duts[&mac(1)].unavailable.is_none());
            break w;
        }
        assert!(
            Instant::now() < deadline,
            "never unavailable: {}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        why.contains("PDU FLAKY does not answer since") && why.contains("exit"),
        "{why}"
    );
    let pdu: serde_json::Value = gw.get_json("/api/v1/pdu/FLAKY").await;
    assert!(
        pdu["down"]
            .as_str()
            .is_some_and(|s| s.contains("does not answer")),
        "{pdu}"
    );
    assert!(
        pdu["counters"]["reads_failed"].as_u64().unwrap_or(0) >= 3,
        "{pdu}"
    );
    // A job for that machine waits in the queue instead of failing on a dead PDU.
    let job = gw.write_job(
        "flaky.yml",
        &sim_job("print hi; poweroff", "", "")
            .replace("tags: [sim]", &format!("id: \"{flaky_dut}\"")),
    );
    let mut waiting = gw
        .farmctl(&["run", "-w", "-j", "flaky-job-1", path_str(&job)])
        .spawn()
        .expect("farmctl");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let view = gw.job("flaky-job-1").await;
    assert_eq!(view.status, None, "queued, not run: {view:?}");
    assert!(
        view.dut_id.is_none(),
        "not assigned while the PDU is down: {view:?}"
    );
    let r = gw.farmctl_run(&["cancel", "flaky-job-1"], LIMIT).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    let _ = tokio::time::timeout(LIMIT, waiting.wait()).await;
    // It answers again: nobody has to do anything.
    std::fs::remove_file(dir.join("down")).expect("up");
    let deadline = Instant::now() + LIMIT;
    loop {
        let duts: farmgate_wire::DutList = gw.get_json("/api/v1/duts").await;
        if duts
            .duts
            .get(&flaky_dut)
            .is_some_and(|d| d.unavailable.is_none())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never available again: {}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmctl_pdu_lists_drivers_adds_checks_switches_reserves_and_labels() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let run = |args: &'static [&'static str]| gw.farmctl_run_as(ADMIN, args, LIMIT);
    let r = run(&["pdu", "drivers"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(
        r.stdout.contains("apc_masterswitch:") && r.stdout.contains("community"),
        "{}",
        r.all()
    );
    // The gateway talks to a PDU before adding it.
    let r = run(&["pdu", "add", "DEAD", "vpdu", "hostname=127.0.0.1:1"]).await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(
        r.stderr.contains("502") && r.stderr.contains("PDU DEAD"),
        "{}",
        r.all()
    );
    let r = run(&["pdu", "add", "ODD", "no_such_driver"]).await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(r.stderr.contains("unknown driver"), "{}", r.all());
    assert!(!gw.mars().pdus.contains_key("DEAD") && !gw.mars().pdus.contains_key("ODD"));
    // Only the admin adds PDUs.
    let r = gw
        .farmctl_run(&["pdu", "add", "X", "dummy", "ports=2"], LIMIT)
        .await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(
        r.stderr.contains("401") || r.stderr.contains("403"),
        "{}",
        r.all()
    );

    let dir = gw.dir.path().join("files");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = dir.display().to_string();
    let on = format!("on=test -e {d}/stuck || echo on > {d}/p{{port}}");
    let off = format!("off=echo off > {d}/p{{port}}");
    let status = format!("status=cat {d}/p{{port}} 2>/dev/null || echo off");
    let r = gw
        .farmctl_run_as(
            ADMIN,
            &[
                "pdu", "add", "FILES", "shell", &on, &off, &status, "ports=2",
            ],
            LIMIT,
        )
        .await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(r.stderr.contains("added with 2 ports"), "{}", r.all());
    assert_eq!(gw.mars().pdus["FILES"].driver, "shell");

    let r = run(&["pdu", "port", "FILES", "1", "on"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert_eq!(
        std::fs::read_to_string(dir.join("p1")).unwrap_or_default(),
        "on\n"
    );
    // A reserved port refuses changes.
    let r = run(&["pdu", "port", "FILES", "1", "reserve"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    let r = run(&["pdu", "port", "FILES", "1", "off"]).await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(r.stderr.contains("reserved"), "{}", r.all());
    assert_eq!(
        std::fs::read_to_string(dir.join("p1")).unwrap_or_default(),
        "on\n"
    );
    let r = run(&["pdu", "port", "FILES", "1", "release"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    let r = run(&["pdu", "port", "FILES", "1", "off"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    // A relay that does not switch: the command fails, naming the PDU and port. (Port
    // 0: port 1 was just switched off and would first wait for its minimum off time.)
    std::fs::write(dir.join("stuck"), "").expect("stuck");
    let r = run(&["pdu", "port", "FILES", "0", "on"]).await;
    assert_eq!(r.code, Some(7), "{}", r.all());
    assert!(
        r.stderr.contains("502")
            && r.stderr.contains("port 0")
            && r.stderr.contains("still reads off"),
        "{}",
        r.all()
    );
    let r = run(&["pdu", "port", "FILES", "0", "label", "bench shelf 2"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert_eq!(gw.mars().pdus["FILES"].port_labels["0"], "bench shelf 2");
    let r = run(&["pdu", "list"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(r.stdout.contains("FILES (shell): answering"), "{}", r.all());
    assert!(
        r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("0 ") && l.ends_with("bench shelf 2")),
        "{}",
        r.all()
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains(" off ")),
        "{}",
        r.all()
    );
    let r = run(&["pdu", "remove", "FILES"]).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(!gw.mars().pdus.contains_key("FILES"));
    gw.stop().await;
}
