//! Volumes mirrored with buckets of the gateway's real S3 server (farmgate-s3 on loopback):
//! pull, push with overwrite/remove/exclude, the `changes` watcher, restricted keys,
//! unusual key names, a 20 MiB round trip, pagination; checked with the store's own API
//! and boto3.

use std::path::Path;
use std::time::Duration;

use farmgate_agent::cmdline::{Trigger, parse};
use farmgate_agent::volume::{PayloadSigning, SyncReport, VolumeError, VolumeMirror};
use farmgate_s3::{Credentials, new_credentials};

/// Bound of a whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The gateway's S3 test fixtures (the store served on loopback, the admin key).
#[path = "../../farmgate-s3/tests/common/mod.rs"]
mod s3common;

use s3common::{Server, admin};

impl Server {
    /// The mirror of `b2c.volume="vol,<opts>"` with alias `job` using `creds`.
    fn mirror(&self, creds: &Credentials, opts: &str, dir: &Path) -> VolumeMirror {
        let cmdline = format!(
            r#"b2c.minio="job,{},{},{}" b2c.volume="vol,{opts}""#,
            self.endpoint(),
            creds.access_key,
            creds.secret_key
        );
        let cfg = parse(&cmdline).expect("valid command line");
        VolumeMirror::new(&cfg.volumes[0], &cfg.minio, dir).expect("valid volume")
    }

    fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.store
            .read_object_to(bucket, key, &mut out)
            .unwrap_or_else(|e| panic!("read {bucket}/{key}: {e}"));
        out
    }

    fn keys(&self, bucket: &str) -> Vec<String> {
        self.store
            .list_objects(bucket)
            .expect("list")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("the test did not finish in time")
}

fn write(dir: &Path, rel: &str, data: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(&p, data).expect("write");
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Local files, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("inside");
                out.push(rel.to_str().expect("utf-8").to_string());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    sorted(out)
}

