//! Parsing of registry request paths (`/v2/<prefix>/<name...>/<manifests|blobs>/<reference>`)
//! and the mapping of validated digests and tags to files under the cache directory.
//!
//! Every file name that the cache derives from a request comes from this module: blob and
//! manifest files from a validated `sha256:<64 lowercase hex>` digest, tag records from a
//! sha256 of the (prefix, name, tag) triple. Nothing a client sends reaches a path otherwise.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::RegistryError;

/// Longest repository name accepted (the part after the prefix).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted (OCI: 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// A validated `sha256:<64 lowercase hex>` content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; any other algorithm or form is refused.
    pub fn parse(s: &str) -> Result<Digest, RegistryError> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(RegistryError::DigestInvalid(format!(
                "{:?}: only sha256:<64 hex> digests are supported",
                truncate(s)
            )));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(RegistryError::DigestInvalid(format!(
                "{:?}: a sha256 digest is 64 lowercase hex digits",
                truncate(s)
            )));
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hash(&Sha256::digest(bytes))
    }

    /// Wraps a finished 32-byte sha256 hash.
    pub fn from_hash(hash: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(hash),
        }
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Where the blob with this digest is stored: `<dir>/blobs/sha256/<2 hex>/<64 hex>`.
    pub fn blob_path(&self, dir: &Path) -> PathBuf {
        dir.join("blobs")
            .join("sha256")
            .join(&self.hex[..2])
            .join(&self.hex)
    }

    /// Where the manifest with this digest is stored: `<dir>/manifests/sha256/<64 hex>`
    /// (its media type beside it, with the extension `.type`).
    pub fn manifest_path(&self, dir: &Path) -> PathBuf {
        dir.join("manifests").join("sha256").join(&self.hex)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// The file recording what a tag of a repository of an upstream resolved to:
/// `<dir>/tags/<sha256 of prefix, name and tag>.json`.
pub fn tag_path(dir: &Path, prefix: &str, name: &str, tag: &str) -> PathBuf {
    let mut h = Sha256::new();
    for part in [prefix, name, tag] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    dir.join("tags")
        .join(format!("{}.json", hex::encode(h.finalize())))
}

/// What a manifest request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A tag (`latest`, `v1.2`), resolved upstream and cached for the tag TTL.
    Tag(String),
    /// A digest, cached forever.
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// The object a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/manifests/<reference>`.
    Manifest(Reference),
    /// `/blobs/<digest>`.
    Blob(Digest),
}

/// A parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    /// First path component: selects the upstream (`docker.io`, `127.0.0.1:5000`).
    pub prefix: String,
    /// Repository name inside the upstream (`library/alpine`), as the client wrote it.
    pub name: String,
    /// Manifest or blob.
    pub target: Target,
}

/// Parses the part of a request path after `/v2/`: `<prefix>/<name...>/manifests/<tag|digest>`
/// or `<prefix>/<name...>/blobs/<digest>`. Percent-encoded characters, empty or dot
/// components and anything outside the OCI name grammar are refused.
pub fn parse_request(rest: &str) -> Result<RequestPath, RegistryError> {
    if rest.len() > 2048 {
        return Err(RegistryError::NameInvalid("request path too long".into()));
    }
    if rest.contains('%') {
        return Err(RegistryError::NameInvalid(format!(
            "{:?}: percent-encoded characters are not allowed in registry paths",
            truncate(rest)
        )));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() < 4 {
        return Err(RegistryError::Unsupported(format!(
            "{:?}: expected <prefix>/<name>/manifests/<reference> or <prefix>/<name>/blobs/<digest>",
            truncate(rest)
        )));
    }
    let n = parts.len();
    let (prefix, names, kind, reference) = (parts[0], &parts[1..n - 2], parts[n - 2], parts[n - 1]);
    validate_prefix(prefix)?;
    for c in names {
        validate_component(c)?;
    }
    let name = names.join("/");
    if name.len() > MAX_NAME_LEN {
        return Err(RegistryError::NameInvalid(format!(
            "repository name longer than {MAX_NAME_LEN} characters"
        )));
    }
    let target = match kind {
        "manifests" => {
            if reference.contains(':') {
                Target::Manifest(Reference::Digest(Digest::parse(reference)?))
            } else {
                validate_tag(reference)?;
                Target::Manifest(Reference::Tag(reference.to_owned()))
            }
        }
        "blobs" => Target::Blob(Digest::parse(reference)?),
        other => {
            return Err(RegistryError::Unsupported(format!(
                "{:?}: only manifests and blobs can be pulled through this cache",
                truncate(other)
            )));
        }
    };
    Ok(RequestPath {
        prefix: prefix.to_owned(),
        name,
        target,
    })
}

/// A prefix is a host name with an optional port: letters, digits, `.`, `-`, `:`, `_`.
fn validate_prefix(p: &str) -> Result<(), RegistryError> {
    let ok = !p.is_empty()
        && p.len() <= 255
        && p != "."
        && p != ".."
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::NameInvalid(format!(
            "{:?}: the first path component names an upstream (host[:port])",
            truncate(p)
        )))
    }
}

