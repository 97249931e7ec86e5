//! `farm-agent`: what runs on a DUT in boot2container's place (see the
//! `farmgate_agent::agent` documentation for its modes). Started by the initramfs' init
//! (or as PID 1), it reads the kernel command line, does its job, prints the final
//! lines and powers the machine off (`b2c.shutdown_cmd`, or `b2c.reboot_cmd` when a
//! container asked for a reboot).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use farmgate_agent::agent::{self, AgentEnv, Mode};
use farmgate_agent::{boot, cachedev, cmdline, hwtags, net, ntp, register, run};

/// The farmgate DUT agent.
#[derive(Debug, Parser)]
#[command(name = "farm-agent", version)]
struct Args {
    /// The kernel command line to obey instead of /proc/cmdline.
    #[arg(long, value_name = "TEXT")]
    cmdline: Option<String>,
    /// Where images, containers and volumes go [default: /storage, else a temp dir].
    #[arg(long, value_name = "DIR")]
    storage: Option<PathBuf>,
    /// The crun binary.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/crun")]
    crun: PathBuf,
    /// Do not power off or reboot at the end (the caller does).
    #[arg(long)]
    no_poweroff: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let pid1 = boot::is_pid1();
    if pid1 {
        println!(
            "farm-agent: [{:.2} s] starting as the machine's init",
            boot::uptime()
        );
        for p in boot::early_mounts() {
            println!("farm-agent: {p}");
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            println!("farm-agent: cannot start the async runtime: {e}");
            None
        }
    };
    let end = match rt {
        Some(rt) => {
            let run = std::panic::AssertUnwindSafe(|| rt.block_on(main_async(&args, pid1)));
            match std::panic::catch_unwind(run) {
                Ok(end) => end,
                Err(_) => {
                    println!("farm-agent: internal error (see the panic above)");
                    End::failed(&cmdline::B2cConfig::default())
                }
            }
        }
        None => End::failed(&cmdline::B2cConfig::default()),
    };
    if !args.no_poweroff {
        std::thread::sleep(end.poweroff_delay);
        if pid1 {
            // The machine's init must never exit (the kernel would panic).
            let why = boot::power_off(end.action, &end.command);
            println!("farm-agent: cannot power off: {why}");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let _ = std::process::Command::new("sh")
            .args(["-c", &end.command])
            .status();
    }
    ExitCode::from(u8::try_from(end.status.clamp(0, 255)).unwrap_or(1))
}

/// How the run ended and how the machine goes down.
struct End {
    status: i32,
    action: boot::PowerAction,
    command: String,
    poweroff_delay: Duration,
}

impl End {
    fn new(cfg: &cmdline::B2cConfig, status: i32, reboot: bool) -> End {
        let (action, command) = if reboot {
            (boot::PowerAction::Reboot, cfg.reboot_cmd.clone())
        } else {
            (boot::PowerAction::PowerOff, cfg.shutdown_cmd.clone())
        };
        End {
            status,
            action,
            command,
            poweroff_delay: cfg.poweroff_delay,
        }
    }

