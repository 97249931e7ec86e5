//! End-to-end harness: a real `farmgate serve` process, a simulated farm (virtual PDU
//! server, DUTs on ptys fetching their boot scripts over HTTP) and the real `farmctl`.
//!
//! Each test gets its own temp dir, ports, MaRS file and database; nothing is shared.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use farmgate_testkit::{Behaviour, SimFarm, SimFarmConfig};
use farmgate_wire::{DutRecord, DutState, DutView, JobView, MarsDb, PduRecord};

pub const ADMIN: &str = "admin-token-for-tests";
pub const SUBMIT: &str = "submit-token-for-tests";

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A free UDP port on loopback (bound then released).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

pub fn farmgate_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_farmgate"))
}

/// farmctl is another package of the workspace, built beside farmgate.
pub fn farmctl_exe() -> PathBuf {
    let p = farmgate_exe().with_file_name("farmctl");
    assert!(
        p.exists(),
        "{} is missing: build the whole workspace (cargo build --workspace) before these tests",
        p.display()
    );
    p
}

pub struct GatewayOptions {
    pub ports: u32,
    /// DUTs in the MaRS file: port -> (tags, ready_for_service).
    pub duts: BTreeMap<u32, (Vec<String>, bool)>,
    pub env: Vec<(String, String)>,
    pub behaviours: BTreeMap<u32, Behaviour>,
    /// `pdu_off_delay` of every DUT, in seconds.
    pub off_delay: f64,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            ports: 4,
            duts: BTreeMap::new(),
            env: vec![],
            behaviours: BTreeMap::new(),
            off_delay: 0.2,
        }
    }
}