/// OCI path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn validate_component(c: &str) -> Result<(), RegistryError> {
    let bad = || {
        RegistryError::NameInvalid(format!(
            "{:?}: repository name components are lowercase letters and digits joined by '.', '_', '__' or dashes",
            truncate(c)
        ))
    };
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err(bad());
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_digit() || ch.is_ascii_lowercase() {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        match ch {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err(bad()),
        }
        if i == start || i >= b.len() || !(b[i].is_ascii_digit() || b[i].is_ascii_lowercase()) {
            return Err(bad());
        }
    }
    Ok(())
}

/// OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn validate_tag(t: &str) -> Result<(), RegistryError> {
    let b = t.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::NameInvalid(format!(
            "{:?}: a tag is up to 128 of [A-Za-z0-9._-], not starting with '.' or '-'",
            truncate(t)
        )))
    }
}

/// Cuts client-supplied text quoted in error messages.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn parses_multi_component_names() {
        let r = parse_request("docker.io/library/alpine/manifests/latest").expect("valid");
        assert_eq!(r.prefix, "docker.io");
        assert_eq!(r.name, "library/alpine");
        assert_eq!(r.target, Target::Manifest(Reference::Tag("latest".into())));
        let r = parse_request(&format!("127.0.0.1:5000/a/b-c/d__e/blobs/{D}")).expect("valid");
        assert_eq!(r.prefix, "127.0.0.1:5000");
        assert_eq!(r.name, "a/b-c/d__e");
        assert!(matches!(r.target, Target::Blob(_)));
        let r = parse_request(&format!("h/x/manifests/{D}")).expect("valid");
        assert!(matches!(r.target, Target::Manifest(Reference::Digest(_))));
    }

    #[test]
    fn refuses_escapes_and_bad_names() {
        for p in [
            "h/x/blobs/sha256:../../x",
            "h/x/blobs/sha256:..%2F..%2Fx",
            "h/../x/blobs/abc",
            "h/x/manifests/..",
            "h/X/manifests/latest",
            "h//x/manifests/latest",
            "../x/y/manifests/latest",
            "h/x/manifests/.hidden",
            "h/x/tags/list",
            "h/x/blobs/sha512:abcd",
            "h/x-/manifests/a",
            "h/x.-y/manifests/a",
            "h/x___y/manifests/a",
            "x/manifests/a",
        ] {
            assert!(parse_request(p).is_err(), "{p} should be refused");
        }
        assert!(Digest::parse(&D.to_uppercase().replace("SHA256", "sha256")).is_err());
    }

    #[test]
    fn paths_stay_inside_dir() {
        let dir = Path::new("/cache");
        let d = Digest::parse(D).expect("valid");
        assert_eq!(
            d.blob_path(dir),
            Path::new("/cache/blobs/sha256/aa").join(&D[7..])
        );
        let t = tag_path(dir, "h", "../../etc", "passwd");
        assert!(t.starts_with("/cache/tags"));
        assert_eq!(t.components().count(), 4);
    }
}
