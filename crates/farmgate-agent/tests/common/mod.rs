//! Fixtures for the OCI pull tests: a real `docker-registry` on loopback, images built in
//! Rust (raw tar archives, gzip, OCI/Docker manifests) pushed with the distribution API,
//! farmgate's registry cache, and a tiny axum registry for what a real one never serves
//! (corrupt blobs, junk manifests).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use farmgate_testkit::registry::{DockerRegistry, sha256_digest};

/// Pushes `image`'s blobs and manifest as `repo:tag` into `reg`; returns the manifest
/// digest.
pub async fn push_image(reg: &DockerRegistry, repo: &str, tag: &str, image: &Image) -> String {
    reg.push_blob(repo, &image.config).await;
    for l in &image.layers {
        reg.push_blob(repo, &l.blob).await;
    }
    reg.push_manifest(repo, tag, image.manifest_type(), &image.manifest)
        .await
}

/// One tar entry, written as a raw ustar header (so hostile names can be made).
#[derive(Clone)]
pub struct Entry {
    pub name: String,
    pub kind: u8,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub link: String,
    pub data: Vec<u8>,
    /// Device major and minor numbers (character and block devices).
    pub dev: (u32, u32),
}

pub fn file(name: &str, mode: u32, data: &[u8]) -> Entry {
    Entry {
        name: name.into(),
        kind: b'0',
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        link: String::new(),
        data: data.to_vec(),
        dev: (0, 0),
    }
}

pub fn dir(name: &str, mode: u32) -> Entry {
    Entry {
        kind: b'5',
        ..file(name, mode, b"")
    }
}

pub fn symlink(name: &str, target: &str) -> Entry {
    Entry {
        kind: b'2',
        link: target.into(),
        ..file(name, 0o777, b"")
    }
}

pub fn hardlink(name: &str, target: &str) -> Entry {
    Entry {
        kind: b'1',
        link: target.into(),
        ..file(name, 0o644, b"")
    }
}

/// A ustar archive of `entries` (names and link targets up to 100 bytes).
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        assert!(e.name.len() <= 100 && e.link.len() <= 100, "name too long");
        let mut h = [0u8; 512];
        let mut put = |off: usize, v: &[u8]| h[off..off + v.len()].copy_from_slice(v);
        put(0, e.name.as_bytes());
        put(100, format!("{:07o}\0", e.mode).as_bytes());
        put(108, format!("{:07o}\0", e.uid).as_bytes());
        put(116, format!("{:07o}\0", e.gid).as_bytes());
        put(124, format!("{:011o}\0", e.data.len()).as_bytes());
        put(136, format!("{:011o}\0", e.mtime).as_bytes());
        put(156, &[e.kind]);
        put(157, e.link.as_bytes());
        put(257, b"ustar\0");
        put(263, b"00");
        put(329, format!("{:07o}\0", e.dev.0).as_bytes());
        put(337, format!("{:07o}\0", e.dev.1).as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b).expect("gzip in memory");
    gz.finish().expect("gzip in memory")
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_TAR_GZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub struct Layer {
    pub media_type: String,
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
}

/// A layer of `entries`, gzip-compressed or not.
pub fn layer(entries: &[Entry], media_type: &str) -> Layer {
    let t = tar(entries);
    let diff_id = sha256_digest(&t);
    let blob = if media_type.contains("gz") {
        gzip(&t)
    } else {
        t
    };
    Layer {
        media_type: media_type.into(),
        digest: sha256_digest(&blob),
        blob,
        diff_id,
    }
}

pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub docker: bool,
}

impl Image {
    /// An image of `layers` with `run` as the config's `config` object, for `arch`;
    /// Docker media types when `docker`.
    pub fn new(layers: Vec<Layer>, run: serde_json::Value, arch: &str, docker: bool) -> Image {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": run,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        }))
        .expect("config json");
        let config_digest = sha256_digest(&config);
        let (mt, cmt) = if docker {
            (
                DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
            )
        } else {
            (OCI_MANIFEST, "application/vnd.oci.image.config.v1+json")
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": cmt, "digest": config_digest, "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.blob.len()
            })).collect::<Vec<_>>(),
        }))
        .expect("manifest json");
        let manifest_digest = sha256_digest(&manifest);
        Image {
            layers,
            config,
            config_digest,
            manifest,
            manifest_digest,
            docker,
        }
    }

    pub fn manifest_type(&self) -> &'static str {
        if self.docker {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        }
    }

    /// Serves this image as `repo:tag` from `reg`.
    pub fn serve(&self, reg: &FakeRegistry, repo: &str, tag: &str) {
        reg.put(
            &format!("/v2/{repo}/manifests/{tag}"),
            self.manifest_type(),
            self.manifest.clone(),
        );
        reg.put(
            &format!("/v2/{repo}/blobs/{}", self.config_digest),
            "application/octet-stream",
            self.config.clone(),
        );
        for l in &self.layers {
            reg.put(
                &format!("/v2/{repo}/blobs/{}", l.digest),
                "application/octet-stream",
                l.blob.clone(),
            );
        }
    }
}

