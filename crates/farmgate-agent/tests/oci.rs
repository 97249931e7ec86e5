//! `oci::pull` against real registries on loopback: Debian's `docker-registry`, farmgate's
//! registry cache in front of it, and a tiny axum registry for corrupt or hostile answers.

mod common;

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use common::*;
use farmgate_agent::oci::{self, ImageRef, OciError, PullOptions};

fn opts() -> PullOptions {
    PullOptions {
        insecure: true,
        timeout: Duration::from_secs(20),
        ..PullOptions::default()
    }
}

async fn pull(r: &str, dest: &Path, o: &PullOptions) -> Result<oci::ImageConfig, OciError> {
    let image = ImageRef::parse(r).unwrap_or_else(|e| panic!("{r}: {e}"));
    tokio::time::timeout(Duration::from_secs(120), oci::pull(&image, dest, o))
        .await
        .unwrap_or_else(|_| panic!("pulling {r} took over 120 s"))
}

/// The test image: layer 1 (plain tar) a small busybox rootfs, layer 2 (gzip) whiteouts,
/// an opaque directory, a symlink, a hard link and a write through the `lib -> usr/lib`
/// symlink of layer 1.
fn test_image() -> Image {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut secret = file("srv/secret", 0o640, b"s3cret\n");
    secret.uid = 1000;
    secret.gid = 100;
    secret.mtime = 1_600_000_000;
    let mut srv = dir("srv", 0o750);
    srv.uid = 1000;
    srv.gid = 1000;
    let l1 = layer(
        &[
            dir("bin", 0o755),
            file("bin/busybox", 0o755, &busybox),
            symlink("bin/sh", "busybox"),
            dir("etc", 0o755),
            file("etc/hostname", 0o644, b"farm\n"),
            file("etc/removed", 0o644, b"gone in layer 2\n"),
            dir("usr", 0o755),
            dir("usr/lib", 0o755),
            symlink("lib", "usr/lib"),
            dir("opt", 0o755),
            file("opt/old", 0o644, b"old"),
            dir("opt/olddir", 0o700),
            file("opt/olddir/f", 0o644, b"f"),
            srv,
            secret,
            file("srv/suid", 0o4755, b"#!/bin/sh\n"),
            dir("tmp", 0o1777),
            dir("dev", 0o755),
            Entry {
                kind: b'3',
                dev: (1, 3),
                ..file("dev/null", 0o666, b"")
            },
            Entry {
                kind: b'6',
                ..file("dev/fifo", 0o600, b"")
            },
        ],
        OCI_TAR,
    );
    let l2 = layer(
        &[
            file("etc/.wh.removed", 0o644, b""),
            dir("opt", 0o755),
            file("opt/.wh..wh..opq", 0o644, b""),
            file("opt/new", 0o644, b"new"),
            symlink("etc/motd", "hostname"),
            hardlink("etc/hostname.hard", "etc/hostname"),
            file("lib/libfoo.so", 0o755, b"foo"),
        ],
        OCI_TAR_GZ,
    );
    Image::new(
        vec![l1, l2],
        serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
            "Env": ["PATH=/bin", "FARM=1"],
            "WorkingDir": "/srv",
            "User": "1000:100",
        }),
        oci::default_arch(),
        false,
    )
}

