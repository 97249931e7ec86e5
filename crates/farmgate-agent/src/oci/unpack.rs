//! Unpacking one layer (a tar, gzip or not) into a root file system, applying whiteouts,
//! with every path resolved inside the root.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead as _, BufReader, Read};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};

/// Why a layer could not be unpacked.
#[derive(Debug)]
pub(crate) enum UnpackError {
    /// The blob is zstd-compressed.
    Zstd,
    /// Anything else, as a message naming the entry.
    Other(String),
}

impl From<String> for UnpackError {
    fn from(s: String) -> UnpackError {
        UnpackError::Other(s)
    }
}

/// Most symlinks followed while resolving one path (Linux's limit).
const MAX_LINK_HOPS: usize = 40;
const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

/// A reader hashing what goes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the layer blob at `blob` into `root`; checks the uncompressed tar's digest
/// against `diff_id` when given (after unpacking: the compressed blob was already
/// verified, so this only catches a config that does not match its layers).
pub(crate) fn unpack_layer(
    root: &Path,
    blob: &Path,
    diff_id: Option<&str>,
) -> Result<(), UnpackError> {
    let file = fs::File::open(blob).map_err(|e| format!("opening {}: {e}", blob.display()))?;
    let mut buf = BufReader::with_capacity(256 * 1024, file);
    let magic = buf
        .fill_buf()
        .map_err(|e| format!("reading {}: {e}", blob.display()))?
        .to_vec();
    let reader: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buf))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(UnpackError::Zstd);
    } else {
        Box::new(buf)
    };
    let hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    let mut archive = tar::Archive::new(hashing);
    let mut u = Unpacker {
        root: root.to_path_buf(),
        is_root: effective_uid() == Some(0),
        created: HashSet::new(),
        dirs: Vec::new(),
    };
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the tar: {e}"))?;
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| format!("reading tar entry #{}: {e}", i + 1))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        u.entry(&mut entry)
            .map_err(|e| format!("tar entry {name:?}: {e}"))?;
    }
    u.finish_dirs()?;
    let mut hashing = archive.into_inner();
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| format!("reading the end of the tar: {e}"))?;
    if let Some(want) = diff_id {
        let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if got != want {
            return Err(format!(
                "uncompressed content has digest {got}, the config's diff_id says {want}"
            )
            .into());
        }
    }
    Ok(())
}

struct DirMeta {
    path: PathBuf,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

struct Unpacker {
    root: PathBuf,
    is_root: bool,
    /// Paths created by this layer (kept by an opaque whiteout).
    created: HashSet<PathBuf>,
    /// Directories whose metadata is set once the layer is done.
    dirs: Vec<DirMeta>,
}

/// The normal components of an in-archive path; absolute paths and `..` are refused.
fn clean(p: &Path, what: &str) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{what} {p:?} is absolute: refused"));
            }
            Component::ParentDir => {
                return Err(format!("{what} {p:?} has a '..' component: refused"));
            }
        }
    }
    Ok(out)
}

fn io_err(what: &str, p: &Path) -> impl Fn(io::Error) -> String {
    let msg = format!("{what} {}", p.display());
    move |e| format!("{msg}: {e}")
}

impl Unpacker {
    /// `root` joined with `comps`, every symlink met resolved as if `root` were `/`
    /// (never leaving it); components that do not exist are taken as they are.
    fn resolve(&self, comps: &[OsString]) -> Result<PathBuf, String> {
        let mut done: Vec<OsString> = Vec::new();
        let mut todo: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                done.pop();
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let mut p = self.root.clone();
            p.extend(&done);
            p.push(&c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(format!("too many symlinks resolving {}", p.display()));
                    }
                    let target = fs::read_link(&p).map_err(io_err("reading link", &p))?;
                    if target.is_absolute() {
                        done.clear();
                    }
                    for (i, tc) in target
                        .components()
                        .filter_map(|tc| match tc {
                            Component::Normal(n) => Some(n.to_owned()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .enumerate()
                    {
                        todo.insert(i, tc);
                    }
                }
                _ => done.push(c),
            }
        }
        let mut p = self.root.clone();
        p.extend(&done);
        Ok(p)
    }

