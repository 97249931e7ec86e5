//! Test harness: a local origin server that counts requests and can serve slowly or fail,
//! the cache served on 127.0.0.1, and curl helpers.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as AxPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use farmgate_cache::{ArtifactCache, CacheConfig};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

/// Deterministic pseudo-random content of `size` bytes for `name`.
pub fn content(name: &str, size: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ name.bytes().fold(7u64, |a, b| a * 31 + b as u64);
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    Bytes::from(v)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Request counters and failure switches of the origin.
#[derive(Default)]
pub struct OriginState {
    /// GET requests per path.
    pub hits: Mutex<HashMap<String, u64>>,
    /// Conditional requests answered 304.
    pub not_modified: AtomicU64,
    /// When set, the next blob request is cut after this many bytes.
    pub fail_next_at: Mutex<Option<u64>>,
    /// Content served per path (created on first request).
    pub blobs: Mutex<HashMap<String, Bytes>>,
}

/// A running origin; dropped = stopped.
pub struct Origin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    /// GET requests the origin saw for `path` (without query).
    pub fn hits(&self, path: &str) -> u64 {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
    pub fn fail_next_at(&self, at: u64) {
        *self.state.fail_next_at.lock().unwrap() = Some(at);
    }
}

#[derive(serde::Deserialize, Default)]
pub struct BlobQuery {
    /// Size in bytes (default 1 MiB).
    size: Option<usize>,
    /// Bytes per second (default: unlimited).
    rate: Option<u64>,
    /// Send an ETag (default no).
    etag: Option<bool>,
}

async fn blob(
    State(st): State<Arc<OriginState>>,
    AxPath(name): AxPath<String>,
    Query(q): Query<BlobQuery>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/blob/{name}");
    *st.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let size = q.size.unwrap_or(1 << 20);
    let data = st
        .blobs
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_insert_with(|| content(&name, size))
        .clone();
    let etag = format!("\"{}\"", &sha256_hex(&data)[..16]);
    if q.etag == Some(true)
        && headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        st.not_modified.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let fail_at = st.fail_next_at.lock().unwrap().take();
    let rate = q.rate;
    let total = data.len();
    let stream = async_stream(data, rate, fail_at);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, total.into());
    h.insert(
        header::CONTENT_TYPE,
        "application/x-test-blob".parse().unwrap(),
    );
    if q.etag == Some(true) {
        h.insert(header::ETAG, etag.parse().unwrap());
    }
    resp
}

/// The body in 64 KiB chunks at `rate` bytes/s, cut (error) at `fail_at`.
fn async_stream(
    data: Bytes,
    rate: Option<u64>,
    fail_at: Option<u64>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    const CHUNK: usize = 64 * 1024;
    let start = tokio::time::Instant::now();
    futures_util::stream::unfold(0usize, move |pos| {
        let data = data.clone();
        async move {
            if pos >= data.len() {
                return None;
            }
            if let Some(f) = fail_at
                && pos as u64 >= f
            {
                return Some((
                    Err(std::io::Error::other("origin failing on demand")),
                    usize::MAX,
                ));
            }
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(pos as f64 / r as f64);
                tokio::time::sleep_until(due).await;
            }
            let mut end = (pos + CHUNK).min(data.len());
            if let Some(f) = fail_at {
                end = end.min((f as usize).max(pos + 1));
            }
            Some((Ok(data.slice(pos..end)), end))
        }
    })
}

pub async fn start_origin() -> Origin {
    let state = Arc::new(OriginState::default());
    let app = Router::new()
        .route("/blob/{name}", get(blob))
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "no such thing") }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Origin { addr, state, task }
}

/// A cache served on 127.0.0.1; dropped = stopped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub cache: ArtifactCache,
    task: JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gateway {
    /// `http://gw/cache/<url>`
    pub fn cache_url(&self, upstream: &str) -> String {
        format!("http://{}/cache/{upstream}", self.addr)
    }
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub fn config(dir: &Path) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        ttl: Duration::from_secs(3600),
        allow_hosts: None,
        upstream_timeout: Duration::from_secs(10),
        extra_ca_pem: Vec::new(),
    }
}

pub async fn start_gateway(cfg: CacheConfig) -> Gateway {
    let cache = ArtifactCache::open(cfg).expect("opening the cache");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = cache.router();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Gateway { addr, cache, task }
}

/// What a curl run gave.
#[derive(Debug)]
pub struct CurlOut {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs curl (no proxy, 60 s cap) with `args`.
pub async fn curl(args: &[&str]) -> CurlOut {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "60"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl did not finish in 90 s")
    .expect("cannot run curl");
    CurlOut {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// GET with curl: (HTTP status, body, X-Cache header).
pub async fn curl_get(url: &str, extra: &[&str]) -> (u16, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("h");
    let hdr_s = hdr.to_str().unwrap();
    let mut args = vec!["-D", hdr_s, "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = curl(&args).await;
    assert_eq!(out.code, 0, "curl {url} failed: {}", out.stderr);
    let mut body = out.stdout;
    let pos = body.iter().rposition(|&b| b == b'\n').unwrap();
    let status: u16 = String::from_utf8_lossy(&body[pos + 1..]).parse().unwrap();
    body.truncate(pos);
    let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
    (status, body, header_of(&headers, "x-cache"))
}

/// Value of header `name` in a curl `-D` dump (last response).
pub fn header_of(dump: &str, name: &str) -> String {
    dump.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .next_back()
        .unwrap_or_default()
}

/// Waits (at most 5 s) until `index.json` in `dir` lists `n` entries and contains `needle`.
pub async fn wait_index(dir: &Path, n: usize, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(dir.join("index.json")).unwrap_or_default();
        let count = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["entries"].as_array().map(|a| a.len()));
        if count == Some(n) && text.contains(needle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "index.json never listed {n} entries with {needle:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
