//! A real OCI registry for tests and benchmarks: Debian's `docker-registry` serving
//! from a temporary directory on a loopback port (plain, TLS, or as a pull-through
//! proxy), with the distribution API's pushes. Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// The registry program (Debian package `docker-registry`).
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Waits (bounded: 20 s) until `GET http://127.0.0.1:<port>/v2/` answers.
pub async fn wait_http(port: u16, what: &str) {
    wait_v2(&reqwest::Client::new(), "http", port, what).await;
}

/// Waits (bounded: 20 s) until `GET https://127.0.0.1:<port>/v2/` answers, trusting
/// `ca_pem`.
pub async fn wait_https(port: u16, ca_pem: &[u8], what: &str) {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("test CA is PEM");
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .expect("https client");
    wait_v2(&client, "https", port, what).await;
}

async fn wait_v2(client: &reqwest::Client, scheme: &str, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client
            .get(format!("{scheme}://127.0.0.1:{port}/v2/"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && (r.status().is_success() || r.status().as_u16() == 401)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} on port {port} did not come up within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `docker-registry serve` process with filesystem storage in a temp dir.
pub struct DockerRegistry {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// Its log (access log included).
    pub log: PathBuf,
    dir: tempfile::TempDir,
}

impl DockerRegistry {
    /// A plain registry.
    pub async fn start() -> DockerRegistry {
        Self::start_inner(None, None).await
    }

    /// A pull-through proxy of `remote` (a URL).
    pub async fn start_proxy(remote: &str) -> DockerRegistry {
        Self::start_inner(Some(remote), None).await
    }

    /// A plain registry serving HTTPS with `cert`/`key` (PEM files); `ca_pem` is the CA
    /// that signed `cert`, used to wait for it.
    pub async fn start_tls(cert: &Path, key: &Path, ca_pem: &[u8]) -> DockerRegistry {
        Self::start_inner(None, Some((cert, key, ca_pem))).await
    }

    async fn start_inner(
        proxy_of: Option<&str>,
        tls: Option<(&Path, &Path, &[u8])>,
    ) -> DockerRegistry {
        assert!(
            Path::new(DOCKER_REGISTRY).exists(),
            "{DOCKER_REGISTRY} is missing: apt-get install docker-registry (scripts/setup.sh does)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = crate::ports::free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        if let Some((cert, key, _)) = tls {
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some(remote) = proxy_of {
            cfg.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).expect("writing registry config");
        let log = dir.path().join("registry.log");
        let logf = std::fs::File::create(&log).expect("creating registry log");
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log clone"))
            .stderr(logf)
            .spawn()
            .expect("starting docker-registry");
        let reg = DockerRegistry {
            child,
            port,
            log,
            dir,
        };
        match tls {
            None => wait_http(port, "docker-registry").await,
            Some((_, _, ca)) => wait_https(port, ca, "docker-registry (TLS)").await,
        }
        reg
    }

    /// A directory of the registry's own, free for the test's files (removed with it).
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Access-log lines containing `needle` (e.g. `"GET /v2/test/app/blobs/sha256:...`).
    pub fn count_log(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Pushes a blob (monolithic upload); returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let c = reqwest::Client::new();
        let r = c
            .post(format!(
                "http://127.0.0.1:{}/v2/{repo}/blobs/uploads/",
                self.port
            ))
            .send()
            .await
            .expect("starting an upload");
        assert_eq!(r.status().as_u16(), 202, "upload start: {r:?}");
        let loc = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload location")
            .to_owned();
        let loc = if loc.starts_with('/') {
            format!("http://127.0.0.1:{}{loc}", self.port)
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("uploading a blob");
        assert_eq!(
            r.status().as_u16(),
            201,
            "blob upload: {:?}",
            r.text().await
        );
        digest
    }

    /// Pushes a manifest under `reference`; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let r = reqwest::Client::new()
            .put(format!(
                "http://127.0.0.1:{}/v2/{repo}/manifests/{reference}",
                self.port
            ))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("pushing a manifest");
        assert_eq!(
            r.status().as_u16(),
            201,
            "manifest push: {:?}",
            r.text().await
        );
        sha256_digest(bytes)
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
