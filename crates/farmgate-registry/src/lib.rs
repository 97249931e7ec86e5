//! OCI distribution pull-through cache: manifests and blobs fetched upstream once, verified
//! by digest.
//!
//! Clients pull `<gateway>/<prefix>/<name>:<tag>` where `<prefix>` selects an [`Upstream`]
//! (`docker.io`, `quay.io`, `127.0.0.1:5000`...). Manifests are stored by digest with their
//! media type; tags point at a digest for [`RegistryConfig::tag_ttl`], then are revalidated
//! with a HEAD upstream (and served stale, with a warning, when the upstream is unreachable).
//! Blobs are stored by digest, verified before they are kept, and concurrent requests for a
//! blob share one upstream download, streamed to every client as it arrives.
//!
//! Layout of [`RegistryConfig::dir`]: `blobs/sha256/<2 hex>/<64 hex>`,
//! `manifests/sha256/<64 hex>` (+ `.type`), `tags/<sha256>.json`, `tmp/`.
//!
//! With [`RegistryConfig::max_size`], the blobs are kept within that many bytes: when a
//! newly cached blob takes the store over it, the least recently used blobs (last fetched
//! or served; a blob file's mtime is set on every GET served from it, so the order
//! survives restarts) are deleted, except blobs a client is reading or waiting for right
//! now. Manifests and tag records are small and are neither counted nor evicted.
//!
//! HTTPS upstreams are verified against the webpki root certificates plus
//! [`RegistryConfig::extra_ca_pem`]; an upstream whose certificate is not trusted makes
//! requests fail with a 502 whose message names the upstream and says so.

mod blob;
mod error;
mod lru;
pub mod path;
mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

pub use error::RegistryError;
use path::{Digest, Reference, RequestPath, Target};
use upstream::{DEFAULT_ACCEPT, UpstreamClient, describe, error_chain};

/// Largest manifest accepted from an upstream.
const MAX_MANIFEST: usize = 4 * 1024 * 1024;
const DIGEST_HEADER: &str = "docker-content-digest";

/// An upstream registry.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// First path component clients use, e.g. `docker.io` or `127.0.0.1:5000`.
    pub prefix: String,
    /// Base URL, e.g. `https://registry-1.docker.io` or `http://127.0.0.1:5000`.
    pub url: String,
}

/// Configuration of a [`RegistryCache`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Directory holding the cache (created if missing).
    pub dir: PathBuf,
    /// Upstream registries, selected by prefix.
    pub upstreams: Vec<Upstream>,
    /// How long a tag's resolution is used before it is revalidated upstream.
    pub tag_ttl: Duration,
    /// Connect and answer timeout for upstream requests (also the longest pause in a body).
    pub upstream_timeout: Duration,
    /// Bound on the bytes of cached blobs (`None`: unbounded). Least recently used blobs not
    /// in use are deleted when a new blob takes the store over it; manifests do not count.
    pub max_size: Option<u64>,
    /// Extra CA certificates trusted for HTTPS upstreams, each entry PEM text holding one
    /// or more certificates (as read from a `.pem`/`.crt` file), added to the built-in
    /// webpki roots.
    pub extra_ca_pem: Vec<Vec<u8>>,
}

/// Counters since the cache was opened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegistryStats {
    /// Manifest requests answered from the cache (including revalidated and stale tags).
    pub manifest_hits: u64,
    /// Manifest requests that fetched the manifest upstream.
    pub manifest_misses: u64,
    /// Blob requests answered from a complete cached blob.
    pub blob_hits: u64,
    /// Blob requests that started an upstream download.
    pub blob_misses: u64,
    /// Blob requests that joined a download already in progress.
    pub coalesced: u64,
    /// Body bytes received from upstreams (manifests and blobs).
    pub upstream_bytes: u64,
    /// Blobs deleted to keep the store within [`RegistryConfig::max_size`].
    pub evicted_blobs: u64,
    /// Bytes of the blobs deleted to keep the store within [`RegistryConfig::max_size`].
    pub evicted_bytes: u64,
    /// Bytes of complete blobs in the store now.
    pub blob_store_bytes: u64,
}