/// Checks the rootfs of [`test_image`] at `root`.
fn check_rootfs(root: &Path) {
    let meta =
        |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let host = std::fs::metadata("/bin/busybox").expect("host busybox");
    assert_eq!(meta("bin/busybox").len(), host.len());
    assert_eq!(meta("bin/busybox").permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).expect("bin/sh link"),
        Path::new("busybox")
    );
    // Whiteout and opaque directory.
    assert!(!root.join("etc/removed").exists(), "whiteout not applied");
    assert!(!root.join("opt/old").exists(), "opaque dir kept opt/old");
    assert!(
        !root.join("opt/olddir").exists(),
        "opaque dir kept opt/olddir"
    );
    assert_eq!(
        std::fs::read(root.join("opt/new")).expect("opt/new"),
        b"new"
    );
    // Symlink, hard link.
    assert_eq!(
        std::fs::read_link(root.join("etc/motd")).expect("etc/motd link"),
        Path::new("hostname")
    );
    assert_eq!(meta("etc/hostname.hard").ino(), meta("etc/hostname").ino());
    assert_eq!(meta("etc/hostname").nlink(), 2);
    // Written through the layer-1 symlink lib -> usr/lib, inside the root.
    assert!(meta("lib").file_type().is_symlink(), "lib replaced");
    assert_eq!(
        std::fs::read(root.join("usr/lib/libfoo.so")).expect("libfoo"),
        b"foo"
    );
    // Modes, ownership (root), mtimes.
    assert_eq!(meta("srv/secret").permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta("srv/suid").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("srv").permissions().mode() & 0o7777, 0o750);
    assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(meta("srv/secret").mtime(), 1_600_000_000);
    assert_eq!(meta("srv").mtime(), 1_700_000_000, "directory mtime");
    assert_eq!(meta("etc/motd").mtime(), 1_700_000_000, "symlink mtime");
    assert!(meta("dev/fifo").file_type().is_fifo());
    // Device nodes: created as root, skipped (with a warning) otherwise.
    if is_root() {
        assert!(meta("dev/null").file_type().is_char_device());
        assert_eq!(meta("dev/null").rdev(), 0x103, "major 1, minor 3");
        assert_eq!(meta("dev/null").permissions().mode() & 0o7777, 0o666);
    } else {
        assert!(!root.join("dev/null").exists());
    }
    if is_root() {
        assert_eq!(
            (meta("srv/secret").uid(), meta("srv/secret").gid()),
            (1000, 100)
        );
        assert_eq!((meta("srv").uid(), meta("srv").gid()), (1000, 1000));
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs `chroot root args…` (bounded), returning stdout.
async fn chroot(root: &Path, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("chroot")
            .arg(root)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chroot within 20 s")
    .expect("running chroot");
    assert!(
        out.status.success(),
        "chroot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn pulls_a_two_layer_image_into_a_usable_rootfs() {
    let reg = DockerRegistry::start().await;
    let img = test_image();
    let digest = push_image(&reg, "test/app", "v1", &img).await;
    let work = tempfile::tempdir().expect("temp dir");
    let dest = work.path().join("rootfs");
    let cfg = pull(
        &format!("docker://127.0.0.1:{}/test/app:v1", reg.port),
        &dest,
        &opts(),
    )
    .await
    .expect("pull");
    check_rootfs(&dest);
    assert_eq!(cfg.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(cfg.cmd, ["echo hello"]);
    assert_eq!(cfg.env, ["PATH=/bin", "FARM=1"]);
    assert_eq!(cfg.working_dir.as_deref(), Some("/srv"));
    assert_eq!(cfg.user.as_deref(), Some("1000:100"));
    assert_eq!(cfg.digest, digest);
    // Nothing but the rootfs is left next to it (the download directory is removed).
    assert_eq!(
        tree(work.path())
            .iter()
            .filter(|p| !p.starts_with("rootfs"))
            .count(),
        0
    );
    // A usable root file system.
    assert_eq!(chroot(&dest, &["/bin/busybox", "echo", "ok"]).await, "ok\n");
    assert_eq!(
        chroot(&dest, &["/bin/sh", "-c", "/bin/busybox cat /etc/motd"]).await,
        "farm\n"
    );

    // The same image by digest.
    let dest2 = work.path().join("by-digest");
    let cfg2 = pull(
        &format!("127.0.0.1:{}/test/app@{digest}", reg.port),
        &dest2,
        &opts(),
    )
    .await
    .expect("pull by digest");
    assert_eq!(cfg2, cfg);
    assert_eq!(tree(&dest2), tree(&dest));
}

/// A one-layer image whose file `arch` says which platform it is for.
fn arch_image(arch: &str) -> Image {
    let l = layer(&[file("arch", 0o644, arch.as_bytes())], DOCKER_TAR_GZ);
    Image::new(vec![l], serde_json::json!({"Cmd": [arch]}), arch, true)
}

#[tokio::test]
async fn picks_the_platform_from_a_manifest_list() {
    let reg = DockerRegistry::start().await;
    let (amd, arm) = (arch_image("amd64"), arch_image("arm64"));
    let mut entries = Vec::new();
    for (img, arch, variant) in [(&amd, "amd64", None), (&arm, "arm64", Some("v8"))] {
        let d = push_image(&reg, "multi/app", arch, img).await;
        let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        entries.push(serde_json::json!({
            "mediaType": DOCKER_MANIFEST, "digest": d, "size": img.manifest.len(),
            "platform": platform,
        }));
    }
    let list = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries,
    }))
    .expect("list json");
    let list_digest = reg
        .push_manifest("multi/app", "latest", DOCKER_LIST, &list)
        .await;
    let work = tempfile::tempdir().expect("temp dir");
    let name = format!("127.0.0.1:{}/multi/app", reg.port);
    for arch in ["arm64", "amd64"] {
        let dest = work.path().join(arch);
        let o = PullOptions {
            platform: ("linux".into(), arch.into()),
            ..opts()
        };
        let cfg = pull(&name, &dest, &o).await.expect("pull from list");
        assert_eq!(
            std::fs::read_to_string(dest.join("arch")).expect("arch"),
            arch
        );
        assert_eq!(cfg.cmd, [arch]);
        assert_eq!(cfg.digest, list_digest, "digest of what the tag names");
    }
    // The default platform is the build target's.
    let dest = work.path().join("default");
    pull(&format!("{name}@{list_digest}"), &dest, &opts())
        .await
        .expect("pull by list digest");
    assert_eq!(
        std::fs::read_to_string(dest.join("arch")).expect("arch"),
        oci::default_arch()
    );
    // A platform the list lacks is an error naming what it has.
    let o = PullOptions {
        platform: ("linux".into(), "s390x".into()),
        ..opts()
    };
    let e = pull(&name, &work.path().join("s390x"), &o)
        .await
        .expect_err("no s390x entry");
    let msg = e.to_string();
    assert!(matches!(e, OciError::Manifest { .. }), "{msg}");
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/arm64/v8") && msg.contains("multi/app"),
        "{msg}"
    );
}

