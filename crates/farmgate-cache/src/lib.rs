//! Artifact cache (KissCache style): one upstream download streamed to every client at
//! once, then served from disk, with LRU size bound, TTL, Range and HEAD.
//!
//! A client asks for `GET /cache/<url>` (e.g. `/cache/https://example.org/a/b.tar.gz`) or
//! `GET /cache?url=<percent-encoded url>[&sha256=<hex>]`.
//!
//! * The first request for a URL starts ONE upstream download into a temporary file in the
//!   cache directory. Every client of that URL — the first and all arriving while it runs —
//!   reads that file as it grows and gets bytes as soon as they are on disk
//!   (`X-Cache: MISS` for the one that started it, `COALESCED` for the others). The
//!   download belongs to the cache, not to a client: it goes on when clients disconnect.
//! * Once complete (Content-Length matched, sha256 matched when the URL or a `sha256`
//!   parameter gives one) the file is renamed into `objects/` and later requests are served
//!   from disk (`X-Cache: HIT`). The last byte of a download is held back from clients
//!   until those checks pass: a client never sees a complete response of a bad download.
//! * An upstream failing mid-download aborts every client's connection (their responses
//!   are truncated, never completed) and the entry is discarded; the next request fetches
//!   again.
//! * Range (one range per request): served from disk on complete entries; on an entry
//!   being downloaded with a known length the range is streamed as it arrives (206); with
//!   an unknown length (chunked upstream) the Range header is ignored and the whole body
//!   is sent (200), as RFC 9110 allows.
//! * HEAD answers the headers of a GET. On a miss it starts the download (it warms the
//!   cache) and answers as soon as the upstream headers are in.
//! * TTL: an entry older than `ttl` (since it was fetched or last revalidated) is
//!   revalidated with a conditional GET (`If-None-Match` / `If-Modified-Since`) when the
//!   upstream gave an ETag or Last-Modified; a `304` refreshes it in place, anything else
//!   refetches it. Without validators it is refetched.
//! * LRU: after each download the least recently used entries are deleted until the total
//!   is at most `max_bytes`; an entry being downloaded or served is never evicted. An
//!   artifact larger than `max_bytes` is streamed to its clients but not kept.
//! * Persistence: `index.json` in the cache directory (url, size, content type, etag,
//!   last-modified, sha256 when known, fetched-at, last-used), replaced atomically
//!   (write + rename); `open` loads it, drops entries whose file is missing or has the
//!   wrong size, and deletes partial downloads and unknown files.
//! * Upstream connections: direct (no proxy from the environment); connect and idle read
//!   timeouts are `upstream_timeout`; redirects are followed (at most 10) only to http(s)
//!   URLs of allowed hosts. Only `http` upstream URLs can be fetched by this build: the
//!   workspace's reqwest has no TLS backend, so an `https` URL gets a 502 naming the error.

pub mod key;

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use key::Target;

/// Largest piece read from a cache file per body chunk.
const READ_CHUNK: usize = 256 * 1024;
/// Index file name in the cache directory.
const INDEX_FILE: &str = "index.json";
/// Hits update `last_used` in memory; the index is rewritten for them at most this often.
const HIT_PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Cache directory (created if missing): `index.json`, `objects/`, `tmp/`.
    pub dir: PathBuf,
    /// Size bound of the complete entries, in bytes (LRU eviction above it).
    pub max_bytes: u64,
    /// Age after which an entry is revalidated (or refetched) before being served.
    pub ttl: Duration,
    /// Hosts that may be fetched; `None`: any host. Entries match a host exactly, or
    /// `*.suffix` matches every host ending in `.suffix`.
    pub allow_hosts: Option<Vec<String>>,
    /// Upstream connect timeout and idle timeout (longest wait for the next bytes).
    pub upstream_timeout: Duration,
    /// PEM certificates (one bundle per entry) trusted for https upstreams besides the
    /// built-in roots: a private artifact server with its own CA.
    pub extra_ca_pem: Vec<Vec<u8>>,
}

