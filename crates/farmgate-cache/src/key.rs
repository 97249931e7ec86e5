//! Upstream URL parsing and normalization, and the mapping of a URL to its cache file.
//!
//! The URL never becomes a path: an entry's file is `<dir>/objects/<sha256 of the
//! normalized URL, 64 lowercase hex digits>`, so nothing a client sends can name a file
//! outside the cache directory.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use url::Url;

use crate::CacheError;

/// Longest upstream URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 8192;

/// A parsed, normalized upstream URL: what a cache entry is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL sent upstream (http or https, with a host, without fragment or credentials).
    pub url: Url,
    /// Its normalized text: the index records it and the key hashes it.
    pub normalized: String,
    /// sha256 of `normalized` in lowercase hex: the entry's file name.
    pub key: String,
    /// Digest the artifact must have, when the URL gives one (`sha256=<hex>` query
    /// parameter or a `sha256:<hex>` path segment, as in OCI blob URLs).
    pub sha256_hint: Option<[u8; 32]>,
}

/// The entry key (file name) of a normalized URL: its sha256 in lowercase hex.
pub fn key_of(normalized: &str) -> String {
    hex::encode(Sha256::digest(normalized.as_bytes()))
}

/// Whether `key` has the shape of an entry key: exactly 64 lowercase hex digits.
pub fn is_key(key: &str) -> bool {
    key.len() == 64
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The file of entry `key` under cache directory `dir`; refuses anything that is not a key.
pub fn entry_path(dir: &Path, key: &str) -> Result<PathBuf, CacheError> {
    if !is_key(key) {
        return Err(CacheError::BadUrl {
            url: key.chars().take(100).collect(),
            reason: "not a cache key (64 lowercase hex digits)".into(),
        });
    }
    Ok(dir.join("objects").join(key))
}

/// Parses a `sha256` hint: 64 hex digits (either case).
pub fn parse_digest(hint: &str) -> Result<[u8; 32], CacheError> {
    let mut out = [0u8; 32];
    if hint.len() != 64 || hex::decode_to_slice(hint, &mut out).is_err() {
        return Err(CacheError::BadDigest {
            hint: hint.chars().take(100).collect(),
        });
    }
    Ok(out)
}

/// The upstream target of a `/cache/<url>` request: `rest` is the request path after
/// `/cache/` (still percent-encoded, as sent), `query` the request's query string, which
/// belongs to the upstream URL.
pub fn target_from_request_path(rest: &str, query: Option<&str>) -> Result<Target, CacheError> {
    let mut raw = rest.to_string();
    if let Some(q) = query {
        raw.push('?');
        raw.push_str(q);
    }
    parse_target(&raw)
}

/// Parses and normalizes an upstream URL given by a client.
///
/// Accepts only `http://` and `https://` URLs with a host and without credentials. A URL
/// whose `//` after the scheme was squashed to `/` by some proxy is repaired; a fully
/// percent-encoded URL (`https%3A%2F%2F...`) is decoded once. The fragment is dropped.
pub fn parse_target(raw: &str) -> Result<Target, CacheError> {
    let shown = || raw.chars().take(200).collect::<String>();
    if raw.len() > MAX_URL_LEN {
        return Err(CacheError::BadUrl {
            url: shown(),
            reason: format!("longer than {MAX_URL_LEN} bytes"),
        });
    }
    let trimmed = raw.trim();
    let mut text = repair_scheme(trimmed);
    if scheme_of(&text).is_none() {
        let decoded = percent_encoding::percent_decode_str(trimmed).decode_utf8_lossy();
        let decoded = repair_scheme(&decoded);
        if scheme_of(&decoded).is_some() {
            text = decoded;
        }
    }
    if scheme_of(&text).is_none() {
        let scheme = text
            .split_once(':')
            .map(|(s, _)| s.chars().take(20).collect::<String>())
            .unwrap_or_default();
        return Err(CacheError::Scheme {
            scheme,
            url: shown(),
        });
    }
    let mut url = Url::parse(&text).map_err(|e| CacheError::BadUrl {
        url: shown(),
        reason: e.to_string(),
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(CacheError::Scheme {
            scheme: url.scheme().to_string(),
            url: shown(),
        });
    }
    match url.host_str() {
        Some(h) if !h.is_empty() => {}
        _ => {
            return Err(CacheError::BadUrl {
                url: shown(),
                reason: "no host".into(),
            });
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(CacheError::BadUrl {
            url: shown(),
            reason: "credentials in URLs are not accepted".into(),
        });
    }
    url.set_fragment(None);
    let sha256_hint = hint_of(&url)?;
    let normalized = url.as_str().to_string();
    if normalized.len() > MAX_URL_LEN {
        return Err(CacheError::BadUrl {
            url: shown(),
            reason: format!("longer than {MAX_URL_LEN} bytes once normalized"),
        });
    }
    let key = key_of(&normalized);
    Ok(Target {
        url,
        normalized,
        key,
        sha256_hint,
    })
}

/// The scheme (`http` or `https`) when `text` starts with `http://` or `https://`.
fn scheme_of(text: &str) -> Option<&'static str> {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    if lower.starts_with("http://") {
        Some("http")
    } else if lower.starts_with("https://") {
        Some("https")
    } else {
        None
    }
}

/// `http:/host/x` → `http://host/x` (some clients and proxies squash `//` in paths).
fn repair_scheme(text: &str) -> String {
    for scheme in ["http:/", "https:/"] {
        if let Some(head) = text.get(..scheme.len())
            && head.eq_ignore_ascii_case(scheme)
            && !text[scheme.len()..].starts_with('/')
        {
            return format!("{}/{}", &text[..scheme.len()], &text[scheme.len()..]);
        }
    }
    text.to_string()
}

/// The digest a URL names: a `sha256` query parameter or a `sha256:<hex>` path segment.
fn hint_of(url: &Url) -> Result<Option<[u8; 32]>, CacheError> {
    for (k, v) in url.query_pairs() {
        if k == "sha256" {
            return parse_digest(&v).map(Some);
        }
    }
    if let Some(segments) = url.path_segments() {
        for s in segments {
            if let Some(hex) = s.strip_prefix("sha256:")
                && let Ok(d) = parse_digest(hex)
            {
                return Ok(Some(d));
            }
        }
    }
    Ok(None)
}

/// Whether `host` may be fetched: `None` allows every host; an entry `*.suffix` matches
/// any host ending in `.suffix`; any other entry matches the host exactly (ASCII case
/// insensitive).
pub fn host_allowed(host: &str, allow: Option<&[String]>) -> bool {
    let Some(list) = allow else { return true };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    list.iter().any(|entry| {
        let entry = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        match entry.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => !entry.is_empty() && host == entry,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_keys() {
        let a = parse_target("HTTP://Example.ORG:80/a/./b/../c.tar.gz#frag").unwrap();
        assert_eq!(a.normalized, "http://example.org/a/c.tar.gz");
        assert!(is_key(&a.key));
        let b = parse_target("http:/example.org/a/c.tar.gz").unwrap();
        assert_eq!(a.key, b.key);
        let c = parse_target("https%3A%2F%2Fexample.org%2Fx").unwrap();
        assert_eq!(c.normalized, "https://example.org/x");
    }

    #[test]
    fn refuses_other_schemes_and_escapes() {
        for bad in [
            "file:///etc/passwd",
            "../../etc/passwd",
            "..%2f..%2fetc/passwd",
            "ftp://h/x",
            "http://",
            "http://user:pw@h/x",
            "",
        ] {
            assert!(parse_target(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hints_and_allowlist() {
        let d = "ab".repeat(32);
        let t = parse_target(&format!("http://h/x?sha256={d}")).unwrap();
        assert_eq!(t.sha256_hint, Some([0xab; 32]));
        let t = parse_target(&format!("http://h/v2/x/blobs/sha256:{d}")).unwrap();
        assert_eq!(t.sha256_hint, Some([0xab; 32]));
        assert!(parse_target("http://h/x?sha256=zz").is_err());
        let allow = vec!["*.example.org".to_string(), "10.0.0.1".to_string()];
        assert!(host_allowed("a.example.org", Some(&allow)));
        assert!(!host_allowed("example.org", Some(&allow)));
        assert!(!host_allowed("badexample.org", Some(&allow)));
        assert!(host_allowed("10.0.0.1", Some(&allow)));
        assert!(host_allowed("anything", None));
    }

    #[test]
    fn entry_path_stays_inside() {
        let dir = Path::new("/c");
        assert!(entry_path(dir, "../x").is_err());
        let k = key_of("http://h/");
        assert_eq!(entry_path(dir, &k).unwrap(), dir.join("objects").join(&k));
    }
}
