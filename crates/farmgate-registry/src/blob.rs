//! Blob fetches: one upstream download per digest at a time, written to a temporary file
//! that every waiting client reads as it grows; verified against the digest before it is
//! renamed into place. Readers hold back the last byte until the digest is verified, so no
//! client ever receives a complete body of corrupted content.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::path::Digest;
use crate::upstream::{describe, error_chain};
use crate::{Inner, RegistryError, Upstream};

/// Bytes gathered before a write to the temporary file (and a wake-up of the readers).
const WRITE_CHUNK: usize = 64 * 1024;
/// Largest piece sent to a client at once.
const READ_CHUNK: u64 = 256 * 1024;

/// Progress of a download.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Waiting for the upstream's answer.
    Connecting,
    /// Receiving; total from the upstream's Content-Length when it sent one.
    Streaming { total: Option<u64> },
    /// Verified and renamed into place.
    Done,
    /// Failed; the temporary file is gone.
    Failed(Arc<RegistryError>),
}

/// Shared state of a download.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) phase: Phase,
    /// Bytes written to the file so far.
    pub(crate) written: u64,
}

/// A download in progress.
pub(crate) struct Fetch {
    /// The temporary file, opened once; readers use positional reads, so renaming or
    /// deleting the path does not affect them.
    file: Arc<File>,
    tmp: PathBuf,
    state: watch::Sender<State>,
}

impl Fetch {
    /// Creates the temporary file for `digest` under `<dir>/tmp`.
    pub(crate) fn create(dir: &Path, digest: &Digest, seq: u64) -> Result<Fetch, RegistryError> {
        let tmp = dir.join("tmp").join(format!(
            "{}.{}.{seq}.partial",
            digest.hex(),
            std::process::id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| RegistryError::Io {
                action: "create",
                path: tmp.clone(),
                source,
            })?;
        let (state, _) = watch::channel(State {
            phase: Phase::Connecting,
            written: 0,
        });
        Ok(Fetch {
            file: Arc::new(file),
            tmp,
            state,
        })
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    pub(crate) fn file(&self) -> Arc<File> {
        self.file.clone()
    }
}

/// Runs a download to the end (whether or not clients still listen), then removes it from
/// the in-flight table. A stored blob may make older ones be evicted.
pub(crate) async fn run(
    inner: Arc<Inner>,
    up: Upstream,
    name: String,
    digest: Digest,
    fetch: Arc<Fetch>,
    client_auth: Option<axum::http::HeaderValue>,
) {
    let result = download(&inner, &up, &name, &digest, &fetch, client_auth.as_ref()).await;
    let result = match result {
        Ok(()) => install(&inner.dir, &digest, &fetch).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            tracing::info!(digest = %digest, upstream = %up.prefix, "registry cache: blob stored");
            let size = fetch.state.borrow().written;
            inner.blobs.insert(digest.hex(), size);
            evict(&inner).await;
            fetch.state.send_modify(|s| s.phase = Phase::Done);
        }
        Err(e) => {
            tracing::warn!(digest = %digest, upstream = %up.prefix, "registry cache: blob fetch failed: {e}");
            if let Err(err) = std::fs::remove_file(&fetch.tmp)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(
                    "registry cache: cannot remove {}: {err}",
                    fetch.tmp.display()
                );
            }
            fetch
                .state
                .send_modify(|s| s.phase = Phase::Failed(Arc::new(e)));
        }
    }
    inner
        .inflight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(digest.hex());
}

