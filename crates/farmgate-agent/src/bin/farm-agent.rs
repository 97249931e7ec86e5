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
use farmgate_agent::{cmdline, hwtags, register, run};

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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("farm-agent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(main_async(args));
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

async fn main_async(args: Args) -> i32 {
    let text = match &args.cmdline {
        Some(t) => t.clone(),
        None => match std::fs::read_to_string("/proc/cmdline") {
            Ok(t) => t,
            Err(e) => {
                println!("farm-agent: cannot read /proc/cmdline: {e}");
                return 1;
            }
        },
    };
    let mode = match agent::mode_of(&text) {
        Ok(m) => m,
        Err(e) => {
            // Still end like every run: the final lines, then the power off.
            println!("farm-agent: kernel command line: {e}");
            return finish(&args, &cmdline::B2cConfig::default(), 1, false).await;
        }
    };
    match mode {
        Mode::Check => check(),
        Mode::Register { gateway } => register_machine(&gateway).await,
        Mode::Pipeline => pipeline(&args, &text).await,
    }
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

async fn pipeline(args: &Args, text: &str) -> i32 {
    let mut cfg = match cmdline::parse(text) {
        Ok(c) => c,
        Err(e) => {
            println!("farm-agent: kernel command line: {e}");
            return finish(args, &cmdline::B2cConfig::default(), 1, false).await;
        }
    };
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
                return finish(args, &cfg, 1, false).await;
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
    if let Err(e) = agent::ensure_cgroup2() {
        println!("farm-agent: {e}");
    }
    let result = agent::run_b2c(&cfg, &env).await;
    let reboot = result.shutdown == run::ShutdownMode::Reboot;
    finish(args, &cfg, result.status, reboot).await
}

async fn finish(args: &Args, cfg: &cmdline::B2cConfig, status: i32, reboot: bool) -> i32 {
    for line in run::final_lines(status) {
        println!("{line}");
    }
    if !args.no_poweroff {
        tokio::time::sleep(cfg.poweroff_delay).await;
        let cmd = if reboot {
            &cfg.reboot_cmd
        } else {
            &cfg.shutdown_cmd
        };
        let _ = tokio::process::Command::new("sh")
            .args(["-c", cmd])
            .status()
            .await;
    }
    status
}
