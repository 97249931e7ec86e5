//! Cold artifact, many clients at once: farmgate's cache against nginx `proxy_cache` with
//! `proxy_cache_lock on`, both in front of the same local origin.
//!
//! `cargo bench -p farmgate-cache --bench cold` (needs `nginx`, e.g. Debian's
//! `nginx-light`; without it only farmgate runs). The origin serves a
//! `FG_CACHE_BENCH_MIB` (default 256) MiB artifact at `FG_CACHE_BENCH_RATE` (default 200)
//! MiB/s and counts its requests. Each round, `FG_CACHE_BENCH_CLIENTS` (default 50)
//! reqwest clients ask the cache for the same cold artifact at once; for each system
//! `FG_CACHE_BENCH_ROUNDS` (default 3) rounds run, each with an empty cache. Prints a
//! markdown table: origin requests, time to the first body byte (p50 and slowest) and
//! the wall time until every client has the whole artifact. Before the first round, one
//! uncounted warm-up round of the same clients on a 1 MiB artifact runs through each
//! system (first use of the process, the runtimes and the connection pools).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use farmgate_cache::{ArtifactCache, CacheConfig};
use futures_util::StreamExt;

const MIB: usize = 1 << 20;
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct OriginState {
    data: Bytes,
    rate: u64,
    hits: AtomicU64,
}

async fn artifact(State(st): State<Arc<OriginState>>) -> Response {
    st.hits.fetch_add(1, Ordering::Relaxed);
    send_rated(st.data.clone(), st.rate)
}

/// The first MiB: for the warm-up round.
async fn small(State(st): State<Arc<OriginState>>) -> Response {
    send_rated(st.data.slice(..MIB.min(st.data.len())), st.rate)
}

fn send_rated(data: Bytes, rate: u64) -> Response {
    const CHUNK: usize = 256 * 1024;
    let start = tokio::time::Instant::now();
    let total = data.len();
    let body = futures_util::stream::unfold(0usize, move |pos| {
        let data = data.clone();
        async move {
            if pos >= data.len() {
                return None;
            }
            let due = start + Duration::from_secs_f64(pos as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
            let end = (pos + CHUNK).min(data.len());
            Some((Ok::<_, std::io::Error>(data.slice(pos..end)), end))
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, total.into());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// nginx in the foreground with its own config and directories; dropped = stopped.
struct Nginx {
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> Option<String> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

fn start_nginx(bin: &str, dir: &Path, origin: SocketAddr) -> Result<(Nginx, u16), String> {
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=fgbench:10m max_size=4g inactive=60m use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{origin};
            proxy_http_version 1.1;
            proxy_cache fgbench;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            proxy_buffering on;
        }}
    }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| format!("writing nginx.conf: {e}"))?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    let mut ng = Nginx { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((ng, port));
        }
        if let Ok(Some(st)) = ng.child.try_wait() {
            return Err(format!("nginx exited: {st}"));
        }
        if Instant::now() > deadline {
            return Err("nginx did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct RoundResult {
    origin_hits: u64,
    ttfb_p50: Duration,
    ttfb_max: Duration,
    wall: Duration,
    complete: usize,
}

/// `clients` concurrent downloads of `url` (on the client runtime); each checks the length.
async fn round(
    url: String,
    clients: usize,
    size: usize,
) -> Result<(Vec<Duration>, Duration, usize), String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let resp = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let headers_at = start.elapsed();
            if !resp.status().is_success() {
                return Err(format!("GET {url}: {}", resp.status()));
            }
            let mut body = resp.bytes_stream();
            let mut ttfb = None;
            let mut n = 0usize;
            while let Some(c) = body.next().await {
                let c = c.map_err(|e| format!("GET {url}: {e}"))?;
                if ttfb.is_none() && !c.is_empty() {
                    ttfb = Some(start.elapsed());
                }
                n += c.len();
            }
            Ok::<_, String>((
                ttfb.unwrap_or_else(|| start.elapsed()),
                headers_at,
                n == size,
            ))
        }));
    }
    let mut ttfbs = Vec::new();
    let mut headers_max = Duration::ZERO;
    let mut complete = 0;
    for t in tasks {
        let (ttfb, headers_at, ok) = t.await.map_err(|e| e.to_string())??;
        ttfbs.push(ttfb);
        headers_max = headers_max.max(headers_at);
        complete += usize::from(ok);
    }
    eprintln!("  slowest response headers: {headers_max:?}");
    Ok((ttfbs, t0.elapsed(), complete))
}

