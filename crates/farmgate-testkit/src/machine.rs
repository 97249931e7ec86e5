//! One simulated machine: a PDU port, its console, and the task that "runs" while the
//! port is powered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::Behaviour;
use crate::console::Console;
use crate::script::{self, Step};

/// What every machine of a farm shares.
pub(crate) struct Env {
    pub(crate) gateway_url: String,
    pub(crate) fetch_artifacts: bool,
    pub(crate) boot_retry: Duration,
    pub(crate) http: reqwest::Client,
}

pub(crate) struct PortState {
    pub(crate) on: bool,
    pub(crate) log: Vec<(Instant, bool)>,
    pub(crate) boots: u32,
    pub(crate) behaviour: Behaviour,
    task: Option<JoinHandle<()>>,
}

pub(crate) struct Port {
    pub(crate) id: u32,
    pub(crate) mac: String,
    pub(crate) console: Console,
    /// Bumped at every power change; a machine task only writes while its own generation
    /// is current, so nothing from a powered-off run reaches the console.
    generation: AtomicU64,
    state: Mutex<PortState>,
}

/// The MAC address of the machine on `port`.
pub fn mac_of(port: u32) -> String {
    // CI-tron's scheme is 52:54:00:11:22:<port>; ports past 255 carry into the fifth byte.
    let fifth = 0x22 + (port >> 8);
    format!("52:54:00:11:{fifth:02x}:{:02x}", port & 0xff)
}

