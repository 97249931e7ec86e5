//! End-to-end harness: a real `farmgate serve` process, a simulated farm (virtual PDU
//! server, DUTs on ptys fetching their boot scripts over HTTP) and the real `farmctl`.
//!
//! Each test gets its own temp dir, ports, MaRS file and database; nothing is shared.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use farmgate_testkit::{Behaviour, SimFarm, SimFarmConfig};
use farmgate_wire::{DutRecord, DutState, DutView, JobView, MarsDb, PduRecord};

pub const ADMIN: &str = "admin-token-for-tests";
pub const SUBMIT: &str = "submit-token-for-tests";
pub const S3_ADMIN: (&str, &str) = (
    "farmgate-test-admin",
    "farmgate-test-admin-secret-0123456789",
);

pub use farmgate_testkit::ports::{free_port, free_udp_port};

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
    /// QEMU machines behind a `qemu` PDU named `QEMU`: port -> (tags, ready_for_service).
    /// When not empty, the test initramfs is built into BOOTS_TFTP_ROOT (served at /boot/).
    pub qemu_duts: BTreeMap<u32, (Vec<String>, bool)>,
    /// Ports of the `QEMU` PDU (0: no such PDU); `qemu_dut` raises it as needed.
    pub qemu_ports: u32,
    /// Run the daemon (and so its QEMU machines) in a network namespace of its own with
    /// a bridge `private` (10.42.0.1/24) where the gateway serves DHCP and TFTP; the QEMU
    /// machines plug a tap into it. The test reaches the API over a veth pair.
    pub private_net: bool,
    /// The QEMU machines' default boot runs the DUT agent (`farm-agent`, built into
    /// the initramfs) in registration mode instead of the initramfs' shell registration.
    pub qemu_agent: bool,
    /// `disk_size` of the `QEMU` PDU (e.g. `256M`): each machine gets a virtio disk
    /// (a qcow2 kept across power cycles); None: no disk.
    pub qemu_disk_size: Option<String>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            ports: 4,
            duts: BTreeMap::new(),
            env: vec![],
            behaviours: BTreeMap::new(),
            off_delay: 0.2,
            qemu_duts: BTreeMap::new(),
            qemu_ports: 0,
            private_net: false,
            qemu_agent: false,
            qemu_disk_size: None,
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
    pub fn qemu_dut(mut self, port: u32, tags: &[&str], ready: bool) -> Self {
        self.qemu_ports = self.qemu_ports.max(port + 1);
        self.qemu_duts
            .insert(port, (tags.iter().map(|s| s.to_string()).collect(), ready));
        self
    }
    pub fn behaviour(mut self, port: u32, b: Behaviour) -> Self {
        self.behaviours.insert(port, b);
        self
    }
}

/// A network namespace with a bridge `private` (10.42.0.1/24), reached from the test's
/// namespace over a veth pair (`10.43.<n>.2` here, `10.43.<n>.1` there). Deleted on drop.
pub struct PrivateNet {
    pub ns: String,
    pub outside: String,
    pub gateway_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PrivateNet {
    pub fn create() -> PrivateNet {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = std::process::id();
        let n = (pid.wrapping_mul(7).wrapping_add(k)) % 250 + 1;
        let ns = format!("fgq-{pid}-{k}");
        let outside = format!("fgq{}v{k}", pid % 100_000);
        let net = PrivateNet {
            ns: ns.clone(),
            outside: outside.clone(),
            gateway_ip: format!("10.43.{n}.1"),
        };
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "private", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", "10.42.0.1/24", "dev", "private"]);
        ip(&["-n", &ns, "link", "set", "private", "up"]);
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", "uplink", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("10.43.{n}.2/24"), "dev", &outside]);
        ip(&["link", "set", &outside, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.43.{n}.1/24"),
            "dev",
            "uplink",
        ]);
        ip(&["-n", &ns, "link", "set", "uplink", "up"]);
        net
    }
}

impl Drop for PrivateNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.outside])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

