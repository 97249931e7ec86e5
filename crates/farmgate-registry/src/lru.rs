//! Size bound of the blob store, least-recently-used first.
//!
//! The index knows every complete blob under `blobs/sha256/` with its size and the time it
//! was last fetched or served. That time is also the file's mtime (set on every GET served
//! from the cache), so the order survives a restart: [`BlobIndex::scan`] rebuilds it from
//! the files. Manifests are not counted and never evicted (they are small and tags point at
//! them).
//!
//! Blobs in use are pinned: a client streaming a cached blob, or waiting on / reading a
//! download, holds a [`Pin`] until its body is dropped, and eviction skips pinned blobs.
//! Downloads in progress live in `tmp/` and are not in the index, so they are never
//! evicted; their size counts once they are installed. Victims are chosen and unlinked
//! under the index lock, and a pin on a complete blob is only taken under that lock after
//! checking the blob is still indexed, so no client ever opens a blob that is being
//! deleted. (A client that already has a file open would keep reading it after an unlink on
//! Linux, but the cache does not rely on that: pinned files are not unlinked.) The bound
//! can be exceeded while the blobs over it are pinned; the next eviction catches up.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::RegistryError;

struct Entry {
    size: u64,
    used: SystemTime,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    total: u64,
    pins: HashMap<String, usize>,
}

/// The complete blobs, their sizes and recency.
pub(crate) struct BlobIndex {
    max: Option<u64>,
    state: Mutex<State>,
}

/// Keeps a blob from being evicted while it is alive.
pub(crate) struct Pin {
    index: Arc<BlobIndex>,
    hex: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.index.lock();
        if let Some(n) = st.pins.get_mut(&self.hex) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(&self.hex);
            }
        }
    }
}