#[tokio::test]
async fn pulls_through_the_registry_cache() {
    let reg = DockerRegistry::start().await;
    let img = test_image();
    let digest = push_image(&reg, "test/app", "v1", &img).await;
    let cache = CacheServer::start("upstream.test", format!("http://127.0.0.1:{}", reg.port)).await;
    let r = format!(
        "docker://127.0.0.1:{}/upstream.test/test/app:v1",
        cache.port
    );
    let work = tempfile::tempdir().expect("temp dir");
    let first = pull(&r, &work.path().join("a"), &opts())
        .await
        .expect("first pull");
    check_rootfs(&work.path().join("a"));
    assert_eq!(first.digest, digest);
    let s1 = cache.cache.stats();
    assert_eq!(
        s1.blob_misses, 3,
        "config and two layers fetched upstream: {s1:?}"
    );
    let upstream_blob_gets = reg.count_log("GET /v2/test/app/blobs/");
    assert!(upstream_blob_gets >= 3, "{upstream_blob_gets}");

    let second = pull(&r, &work.path().join("b"), &opts())
        .await
        .expect("second pull");
    assert_eq!(second, first);
    assert_eq!(tree(&work.path().join("b")), tree(&work.path().join("a")));
    let s2 = cache.cache.stats();
    assert_eq!(s2.blob_misses, 3, "{s2:?}");
    assert_eq!(s2.blob_hits, s1.blob_hits + 3, "{s2:?}");
    assert_eq!(
        reg.count_log("GET /v2/test/app/blobs/"),
        upstream_blob_gets,
        "second pull served from the cache"
    );
}

