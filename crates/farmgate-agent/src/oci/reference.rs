//! Image references (`docker://host:port/path:tag`, `alpine`, `name@sha256:…`), normalized
//! as Docker does.

use std::fmt;

use super::OciError;

/// Docker Hub's registry host, what `docker.io` (and short names) resolve to.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

/// A tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A tag, such as `latest`.
    Tag(String),
    /// A content digest, `sha256:<64 hex>`.
    Digest(String),
}

impl Reference {
    /// The text used in a registry URL (`latest`, `sha256:…`).
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(s) | Reference::Digest(s) => s,
        }
    }
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry `host[:port]` (`registry-1.docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path in the registry (`library/alpine`, `docker.io/library/alpine` on
    /// the gateway's cache).
    pub repository: String,
    /// Tag or digest.
    pub reference: Reference,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.registry, self.repository),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.registry, self.repository),
        }
    }
}

/// Longest reference accepted (Docker's limit on names is 255; tags add at most 128).
const MAX_REF_LEN: usize = 512;

impl ImageRef {
    /// Parses `[docker://][host[:port]/]path[:tag][@sha256:hex]`.
    ///
    /// Docker's normalization: the first `/`-separated part is a registry when it holds a
    /// `.` or a `:` or is `localhost` (and has no upper case); otherwise the registry is
    /// Docker Hub, and a one-part name gets `library/`. `docker.io` and
    /// `index.docker.io` mean Docker Hub. The tag defaults to `latest`; with both a tag
    /// and a digest, the digest wins. Repository parts are lower case
    /// `[a-z0-9]` separated by `.`, `_`, `__` or dashes; `:` is also accepted inside a
    /// part that is not the last (the gateway cache's `host:port` prefixes).
    pub fn parse(s: &str) -> Result<ImageRef, OciError> {
        let err = |why: &str| OciError::Reference {
            input: s.chars().take(200).collect(),
            why: why.to_owned(),
        };
        if s.len() > MAX_REF_LEN {
            return Err(err("longer than 512 bytes"));
        }
        let rest = s.strip_prefix("docker://").unwrap_or(s);
        if rest.is_empty() {
            return Err(err("empty"));
        }
        if rest.contains("://") {
            return Err(err("only the docker:// transport is supported"));
        }
        // Digest.
        let (rest, digest) = match rest.split_once('@') {
            Some((name, d)) => {
                check_digest(d).map_err(|w| err(&w))?;
                (name, Some(d.to_owned()))
            }
            None => (rest, None),
        };
        // Tag: a ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            check_tag(t).map_err(|w| err(&w))?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if (first.contains('.') || first.contains(':') || first == "localhost")
                    && first.to_ascii_lowercase() == first =>
            {
                (first.to_owned(), path.to_owned())
            }
            Some(_) => (DOCKER_HUB.to_owned(), name.to_owned()),
            None => (DOCKER_HUB.to_owned(), format!("library/{name}")),
        };
        check_registry(&registry).map_err(|w| err(&w))?;
        let registry = if registry == "docker.io" || registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_repository(&repository).map_err(|w| err(&w))?;
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => Reference::Tag(t.to_owned()),
            (None, None) => Reference::Tag("latest".to_owned()),
        };
        Ok(ImageRef {
            registry,
            repository,
            reference,
        })
    }
}

/// `sha256:<64 lowercase hex>`; other algorithms are refused (nothing else is verified).
pub(crate) fn check_digest(d: &str) -> Result<(), String> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(format!(
            "digest {:?}: only sha256:<64 hex> digests are supported",
            d.chars().take(80).collect::<String>()
        ));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "digest {:?}: a sha256 digest is 64 lowercase hex digits",
            d.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

fn check_tag(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {t:?}: 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        ))
    }
}

fn check_registry(r: &str) -> Result<(), String> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (r, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!("registry {r:?} is not host[:port]"))
    }
}

fn check_repository(repo: &str) -> Result<(), String> {
    if repo.len() > 255 {
        return Err("repository longer than 255 characters".to_owned());
    }
    for part in repo.split('/') {
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let sep = |b: u8| matches!(b, b'.' | b'_' | b'-' | b':');
        let bytes = part.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.first().copied().is_some_and(alnum)
            && bytes.last().copied().is_some_and(alnum)
            && bytes.iter().all(|&b| alnum(b) || sep(b))
            && !part.contains("..")
            && !part.contains("___");
        if !ok {
            return Err(format!(
                "repository {repo:?}: part {part:?} must be lower case [a-z0-9] separated by \
                 '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> (String, String, Reference) {
        let r = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (r.registry, r.repository, r.reference)
    }

    fn tag(t: &str) -> Reference {
        Reference::Tag(t.to_owned())
    }

    #[test]
    fn docker_normalization() {
        let hub = DOCKER_HUB.to_owned();
        assert_eq!(
            p("alpine"),
            (hub.clone(), "library/alpine".into(), tag("latest"))
        );
        assert_eq!(
            p("docker://alpine:3.20"),
            (hub.clone(), "library/alpine".into(), tag("3.20"))
        );
        assert_eq!(
            p("docker.io/alpine"),
            (hub.clone(), "library/alpine".into(), tag("latest"))
        );
        assert_eq!(
            p("index.docker.io/library/alpine"),
            (hub.clone(), "library/alpine".into(), tag("latest"))
        );
        assert_eq!(
            p("user/app:v1"),
            (hub.clone(), "user/app".into(), tag("v1"))
        );
        assert_eq!(
            p("localhost/app"),
            ("localhost".into(), "app".into(), tag("latest"))
        );
        assert_eq!(
            p("localhost:5000/a/b:t"),
            ("localhost:5000".into(), "a/b".into(), tag("t"))
        );
        assert_eq!(
            p("registry.freedesktop.org/mesa/mesa:2024-01-01-x86"),
            (
                "registry.freedesktop.org".into(),
                "mesa/mesa".into(),
                tag("2024-01-01-x86")
            )
        );
        assert_eq!(
            p("docker://10.42.0.1:8002/docker.io/library/alpine:latest"),
            (
                "10.42.0.1:8002".into(),
                "docker.io/library/alpine".into(),
                tag("latest")
            )
        );
        assert_eq!(
            p("10.42.0.1:8002/127.0.0.1:5000/app"),
            (
                "10.42.0.1:8002".into(),
                "127.0.0.1:5000/app".into(),
                tag("latest")
            )
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            p(&format!("quay.io/a/b:v1@{d}")),
            ("quay.io".into(), "a/b".into(), Reference::Digest(d.clone()))
        );
        assert_eq!(
            ImageRef::parse(&format!("quay.io/a/b@{d}"))
                .map(|r| r.to_string())
                .ok(),
            Some(format!("quay.io/a/b@{d}"))
        );
    }

    #[test]
    fn bad_references_are_errors() {
        for bad in [
            "",
            "docker://",
            "Alpine",
            "oci:/tmp/x",
            "alpine:",
            "alpine:-x",
            "a//b",
            "host:99999/a",
            "alpine@sha256:xyz",
            "alpine@md5:0123",
            "reg.io/../etc",
            &"a".repeat(600),
        ] {
            let e = ImageRef::parse(bad).err();
            assert!(e.is_some(), "{bad:?} parsed");
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("invalid image reference"), "{msg}");
        }
    }
}
