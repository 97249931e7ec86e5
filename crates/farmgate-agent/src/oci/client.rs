//! The registry side: requests with anonymous bearer tokens, manifest resolution with
//! platform choice, verified blob downloads into a [`BlobStore`].

use std::path::{Path, PathBuf};

use farmgate_httpc::{auth_params, error_chain};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::reference::check_digest;
use super::{ImageRef, MAX_MANIFEST, OciError, PullOptions, Reference};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor from a manifest.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestJson {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// An image manifest resolved for one platform.
pub(crate) struct Resolved {
    /// Digest of the manifest (or index) the reference named.
    pub digest: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A registry client for one image.
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    image: ImageRef,
    name: String,
    token: Option<String>,
}

impl Client {
    pub fn new(image: &ImageRef, opts: &PullOptions) -> Result<Client, OciError> {
        let http = reqwest::Client::builder()
            .connect_timeout(opts.timeout)
            .read_timeout(opts.timeout)
            .user_agent(concat!("farmgate-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OciError::Local {
                image: image.to_string(),
                what: "building the HTTP client".to_owned(),
                why: error_chain(&e),
            })?;
        let scheme = if opts.insecure { "http" } else { "https" };
        Ok(Client {
            http,
            base: format!("{scheme}://{}/v2/{}", image.registry, image.repository),
            image: image.clone(),
            name: image.to_string(),
            token: None,
        })
    }

    fn registry_err(&self, what: &str, why: String) -> OciError {
        OciError::Registry {
            image: self.name.clone(),
            what: what.to_owned(),
            why,
        }
    }

    /// GET `url` with `accept`, fetching an anonymous bearer token once on a 401.
    async fn get(&mut self, url: &str, accept: &str) -> Result<reqwest::Response, OciError> {
        let what = format!("GET {url}");
        let mut fetched_token = false;
        loop {
            let mut req = self.http.get(url).header(ACCEPT, accept);
            if let Some(t) = &self.token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| self.registry_err(&what, error_chain(&e)))?;
            if resp.status() == StatusCode::UNAUTHORIZED && !fetched_token {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                self.fetch_token(&challenge).await?;
                fetched_token = true;
                continue;
            }
            if !resp.status().is_success() {
                let status = resp.status();
                let body = body_excerpt(resp).await;
                let hint = if status == StatusCode::UNAUTHORIZED {
                    " (the anonymous token was refused: credentials are not supported)"
                } else {
                    ""
                };
                return Err(self.registry_err(&what, format!("HTTP {status}{hint}: {body}")));
            }
            return Ok(resp);
        }
    }

    async fn fetch_token(&mut self, challenge: &str) -> Result<(), OciError> {
        let (scheme, params) = auth_params(challenge);
        if scheme != "bearer" {
            return Err(OciError::Unsupported {
                image: self.name.clone(),
                what: format!(
                    "registry asks for {:?} authentication (only anonymous bearer tokens are \
                     supported)",
                    if challenge.is_empty() {
                        "unknown"
                    } else {
                        challenge
                    }
                ),
            });
        }
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let realm = get("realm").unwrap_or_default();
        let what = format!("token from {realm:?}");
        let mut url = Url::parse(&realm)
            .map_err(|e| self.registry_err(&what, format!("realm is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.registry_err(&what, "realm is not an http(s) URL".to_owned()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = get("service") {
                q.append_pair("service", &s);
            }
            let scope = get("scope")
                .unwrap_or_else(|| format!("repository:{}:pull", self.image.repository));
            q.append_pair("scope", &scope);
        }
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.registry_err(&what, error_chain(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = body_excerpt(resp).await;
            return Err(self.registry_err(&what, format!("HTTP {status}: {body}")));
        }
        let body = read_bounded(resp, 1024 * 1024)
            .await
            .map_err(|why| self.registry_err(&what, why))?;
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| self.registry_err(&what, format!("answer is not token JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.registry_err(&what, "answer holds no token".to_owned()))?;
        self.token = Some(token);
        Ok(())
    }

    /// Fetches manifest `reference`, bounded and digest-checked; returns (bytes, media type,
    /// digest).
    async fn manifest(
        &mut self,
        reference: &str,
        expect_digest: Option<&str>,
    ) -> Result<(Vec<u8>, String, String), OciError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self.get(&url, ACCEPT_ALL).await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let merr = |why: String| OciError::Manifest {
            image: self.name.clone(),
            reference: reference.to_owned(),
            why,
        };
        let body = read_bounded(resp, MAX_MANIFEST).await.map_err(merr)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if let Some(want) = expect_digest
            && want != digest
        {
            return Err(merr(format!(
                "content has digest {digest}, not the {want} asked for"
            )));
        }
        Ok((body, content_type, digest))
    }

    /// Resolves the image's reference to one platform's config and layers.
    pub async fn resolve(&mut self, platform: &(String, String)) -> Result<Resolved, OciError> {
        let top_ref = self.image.reference.as_str().to_owned();
        let expect = match &self.image.reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => None,
        };
        let (mut body, mut ctype, top_digest) = self.manifest(&top_ref, expect.as_deref()).await?;
        let mut current_ref = top_ref;
        // An index may (rarely) point at another index: follow a few levels.
        for _ in 0..4 {
            let merr = |why: String| OciError::Manifest {
                image: self.name.clone(),
                reference: current_ref.clone(),
                why,
            };
            let m: ManifestJson = serde_json::from_slice(&body)
                .map_err(|e| merr(format!("not valid manifest JSON: {e}")))?;
            let mt = m
                .media_type
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or(ctype.clone());
            if m.schema_version == Some(1) || mt.contains("distribution.manifest.v1") {
                return Err(OciError::Unsupported {
                    image: self.name.clone(),
                    what: "Docker schema 1 manifests".to_owned(),
                });
            }
            let is_index = mt == OCI_INDEX || mt == DOCKER_LIST || m.manifests.is_some();
            if is_index {
                let list = m.manifests.unwrap_or_default();
                let chosen = choose_platform(&list, platform).ok_or_else(|| {
                    let have: Vec<String> = list
                        .iter()
                        .filter_map(|d| d.platform.as_ref())
                        .map(|p| match &p.variant {
                            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                            None => format!("{}/{}", p.os, p.architecture),
                        })
                        .collect();
                    merr(format!(
                        "no manifest for platform {}/{} (the index has: {})",
                        platform.0,
                        platform.1,
                        have.join(", ")
                    ))
                })?;
                check_digest(&chosen.digest).map_err(merr)?;
                if chosen.size > MAX_MANIFEST {
                    return Err(merr(format!(
                        "entry {} is {} bytes, over the {MAX_MANIFEST}-byte manifest limit",
                        chosen.digest, chosen.size
                    )));
                }
                let d = chosen.digest.clone();
                let (b, c, _) = self.manifest(&d, Some(&d)).await?;
                body = b;
                ctype = c;
                current_ref = d;
                continue;
            }
            if !(mt.is_empty() || mt == OCI_MANIFEST || mt == DOCKER_MANIFEST) {
                return Err(OciError::Unsupported {
                    image: self.name.clone(),
                    what: format!("manifest media type {mt:?}"),
                });
            }
            let config = m
                .config
                .ok_or_else(|| merr("image manifest has no config".to_owned()))?;
            let layers = m.layers.unwrap_or_default();
            for d in std::iter::once(&config).chain(&layers) {
                check_digest(&d.digest).map_err(&merr)?;
                if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                    return Err(OciError::Unsupported {
                        image: self.name.clone(),
                        what: format!("foreign layer {} (fetched from urls)", d.digest),
                    });
                }
            }
            return Ok(Resolved {
                digest: top_digest,
                config,
                layers,
            });
        }
        Err(OciError::Manifest {
            image: self.name.clone(),
            reference: current_ref,
            why: "image indexes nested more than 4 deep".to_owned(),
        })
    }

    /// The blob `desc` as a verified file in `store` (fetched unless already there).
    pub async fn fetch_blob(
        &mut self,
        store: &BlobStore,
        desc: &Descriptor,
        max: u64,
    ) -> Result<PathBuf, OciError> {
        let name = self.name.clone();
        let berr = |why: String| OciError::Blob {
            image: name.clone(),
            digest: desc.digest.clone(),
            why,
        };
        if desc.size > max {
            return Err(berr(format!(
                "announced size {} is over the {max}-byte limit",
                desc.size
            )));
        }
        let hex = &desc.digest["sha256:".len()..];
        let path = store.dir.join(hex);
        if store.keep {
            match verify_file(&path, desc.size, hex).await {
                Ok(true) => {
                    tracing::info!(image = %self.name, blob = %desc.digest, "blob found in the blob cache");
                    return Ok(path);
                }
                Ok(false) => {
                    tracing::warn!(image = %self.name, blob = %desc.digest, "cached blob is corrupt: fetching it again");
                    let _ = tokio::fs::remove_file(&path).await;
                }
                Err(_) => {}
            }
        }
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let mut resp = self.get(&url, "*/*").await?;
        if let Some(len) = resp.content_length()
            && len != desc.size
        {
            return Err(berr(format!(
                "registry announces {len} bytes, the manifest says {}",
                desc.size
            )));
        }
        // Unique per download: two pulls of the same blob (a service and a container of
        // the same image, started together) each write their own file; the first rename
        // wins and the second replaces it with the same bytes.
        static DOWNLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = DOWNLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = store
            .dir
            .join(format!("{hex}.partial-{}-{n}", std::process::id()));
        let local = |what: &str, e: std::io::Error| OciError::Local {
            image: name.clone(),
            what: format!("{what} {}", partial.display()),
            why: e.to_string(),
        };
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| local("creating", e))?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let outcome: Result<(), OciError> = async {
            loop {
                let chunk = resp.chunk().await.map_err(|e| {
                    berr(format!(
                        "download failed after {got} bytes: {}",
                        error_chain(&e)
                    ))
                })?;
                let Some(chunk) = chunk else { break };
                got += chunk.len() as u64;
                if got > desc.size {
                    return Err(berr(format!(
                        "registry sent more than the {} bytes the manifest says",
                        desc.size
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| local("writing", e))?;
            }
            if got != desc.size {
                return Err(berr(format!(
                    "registry sent {got} bytes, the manifest says {}",
                    desc.size
                )));
            }
            let actual = hex::encode(hasher.finalize());
            if actual != hex {
                return Err(berr(format!(
                    "content has digest sha256:{actual}: refusing the blob"
                )));
            }
            file.flush().await.map_err(|e| local("writing", e))?;
            file.sync_all().await.map_err(|e| local("syncing", e))?;
            Ok(())
        }
        .await;
        drop(file);
        if let Err(e) = outcome {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(|e| local("renaming", e))?;
        tracing::info!(image = %self.name, blob = %desc.digest, bytes = got, "blob fetched");
        Ok(path)
    }
}

/// The first entry of `list` for `platform` (`arch` may be `arch/variant`); attestation
/// manifests (platform unknown) never match.
fn choose_platform<'a>(
    list: &'a [Descriptor],
    platform: &(String, String),
) -> Option<&'a Descriptor> {
    let (os, arch) = (&platform.0, &platform.1);
    let (arch, variant) = match arch.split_once('/') {
        Some((a, v)) => (a, Some(v)),
        None => (arch.as_str(), None),
    };
    let matches = |d: &&Descriptor| {
        d.platform.as_ref().is_some_and(|p| {
            &p.os == os
                && p.architecture == arch
                && variant.is_none_or(|v| p.variant.as_deref() == Some(v))
        })
    };
    // Without a wanted variant, prefer an entry with none (or arm64's v8).
    list.iter()
        .filter(matches)
        .find(|d| {
            variant.is_some()
                || d.platform
                    .as_ref()
                    .is_some_and(|p| p.variant.as_deref().is_none_or(|v| v == "v8"))
        })
        .or_else(|| list.iter().find(matches))
}

/// Whether `path` holds `size` bytes hashing to `hex` (Err: no such file).
async fn verify_file(path: &Path, size: u64, hex: &str) -> std::io::Result<bool> {
    let meta = tokio::fs::metadata(path).await?;
    if meta.len() != size {
        return Ok(false);
    }
    let path = path.to_owned();
    let want = hex.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()) == want)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Reads a body of at most `max` bytes.
async fn read_bounded(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, String> {
    if let Some(len) = resp.content_length()
        && len > max
    {
        return Err(format!("{len} bytes, over the {max}-byte limit"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading the answer: {}", error_chain(&e)))?
    {
        if out.len() as u64 + chunk.len() as u64 > max {
            return Err(format!("over the {max}-byte limit"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The start of an error answer's body, for messages.
async fn body_excerpt(resp: reqwest::Response) -> String {
    match read_bounded(resp, 64 * 1024).await {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let s = s.trim();
            if s.chars().count() > 300 {
                format!("{}…", s.chars().take(300).collect::<String>())
            } else {
                s.to_owned()
            }
        }
        Err(e) => format!("(body unreadable: {e})"),
    }
}

/// Where blobs go: the persistent blob cache, or a download directory removed afterwards.
pub(crate) struct BlobStore {
    dir: PathBuf,
    /// Blobs are kept (the blob cache) rather than deleted once used.
    keep: bool,
}

impl BlobStore {
    /// `<cache>/sha256`, or `.<dest name>.oci-download-<pid>` next to `dest`.
    pub async fn open(
        cache: Option<&Path>,
        dest: &Path,
        image: &str,
    ) -> Result<BlobStore, OciError> {
        let (dir, keep) = match cache {
            Some(c) => (c.join("sha256"), true),
            None => {
                let name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "rootfs".to_owned());
                let parent = dest.parent().unwrap_or(Path::new("."));
                (
                    parent.join(format!(".{name}.oci-download-{}", std::process::id())),
                    false,
                )
            }
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| OciError::Local {
                image: image.to_owned(),
                what: format!("creating {}", dir.display()),
                why: e.to_string(),
            })?;
        Ok(BlobStore { dir, keep })
    }

    /// Called once a blob file has been used: deleted unless kept in the blob cache.
    pub async fn done_with(&self, path: &Path) {
        if !self.keep {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// Removes the download directory (not the blob cache).
    pub async fn finish(&self) {
        if !self.keep {
            let _ = tokio::fs::remove_dir_all(&self.dir).await;
        }
    }
}
