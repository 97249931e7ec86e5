//! A minimal, deterministic writer of "newc" (SVR4, magic `070701`) cpio archives,
//! the format the Linux kernel unpacks as an initramfs.
//!
//! Entries are collected in an [`Archive`] and written sorted by path, with mtime 0,
//! uid/gid 0 and inode numbers assigned in that order, so the same input always gives
//! the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::Error;

/// Size of a newc header in bytes (6 bytes of magic + 13 fields of 8 hex digits).
pub const HEADER_LEN: usize = 110;
/// Magic of the newc format (no checksum).
pub const MAGIC: &str = "070701";
/// Name of the last, empty entry that ends every cpio archive.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits (`S_IFMT` values) used in the cpio mode field.
pub mod file_type {
    /// Directory.
    pub const DIR: u32 = 0o040000;
    /// Regular file.
    pub const FILE: u32 = 0o100000;
    /// Symbolic link.
    pub const SYMLINK: u32 = 0o120000;
    /// Character device.
    pub const CHAR_DEVICE: u32 = 0o020000;
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link with its target.
    Symlink(String),
    /// A character device node.
    CharDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// One archive entry: permission bits (e.g. `0o755`) and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits only (`0o7777` mask); the type bits come from `kind`.
    pub perm: u32,
    /// What the entry is.
    pub kind: EntryKind,
}

impl Entry {
    /// Full cpio mode: file type bits | permission bits.
    pub fn mode(&self) -> u32 {
        let ty = match self.kind {
            EntryKind::Dir => file_type::DIR,
            EntryKind::File(_) => file_type::FILE,
            EntryKind::Symlink(_) => file_type::SYMLINK,
            EntryKind::CharDevice { .. } => file_type::CHAR_DEVICE,
        };
        ty | (self.perm & 0o7777)
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            EntryKind::File(d) => d,
            EntryKind::Symlink(t) => t.as_bytes(),
            EntryKind::Dir | EntryKind::CharDevice { .. } => &[],
        }
    }
}

