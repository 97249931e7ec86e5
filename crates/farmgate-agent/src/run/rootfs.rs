//! Reading a container's root file system from the host without ever leaving it: paths
//! are resolved as if the rootfs were `/` (absolute symlinks restart at the rootfs, `..`
//! stops at it), and user/group names are looked up in its `/etc/passwd` and `/etc/group`.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed while resolving one path (Linux's limit).
const MAX_LINKS: usize = 40;

/// Resolves `path` (absolute or relative to `/`) inside `root`, following symlinks as the
/// kernel would inside a chroot. Components that do not exist are appended lexically, so
/// the result can be created with `create_dir_all` without leaving `root`.
pub(crate) fn resolve_in(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = components(Path::new(path));
    pending.reverse();
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            done.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&done);
        candidate.push(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving {path:?}"
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    done.clear();
                }
                let mut t = components(&target);
                t.reverse();
                pending.extend(t);
            }
            Ok(_) => done.push(c),
            Err(e) if e.kind() == io::ErrorKind::NotFound => done.push(c),
            Err(e) => return Err(e),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&done);
    Ok(out)
}

/// The normal and `..` components of `p` (root and `.` dropped).
fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Reads a text file of the rootfs; `Ok(None)` when it does not exist.
pub(crate) fn read_in(root: &Path, path: &str) -> io::Result<Option<String>> {
    let p = resolve_in(root, path)?;
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` (malformed lines are skipped, as libc does).
pub(crate) fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// Parses `/etc/group` (malformed lines are skipped).
pub(crate) fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// The process identity a container runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// The user's home directory from `/etc/passwd` (`/` when unknown).
    pub home: String,
}

/// Resolves a podman `--user` value (`user`, `uid`, `user:group`, `uid:gid`…) against the
/// rootfs's `/etc/passwd` and `/etc/group`. `None` is root.
pub(crate) fn resolve_user(root: &Path, user: Option<&str>) -> Result<Identity, String> {
    let user = user.unwrap_or("0");
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if u.is_empty() || g == Some("") {
        return Err(format!("user {user:?}: expected user[:group]"));
    }
    let read =
        |p: &str| read_in(root, p).map_err(|e| format!("reading {p} in {}: {e}", root.display()));
    let passwd = read("/etc/passwd")?.map(|t| parse_passwd(&t));
    let groups = read("/etc/group")?.map(|t| parse_group(&t));
    let entry = match u.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .flatten()
            .find(|e| e.uid == uid)
            .cloned()
            .map(|e| (uid, Some(e)))
            .unwrap_or((uid, None)),
        Err(_) => {
            let e = passwd
                .iter()
                .flatten()
                .find(|e| e.name == u)
                .cloned()
                .ok_or_else(|| format!("user {u:?} not found in {}/etc/passwd", root.display()))?;
            (e.uid, Some(e))
        }
    };
    let (uid, pw) = entry;
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .flatten()
                    .find(|e| e.name == g)
                    .ok_or_else(|| {
                        format!("group {g:?} not found in {}/etc/group", root.display())
                    })?
                    .gid
            }
        },
        None => pw.as_ref().map(|e| e.gid).unwrap_or(0),
    };
    let mut additional_gids = Vec::new();
    if let Some(pw) = &pw {
        for grp in groups.iter().flatten() {
            if grp.gid != gid
                && grp.members.contains(&pw.name)
                && !additional_gids.contains(&grp.gid)
            {
                additional_gids.push(grp.gid);
            }
        }
    }
    let home = pw
        .map(|e| e.home)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Identity {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc/shadow", root.join("etc/passwd")).unwrap();
        assert_eq!(resolve_in(root, "/link/x").unwrap(), root.join("etc/x"));
        assert_eq!(
            resolve_in(root, "/etc/passwd").unwrap(),
            root.join("etc/shadow")
        );
        assert_eq!(read_in(root, "/etc/passwd").unwrap(), None);
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in(root, "/loop").is_err());
    }

    #[test]
    fn users_and_groups() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\ntester:x:1234:1235::/home/tester:/bin/sh\nbad line\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\ntester:x:1235:\nvideo:x:44:tester,other\naudio:x:29:other\n",
        )
        .unwrap();
        let id = resolve_user(root, Some("tester")).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1234,
                gid: 1235,
                additional_gids: vec![44],
                home: "/home/tester".into()
            }
        );
        let id = resolve_user(root, Some("1234:audio")).unwrap();
        assert_eq!((id.uid, id.gid), (1234, 29));
        let id = resolve_user(root, Some("4000")).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (4000, 0, "/"));
        let id = resolve_user(root, None).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
        let e = resolve_user(root, Some("nobody")).unwrap_err();
        assert!(e.contains("\"nobody\" not found"), "{e}");
        let e = resolve_user(root, Some("tester:nogroup")).unwrap_err();
        assert!(e.contains("\"nogroup\" not found"), "{e}");
        assert!(resolve_user(root, Some("tester:")).is_err());
    }
}
