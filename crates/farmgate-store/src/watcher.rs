//! Following an admin's edits of the MaRS DB file.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use farmgate_wire::MarsDb;
use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mars::{MarsError, MarsFile, MarsStamp};

/// How many of the daemon's own writes are remembered.
const OWN_WRITES_KEPT: usize = 8;

/// The task started by [`watch`]. It stops when cancelled or when this is dropped.
#[derive(Debug)]
pub struct MarsWatcher {
    own_writes: Arc<Mutex<Vec<MarsStamp>>>,
    task: JoinHandle<()>,
}

impl MarsWatcher {
    /// The file version `stamp` was written by this process: do not reload it.
    pub fn note_own_write(&self, stamp: MarsStamp) {
        let mut own = self
            .own_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !own.contains(&stamp) {
            if own.len() >= OWN_WRITES_KEPT {
                own.remove(0);
            }
            own.push(stamp);
        }
    }
}

impl Drop for MarsWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Poll `file` every `interval`; when it changed (and the change is not one noted with
/// [`MarsWatcher::note_own_write`]), reload and validate it and send the new database
/// on `tx`. An invalid edit is logged and the last good database is kept. Stops when
/// `cancel` is cancelled. Must be called within a tokio runtime.
///
/// The version of the file present when this is called is taken as already loaded.
pub fn watch(
    file: MarsFile,
    interval: Duration,
    tx: tokio_watch::Sender<Arc<MarsDb>>,
    cancel: CancellationToken,
) -> MarsWatcher {
    let own_writes: Arc<Mutex<Vec<MarsStamp>>> = Arc::new(Mutex::new(Vec::new()));
    let own = own_writes.clone();
    let mut last_seen = file.stamp();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let f = file.clone();
            let checked = tokio::task::spawn_blocking(move || check(&f, last_seen)).await;
            let Ok(outcome) = checked else {
                continue;
            };
            match outcome {
                Check::Unchanged => {}
                Check::Changed { stamp, result } => {
                    let is_own = own
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .contains(&stamp);
                    last_seen = Some(stamp);
                    if is_own {
                        continue;
                    }
                    match result {
                        Ok(db) => {
                            let differs = **tx.borrow() != db;
                            if differs {
                                tracing::info!(file = %file.path().display(), "MaRS DB file reloaded");
                                tx.send_replace(Arc::new(db));
                            }
                        }
                        Err(e) => log_invalid(&file, &e),
                    }
                }
                Check::Gone => {
                    if last_seen.is_some() {
                        tracing::warn!(
                            file = %file.path().display(),
                            "the MaRS DB file disappeared; keeping the last good database"
                        );
                    }
                    last_seen = None;
                }
                Check::Moving => {}
            }
        }
    });
    MarsWatcher { own_writes, task }
}

enum Check {
    Unchanged,
    /// The file changed while it was read: look again next time.
    Moving,
    Gone,
    Changed {
        stamp: MarsStamp,
        result: Result<MarsDb, MarsError>,
    },
}

fn check(file: &MarsFile, last_seen: Option<MarsStamp>) -> Check {
    let Some(before) = file.stamp() else {
        return Check::Gone;
    };
    if Some(before) == last_seen {
        return Check::Unchanged;
    }
    let result = file.load().and_then(|db| {
        MarsFile::validate(&db)?;
        Ok(db)
    });
    if file.stamp() != Some(before) {
        return Check::Moving;
    }
    Check::Changed {
        stamp: before,
        result,
    }
}

fn log_invalid(file: &MarsFile, e: &MarsError) {
    let path = file.path().display();
    match e {
        MarsError::Yaml {
            line,
            column,
            message,
            ..
        } => tracing::error!(
            file = %path,
            line = line.unwrap_or(0),
            column = column.unwrap_or(0),
            "invalid edit of the MaRS DB file, keeping the last good database: {message}"
        ),
        other => tracing::error!(
            file = %path,
            "invalid edit of the MaRS DB file, keeping the last good database: {other}"
        ),
    }
}