/// Everything that can go wrong, each mapped to an HTTP status by [`CacheError::status`].
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file system operation on the cache directory failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The index file is not what this crate writes.
    #[error("cache index {path} is not valid: {source}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The requested URL cannot be parsed or is not acceptable.
    #[error("invalid upstream URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given (shortened).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is not http or https.
    #[error("only http:// and https:// URLs can be cached, not scheme {scheme:?} ({url})")]
    Scheme {
        /// The scheme given (may be empty).
        scheme: String,
        /// The URL as given (shortened).
        url: String,
    },
    /// A `sha256` hint that is not 64 hex digits.
    #[error("invalid sha256 hint {hint:?}: expected 64 hex digits")]
    BadDigest {
        /// The hint as given (shortened).
        hint: String,
    },
    /// The request names neither `/cache/<url>` nor `?url=`.
    #[error("missing upstream URL: use /cache/<url> or /cache?url=<percent-encoded url>")]
    MissingUrl,
    /// The host is not in `allow_hosts`.
    #[error("host {host} is not in the cache's allowlist")]
    HostNotAllowed {
        /// The host refused.
        host: String,
    },
    /// The upstream answered something other than 200 (or 304 to a revalidation).
    #[error("upstream answered {status} for {url}")]
    UpstreamStatus {
        /// The upstream status code.
        status: u16,
        /// The upstream URL.
        url: String,
    },
    /// The upstream could not be reached or did not answer in time.
    #[error("cannot fetch from upstream host {host}: {error}")]
    UpstreamConnect {
        /// The upstream host.
        host: String,
        /// The error chain.
        error: String,
    },
    /// The upstream failed after the download started.
    #[error("upstream {url} failed after {received} bytes: {error}")]
    UpstreamBroken {
        /// The upstream URL.
        url: String,
        /// Bytes received before the failure.
        received: u64,
        /// The error.
        error: String,
    },
    /// The upstream sent a different number of bytes than its Content-Length.
    #[error("upstream {url} announced {expected} bytes but sent {actual}")]
    LengthMismatch {
        /// The upstream URL.
        url: String,
        /// Its Content-Length.
        expected: u64,
        /// Bytes received (so far, when more than announced).
        actual: u64,
    },
    /// The artifact's sha256 differs from the one the request gave.
    #[error("sha256 of {url} is {actual}, expected {expected}")]
    DigestMismatch {
        /// The upstream URL.
        url: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what the upstream sent.
        actual: String,
    },
    /// The HTTP client could not be set up.
    #[error("cannot set up the upstream HTTP client: {0}")]
    Client(String),
}

impl CacheError {
    /// The HTTP status a client gets for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            CacheError::BadUrl { .. }
            | CacheError::Scheme { .. }
            | CacheError::BadDigest { .. }
            | CacheError::MissingUrl => StatusCode::BAD_REQUEST,
            CacheError::HostNotAllowed { .. } => StatusCode::FORBIDDEN,
            CacheError::UpstreamStatus { status, .. } => match *status {
                404 => StatusCode::NOT_FOUND,
                410 => StatusCode::GONE,
                _ => StatusCode::BAD_GATEWAY,
            },
            CacheError::UpstreamConnect { .. } => StatusCode::BAD_GATEWAY,
            CacheError::UpstreamBroken { .. }
            | CacheError::LengthMismatch { .. }
            | CacheError::DigestMismatch { .. } => StatusCode::BAD_GATEWAY,
            CacheError::Io { .. } | CacheError::Index { .. } | CacheError::Client(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for CacheError {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}

fn error_response(e: &CacheError) -> Response {
    (
        e.status(),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{e}\n"),
    )
        .into_response()
}

/// Usage statistics (`GET /cache-stats`).
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    /// Complete entries on disk.
    pub entries: u64,
    /// Their total size.
    pub bytes: u64,
    /// Requests served from a complete entry.
    pub hits: u64,
    /// Requests that started an upstream download.
    pub misses: u64,
    /// Requests that joined a download in progress.
    pub coalesced: u64,
    /// Bytes received from upstreams.
    pub upstream_bytes: u64,
    /// Entries deleted to stay under `max_bytes`.
    pub evictions: u64,
    /// Upstream downloads that failed (error status, connection, truncation, digest).
    pub upstream_errors: u64,
}

/// One complete entry, as kept in memory and in `index.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    url: String,
    size: u64,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    last_modified: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    fetched_at: DateTime<Utc>,
    last_used: DateTime<Utc>,
    /// Held by every download and response using the entry: more than one holder = in use.
    #[serde(skip)]
    pins: Arc<()>,
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    entries: Vec<Entry>,
}

#[derive(Serialize)]
struct IndexFileRef<'a> {
    version: u32,
    entries: Vec<&'a Entry>,
}

/// Upstream headers of a download.
#[derive(Debug)]
struct Meta {
    length: Option<u64>,
    content_type: Option<String>,
    etag: Option<String>,
    last_modified: Option<String>,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for the upstream headers.
    Connecting,
    /// Receiving the body.
    Streaming(Arc<Meta>),
    /// Complete and checked.
    Done(Arc<Meta>),
    /// A revalidation answered 304: the stored entry is fresh again.
    NotModified,
    /// Failed; the entry is discarded.
    Failed(Arc<CacheError>),
}

#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    written: u64,
}

/// Bytes of the most recent chunks of a download kept in memory.
const TAIL_BYTES: usize = 64 * 1024 * 1024;

/// The most recent chunks of a download, kept in memory so that readers keeping up with
/// the download get them without a file read or a copy, and before they are written to
/// disk (a slow disk write never delays a client's bytes). Holds at least every byte not
/// yet on disk, and at most about [`TAIL_BYTES`] of bytes already on disk.
#[derive(Default)]
struct Tail {
    chunks: VecDeque<(u64, Bytes)>,
    bytes: usize,
    on_disk: u64,
}

