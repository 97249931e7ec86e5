//! The serial console of one simulated machine: a pty pair whose slave side is what the
//! gateway opens (through a `ttySIM<port>` symlink), and whose master side the simulated
//! machine writes to and reads from.

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

/// How long a console write may wait for room in the pty before the rest is dropped, as
/// a serial line with nobody listening would lose it.
const WRITE_PATIENCE: Duration = Duration::from_millis(250);
/// Longest line kept from the console input; longer lines are cut.
const MAX_INPUT_LINE: usize = 4096;

/// One pty pair, kept open for the farm's lifetime.
pub(crate) struct Console {
    /// The master side, non-blocking, registered with the runtime (a farm of 1,000
    /// machines must not poll 1,000 ptys).
    master: AsyncFd<OwnedFd>,
    /// Held open so the slave's settings (raw mode) survive the gateway closing and
    /// reopening it, and so reads on the master never see a hang-up.
    _slave: OwnedFd,
    link: PathBuf,
    write_lock: tokio::sync::Mutex<()>,
    input: broadcast::Sender<String>,
}

impl Console {
    /// Open a raw pty pair and link its slave as `link`.
    pub(crate) fn open(link: &Path) -> anyhow::Result<Console> {
        let pty = nix::pty::openpty(None, None).context("openpty")?;
        // openpty does not set close-on-exec: without it every process the test starts
        // (the gateway, its job runners) would inherit the simulated farm's ptys.
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
                .context("setting close-on-exec on a new pty")?;
        }
        let mut tio = tcgetattr(&pty.slave).context("reading the termios of a new pty")?;
        cfmakeraw(&mut tio);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &tio).context("setting a new pty to raw mode")?;
        let slave_path = nix::unistd::ttyname(&pty.slave).context("ttyname of a new pty")?;
        let flags = fcntl(&pty.master, FcntlArg::F_GETFL).context("F_GETFL on a pty master")?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&pty.master, FcntlArg::F_SETFL(flags)).context("F_SETFL on a pty master")?;
        if std::fs::symlink_metadata(link).is_ok() {
            std::fs::remove_file(link)
                .with_context(|| format!("removing the stale {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&slave_path, link).with_context(|| {
            format!(
                "linking {} to the pty {}",
                link.display(),
                slave_path.display()
            )
        })?;
        let master = register(pty.master).context("registering a pty master")?;
        let (input, _) = broadcast::channel(256);
        Ok(Console {
            master,
            _slave: pty.slave,
            link: link.to_path_buf(),
            write_lock: tokio::sync::Mutex::new(()),
            input,
        })
    }

    /// The `ttySIM<port>` symlink.
    pub(crate) fn link(&self) -> &Path {
        &self.link
    }

    /// Remove the symlink (at shutdown).
    pub(crate) fn unlink(&self) {
        if let Err(e) = std::fs::remove_file(&self.link)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", self.link.display());
        }
    }

    /// Lines typed on the console (by whoever holds the slave side) from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<String> {
        self.input.subscribe()
    }

    /// Write `data` if `still_current()` holds once the console is ours. Data that finds
    /// no room within [`WRITE_PATIENCE`] is dropped.
    pub(crate) async fn write(&self, still_current: impl Fn() -> bool, data: &[u8]) {
        let _guard = self.write_lock.lock().await;
        if !still_current() {
            return;
        }
        let deadline = tokio::time::Instant::now() + WRITE_PATIENCE;
        let mut rest = data;
        while !rest.is_empty() {
            let attempt = self.master.async_io(Interest::WRITABLE, |fd| {
                nix::unistd::write(fd, rest).map_err(std::io::Error::from)
            });
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(n)) => rest = &rest[n..],
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::warn!("console {}: write: {e}", self.link.display());
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        "console {}: nobody reads, {} bytes dropped",
                        self.link.display(),
                        rest.len()
                    );
                    return;
                }
            }
        }
    }

    /// Read the master side for ever, turning what the gateway writes into lines.
    pub(crate) async fn pump_input(&self) {
        let mut buf = [0u8; 1024];
        let mut line: Vec<u8> = Vec::new();
        loop {
            let n = match self
                .master
                .async_io(Interest::READABLE, |fd| {
                    nix::unistd::read(fd, &mut buf).map_err(std::io::Error::from)
                })
                .await
            {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EIO while no slave is open cannot happen as we hold one; anything
                    // else is worth a pause rather than a busy loop.
                    tracing::debug!("console {}: read: {e}", self.link.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            for &b in &buf[..n] {
                if b == b'\n' || b == b'\r' {
                    if !line.is_empty() {
                        let text = String::from_utf8_lossy(&line).into_owned();
                        // No subscriber is fine: the input is then ignored.
                        let _ = self.input.send(text);
                        line.clear();
                    }
                } else if line.len() < MAX_INPUT_LINE {
                    line.push(b);
                }
            }
        }
    }
}

/// Register a pty master with the runtime.
///
/// `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` value may close its
/// descriptor while registered; an `OwnedFd` moved into the `AsyncFd` cannot, it is
/// closed only when the `AsyncFd` is dropped.
#[allow(deprecated)]
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}