#[tokio::test]
async fn blob_cache_avoids_fetching_layers_again() {
    let reg = DockerRegistry::start().await;
    let img = test_image();
    push_image(&reg, "test/app", "v1", &img).await;
    let work = tempfile::tempdir().expect("temp dir");
    let o = PullOptions {
        blob_cache: Some(work.path().join("blobs")),
        ..opts()
    };
    let r = format!("127.0.0.1:{}/test/app:v1", reg.port);
    let blob_gets = || reg.count_log("GET /v2/test/app/blobs/");
    pull(&r, &work.path().join("a"), &o)
        .await
        .expect("first pull");
    let after_first = blob_gets();
    assert_eq!(after_first, 3, "config and two layers");
    for l in &img.layers {
        let p = work.path().join("blobs/sha256").join(&l.digest[7..]);
        assert_eq!(std::fs::read(&p).expect("cached blob"), l.blob);
    }
    pull(&r, &work.path().join("b"), &o)
        .await
        .expect("second pull");
    assert_eq!(blob_gets(), after_first, "no blob fetched again");
    check_rootfs(&work.path().join("b"));

    // A corrupt cached blob is noticed and fetched again.
    let l2 = work
        .path()
        .join("blobs/sha256")
        .join(&img.layers[1].digest[7..]);
    let mut bytes = std::fs::read(&l2).expect("cached layer");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&l2, bytes).expect("corrupting the cached layer");
    pull(&r, &work.path().join("c"), &o)
        .await
        .expect("third pull");
    assert_eq!(
        blob_gets(),
        after_first + 1,
        "only the corrupt blob fetched again"
    );
    check_rootfs(&work.path().join("c"));
}