/// An in-memory set of entries, keyed by their normalized path (no leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Normalizes an archive path: strips leading `/`, rejects empty, `.`/`..` components
/// and NUL bytes.
pub fn normalize_path(path: &str) -> Result<String, Error> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() || trimmed.contains('\0') {
        return Err(Error::InvalidPath(path.to_string()));
    }
    let mut parts = Vec::new();
    for part in trimmed.split('/') {
        match part {
            "" => continue,
            "." | ".." => return Err(Error::InvalidPath(path.to_string())),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        normalize_path(path).ok().and_then(|p| self.entries.get(&p))
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), Error> {
        let path = normalize_path(path)?;
        // Parent directories first (mode 0755), unless something already exists there.
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for comp in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.entries.get(&parent) {
                Some(Entry {
                    kind: EntryKind::Dir,
                    ..
                }) => {}
                Some(_) => return Err(Error::NotADirectory(parent)),
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            perm: 0o755,
                            kind: EntryKind::Dir,
                        },
                    );
                }
            }
        }
        if let EntryKind::File(data) = &entry.kind
            && u32::try_from(data.len()).is_err()
        {
            return Err(Error::TooLarge(path));
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Adds a directory (and its missing parents).
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                perm,
                kind: EntryKind::Dir,
            },
        )
    }

    /// Adds a regular file (and its missing parent directories).
    pub fn add_file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                perm,
                kind: EntryKind::File(data),
            },
        )
    }

    /// Adds a symbolic link `path` → `target` (mode 0777).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                perm: 0o777,
                kind: EntryKind::Symlink(target.to_string()),
            },
        )
    }

    /// Adds a character device node.
    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                perm,
                kind: EntryKind::CharDevice { major, minor },
            },
        )
    }

    /// Writes the archive in newc format, entries sorted by path, followed by the
    /// trailer. The output length is a multiple of 4 (not padded to 512).
    pub fn write_newc<W: Write>(&self, mut w: W) -> io::Result<()> {
        for (ino, (path, entry)) in (1u32..).zip(self.entries.iter()) {
            let (rmaj, rmin) = match entry.kind {
                EntryKind::CharDevice { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let nlink = if entry.kind == EntryKind::Dir { 2 } else { 1 };
            write_entry(
                &mut w,
                ino,
                entry.mode(),
                nlink,
                rmaj,
                rmin,
                path,
                entry.data(),
            )?;
        }
        write_entry(&mut w, 0, 0, 1, 0, 0, TRAILER, &[])
    }

    /// The archive as newc bytes.
    pub fn to_newc(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_newc(&mut out);
        out
    }
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[allow(clippy::too_many_arguments)]
fn write_entry<W: Write>(
    w: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev_major: u32,
    rdev_minor: u32,
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let filesize = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: too large")))?;
    let namesize32 = u32::try_from(namesize)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
    let fields: [u32; 13] = [
        ino, mode, 0, // uid
        0, // gid
        nlink, 0, // mtime
        filesize, 0, // devmajor
        0, // devminor
        rdev_major, rdev_minor, namesize32, 0, // check
    ];
    let mut header = String::with_capacity(HEADER_LEN);
    header.push_str(MAGIC);
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.write_all(&[0; 3][..pad4(HEADER_LEN + namesize)])?;
    w.write_all(data)?;
    w.write_all(&[0; 3][..pad4(data.len())])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed newc record, for checking the writer.
    #[derive(Debug)]
    struct Parsed {
        fields: [u32; 13],
        name: String,
        data: Vec<u8>,
    }

    fn parse(buf: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(pos % 4, 0, "record not 4-aligned at {pos}");
            let hdr = &buf[pos..pos + HEADER_LEN];
            assert_eq!(&hdr[..6], MAGIC.as_bytes());
            let mut fields = [0u32; 13];
            for (i, f) in fields.iter_mut().enumerate() {
                let s = std::str::from_utf8(&hdr[6 + i * 8..14 + i * 8]).unwrap();
                assert!(
                    s.chars()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
                );
                *f = u32::from_str_radix(s, 16).unwrap();
            }
            let namesize = fields[11] as usize;
            let filesize = fields[6] as usize;
            let name_start = pos + HEADER_LEN;
            let name_bytes = &buf[name_start..name_start + namesize];
            assert_eq!(name_bytes[namesize - 1], 0, "name not NUL terminated");
            let name = String::from_utf8(name_bytes[..namesize - 1].to_vec()).unwrap();
            let mut p = name_start + namesize;
            let pad = pad4(HEADER_LEN + namesize);
            assert!(buf[p..p + pad].iter().all(|&b| b == 0), "name padding");
            p += pad;
            assert_eq!(p % 4, 0);
            let data = buf[p..p + filesize].to_vec();
            p += filesize;
            let pad = pad4(filesize);
            assert!(buf[p..p + pad].iter().all(|&b| b == 0), "data padding");
            p += pad;
            pos = p;
            let done = name == TRAILER;
            out.push(Parsed { fields, name, data });
            if done {
                break;
            }
        }
        assert_eq!(pos, buf.len(), "trailing bytes after the trailer");
        out
    }

    #[test]
    fn writes_parseable_sorted_newc() {
        let mut a = Archive::new();
        a.add_file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        a.add_symlink("/bin/sh", "busybox").unwrap();
        a.add_file("/bin/busybox", 0o755, vec![1, 2, 3, 4, 5])
            .unwrap();
        a.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        a.add_dir("/tmp", 0o1777).unwrap();
        a.add_file("/etc/x/y/empty", 0o644, Vec::new()).unwrap();
        let bytes = a.to_newc();
        assert_eq!(bytes.len() % 4, 0);
        let recs = parse(&bytes);
        let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/x",
                "etc/x/y",
                "etc/x/y/empty",
                "init",
                "tmp",
                TRAILER
            ]
        );
        let by = |n: &str| recs.iter().find(|r| r.name == n).unwrap();
        // field indexes: 0 ino,1 mode,2 uid,3 gid,4 nlink,5 mtime,6 filesize,
        // 7 devmajor,8 devminor,9 rdevmajor,10 rdevminor,11 namesize,12 check
        for r in &recs {
            assert_eq!(r.fields[2], 0, "uid of {}", r.name);
            assert_eq!(r.fields[3], 0, "gid of {}", r.name);
            assert_eq!(r.fields[5], 0, "mtime of {}", r.name);
            assert_eq!(r.fields[12], 0, "check of {}", r.name);
            assert_eq!(r.fields[11] as usize, r.name.len() + 1);
        }
        let init = by("init");
        assert_eq!(init.fields[1], 0o100755);
        assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
        assert_eq!(init.fields[6] as usize, init.data.len());
        let bb = by("bin/busybox");
        assert_eq!(bb.data, [1, 2, 3, 4, 5]);
        let sh = by("bin/sh");
        assert_eq!(sh.fields[1], 0o120777);
        assert_eq!(sh.data, b"busybox");
        let console = by("dev/console");
        assert_eq!(console.fields[1], 0o020600);
        assert_eq!((console.fields[9], console.fields[10]), (5, 1));
        assert_eq!(console.fields[6], 0);
        let tmp = by("tmp");
        assert_eq!(tmp.fields[1], 0o041777);
        assert_eq!(tmp.fields[4], 2);
        assert_eq!(by("etc/x").fields[1], 0o040755);
        let trailer = recs.last().unwrap();
        assert_eq!(trailer.fields[6], 0);
        assert_eq!(trailer.fields[1], 0);
        // inode numbers are unique and non-zero for real entries
        let mut inos: Vec<u32> = recs[..recs.len() - 1].iter().map(|r| r.fields[0]).collect();
        assert!(inos.iter().all(|&i| i != 0));
        inos.dedup();
        assert_eq!(inos.len(), recs.len() - 1);
        // deterministic
        assert_eq!(bytes, a.to_newc());
    }

    #[test]
    fn padding_for_every_name_and_data_length() {
        for n in 1..=8 {
            let mut a = Archive::new();
            let name = "f".repeat(n);
            a.add_file(&name, 0o644, vec![b'x'; n]).unwrap();
            let recs = parse(&a.to_newc());
            assert_eq!(recs[0].name, name);
            assert_eq!(recs[0].data, vec![b'x'; n]);
            assert_eq!(recs[1].name, TRAILER);
        }
    }

    #[test]
    fn rejects_bad_paths_and_file_as_parent() {
        let mut a = Archive::new();
        assert!(matches!(a.add_dir("/", 0o755), Err(Error::InvalidPath(_))));
        assert!(matches!(
            a.add_file("/a/../b", 0o644, vec![]),
            Err(Error::InvalidPath(_))
        ));
        a.add_file("/f", 0o644, vec![]).unwrap();
        assert!(matches!(
            a.add_file("/f/g", 0o644, vec![]),
            Err(Error::NotADirectory(p)) if p == "f"
        ));
        assert_eq!(normalize_path("//a//b/").unwrap(), "a/b");
    }
}
