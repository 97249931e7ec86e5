//! Arbitrary bytes as the head and the tail of a block device, and as a `b2c.swap` size:
//! `identify`, `parse_ext`, `has_backup_gpt` and `parse_size` must be total (never panic)
//! and their answers consistent.
//!
//! Signatures sit as far as 64 KiB into a device, so besides the raw input the target also
//! builds a sparse [`HEAD_LEN`] image from it: the input is read as patches
//! `(offset: u24 LE, len: u8, bytes)` written over zeroes, which lets small inputs reach
//! the btrfs, ISO 9660 and 64 KiB-page swap offsets.
#![no_main]

use farmgate_agent::cachedev::{self, HEAD_LEN, MIN_SWAP_BYTES, Signature, TAIL_LEN};
use libfuzzer_sys::fuzz_target;

fn check_head(head: &[u8]) {
    let found = cachedev::identify(head);
    let ext = cachedev::parse_ext(head);
    // The ext superblock, when present, is reported first, as parse_ext reports it.
    assert_eq!(
        ext.as_ref(),
        found.first().filter(|s| matches!(s, Signature::Ext { .. }))
    );
    for s in &found {
        let _ = (s.describe(), s.is_partition_table());
        match s {
            Signature::Ext { version, label } => {
                assert!((2..=4).contains(version), "{s:?}");
                assert!(!label.contains('\0'), "{s:?}");
                assert!(label.len() <= 16 * 3, "{s:?}");
            }
            Signature::Swap { label } => assert!(!label.contains('\0'), "{s:?}"),
            Signature::Mbr | Signature::BootSector => {
                assert!(head.get(510..512) == Some(&[0x55, 0xAA][..]), "{s:?}");
                assert!(!found.contains(&Signature::Gpt), "{found:?}");
            }
            _ => {}
        }
    }
    let mut kinds: Vec<_> = found.iter().map(std::mem::discriminant).collect();
    let n = kinds.len();
    kinds.dedup();
    assert_eq!(kinds.len(), n, "a signature reported twice: {found:?}");
    // Bytes beyond HEAD_LEN are never looked at.
    if head.len() > HEAD_LEN {
        assert_eq!(cachedev::identify(&head[..HEAD_LEN]), found);
    }
}

fn check_tail(tail: &[u8]) {
    let gpt = cachedev::has_backup_gpt(tail);
    let n = tail.len();
    let at = |back: usize| n >= back && tail[n - back..].starts_with(b"EFI PART");
    assert_eq!(gpt, at(512) || at(4096));
    if n > TAIL_LEN {
        // Only the last TAIL_LEN bytes matter.
        assert_eq!(cachedev::has_backup_gpt(&tail[n - TAIL_LEN..]), gpt);
    }
}

fn sparse_image(data: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; HEAD_LEN];
    let mut rest = data;
    while let [a, b, c, len, tail @ ..] = rest {
        let off = usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16;
        let off = off % HEAD_LEN;
        let len = usize::from(*len).min(tail.len()).min(HEAD_LEN - off);
        img[off..off + len].copy_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    img
}

fuzz_target!(|data: &[u8]| {
    check_head(data);
    check_tail(data);
    let img = sparse_image(data);
    check_head(&img);
    check_tail(&img);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(bytes) = cachedev::parse_size(text)
    {
        assert!(bytes >= MIN_SWAP_BYTES, "{text:?} -> {bytes}");
        assert_eq!(
            cachedev::parse_size(&bytes.to_string()),
            Ok(bytes),
            "{text:?}"
        );
    }
});