    /// The parent directory of `comps` resolved within the root (created if missing when
    /// `create`), and the last component.
    fn parent_of(&self, comps: &[OsString], create: bool) -> Result<(PathBuf, OsString), String> {
        let (last, parents) = comps.split_last().ok_or_else(|| "empty path".to_owned())?;
        let parent = self.resolve(parents)?;
        if create && !parent.is_dir() {
            fs::create_dir_all(&parent).map_err(io_err("creating directory", &parent))?;
        }
        Ok((parent, last.clone()))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), String> {
        let path = entry
            .path()
            .map_err(|e| format!("bad path: {e}"))?
            .into_owned();
        let comps = clean(&path, "path")?;
        let kind = entry.header().entry_type();
        if comps.is_empty() {
            // The archive's root (`./`): the destination itself is left as it is.
            return Ok(());
        }
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let whiteout = comps
            .last()
            .is_some_and(|n| n.to_string_lossy().starts_with(WHITEOUT));
        let (parent, name) = self.parent_of(&comps, !whiteout)?;
        let name_str = name.to_string_lossy();
        if whiteout {
            if !parent.is_dir() {
                return Ok(());
            }
            if name_str == OPAQUE {
                return self.opaque(&parent);
            }
            let victim = &name_str[WHITEOUT.len()..];
            if victim.is_empty() || victim == "." || victim == ".." || victim.contains('/') {
                return Err(format!("bad whiteout name {name_str:?}"));
            }
            return remove_any(&parent.join(victim));
        }
        let target = parent.join(&name);
        let header = entry.header();
        let mode = header.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
        let uid = header.uid().map_err(|e| format!("bad uid: {e}"))?;
        let gid = header.gid().map_err(|e| format!("bad gid: {e}"))?;
        let mtime = header.mtime().unwrap_or(0);

        // What is at the target is replaced, except a directory by a directory.
        let existing = fs::symlink_metadata(&target).ok();
        let keep_dir =
            kind == tar::EntryType::Directory && existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !keep_dir {
            remove_any(&target)?;
        }
        self.created.insert(target.clone());
        match kind {
            tar::EntryType::Directory => {
                if !keep_dir {
                    fs::create_dir(&target).map_err(io_err("creating directory", &target))?;
                }
                self.dirs.push(DirMeta {
                    path: target,
                    mode,
                    uid,
                    gid,
                    mtime,
                });
                return Ok(());
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err("creating", &target))?;
                io::copy(entry, &mut f).map_err(io_err("writing", &target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| format!("bad link name: {e}"))?
                    .ok_or_else(|| "symlink without a target".to_owned())?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(io_err("creating symlink", &target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| format!("bad link name: {e}"))?
                    .ok_or_else(|| "hard link without a target".to_owned())?
                    .into_owned();
                let lc = clean(&link, "hard link target")?;
                let (lparent, lname) = self.parent_of(&lc, false)?;
                let source = lparent.join(lname);
                let m = fs::symlink_metadata(&source).map_err(|e| {
                    format!("hard link target {link:?} is not in the root file system: {e}")
                })?;
                if m.is_dir() {
                    return Err(format!("hard link target {link:?} is a directory"));
                }
                fs::hard_link(&source, &target).map_err(io_err("creating hard link", &target))?;
                // A hard link shares its target's inode and metadata.
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                if !self.is_root {
                    tracing::warn!(
                        "skipping device node {} (not running as root)",
                        path.display()
                    );
                    self.created.remove(&target);
                    return Ok(());
                }
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let sflag = if kind == tar::EntryType::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                mknod(
                    &target,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(|e| format!("creating device node {}: {e}", target.display()))?;
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(&target, Mode::from_bits_truncate(0o600))
                    .map_err(|e| format!("creating FIFO {}: {e}", target.display()))?;
            }
            other => {
                tracing::warn!("skipping tar entry {} of type {other:?}", path.display());
                self.created.remove(&target);
                return Ok(());
            }
        }
        self.set_meta(
            &target,
            kind == tar::EntryType::Symlink,
            mode,
            uid,
            gid,
            mtime,
        )
    }

    /// Ownership (as root), mode (not on symlinks), mtime.
    fn set_meta(
        &self,
        p: &Path,
        symlink: bool,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Result<(), String> {
        if self.is_root {
            let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?;
            let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?;
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))
                .map_err(io_err("changing owner of", p))?;
        }
        if !symlink {
            // After chown, which clears setuid/setgid.
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .map_err(io_err("changing mode of", p))?;
        }
        let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
        utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| format!("setting mtime of {}: {e}", p.display()))?;
        Ok(())
    }

    /// Removes what lower layers put in `dir` (entries of this layer stay).
    fn opaque(&self, dir: &Path) -> Result<(), String> {
        let rd = fs::read_dir(dir).map_err(io_err("listing", dir))?;
        for ent in rd {
            let ent = ent.map_err(io_err("listing", dir))?;
            let p = ent.path();
            if !self.created.contains(&p) {
                remove_any(&p)?;
            }
        }
        Ok(())
    }

    /// Sets the directories' metadata, deepest first (writing in a directory changes its
    /// mtime, a read-only mode would block writes).
    fn finish_dirs(&mut self) -> Result<(), String> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
        for d in &dirs {
            // A later entry of the layer may have replaced it with something else.
            if fs::symlink_metadata(&d.path).is_ok_and(|m| m.is_dir()) {
                self.set_meta(&d.path, false, d.mode, d.uid, d.gid, d.mtime)?;
            }
        }
        Ok(())
    }
}

/// Removes `p` whatever it is (a directory with its content; a symlink itself, never what
/// it points to); missing is fine.
fn remove_any(p: &Path) -> Result<(), String> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("examining {}: {e}", p.display())),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err("removing", p)),
        Ok(_) => fs::remove_file(p).map_err(io_err("removing", p)),
    }
}

/// The process's effective uid, from `/proc/self/status` (`Uid: real effective …`).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