#[derive(Default)]
struct Stats {
    manifest_hits: AtomicU64,
    manifest_misses: AtomicU64,
    blob_hits: AtomicU64,
    blob_misses: AtomicU64,
    coalesced: AtomicU64,
    upstream_bytes: AtomicU64,
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
}

/// The pull-through cache; cheap to clone (shared state).
#[derive(Clone)]
pub struct RegistryCache {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    dir: PathBuf,
    upstreams: Vec<Upstream>,
    tag_ttl: Duration,
    upstream: UpstreamClient,
    stats: Stats,
    /// Complete blobs with their sizes and recency; pins of blobs in use.
    blobs: Arc<lru::BlobIndex>,
    /// Blob downloads in progress, by hex digest.
    inflight: Mutex<HashMap<String, Arc<blob::Fetch>>>,
    /// One lock per manifest key being fetched, so concurrent pulls fetch it once.
    manifest_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seq: AtomicU64,
}

/// What a tag resolved to, stored in `tags/<hash>.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TagRecord {
    prefix: String,
    name: String,
    tag: String,
    digest: String,
    media_type: String,
    /// Milliseconds since the Unix epoch of the last upstream confirmation.
    checked_ms: u64,
}

/// A manifest ready to send.
struct Manifest {
    bytes: Bytes,
    media_type: String,
    digest: Digest,
}

impl RegistryCache {
    /// Creates the directory layout (removing leftovers of interrupted downloads) and
    /// checks the upstreams.
    pub fn open(cfg: RegistryConfig) -> Result<RegistryCache, RegistryError> {
        let mut seen = std::collections::HashSet::new();
        for up in &cfg.upstreams {
            if up.prefix.is_empty()
                || up.prefix.contains('/')
                || path::parse_request(&format!("{}/x/blobs/sha256:{}", up.prefix, "0".repeat(64)))
                    .is_err()
            {
                return Err(RegistryError::Config(format!(
                    "upstream prefix {:?} is not a host[:port]-like path component",
                    up.prefix
                )));
            }
            if !seen.insert(up.prefix.as_str()) {
                return Err(RegistryError::Config(format!(
                    "upstream prefix {:?} is configured twice",
                    up.prefix
                )));
            }
            let u = url::Url::parse(&up.url).map_err(|e| {
                RegistryError::Config(format!("upstream {:?}: URL {:?}: {e}", up.prefix, up.url))
            })?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(RegistryError::Config(format!(
                    "upstream {:?}: URL {:?} is not http(s)",
                    up.prefix, up.url
                )));
            }
        }
        for sub in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
            let p = cfg.dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|source| RegistryError::Io {
                action: "create",
                path: p.clone(),
                source,
            })?;
        }
        let tmp = cfg.dir.join("tmp");
        let entries = std::fs::read_dir(&tmp).map_err(|source| RegistryError::Io {
            action: "list",
            path: tmp.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            if let Err(err) = std::fs::remove_file(&p) {
                tracing::warn!(
                    "registry cache: cannot remove leftover {}: {err}",
                    p.display()
                );
            }
        }
        if cfg.max_size == Some(0) {
            return Err(RegistryError::Config(
                "max_size is 0: no blob could be kept (use None for no bound)".into(),
            ));
        }
        let upstream = UpstreamClient::new(cfg.upstream_timeout, &cfg.extra_ca_pem)?;
        let blobs = Arc::new(lru::BlobIndex::scan(&cfg.dir, cfg.max_size)?);
        let stats = Stats::default();
        // The bound may have been lowered since the last run.
        let ev = blobs.evict(&cfg.dir);
        stats.evicted_blobs.store(ev.blobs, Ordering::Relaxed);
        stats.evicted_bytes.store(ev.bytes, Ordering::Relaxed);
        Ok(RegistryCache {
            inner: Arc::new(Inner {
                dir: cfg.dir,
                upstreams: cfg.upstreams,
                tag_ttl: cfg.tag_ttl,
                upstream,
                stats,
                blobs,
                inflight: Mutex::new(HashMap::new()),
                manifest_locks: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(0),
            }),
        })
    }

    /// Routes: `GET /v2/`, `GET/HEAD /v2/<prefix>/<name...>/manifests/<tag|digest>`,
    /// `GET/HEAD /v2/<prefix>/<name...>/blobs/<digest>`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v2", get(base))
            .route("/v2/", get(base))
            .route("/v2/{*rest}", get(handle).head(handle))
            .with_state(self.clone())
    }

    /// Counters since [`RegistryCache::open`].
    pub fn stats(&self) -> RegistryStats {
        let s = &self.inner.stats;
        RegistryStats {
            manifest_hits: s.manifest_hits.load(Ordering::Relaxed),
            manifest_misses: s.manifest_misses.load(Ordering::Relaxed),
            blob_hits: s.blob_hits.load(Ordering::Relaxed),
            blob_misses: s.blob_misses.load(Ordering::Relaxed),
            coalesced: s.coalesced.load(Ordering::Relaxed),
            upstream_bytes: s.upstream_bytes.load(Ordering::Relaxed),
            evicted_blobs: s.evicted_blobs.load(Ordering::Relaxed),
            evicted_bytes: s.evicted_bytes.load(Ordering::Relaxed),
            blob_store_bytes: self.inner.blobs.total(),
        }
    }
}