impl Tail {
    fn push(&mut self, offset: u64, chunk: Bytes) {
        self.bytes += chunk.len();
        self.chunks.push_back((offset, chunk));
        self.trim();
    }

    /// Records that everything before `n` is written to the file.
    fn set_on_disk(&mut self, n: u64) {
        self.on_disk = n;
        self.trim();
    }

    fn trim(&mut self) {
        while self.bytes > TAIL_BYTES
            && self.chunks.len() > 1
            && self
                .chunks
                .front()
                .is_some_and(|(o, b)| o + b.len() as u64 <= self.on_disk)
        {
            if let Some((_, old)) = self.chunks.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    /// The bytes from `pos` (at most up to `stop`) of the kept chunk holding `pos`.
    fn get(&self, pos: u64, stop: u64) -> Option<Bytes> {
        let i = self
            .chunks
            .partition_point(|(o, _)| *o <= pos)
            .checked_sub(1)?;
        let (o, b) = &self.chunks[i];
        let from = usize::try_from(pos - o).ok()?;
        if from >= b.len() || stop <= pos {
            return None;
        }
        let to = usize::try_from(stop - o).map_or(b.len(), |t| t.min(b.len()));
        Some(b.slice(from..to))
    }
}

/// A download in progress: its temporary file and its progress.
struct Download {
    file: Arc<std::fs::File>,
    tail: Mutex<Tail>,
    tmp_path: PathBuf,
    tx: watch::Sender<Progress>,
    pins: Arc<()>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    upstream_bytes: AtomicU64,
    evictions: AtomicU64,
    upstream_errors: AtomicU64,
}

struct Shared {
    entries: HashMap<String, Entry>,
    inflight: HashMap<String, Arc<Download>>,
    last_save: Instant,
}

struct Inner {
    cfg: CacheConfig,
    state: Mutex<Shared>,
    save_lock: Mutex<()>,
    counters: Counters,
    client: reqwest::Client,
    tmp_seq: AtomicU64,
}

/// The artifact cache; cheap to clone (shared state).
#[derive(Clone)]
pub struct ArtifactCache {
    inner: Arc<Inner>,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

use farmgate_httpc::error_chain;

/// What a request found under the lock.
enum Step {
    Hit {
        pins: Arc<()>,
        meta: Meta,
        size: u64,
        sha256: Option<String>,
    },
    Wait {
        dl: Arc<Download>,
        x_cache: &'static str,
    },
}

/// Where a response body comes from.
enum Source {
    /// A complete file of known size (read sequentially), pinned while the response lives.
    Complete {
        file: Option<std::fs::File>,
        size: u64,
        _pin: Arc<()>,
    },
    /// A download in progress.
    Progress(Arc<Download>, watch::Receiver<Progress>),
}

impl ArtifactCache {
    /// Opens (creating if needed) the cache in `cfg.dir`: loads `index.json`, drops entries
    /// whose file is missing or has another size, deletes partial downloads and files that
    /// no entry names.
    pub fn open(cfg: CacheConfig) -> Result<ArtifactCache, CacheError> {
        let objects = cfg.dir.join("objects");
        let tmp = cfg.dir.join("tmp");
        for d in [&cfg.dir, &objects, &tmp] {
            std::fs::create_dir_all(d).map_err(io_err("create directory", d))?;
        }
        // Partial downloads of a previous run are useless: their clients are gone.
        for item in std::fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let item = item.map_err(io_err("list", &tmp))?;
            let p = item.path();
            std::fs::remove_file(&p).map_err(io_err("delete partial download", &p))?;
        }
        let index_path = cfg.dir.join(INDEX_FILE);
        let mut entries = HashMap::new();
        match std::fs::read(&index_path) {
            Ok(data) => {
                let idx: IndexFile =
                    serde_json::from_slice(&data).map_err(|source| CacheError::Index {
                        path: index_path.clone(),
                        source,
                    })?;
                for e in idx.entries {
                    let k = key::key_of(&e.url);
                    let path = key::entry_path(&cfg.dir, &k)?;
                    match std::fs::metadata(&path) {
                        Ok(m) if m.is_file() && m.len() == e.size => {
                            entries.insert(k, e);
                        }
                        _ => tracing::warn!(url = %e.url, "cache entry without its file dropped"),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read", &index_path)(e)),
        }
        for item in std::fs::read_dir(&objects).map_err(io_err("list", &objects))? {
            let item = item.map_err(io_err("list", &objects))?;
            let name = item.file_name();
            if !name.to_str().is_some_and(|n| entries.contains_key(n)) {
                let p = item.path();
                std::fs::remove_file(&p).map_err(io_err("delete unindexed file", &p))?;
            }
        }
        let allow = cfg.allow_hosts.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            let u = attempt.url();
            if u.scheme() != "http" && u.scheme() != "https" {
                let msg = format!("redirect to a {} URL refused", u.scheme());
                return attempt.error(msg);
            }
            let host = u.host_str().unwrap_or("").to_string();
            if !key::host_allowed(&host, allow.as_deref()) {
                return attempt.error(format!("redirect to host {host} outside the allowlist"));
            }
            attempt.follow()
        });
        let builder = reqwest::Client::builder()
            .connect_timeout(cfg.upstream_timeout)
            .read_timeout(cfg.upstream_timeout)
            .redirect(policy)
            .no_proxy();
        let builder = farmgate_httpc::add_extra_roots(builder, &cfg.extra_ca_pem)
            .map_err(CacheError::Client)?;
        let client = builder
            .build()
            .map_err(|e| CacheError::Client(error_chain(&e)))?;
        let cache = ArtifactCache {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(Shared {
                    entries,
                    inflight: HashMap::new(),
                    last_save: Instant::now(),
                }),
                save_lock: Mutex::new(()),
                counters: Counters::default(),
                client,
                tmp_seq: AtomicU64::new(0),
            }),
        };
        cache.persist()?;
        Ok(cache)
    }

    /// The HTTP routes: `GET`/`HEAD /cache/{*url}`, `GET`/`HEAD /cache?url=<url>[&sha256=]`,
    /// `GET /cache-stats` (JSON [`CacheStats`]).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/cache/{*url}", get(by_path))
            .route("/cache", get(by_query))
            .route("/cache-stats", get(stats_handler))
            .with_state(self.clone())
    }