pub struct Gateway {
    pub s3_port: u16,
    pub registry_port: u16,
    pub private_net: Option<PrivateNet>,
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

/// MAC of the QEMU machine on port `port` of the `qemu` PDU.
pub fn qemu_mac(port: u32) -> String {
    format!("52:54:00:11:22:{:02x}", port)
}

/// The workspace's `farmgate-mkinitramfs`, built beside farmgate.
pub fn mkinitramfs_exe() -> PathBuf {
    let p = farmgate_exe().with_file_name("farmgate-mkinitramfs");
    assert!(
        p.exists(),
        "{} is missing: build the whole workspace (cargo build --bins) before these tests",
        p.display()
    );
    p
}

/// Builds the test kernel + initramfs into `dir` (`vmlinuz`, `initramfs.cpio.gz`).
/// The DUT agent, another package of the workspace, built beside farmgate.
pub fn farm_agent_exe() -> PathBuf {
    let p = farmgate_exe().with_file_name("farm-agent");
    assert!(
        p.exists(),
        "{} is missing: build the whole workspace (cargo build --workspace) before these tests",
        p.display()
    );
    p
}

/// `farmgate image build` into `dir` (the gateway's BOOTS_TFTP_ROOT) with the
/// workspace's farm-agent, for machines that reach the gateway at `gateway`.
pub fn publish_agent_image(dir: &Path, gateway: &str) {
    let out = Command::new(farmgate_exe())
        .args(["image", "build", "--out"])
        .arg(dir)
        .args([
            "--gateway-url",
            gateway,
            "--append",
            "console=ttyS0 panic=-1",
        ])
        .arg("--agent")
        .arg(farm_agent_exe())
        .env_remove("FARM_NAME")
        .output()
        .expect("farmgate image build runs");
    assert!(
        out.status.success(),
        "farmgate image build failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn build_initramfs(dir: &Path) {
    build_initramfs_with(dir, &[]);
}

/// [`build_initramfs`] with more programs (and their libraries) in it.
pub fn build_initramfs_with(dir: &Path, binaries: &[PathBuf]) {
    std::fs::create_dir_all(dir).expect("initramfs dir");
    let mut cmd = Command::new(mkinitramfs_exe());
    cmd.arg("--out").arg(dir);
    for b in binaries {
        cmd.arg("--binary").arg(b);
    }
    let out = cmd.output().expect("farmgate-mkinitramfs runs");
    assert!(
        out.status.success(),
        "farmgate-mkinitramfs failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
                port_labels: Default::default(),
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
        let tcpconsole_port = free_port();
        let s3_port = free_port();
        let registry_port = free_port();
        let private_net = opts.private_net.then(PrivateNet::create);
        if opts.qemu_ports > 0 {
            if opts.qemu_agent {
                // The image users build: farm-agent as /init, published where the
                // gateway's default boot configuration finds it.
                publish_agent_image(
                    &dir.path().join("tftp"),
                    &format!("http://10.42.0.1:{api_port}"),
                );
            } else {
                build_initramfs(&dir.path().join("tftp"));
            }
            let mut config = BTreeMap::new();
            let mut set = |k: &str, v: String| {
                config.insert(k.to_string(), serde_yaml_ng::Value::String(v));
            };
            set("ports", opts.qemu_ports.to_string());
            set("console", format!("127.0.0.1:{tcpconsole_port}"));
            set("state_dir", dir.path().join("qemu").display().to_string());
            set("memory", "384".into());
            if let Some(size) = &opts.qemu_disk_size {
                set("disk_size", size.clone());
            }
            if private_net.is_some() {
                set("network", "tap".into());
                set("bridge", "private".into());
            }
            mars.pdus.insert(
                "QEMU".into(),
                PduRecord {
                    driver: "qemu".into(),
                    config,
                    reserved_port_ids: vec![],
                    port_labels: Default::default(),
                },
            );
            for (port, (tags, ready)) in &opts.qemu_duts {
                mars.duts.insert(
                    qemu_mac(*port),
                    DutRecord {
                        base_name: Some("qemu".into()),
                        tags: tags.clone(),
                        pdu: Some("QEMU".into()),
                        pdu_port_id: Some(port.to_string()),
                        pdu_off_delay: 0.5,
                        ready_for_service: *ready,
                        local_tty_device: Some("ttyS0".into()),
                        ..DutRecord::default()
                    },
                );
            }
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
            ("SALAD_TCPCONSOLE_PORT".into(), tcpconsole_port.to_string()),
            ("FARMGATE_S3_PORT".into(), s3_port.to_string()),
            (
                "FARMGATE_S3_URL".into(),
                format!("http://127.0.0.1:{s3_port}"),
            ),
            ("MINIO_ROOT_USER".into(), S3_ADMIN.0.into()),
            ("MINIO_ROOT_PASSWORD".into(), S3_ADMIN.1.into()),
            ("FARMGATE_REGISTRY_PORT".into(), registry_port.to_string()),
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
            ("FARMGATE_NTP_PORT".into(), free_udp_port().to_string()),
            (
                "BOOTS_TFTP_ROOT".into(),
                dir.path().join("tftp").display().to_string(),
            ),
        ];
        if opts.qemu_ports > 0 {
            // How QEMU machines (user-mode network, host = 10.42.0.1) reach the gateway.
            // Their default boot configuration: the test initramfs in registration mode.
            let base = format!("http://10.42.0.1:{api_port}");
            for (k, v) in [
                ("EXECUTOR_URL", base.clone()),
                // Jobs' minio_url, as the machines reach it.
                ("FARMGATE_S3_URL", format!("http://10.42.0.1:{s3_port}")),
                ("BOOTS_DEFAULT_KERNEL", format!("{base}/boot/vmlinuz")),
                (
                    "BOOTS_DEFAULT_INITRD",
                    format!("{base}/boot/initramfs.cpio.gz"),
                ),
                (
                    "BOOTS_DEFAULT_CMDLINE",
                    format!("console=ttyS0 panic=-1 farmgate.register={base}"),
                ),
            ] {
                env.retain(|(ek, _)| ek != k);
                env.push((k.into(), v));
            }
            if opts.qemu_agent {
                // No BOOTS_DEFAULT_*: the published image is the default.
                env.retain(|(ek, _)| !ek.starts_with("BOOTS_DEFAULT_"));
            }
        }
        if private_net.is_some() {
            for (k, v) in [
                ("EXECUTOR_HOST", "0.0.0.0".to_string()),
                ("PRIVATE_INTERFACE", "private".to_string()),
                ("BOOTS_TFTP_PORT", "69".to_string()),
                ("FARMGATE_NTP_PORT", "123".to_string()),
            ] {
                env.retain(|(ek, _)| ek != k);
                env.push((k.into(), v));
            }
        }
        for (k, v) in &opts.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let mut gw = Gateway {
            s3_port,
            registry_port,
            private_net,
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
        let host = self
            .private_net
            .as_ref()
            .map_or("127.0.0.1", |n| n.gateway_ip.as_str());
        format!("http://{host}:{}", self.api_port)
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
        let mut cmd = match &self.private_net {
            None => Command::new(farmgate_exe()),
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.ns]).arg(farmgate_exe());
                c
            }
        };
        let child = cmd
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
        self.farmctl_as(SUBMIT, args)
    }

