//! OCI/Docker images pulled with the OCI distribution API and unpacked into a root file
//! system, as boot2container does with podman (the DUT has none).
//!
//! [`pull`] resolves a tag or digest to a manifest (OCI index, OCI manifest, Docker
//! manifest list v2, Docker manifest v2 schema 2), picks [`PullOptions::platform`] from an
//! index, fetches the config and the layers, verifies every blob's sha256 digest and size
//! (and each layer's uncompressed `diff_id` when the config lists them), then unpacks the
//! layers in order into the destination, applying whiteouts.
//!
//! Token auth: a `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` fetches an
//! anonymous token from the realm and retries (Docker Hub, the gateway's cache passing it
//! through). Credentials (Basic, or tokens that need a login) are not supported.
//!
//! Unpacking treats layers as hostile input:
//! - entries with an absolute path or a `..` component are refused (an error naming the
//!   entry, the layer digest and the image); so are hard links whose target is absolute or
//!   has `..`;
//! - directories on an entry's path are resolved *within* the destination, as if it were
//!   `/` (a symlink `a -> /etc` planted by a layer makes a later `a/passwd` land in
//!   `<dest>/etc/passwd`, never in the host's `/etc`); an entry's own last component is never
//!   followed: what is there is replaced (except a directory by a directory);
//! - hard links are made only to existing non-directory entries inside the destination;
//! - device nodes are created when running as root (CI, the DUT) and skipped with a warning
//!   otherwise; FIFOs are always created;
//! - modes (setuid/setgid/sticky included), symlinks and mtimes are kept; ownership is kept
//!   when running as root. Extended attributes (file capabilities, SELinux labels) are not.
//!
//! Layers: gzip (`…tar+gzip`, `…tar.gzip`, recognised by content) or plain tar; zstd
//! layers are refused as unsupported. Blobs are downloaded to a file before being unpacked:
//! into [`PullOptions::blob_cache`] (`<cache>/sha256/<hex>`, kept and reused, re-verified
//! on reuse), or else into `.<dest name>.oci-download-<pid>` next to `dest`, removed
//! afterwards. Manifests are at most 4 MiB, configs at most 16 MiB.
//!
//! Not supported: schema 1 manifests, digests other than sha256, credentials, zstd layers,
//! extended attributes, foreign-layer URLs, resuming partial downloads.

mod client;
mod reference;
mod unpack;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use reference::{ImageRef, Reference};

/// Largest manifest (or index) accepted.
pub const MAX_MANIFEST: u64 = 4 * 1024 * 1024;
/// Largest image config accepted.
pub const MAX_CONFIG: u64 = 16 * 1024 * 1024;

/// What can go wrong parsing a reference, pulling or unpacking; every message names the
/// image and, for blobs and layers, the digest.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image reference does not parse.
    #[error("invalid image reference {input:?}: {why}")]
    Reference {
        /// The text given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
    /// A request to the registry failed (connection, HTTP status, auth).
    #[error("{image}: {what}: {why}")]
    Registry {
        /// The image being pulled.
        image: String,
        /// The request (`GET <url>`, `token from <realm>`).
        what: String,
        /// Why it failed.
        why: String,
    },
    /// A manifest or index is malformed, too big, or has no entry for the platform.
    #[error("{image}: manifest {reference}: {why}")]
    Manifest {
        /// The image being pulled.
        image: String,
        /// The tag or digest of the manifest.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// A blob could not be fetched, or its size or digest is not the one announced.
    #[error("{image}: blob {digest}: {why}")]
    Blob {
        /// The image being pulled.
        image: String,
        /// The blob's digest.
        digest: String,
        /// What failed.
        why: String,
    },
    /// A layer could not be unpacked (hostile entry, bad tar or gzip, I/O error).
    #[error("{image}: layer {digest}: {why}")]
    Layer {
        /// The image being pulled.
        image: String,
        /// The layer's digest.
        digest: String,
        /// What failed, naming the tar entry when there is one.
        why: String,
    },
    /// Something this puller does not do (zstd layers, schema 1, credentials…).
    #[error("{image}: not supported: {what}")]
    Unsupported {
        /// The image being pulled.
        image: String,
        /// What is not supported.
        what: String,
    },
    /// A local file operation failed (creating `dest`, the blob cache…).
    #[error("{image}: {what}: {why}")]
    Local {
        /// The image being pulled.
        image: String,
        /// The operation and path.
        what: String,
        /// The error.
        why: String,
    },
}

/// How [`pull`] talks to the registry and where it keeps blobs.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Plain HTTP instead of HTTPS (like `--tls-verify=false`; the gateway's cache).
    pub insecure: bool,
    /// `(os, architecture)` picked from an image index; the architecture may carry a
    /// variant (`"arm/v7"`). Defaults to the build target's (`("linux", "amd64")`…).
    pub platform: (String, String),
    /// Content-addressed blob cache (`<dir>/sha256/<hex>`): blobs found there (and whose
    /// digest still matches) are not fetched again; fetched blobs are kept there.
    pub blob_cache: Option<PathBuf>,
    /// Connect timeout and longest pause while reading an answer (not a bound on a whole
    /// download, so large layers on slow links still work).
    pub timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions {
            insecure: false,
            platform: ("linux".to_owned(), default_arch().to_owned()),
            blob_cache: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The OCI name of the architecture this program was built for.
pub fn default_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other,
    }
}

