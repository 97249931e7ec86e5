//! What the daemon hands to a job runner process, and the lock that proves a runner lives.
//!
//! The daemon writes a [`RunnerSpec`] into the job's row when it assigns the job to a
//! DUT; the runner process reads it back from the database, so the runner needs nothing
//! else (no MaRS file, no environment) and keeps working if the daemon restarts or the
//! MaRS file changes under it. Each runner holds an exclusive `flock` on its DUT's lock
//! file for its whole life: a lock that can be taken means no runner is alive there.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use farmgate_wire::{DutRecord, JobKind, PduRecord};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Everything a job runner needs to run one job on one DUT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerSpec {
    /// The job.
    pub job_id: String,
    /// User job, training round or quick check.
    pub kind: JobKind,
    /// Machine id of the DUT.
    pub dut_id: String,
    /// Full name of the DUT, for messages.
    pub dut_name: String,
    /// The DUT's MaRS record when the job was assigned.
    pub dut: DutRecord,
    /// Name of the DUT's PDU.
    pub pdu_name: String,
    /// That PDU's MaRS record.
    pub pdu: PduRecord,
    /// The DUT's port on it.
    pub port_id: String,
    /// Where to find the console relay (SALAD's REST API).
    pub salad_url: String,
    /// Directory of the per-DUT lock files.
    pub locks_dir: PathBuf,
    /// Directory of the per-PDU lock files (shared with the daemon's PDU monitor).
    #[serde(default)]
    pub pdu_locks_dir: Option<PathBuf>,
    /// Farm-wide unfit-for-service pattern, used when the job has none.
    pub default_unfit_regex: Option<String>,
}

/// The lock file of a DUT.
pub fn lock_path(locks_dir: &Path, dut_id: &str) -> PathBuf {
    // Machine ids are MAC addresses; ':' is fine in file names, '/' is not.
    locks_dir.join(format!("{}.lock", dut_id.replace(['/', '\\'], "_")))
}

/// An exclusive lock on a DUT, held by the job runner for its whole life.
#[derive(Debug)]
pub struct DutLock {
    _lock: Flock<File>,
}

/// Try to take a DUT's lock without waiting. `Ok(None)` when somebody holds it.
pub fn try_lock_dut(locks_dir: &Path, dut_id: &str) -> std::io::Result<Option<DutLock>> {
    std::fs::create_dir_all(locks_dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(locks_dir, dut_id))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(DutLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(std::io::Error::from(errno)),
    }
}

/// True when a live process holds the DUT's lock.
pub fn dut_lock_held(locks_dir: &Path, dut_id: &str) -> std::io::Result<bool> {
    Ok(try_lock_dut(locks_dir, dut_id)?.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = try_lock_dut(dir.path(), "52:54:00:11:22:01")
            .expect("io")
            .expect("free");
        assert!(dut_lock_held(dir.path(), "52:54:00:11:22:01").expect("io"));
        assert!(!dut_lock_held(dir.path(), "52:54:00:11:22:02").expect("io"));
        drop(first);
        assert!(!dut_lock_held(dir.path(), "52:54:00:11:22:01").expect("io"));
    }
}