    /// Start `farmctl` with the given token.
    pub fn farmctl_as(&self, token: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(farmctl_exe());
        cmd.args(["--url", &self.url(), "--token", token])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Run `farmctl` to its end (bounded by `limit`).
    pub async fn farmctl_run(&self, args: &[&str], limit: Duration) -> FarmctlResult {
        self.farmctl_run_as(SUBMIT, args, limit).await
    }

    /// [`Self::farmctl_run`] with the given token.
    pub async fn farmctl_run_as(
        &self,
        token: &str,
        args: &[&str],
        limit: Duration,
    ) -> FarmctlResult {
        let child = self
            .farmctl_as(token, args)
            .spawn()
            .expect("farmctl starts");
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

    /// `GET <gateway><path>` as text (whatever the status).
    pub async fn get_text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: body: {e}"))
    }

    /// `GET <gateway><path>` decoded from JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let text = self.get_text(path).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    pub async fn dut(&self, port: u32) -> DutView {
        self.get_json(&format!("/api/v1/dut/{}", mac(port))).await
    }

    pub async fn job(&self, id: &str) -> JobView {
        self.get_json(&format!("/api/v1/job/{id}")).await
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
        self.wait_dut_id(&mac(port), what, limit, check).await
    }

    /// [`Gateway::wait_dut`] by machine id.
    pub async fn wait_dut_id(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&DutView) -> bool,
    ) -> DutView {
        let deadline = Instant::now() + limit;
        loop {
            let r = self
                .http
                .get(format!("{}/api/v1/dut/{}", self.url(), id))
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
                id,
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
        self.kill_qemus();
        self.farm.shutdown().await;
    }
}

impl Gateway {
    /// Kill every QEMU machine this test started (they are daemons, like powered machines).
    pub fn kill_qemus(&self) {
        let dir = self.dir.path().join("qemu");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid")
                && let Ok(pid) = std::fs::read_to_string(e.path())
                && let Ok(pid) = pid.trim().parse::<i32>()
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(path_str(&e.path())))
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill_daemon();
        self.kill_qemus();
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

/// A one-layer OCI image (static busybox) as an OCI layout in `dir`, tagged `v1`.
pub fn busybox_oci_layout(dir: &std::path::Path) {
    use sha2::Digest as _;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dirs");
    let put = |data: &[u8]| -> (String, usize) {
        let hex = hex::encode(sha2::Sha256::digest(data));
        std::fs::write(blobs.join(&hex), data).expect("blob");
        (format!("sha256:{hex}"), data.len())
    };
    let mut tar = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    let h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h.clone(), "bin/", std::io::empty())
        .expect("dir");
    tar.append_data(&mut h.clone(), "tmp/", std::io::empty())
        .expect("dir");
    let mut f = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    tar.append_data(&mut f, "bin/busybox", busybox.as_slice())
        .expect("busybox");
    for applet in ["sh", "cat", "echo", "ls"] {
        let mut l = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut l, format!("bin/{applet}"), "busybox")
            .expect("link");
    }
    let raw = tar.into_inner().expect("tar");
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&raw)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).expect("gzip");
    let (layer, layer_size) = put(&gz.finish().expect("gzip"));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
                       "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "v1"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
}

/// Debian's docker-registry on a loopback port, killed on drop.
pub type Upstream = farmgate_testkit::registry::DockerRegistry;

/// A docker-registry holding `test/box:v1` (busybox, built by [`busybox_oci_layout`]
/// and copied in with skopeo).
pub async fn upstream_with_busybox_image() -> Upstream {
    let up = Upstream::start().await;
    let port = up.port;
    let layout = up.scratch_dir().join("layout");
    busybox_oci_layout(&layout);
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://127.0.0.1:{port}/test/box:v1"))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    up
}
