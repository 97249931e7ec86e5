//! Arbitrary request paths and (bucket, key) pairs: validation must never panic, and
//! whatever it accepts must map to a file strictly inside `<root>/<bucket>/`, reached only
//! through plain path components (no `..`, `.`, root or empty component).
#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use farmgate_s3::{Credentials, S3Config, S3Store, parse_request_path};
use libfuzzer_sys::fuzz_target;

fn store() -> &'static S3Store {
    static STORE: OnceLock<S3Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("farmgate-s3-fuzz-{}", std::process::id()));
        S3Store::open(S3Config::new(
            root,
            Credentials {
                access_key: "FUZZADMIN".into(),
                secret_key: "fuzz".into(),
            },
        ))
        .expect("open the fuzz store")
    })
}

fn check(bucket: &str, key: &str) {
    let Ok(path) = store().object_path(bucket, key) else {
        return;
    };
    let bucket_dir: PathBuf = store().root().join(bucket);
    let rel = path
        .strip_prefix(&bucket_dir)
        .unwrap_or_else(|_| panic!("{path:?} is not under {bucket_dir:?}"));
    assert!(
        rel != Path::new(""),
        "key {key:?} maps to the bucket itself"
    );
    assert!(
        rel.components().all(|c| matches!(c, Component::Normal(_))),
        "key {key:?} maps to {rel:?}"
    );
    assert_eq!(rel.components().count(), key.split('/').count());
    assert!(
        bucket_dir.parent() == Some(store().root()),
        "bucket {bucket:?} is not one directory under the root"
    );
    assert!(
        !bucket.starts_with('.'),
        "bucket {bucket:?} could hit a hidden tree"
    );
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // As a raw request path.
    if let Ok((Some(bucket), key)) = parse_request_path(&text) {
        match key {
            Some(key) => check(&bucket, &key),
            None => assert!(farmgate_s3::validate_bucket_name(&bucket).is_ok()),
        }
    }
    // As a bucket and a key separated by the first newline.
    if let Some((bucket, key)) = text.split_once('\n') {
        check(bucket, key);
    }
});
