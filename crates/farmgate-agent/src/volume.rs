//! Volumes mirrored with S3 buckets (`b2c.volume=…,mirror=alias/bucket,…` and
//! `b2c.minio=alias,url,key,secret`), boot2container's semantics (it runs `mc mirror`):
//!
//! - `pull_from=`/`push_to=`/`mirror=`: the bucket (and optional key prefix) the volume's
//!   directory is filled from / copied to; a key `prefix/a/b` is the file `a/b`;
//! - a pull copies objects absent locally; a push uploads files absent remotely. An object
//!   (file) present on both sides and different (other size, or the source is newer — or,
//!   for what this mirror transferred itself, the source changed since) is replaced only
//!   with `overwrite`; otherwise it is left and listed in [`SyncReport::skipped`];
//! - `remove`: the destination's files (objects) missing from the source are deleted;
//!   without it nothing is ever deleted;
//! - `exclude=<glob>` (repeatable): paths relative to the volume (`*` also matches `/`) left
//!   out on both sides — neither copied nor removed;
//! - `pull_on=`/`push_on=` triggers: see [`VolumeMirror::on`]. `changes` means mirroring
//!   continuously while the pipeline runs ([`VolumeMirror::start_watch`], polling the
//!   directory every second and uploading files once they stopped changing for one poll;
//!   for `pull_on=changes` the bucket is polled), with a final push when the pipeline ends;
//!   the other triggers of that direction are then ignored;
//! - `expiration=pipeline_end`: boot2container removes the (cached, local) volume when the
//!   pipeline ends; here [`VolumeMirror::on`]`(PipelineEnd)` empties the directory after the
//!   final push. The bucket is left alone (the gateway deletes job buckets at teardown).
//!
//! Not implemented: `preserve` (mc's attribute metadata; pulled files get the object's
//! `LastModified` as mtime either way), `encrypt_key` (SSE-C) and the fscrypt options.

mod s3;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use s3::{ObjectEntry, PayloadSigning, S3Client};

use crate::cmdline::{Expiration, MinioAlias, Trigger, Volume};

/// What went wrong while mirroring; S3 errors name the alias, bucket, key and the store's
/// error code and message.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume or alias configuration cannot be used.
    #[error("{message}")]
    Config {
        /// What is wrong, naming the volume or alias.
        message: String,
    },
    /// The store answered with an error.
    #[error("{0}")]
    S3(Box<S3Failure>),
    /// The request could not be sent or its answer not read.
    #[error("S3 {op} on alias {alias:?}, bucket {bucket:?}, key {key:?}: {message}")]
    Http {
        /// The S3 operation.
        op: &'static str,
        /// The `b2c.minio` alias.
        alias: String,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The transport error.
        message: String,
    },
    /// The store's answer is not what S3 answers.
    #[error("S3 {op} on alias {alias:?}, bucket {bucket:?}, key {key:?}: {message}")]
    Protocol {
        /// The S3 operation.
        op: &'static str,
        /// The `b2c.minio` alias.
        alias: String,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What is wrong with the answer.
        message: String,
    },
    /// A local file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// An error answer of the S3 store, with what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "S3 {op} on alias {alias:?}, bucket {bucket:?}, key {key:?} failed: {code} (HTTP {status}): {message}"
)]
pub struct S3Failure {
    /// The S3 operation.
    pub op: &'static str,
    /// The `b2c.minio` alias.
    pub alias: String,
    /// The bucket.
    pub bucket: String,
    /// The key (or prefix; empty for bucket operations).
    pub key: String,
    /// HTTP status.
    pub status: u16,
    /// The S3 error code (`AccessDenied`, `NoSuchBucket`…).
    pub code: String,
    /// The store's message.
    pub message: String,
}

impl VolumeError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
        let path = path.to_path_buf();
        move |source| VolumeError::Io {
            action,
            path,
            source,
        }
    }
}