    fn failed(cfg: &cmdline::B2cConfig) -> End {
        End::new(cfg, 1, false)
    }
}

async fn main_async(args: &Args, pid1: bool) -> End {
    let text = match &args.cmdline {
        Some(t) => t.clone(),
        None => match std::fs::read_to_string("/proc/cmdline") {
            Ok(t) => t,
            Err(e) => {
                println!("farm-agent: cannot read /proc/cmdline: {e}");
                return End::failed(&cmdline::B2cConfig::default());
            }
        },
    };
    let mode = match agent::mode_of(&text) {
        Ok(m) => m,
        Err(e) => {
            // Still end like every run: the final lines, then the power off.
            println!("farm-agent: kernel command line: {e}");
            return finish(&cmdline::B2cConfig::default(), 1, false);
        }
    };
    // The b2c options are read in every mode: the machine's set-up (modules, network,
    // clock, cache) follows them too.
    let cfg = match cmdline::parse(&text) {
        Ok(c) => c,
        Err(e) if mode == Mode::Pipeline => {
            println!("farm-agent: kernel command line: {e}");
            return finish(&cmdline::B2cConfig::default(), 1, false);
        }
        Err(e) => {
            println!("farm-agent: kernel command line: {e} (ignored in this mode)");
            cmdline::B2cConfig::default()
        }
    };
    if pid1 {
        machine_setup(&cfg, &mode).await;
    }
    match mode {
        Mode::Check => End::new(&cfg, check(), false),
        Mode::Register { gateway } => End::new(&cfg, register_machine(&gateway).await, false),
        Mode::Pipeline => pipeline(args, cfg).await,
    }
}

/// The machine's set-up when the agent is its init: modules, host name, network, clock,
/// cache partition. Problems are printed; the run goes on (the job's own output then
/// says what is missing).
async fn machine_setup(cfg: &cmdline::B2cConfig, mode: &Mode) {
    // The DHCP server of the first interface configured by DHCP (the gateway).
    let mut dhcp_server = None;
    let at = boot::uptime;
    // File systems match no device: with a cache or a b2c.filesystem to mount, every
    // module of the image is loaded; otherwise those of the hardware present.
    let all = cfg.cache_device != cmdline::CacheDevice::None || !cfg.filesystems.is_empty();
    let m = boot::load_modules_for_hardware(
        Path::new(boot::MODULE_LIST),
        Path::new("/sys"),
        &boot::running_modules_dir(),
        &cfg.insmods,
        all,
    );
    println!(
        "farm-agent: [{:.2} s] {} modules loaded{}",
        at(),
        m.loaded.len(),
        if m.loaded.is_empty() {
            String::new()
        } else {
            format!(": {}", m.loaded.join(" "))
        }
    );
    for p in &m.problems {
        println!("farm-agent: module: {p}");
    }
    if let Err(e) = boot::set_hostname(cfg.hostname.as_deref()) {
        println!("farm-agent: {e}");
    }
    if *mode == Mode::Check {
        // The boot loops' check needs nothing more.
        return;
    }
    match net::bring_up(cfg, &net::NetPaths::default(), Duration::from_secs(30)).await {
        Ok(list) => {
            for c in &list {
                println!("farm-agent: [{:.2} s] network {c}", at());
                if let net::Source::Dhcp(lease) = &c.source {
                    if dhcp_server.is_none() {
                        dhcp_server = Some(std::net::IpAddr::V4(lease.server));
                    }
                    // Jobs outlive leases: renewed in the background.
                    tokio::spawn(net::keep_lease(c.iface.clone(), lease.clone()));
                }
            }
        }
        Err(e) => println!("farm-agent: network: {e}"),
    }
    if cfg.ntp_peer != cmdline::NtpPeer::None {
        // The clock is set when the peer answers; nothing waits for it.
        let (peer, fallback) = (cfg.ntp_peer.clone(), dhcp_server);
        tokio::spawn(async move {
            match ntp::sync(&peer, fallback, ntp::NTP_PORT, true, Duration::from_secs(2)).await {
                Ok(Some(sample)) => println!("farm-agent: clock set from {sample}"),
                Ok(None) => {}
                Err(e) => println!("farm-agent: clock not set: {e}"),
            }
        });
    }
    if matches!(mode, Mode::Pipeline) {
        let env = cachedev::CacheEnv::default();
        if let Err(e) = std::fs::create_dir_all(&env.mount_point) {
            println!("farm-agent: {}: {e}", env.mount_point.display());
        }
        match cachedev::prepare(
            &cfg.cache_device,
            &cfg.filesystems,
            cfg.swap.as_deref(),
            &env,
        ) {
            Ok(outcome) => println!("{}", outcome.describe()),
            Err(e) => println!("farm-agent: {e}; images stay in RAM"),
        }
    }
    println!("farm-agent: [{:.2} s] machine ready", at());
}

fn check() -> i32 {
    match hwtags::collect(Path::new("/")) {
        Ok(hw) => {
            println!("farm-agent: tags {}", hwtags::tags(&hw).join(" "));
            println!("farm-agent: check passed");
            0
        }
        Err(e) => {
            println!("farm-agent: check failed: {e}");
            1
        }
    }
}

async fn register_machine(gateway: &str) -> i32 {
    let hw = match hwtags::collect(Path::new("/")) {
        Ok(hw) => hw,
        Err(e) => {
            println!("farm-agent: cannot describe this machine: {e}");
            return 1;
        }
    };
    let mut reg = hwtags::registration(&hw, None);
    reg.tags = hwtags::tags(&hw);
    if reg.id.is_empty() {
        println!("farm-agent: no network interface with a MAC address: cannot register");
        return 1;
    }
    // The console: the serial port where the gateway's SALAD answers.
    let ports: Vec<register::SerialPort> = register::candidate_ports(Path::new("/dev"))
        .iter()
        .filter_map(|p| register::SerialPort::open(p).ok())
        .collect();
    match register::find_console(ports, Duration::from_secs(3)).await {
        Some(console) => {
            let name = console.name().trim_start_matches("/dev/").to_string();
            if let Err(e) = register::announce(&console, &reg.id).await {
                println!("farm-agent: cannot write on {name}: {e}");
            }
            reg.local_tty_device = Some(name);
        }
        None => println!("farm-agent: SALAD answered on no serial port; registering without one"),
    }
    match register::register(gateway, &reg, Duration::from_secs(60)).await {
        Ok(_) => {
            println!("{}", register::DONE_LINE);
            0
        }
        Err(e) => {
            println!("farm-agent: {e}");
            1
        }
    }
}

async fn pipeline(args: &Args, mut cfg: cmdline::B2cConfig) -> End {
    if let Some(url) = cfg.extra_args_url.clone() {
        let fetched = async {
            let r = reqwest::get(&url).await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("the server answered {}", r.status()));
            }
            r.text().await.map_err(|e| e.to_string())
        }
        .await;
        match fetched.and_then(|t| cfg.merge_extra(&t).map_err(|e| e.to_string())) {
            Ok(()) => {}
            Err(e) => {
                println!("farm-agent: b2c.extra_args_url {url}: {e}");
                return finish(&cfg, 1, false);
            }
        }
    }
    for u in &cfg.unknown {
        println!("farm-agent: ignoring unknown option {u}");
    }
    let env = AgentEnv {
        storage: args.storage.clone().unwrap_or_else(agent::default_storage),
        crun: args.crun.clone(),
        ..AgentEnv::default()
    };
    if let Err(e) = boot::ensure_cgroup2() {
        println!("farm-agent: {e}");
    }
    let result = agent::run_b2c(&cfg, &env).await;
    let reboot = result.shutdown == run::ShutdownMode::Reboot;
    finish(&cfg, result.status, reboot)
}

/// The final lines of boot2container, and how the machine goes down.
fn finish(cfg: &cmdline::B2cConfig, status: i32, reboot: bool) -> End {
    for line in run::final_lines(status) {
        println!("{line}");
    }
    End::new(cfg, status, reboot)
}
