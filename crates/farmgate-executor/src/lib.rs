//! The farmgate executor.
//!
//! Two halves share this crate because they share the job's life cycle:
//! - the daemon side ([`Executor`]): job queue with tag matching, the DUT state machine
//!   of seed 001, Sergeant Hartman's training and quick checks, discovery, the MaRS file,
//!   and the typed commands the REST API calls;
//! - the runner side ([`runner::run_job`]): the process that runs one job on one DUT.
//!
//! They talk only through the store (SQLite) and the DUT lock files, so either can
//! restart without the other noticing more than a pause.

pub mod bootscript;
pub mod config;
pub mod console_link;
pub mod executor;
pub mod jobspace;
pub mod metrics;
pub mod runner;
pub mod spawn;
pub mod spec;
pub mod storage;

pub use config::{ConfigError, GatewayConfig};
pub use executor::{ExecError, Executor};

/// Raise this process's soft limit of open files to its hard limit.
///
/// A gateway holds several descriptors per DUT (serial device, relay listener, relay
/// client, PDU connections); the usual soft limit of 1,024 is reached near 300 DUTs.
/// Returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}

/// Wait until the process is asked to stop (SIGTERM or SIGINT). If the handlers cannot
/// be installed, never returns: the process then stops only when killed.
pub async fn stop_requested() {
    stop_signal().await
}

/// [`stop_requested`], with the handlers installed at once (when this is called, not
/// when the future is first polled), so a signal arriving before the future runs is
/// not lost, nor does it kill the process.
pub fn stop_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}
