//! Embedded S3-compatible object store (SigV4, buckets, objects, multipart) over local disk,
//! with per-job keys restricted to a bucket.
//!
//! Layout under the root directory:
//! - `<root>/<bucket>/<key>`: object data (a `/` in a key makes directories);
//! - `<root>/.meta/<bucket>/<key>`: the object's metadata (JSON: ETag, type, headers),
//!   a tree mirroring the data tree, so it can never collide with a key;
//! - `<root>/.uploads/<upload id>/`: multipart uploads in progress;
//! - `<root>/.tmp/`: files being written (then renamed into place);
//! - `<root>/.farmgate-keys.json` (mode 0600): the restricted access keys.
//!
//! Bucket names start with a letter or digit, so none of these names can be a bucket.
//!
//! Remote mode ([`S3Config::remote`]): the objects live in an external S3 store. The HTTP
//! API still authenticates and authorizes every request here (admin or restricted keys),
//! then forwards it to the store re-signed with the store's credentials, streaming bodies
//! both ways; the synchronous methods call the store too. Only the keys file is local.

mod http;
mod remote;
/// SigV4 signing and checking: the shared implementation of the `farmgate-sigv4` crate.
pub use farmgate_sigv4 as sigv4;
mod xml;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use md5::{Digest, Md5};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// An access key and its secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The access key id (what clients send in the clear).
    pub access_key: String,
    /// The secret access key (signs requests; never sent).
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// Configuration of an [`S3Store`].
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The directory holding buckets, metadata and keys (created if missing).
    pub root: PathBuf,
    /// The region the store answers for (GetBucketLocation); conventionally "us-east-1".
    pub region: String,
    /// The administrator's credentials: every bucket, every operation.
    pub admin: Credentials,
    /// When set, "remote mode": objects live in this external S3 store and the HTTP API
    /// proxies every authenticated request to it; `root` then only holds the keys file.
    pub remote: Option<RemoteStore>,
}

/// An external S3-compatible store (MinIO, Garage, Ceph RGW, AWS) that holds the objects in
/// remote mode. Requests are sent path-style and signed with SigV4.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    /// The store's base URL, e.g. `http://127.0.0.1:9000` (a path prefix is allowed).
    pub url: String,
    /// The region requests are signed for (e.g. "us-east-1").
    pub region: String,
    /// The credentials of the store (never shown to the gateway's clients).
    pub creds: Credentials,
}

impl S3Config {
    /// A configuration with the default region, "us-east-1".
    pub fn new(root: impl Into<PathBuf>, admin: Credentials) -> Self {
        S3Config {
            root: root.into(),
            region: "us-east-1".to_string(),
            admin,
            remote: None,
        }
    }
}