/// What the image config says about running the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint` (empty when unset).
    pub entrypoint: Vec<String>,
    /// `Cmd` (empty when unset).
    pub cmd: Vec<String>,
    /// `Env`, as `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir`, when set and not empty.
    pub working_dir: Option<String>,
    /// `User`, when set and not empty.
    pub user: Option<String>,
    /// Digest of the manifest the reference resolved to (the index's digest for a
    /// multi-platform image, so `repository@digest` pulls the same thing again).
    pub digest: String,
}

#[derive(Deserialize, Default)]
struct ConfigJson {
    #[serde(default)]
    config: Option<RunConfigJson>,
    #[serde(default)]
    rootfs: Option<RootfsJson>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfigJson {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootfsJson {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Pulls `image` and unpacks it into `dest` (created if needed; layers are applied on top
/// of what is already there, so pass an empty or new directory).
pub async fn pull(
    image: &ImageRef,
    dest: &Path,
    opts: &PullOptions,
) -> Result<ImageConfig, OciError> {
    let name = image.to_string();
    let local = |what: String, e: std::io::Error| OciError::Local {
        image: name.clone(),
        what,
        why: e.to_string(),
    };
    let mut client = client::Client::new(image, opts)?;
    let resolved = client.resolve(&opts.platform).await?;
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| local(format!("creating {}", dest.display()), e))?;
    let store = client::BlobStore::open(opts.blob_cache.as_deref(), dest, &name).await?;
    let result = pull_blobs(&mut client, &store, &resolved, dest, &name).await;
    store.finish().await;
    let cfg = result?;
    let run = cfg.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        env: run.env.unwrap_or_default(),
        working_dir: run.working_dir.filter(|s| !s.is_empty()),
        user: run.user.filter(|s| !s.is_empty()),
        digest: resolved.digest,
    })
}

/// Fetches the config and the layers of `resolved`, unpacking each layer into `dest`.
async fn pull_blobs(
    client: &mut client::Client,
    store: &client::BlobStore,
    resolved: &client::Resolved,
    dest: &Path,
    name: &str,
) -> Result<ConfigJson, OciError> {
    let path = client
        .fetch_blob(store, &resolved.config, MAX_CONFIG)
        .await?;
    let cfg_bytes = tokio::fs::read(&path).await.map_err(|e| OciError::Local {
        image: name.to_owned(),
        what: format!("reading {}", path.display()),
        why: e.to_string(),
    })?;
    store.done_with(&path).await;
    let cfg: ConfigJson = serde_json::from_slice(&cfg_bytes).map_err(|e| OciError::Blob {
        image: name.to_owned(),
        digest: resolved.config.digest.clone(),
        why: format!("image config is not valid JSON: {e}"),
    })?;
    let diff_ids: &[String] = cfg.rootfs.as_ref().map(|r| &r.diff_ids[..]).unwrap_or(&[]);
    let check_diff_ids = diff_ids.len() == resolved.layers.len();
    if !check_diff_ids {
        tracing::warn!(
            image = %name,
            "config lists {} diff_ids for {} layers: not checking uncompressed digests",
            diff_ids.len(),
            resolved.layers.len()
        );
    }
    for (i, layer) in resolved.layers.iter().enumerate() {
        let layer_err = |why: String| OciError::Layer {
            image: name.to_owned(),
            digest: layer.digest.clone(),
            why,
        };
        let unsupported = |what: String| OciError::Unsupported {
            image: name.to_owned(),
            what,
        };
        let mt = layer.media_type.as_str();
        if mt.contains("zstd") {
            return Err(unsupported(format!(
                "zstd-compressed layer {} ({mt})",
                layer.digest
            )));
        }
        if !mt.is_empty() && !mt.contains("tar") {
            return Err(unsupported(format!(
                "layer {} of media type {mt}",
                layer.digest
            )));
        }
        let path = client.fetch_blob(store, layer, u64::MAX).await?;
        let diff_id = check_diff_ids.then(|| diff_ids[i].clone());
        let (d, p) = (dest.to_path_buf(), path.clone());
        tracing::info!(
            image = %name,
            layer = %layer.digest,
            "unpacking layer {}/{}",
            i + 1,
            resolved.layers.len()
        );
        let r =
            tokio::task::spawn_blocking(move || unpack::unpack_layer(&d, &p, diff_id.as_deref()))
                .await
                .map_err(|e| layer_err(format!("unpacking task failed: {e}")))?;
        store.done_with(&path).await;
        r.map_err(|e| match e {
            unpack::UnpackError::Zstd => {
                unsupported(format!("zstd-compressed layer {}", layer.digest))
            }
            unpack::UnpackError::Other(why) => layer_err(why),
        })?;
    }
    Ok(cfg)
}