/// What a pull or push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Paths (relative to the volume) copied.
    pub copied: Vec<String>,
    /// Paths deleted at the destination (`remove`).
    pub deleted: Vec<String>,
    /// Paths left alone, with the reason (differs but no `overwrite`, unusable key…).
    pub skipped: Vec<(String, String)>,
    /// Bytes copied.
    pub bytes: u64,
    /// Errors of background (`changes`) syncs, which went on after them.
    pub errors: Vec<String>,
}

impl SyncReport {
    fn merge(&mut self, other: SyncReport) {
        self.copied.extend(other.copied);
        self.deleted.extend(other.deleted);
        self.skipped.extend(other.skipped);
        self.bytes += other.bytes;
        self.errors.extend(other.errors);
    }
}

/// A bucket and key prefix of an alias.
#[derive(Debug, Clone)]
struct Location {
    client: S3Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
}

impl Location {
    fn new(
        volume: &str,
        what: &str,
        path: &crate::cmdline::BucketPath,
        aliases: &[MinioAlias],
    ) -> Result<Self, VolumeError> {
        let alias = aliases
            .iter()
            .find(|a| a.alias == path.alias)
            .ok_or_else(|| VolumeError::Config {
                message: format!(
                    "volume {volume:?}: {what} refers to alias {:?}, which no b2c.minio defines",
                    path.alias
                ),
            })?;
        let (bucket, prefix) = path.path.split_once('/').unwrap_or((&path.path, ""));
        if bucket.is_empty() {
            return Err(VolumeError::Config {
                message: format!(
                    "volume {volume:?}: {what} {}/{} has no bucket",
                    path.alias, path.path
                ),
            });
        }
        let prefix = prefix.trim_matches('/');
        Ok(Location {
            client: S3Client::new(alias)?,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }

    /// The volume-relative path of a key, or why it cannot be one.
    fn rel_of(&self, key: &str) -> Result<String, String> {
        let rel = key
            .strip_prefix(&self.prefix)
            .ok_or_else(|| "outside the prefix".to_string())?;
        if rel.is_empty() || rel.ends_with('/') {
            return Err("a directory marker".into());
        }
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
        {
            return Err("has an empty, `.` or `..` path component".into());
        }
        if rel
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
        {
            return Err("a name farm-agent uses for partial downloads".into());
        }
        Ok(rel.to_string())
    }
}

/// Name prefix of files being downloaded (ignored by scans).
const TMP_PREFIX: &str = ".farmgate-part-";

/// Size and modification time of a local file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: SystemTime,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Regular files by relative path, and the entries left out with the reason.
type Scan = (BTreeMap<String, Stamp>, Vec<(String, String)>);

/// Regular files under `root` by relative path (symlinks, special files and partial
/// downloads left out; non-UTF-8 names reported).
fn scan(root: &Path) -> Result<Scan, VolumeError> {
    let mut files = BTreeMap::new();
    let mut skipped = Vec::new();
    if !root.exists() {
        return Ok((files, skipped));
    }
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(VolumeError::io("read the directory", &dir))? {
            let entry = entry.map_err(VolumeError::io("read the directory", &dir))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                skipped.push((path.display().to_string(), "the name is not UTF-8".into()));
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Removed since read_dir: not there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(VolumeError::io("stat", &path)(e)),
            };
            if meta.is_dir() {
                stack.push((path, child));
            } else if meta.is_file() {
                let mtime = meta.modified().map_err(VolumeError::io("stat", &path))?;
                files.insert(
                    child,
                    Stamp {
                        size: meta.len(),
                        mtime,
                    },
                );
            }
        }
    }
    Ok((files, skipped))
}

/// What this mirror last transferred: the local file's stamp and the object's ETag.
type Synced = HashMap<String, (Stamp, String)>;

struct Inner {
    name: String,
    dir: PathBuf,
    pull_from: Option<Location>,
    push_to: Option<Location>,
    overwrite: bool,
    remove: bool,
    excludes: Vec<glob::Pattern>,
    signing: PayloadSigning,
    synced: Mutex<Synced>,
    /// One pull or push at a time (the watcher and [`VolumeMirror::on`]).
    busy: tokio::sync::Mutex<()>,
}