async fn base() -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::HeaderName::from_static("docker-distribution-api-version"),
                "registry/2.0",
            ),
        ],
        "{}",
    )
        .into_response()
}

async fn handle(
    State(cache): State<RegistryCache>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match cache.inner.serve(&method, &uri, &headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Maps a non-success upstream status to an error: 404 → `not_found`, 401/403/429 → passed
/// on, anything else → 502.
pub(crate) fn status_error(
    up: &Upstream,
    status: u16,
    not_found: RegistryError,
    what: &str,
) -> RegistryError {
    match status {
        404 => not_found,
        401 | 403 | 429 => RegistryError::Denied {
            upstream: describe(up),
            status,
            message: format!("{what}: upstream answered {status}"),
        },
        _ => RegistryError::Upstream {
            upstream: describe(up),
            message: format!("{what}: upstream answered {status}"),
        },
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The media types of the client's Accept header(s); empty means anything.
fn accepted_types(headers: &HeaderMap) -> Vec<String> {
    let mut out = Vec::new();
    for v in headers.get_all(header::ACCEPT) {
        let Ok(s) = v.to_str() else { continue };
        for t in s.split(',') {
            let t = t.split(';').next().unwrap_or("").trim();
            if t == "*/*" {
                return Vec::new();
            }
            if !t.is_empty() {
                out.push(t.to_ascii_lowercase());
            }
        }
    }
    out
}

/// The Accept header to send upstream: the client's, joined, or every manifest type.
fn upstream_accept(headers: &HeaderMap) -> HeaderValue {
    let parts: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if parts.is_empty() {
        return HeaderValue::from_static(DEFAULT_ACCEPT);
    }
    HeaderValue::from_str(&parts.join(", ")).unwrap_or(HeaderValue::from_static(DEFAULT_ACCEPT))
}

fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> RegistryError {
    let path = path.to_owned();
    move |source| RegistryError::Io {
        action,
        path,
        source,
    }
}

/// Writes `data` to `path` through a temporary file and a rename.
async fn write_atomic(
    dir: &std::path::Path,
    path: &std::path::Path,
    data: &[u8],
    seq: u64,
) -> Result<(), RegistryError> {
    let tmp = dir
        .join("tmp")
        .join(format!("w.{}.{seq}", std::process::id()));
    tokio::fs::write(&tmp, data)
        .await
        .map_err(io_err("write", &tmp))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(io_err("rename into place", path))
}

impl Inner {
    fn upstream_for(&self, prefix: &str) -> Result<&Upstream, RegistryError> {
        self.upstreams
            .iter()
            .find(|u| u.prefix == prefix)
            .ok_or_else(|| {
                let known: Vec<&str> = self.upstreams.iter().map(|u| u.prefix.as_str()).collect();
                RegistryError::NameUnknown(format!(
                    "no upstream registry for prefix {prefix:?} (configured: {})",
                    known.join(", ")
                ))
            })
    }

    async fn serve(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Response, RegistryError> {
        let rest = uri
            .path()
            .strip_prefix("/v2/")
            .ok_or_else(|| RegistryError::Unsupported(uri.path().to_string()))?;
        let req = path::parse_request(rest)?;
        let up = self.upstream_for(&req.prefix)?.clone();
        // Docker Hub keeps official images under library/.
        let name = if req.prefix == "docker.io" && !req.name.contains('/') {
            format!("library/{}", req.name)
        } else {
            req.name.clone()
        };
        let client_auth = headers.get(header::AUTHORIZATION);
        match &req.target {
            Target::Manifest(reference) => {
                let m = self
                    .manifest(&up, &req, &name, reference, headers, client_auth)
                    .await?;
                let mut resp = Response::new(if *method == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(m.bytes.clone())
                });
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_str(&m.media_type)
                        .unwrap_or(HeaderValue::from_static("application/octet-stream")),
                );
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
                h.insert(DIGEST_HEADER, digest_header(&m.digest));
                Ok(resp)
            }
            Target::Blob(digest) => {
                self.blob(method, &up, &name, digest, client_auth.cloned())
                    .await
            }
        }
    }

    fn manifest_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .manifest_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key.to_owned()).or_default().clone()
    }

    async fn read_manifest(&self, digest: &Digest) -> Result<Option<Manifest>, RegistryError> {
        let p = digest.manifest_path(&self.dir);
        let bytes = match tokio::fs::read(&p).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &p)(e)),
        };
        let tp = p.with_extension("type");
        let media_type = tokio::fs::read_to_string(&tp)
            .await
            .map_err(io_err("read", &tp))?;
        Ok(Some(Manifest {
            bytes: Bytes::from(bytes),
            media_type: media_type.trim().to_owned(),
            digest: digest.clone(),
        }))
    }

    async fn store_manifest(&self, m: &Manifest) -> Result<(), RegistryError> {
        let p = m.digest.manifest_path(&self.dir);
        // The type first: a present manifest file implies its type is there.
        write_atomic(
            &self.dir,
            &p.with_extension("type"),
            m.media_type.as_bytes(),
            self.seq.fetch_add(1, Ordering::Relaxed),
        )
        .await?;
        write_atomic(
            &self.dir,
            &p,
            &m.bytes,
            self.seq.fetch_add(1, Ordering::Relaxed),
        )
        .await
    }

    async fn read_tag(&self, req: &RequestPath, tag: &str) -> Option<TagRecord> {
        let p = path::tag_path(&self.dir, &req.prefix, &req.name, tag);
        let data = tokio::fs::read(&p).await.ok()?;
        match serde_json::from_slice::<TagRecord>(&data) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    "registry cache: ignoring unreadable tag record {}: {e}",
                    p.display()
                );
                None
            }
        }
    }

    async fn write_tag(
        &self,
        req: &RequestPath,
        tag: &str,
        m: &Manifest,
    ) -> Result<(), RegistryError> {
        let rec = TagRecord {
            prefix: req.prefix.clone(),
            name: req.name.clone(),
            tag: tag.to_owned(),
            digest: m.digest.to_string(),
            media_type: m.media_type.clone(),
            checked_ms: now_ms(),
        };
        let data = serde_json::to_vec(&rec).map_err(|e| RegistryError::Io {
            action: "encode tag record",
            path: path::tag_path(&self.dir, &req.prefix, &req.name, tag),
            source: std::io::Error::other(e),
        })?;
        let p = path::tag_path(&self.dir, &req.prefix, &req.name, tag);
        write_atomic(
            &self.dir,
            &p,
            &data,
            self.seq.fetch_add(1, Ordering::Relaxed),
        )
        .await
    }

    /// The cached manifest a tag record points to, if the client accepts its type.
    async fn tag_manifest(&self, rec: &TagRecord, accepted: &[String]) -> Option<Manifest> {
        if !accepted.is_empty()
            && !accepted
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&rec.media_type))
        {
            return None;
        }
        let d = Digest::parse(&rec.digest).ok()?;
        self.read_manifest(&d).await.ok().flatten()
    }

    async fn manifest(
        &self,
        up: &Upstream,
        req: &RequestPath,
        name: &str,
        reference: &Reference,
        headers: &HeaderMap,
        client_auth: Option<&HeaderValue>,
    ) -> Result<Manifest, RegistryError> {
        let stats = &self.stats;
        match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.read_manifest(d).await? {
                    stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(m);
                }
                let lock = self.manifest_lock(&format!("d:{d}"));
                let _g = lock.lock().await;
                if let Some(m) = self.read_manifest(d).await? {
                    stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(m);
                }
                let m = self
                    .fetch_manifest(up, name, reference, headers, client_auth)
                    .await?;
                if &m.digest != d {
                    return Err(RegistryError::DigestMismatch {
                        upstream: describe(up),
                        message: format!(
                            "manifest {d} of {name}: received bytes have digest {}",
                            m.digest
                        ),
                    });
                }
                self.store_manifest(&m).await?;
                stats.manifest_misses.fetch_add(1, Ordering::Relaxed);
                Ok(m)
            }
            Reference::Tag(tag) => {
                let accepted = accepted_types(headers);
                let ttl_ms = self.tag_ttl.as_millis() as u64;
                let fresh = |r: &TagRecord| now_ms().saturating_sub(r.checked_ms) < ttl_ms;
                if let Some(rec) = self.read_tag(req, tag).await
                    && fresh(&rec)
                    && let Some(m) = self.tag_manifest(&rec, &accepted).await
                {
                    stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(m);
                }
                let lock = self.manifest_lock(&format!("t:{}/{}:{tag}", req.prefix, req.name));
                let _g = lock.lock().await;
                let stale = match self.read_tag(req, tag).await {
                    Some(rec) => self.tag_manifest(&rec, &accepted).await.map(|m| (rec, m)),
                    None => None,
                };
                if let Some((rec, m)) = stale {
                    if fresh(&rec) {
                        stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(m);
                    }
                    // Revalidate with a HEAD.
                    let accept = upstream_accept(headers);
                    let head = self
                        .upstream
                        .send(
                            up,
                            Method::HEAD,
                            name,
                            &format!("manifests/{tag}"),
                            Some(&accept),
                            client_auth,
                        )
                        .await;
                    let serve_stale = |why: String| {
                        tracing::warn!(
                            "registry cache: serving stale {}/{}:{tag} ({}): {why}",
                            req.prefix,
                            req.name,
                            m.digest
                        );
                    };
                    match head {
                        Err(e) => {
                            serve_stale(e.to_string());
                            stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                            return Ok(m);
                        }
                        Ok(resp) => {
                            let status = resp.status();
                            let same = resp
                                .headers()
                                .get(DIGEST_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|v| v == rec.digest);
                            if status.is_success() && same {
                                self.write_tag(req, tag, &m).await?;
                                stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                                return Ok(m);
                            }
                            if status.is_server_error() || status.as_u16() == 429 {
                                serve_stale(format!("upstream answered {status} to HEAD"));
                                stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                                return Ok(m);
                            }
                            if !status.is_success() {
                                return Err(status_error(
                                    up,
                                    status.as_u16(),
                                    RegistryError::ManifestUnknown(format!(
                                        "{}/{}:{tag}: upstream {} answered 404",
                                        req.prefix, req.name, up.url
                                    )),
                                    &format!("HEAD manifest {name}:{tag}"),
                                ));
                            }
                            // Changed (or no digest header): fetch it again.
                            match self
                                .fetch_manifest(up, name, reference, headers, client_auth)
                                .await
                            {
                                Ok(new) => {
                                    self.store_manifest(&new).await?;
                                    self.write_tag(req, tag, &new).await?;
                                    stats.manifest_misses.fetch_add(1, Ordering::Relaxed);
                                    return Ok(new);
                                }
                                Err(e @ RegistryError::Upstream { .. }) => {
                                    serve_stale(e.to_string());
                                    stats.manifest_hits.fetch_add(1, Ordering::Relaxed);
                                    return Ok(m);
                                }
                                Err(e) => return Err(e),
                            }
                        }
                    }
                }
                let m = self
                    .fetch_manifest(up, name, reference, headers, client_auth)
                    .await?;
                self.store_manifest(&m).await?;
                self.write_tag(req, tag, &m).await?;
                stats.manifest_misses.fetch_add(1, Ordering::Relaxed);
                Ok(m)
            }
        }
    }

    /// GETs a manifest upstream and checks the digest header against the bytes.
    async fn fetch_manifest(
        &self,
        up: &Upstream,
        name: &str,
        reference: &Reference,
        headers: &HeaderMap,
        client_auth: Option<&HeaderValue>,
    ) -> Result<Manifest, RegistryError> {
        let accept = upstream_accept(headers);
        let what = format!("GET manifest {name}:{reference}");
        let resp = self
            .upstream
            .send(
                up,
                Method::GET,
                name,
                &format!("manifests/{reference}"),
                Some(&accept),
                client_auth,
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(
                up,
                status.as_u16(),
                RegistryError::ManifestUnknown(format!(
                    "{name}:{reference} of {}: upstream {} answered 404",
                    up.prefix, up.url
                )),
                &what,
            ));
        }
        let header_digest = resp
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|s| !s.is_empty());
        let upstream_err = |message: String| RegistryError::Upstream {
            upstream: describe(up),
            message,
        };
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST as u64)
        {
            return Err(upstream_err(format!(
                "{what}: manifest larger than {MAX_MANIFEST} bytes"
            )));
        }
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        loop {
            let next = tokio::time::timeout(self.upstream.timeout(), body.next())
                .await
                .map_err(|_| upstream_err(format!("{what}: body stalled")))?;
            match next {
                None => break,
                Some(Ok(c)) => {
                    self.stats
                        .upstream_bytes
                        .fetch_add(c.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&c);
                    if buf.len() > MAX_MANIFEST {
                        return Err(upstream_err(format!(
                            "{what}: manifest larger than {MAX_MANIFEST} bytes"
                        )));
                    }
                }
                Some(Err(e)) => return Err(upstream_err(format!("{what}: {}", error_chain(&e)))),
            }
        }
        let digest = Digest::of(&buf);
        if let Some(h) = header_digest
            && h.starts_with("sha256:")
            && h != digest.to_string()
        {
            return Err(RegistryError::DigestMismatch {
                upstream: describe(up),
                message: format!("{what}: header says {h}, bytes have digest {digest}"),
            });
        }
        let media_type = match content_type {
            Some(t) if HeaderValue::from_str(&t).is_ok() && t != "application/octet-stream" => t,
            _ => serde_json::from_slice::<serde_json::Value>(&buf)
                .ok()
                .and_then(|v| {
                    v.get("mediaType")
                        .and_then(|m| m.as_str())
                        .map(str::to_owned)
                })
                .filter(|t| HeaderValue::from_str(t).is_ok())
                .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned()),
        };
        Ok(Manifest {
            bytes: Bytes::from(buf),
            media_type,
            digest,
        })
    }

    async fn blob(
        self: &Arc<Self>,
        method: &Method,
        up: &Upstream,
        name: &str,
        digest: &Digest,
        client_auth: Option<HeaderValue>,
    ) -> Result<Response, RegistryError> {
        enum Source {
            File(lru::Pin),
            Fetch(Arc<blob::Fetch>, lru::Pin),
            Absent,
        }
        let final_path = digest.blob_path(&self.dir);
        let get = *method == Method::GET;
        let source = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = map.get(digest.hex()) {
                if get {
                    self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                }
                Source::Fetch(f.clone(), self.blobs.pin(digest.hex()))
            } else if let Some(pin) = self.blobs.pin_present(digest.hex(), get) {
                if get {
                    self.stats.blob_hits.fetch_add(1, Ordering::Relaxed);
                }
                Source::File(pin)
            } else if *method == Method::HEAD {
                Source::Absent
            } else {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                let fetch = Arc::new(blob::Fetch::create(&self.dir, digest, seq)?);
                let pin = self.blobs.pin(digest.hex());
                map.insert(digest.hex().to_owned(), fetch.clone());
                self.stats.blob_misses.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(blob::run(
                    self.clone(),
                    up.clone(),
                    name.to_owned(),
                    digest.clone(),
                    fetch.clone(),
                    client_auth.clone(),
                ));
                Source::Fetch(fetch, pin)
            }
        };
        let (len, body) = match source {
            Source::File(pin) => {
                let (file, len) = match open_blob(&final_path, get).await {
                    Ok(f) => f,
                    Err(e) => {
                        if let RegistryError::Io { source, .. } = &e
                            && source.kind() == std::io::ErrorKind::NotFound
                        {
                            // Deleted behind the cache's back: the next request fetches it.
                            self.blobs.forget(digest.hex());
                        }
                        return Err(e);
                    }
                };
                let body = if get {
                    // The pin lives as long as the body: no eviction while it streams.
                    Body::from_stream(file_stream(file).map(move |c| {
                        let _in_use = &pin;
                        c
                    }))
                } else {
                    Body::empty()
                };
                (Some(len), body)
            }
            Source::Fetch(fetch, pin) => {
                let mut rx = fetch.subscribe();
                let st = rx
                    .wait_for(|s| !matches!(s.phase, blob::Phase::Connecting))
                    .await
                    .map_err(|_| RegistryError::Upstream {
                        upstream: describe(up),
                        message: format!("blob {digest}: download abandoned"),
                    })?
                    .clone();
                let len = match &st.phase {
                    blob::Phase::Failed(e) => return Err(e.relay()),
                    blob::Phase::Done => Some(st.written),
                    blob::Phase::Streaming { total } => *total,
                    blob::Phase::Connecting => None,
                };
                let body = if *method == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from_stream(blob::reader(fetch.file(), rx).map(move |c| {
                        let _in_use = &pin;
                        c
                    }))
                };
                (len, body)
            }
            Source::Absent => {
                let resp = self
                    .upstream
                    .send(
                        up,
                        Method::HEAD,
                        name,
                        &format!("blobs/{digest}"),
                        None,
                        client_auth.as_ref(),
                    )
                    .await?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(status_error(
                        up,
                        status.as_u16(),
                        RegistryError::BlobUnknown(format!(
                            "{digest} of {}/{name}: upstream {} answered 404",
                            up.prefix, up.url
                        )),
                        &format!("HEAD blob {digest} of {name}"),
                    ));
                }
                let len = resp
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                (len, Body::empty())
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(DIGEST_HEADER, digest_header(digest));
        if let Some(len) = len {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        Ok(resp)
    }
}

