//! Test and benchmark fixtures: a real `docker-registry` upstream, a counting (optionally
//! throttled) TCP proxy, OCI image layouts built in Rust, `skopeo` runs, and the cache
//! served on a loopback port.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farmgate_registry::{RegistryCache, RegistryConfig, Upstream};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SKOPEO: &str = "/usr/bin/skopeo";
use farmgate_testkit::registry::DOCKER_REGISTRY;

/// Fails with the Debian package names when the real clients are missing.
pub fn need_tools() {
    for (bin, pkg) in [(SKOPEO, "skopeo"), (DOCKER_REGISTRY, "docker-registry")] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: install the Debian packages skopeo and docker-registry \
             (apt-get install skopeo docker-registry; {pkg} provides {bin})"
        );
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[allow(unused_imports)] // not every test binary starts a registry
pub use farmgate_testkit::registry::DockerRegistry;

/// A TCP proxy on a loopback port counting the bytes sent from the target to clients,
/// optionally throttled to `rate` bytes per second per connection.
pub struct CountingProxy {
    pub port: u16,
    pub down_bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl CountingProxy {
    pub async fn start(target: u16, rate: Option<u64>) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let down_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (db, cn, ts) = (down_bytes.clone(), connections.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                cn.fetch_add(1, Ordering::Relaxed);
                let db = db.clone();
                let h = tokio::spawn(async move {
                    let Ok(server) =
                        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], target))).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            db.fetch_add(n as u64, Ordering::Relaxed);
                            if let Some(rate) = rate {
                                tokio::time::sleep(Duration::from_micros(
                                    n as u64 * 1_000_000 / rate,
                                ))
                                .await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
                ts.lock().expect("proxy task list").push(h.abort_handle());
            }
        });
        tasks
            .lock()
            .expect("proxy task list")
            .push(accept.abort_handle());
        CountingProxy {
            port,
            down_bytes,
            connections,
            tasks,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.down_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().map(|v| v.clone()).unwrap_or_default() {
            t.abort();
        }
    }
}

/// The cache served on a loopback port; the server task is aborted on drop.
pub struct CacheServer {
    pub cache: RegistryCache,
    pub port: u16,
    /// Holds `cache/`; shared with a restarted server on the same directory.
    pub dir: Arc<tempfile::TempDir>,
    task: tokio::task::JoinHandle<()>,
}

/// The configuration [`CacheServer::start`] uses, in `dir/cache`.
pub fn cache_config(
    dir: &Path,
    upstreams: Vec<(&str, String)>,
    tag_ttl: Duration,
) -> RegistryConfig {
    RegistryConfig {
        dir: dir.join("cache"),
        upstreams: upstreams
            .into_iter()
            .map(|(prefix, url)| Upstream {
                prefix: prefix.to_owned(),
                url,
            })
            .collect(),
        tag_ttl,
        upstream_timeout: Duration::from_secs(10),
        max_size: None,
        extra_ca_pem: Vec::new(),
    }
}

impl CacheServer {
    pub async fn start(upstreams: Vec<(&str, String)>, tag_ttl: Duration) -> CacheServer {
        Self::start_with(upstreams, tag_ttl, None, |_| {}).await
    }

    /// Like [`CacheServer::start`], in `dir` (a fresh one when `None`: pass an old server's
    /// `dir` to restart on its cache), with `tweak` applied to the configuration.
    pub async fn start_with(
        upstreams: Vec<(&str, String)>,
        tag_ttl: Duration,
        dir: Option<Arc<tempfile::TempDir>>,
        tweak: impl FnOnce(&mut RegistryConfig),
    ) -> CacheServer {
        let dir = dir.unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("temp dir")));
        let mut cfg = cache_config(dir.path(), upstreams, tag_ttl);
        tweak(&mut cfg);
        let cache = RegistryCache::open(cfg).expect("opening the registry cache");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cache bind");
        let port = listener.local_addr().expect("cache addr").port();
        let router = cache.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        CacheServer {
            cache,
            port,
            dir,
            task,
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OCI image with one gzip tar layer holding `data.bin`.
pub struct Image {
    pub layer: Vec<u8>,
    pub layer_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

/// Deterministic pseudo-random bytes (xorshift), incompressible for gzip.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // Spread the seed first: `seed | 1` alone gives seeds 2n and 2n+1 the same bytes.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A ustar archive with one regular file.
fn tar_one(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let mut field = |off: usize, len: usize, v: &str| {
        h[off..off + v.len()].copy_from_slice(v.as_bytes());
        let _ = len;
    };
    field(100, 8, "0000644\0");
    field(108, 8, "0000000\0");
    field(116, 8, "0000000\0");
    field(124, 12, &format!("{:011o}\0", data.len()));
    field(136, 12, "00000000000\0");
    field(156, 1, "0");
    field(257, 6, "ustar\0");
    field(263, 2, "00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(data.len() + 2048);
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

impl Image {
    /// An image whose layer holds `size` pseudo-random bytes.
    pub fn build(size: usize, seed: u64) -> Image {
        let tar = tar_one("data.bin", &random_bytes(size, seed));
        let diff_id = sha256_hex(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip in memory");
        let layer = gz.finish().expect("gzip in memory");
        let layer_digest = format!("sha256:{}", sha256_hex(&layer));
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        }))
        .expect("config json");
        let config_digest = format!("sha256:{}", sha256_hex(&config));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
        }))
        .expect("manifest json");
        let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
        Image {
            layer,
            layer_digest,
            config,
            config_digest,
            manifest,
            manifest_digest,
        }
    }

    pub fn total_len(&self) -> u64 {
        (self.layer.len() + self.config.len() + self.manifest.len()) as u64
    }

    /// Writes an OCI image layout with the image tagged `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("layout dirs");
        for (d, b) in [
            (&self.layer_digest, &self.layer),
            (&self.config_digest, &self.config),
            (&self.manifest_digest, &self.manifest),
        ] {
            std::fs::write(blobs.join(&d[7..]), b).expect("layout blob");
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.manifest_digest,
                "size": self.manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    }

    /// Pushes the image to `registry_port` as `repo:tag` with skopeo.
    pub async fn push(&self, registry_port: u16, repo: &str, tag: &str) {
        let dir = tempfile::tempdir().expect("temp dir");
        self.write_layout(dir.path(), tag);
        let out = skopeo(
            &[
                "copy",
                "--dest-tls-verify=false",
                &format!("oci:{}:{tag}", dir.path().display()),
                &format!("docker://127.0.0.1:{registry_port}/{repo}:{tag}"),
            ],
            Duration::from_secs(120),
        )
        .await;
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `skopeo --insecure-policy <args>`, killed after `limit`.
pub async fn skopeo(args: &[&str], limit: Duration) -> std::process::Output {
    need_tools();
    let child = tokio::process::Command::new(SKOPEO)
        .arg("--insecure-policy")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting skopeo");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.expect("waiting for skopeo"),
        Err(_) => panic!("skopeo {args:?} did not finish within {limit:?}"),
    }
}

/// Pulls `docker://127.0.0.1:<port>/<reference>` into an OCI layout at `out` (tag `v1`).
pub async fn pull(port: u16, reference: &str, out: &Path) -> std::process::Output {
    skopeo(
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://127.0.0.1:{port}/{reference}"),
            &format!("oci:{}:v1", out.display()),
        ],
        Duration::from_secs(300),
    )
    .await
}

/// The bytes of blob `digest` in the OCI layout at `dir`.
pub fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let p = dir.join("blobs/sha256").join(&digest[7..]);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}
