//! podman pulls through the cache from a real docker-registry upstream. podman is isolated
//! in a temp dir: its own root, runroot, tmp dir, vfs storage, containers.conf,
//! registries.conf, storage.conf, policy and auth file; nothing of the host's podman state
//! is read or written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{CacheServer, DockerRegistry, Image};

const PODMAN: &str = "/usr/bin/podman";
const PREFIX: &str = "up.test";

/// A podman confined to a temp dir.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        assert!(
            Path::new(PODMAN).exists(),
            "{PODMAN} is missing: install the Debian package podman"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        for sub in ["root", "run", "tmp", "home", "xdg"] {
            std::fs::create_dir_all(p.join(sub)).expect("podman dirs");
        }
        std::fs::write(
            p.join("containers.conf"),
            format!(
                "[containers]\n\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"none\"\ntmp_dir = \"{}\"\n",
                p.join("tmp").display()
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            p.join("registries.conf"),
            "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n",
        )
        .expect("registries.conf");
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                p.join("run").display(),
                p.join("root").display()
            ),
        )
        .expect("storage.conf");
        std::fs::write(
            p.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("policy.json");
        std::fs::write(p.join("auth.json"), "{}").expect("auth.json");
        Podman { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Runs `podman <global isolation flags> <args>`, killed after 180 s.
    async fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(PODMAN);
        cmd.arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("run"))
            .arg("--tmpdir")
            .arg(self.path("tmp"))
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("xdg"))
            .env("XDG_CONFIG_HOME", self.path("home"))
            .env("TMPDIR", self.path("tmp"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("starting podman");
        match tokio::time::timeout(Duration::from_secs(180), child.wait_with_output()).await {
            Ok(out) => out.expect("waiting for podman"),
            Err(_) => panic!("podman {args:?} did not finish within 180 s"),
        }
    }

    /// Pulls `reference` from the loopback (plain HTTP) registry.
    async fn pull(&self, reference: &str) {
        let policy = self.path("policy.json");
        let o = self
            .run(&[
                "pull",
                "--tls-verify=false",
                "--signature-policy",
                policy.to_str().expect("utf-8 temp path"),
                reference,
            ])
            .await;
        assert!(
            o.status.success(),
            "podman pull {reference} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    async fn inspect(&self, reference: &str) -> serde_json::Value {
        let o = self
            .run(&["image", "inspect", "--format", "json", reference])
            .await;
        assert!(
            o.status.success(),
            "podman image inspect {reference} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("podman image inspect prints JSON");
        v[0].clone()
    }
}

/// The uncompressed digest (diff ID) of the image's one layer, from its config.
fn diff_id(image: &Image) -> String {
    let cfg: serde_json::Value = serde_json::from_slice(&image.config).expect("config JSON");
    cfg["rootfs"]["diff_ids"][0]
        .as_str()
        .expect("diff_id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_cache() {
    let upstream = DockerRegistry::start().await;
    let image = Image::build(1 << 20, 50);
    image.push(upstream.port, "test/app", "v1").await;
    let cache = CacheServer::start(
        vec![(PREFIX, format!("http://127.0.0.1:{}", upstream.port))],
        Duration::from_secs(3600),
    )
    .await;
    let reference = format!("127.0.0.1:{}/{PREFIX}/test/app:v1", cache.port);
    let gets = |digest: &str| upstream.count_log(&format!("\"GET /v2/test/app/blobs/{digest} "));

    for round in ["cold", "warm (fresh podman root)"] {
        let podman = Podman::new();
        podman.pull(&reference).await;
        let info = podman.inspect(&reference).await;
        assert_eq!(info["Id"], image.config_digest[7..], "{round}: {info}");
        assert_eq!(info["Digest"], image.manifest_digest, "{round}: {info}");
        assert_eq!(
            info["RootFS"]["Layers"],
            serde_json::json!([diff_id(&image)]),
            "{round}: the layer's uncompressed digest differs: {info}"
        );
        assert_eq!(gets(&image.layer_digest), 1, "{round}: layer GETs upstream");
        assert_eq!(
            gets(&image.config_digest),
            1,
            "{round}: config GETs upstream"
        );
    }
    let s = cache.cache.stats();
    assert_eq!(s.blob_misses, 2, "{s:?}");
    assert!(s.blob_hits >= 2, "{s:?}");
}
