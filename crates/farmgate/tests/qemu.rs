//! End-to-end tests on real (virtual) machines: QEMU DUTs behind the `qemu` PDU driver
//! netboot through their NIC's iPXE ROM, fetch their boot script, kernel and initramfs
//! from the gateway over HTTP, and print on a serial port that connects to SALAD's
//! network console port. Nothing here is simulated: the kernel is the host's Debian
//! kernel, the initramfs is built by `farmgate-mkinitramfs`.
//!
//! QEMU runs with TCG (software emulation), so each boot takes seconds.

mod common;

use std::time::{Duration, Instant};

use common::*;
use farmgate_wire::{DutState, JobStatus};

const LIMIT: Duration = Duration::from_secs(300);

fn code(s: JobStatus) -> Option<i32> {
    Some(s.exit_code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dut_netboots_and_the_job_passes_on_its_pattern() {
    let gw = Gateway::start(GatewayOptions::default().qemu_dut(0, &["qemu"], true)).await;
    let job =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-job.yml.j2");
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}\n{}", r.all(), gw.logs());
    // The console was relayed from the kernel's first lines (bound by its command line)
    // to the init's output, and the job ended on the kernel's power-off line.
    for expected in [
        "Linux version",
        "SALAD.machine_id=52:54:00:11:22:00",
        "Hello from 52:54:00:11:22:00",
        "JOB RESULT: 42",
        "reboot: Power down",
    ] {
        assert!(
            r.stdout.contains(expected),
            "no {expected:?} in:\n{}",
            r.all()
        );
    }
    assert!(r.stderr.contains("finished: PASS"), "{}", r.all());
    // The console is kept with the job, every line timestamped.
    let id = r
        .stderr
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .expect("job id in farmctl's messages")
        .to_string();
    let log = gw.get_text(&format!("/api/v1/job/{id}/console.log")).await;
    let line = log
        .lines()
        .find(|l| l.ends_with("JOB RESULT: 42"))
        .unwrap_or_else(|| panic!("no result line in:\n{log}"));
    assert!(
        line.starts_with("[20") && line.contains("] JOB RESULT"),
        "{line}"
    );
    assert!(log.contains("] [farmgate] Boot 1: power cycling"), "{log}");
    let d = gw.wait_state(0, DutState::Idle, LIMIT).await;
    assert!(d.current_job.is_none());
    // The machine was powered off at teardown: its QEMU is gone (the gateway's view of
    // the port comes from its polls, about once a second).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pdu: serde_json::Value = gw.get_json("/api/v1/pdu/QEMU/port/0").await;
        if pdu["state"] == "off" {
            assert!(pdu["last_change"].is_string(), "{pdu}");
            break;
        }
        assert!(Instant::now() < deadline, "port still on: {pdu}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_kernel_panic_uses_the_boot_cycle_retry_then_ends_incomplete() {
    let gw = Gateway::start(GatewayOptions::default().qemu_dut(0, &["qemu"], true)).await;
    let job = gw.write_job(
        "panic.yml.j2",
        r#"version: 1
target:
  tags: [qemu]
timeouts:
  boot_cycle:
    minutes: 3
    retries: 1
console_patterns:
  session_end:
    regex: "reboot: Power down"
  session_reboot:
    regex: "Kernel panic - not syncing"
  job_success:
    regex: "JOB RESULT: 42"
deployment:
  start:
    kernel:
      url: "{{ job.http.url }}/boot/vmlinuz"
      cmdline: 'console=ttyS0 panic=0 farmgate.run="echo triggering a crash; echo c > /proc/sysrq-trigger"'
    initramfs:
      - url: "{{ job.http.url }}/boot/initramfs.cpio.gz"
"#,
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(
        r.code,
        code(JobStatus::Incomplete),
        "{}\n{}",
        r.all(),
        gw.logs()
    );
    // Two boots (the first and its retry), each ending in a panic. (The kernel's
    // closing "---[ end Kernel panic" line may or may not be relayed before the power
    // is cut, so it is not counted.)
    let boots = r.stdout.matches("] Linux version").count();
    let panics = r
        .stdout
        .lines()
        .filter(|l| l.contains("Kernel panic - not syncing") && !l.contains("end Kernel panic"))
        .count();
    assert_eq!(
        (boots, panics),
        (2, 2),
        "one boot and one retry expected:\n{}",
        r.all()
    );
    assert!(
        r.stderr.contains("session_reboot"),
        "the reason is reported:\n{}",
        r.all()
    );
    gw.stop().await;
}

/// The path of a physical DUT: no QEMU user-mode network. The gateway runs in a network
/// namespace with a bridge `private` (PRIVATE_INTERFACE); the QEMU machine's NIC is a tap
/// on that bridge. Its iPXE ROM gets an address and the boot script URL from the
/// gateway's own DHCP server, and the booted kernel's DHCP client gets its address there
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dut_on_a_tap_gets_address_and_boot_file_from_the_gateway_dhcp() {
    let gw = Gateway::start(
        GatewayOptions {
            private_net: true,
            ..GatewayOptions::default()
        }
        .qemu_dut(0, &["qemu"], true),
    )
    .await;
    std::fs::write(
        gw.dir.path().join("tftp/hello.txt"),
        "job storage over HTTP works\n",
    )
    .expect("write a boot file");
    let job = gw.write_job(
        "tap.yml.j2",
        r#"version: 1
target:
  tags: [qemu]
timeouts:
  boot_cycle:
    minutes: 4
console_patterns:
  session_end:
    regex: "reboot: Power down"
  job_success:
    regex: "JOB RESULT: 42"
deployment:
  start:
    kernel:
      url: "{{ job.http.url }}/boot/vmlinuz"
      cmdline: 'console=ttyS0 panic=-1 farmgate.net farmgate.run="ip -4 addr show dev eth0; wget -q -O - {{ job.http.url }}/api/v1/dut/{{ machine_id }}/storage/notes/hello.txt; tftp -g -r cfg/greeting -l /tmp/g 10.42.0.1; cat /tmp/g; echo JOB RESULT: $((40+2))"'
    initramfs:
      - url: "{{ job.http.url }}/boot/initramfs.cpio.gz"
    storage:
      http:
        - path: 'notes/(.*)\.txt'
          url: '{{ job.http.url }}/boot/\1.txt'
      tftp:
        - path: cfg/greeting
          data: "job storage over TFTP works"
"#,
    );
    let r = gw.farmctl_run(&["run", path_str(&job)], LIMIT).await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}\n{}", r.all(), gw.logs());
    // iPXE asked the gateway's DHCP (the firmware boot is complete there), then the
    // kernel's own DHCP client got an address of the private network from it.
    assert!(
        r.stderr
            .contains("firmware boot complete: DHCP request from iPXE (address 10.42.0."),
        "{}",
        r.all()
    );
    assert!(
        r.stderr
            .contains("DHCP request from the DUT's OS (address 10.42.0."),
        "{}",
        r.all()
    );
    assert!(r.stdout.contains("inet 10.42.0."), "{}", r.all());
    // The job's storage reached the DUT: over HTTP (a regex path whose group picks the
    // URL the gateway fetches for it) and over TFTP (inline data, for that DUT only).
    assert!(
        r.stdout.contains("job storage over HTTP works"),
        "{}",
        r.all()
    );
    assert!(
        r.stdout.contains("job storage over TFTP works"),
        "{}",
        r.all()
    );
    // This test reaches the gateway from outside the farm's networks (over the veth):
    // the DUT-facing endpoints are not for it, unless it shows the admin token.
    let boot = format!("{}/api/v1/dut/{}/boot.ipxe", gw.url(), qemu_mac(0));
    let r = gw.http.get(&boot).send().await.expect("GET boot.ipxe");
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("FARMGATE_DUT_NETWORKS"), "{text}");
    let r = gw
        .http
        .get(&boot)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET boot.ipxe as admin");
    assert_ne!(r.status(), 403, "the admin may look");
    gw.stop().await;
}

/// CI-tron's enrolment on a real machine: a blank port of the QEMU PDU is discovered;
/// the machine netboots the farm's default configuration (the test initramfs in
/// registration mode), finds the gateway over its own network, prints
/// `SALAD.machine_id=` and POSTs its registration; it is bound to that PDU port, trained
/// by Sergeant Hartman, then serves a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_blank_port_is_discovered_registers_trains_and_serves() {
    let opts = GatewayOptions {
        qemu_ports: 2,
        ..GatewayOptions::default()
    };
    // The harness's default boot configuration for QEMU farms is the test initramfs
    // with `farmgate.register=<gateway>`.
    let gw = Gateway::start(
        opts.env("SERGENT_HARTMAN_BOOT_COUNT", "1")
            .env("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "1")
            .env("FARMGATE_DEFAULT_PDU_OFF_DELAY", "0.5"),
    )
    .await;
    let view = discover_qemu_port_until_idle(&gw, 1).await;
    assert_eq!(view.record.base_name.as_deref(), Some("qemu"));
    assert_eq!(
        view.record.pdu_off_delay, 0.0,
        "a QEMU machine needs no minimum off time (FARMGATE_DEFAULT_PDU_OFF_DELAY is 0.5 here)"
    );
    assert!(
        view.record
            .ip_address
            .as_deref()
            .is_some_and(|a| a.starts_with("10.42.0.")),
        "{view:?}"
    );
    assert!(
        view.record.tags.iter().any(|t| t == "virtio:family:VIRTIO"),
        "{view:?}"
    );
    let job =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-job.yml.j2");
    // The job targets tag `qemu`, which the registration did not give: `-t` overrides.
    let r = gw
        .farmctl_run(
            &["run", "-t", "virtio:family:VIRTIO", path_str(&job)],
            LIMIT,
        )
        .await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}\n{}", r.all(), gw.logs());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_blank_port_enrolled_by_the_dut_agent_registration_and_check_mode() {
    // The default boot runs farm-agent in registration mode: hardware tags from the
    // machine's own /proc and /sys, its console found by SALAD's ping/pong on ttyS0 and
    // bound, then POST /api/v1/dut/. Training rounds run its check mode.
    let opts = GatewayOptions {
        qemu_ports: 2,
        qemu_agent: true,
        ..GatewayOptions::default()
    };
    let gw = Gateway::start(
        opts.env("SERGENT_HARTMAN_BOOT_COUNT", "3")
            .env("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "3")
            .env("FARMGATE_DEFAULT_PDU_OFF_DELAY", "0.5"),
    )
    .await;
    let view = discover_qemu_port_until_idle(&gw, 1).await;
    // The agent's tags (not the shell registration's): CPU, memory, virtio.
    for want in ["virtio:family:VIRTIO", "cpu:arch:x86_64"] {
        assert!(
            view.record.tags.iter().any(|t| t == want),
            "{want}: {view:?}"
        );
    }
    assert!(
        view.record.tags.iter().any(|t| t.starts_with("mem:size:")),
        "{view:?}"
    );
    assert_eq!(view.record.base_name.as_deref(), Some("virtio"), "{view:?}");
    assert_eq!(
        view.record.local_tty_device.as_deref(),
        Some("ttyS0"),
        "{view:?}"
    );
    assert!(
        view.record
            .ip_address
            .as_deref()
            .is_some_and(|a| a.starts_with("10.42.0.")),
        "{view:?}"
    );
    // The training rounds ran the agent's check mode.
    let jobs: serde_json::Value = gw.get_json("/api/v1/jobs?limit=20").await;
    let training: Vec<String> = jobs["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["kind"] == "training")
        .filter_map(|j| j["job_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(training.len(), 3, "{jobs}");
    for t in &training {
        let log = gw.get_text(&format!("/api/v1/job/{t}/console.log")).await;
        assert!(log.contains("farm-agent: check passed"), "{log}");
        assert!(log.contains("starting as the machine's init"), "{log}");
    }
    gw.stop().await;
}

/// Discovers QEMU port `port` (blank machine) and waits until its DUT is IDLE, bound to
/// that port.
async fn discover_qemu_port_until_idle(gw: &Gateway, port: u32) -> farmgate_wire::DutView {
    // What the admin types: `farmctl dut discover … --wait` returns once the machine
    // registered, trained and is IDLE.
    let port_s = port.to_string();
    let r = gw
        .farmctl_run_as(
            ADMIN,
            &[
                "dut",
                "discover",
                "--pdu",
                "QEMU",
                "--port",
                &port_s,
                "--timeout",
                "240",
                "--wait",
            ],
            LIMIT,
        )
        .await;
    assert_eq!(r.code, Some(0), "{}\n{}", r.all(), gw.logs());
    assert!(r.stderr.contains("is IDLE"), "{}", r.all());
    let list = gw.farmctl_run(&["dut", "list"], LIMIT).await;
    assert!(
        list.stdout.lines().any(|l| l.starts_with(&qemu_mac(port))
            && l.contains("IDLE")
            && l.contains(&format!("QEMU:{port}"))),
        "{}",
        list.all()
    );
    let view = gw
        .wait_dut_id(&qemu_mac(port), "IDLE", LIMIT, |d| {
            d.state == DutState::Idle
        })
        .await;
    assert_eq!(view.record.pdu.as_deref(), Some("QEMU"));
    assert_eq!(
        view.record.pdu_port_id.as_deref(),
        Some(port.to_string().as_str())
    );
    view
}

/// A gateway whose QEMU machine on port 0 (tag `qemu`) boots the published agent image,
/// with a registry upstream holding `test/box:v1` (busybox); `disk_size` gives the
/// machine a disk. Returns the gateway, the upstream (kept alive) and the image as the
/// machine names it (through the gateway's registry cache).
async fn agent_gateway(disk_size: Option<&str>) -> (Gateway, Upstream, String) {
    let up = upstream_with_busybox_image().await;
    let opts = GatewayOptions {
        qemu_agent: true,
        qemu_disk_size: disk_size.map(str::to_string),
        ..GatewayOptions::default()
    }
    .qemu_dut(0, &["qemu"], true)
    .env(
        "FARMGATE_REGISTRY_UPSTREAMS",
        &format!("local=http://127.0.0.1:{}", up.port),
    );
    let gw = Gateway::start(opts).await;
    let image = format!("docker://10.42.0.1:{}/local/test/box:v1", gw.registry_port);
    (gw, up, image)
}

/// A job booting the published agent image with `b2c` options, passing when the
/// pipeline's status is 0.
fn b2c_job(gw: &Gateway, name: &str, b2c: &str) -> std::path::PathBuf {
    gw.write_job(
        name,
        &format!(
            r#"version: 1
target:
  tags: [qemu]
timeouts:
  boot_cycle:
    minutes: 5
console_patterns:
  session_end:
    regex: "reboot: Power down"
  job_success:
    regex: "Execution is over, pipeline status: 0"
deployment:
  start:
    kernel:
      url: "{{{{ job.http.url }}}}/boot/default_x86_64_kernel"
      cmdline: 'console=ttyS0 panic=-1 {b2c}'
    initramfs:
      - url: "{{{{ job.http.url }}}}/boot/default_x86_64_initrd"
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_job_container_through_the_registry_cache_writes_into_the_share_directory() {
    let (gw, _up, image) = agent_gateway(None).await;
    let b2c_job = |name: &str, container: &str| {
        b2c_job(
            &gw,
            name,
            &format!(
                "b2c.minio=\"job,{{{{ minio_url }}}},{{{{ job_bucket_access_key }}}},{{{{ job_bucket_secret_key }}}}\" b2c.volume=\"job,mirror=job/{{{{ job_bucket }}}},pull_on=pipeline_start,push_on=container_end\" b2c.container=\"--tls-verify=false -v job:/job {image} {container}\""
            ),
        )
    };
    let job = b2c_job(
        "b2c.yml.j2",
        "sh -c ''cat /job/in.txt > /job/out.txt; echo container done''",
    );
    let share = gw.dir.path().join("share");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::write(share.join("in.txt"), "from the user's machine\n").expect("in.txt");
    let r = gw
        .farmctl_run(&["run", "-s", path_str(&share), path_str(&job)], LIMIT)
        .await;
    assert_eq!(r.code, code(JobStatus::Pass), "{}\n{}", r.all(), gw.logs());
    assert!(r.stdout.contains("container done"), "{}", r.all());
    // The image of `farmgate image build`: the agent is the machine's init and brought
    // the network up itself.
    for want in [
        "starting as the machine's init",
        "network eth0 10.42.0.",
        "machine ready",
    ] {
        assert!(r.stdout.contains(want), "{want}: {}", r.all());
    }
    // What the container wrote came back into the user's directory.
    assert_eq!(
        std::fs::read_to_string(share.join("out.txt")).unwrap_or_default(),
        "from the user's machine\n",
        "{}",
        r.all()
    );
    // A failing container: the pipeline's status is its exit code, the job fails.
    let failing = b2c_job("b2c-fail.yml.j2", "sh -c ''echo failing now; exit 3''");
    let r = gw
        .farmctl_run(&["run", "-s", path_str(&share), path_str(&failing)], LIMIT)
        .await;
    assert_eq!(r.code, code(JobStatus::Fail), "{}\n{}", r.all(), gw.logs());
    assert!(
        r.stdout.contains("failing now")
            && r.stdout.contains("Execution is over, pipeline status: 3"),
        "{}",
        r.all()
    );
    // The image came through the gateway's registry cache.
    let stats: serde_json::Value = gw
        .http
        .get(format!("{}/metrics", gw.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .map(|t| serde_json::json!(t))
        .expect("text");
    let text = stats.as_str().unwrap_or_default();
    assert!(
        text.lines().any(|l| l
            .starts_with("farmgate_registry_requests_total{object=\"blob\",result=\"miss\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );
    gw.stop().await;
}

/// The sum of the gateway's registry blob request counters (hits, misses, coalesced).
async fn registry_blob_requests(gw: &Gateway) -> f64 {
    let text = gw.get_text("/metrics").await;
    let counts: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("farmgate_registry_requests_total{object=\"blob\""))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("bad metrics line {l:?}"))
        })
        .collect();
    assert_eq!(counts.len(), 3, "blob counters in:\n{text}");
    counts.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_cache_partition_is_made_once_and_reused_by_the_next_job() {
    let (gw, _up, image) = agent_gateway(Some("256M")).await;
    let job = |name: &str, word: &str| {
        b2c_job(
            &gw,
            name,
            &format!(
                "b2c.cache_device=auto b2c.swap=16M b2c.container=\"--tls-verify=false {image} sh -c ''echo container {word} done''\""
            ),
        )
    };
    let cache_line = |out: &str| -> String {
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("farm-agent: cache:"))
            .collect();
        assert_eq!(lines.len(), 1, "one cache line in:\n{out}");
        lines[0].trim_end().to_string()
    };

    // Job 1: the disk is blank; the agent partitions and formats it, and makes the swap file.
    let first = job("cache-1.yml.j2", "one");
    let r1 = gw.farmctl_run(&["run", path_str(&first)], LIMIT).await;
    assert_eq!(
        r1.code,
        code(JobStatus::Pass),
        "{}\n{}",
        r1.all(),
        gw.logs()
    );
    assert!(r1.stdout.contains("container one done"), "{}", r1.all());
    let line = cache_line(&r1.stdout);
    assert!(
        line.ends_with(
            "farm-agent: cache: /dev/vda1 (B2C_CACHE) mounted at /storage \
             (new partition on a blank disk, formatted ext4)"
        ),
        "{line}\n{}",
        r1.all()
    );
    assert!(
        r1.stdout.lines().any(|l| l
            .trim_end()
            .ends_with("farm-agent: swap: /storage/swapfile (16777216 bytes) in use")),
        "{}",
        r1.all()
    );
    // The image's blobs came through the gateway's registry cache.
    let blobs_after_1 = registry_blob_requests(&gw).await;
    assert!(blobs_after_1 >= 2.0, "config + layer: {blobs_after_1}");
    gw.wait_state(0, DutState::Idle, LIMIT).await;

    // Job 2, same machine, same disk: the partition is found as it is, not formatted
    // again, and the image's blobs come from the blob cache on it.
    let second = job("cache-2.yml.j2", "two");
    let r2 = gw.farmctl_run(&["run", path_str(&second)], LIMIT).await;
    assert_eq!(
        r2.code,
        code(JobStatus::Pass),
        "{}\n{}",
        r2.all(),
        gw.logs()
    );
    assert!(r2.stdout.contains("container two done"), "{}", r2.all());
    // Job 1 powered off with the cache unmounted: no journal to replay.
    assert!(
        !r2.stdout.contains("EXT4-fs (vda1): recovery complete"),
        "{}",
        r2.all()
    );
    let line = cache_line(&r2.stdout);
    assert!(
        line.ends_with("farm-agent: cache: /dev/vda1 (B2C_CACHE) mounted at /storage"),
        "{line}\n{}",
        r2.all()
    );
    assert!(!line.contains("formatted"), "{line}");
    assert!(
        r2.stdout.lines().any(|l| l.trim_end().ends_with(
            "farm-agent: swap: /storage/swapfile (16777216 bytes, existing file) in use"
        )),
        "{}",
        r2.all()
    );
    let blobs_after_2 = registry_blob_requests(&gw).await;
    assert_eq!(
        blobs_after_2,
        blobs_after_1,
        "job 2 asked the gateway's registry for blobs\n{}",
        r2.all()
    );
    gw.stop().await;
}