/// Runs a boto3 script (the endpoint and credentials in the environment); its stdout.
async fn boto3(server: &Server, creds: &Credentials, script: &str) -> String {
    let prelude = "import boto3, os, sys, json, hashlib\n\
        from botocore.config import Config\n\
        s3 = boto3.client('s3', endpoint_url=os.environ['EP'], region_name='us-east-1',\n\
            aws_access_key_id=os.environ['AK'], aws_secret_access_key=os.environ['SK'],\n\
            config=Config(s3={'addressing_style': 'path'}, signature_version='s3v4'))\n";
    let mut cmd = tokio::process::Command::new("/usr/bin/python3");
    cmd.arg("-c")
        .arg(format!("{prelude}{script}"))
        .env("EP", server.endpoint())
        .env("AK", &creds.access_key)
        .env("SK", &creds.secret_key)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("boto3 finished in time")
        .expect("run python3 (install python3-boto3)");
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn copied(r: &SyncReport) -> Vec<String> {
    sorted(r.copied.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_nested_bucket_then_push_changes_with_overwrite_and_remove() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("job-bucket-1").expect("bucket");
        let objects: &[(&str, &[u8])] = &[
            ("a.txt", b"alpha"),
            ("dir/b.txt", b"bravo"),
            ("dir/sub/c.bin", &[0, 1, 2, 255]),
            (
                "with space/\u{fc}n\u{ef}c\u{f8}d\u{e9} file+x.txt",
                b"unicode",
            ),
        ];
        for (k, v) in objects {
            server.store.put_object("job-bucket-1", k, v).expect("put");
        }
        let vol = tempfile::tempdir().expect("temp dir");
        let dir = vol.path().join("job-volume");
        let mut m = server.mirror(
            &admin(),
            "mirror=job/job-bucket-1,pull_on=pipeline_start,push_on=pipeline_end,overwrite,remove",
            &dir,
        );
        let r = m.on(Trigger::PipelineStart).await.expect("pull");
        let mut want: Vec<String> = objects.iter().map(|(k, _)| k.to_string()).collect();
        want.sort();
        assert_eq!(copied(&r), want);
        assert_eq!(files(&dir), want);
        for (k, v) in objects {
            assert_eq!(std::fs::read(dir.join(k)).expect("pulled file"), *v, "{k}");
        }
        // A second pull has nothing to do.
        assert_eq!(
            m.pull().await.expect("pull again").copied,
            Vec::<String>::new()
        );

        // The "containers" change, add and delete files.
        write(&dir, "a.txt", b"alpha, changed by the job");
        write(&dir, "new/deep/result.json", b"{\"ok\":true}");
        write(&dir, "\u{65e5}\u{672c} name with spaces.log", b"log");
        std::fs::remove_file(dir.join("dir/b.txt")).expect("rm");
        let r = m.on(Trigger::PipelineEnd).await.expect("push");
        assert_eq!(
            copied(&r),
            sorted(vec![
                "a.txt".into(),
                "new/deep/result.json".into(),
                "\u{65e5}\u{672c} name with spaces.log".into()
            ])
        );
        assert_eq!(r.deleted, vec!["dir/b.txt".to_string()]);
        assert_eq!(
            server.object("job-bucket-1", "a.txt"),
            b"alpha, changed by the job"
        );
        assert_eq!(
            server.object("job-bucket-1", "new/deep/result.json"),
            b"{\"ok\":true}"
        );

        // boto3 sees the exact names.
        let listed = boto3(
            &server,
            &admin(),
            "r = s3.list_objects_v2(Bucket='job-bucket-1')\n\
             print(json.dumps(sorted(o['Key'] for o in r['Contents'])))\n",
        )
        .await;
        let listed: Vec<String> = serde_json::from_str(listed.trim()).expect("json");
        assert_eq!(listed, files(&dir));
        assert!(listed.contains(&"\u{65e5}\u{672c} name with spaces.log".to_string()));
        assert!(!listed.contains(&"dir/b.txt".to_string()));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_overwrite_and_remove_nothing_is_replaced_or_deleted() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("bkt-one").expect("bucket");
        server
            .store
            .put_object("bkt-one", "same.txt", b"remote")
            .expect("put");
        server
            .store
            .put_object("bkt-one", "gone-locally.txt", b"x")
            .expect("put");
        let vol = tempfile::tempdir().expect("temp dir");
        let m = server.mirror(&admin(), "mirror=job/bkt-one", vol.path());
        m.pull().await.expect("pull");
        // Changed locally, later than the object: differs, but no `overwrite`.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        write(vol.path(), "same.txt", b"local version");
        std::fs::remove_file(vol.path().join("gone-locally.txt")).expect("rm");
        write(vol.path(), "added.txt", b"added");
        let r = m.push().await.expect("push");
        assert_eq!(r.copied, vec!["added.txt".to_string()]);
        assert!(r.deleted.is_empty(), "{r:?}");
        assert_eq!(r.skipped.len(), 1, "{r:?}");
        assert_eq!(r.skipped[0].0, "same.txt");
        assert!(r.skipped[0].1.contains("overwrite"), "{r:?}");
        assert_eq!(server.object("bkt-one", "same.txt"), b"remote");
        assert_eq!(
            server.keys("bkt-one"),
            ["added.txt", "gone-locally.txt", "same.txt"]
        );
        // Nor does a pull replace the local version.
        let r = m.pull().await.expect("pull");
        assert_eq!(r.copied, vec!["gone-locally.txt".to_string()]);
        assert_eq!(
            std::fs::read(vol.path().join("same.txt")).expect("file"),
            b"local version"
        );

        // pull_from with `remove`: local files missing from the bucket go.
        let other = tempfile::tempdir().expect("temp dir");
        write(other.path(), "stale.txt", b"old");
        let m = server.mirror(&admin(), "pull_from=job/bkt-one,remove", other.path());
        let r = m.pull().await.expect("pull");
        assert_eq!(r.deleted, vec!["stale.txt".to_string()]);
        assert_eq!(
            files(other.path()),
            ["added.txt", "gone-locally.txt", "same.txt"]
        );
        // A push_to-less volume pushes nothing.
        assert_eq!(m.push().await.expect("no-op"), SyncReport::default());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excludes_and_prefix_are_honoured_both_ways() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("bkt-two").expect("bucket");
        server
            .store
            .put_object("bkt-two", "outside.txt", b"o")
            .expect("put");
        server
            .store
            .put_object("bkt-two", "sub/dir/keep.txt", b"k")
            .expect("put");
        server
            .store
            .put_object("bkt-two", "sub/dir/remote.tmp", b"t")
            .expect("put");
        let vol = tempfile::tempdir().expect("temp dir");
        let m = server.mirror(
            &admin(),
            "mirror=job/bkt-two/sub/dir,overwrite,remove,exclude=*.tmp,exclude=cache/*",
            vol.path(),
        );
        let r = m.pull().await.expect("pull");
        assert_eq!(r.copied, vec!["keep.txt".to_string()]);
        assert_eq!(files(vol.path()), ["keep.txt"]);

        write(vol.path(), "x/scratch.tmp", b"no");
        write(vol.path(), "cache/blob", b"no");
        write(vol.path(), "results/out.txt", b"yes");
        let r = m.push().await.expect("push");
        assert_eq!(r.copied, vec!["results/out.txt".to_string()]);
        // The excluded remote object is not removed, the object outside the prefix neither.
        assert!(r.deleted.is_empty(), "{r:?}");
        assert_eq!(
            server.keys("bkt-two"),
            [
                "outside.txt",
                "sub/dir/keep.txt",
                "sub/dir/remote.tmp",
                "sub/dir/results/out.txt"
            ]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_pushed_while_the_pipeline_runs() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("bkt-three").expect("bucket");
        server.store.put_object("bkt-three", "input.txt", b"in").expect("put");
        let vol = tempfile::tempdir().expect("temp dir");
        let mut m = server.mirror(
            &admin(),
            "mirror=job/bkt-three,pull_on=pipeline_start,push_on=changes|pipeline_end,overwrite,exclude=*.part",
            vol.path(),
        );
        m.on(Trigger::PipelineStart).await.expect("start");
        assert!(m.watching());
        assert_eq!(files(vol.path()), ["input.txt"]);
        // Other push triggers are ignored while watching.
        assert_eq!(
            m.on(Trigger::ContainerEnd).await.expect("container end"),
            SyncReport::default()
        );

        // A "container" writes files while running.
        write(vol.path(), "progress/step1.txt", b"step 1 done");
        write(vol.path(), "ignored.part", b"excluded");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if server.keys("bkt-three").contains(&"progress/step1.txt".to_string()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watcher did not push progress/step1.txt within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(server.object("bkt-three", "progress/step1.txt"), b"step 1 done");

        // Changed again: pushed again (overwrite).
        write(vol.path(), "progress/step1.txt", b"step 1 done, amended");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while server.object("bkt-three", "progress/step1.txt") != b"step 1 done, amended" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watcher did not push the change within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Written just before the end: the final push takes it.
        write(vol.path(), "final.txt", b"last words");
        let r = m.on(Trigger::PipelineEnd).await.expect("end");
        assert!(!m.watching());
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(server.object("bkt-three", "final.txt"), b"last words");
        assert_eq!(
            server.keys("bkt-three"),
            ["final.txt", "input.txt", "progress/step1.txt"]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_key_works_on_its_bucket_and_is_refused_elsewhere() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("job-bucket-7").expect("bucket");
        server.store.create_bucket("other-bucket").expect("bucket");
        server
            .store
            .put_object("other-bucket", "secret.txt", b"s")
            .expect("put");
        let key = new_credentials();
        server
            .store
            .add_key(key.clone(), vec!["job-bucket-7".into()])
            .expect("add key");

        let vol = tempfile::tempdir().expect("temp dir");
        write(vol.path(), "result.txt", b"mine");
        let m = server.mirror(&key, "mirror=job/job-bucket-7", vol.path());
        assert_eq!(
            m.push().await.expect("push with the job key").copied,
            vec!["result.txt".to_string()]
        );
        assert_eq!(server.object("job-bucket-7", "result.txt"), b"mine");
        let fresh = tempfile::tempdir().expect("temp dir");
        let m = server.mirror(&key, "mirror=job/job-bucket-7", fresh.path());
        m.pull().await.expect("pull with the job key");
        assert_eq!(files(fresh.path()), ["result.txt"]);

        let other = tempfile::tempdir().expect("temp dir");
        let m = server.mirror(&key, "mirror=job/other-bucket", other.path());
        let err = m.pull().await.expect_err("another bucket must be refused");
        match &err {
            VolumeError::S3(f) => {
                assert_eq!(f.alias, "job");
                assert_eq!(f.bucket, "other-bucket");
                assert_eq!(f.code, "AccessDenied");
                assert_eq!(f.status, 403);
            }
            e => panic!("expected an S3 error, got {e}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("\"job\"") && msg.contains("other-bucket") && msg.contains("AccessDenied"),
            "{msg}"
        );
        write(other.path(), "x.txt", b"x");
        let err = m
            .push()
            .await
            .expect_err("pushing there must be refused too");
        assert!(err.to_string().contains("AccessDenied"), "{err}");
        assert_eq!(server.keys("other-bucket"), ["secret.txt"]);

        // Unknown alias and bad secret are clear too.
        let cfg = parse(&format!(
            r#"b2c.minio="job,{},{},wrong" b2c.volume="vol,mirror=nope/b""#,
            server.endpoint(),
            key.access_key
        ))
        .expect("valid command line");
        let err = VolumeMirror::new(&cfg.volumes[0], &cfg.minio, other.path())
            .expect_err("unknown alias");
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let bad = Credentials {
            access_key: key.access_key.clone(),
            secret_key: "wrongwrongwrong".into(),
        };
        let m = server.mirror(&bad, "mirror=job/job-bucket-7", other.path());
        let err = m.pull().await.expect_err("bad secret");
        assert!(err.to_string().contains("SignatureDoesNotMatch"), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_round_trip_and_expiration() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("big").expect("bucket");
        let vol = tempfile::tempdir().expect("temp dir");
        let dir = vol.path().join("v");
        std::fs::create_dir(&dir).expect("mkdir");
        // Pseudo-random content (xorshift), so a shifted or truncated copy shows.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let data: Vec<u8> = (0..20 * 1024 * 1024 / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        write(&dir, "blobs/big file.bin", &data);
        let mut m = server.mirror(
            &admin(),
            "mirror=job/big,push_on=pipeline_end,expiration=pipeline_end",
            &dir,
        );
        m.set_payload_signing(PayloadSigning::Sha256);
        let r = m.on(Trigger::PipelineEnd).await.expect("push");
        assert_eq!(r.bytes, data.len() as u64);
        // expiration=pipeline_end: the directory is emptied, the bucket kept.
        assert!(dir.exists());
        assert!(files(&dir).is_empty());

        let digest = boto3(
            &server,
            &admin(),
            "b = s3.get_object(Bucket='big', Key='blobs/big file.bin')['Body'].read()\n\
             print(len(b), hashlib.sha256(b).hexdigest())\n",
        )
        .await;
        let want = {
            use sha2::Digest;
            format!(
                "{} {}",
                data.len(),
                hex::encode(sha2::Sha256::digest(&data))
            )
        };
        assert_eq!(digest.trim(), want);

        let back = tempfile::tempdir().expect("temp dir");
        let m = server.mirror(&admin(), "mirror=job/big", back.path());
        let r = m.pull().await.expect("pull");
        assert_eq!(r.bytes, data.len() as u64);
        assert!(
            std::fs::read(back.path().join("blobs/big file.bin")).expect("pulled") == data,
            "the pulled 20 MiB file differs"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_longer_than_one_page_are_followed() {
    bounded(async {
        let server = Server::start_temp().await;
        server.store.create_bucket("many").expect("bucket");
        for i in 0..1105 {
            server
                .store
                .put_object("many", &format!("d{}/f{i:04}", i % 3), b"x")
                .expect("put");
        }
        let vol = tempfile::tempdir().expect("temp dir");
        let m = server.mirror(&admin(), "mirror=job/many", vol.path());
        let r = m.pull().await.expect("pull");
        assert_eq!(r.copied.len(), 1105);
        assert_eq!(files(vol.path()).len(), 1105);
    })
    .await
}