/// What an eviction removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub(crate) blobs: u64,
    pub(crate) bytes: u64,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl BlobIndex {
    /// Indexes the blobs under `<dir>/blobs/sha256/<2 hex>/<64 hex>` by their size and mtime.
    /// Files with other names are left alone and not counted.
    pub(crate) fn scan(dir: &Path, max: Option<u64>) -> Result<BlobIndex, RegistryError> {
        let root = dir.join("blobs/sha256");
        let mut st = State::default();
        let list = |p: &Path| {
            std::fs::read_dir(p).map_err(|source| RegistryError::Io {
                action: "list",
                path: p.to_owned(),
                source,
            })
        };
        for sub in list(&root)? {
            let sub = sub.map_err(|source| RegistryError::Io {
                action: "list",
                path: root.clone(),
                source,
            })?;
            let sub_name = sub.file_name();
            let Some(prefix) = sub_name.to_str().filter(|n| is_hex(n, 2)) else {
                continue;
            };
            let sub_path = sub.path();
            if !sub_path.is_dir() {
                continue;
            }
            for f in list(&sub_path)? {
                let f = f.map_err(|source| RegistryError::Io {
                    action: "list",
                    path: sub_path.clone(),
                    source,
                })?;
                let name = f.file_name();
                let Some(hex) = name
                    .to_str()
                    .filter(|n| is_hex(n, 64) && n.starts_with(prefix))
                else {
                    continue;
                };
                let p = f.path();
                let meta = std::fs::metadata(&p).map_err(|source| RegistryError::Io {
                    action: "stat",
                    path: p.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    continue;
                }
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                st.total += meta.len();
                st.entries.insert(
                    hex.to_owned(),
                    Entry {
                        size: meta.len(),
                        used,
                    },
                );
            }
        }
        Ok(BlobIndex {
            max,
            state: Mutex::new(st),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `hex` whether or not it is complete (a download being joined).
    pub(crate) fn pin(self: &Arc<Self>, hex: &str) -> Pin {
        let mut st = self.lock();
        *st.pins.entry(hex.to_owned()).or_default() += 1;
        Pin {
            index: self.clone(),
            hex: hex.to_owned(),
        }
    }

    /// Pins `hex` if it is a complete blob; `touch` makes it the most recently used.
    pub(crate) fn pin_present(self: &Arc<Self>, hex: &str, touch: bool) -> Option<Pin> {
        let mut st = self.lock();
        let e = st.entries.get_mut(hex)?;
        if touch {
            e.used = SystemTime::now();
        }
        *st.pins.entry(hex.to_owned()).or_default() += 1;
        Some(Pin {
            index: self.clone(),
            hex: hex.to_owned(),
        })
    }

    /// Records a blob just installed (used now).
    pub(crate) fn insert(&self, hex: &str, size: u64) {
        let mut st = self.lock();
        let old = st.entries.insert(
            hex.to_owned(),
            Entry {
                size,
                used: SystemTime::now(),
            },
        );
        st.total = st.total - old.map_or(0, |e| e.size) + size;
    }

    /// Forgets a blob whose file disappeared behind the cache's back.
    pub(crate) fn forget(&self, hex: &str) {
        let mut st = self.lock();
        if let Some(e) = st.entries.remove(hex) {
            st.total -= e.size;
        }
    }

    /// Bytes of complete blobs.
    pub(crate) fn total(&self) -> u64 {
        self.lock().total
    }

    /// Deletes unpinned blobs, least recently used first, until the total is within the
    /// bound. Blocking (unlinks under the lock): call from a blocking context.
    pub(crate) fn evict(&self, dir: &Path) -> Evicted {
        let mut out = Evicted::default();
        let Some(max) = self.max else {
            return out;
        };
        let mut st = self.lock();
        if st.total <= max {
            return out;
        }
        let mut victims: Vec<(SystemTime, String, u64)> = st
            .entries
            .iter()
            .filter(|(hex, _)| !st.pins.contains_key(*hex))
            .map(|(hex, e)| (e.used, hex.clone(), e.size))
            .collect();
        victims.sort();
        for (_, hex, size) in victims {
            if st.total <= max {
                break;
            }
            let p = dir.join("blobs/sha256").join(&hex[..2]).join(&hex);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("registry cache: cannot evict {}: {e}", p.display());
                    continue;
                }
            }
            st.entries.remove(&hex);
            st.total -= size;
            out.blobs += 1;
            out.bytes += size;
            tracing::info!(digest = %format!("sha256:{hex}"), size, "registry cache: blob evicted");
        }
        if st.total > max {
            tracing::warn!(
                total = st.total,
                max,
                pinned = st.pins.len(),
                "registry cache: blob store over its bound, the rest is in use"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn put(dir: &Path, hex: &str, len: usize, age_s: u64) {
        let p = dir.join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&p).expect("mkdir");
        let f = p.join(hex);
        std::fs::write(&f, vec![0u8; len]).expect("write");
        let t = SystemTime::now() - Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(t))
            .expect("set mtime");
    }

    #[test]
    fn evicts_oldest_unpinned_first_and_reads_mtimes() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        put(d.path(), &a, 100, 30);
        put(d.path(), &b, 100, 20);
        put(d.path(), &c, 100, 10);
        std::fs::write(d.path().join("blobs/sha256/aa/not-a-blob"), b"x").expect("write");
        let idx = Arc::new(BlobIndex::scan(d.path(), Some(150)).expect("scan"));
        assert_eq!(idx.total(), 300);
        // a is oldest but pinned: b then c go.
        let pin = idx.pin_present(&a, false).expect("a indexed");
        let ev = idx.evict(d.path());
        assert_eq!(
            ev,
            Evicted {
                blobs: 2,
                bytes: 200
            }
        );
        assert!(d.path().join("blobs/sha256/aa").join(&a).exists());
        assert!(!d.path().join("blobs/sha256/bb").join(&b).exists());
        assert!(!d.path().join("blobs/sha256/cc").join(&c).exists());
        assert!(idx.pin_present(&b, true).is_none());
        drop(pin);
        assert_eq!(idx.total(), 100);
        assert_eq!(idx.evict(d.path()), Evicted::default());
        assert!(d.path().join("blobs/sha256/aa/not-a-blob").exists());
    }
}