#[tokio::test]
async fn hostile_layers_never_write_outside_dest() {
    let reg = DockerRegistry::start().await;
    let work = tempfile::tempdir().expect("temp dir");
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).expect("outside dir");
    let outside_s = outside.display().to_string();
    let passwd_links = std::fs::metadata("/etc/passwd")
        .expect("/etc/passwd")
        .nlink();
    let cases: Vec<(&str, Vec<Entry>, Option<&str>)> = vec![
        ("dotdot", vec![file("../escape", 0o644, b"x")], Some("'..'")),
        (
            "dotdot-deep",
            vec![dir("a", 0o755), file("a/../../escape", 0o644, b"x")],
            Some("'..'"),
        ),
        (
            "absolute",
            vec![file(&format!("{outside_s}/abs"), 0o644, b"x")],
            Some("absolute"),
        ),
        // Written through a planted symlink: resolved inside dest (contained, no error).
        (
            "symlink-absolute",
            vec![symlink("a", &outside_s), file("a/planted", 0o644, b"x")],
            None,
        ),
        (
            "symlink-relative",
            vec![symlink("b", "../../../.."), file("b/planted", 0o644, b"x")],
            None,
        ),
        (
            "symlink-chain",
            vec![
                symlink("c", "d/.."),
                symlink("d", "/"),
                dir("c/etc", 0o755),
                file("c/etc/planted", 0o644, b"x"),
            ],
            None,
        ),
        (
            "hardlink-absolute",
            vec![hardlink("passwd", "/etc/passwd")],
            Some("absolute"),
        ),
        (
            "hardlink-dotdot",
            vec![hardlink("passwd", "../../../../../etc/passwd")],
            Some("'..'"),
        ),
        (
            "hardlink-through-symlink",
            vec![symlink("e", "/etc"), hardlink("passwd", "e/passwd")],
            Some("not in the root file system"),
        ),
        (
            "symlink-loop",
            vec![symlink("l", "l"), file("l/x", 0o644, b"x")],
            Some("too many symlinks"),
        ),
    ];
    for (name, entries, expect) in cases {
        let img = Image::new(
            vec![layer(&entries, OCI_TAR_GZ)],
            serde_json::json!({}),
            oci::default_arch(),
            false,
        );
        let repo = format!("hostile/{name}");
        push_image(&reg, &repo, "v1", &img).await;
        let dest = work.path().join("dests").join(name);
        let r = pull(&format!("127.0.0.1:{}/{repo}:v1", reg.port), &dest, &opts()).await;
        match (expect, r) {
            (Some(want), Err(e)) => {
                let msg = e.to_string();
                assert!(matches!(e, OciError::Layer { .. }), "{name}: {msg}");
                assert!(msg.contains(want), "{name}: {msg}");
                assert!(msg.contains(&repo), "{name}: names the image: {msg}");
                assert!(
                    msg.contains(&img.layers[0].digest),
                    "{name}: names the layer: {msg}"
                );
            }
            (Some(want), Ok(_)) => panic!("{name}: pulled, expected an error with {want:?}"),
            (None, Err(e)) => panic!("{name}: {e}"),
            (None, Ok(_)) => {}
        }
    }
    // Contained results: the writes landed inside their dest.
    let dests = work.path().join("dests");
    let rel_outside = outside.strip_prefix("/").expect("absolute temp dir");
    assert!(
        dests
            .join("symlink-absolute")
            .join(rel_outside)
            .join("planted")
            .is_file()
    );
    assert!(dests.join("symlink-relative/planted").is_file());
    assert!(dests.join("symlink-chain/etc/planted").is_file());
    // Nothing outside.
    assert!(tree(&outside).is_empty(), "{:?}", tree(&outside));
    assert!(!work.path().join("escape").exists());
    assert!(!dests.join("escape").exists());
    assert!(!Path::new("/etc/planted").exists());
    assert_eq!(
        std::fs::metadata("/etc/passwd")
            .expect("/etc/passwd")
            .nlink(),
        passwd_links
    );
    for d in [
        "hardlink-absolute",
        "hardlink-dotdot",
        "hardlink-through-symlink",
    ] {
        assert!(!dests.join(d).join("passwd").exists(), "{d}");
    }
}

