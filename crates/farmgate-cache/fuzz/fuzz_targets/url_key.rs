//! Arbitrary request paths, queries and URLs through the cache's URL parsing and
//! normalization: only http(s) URLs with a host are accepted, normalization is stable
//! (a normalized URL parses to itself), and an entry's file is always a direct child of
//! `<dir>/objects` named by 64 hex digits, whatever the input.
#![no_main]

use std::path::{Component, Path};

use farmgate_cache::key;
use libfuzzer_sys::fuzz_target;

fn check(t: &key::Target, input: &str) {
    let scheme = t.url.scheme();
    assert!(
        scheme == "http" || scheme == "https",
        "{input:?} accepted as {scheme}"
    );
    assert!(
        t.url.host_str().is_some_and(|h| !h.is_empty()),
        "{input:?}: no host"
    );
    assert!(t.normalized.starts_with("http://") || t.normalized.starts_with("https://"));
    assert!(key::is_key(&t.key));
    let again = key::parse_target(&t.normalized).expect("a normalized URL must parse again");
    assert_eq!(again.key, t.key, "normalization of {input:?} is not stable");
    let dir = Path::new("/var/cache/fg");
    let p = key::entry_path(dir, &t.key).expect("a key maps to a path");
    assert_eq!(
        p.parent(),
        Some(dir.join("objects").as_path()),
        "{input:?} → {p:?}"
    );
    assert!(
        p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
    );
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // As a whole URL (the ?url= form), and split at the first '?' as path + query.
    if let Ok(t) = key::parse_target(&text) {
        check(&t, &text);
    }
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&*text, None),
    };
    if let Ok(t) = key::target_from_request_path(path, query) {
        check(&t, &text);
    }
    // Whatever string is offered as a key, a path outside objects/ is never produced.
    if let Ok(p) = key::entry_path(Path::new("/var/cache/fg"), &text) {
        assert!(key::is_key(&text));
        assert_eq!(p.parent(), Some(Path::new("/var/cache/fg/objects")));
    }
});