    /// Serves `url` through the cache, as `GET /cache?url=<url>` would: from disk, by
    /// joining a download in progress, or by starting one. For other parts of the gateway
    /// that fetch URLs on a client's behalf (a job's `storage.http` files).
    ///
    /// `None` when the cache does not take this URL (not http(s), credentials in it, or
    /// a host outside the allowlist): the caller fetches it directly.
    pub async fn fetch(&self, url: &str, range: Option<HeaderValue>) -> Option<Response> {
        let t = key::parse_target(url).ok()?;
        let host = t.url.host_str()?;
        if !key::host_allowed(host, self.inner.cfg.allow_hosts.as_deref()) {
            return None;
        }
        Some(self.serve(t, false, range).await)
    }

    /// Current statistics.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = {
            let st = lock(&self.inner.state);
            (
                st.entries.len() as u64,
                st.entries.values().map(|e| e.size).sum(),
            )
        };
        let c = &self.inner.counters;
        CacheStats {
            entries,
            bytes,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            upstream_bytes: c.upstream_bytes.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            upstream_errors: c.upstream_errors.load(Ordering::Relaxed),
        }
    }

    fn object_path(&self, key: &str) -> Result<PathBuf, CacheError> {
        key::entry_path(&self.inner.cfg.dir, key)
    }

    /// Writes `index.json` atomically (temporary file + rename).
    fn persist(&self) -> Result<(), CacheError> {
        let _order = lock(&self.inner.save_lock);
        let data = {
            let mut st = lock(&self.inner.state);
            st.last_save = Instant::now();
            let mut list: Vec<&Entry> = st.entries.values().collect();
            list.sort_by(|a, b| a.url.cmp(&b.url));
            serde_json::to_vec_pretty(&IndexFileRef {
                version: 1,
                entries: list,
            })
            .map_err(|source| CacheError::Index {
                path: self.inner.cfg.dir.join(INDEX_FILE),
                source,
            })?
        };
        let path = self.inner.cfg.dir.join(INDEX_FILE);
        let tmp = self.inner.cfg.dir.join(format!("{INDEX_FILE}.tmp"));
        std::fs::write(&tmp, &data).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        Ok(())
    }

    /// Persists the index in the background (blocking pool).
    fn persist_later(&self) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = me.persist() {
                tracing::warn!("cannot save the cache index: {e}");
            }
        });
    }

    /// Decides, under the lock, how to serve `t`: from disk, or from a download (starting
    /// one when none runs).
    fn lookup(&self, t: &Target) -> Result<Step, CacheError> {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.inner.cfg.ttl).unwrap_or(chrono::Duration::MAX);
        let hint_hex = t.sha256_hint.map(hex::encode);
        let mut st = lock(&self.inner.state);
        let mut validators = None;
        if let Some(e) = st.entries.get_mut(&t.key) {
            let digest_ok = match (&hint_hex, &e.sha256) {
                (Some(h), Some(s)) => h == s,
                _ => true,
            };
            let fresh = now.signed_duration_since(e.fetched_at) < ttl;
            if fresh && digest_ok {
                e.last_used = now;
                let step = Step::Hit {
                    pins: e.pins.clone(),
                    meta: Meta {
                        length: Some(e.size),
                        content_type: e.content_type.clone(),
                        etag: e.etag.clone(),
                        last_modified: e.last_modified.clone(),
                    },
                    size: e.size,
                    sha256: e.sha256.clone(),
                };
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                let save = st.last_save.elapsed() > HIT_PERSIST_INTERVAL;
                drop(st);
                if save {
                    self.persist_later();
                }
                return Ok(step);
            }
            if digest_ok && (e.etag.is_some() || e.last_modified.is_some()) {
                validators = Some((e.etag.clone(), e.last_modified.clone()));
            }
        }
        if let Some(dl) = st.inflight.get(&t.key) {
            self.inner
                .counters
                .coalesced
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Step::Wait {
                dl: dl.clone(),
                x_cache: "COALESCED",
            });
        }
        let seq = self.inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self.inner.cfg.dir.join("tmp").join(format!(
            "{}.{}.{seq}.part",
            t.key,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io_err("create", &tmp_path))?;
        let (tx, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            written: 0,
        });
        let dl = Arc::new(Download {
            file: Arc::new(file),
            tail: Mutex::new(Tail::default()),
            tmp_path,
            tx,
            pins: Arc::new(()),
        });
        st.inflight.insert(t.key.clone(), dl.clone());
        drop(st);
        self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(self.clone().run_download(dl.clone(), t.clone(), validators));
        Ok(Step::Wait {
            dl,
            x_cache: "MISS",
        })
    }

    /// Serves one GET or HEAD of `t`.
    async fn serve(&self, t: Target, head: bool, range: Option<HeaderValue>) -> Response {
        if let Some(host) = t.url.host_str()
            && !key::host_allowed(host, self.inner.cfg.allow_hosts.as_deref())
        {
            return error_response(&CacheError::HostNotAllowed {
                host: host.to_string(),
            });
        }
        for _ in 0..4 {
            let step = match self.lookup(&t) {
                Ok(s) => s,
                Err(e) => return error_response(&e),
            };
            match step {
                Step::Hit {
                    pins,
                    meta,
                    size,
                    sha256,
                } => {
                    let path = match self.object_path(&t.key) {
                        Ok(p) => p,
                        Err(e) => return error_response(&e),
                    };
                    let file = match std::fs::File::open(&path) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!("cache file {} unreadable: {e}", path.display());
                            self.forget(&t.key, &pins);
                            continue;
                        }
                    };
                    if let (Some(hint), None) = (t.sha256_hint, sha256)
                        && !self.check_stored_digest(&t, &path, hint, &pins).await
                    {
                        continue;
                    }
                    let source = Source::Complete {
                        file: Some(file),
                        size,
                        _pin: pins,
                    };
                    return build_response(head, &meta, "HIT", range.as_ref(), source);
                }
                Step::Wait { dl, x_cache } => {
                    let mut rx = dl.tx.subscribe();
                    let phase = loop {
                        let phase = rx.borrow_and_update().phase.clone();
                        if !matches!(phase, Phase::Connecting) {
                            break phase;
                        }
                        if rx.changed().await.is_err() {
                            break Phase::Failed(Arc::new(CacheError::UpstreamBroken {
                                url: t.normalized.clone(),
                                received: 0,
                                error: "download task ended".into(),
                            }));
                        }
                    };
                    match phase {
                        Phase::Connecting | Phase::NotModified => continue,
                        Phase::Failed(e) => return error_response(&e),
                        Phase::Streaming(meta) | Phase::Done(meta) => {
                            let source = Source::Progress(dl, rx);
                            return build_response(head, &meta, x_cache, range.as_ref(), source);
                        }
                    }
                }
            }
        }
        error_response(&CacheError::UpstreamBroken {
            url: t.normalized,
            received: 0,
            error: "the cache entry kept changing while being looked up".into(),
        })
    }

    /// Hashes a stored entry whose digest is not known yet; records it when it matches
    /// `hint`, drops the entry when it does not (the caller then fetches again).
    async fn check_stored_digest(
        &self,
        t: &Target,
        path: &Path,
        hint: [u8; 32],
        pins: &Arc<()>,
    ) -> bool {
        let path = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let f = std::fs::File::open(&path)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; READ_CHUNK];
            let mut pos = 0u64;
            loop {
                let n = f.read_at(&mut buf, pos)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                pos += n as u64;
            }
            Ok(hex::encode(h.finalize()))
        })
        .await;
        match digest {
            Ok(Ok(d)) if d == hex::encode(hint) => {
                let mut st = lock(&self.inner.state);
                if let Some(e) = st.entries.get_mut(&t.key)
                    && Arc::ptr_eq(&e.pins, pins)
                {
                    e.sha256 = Some(d);
                }
                true
            }
            _ => {
                self.forget(&t.key, pins);
                false
            }
        }
    }

    /// Removes entry `key` (if it is still the one pinned by `pins`) and its file.
    fn forget(&self, key: &str, pins: &Arc<()>) {
        let mut st = lock(&self.inner.state);
        if st
            .entries
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e.pins, pins))
        {
            st.entries.remove(key);
            if let Ok(p) = self.object_path(key) {
                let _ = std::fs::remove_file(p);
            }
        }
        drop(st);
        self.persist_later();
    }

    /// The download task: fetches, publishes progress, then files the entry or discards it.
    async fn run_download(
        self,
        dl: Arc<Download>,
        t: Target,
        validators: Option<(Option<String>, Option<String>)>,
    ) {
        let result = self.fetch_into(&dl, &t, validators).await;
        let now = Utc::now();
        match result {
            Ok(None) => {
                {
                    let mut st = lock(&self.inner.state);
                    st.inflight.remove(&t.key);
                    if let Some(e) = st.entries.get_mut(&t.key) {
                        e.fetched_at = now;
                        e.last_used = now;
                    }
                }
                let _ = std::fs::remove_file(&dl.tmp_path);
                dl.tx.send_modify(|p| p.phase = Phase::NotModified);
                self.persist_later();
            }
            Ok(Some((meta, size, sha256))) => {
                let max = self.inner.cfg.max_bytes;
                let mut evicted = 0u64;
                {
                    let mut st = lock(&self.inner.state);
                    st.inflight.remove(&t.key);
                    let keep = size <= max;
                    let filed = match self.object_path(&t.key) {
                        Ok(dest) if keep => std::fs::rename(&dl.tmp_path, &dest)
                            .map_err(|e| tracing::warn!("cannot file {}: {e}", dest.display()))
                            .is_ok(),
                        _ => false,
                    };
                    if filed {
                        st.entries.insert(
                            t.key.clone(),
                            Entry {
                                url: t.normalized.clone(),
                                size,
                                content_type: meta.content_type.clone(),
                                etag: meta.etag.clone(),
                                last_modified: meta.last_modified.clone(),
                                sha256,
                                fetched_at: now,
                                last_used: now,
                                pins: dl.pins.clone(),
                            },
                        );
                    } else {
                        let _ = std::fs::remove_file(&dl.tmp_path);
                    }
                    evicted += self.evict(&mut st);
                }
                self.inner
                    .counters
                    .evictions
                    .fetch_add(evicted, Ordering::Relaxed);
                dl.tx.send_modify(|p| p.phase = Phase::Done(Arc::new(meta)));
                self.persist_later();
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.inner
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                lock(&self.inner.state).inflight.remove(&t.key);
                let _ = std::fs::remove_file(&dl.tmp_path);
                dl.tx.send_modify(|p| p.phase = Phase::Failed(Arc::new(e)));
            }
        }
    }

    /// Deletes least recently used entries not in use until the total fits `max_bytes`;
    /// returns how many. Runs under the state lock so that no download files an entry of
    /// the same key between the choice and the deletion.
    fn evict(&self, st: &mut Shared) -> u64 {
        let max = self.inner.cfg.max_bytes;
        let mut total: u64 = st.entries.values().map(|e| e.size).sum();
        if total <= max {
            return 0;
        }
        let mut idle: Vec<(DateTime<Utc>, String, u64)> = st
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.pins) == 1)
            .map(|(k, e)| (e.last_used, k.clone(), e.size))
            .collect();
        idle.sort();
        let mut n = 0;
        for (_, k, size) in idle {
            if total <= max {
                break;
            }
            st.entries.remove(&k);
            if let Ok(p) = self.object_path(&k)
                && let Err(e) = std::fs::remove_file(&p)
            {
                tracing::warn!("cannot delete evicted {}: {e}", p.display());
            }
            total -= size;
            n += 1;
        }
        n
    }

    /// Fetches `t` into the download's file. `Ok(None)`: not modified (revalidation);
    /// `Ok(Some((meta, size, sha256)))`: complete and checked.
    async fn fetch_into(
        &self,
        dl: &Download,
        t: &Target,
        validators: Option<(Option<String>, Option<String>)>,
    ) -> Result<Option<(Meta, u64, Option<String>)>, CacheError> {
        let host = t.url.host_str().unwrap_or_default().to_string();
        let timeout = self.inner.cfg.upstream_timeout;
        let mut req = self.inner.client.get(t.url.clone());
        let revalidating = validators.is_some();
        if let Some((etag, lm)) = validators {
            if let Some(e) = etag {
                req = req.header(header::IF_NONE_MATCH, e);
            }
            if let Some(l) = lm {
                req = req.header(header::IF_MODIFIED_SINCE, l);
            }
        }
        let connect_err = |error: String| CacheError::UpstreamConnect {
            host: host.clone(),
            error,
        };
        let mut resp = match tokio::time::timeout(timeout, req.send()).await {
            Err(_) => return Err(connect_err(format!("no answer within {timeout:?}"))),
            Ok(Err(e)) => return Err(connect_err(error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if revalidating && status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if status != StatusCode::OK {
            return Err(CacheError::UpstreamStatus {
                status: status.as_u16(),
                url: t.normalized.clone(),
            });
        }
        let hv = |name: header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let meta = Arc::new(Meta {
            length: resp.content_length(),
            content_type: hv(header::CONTENT_TYPE),
            etag: hv(header::ETAG),
            last_modified: hv(header::LAST_MODIFIED),
        });
        dl.tx
            .send_modify(|p| p.phase = Phase::Streaming(meta.clone()));
        let mut hasher = t.sha256_hint.map(|_| Sha256::new());
        let mut written: u64 = 0;
        let broken = |received: u64, error: String| CacheError::UpstreamBroken {
            url: t.normalized.clone(),
            received,
            error,
        };
        loop {
            let chunk = match tokio::time::timeout(timeout, resp.chunk()).await {
                Err(_) => return Err(broken(written, format!("no data for {timeout:?}"))),
                Ok(Err(e)) => return Err(broken(written, error_chain(&e))),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            let n = chunk.len() as u64;
            if let Some(len) = meta.length
                && written + n > len
            {
                return Err(CacheError::LengthMismatch {
                    url: t.normalized.clone(),
                    expected: len,
                    actual: written + n,
                });
            }
            // Clients get the chunk first, from memory; then it goes to disk.
            let offset = written;
            lock(&dl.tail).push(offset, chunk.clone());
            written += n;
            self.inner
                .counters
                .upstream_bytes
                .fetch_add(n, Ordering::Relaxed);
            dl.tx.send_modify(|p| p.written = written);
            let file = dl.file.clone();
            let h = hasher.take();
            let path = dl.tmp_path.clone();
            let data = chunk;
            hasher = tokio::task::spawn_blocking(move || {
                file.write_all_at(&data, offset)
                    .map_err(io_err("write", &path))?;
                Ok::<_, CacheError>(h.map(|mut h| {
                    h.update(&data);
                    h
                }))
            })
            .await
            .map_err(|e| broken(written, format!("writer task failed: {e}")))??;
            lock(&dl.tail).set_on_disk(written);
        }
        if let Some(len) = meta.length
            && written != len
        {
            return Err(CacheError::LengthMismatch {
                url: t.normalized.clone(),
                expected: len,
                actual: written,
            });
        }
        let sha256 = hasher.map(|h| hex::encode(h.finalize()));
        if let (Some(hint), Some(actual)) = (t.sha256_hint, &sha256)
            && hex::encode(hint) != *actual
        {
            return Err(CacheError::DigestMismatch {
                url: t.normalized.clone(),
                expected: hex::encode(hint),
                actual: actual.clone(),
            });
        }
        let meta = Meta {
            length: Some(written),
            content_type: meta.content_type.clone(),
            etag: meta.etag.clone(),
            last_modified: meta.last_modified.clone(),
        };
        Ok(Some((meta, written, sha256)))
    }
}

/// A `Range` header with one range, resolved against `total`: `Ok(Some((first, last)))`
/// (inclusive), `Ok(None)` to send everything, `Err(())` when unsatisfiable.
#[allow(clippy::result_unit_err)]
fn parse_range(h: Option<&HeaderValue>, total: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || total == 0 {
            return Err(());
        }
        return Ok(Some((total.saturating_sub(n), total - 1)));
    }
    let Ok(first) = a.parse::<u64>() else {
        return Ok(None);
    };
    let last = if b.is_empty() {
        total.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => l.min(total.saturating_sub(1)),
            _ => return Ok(None),
        }
    };
    if first >= total {
        return Err(());
    }
    Ok(Some((first, last)))
}

fn build_response(
    head: bool,
    meta: &Meta,
    x_cache: &'static str,
    range: Option<&HeaderValue>,
    source: Source,
) -> Response {
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    let (start, end) = match meta.length {
        Some(total) => match parse_range(range, total) {
            Err(()) => {
                let mut r = (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("range not satisfiable: the artifact has {total} bytes\n"),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
            Ok(Some((first, last))) => {
                status = StatusCode::PARTIAL_CONTENT;
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{total}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                (first, Some(last + 1))
            }
            Ok(None) => (0, Some(total)),
        },
        None => (0, None),
    };
    if let Some(end) = end {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    let ct = meta
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, ct);
    for (name, v) in [
        (header::ETAG, &meta.etag),
        (header::LAST_MODIFIED, &meta.last_modified),
    ] {
        if let Some(v) = v.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, v);
        }
    }
    headers.insert("x-cache", HeaderValue::from_static(x_cache));
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(body_stream(source, start, end))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// State of one response body being streamed.
struct Reader {
    source: Source,
    pos: u64,
    end: Option<u64>,
    finished: bool,
}

/// The bytes `[start, end)` of `source` (`end` None: to the end of the download), as soon
/// as they are on disk. A failed download ends the stream with an error, which aborts the
/// client's connection.
fn body_stream(
    source: Source,
    start: u64,
    end: Option<u64>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let reader = Reader {
        source,
        pos: start,
        end,
        finished: false,
    };
    futures_util::stream::unfold(reader, |mut r| async move {
        if r.finished {
            return None;
        }
        match next_chunk(&mut r).await {
            Ok(Some(b)) => Some((Ok(b), r)),
            Ok(None) => None,
            Err(e) => {
                r.finished = true;
                Some((Err(e), r))
            }
        }
    })
}

async fn next_chunk(r: &mut Reader) -> std::io::Result<Option<Bytes>> {
    loop {
        let (readable, done) = match &mut r.source {
            Source::Complete { size, .. } => (*size, true),
            Source::Progress(_, rx) => {
                let p = rx.borrow_and_update().clone();
                match p.phase {
                    Phase::Done(_) => (p.written, true),
                    Phase::Failed(e) => {
                        return Err(std::io::Error::other(e.to_string()));
                    }
                    Phase::NotModified | Phase::Connecting => {
                        return Err(std::io::Error::other("download state changed"));
                    }
                    Phase::Streaming(meta) => {
                        // The last byte waits for the length and digest checks.
                        let limit = match meta.length {
                            Some(len) => p.written.min(len.saturating_sub(1)),
                            None => p.written,
                        };
                        (limit, false)
                    }
                }
            }
        };
        let stop = r.end.map_or(readable, |e| e.min(readable));
        if r.pos < stop {
            let pos = r.pos;
            let n = (stop - pos).min(READ_CHUNK as u64) as usize;
            let data = match &mut r.source {
                Source::Complete { file, .. } => {
                    let Some(mut f) = file.take() else {
                        return Err(std::io::Error::other("cache file lost"));
                    };
                    let (f, data) = tokio::task::spawn_blocking(move || {
                        let data = read_file_at(&mut f, pos, n);
                        (f, data)
                    })
                    .await
                    .map_err(std::io::Error::other)?;
                    *file = Some(f);
                    Bytes::from(data?)
                }
                Source::Progress(dl, _) => {
                    let kept = lock(&dl.tail).get(pos, stop);
                    match kept {
                        Some(b) => b,
                        None => {
                            let file = dl.file.clone();
                            tokio::task::spawn_blocking(move || {
                                let mut buf = vec![0u8; n];
                                file.read_exact_at(&mut buf, pos).map(|_| Bytes::from(buf))
                            })
                            .await
                            .map_err(std::io::Error::other)??
                        }
                    }
                }
            };
            r.pos += data.len() as u64;
            return Ok(Some(data));
        }
        if done {
            return Ok(None);
        }
        if r.end.is_some_and(|e| r.pos >= e) {
            // A range that ended before the last byte: nothing more to wait for.
            return Ok(None);
        }
        if let Source::Progress(_, rx) = &mut r.source
            && rx.changed().await.is_err()
        {
            return Err(std::io::Error::other("download task ended"));
        }
    }
}

/// `n` bytes of `f` from `pos` (without zero-filling a buffer first).
fn read_file_at(f: &mut std::fs::File, pos: u64, n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(pos))?;
    let mut buf = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut buf)?;
    if buf.len() < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "cache file shorter than expected: {} bytes at {pos}",
                buf.len()
            ),
        ));
    }
    Ok(buf)
}