/// farmgate's registry cache on a loopback port, `prefix` → `upstream_url`; the server
/// task is aborted on drop.
pub struct CacheServer {
    pub cache: farmgate_registry::RegistryCache,
    pub port: u16,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl CacheServer {
    pub async fn start(prefix: &str, upstream_url: String) -> CacheServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = farmgate_registry::RegistryCache::open(farmgate_registry::RegistryConfig {
            dir: dir.path().join("cache"),
            upstreams: vec![farmgate_registry::Upstream {
                prefix: prefix.to_owned(),
                url: upstream_url,
            }],
            tag_ttl: Duration::from_secs(300),
            upstream_timeout: Duration::from_secs(10),
            max_size: None,
            extra_ca_pem: Vec::new(),
        })
        .expect("opening the registry cache");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cache bind");
        let port = listener.local_addr().expect("cache addr").port();
        let router = cache.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        CacheServer {
            cache,
            port,
            _dir: dir,
            task,
        }
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal registry serving fixed bodies by path, behind anonymous bearer-token auth
/// (`/token` hands out the token), counting requests.
pub struct FakeRegistry {
    pub port: u16,
    files: Files,
    pub token_requests: Arc<AtomicU64>,
    pub unauthorized: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Path → (content type, body).
type Files = Arc<Mutex<HashMap<String, (String, Vec<u8>)>>>;

const TOKEN: &str = "farmgate-test-token";

impl FakeRegistry {
    pub async fn start() -> FakeRegistry {
        use axum::http::{HeaderMap, StatusCode, Uri, header};
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake registry bind");
        let port = listener.local_addr().expect("addr").port();
        let files: Files = Arc::default();
        let token_requests = Arc::new(AtomicU64::new(0));
        let unauthorized = Arc::new(AtomicU64::new(0));
        let (f, tr, un) = (files.clone(), token_requests.clone(), unauthorized.clone());
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let (f, tr, un) = (f.clone(), tr.clone(), un.clone());
            async move {
                if uri.path() == "/token" {
                    tr.fetch_add(1, Ordering::Relaxed);
                    let q = uri.query().unwrap_or("");
                    if !q.contains("service=fake") || !q.contains("scope=repository") {
                        return (StatusCode::BAD_REQUEST, "bad token request").into_response();
                    }
                    return axum::Json(serde_json::json!({"token": TOKEN})).into_response();
                }
                let authed = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    == Some(&format!("Bearer {TOKEN}"));
                if !authed {
                    un.fetch_add(1, Ordering::Relaxed);
                    let challenge = format!(
                        "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:x:pull\""
                    );
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, challenge)],
                        "unauthorized",
                    )
                        .into_response();
                }
                let found = f.lock().expect("files").get(uri.path()).cloned();
                match found {
                    Some((ct, body)) => ([(header::CONTENT_TYPE, ct)], body).into_response(),
                    None => (StatusCode::NOT_FOUND, "not found").into_response(),
                }
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeRegistry {
            port,
            files,
            token_requests,
            unauthorized,
            task,
        }
    }

    pub fn put(&self, path: &str, content_type: &str, body: Vec<u8>) {
        self.files
            .lock()
            .expect("files")
            .insert(path.to_owned(), (content_type.to_owned(), body));
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every path under `dir` (relative), sorted, to compare trees.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            out.push(
                p.strip_prefix(base)
                    .map(|r| r.display().to_string())
                    .unwrap_or_default(),
            );
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Whether the tests run as root (crun containers need it; CI runs as root).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// A script in `dir` running Debian's crun: crun 1.8 refuses hosts whose cgroup v2
/// hierarchy (hybrid mode) has controllers, so there it runs in a private mount
/// namespace with that hierarchy unmounted (a DUT mounts only cgroup2).
pub fn crun_wrapper(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let crun = dir.join("crun-wrapper");
    // Each test its own crun state directory: tests run at the same time and their
    // containers have the same names (as on a DUT, where one agent runs).
    let root = dir.join("crun-root");
    std::fs::write(
        &crun,
        format!(
            "#!/bin/sh\n\
             if grep -q ' /sys/fs/cgroup/unified cgroup2 ' /proc/self/mounts && \
             [ -n \"$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)\" ]; then\n\
             exec unshare -m sh -c 'umount -l /sys/fs/cgroup/unified && exec /usr/bin/crun --root {root} \"$@\"' crun \"$@\"\n\
             fi\n\
             exec /usr/bin/crun --root {root} \"$@\"\n",
            root = root.display()
        ),
    )
    .expect("writing the crun wrapper");
    std::fs::set_permissions(&crun, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the crun wrapper");
    crun
}