fn digest_header(d: &Digest) -> HeaderValue {
    // "sha256:" + 64 hex digits is always a valid header value.
    HeaderValue::from_str(&d.to_string()).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Opens a complete cached blob and returns it with its length; `touch` sets its mtime to
/// now, which records the use across restarts.
async fn open_blob(
    path: &std::path::Path,
    touch: bool,
) -> Result<(tokio::fs::File, u64), RegistryError> {
    let p = path.to_owned();
    let r = tokio::task::spawn_blocking(move || -> Result<_, RegistryError> {
        let file = std::fs::File::open(&p).map_err(io_err("open", &p))?;
        let len = file.metadata().map_err(io_err("stat", &p))?.len();
        if touch && let Err(e) = file.set_modified(SystemTime::now()) {
            tracing::warn!(
                "registry cache: cannot record the use of {} (mtime): {e}",
                p.display()
            );
        }
        Ok((tokio::fs::File::from_std(file), len))
    })
    .await;
    match r {
        Ok(r) => r,
        Err(e) => Err(RegistryError::Io {
            action: "open",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        }),
    }
}

/// Streams a complete cached file.
fn file_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = bytes::BytesMut::with_capacity(256 * 1024);
        match file.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), Some(file))),
            Err(e) => Some((Err(e), None)),
        }
    })
}
