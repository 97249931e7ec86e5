//! Arbitrary datagrams as TFTP packets: parsing must return errors, never panic; encoding
//! what parsed must parse back to the same packet; a read request's file name must never
//! resolve outside the root.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use farmgate_netboot::packet::{self, Packet};
use libfuzzer_sys::fuzz_target;

/// A small root (`<tmp>/farmgate-netboot-fuzz-<pid>/root`) with a file, a directory, an
/// inside symlink and an outside symlink, plus a file next to the root.
fn root() -> &'static (PathBuf, PathBuf) {
    static ROOT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base =
            std::env::temp_dir().join(format!("farmgate-netboot-fuzz-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("dir")).expect("creating the fuzz root");
        std::fs::write(root.join("file"), b"x").expect("writing the fuzz root");
        std::fs::write(base.join("secret"), b"s").expect("writing the fuzz root");
        let _ = std::os::unix::fs::symlink(base.join("secret"), root.join("out"));
        let _ = std::os::unix::fs::symlink("file", root.join("dir/in"));
        let canonical = root.canonicalize().expect("canonicalizing the fuzz root");
        (root, canonical)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(p) = packet::parse(data) else { return };
    assert_eq!(
        packet::parse(&p.encode()).as_ref(),
        Ok(&p),
        "encode/parse round trip"
    );
    if let Packet::Rrq(req) | Packet::Wrq(req) = &p {
        let (root, canonical) = root();
        if let Ok(path) = farmgate_netboot::resolve(root, &req.filename) {
            assert!(
                path.starts_with(canonical),
                "{:?} resolved to {path:?}",
                req.filename
            );
        }
    }
});
