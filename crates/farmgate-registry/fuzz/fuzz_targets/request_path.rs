//! Arbitrary request paths (the part after `/v2/`): parsing must return errors, never
//! panic; whatever parses must map to files strictly inside the cache directory, built only
//! from a validated digest or a hash.
#![no_main]

use std::path::{Component, Path};

use farmgate_registry::path::{self, Digest, Reference, Target};
use libfuzzer_sys::fuzz_target;

const DIR: &str = "/cache/dir";

fn inside(p: &Path) {
    assert!(p.starts_with(DIR), "{} escapes {DIR}", p.display());
    assert!(
        p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{} has . or .. components",
        p.display()
    );
    // dir + at most 4 levels (blobs/sha256/xx/<hex>).
    assert!(p.components().count() <= Path::new(DIR).components().count() + 4);
}

fn check_digest(d: &Digest) {
    assert_eq!(d.hex().len(), 64);
    assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
    inside(&d.blob_path(Path::new(DIR)));
    inside(&d.manifest_path(Path::new(DIR)));
    assert_eq!(Digest::parse(&d.to_string()).ok().as_ref(), Some(d));
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(d) = Digest::parse(&s) {
        check_digest(&d);
    }
    let Ok(req) = path::parse_request(&s) else {
        return;
    };
    assert!(!req.prefix.is_empty() && !req.prefix.contains('/'));
    assert!(req.prefix != "." && req.prefix != "..");
    assert!(!req.name.is_empty());
    for c in req.name.split('/') {
        assert!(!c.is_empty() && c != "." && c != "..", "bad component in {:?}", req.name);
    }
    assert!(!req.name.contains('%') && !req.prefix.contains('%'));
    match &req.target {
        Target::Blob(d) | Target::Manifest(Reference::Digest(d)) => check_digest(d),
        Target::Manifest(Reference::Tag(t)) => {
            assert!(!t.is_empty() && t.len() <= 128 && !t.starts_with('.') && !t.contains('/'));
            inside(&path::tag_path(Path::new(DIR), &req.prefix, &req.name, t));
        }
    }
});