impl Port {
    pub(crate) fn new(id: u32, console: Console, behaviour: Behaviour) -> Port {
        Port {
            id,
            mac: mac_of(id),
            console,
            generation: AtomicU64::new(0),
            state: Mutex::new(PortState {
                on: false,
                log: Vec::new(),
                boots: 0,
                behaviour,
                task: None,
            }),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, PortState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Switch the port; switching on an off port starts its machine from scratch,
    /// switching it off stops the machine at once.
    pub(crate) fn set_power(self: &Arc<Self>, env: &Arc<Env>, on: bool) {
        let mut st = self.state();
        st.log.push((Instant::now(), on));
        if on == st.on {
            return;
        }
        st.on = on;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(task) = st.task.take() {
            task.abort();
        }
        tracing::info!("port {}: power {}", self.id, if on { "on" } else { "off" });
        if on {
            st.task = Some(tokio::spawn(run(env.clone(), self.clone(), generation)));
        }
    }

    /// Stop the machine without recording a power change (farm shutdown).
    pub(crate) fn halt(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(task) = self.state().task.take() {
            task.abort();
        }
    }

    async fn say(&self, generation: u64, line: &str) {
        let mut data = Vec::with_capacity(line.len() + 1);
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
        self.console
            .write(
                || self.generation.load(Ordering::SeqCst) == generation,
                &data,
            )
            .await;
    }

    /// Count a new boot; returns how this boot behaves.
    fn begin_boot(&self) -> Behaviour {
        let mut st = self.state();
        st.boots += 1;
        match st.behaviour {
            Behaviour::Flaky { fail_every }
                if fail_every > 0 && st.boots.is_multiple_of(fail_every) =>
            {
                Behaviour::Dead
            }
            b => b,
        }
    }
}

enum Next {
    Reboot,
    Halt,
}

/// The machine's life from power on; aborted at power off.
async fn run(env: Arc<Env>, port: Arc<Port>, generation: u64) {
    loop {
        let behaviour = port.begin_boot();
        match boot_once(&env, &port, generation, behaviour).await {
            Next::Reboot => continue,
            Next::Halt => return,
        }
    }
}

async fn boot_once(env: &Env, port: &Port, generation: u64, behaviour: Behaviour) -> Next {
    let say = |line: String| async move { port.say(generation, &line).await };
    if behaviour == Behaviour::Dead {
        tracing::debug!("port {}: dead boot, silent", port.id);
        return Next::Halt;
    }
    say(format!("SALAD.machine_id={}", port.mac)).await;
    say(format!(
        "farmsim firmware 1.0 (simulated machine on port {})",
        port.id
    ))
    .await;
    say("iPXE 1.21.1 (farmsim) -- Open Source Network Boot Firmware".into()).await;
    say(format!("net0: {} using farmsim-nic", port.mac)).await;
    if behaviour == Behaviour::NoNetboot {
        say("net0: link down, no network boot".into()).await;
        say("No bootable device.".into()).await;
        return Next::Halt;
    }
    let url = format!(
        "{}/api/v1/dut/{}/boot.ipxe",
        env.gateway_url.trim_end_matches('/'),
        port.mac
    );
    say(format!("http://... {url}")).await;
    // Retry until the gateway answers; each distinct error is printed once, so a machine
    // waiting for its gateway does not flood its console.
    let mut last_error = String::new();
    let spec = loop {
        match fetch_boot_script(env, port, generation, &url).await {
            Ok(spec) => break spec,
            Err(e) => {
                if e != last_error {
                    say(format!("iPXE: boot failed: {e}; retrying")).await;
                    last_error = e;
                }
                tokio::time::sleep(env.boot_retry).await;
            }
        }
    };
    say("Starting Linux ...".into()).await;
    say("Linux version 6.1.0-farmsim (farmsim@farmgate) (rustc) #1 SMP PREEMPT_DYNAMIC".into())
        .await;
    if behaviour == Behaviour::Unfit {
        say("HARDWARE ERROR: simulated machine check".into()).await;
    }
    say(format!("Command line: {}", spec.cmdline)).await;
    let text = script::script_from_cmdline(&spec.cmdline).unwrap_or(script::DEFAULT_SCRIPT);
    let steps = match script::parse_script(text) {
        Ok(steps) => steps,
        Err(e) => {
            say(format!("farmsim: bad farmsim.script: {e}")).await;
            return Next::Halt;
        }
    };
    for step in steps {
        match step {
            Step::Print(text) => say(text).await,
            Step::Sleep(d) => tokio::time::sleep(d).await,
            Step::Poweroff => {
                say("reboot: Power Down".into()).await;
                return Next::Halt;
            }
            Step::Reboot => {
                say("reboot: Restarting system".into()).await;
                return Next::Reboot;
            }
            Step::Panic => {
                say("Kernel panic - not syncing: farmsim".into()).await;
                return Next::Halt;
            }
            Step::Hang => return Next::Halt,
            Step::Register => {
                let url = format!("{}/api/v1/dut/", env.gateway_url.trim_end_matches('/'));
                let body = serde_json::json!({
                    "id": port.mac,
                    "base_name": "sim",
                    "tags": [format!("farmsim:port:{}", port.id)],
                    "local_tty_device": "ttyS0",
                });
                let answer = env.http.post(&url).json(&body).send().await;
                match answer {
                    Ok(r) if r.status().is_success() => {
                        say("MaRS: Registration complete".into()).await
                    }
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        say(format!("MaRS: registration refused: {status} {text}")).await
                    }
                    Err(e) => say(format!("MaRS: registration failed: {e}")).await,
                }
            }
            Step::EchoInput => {
                let mut input = port.console.subscribe();
                loop {
                    match input.recv().await {
                        Ok(line) => say(line).await,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return Next::Halt,
                    }
                }
            }
        }
    }
    Next::Halt
}

/// One netboot attempt: the boot script, then (if asked) its kernel and initrds.
async fn fetch_boot_script(
    env: &Env,
    port: &Port,
    generation: u64,
    url: &str,
) -> Result<script::BootSpec, String> {
    let text = get(env, url).await?;
    let text = String::from_utf8(text).map_err(|_| format!("{url}: the script is not UTF-8"))?;
    let spec = script::parse_ipxe(&text).map_err(|e| format!("{url}: {e}"))?;
    for line in &spec.echoes {
        port.say(generation, line).await;
    }
    if env.fetch_artifacts {
        for artifact in std::iter::once(&spec.kernel).chain(&spec.initrds) {
            let body = get(env, artifact).await?;
            port.say(
                generation,
                &format!("{artifact}... ok ({} bytes)", body.len()),
            )
            .await;
        }
    }
    Ok(spec)
}

async fn get(env: &Env, url: &str) -> Result<Vec<u8>, String> {
    let resp = env
        .http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    if status.as_u16() != 200 {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    Ok(body.to_vec())
}