/// Errors of the store. Messages name the bucket, key or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// A bucket name breaks the S3 naming rules.
    #[error("invalid bucket name {bucket:?}: {reason}")]
    InvalidBucketName {
        /// The name given.
        bucket: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// An object key is not acceptable (path escape, NUL, empty component, too long).
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key given.
        key: String,
        /// Why it is refused.
        reason: String,
    },
    /// The bucket does not exist.
    #[error("bucket {bucket:?} does not exist")]
    NoSuchBucket {
        /// The bucket.
        bucket: String,
    },
    /// The object does not exist.
    #[error("object {key:?} does not exist in bucket {bucket:?}")]
    NoSuchKey {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// The bucket exists already.
    #[error("bucket {bucket:?} already exists")]
    BucketExists {
        /// The bucket.
        bucket: String,
    },
    /// The bucket still holds objects.
    #[error("bucket {bucket:?} is not empty")]
    BucketNotEmpty {
        /// The bucket.
        bucket: String,
    },
    /// The key cannot be stored beside an existing one: this store maps `/` in keys to
    /// directories, so `a` and `a/b` cannot both exist.
    #[error("object {key:?} in bucket {bucket:?} conflicts with an existing key: {reason}")]
    KeyConflict {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What it conflicts with.
        reason: String,
    },
    /// An access key given to [`S3Store::add_key`] is in use already.
    #[error("access key {access_key:?} already exists")]
    AccessKeyExists {
        /// The access key.
        access_key: String,
    },
    /// The access key is not known.
    #[error("access key {access_key:?} does not exist")]
    NoSuchAccessKey {
        /// The access key.
        access_key: String,
    },
    /// Credentials that cannot be used (empty, or an access key with `/` or spaces).
    #[error("invalid credentials for access key {access_key:?}: {reason}")]
    InvalidCredentials {
        /// The access key.
        access_key: String,
        /// What is wrong.
        reason: String,
    },
    /// The multipart upload does not exist (finished, aborted, or never started).
    #[error("multipart upload {upload_id:?} does not exist")]
    NoSuchUpload {
        /// The upload id.
        upload_id: String,
    },
    /// The keys file cannot be parsed.
    #[error("keys file {path}: {reason}")]
    KeysFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The external S3 store (remote mode) could not be reached or answered an error that
    /// has no variant of its own.
    #[error("external S3 store {url}: {reason}")]
    Remote {
        /// The store's URL.
        url: String,
        /// What went wrong (connection error, or the store's status, code and message).
        reason: String,
    },
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("write", "rename", ...).
        action: String,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Maps an I/O error to [`S3Error::Io`] naming what was done to which file.
pub(crate) fn io_err(action: &str, path: &Path) -> impl FnOnce(io::Error) -> S3Error {
    let action = action.to_string();
    let path = path.to_path_buf();
    move |source| S3Error::Io {
        action,
        path,
        source,
    }
}

/// Checks a bucket name against the S3 rules: 3–63 characters of `a-z`, `0-9`, `.` and
/// `-`, starting and ending with a letter or digit, no `..`, not shaped like an IP address.
pub fn validate_bucket_name(bucket: &str) -> Result<(), S3Error> {
    let fail = |reason: &str| {
        Err(S3Error::InvalidBucketName {
            bucket: bucket.to_string(),
            reason: reason.to_string(),
        })
    };
    if !(3..=63).contains(&bucket.len()) {
        return fail("must be 3 to 63 characters long");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return fail("only lower-case letters, digits, '.' and '-' are allowed");
    }
    let first = bucket.as_bytes()[0];
    let last = bucket.as_bytes()[bucket.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return fail("must start and end with a letter or digit");
    }
    if bucket.contains("..") || bucket.contains(".-") || bucket.contains("-.") {
        return fail("must not contain '..', '.-' or '-.'");
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return fail("must not be an IP address");
    }
    Ok(())
}

/// Checks an object key: 1–1024 bytes, no NUL, no leading `/`, no empty, `.` or `..`
/// component (so no trailing `/` either), components of at most 255 bytes.
pub fn validate_key(key: &str) -> Result<(), S3Error> {
    let fail = |reason: &str| {
        Err(S3Error::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() || key.len() > 1024 {
        return fail("must be 1 to 1024 bytes long");
    }
    if key.contains('\0') {
        return fail("must not contain NUL");
    }
    if key.starts_with('/') {
        return fail("must not start with '/'");
    }
    for comp in key.split('/') {
        match comp {
            "" => return fail("must not contain an empty path component ('//' or a trailing '/')"),
            "." | ".." => return fail("must not contain a '.' or '..' path component"),
            c if c.len() > 255 => return fail("a path component is longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// Splits a raw (percent-encoded) path-style request path into bucket and key, decoded and
/// validated: `/` → (None, None), `/b` or `/b/` → (Some(b), None), `/b/k` → (Some(b), Some(k)).
pub fn parse_request_path(raw_path: &str) -> Result<(Option<String>, Option<String>), S3Error> {
    let decoded = sigv4::percent_decode(raw_path, false);
    let text = String::from_utf8(decoded).map_err(|_| S3Error::InvalidKey {
        key: raw_path.to_string(),
        reason: "the decoded path is not UTF-8".to_string(),
    })?;
    let rest = text.strip_prefix('/').unwrap_or(&text);
    if rest.is_empty() {
        return Ok((None, None));
    }
    let (bucket, key) = match rest.split_once('/') {
        Some((b, k)) => (b, k),
        None => (rest, ""),
    };
    validate_bucket_name(bucket)?;
    if key.is_empty() {
        return Ok((Some(bucket.to_string()), None));
    }
    validate_key(key)?;
    Ok((Some(bucket.to_string()), Some(key.to_string())))
}

/// Generates random S3-shaped credentials: a 20-character access key of `A-Z0-9` (starting
/// with "FG") and a 40-character secret of `A-Za-z0-9+/`.
pub fn new_credentials() -> Credentials {
    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = rand::rng();
    let mut pick = |set: &[u8], n: usize| -> String {
        (0..n)
            .map(|_| set[rng.random_range(0..set.len())] as char)
            .collect()
    };
    Credentials {
        access_key: format!("FG{}", pick(UPPER, 18)),
        secret_key: pick(SECRET, 40),
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// The stored metadata of an object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ObjectMeta {
    /// ETag without quotes: hex MD5, or `<hex>-<parts>` for multipart objects.
    pub etag: String,
    /// Content-Type given at upload.
    pub content_type: Option<String>,
    /// Other headers returned on GET/HEAD (`x-amz-meta-*`, Content-Encoding, ...).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// An object as listings and reads see it.
#[derive(Debug, Clone)]
pub(crate) struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyEntry {
    access_key: String,
    secret_key: String,
    buckets: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

/// Who signed a request.
#[derive(Debug, Clone)]
pub(crate) enum Identity {
    Admin,
    Restricted {
        access_key: String,
        buckets: Vec<String>,
    },
}

impl Identity {
    pub(crate) fn may_access(&self, bucket: &str) -> bool {
        match self {
            Identity::Admin => true,
            Identity::Restricted { buckets, .. } => buckets.iter().any(|b| b == bucket),
        }
    }
}

struct Inner {
    root: PathBuf,
    region: String,
    admin: Credentials,
    keys: RwLock<HashMap<String, KeyEntry>>,
    remote: Option<remote::Remote>,
}

/// The object store: buckets and objects on disk, access keys, and the S3 HTTP API
/// ([`S3Store::router`]). Cheap to clone; clones share state.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("root", &self.inner.root)
            .field("region", &self.inner.region)
            .finish_non_exhaustive()
    }
}

const KEYS_FILE: &str = ".farmgate-keys.json";

impl S3Store {
    /// Opens (creating if needed) the store at `cfg.root` and loads the restricted keys.
    /// In remote mode only `cfg.root` (for the keys file) is created, and the external
    /// store is not contacted (it may come up later).
    pub fn open(cfg: S3Config) -> Result<S3Store, S3Error> {
        check_credentials(&cfg.admin)?;
        let remote = match &cfg.remote {
            Some(r) => Some(remote::Remote::new(r)?),
            None => None,
        };
        let dirs = if remote.is_some() {
            vec![cfg.root.clone()]
        } else {
            vec![
                cfg.root.clone(),
                cfg.root.join(".meta"),
                cfg.root.join(".uploads"),
                cfg.root.join(".tmp"),
            ]
        };
        for dir in dirs {
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        let keys_path = cfg.root.join(KEYS_FILE);
        let mut keys = HashMap::new();
        match fs::read(&keys_path) {
            Ok(bytes) => {
                let file: KeysFile =
                    serde_json::from_slice(&bytes).map_err(|e| S3Error::KeysFile {
                        path: keys_path.clone(),
                        reason: e.to_string(),
                    })?;
                for k in file.keys {
                    keys.insert(k.access_key.clone(), k);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read", &keys_path)(e)),
        }
        // Leftovers of writes interrupted by a stop.
        if remote.is_none() {
            let tmp = cfg.root.join(".tmp");
            if let Ok(entries) = fs::read_dir(&tmp) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(S3Store {
            inner: Arc::new(Inner {
                root: cfg.root,
                region: cfg.region,
                admin: cfg.admin,
                keys: RwLock::new(keys),
                remote,
            }),
        })
    }

    /// The S3 REST API (path-style: `/<bucket>/<key>`), SigV4-authenticated.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// The external store's URL in remote mode, None in local mode.
    pub fn remote_url(&self) -> Option<&str> {
        self.inner.remote.as_ref().map(|r| r.url())
    }

    pub(crate) fn remote(&self) -> Option<&remote::Remote> {
        self.inner.remote.as_ref()
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The region the store answers for.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// Creates a bucket; an error if it exists already.
    pub fn create_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        validate_bucket_name(bucket)?;
        if let Some(r) = self.remote() {
            return r.create_bucket(bucket);
        }
        let dir = self.inner.root.join(bucket);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(S3Error::BucketExists {
                    bucket: bucket.to_string(),
                });
            }
            Err(e) => return Err(io_err("create bucket directory", &dir)(e)),
        }
        let meta = self.inner.root.join(".meta").join(bucket);
        fs::create_dir_all(&meta).map_err(io_err("create directory", &meta))?;
        Ok(())
    }

    /// Whether the bucket exists (in remote mode: false too when the store cannot be asked).
    pub fn bucket_exists(&self, bucket: &str) -> bool {
        if validate_bucket_name(bucket).is_err() {
            return false;
        }
        if let Some(r) = self.remote() {
            return r.bucket_exists(bucket).unwrap_or(false);
        }
        self.inner.root.join(bucket).is_dir()
    }

    pub(crate) fn require_bucket(&self, bucket: &str) -> Result<PathBuf, S3Error> {
        validate_bucket_name(bucket)?;
        let dir = self.inner.root.join(bucket);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(S3Error::NoSuchBucket {
                bucket: bucket.to_string(),
            })
        }
    }

    /// The buckets and their creation times, sorted by name.
    pub(crate) fn buckets(&self) -> Result<Vec<(String, SystemTime)>, S3Error> {
        let root = &self.inner.root;
        let mut out = Vec::new();
        for entry in fs::read_dir(root).map_err(io_err("list", root))? {
            let entry = entry.map_err(io_err("list", root))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if validate_bucket_name(&name).is_err() {
                continue;
            }
            let Ok(md) = entry.metadata() else { continue };
            if !md.is_dir() {
                continue;
            }
            let created = md
                .created()
                .or_else(|_| md.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((name, created));
        }
        out.sort();
        Ok(out)
    }

    /// Deletes an empty bucket.
    pub(crate) fn delete_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        self.require_bucket(bucket)?;
        if !self.list_objects(bucket)?.is_empty() {
            return Err(S3Error::BucketNotEmpty {
                bucket: bucket.to_string(),
            });
        }
        self.delete_bucket_recursive(bucket)
    }

    /// Deletes a bucket with all its objects and unfinished multipart uploads.
    pub fn delete_bucket_recursive(&self, bucket: &str) -> Result<(), S3Error> {
        if let Some(r) = self.remote() {
            validate_bucket_name(bucket)?;
            return r.delete_bucket_recursive(bucket);
        }
        let dir = self.require_bucket(bucket)?;
        fs::remove_dir_all(&dir).map_err(io_err("delete bucket directory", &dir))?;
        let meta = self.inner.root.join(".meta").join(bucket);
        match fs::remove_dir_all(&meta) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete metadata directory", &meta)(e)),
        }
        let uploads = self.inner.root.join(".uploads");
        if let Ok(entries) = fs::read_dir(&uploads) {
            for e in entries.flatten() {
                if let Ok(info) = read_upload_info(&e.path())
                    && info.bucket == bucket
                {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Adds a restricted access key that may only use `buckets` (which need not exist
    /// yet). Persisted in `<root>/.farmgate-keys.json`.
    pub fn add_key(&self, creds: Credentials, buckets: Vec<String>) -> Result<(), S3Error> {
        check_credentials(&creds)?;
        for b in &buckets {
            validate_bucket_name(b)?;
        }
        let mut keys = self.keys_write();
        if creds.access_key == self.inner.admin.access_key || keys.contains_key(&creds.access_key) {
            return Err(S3Error::AccessKeyExists {
                access_key: creds.access_key,
            });
        }
        keys.insert(
            creds.access_key.clone(),
            KeyEntry {
                access_key: creds.access_key,
                secret_key: creds.secret_key,
                buckets,
            },
        );
        self.save_keys(&keys)
    }

    /// Removes a restricted access key; requests signed with it are refused from then on.
    pub fn remove_key(&self, access_key: &str) -> Result<(), S3Error> {
        let mut keys = self.keys_write();
        if keys.remove(access_key).is_none() {
            return Err(S3Error::NoSuchAccessKey {
                access_key: access_key.to_string(),
            });
        }
        self.save_keys(&keys)
    }

    fn keys_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, KeyEntry>> {
        self.inner
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The secret and identity of an access key, if known.
    pub(crate) fn lookup_key(&self, access_key: &str) -> Option<(String, Identity)> {
        if access_key == self.inner.admin.access_key {
            return Some((self.inner.admin.secret_key.clone(), Identity::Admin));
        }
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        keys.get(access_key).map(|k| {
            (
                k.secret_key.clone(),
                Identity::Restricted {
                    access_key: k.access_key.clone(),
                    buckets: k.buckets.clone(),
                },
            )
        })
    }

    fn save_keys(&self, keys: &HashMap<String, KeyEntry>) -> Result<(), S3Error> {
        let mut list: Vec<KeyEntry> = keys.values().cloned().collect();
        list.sort_by(|a, b| a.access_key.cmp(&b.access_key));
        let json =
            serde_json::to_vec_pretty(&KeysFile { keys: list }).map_err(|e| S3Error::KeysFile {
                path: self.inner.root.join(KEYS_FILE),
                reason: e.to_string(),
            })?;
        let path = self.inner.root.join(KEYS_FILE);
        let tmp = self.inner.root.join(format!("{KEYS_FILE}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(&json).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        Ok(())
    }

    /// Stores an object (for the gateway itself), atomically.
    pub fn put_object(&self, bucket: &str, key: &str, data: &[u8]) -> Result<(), S3Error> {
        if let Some(r) = self.remote() {
            validate_bucket_name(bucket)?;
            validate_key(key)?;
            return r.put_object(bucket, key, data);
        }
        self.object_path(bucket, key)?;
        self.require_bucket(bucket)?;
        let (tmp, mut file) = self.temp_file()?;
        let result = file
            .write_all(data)
            .map_err(io_err("write", &tmp))
            .and_then(|()| {
                let meta = ObjectMeta {
                    etag: hex::encode(Md5::digest(data)),
                    content_type: None,
                    headers: Vec::new(),
                };
                self.commit_object(&tmp, bucket, key, &meta)
            });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The keys and sizes of a bucket's objects, sorted by key.
    pub fn list_objects(&self, bucket: &str) -> Result<Vec<(String, u64)>, S3Error> {
        if let Some(r) = self.remote() {
            validate_bucket_name(bucket)?;
            return r.list_objects(bucket);
        }
        Ok(self
            .object_infos(bucket)?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect())
    }

    pub(crate) fn object_infos(&self, bucket: &str) -> Result<Vec<ObjectInfo>, S3Error> {
        let dir = self.require_bucket(bucket)?;
        let mut out = Vec::new();
        walk(&dir, "", &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Writes an object's content to `out`; returns the number of bytes written. Streams
    /// (never holds the whole object in memory), in both modes.
    pub fn read_object_to(
        &self,
        bucket: &str,
        key: &str,
        out: &mut dyn Write,
    ) -> Result<u64, S3Error> {
        validate_bucket_name(bucket)?;
        validate_key(key)?;
        if let Some(r) = self.remote() {
            return r.read_object_to(bucket, key, out);
        }
        let path = self.object_path(bucket, key)?;
        self.object_meta(bucket, key)?;
        let mut f = fs::File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => S3Error::NoSuchKey {
                bucket: bucket.to_string(),
                key: key.to_string(),
            },
            _ => io_err("open", &path)(e),
        })?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                return Ok(total);
            }
            out.write_all(&buf[..n]).map_err(|e| S3Error::Io {
                action: format!("write the content of object {bucket}/{key} to the output"),
                path: path.clone(),
                source: e,
            })?;
            total += n as u64;
        }
    }

    /// The file of an object: the bucket name and key are validated, and the path is
    /// always inside the root (whether or not the object exists). In remote mode objects
    /// are not on local disk: an [`S3Error::Remote`] (use [`S3Store::read_object_to`]).
    pub fn object_path(&self, bucket: &str, key: &str) -> Result<PathBuf, S3Error> {
        validate_bucket_name(bucket)?;
        validate_key(key)?;
        if let Some(r) = self.remote() {
            return Err(S3Error::Remote {
                url: r.url().to_string(),
                reason: format!(
                    "object {bucket}/{key} is in the external store, not on local disk \
                     (read it with read_object_to)"
                ),
            });
        }
        let path = self.inner.root.join(bucket).join(key);
        // Defence in depth: validation already rules these out.
        let escapes = Path::new(key)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)));
        if escapes || !path.starts_with(&self.inner.root) {
            return Err(S3Error::InvalidKey {
                key: key.to_string(),
                reason: "maps outside the bucket".to_string(),
            });
        }
        Ok(path)
    }

    pub(crate) fn meta_path(&self, bucket: &str, key: &str) -> Result<PathBuf, S3Error> {
        self.object_path(bucket, key)?;
        Ok(self.inner.root.join(".meta").join(bucket).join(key))
    }

    /// A new temporary file in `<root>/.tmp`.
    pub(crate) fn temp_file(&self) -> Result<(PathBuf, fs::File), S3Error> {
        let path = self.inner.root.join(".tmp").join(random_hex(16));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok((path, file))
    }

    /// Moves a finished temporary data file into place as `bucket/key` with `meta`.
    pub(crate) fn commit_object(
        &self,
        tmp: &Path,
        bucket: &str,
        key: &str,
        meta: &ObjectMeta,
    ) -> Result<(), S3Error> {
        let path = self.object_path(bucket, key)?;
        let meta_path = self.meta_path(bucket, key)?;
        self.require_bucket(bucket)?;
        let conflict = |reason: String| S3Error::KeyConflict {
            bucket: bucket.to_string(),
            key: key.to_string(),
            reason,
        };
        if path.is_dir() {
            return Err(conflict(format!(
                "objects with the prefix \"{key}/\" exist"
            )));
        }
        for p in [&path, &meta_path] {
            if let Some(parent) = p.parent()
                && let Err(e) = fs::create_dir_all(parent)
            {
                return Err(
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory
                    ) {
                        conflict("a prefix of it is an object".to_string())
                    } else {
                        io_err("create directory", parent)(e)
                    },
                );
            }
        }
        let json = serde_json::to_vec(meta).map_err(|e| S3Error::Io {
            action: "encode metadata".into(),
            path: meta_path.clone(),
            source: io::Error::other(e),
        })?;
        let (meta_tmp, mut f) = self.temp_file()?;
        f.write_all(&json).map_err(io_err("write", &meta_tmp))?;
        drop(f);
        if let Err(e) = fs::rename(&meta_tmp, &meta_path) {
            let _ = fs::remove_file(&meta_tmp);
            return Err(io_err("rename into place", &meta_path)(e));
        }
        fs::rename(tmp, &path).map_err(|e| {
            if path.is_dir() {
                conflict(format!("objects with the prefix \"{key}/\" exist"))
            } else {
                io_err("rename into place", &path)(e)
            }
        })?;
        Ok(())
    }

    /// The metadata and file facts of an object.
    pub(crate) fn object_meta(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectMeta, ObjectInfo), S3Error> {
        let path = self.object_path(bucket, key)?;
        self.require_bucket(bucket)?;
        let no_such = || S3Error::NoSuchKey {
            bucket: bucket.to_string(),
            key: key.to_string(),
        };
        let md = match fs::metadata(&path) {
            Ok(md) if md.is_file() => md,
            Ok(_) => return Err(no_such()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(no_such());
            }
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        let info = ObjectInfo {
            key: key.to_string(),
            size: md.len(),
            modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        };
        let meta_path = self.meta_path(bucket, key)?;
        let meta = match fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ObjectMeta>(&b).ok())
        {
            Some(m) => m,
            None => {
                // No (readable) metadata: an object placed by hand. Compute its ETag.
                let mut f = fs::File::open(&path).map_err(io_err("open", &path))?;
                let mut h = Md5::new();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf).map_err(io_err("read", &path))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                ObjectMeta {
                    etag: hex::encode(h.finalize()),
                    ..ObjectMeta::default()
                }
            }
        };
        Ok((meta, info))
    }

    /// Deletes an object (no error if it does not exist), and directories left empty.
    pub(crate) fn delete_object(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        let path = self.object_path(bucket, key)?;
        let meta_path = self.meta_path(bucket, key)?;
        let bucket_dir = self.require_bucket(bucket)?;
        if path.is_dir() {
            return Ok(());
        }
        for (p, top) in [
            (&path, bucket_dir),
            (&meta_path, self.inner.root.join(".meta").join(bucket)),
        ] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) => {}
                Err(e) => return Err(io_err("delete", p)(e)),
            }
            let mut dir = p.parent();
            while let Some(d) = dir {
                if d == top || !d.starts_with(&top) || fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
        }
        Ok(())
    }

    pub(crate) fn uploads_dir(&self) -> PathBuf {
        self.inner.root.join(".uploads")
    }
}

fn check_credentials(c: &Credentials) -> Result<(), S3Error> {
    let fail = |reason: &str| {
        Err(S3Error::InvalidCredentials {
            access_key: c.access_key.clone(),
            reason: reason.to_string(),
        })
    };
    if c.access_key.is_empty() || c.access_key.len() > 128 {
        return fail("the access key must be 1 to 128 characters");
    }
    if !c
        .access_key
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b',' | b'=' | b';'))
    {
        return fail("the access key must be printable ASCII without '/', ',', '=' or ';'");
    }
    if c.secret_key.is_empty() {
        return fail("the secret key is empty");
    }
    Ok(())
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), S3Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        // Removed meanwhile (a concurrent delete pruned it).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Ok(md) = entry.metadata() else { continue };
        let key = format!("{prefix}{name}");
        if md.is_dir() {
            walk(&entry.path(), &format!("{key}/"), out)?;
        } else if md.is_file() {
            out.push(ObjectInfo {
                key,
                size: md.len(),
                modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    Ok(())
}

/// The description of a multipart upload, `<root>/.uploads/<id>/info.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct UploadInfo {
    pub bucket: String,
    pub key: String,
    pub meta: ObjectMeta,
    pub initiated: chrono::DateTime<chrono::Utc>,
}

pub(crate) fn read_upload_info(dir: &Path) -> Result<UploadInfo, S3Error> {
    let path = dir.join("info.json");
    let bytes = fs::read(&path).map_err(io_err("read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| S3Error::Io {
        action: "parse".into(),
        path,
        source: io::Error::other(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in ["abc", "my-bucket.1", "0a0", &"a".repeat(63)] {
            assert!(validate_bucket_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "ABC",
            ".meta",
            "-ab",
            "ab-",
            "a..b",
            "a_b",
            "192.168.1.1",
            &"a".repeat(64),
            "a/b",
        ] {
            assert!(validate_bucket_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys() {
        for ok in ["a", "a/b/c", "..a", "a..", "x/.hidden", "sp ace+plus%"] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/a", "a//b", "a/", "..", "a/../b", "./a", "a/.", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_paths() {
        assert_eq!(parse_request_path("/").ok(), Some((None, None)));
        assert_eq!(
            parse_request_path("/bkt/").ok(),
            Some((Some("bkt".into()), None))
        );
        assert_eq!(
            parse_request_path("/bkt/a%20b/c").ok(),
            Some((Some("bkt".into()), Some("a b/c".into())))
        );
        for bad in [
            "/bkt/../x",
            "/bkt/%2e%2e/x",
            "/bkt/a/%2E%2E/%2e%2e/x",
            "/bkt/%2Fetc",
            "/../etc",
            "/bkt/a%00",
        ] {
            assert!(parse_request_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_shape() {
        let c = new_credentials();
        assert_eq!(c.access_key.len(), 20);
        assert_eq!(c.secret_key.len(), 40);
        assert!(check_credentials(&c).is_ok());
        assert_ne!(c, new_credentials());
    }
}