#[tokio::test]
async fn corrupt_or_unsupported_answers_are_errors() {
    let reg = FakeRegistry::start().await;
    let work = tempfile::tempdir().expect("temp dir");
    let base = format!("127.0.0.1:{}", reg.port);
    let run = serde_json::json!({"Cmd": ["true"]});
    let arch = oci::default_arch();

    // A good image behind anonymous token auth.
    let good = Image::new(
        vec![layer(&[file("ok", 0o644, b"ok")], OCI_TAR_GZ)],
        run.clone(),
        arch,
        false,
    );
    good.serve(&reg, "fake/good", "v1");
    let dest = work.path().join("good");
    let cfg = pull(&format!("{base}/fake/good:v1"), &dest, &opts())
        .await
        .expect("pull with a token");
    assert_eq!(cfg.cmd, ["true"]);
    assert_eq!(std::fs::read(dest.join("ok")).expect("ok"), b"ok");
    assert!(
        reg.token_requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // A layer whose bytes are not those of its digest (same size).
    let bad = Image::new(
        vec![layer(&[file("evil", 0o644, b"evil")], OCI_TAR_GZ)],
        run.clone(),
        arch,
        false,
    );
    bad.serve(&reg, "fake/bad", "v1");
    let mut tampered = bad.layers[0].blob.clone();
    let n = tampered.len();
    tampered[n - 9] ^= 0x55;
    reg.put(
        &format!("/v2/fake/bad/blobs/{}", bad.layers[0].digest),
        "application/octet-stream",
        tampered,
    );
    let dest = work.path().join("bad");
    let e = pull(&format!("{base}/fake/bad:v1"), &dest, &opts())
        .await
        .expect_err("digest mismatch");
    let msg = e.to_string();
    assert!(matches!(e, OciError::Blob { .. }), "{msg}");
    assert!(
        msg.contains(&bad.layers[0].digest) && msg.contains("fake/bad"),
        "{msg}"
    );
    assert!(msg.contains("has digest"), "{msg}");
    assert!(
        tree(&dest).is_empty(),
        "nothing unpacked: {:?}",
        tree(&dest)
    );
    assert_eq!(
        tree(work.path())
            .iter()
            .filter(|p| p.contains("oci-download"))
            .count(),
        0
    );

    // A blob longer than its descriptor says.
    let mut longer = bad.layers[0].blob.clone();
    longer.push(0);
    reg.put(
        &format!("/v2/fake/bad/blobs/{}", bad.layers[0].digest),
        "application/octet-stream",
        longer,
    );
    let e = pull(
        &format!("{base}/fake/bad:v1"),
        &work.path().join("long"),
        &opts(),
    )
    .await
    .expect_err("size mismatch");
    assert!(matches!(e, OciError::Blob { .. }), "{e}");
    assert!(e.to_string().contains("bytes"), "{e}");

    // A config whose diff_id does not match the uncompressed layer.
    let mut l = layer(&[file("f", 0o644, b"f")], OCI_TAR_GZ);
    l.diff_id = sha256_digest(b"something else");
    Image::new(vec![l], run.clone(), arch, false).serve(&reg, "fake/diffid", "v1");
    let e = pull(
        &format!("{base}/fake/diffid:v1"),
        &work.path().join("diffid"),
        &opts(),
    )
    .await
    .expect_err("diff_id mismatch");
    assert!(matches!(e, OciError::Layer { .. }), "{e}");
    assert!(e.to_string().contains("diff_id"), "{e}");

    // zstd layers.
    let zstd_blob = b"\x28\xb5\x2f\xfd not really zstd".to_vec();
    let zl = Layer {
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        digest: sha256_digest(&zstd_blob),
        diff_id: sha256_digest(b""),
        blob: zstd_blob,
    };
    Image::new(vec![zl], run.clone(), arch, false).serve(&reg, "fake/zstd", "v1");
    let e = pull(
        &format!("{base}/fake/zstd:v1"),
        &work.path().join("zstd"),
        &opts(),
    )
    .await
    .expect_err("zstd");
    assert!(matches!(e, OciError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("zstd"), "{e}");

    // Junk and oversized manifests, a missing tag.
    reg.put(
        "/v2/fake/junk/manifests/v1",
        OCI_MANIFEST,
        b"{not json".to_vec(),
    );
    let e = pull(
        &format!("{base}/fake/junk:v1"),
        &work.path().join("junk"),
        &opts(),
    )
    .await
    .expect_err("junk manifest");
    assert!(matches!(e, OciError::Manifest { .. }), "{e}");
    reg.put(
        "/v2/fake/huge/manifests/v1",
        OCI_MANIFEST,
        vec![b' '; 5 * 1024 * 1024],
    );
    let e = pull(
        &format!("{base}/fake/huge:v1"),
        &work.path().join("huge"),
        &opts(),
    )
    .await
    .expect_err("huge manifest");
    assert!(e.to_string().contains("limit"), "{e}");
    let e = pull(
        &format!("{base}/fake/none:v1"),
        &work.path().join("none"),
        &opts(),
    )
    .await
    .expect_err("missing tag");
    assert!(matches!(e, OciError::Registry { .. }), "{e}");
    assert!(e.to_string().contains("404"), "{e}");

    // A manifest whose digest is not the one asked for.
    let other = format!("sha256:{}", "0".repeat(64));
    reg.put(
        &format!("/v2/fake/good/manifests/{other}"),
        OCI_MANIFEST,
        good.manifest.clone(),
    );
    let e = pull(
        &format!("{base}/fake/good@{other}"),
        &work.path().join("d"),
        &opts(),
    )
    .await
    .expect_err("manifest digest mismatch");
    assert!(matches!(e, OciError::Manifest { .. }), "{e}");
}