fn summarize(mut ttfbs: Vec<Duration>, wall: Duration, complete: usize, hits: u64) -> RoundResult {
    ttfbs.sort();
    RoundResult {
        origin_hits: hits,
        ttfb_p50: ttfbs[ttfbs.len() / 2],
        ttfb_max: ttfbs[ttfbs.len() - 1],
        wall,
        complete,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<(), String> {
    let size = env_num("FG_CACHE_BENCH_MIB", 256) * MIB;
    let rate = env_num("FG_CACHE_BENCH_RATE", 200) * MIB;
    let clients = env_num("FG_CACHE_BENCH_CLIENTS", 50);
    let rounds = env_num("FG_CACHE_BENCH_ROUNDS", 3);
    // Servers (origin and farmgate) and clients get separate runtimes, as separate
    // processes would.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let data: Bytes = (0..size)
        .map(|i| (i * 7 + i / 4093) as u8)
        .collect::<Vec<u8>>()
        .into();
    let origin_state = Arc::new(OriginState {
        data,
        rate: rate as u64,
        hits: AtomicU64::new(0),
    });
    let origin_addr = servers.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let app = Router::new()
            .route("/art/{name}", get(artifact))
            .route("/small/{name}", get(small))
            .with_state(origin_state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Ok::<_, String>(addr)
    })?;
    eprintln!(
        "origin {origin_addr}: {} MiB at {} MiB/s; {clients} clients, {rounds} rounds",
        size / MIB,
        rate / MIB
    );
    let nginx = nginx_binary();
    let mut rows = Vec::new();
    for r in 0..rounds {
        // farmgate, fresh cache.
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cache = ArtifactCache::open(CacheConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 4 << 30,
            ttl: Duration::from_secs(3600),
            allow_hosts: None,
            upstream_timeout: Duration::from_secs(30),
            extra_ca_pem: Vec::new(),
        })
        .map_err(|e| e.to_string())?;
        let gw = servers.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            let app = cache.router();
            let task = tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            });
            Ok::<_, String>((addr, task))
        })?;
        if r == 0 {
            // Warm-up, not counted: the process's and the client runtime's first use.
            let url = format!("http://{}/cache/http://{origin_addr}/small/fg", gw.0);
            clients_rt.block_on(round(url, clients, MIB.min(size)))?;
        }
        let before = origin_state.hits.load(Ordering::Relaxed);
        let url = format!("http://{}/cache/http://{origin_addr}/art/fg-{r}", gw.0);
        let (ttfbs, wall, complete) = clients_rt.block_on(async {
            tokio::time::timeout(ROUND_TIMEOUT, round(url, clients, size))
                .await
                .map_err(|_| "farmgate round timed out".to_string())?
        })?;
        let hits = origin_state.hits.load(Ordering::Relaxed) - before;
        gw.1.abort();
        rows.push(("farmgate", r + 1, summarize(ttfbs, wall, complete, hits)));
        eprintln!("farmgate round {} done; stats {:?}", r + 1, cache.stats());
        drop(cache);

        // nginx, fresh cache.
        if let Some(bin) = &nginx {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let (ng, port) = start_nginx(bin, dir.path(), origin_addr)?;
            if r == 0 {
                let url = format!("http://127.0.0.1:{port}/small/ng");
                clients_rt.block_on(round(url, clients, MIB.min(size)))?;
            }
            let before = origin_state.hits.load(Ordering::Relaxed);
            let url = format!("http://127.0.0.1:{port}/art/ng-{r}");
            let res = clients_rt.block_on(async {
                tokio::time::timeout(ROUND_TIMEOUT, round(url, clients, size))
                    .await
                    .map_err(|_| "nginx round timed out".to_string())?
            });
            drop(ng);
            let (ttfbs, wall, complete) = res?;
            let hits = origin_state.hits.load(Ordering::Relaxed) - before;
            rows.push(("nginx", r + 1, summarize(ttfbs, wall, complete, hits)));
            eprintln!("nginx round {} done", r + 1);
        }
    }
    if nginx.is_none() {
        eprintln!("nginx not found (apt-get install nginx-light): farmgate only");
    }
    println!(
        "\n{} MiB artifact at {} MiB/s from the origin, {clients} concurrent cold clients\n",
        size / MIB,
        rate / MIB
    );
    println!(
        "| system | round | origin hits | TTFB p50 (ms) | TTFB max (ms) | wall, all complete (ms) | complete bodies |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (sys, r, res) in &rows {
        println!(
            "| {sys} | {r} | {} | {} | {} | {} | {}/{clients} |",
            res.origin_hits,
            ms(res.ttfb_p50),
            ms(res.ttfb_max),
            ms(res.wall),
            res.complete
        );
    }
    Ok(())
}
