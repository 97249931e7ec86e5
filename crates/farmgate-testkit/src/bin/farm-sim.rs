//! `farm-sim`: a simulated farm (virtual PDU whose ports are fake machines netbooting
//! from a gateway) as a standalone process, for the demo. Runs until SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use farmgate_testkit::{Behaviour, SimFarm, SimFarmConfig};
use tokio::signal::unix::{SignalKind, signal};

/// A simulated farm: a vpdu server whose ports are fake machines with pty consoles.
#[derive(Debug, Parser)]
#[command(name = "farm-sim", version)]
struct Args {
    /// Address of the vpdu server.
    #[arg(long, default_value = "127.0.0.1:9191")]
    listen: SocketAddr,
    /// Number of PDU ports (machines), numbered from 0.
    #[arg(long, default_value_t = 4)]
    ports: u32,
    /// Directory for the `ttySIM<port>` console links.
    #[arg(long)]
    tty_dir: PathBuf,
    /// Base URL of the gateway the machines netboot from.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    gateway_url: String,
    /// Also download the kernels and initrds named by the boot scripts.
    #[arg(long)]
    fetch_artifacts: bool,
    /// Milliseconds between netboot attempts while the gateway does not answer.
    #[arg(long, default_value_t = 1000)]
    boot_retry_ms: u64,
    /// PORT=healthy|dead|nonetboot|unfit|flaky:N (repeatable).
    #[arg(long = "behaviour", value_parser = parse_behaviour)]
    behaviours: Vec<(u32, Behaviour)>,
}

fn parse_behaviour(s: &str) -> Result<(u32, Behaviour), String> {
    let (port, b) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected PORT=BEHAVIOUR"))?;
    let port = port
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
    Ok((port, b.parse::<Behaviour>()?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FARM_SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Before anything is announced: a SIGTERM right after the address is printed must
    // stop the farm cleanly, not kill it with the default action.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let behaviours: BTreeMap<u32, Behaviour> = args.behaviours.into_iter().collect();
    let farm = SimFarm::start(SimFarmConfig {
        listen: args.listen,
        ports: args.ports,
        tty_dir: args.tty_dir.clone(),
        gateway_url: args.gateway_url,
        fetch_artifacts: args.fetch_artifacts,
        boot_retry: Duration::from_millis(args.boot_retry_ms),
        behaviours,
    })
    .await?;
    println!(
        "farm-sim: vpdu listening on {} ({} ports, consoles in {})",
        farm.addr(),
        args.ports,
        args.tty_dir.display()
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    eprintln!("farm-sim: stopping");
    farm.shutdown().await;
    Ok(())
}