async fn by_path(
    State(cache): State<ArtifactCache>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path();
    let rest = match path.find("/cache/") {
        Some(i) => &path[i + "/cache/".len()..],
        None => return error_response(&CacheError::MissingUrl),
    };
    match key::target_from_request_path(rest, uri.query()) {
        Ok(t) => {
            cache
                .serve(
                    t,
                    method == Method::HEAD,
                    headers.get(header::RANGE).cloned(),
                )
                .await
        }
        Err(e) => error_response(&e),
    }
}

async fn by_query(
    State(cache): State<ArtifactCache>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut url = None;
    let mut digest = None;
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*k {
            "url" => url = Some(v.into_owned()),
            "sha256" => digest = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(url) = url else {
        return error_response(&CacheError::MissingUrl);
    };
    let mut t = match key::parse_target(&url) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    if let Some(d) = digest {
        match key::parse_digest(&d) {
            Ok(d) => t.sha256_hint = Some(d),
            Err(e) => return error_response(&e),
        }
    }
    cache
        .serve(
            t,
            method == Method::HEAD,
            headers.get(header::RANGE).cloned(),
        )
        .await
}

async fn stats_handler(State(cache): State<ArtifactCache>) -> axum::Json<CacheStats> {
    axum::Json(cache.stats())
}