/// Keeps the store within its bound (before the clients of the new blob see it complete,
/// so a finished pull has left the store within the bound).
async fn evict(inner: &Arc<Inner>) {
    let inner2 = inner.clone();
    match tokio::task::spawn_blocking(move || inner2.blobs.evict(&inner2.dir)).await {
        Ok(ev) => {
            inner
                .stats
                .evicted_blobs
                .fetch_add(ev.blobs, Ordering::Relaxed);
            inner
                .stats
                .evicted_bytes
                .fetch_add(ev.bytes, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!("registry cache: eviction task failed: {e}"),
    }
}

async fn download(
    inner: &Inner,
    up: &Upstream,
    name: &str,
    digest: &Digest,
    fetch: &Fetch,
    client_auth: Option<&axum::http::HeaderValue>,
) -> Result<(), RegistryError> {
    let resp = inner
        .upstream
        .send(
            up,
            axum::http::Method::GET,
            name,
            &format!("blobs/{digest}"),
            None,
            client_auth,
        )
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(crate::status_error(
            up,
            status.as_u16(),
            RegistryError::BlobUnknown(format!(
                "{digest} of {}/{name}: upstream {} answered 404",
                up.prefix, up.url
            )),
            &format!("GET blob {digest} of {name}"),
        ));
    }
    let total = resp.content_length();
    fetch
        .state
        .send_modify(|s| s.phase = Phase::Streaming { total });
    let upstream_err = |message: String| RegistryError::Upstream {
        upstream: describe(up),
        message,
    };
    let mut body = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut buf = BytesMut::with_capacity(WRITE_CHUNK * 2);
    let mut pos: u64 = 0;
    let idle = inner.upstream.timeout();
    loop {
        let next = tokio::time::timeout(idle, body.next()).await.map_err(|_| {
            upstream_err(format!(
                "blob {digest}: no data for {idle:?} after {} bytes",
                pos + buf.len() as u64
            ))
        })?;
        let chunk = match next {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                return Err(upstream_err(format!(
                    "blob {digest}: body broken after {} bytes: {}",
                    pos + buf.len() as u64,
                    error_chain(&e)
                )));
            }
        };
        if let Some(c) = &chunk {
            hasher.update(c);
            inner
                .stats
                .upstream_bytes
                .fetch_add(c.len() as u64, Ordering::Relaxed);
            buf.extend_from_slice(c);
            if let Some(t) = total
                && pos + buf.len() as u64 > t
            {
                return Err(RegistryError::DigestMismatch {
                    upstream: describe(up),
                    message: format!("blob {digest}: more than the announced {t} bytes"),
                });
            }
        }
        if (chunk.is_none() && !buf.is_empty()) || buf.len() >= WRITE_CHUNK {
            let data = buf.split().freeze();
            let n = data.len() as u64;
            write_at(fetch.file.clone(), data, pos, &fetch.tmp).await?;
            pos += n;
            fetch.state.send_modify(|s| s.written = pos);
        }
        if chunk.is_none() {
            break;
        }
    }
    if let Some(t) = total
        && t != pos
    {
        return Err(RegistryError::DigestMismatch {
            upstream: describe(up),
            message: format!("blob {digest}: {pos} bytes received, {t} announced"),
        });
    }
    let got = Digest::from_hash(&hasher.finalize());
    if &got != digest {
        return Err(RegistryError::DigestMismatch {
            upstream: describe(up),
            message: format!("blob {digest} of {name}: the {pos} bytes received have digest {got}"),
        });
    }
    Ok(())
}

async fn write_at(
    file: Arc<File>,
    data: Bytes,
    pos: u64,
    path: &Path,
) -> Result<(), RegistryError> {
    let r = tokio::task::spawn_blocking(move || file.write_all_at(&data, pos)).await;
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(RegistryError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        }),
        Err(e) => Err(RegistryError::Io {
            action: "write",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        }),
    }
}

/// Syncs the verified temporary file and renames it to its content address.
async fn install(dir: &Path, digest: &Digest, fetch: &Fetch) -> Result<(), RegistryError> {
    let dest = digest.blob_path(dir);
    let file = fetch.file.clone();
    let tmp = fetch.tmp.clone();
    let dest2 = dest.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<(), RegistryError> {
        file.sync_data().map_err(|source| RegistryError::Io {
            action: "sync",
            path: tmp.clone(),
            source,
        })?;
        if let Some(parent) = dest2.parent() {
            std::fs::create_dir_all(parent).map_err(|source| RegistryError::Io {
                action: "create",
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::rename(&tmp, &dest2).map_err(|source| RegistryError::Io {
            action: "rename into place",
            path: dest2.clone(),
            source,
        })
    })
    .await;
    match r {
        Ok(r) => r,
        Err(e) => Err(RegistryError::Io {
            action: "install",
            path: dest,
            source: std::io::Error::other(e),
        }),
    }
}

/// A client's view of a download: yields bytes as they are written, all but the last one
/// until the blob is verified; ends with an error if the download fails.
pub(crate) fn reader(
    file: Arc<File>,
    rx: watch::Receiver<State>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct R {
        file: Arc<File>,
        rx: watch::Receiver<State>,
        pos: u64,
        finished: bool,
    }
    let r = R {
        file,
        rx,
        pos: 0,
        finished: false,
    };
    futures_util::stream::unfold(r, |mut r| async move {
        if r.finished {
            return None;
        }
        loop {
            let st = r.rx.borrow_and_update().clone();
            let limit = match &st.phase {
                Phase::Done => st.written,
                Phase::Failed(e) => {
                    r.finished = true;
                    return Some((Err(std::io::Error::other(e.to_string())), r));
                }
                _ => st.written.saturating_sub(1),
            };
            if r.pos < limit {
                let n = (limit - r.pos).min(READ_CHUNK) as usize;
                let file = r.file.clone();
                let pos = r.pos;
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, pos).map(|()| buf)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                return match read {
                    Ok(buf) => {
                        r.pos += buf.len() as u64;
                        Some((Ok(Bytes::from(buf)), r))
                    }
                    Err(e) => {
                        r.finished = true;
                        Some((Err(e), r))
                    }
                };
            }
            if matches!(st.phase, Phase::Done) {
                return None;
            }
            if r.rx.changed().await.is_err() {
                r.finished = true;
                return Some((Err(std::io::Error::other("blob download abandoned")), r));
            }
        }
    })
}