impl GatewayOptions {
    pub fn dut(mut self, port: u32, tags: &[&str], ready: bool) -> Self {
        self.duts
            .insert(port, (tags.iter().map(|s| s.to_string()).collect(), ready));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn behaviour(mut self, port: u32, b: Behaviour) -> Self {
        self.behaviours.insert(port, b);
        self
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub farm: SimFarm,
    pub api_port: u16,
    pub salad_port: u16,
    pub tftp_port: u16,
    pub env: Vec<(String, String)>,
    pub daemon: Option<Child>,
    pub http: reqwest::Client,
}

pub fn mac(port: u32) -> String {
    farmgate_testkit::mac_of(port)
}

impl Gateway {
    pub async fn start(opts: GatewayOptions) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let api_port = free_port();
        let salad_port = free_port();
        let tftp_port = free_udp_port();
        let tty_dir = dir.path().join("tty");
        std::fs::create_dir_all(&tty_dir).expect("tty dir");
        let farm = SimFarm::start(SimFarmConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ports: opts.ports,
            tty_dir: tty_dir.clone(),
            gateway_url: format!("http://127.0.0.1:{api_port}"),
            fetch_artifacts: false,
            boot_retry: Duration::from_millis(300),
            behaviours: opts.behaviours.clone(),
        })
        .await
        .expect("sim farm starts");

        let mut mars = MarsDb::default();
        let mut config = BTreeMap::new();
        config.insert(
            "hostname".to_string(),
            serde_yaml_ng::Value::String(farm.addr().to_string()),
        );
        mars.pdus.insert(
            "SIM".into(),
            PduRecord {
                driver: "vpdu".into(),
                config,
                reserved_port_ids: vec![],
            },
        );
        for (port, (tags, ready)) in &opts.duts {
            mars.duts.insert(
                mac(*port),
                DutRecord {
                    base_name: Some("sim".into()),
                    tags: tags.clone(),
                    pdu: Some("SIM".into()),
                    pdu_port_id: Some(port.to_string()),
                    pdu_off_delay: opts.off_delay,
                    ready_for_service: *ready,
                    local_tty_device: Some("ttyS0".into()),
                    ..DutRecord::default()
                },
            );
        }
        let mars_path = dir.path().join("mars_db.yaml");
        std::fs::write(&mars_path, serde_yaml_ng::to_string(&mars).expect("yaml"))
            .expect("write mars");

        let mut env: Vec<(String, String)> = vec![
            ("FARM_NAME".into(), "testfarm".into()),
            ("EXECUTOR_HOST".into(), "127.0.0.1".into()),
            ("EXECUTOR_PORT".into(), api_port.to_string()),
            (
                "EXECUTOR_URL".into(),
                format!("http://127.0.0.1:{api_port}"),
            ),
            ("SALAD_PORT".into(), salad_port.to_string()),
            ("SALAD_URL".into(), format!("http://127.0.0.1:{salad_port}")),
            (
                "SALAD_SERIAL_PORTS".into(),
                format!("{}/ttySIM*", tty_dir.display()),
            ),
            ("MARS_DB_FILE".into(), mars_path.display().to_string()),
            (
                "FARMGATE_STATE_DIR".into(),
                dir.path().join("state").display().to_string(),
            ),
            ("FARMGATE_ADMIN_TOKEN".into(), ADMIN.into()),
            ("FARMGATE_SUBMIT_TOKEN".into(), SUBMIT.into()),
            ("SERGENT_HARTMAN_QUICK_CHECK".into(), "disabled".into()),
            ("SERGENT_HARTMAN_BOOT_COUNT".into(), "2".into()),
            ("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT".into(), "2".into()),
            (
                "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY".into(),
                "1".into(),
            ),
            (
                "BOOTS_DEFAULT_KERNEL".into(),
                "http://127.0.0.1:1/kernel".into(),
            ),
            ("BOOTS_DEFAULT_INITRD".into(), "".into()),
            (
                "BOOTS_DEFAULT_CMDLINE".into(),
                "console=ttyS0 farmsim.script=\"print bootloop round; poweroff\"".into(),
            ),
            ("FARMGATE_LOG".into(), "info,farmgate=debug".into()),
            ("BOOTS_TFTP_PORT".into(), tftp_port.to_string()),
            (
                "BOOTS_TFTP_ROOT".into(),
                dir.path().join("tftp").display().to_string(),
            ),
        ];
        for (k, v) in &opts.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let mut gw = Gateway {
            dir,
            farm,
            api_port,
            salad_port,
            tftp_port,
            env,
            daemon: None,
            http: reqwest::Client::new(),
        };
        gw.start_daemon().await;
        gw
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn mars_path(&self) -> PathBuf {
        self.dir.path().join("mars_db.yaml")
    }

    pub async fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
            .expect("daemon log");
        let child = Command::new(farmgate_exe())
            .arg("serve")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .spawn()
            .expect("farmgate serve starts");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/api/v1/duts", self.url()))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("farmgate exited at start ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "farmgate did not start:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL the daemon, as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        let mut out = std::fs::read_to_string(self.daemon_log()).unwrap_or_default();
        let runners = self.dir.path().join("state/runners");
        if let Ok(entries) = std::fs::read_dir(runners) {
            for e in entries.flatten() {
                out.push_str(&format!("\n--- runner log {}\n", e.path().display()));
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    pub fn write_job(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, yaml).expect("write job");
        p
    }

    /// Start `farmctl` with the submit token.
    pub fn farmctl(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(farmctl_exe());
        cmd.args(["--url", &self.url(), "--token", SUBMIT])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Run `farmctl` to its end (bounded by `limit`).
    pub async fn farmctl_run(&self, args: &[&str], limit: Duration) -> FarmctlResult {
        let child = self.farmctl(args).spawn().expect("farmctl starts");
        let out = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "farmctl {args:?} did not finish within {limit:?}:\n{}",
                    self.logs()
                )
            })
            .expect("farmctl output");
        FarmctlResult {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub async fn dut(&self, port: u32) -> DutView {
        self.http
            .get(format!("{}/api/v1/dut/{}", self.url(), mac(port)))
            .send()
            .await
            .expect("GET dut")
            .json()
            .await
            .expect("dut json")
    }

    pub async fn job(&self, id: &str) -> JobView {
        self.http
            .get(format!("{}/api/v1/job/{id}", self.url()))
            .send()
            .await
            .expect("GET job")
            .json()
            .await
            .expect("job json")
    }

    /// Wait until the DUT on `port` is in `state` (bounded).
    pub async fn wait_state(&self, port: u32, state: DutState, limit: Duration) -> DutView {
        self.wait_dut(port, &format!("in state {state}"), limit, |d| {
            d.state == state
        })
        .await
    }

    /// Wait until the DUT on `port` exists and satisfies `check` (bounded); a DUT the
    /// gateway does not know yet (a machine still registering) is waited for too.
    pub async fn wait_dut(
        &self,
        port: u32,
        what: &str,
        limit: Duration,
        check: impl Fn(&DutView) -> bool,
    ) -> DutView {
        let deadline = Instant::now() + limit;
        loop {
            let r = self
                .http
                .get(format!("{}/api/v1/dut/{}", self.url(), mac(port)))
                .send()
                .await
                .expect("GET dut");
            let last = if r.status().is_success() {
                let d: DutView = r.json().await.expect("dut json");
                if check(&d) {
                    return d;
                }
                format!("{d:?}")
            } else {
                format!("unknown to the gateway ({})", r.status())
            };
            assert!(
                Instant::now() < deadline,
                "DUT {} never was {what}; last seen: {last}\n{}",
                mac(port),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn mars(&self) -> MarsDb {
        serde_yaml_ng::from_str(&std::fs::read_to_string(self.mars_path()).expect("mars"))
            .expect("mars yaml")
    }

    pub async fn stop(mut self) {
        self.kill_daemon();
        self.farm.shutdown().await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

#[derive(Debug)]
pub struct FarmctlResult {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl FarmctlResult {
    pub fn all(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// A job for a simulated DUT: `script` is what the simulated OS does (farmsim.script).
pub fn sim_job(script: &str, extra_patterns: &str, timeouts: &str) -> String {
    format!(
        r#"version: 1
target:
  tags: [sim]
timeouts:
  overall:
    minutes: 2
{timeouts}
console_patterns:
  session_end:
    regex: "reboot: Power Down"
{extra_patterns}
deployment:
  start:
    kernel:
      url: "http://127.0.0.1:1/vmlinuz"
      cmdline: 'console=ttyS0 farmsim.script="{script}"'
"#
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