/// The running `changes` watcher.
struct Watch {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<SyncReport>,
}

/// A volume's directory kept in sync with its bucket(s), as its `b2c.volume` says.
pub struct VolumeMirror {
    inner: Arc<Inner>,
    pull_on: BTreeSet<Trigger>,
    push_on: BTreeSet<Trigger>,
    expiration: Expiration,
    poll: Duration,
    watch: Option<Watch>,
}

impl std::fmt::Debug for VolumeMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeMirror")
            .field("name", &self.inner.name)
            .field("dir", &self.inner.dir)
            .field("pull_on", &self.pull_on)
            .field("push_on", &self.push_on)
            .field("watching", &self.watch.is_some())
            .finish()
    }
}

impl Drop for VolumeMirror {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.task.abort();
        }
    }
}

fn lock(m: &Mutex<Synced>) -> std::sync::MutexGuard<'_, Synced> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Whether a path present on both sides is copied: when it `differs` and `overwrite`
    /// allows it (a difference without `overwrite` is listed as skipped).
    fn replaces(&self, rel: &str, differs: bool, report: &mut SyncReport) -> bool {
        if differs && !self.overwrite {
            report.skipped.push((
                rel.to_string(),
                "differs from the object and the volume has no `overwrite`".into(),
            ));
        }
        differs && self.overwrite
    }

    fn excluded(&self, rel: &str) -> bool {
        self.excludes.iter().any(|p| p.matches(rel))
    }

    async fn scan(&self) -> Result<Scan, VolumeError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || scan(&dir))
            .await
            .map_err(|e| VolumeError::Config {
                message: format!("volume {:?}: the directory scan failed: {e}", self.name),
            })?
    }

    /// Remote objects by relative path; unusable keys go to `skipped`.
    async fn remote(
        &self,
        loc: &Location,
        skipped: &mut Vec<(String, String)>,
    ) -> Result<BTreeMap<String, ObjectEntry>, VolumeError> {
        let mut out = BTreeMap::new();
        for o in loc.client.list_objects(&loc.bucket, &loc.prefix).await? {
            match loc.rel_of(&o.key) {
                Ok(rel) => {
                    out.insert(rel, o);
                }
                Err(why) if o.key.ends_with('/') => {
                    let _ = why;
                }
                Err(why) => {
                    skipped.push((o.key.clone(), format!("object key not mirrored: {why}")))
                }
            }
        }
        Ok(out)
    }

    async fn pull(&self) -> Result<SyncReport, VolumeError> {
        let Some(loc) = &self.pull_from else {
            return Ok(SyncReport::default());
        };
        let _busy = self.busy.lock().await;
        let mut report = SyncReport::default();
        let remote = self.remote(loc, &mut report.skipped).await?;
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(VolumeError::io("create the volume directory", &self.dir))?;
        let (local, skipped) = self.scan().await?;
        report.skipped.extend(skipped);
        for (rel, obj) in &remote {
            if self.excluded(rel) {
                continue;
            }
            if let Some(l) = local.get(rel) {
                let synced = lock(&self.synced).get(rel).cloned();
                let differs = match synced {
                    Some((s, _)) if s == *l => synced.is_some_and(|(_, e)| e != obj.etag),
                    _ => l.size != obj.size || secs(obj.last_modified) > secs(l.mtime),
                };
                if !self.replaces(rel, differs, &mut report) {
                    continue;
                }
            }
            let stamp = self.download(loc, rel, obj).await?;
            lock(&self.synced).insert(rel.clone(), (stamp, obj.etag.clone()));
            report.copied.push(rel.clone());
            report.bytes += obj.size;
        }
        if self.remove {
            for rel in local.keys() {
                if remote.contains_key(rel) || self.excluded(rel) {
                    continue;
                }
                let path = self.dir.join(rel);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(VolumeError::io("remove", &path)(e)),
                }
                lock(&self.synced).remove(rel);
                report.deleted.push(rel.clone());
            }
        }
        Ok(report)
    }

    /// Downloads an object to its file (through a partial file renamed into place), with
    /// the object's `LastModified` as mtime; the file's new stamp.
    async fn download(
        &self,
        loc: &Location,
        rel: &str,
        obj: &ObjectEntry,
    ) -> Result<Stamp, VolumeError> {
        let dest = self.dir.join(rel);
        let parent = dest.parent().unwrap_or(&self.dir).to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(VolumeError::io("create the directory", &parent))?;
        let file_name = rel.rsplit('/').next().unwrap_or(rel);
        let tmp = parent.join(format!("{TMP_PREFIX}{file_name}"));
        let result = async {
            loc.client
                .get_object_to_file(&loc.bucket, &obj.key, &tmp)
                .await?;
            let t = tmp.clone();
            let mtime = obj.last_modified;
            tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&t)
                    .and_then(|f| f.set_modified(mtime))
            })
            .await
            .map_err(|e| VolumeError::Config {
                message: format!(
                    "volume {:?}: setting the mtime of {rel} failed: {e}",
                    self.name
                ),
            })?
            .map_err(VolumeError::io("set the modification time of", &tmp))?;
            tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(VolumeError::io("rename into place", &dest))?;
            let meta = tokio::fs::metadata(&dest)
                .await
                .map_err(VolumeError::io("stat", &dest))?;
            Ok(Stamp {
                size: meta.len(),
                mtime: meta.modified().map_err(VolumeError::io("stat", &dest))?,
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Pushes; paths in `changed` are known to have changed (the watcher saw them).
    async fn push(&self, changed: &BTreeSet<String>) -> Result<SyncReport, VolumeError> {
        let Some(loc) = &self.push_to else {
            return Ok(SyncReport::default());
        };
        let _busy = self.busy.lock().await;
        let mut report = SyncReport::default();
        let remote = self.remote(loc, &mut report.skipped).await?;
        let (local, skipped) = self.scan().await?;
        report.skipped.extend(skipped);
        for (rel, l) in &local {
            if self.excluded(rel) {
                continue;
            }
            if let Some(obj) = remote.get(rel) {
                let synced = lock(&self.synced).get(rel).cloned();
                let differs = changed.contains(rel)
                    || match synced {
                        Some((s, etag)) if etag == obj.etag => s != *l,
                        _ => l.size != obj.size || secs(l.mtime) > secs(obj.last_modified),
                    };
                if !self.replaces(rel, differs, &mut report) {
                    continue;
                }
            }
            let key = format!("{}{rel}", loc.prefix);
            let path = self.dir.join(rel);
            let etag = match loc
                .client
                .put_object_from_file(&loc.bucket, &key, &path, self.signing)
                .await
            {
                Ok(etag) => etag,
                // Deleted since the scan: nothing to push.
                Err(VolumeError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            lock(&self.synced).insert(rel.clone(), (*l, etag));
            report.copied.push(rel.clone());
            report.bytes += l.size;
        }
        if self.remove {
            for (rel, obj) in &remote {
                if local.contains_key(rel) || self.excluded(rel) {
                    continue;
                }
                loc.client.delete_object(&loc.bucket, &obj.key).await?;
                lock(&self.synced).remove(rel);
                report.deleted.push(rel.clone());
            }
        }
        Ok(report)
    }
}

impl VolumeMirror {
    /// The mirror of `volume` in the directory `dir`, with the endpoints of `aliases`
    /// (`b2c.minio`). Errors name the volume and what of its configuration is unusable
    /// (unknown alias, bad URL, bad exclude pattern).
    pub fn new(
        volume: &Volume,
        aliases: &[MinioAlias],
        dir: impl Into<PathBuf>,
    ) -> Result<Self, VolumeError> {
        let name = &volume.name;
        let location = |what: &str, p: &Option<crate::cmdline::BucketPath>| {
            p.as_ref()
                .map(|p| Location::new(name, what, p, aliases))
                .transpose()
        };
        let excludes = volume
            .exclude
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| VolumeError::Config {
                    message: format!("volume {name:?}: exclude={p:?} is not a valid pattern: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VolumeMirror {
            inner: Arc::new(Inner {
                name: name.clone(),
                dir: dir.into(),
                pull_from: location("pull_from", &volume.pull_from)?,
                push_to: location("push_to", &volume.push_to)?,
                overwrite: volume.overwrite,
                remove: volume.remove,
                excludes,
                signing: PayloadSigning::Unsigned,
                synced: Mutex::new(Synced::new()),
                busy: tokio::sync::Mutex::new(()),
            }),
            pull_on: volume.pull_on.clone(),
            push_on: volume.push_on.clone(),
            expiration: volume.expiration,
            poll: Duration::from_secs(1),
            watch: None,
        })
    }

    /// How uploads are signed (default [`PayloadSigning::Unsigned`]); before any sync.
    pub fn set_payload_signing(&mut self, signing: PayloadSigning) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.signing = signing;
        }
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Copies the `pull_from` location into the directory (nothing without one).
    pub async fn pull(&self) -> Result<SyncReport, VolumeError> {
        self.inner.pull().await
    }

    /// Copies the directory to the `push_to` location (nothing without one).
    pub async fn push(&self) -> Result<SyncReport, VolumeError> {
        self.inner.push(&BTreeSet::new()).await
    }

    fn push_watched(&self) -> bool {
        self.inner.push_to.is_some() && self.push_on.contains(&Trigger::Changes)
    }

    fn pull_watched(&self) -> bool {
        self.inner.pull_from.is_some() && self.pull_on.contains(&Trigger::Changes)
    }

    /// Does what the volume's `pull_on`/`push_on` ask at `trigger`:
    /// - start triggers pull then push, end triggers push then pull (so that `remove`
    ///   never deletes what a container just wrote before it is pushed);
    /// - with `changes` in a direction, that direction's other triggers are ignored:
    ///   `PipelineStart` does the initial sync and starts the watcher
    ///   ([`VolumeMirror::start_watch`]), `PipelineEnd` stops it, with a final push;
    /// - `PipelineEnd` with `expiration=pipeline_end` then empties the directory.
    ///
    /// `Trigger::Changes` itself does nothing.
    pub async fn on(&mut self, trigger: Trigger) -> Result<SyncReport, VolumeError> {
        let mut report = SyncReport::default();
        let pull_now = self.inner.pull_from.is_some()
            && if self.pull_watched() {
                trigger == Trigger::PipelineStart
            } else {
                self.pull_on.contains(&trigger)
            };
        let push_now =
            self.inner.push_to.is_some() && !self.push_watched() && self.push_on.contains(&trigger);
        match trigger {
            Trigger::Changes => {}
            Trigger::PipelineStart | Trigger::ContainerStart => {
                if pull_now {
                    report.merge(self.pull().await?);
                }
                if push_now {
                    report.merge(self.push().await?);
                }
                if trigger == Trigger::PipelineStart && (self.push_watched() || self.pull_watched())
                {
                    self.start_watch();
                }
            }
            Trigger::ContainerEnd | Trigger::PipelineEnd => {
                if trigger == Trigger::PipelineEnd {
                    report.merge(self.stop_watch().await?);
                }
                if push_now {
                    report.merge(self.push().await?);
                }
                if pull_now {
                    report.merge(self.pull().await?);
                }
                if trigger == Trigger::PipelineEnd && self.expiration == Expiration::PipelineEnd {
                    self.expire().await?;
                }
            }
        }
        Ok(report)
    }

    /// Starts mirroring continuously (`changes`): every second the directory is scanned and
    /// files that changed and then stayed the same for one poll are pushed (with the usual
    /// `overwrite`/`remove` rules); with `pull_on=changes` the bucket is pulled each poll.
    /// Errors of a poll are logged, kept for [`VolumeMirror::stop_watch`], and the next
    /// poll tries again. Does nothing when already watching. Needs a tokio runtime.
    pub fn start_watch(&mut self) {
        if self.watch.is_some() {
            return;
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let inner = self.inner.clone();
        let poll = self.poll;
        let push = self.push_watched();
        let pull = self.pull_watched();
        let task = tokio::spawn(async move {
            let mut report = SyncReport::default();
            let mut previous: Option<BTreeMap<String, Stamp>> = None;
            // Stamps already tried (so a file refused for want of `overwrite` is not
            // retried every poll).
            let mut attempted: HashMap<String, Stamp> = HashMap::new();
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticker.tick() => {}
                }
                if pull {
                    match inner.pull().await {
                        Ok(r) => report.merge(r),
                        Err(e) => {
                            tracing::warn!(volume = %inner.name, "pull while watching: {e}");
                            report.errors.push(e.to_string());
                        }
                    }
                }
                if !push {
                    continue;
                }
                let current = match inner.scan().await {
                    Ok((files, _)) => files,
                    Err(e) => {
                        report.errors.push(e.to_string());
                        continue;
                    }
                };
                let Some(prev) = previous.replace(current.clone()) else {
                    // First poll: the initial mirror.
                    match inner.push(&BTreeSet::new()).await {
                        Ok(r) => report.merge(r),
                        Err(e) => {
                            tracing::warn!(volume = %inner.name, "push while watching: {e}");
                            report.errors.push(e.to_string());
                        }
                    }
                    continue;
                };
                let synced = lock(&inner.synced).clone();
                let changed: BTreeSet<String> = current
                    .iter()
                    .filter(|(rel, s)| {
                        prev.get(*rel) == Some(*s)
                            && synced.get(*rel).map(|(st, _)| st) != Some(*s)
                            && attempted.get(*rel) != Some(*s)
                            && !inner.excluded(rel)
                    })
                    .map(|(rel, _)| rel.clone())
                    .collect();
                let removed = inner.remove
                    && synced
                        .keys()
                        .any(|rel| !current.contains_key(rel) && !prev.contains_key(rel));
                if changed.is_empty() && !removed {
                    continue;
                }
                for rel in &changed {
                    if let Some(s) = current.get(rel) {
                        attempted.insert(rel.clone(), *s);
                    }
                }
                match inner.push(&changed).await {
                    Ok(r) => report.merge(r),
                    Err(e) => {
                        tracing::warn!(volume = %inner.name, "push while watching: {e}");
                        report.errors.push(e.to_string());
                        // Try these again at the next poll.
                        for rel in &changed {
                            attempted.remove(rel);
                        }
                    }
                }
            }
            report
        });
        self.watch = Some(Watch { stop, task });
    }

    /// Whether the `changes` watcher runs.
    pub fn watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Stops the watcher (if any) and, when pushing on `changes`, pushes a last time; the
    /// report of everything the watcher did (its errors in [`SyncReport::errors`]).
    pub async fn stop_watch(&mut self) -> Result<SyncReport, VolumeError> {
        let Some(w) = self.watch.take() else {
            return Ok(SyncReport::default());
        };
        let _ = w.stop.send(());
        let mut report = w.task.await.map_err(|e| VolumeError::Config {
            message: format!("volume {:?}: the watcher task failed: {e}", self.inner.name),
        })?;
        if self.push_watched() {
            report.merge(self.push().await?);
        }
        Ok(report)
    }

    /// `expiration=pipeline_end`: empties the volume's directory (the directory stays).
    pub async fn expire(&self) -> Result<(), VolumeError> {
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(VolumeError::io("read the directory", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(VolumeError::io("read the directory", &dir))?;
                let path = entry.path();
                let is_dir = entry
                    .file_type()
                    .map_err(VolumeError::io("stat", &path))?
                    .is_dir();
                if is_dir {
                    std::fs::remove_dir_all(&path).map_err(VolumeError::io("remove", &path))?;
                } else {
                    std::fs::remove_file(&path).map_err(VolumeError::io("remove", &path))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| VolumeError::Config {
            message: format!(
                "volume {:?}: emptying the directory failed: {e}",
                self.inner.name
            ),
        })??;
        lock(&self.inner.synced).clear();
        Ok(())
    }
}
