//! Remote mode against a real external S3 store: moto's S3 server (PyPI `moto[server]`,
//! run as `python3 -m moto.server`). Clients (aws-cli, boto3, raw HTTP) talk to the
//! gateway; the objects are checked in moto with boto3 pointed directly at it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
mod common;

use common::{Aws, Server, admin};
use farmgate_s3::sigv4;
use farmgate_s3::{Credentials, RemoteStore, S3Config, S3Error, new_credentials};

const INSTALL: &str = "install moto, boto3 and aws-cli with \
    `python3 -m pip install 'moto[server]' boto3 awscli`";

/// The credentials of the external store (moto accepts any).
fn store_creds() -> Credentials {
    Credentials {
        access_key: "MOTOACCESSKEY0000000".into(),
        secret_key: "motosecretmotosecretmotosecretmotosecret".into(),
    }
}

/// moto's S3 server on a free loopback port; killed when dropped.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    async fn start(dir: &Path) -> Moto {
        // Below the ephemeral range: no outgoing connection can take it meanwhile.
        let port = farmgate_testkit::ports::free_port();
        let log = std::fs::File::create(dir.join(format!("moto-{port}.log"))).expect("moto log");
        let err = log.try_clone().expect("clone log handle");
        let child = match Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot run python3 -m moto.server ({e}): {INSTALL}"),
        };
        let mut moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = client
                .get(format!("{}/", moto.url))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return moto;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("moto-{port}.log")))
                    .unwrap_or_default();
                panic!("moto exited ({status}) before answering: {INSTALL}\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "moto did not answer GET / on {} within 60 s",
                moto.url
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The gateway in remote mode on 127.0.0.1, in front of the store at `store_url`.
async fn gateway(root: &Path, store_url: &str) -> Server {
    let mut cfg = S3Config::new(root, admin());
    cfg.remote = Some(RemoteStore {
        url: store_url.to_string(),
        region: "us-east-1".into(),
        creds: store_creds(),
    });
    Server::serve(cfg).await
}

/// aws-cli and boto3 for one endpoint (the gateway, or moto itself) and one key; boto3
/// without retries, so errors show at once.
fn clients(endpoint: &str, creds: Credentials, dir: &Path) -> Aws {
    Aws::new(endpoint, creds, dir, INSTALL).boto3_no_retries()
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_objects_go_to_the_external_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path()).await;
    let gw = gateway(&dir.path().join("root"), &moto.url).await;
    let aws = clients(&gw.endpoint(), admin(), dir.path());
    let direct = clients(&moto.url, store_creds(), dir.path());

    aws.ok(&["s3", "mb", "s3://alpha"]).await;
    // 13 MiB: aws-cli uploads it in two parts (8 MiB threshold and part size).
    let big = dir.path().join("big.bin");
    let data = pattern(13 << 20, 1);
    std::fs::write(&big, &data).expect("write file");
    let big_s = big.display().to_string();
    aws.ok(&["s3", "cp", &big_s, "s3://alpha/dir/big.bin"])
        .await;
    let head = aws
        .ok(&[
            "s3api",
            "head-object",
            "--bucket",
            "alpha",
            "--key",
            "dir/big.bin",
        ])
        .await;
    assert!(head.contains("-2\\\""), "multipart ETag expected: {head}");
    let ls = aws.ok(&["s3", "ls", "--recursive", "s3://alpha"]).await;
    assert!(ls.contains(&format!("{} dir/big.bin", 13 << 20)), "{ls}");

    let back = dir.path().join("back.bin");
    aws.ok(&[
        "s3",
        "cp",
        "s3://alpha/dir/big.bin",
        &back.display().to_string(),
    ])
    .await;
    assert!(
        std::fs::read(&back).expect("read download") == data,
        "the download through the gateway differs from the upload"
    );
    let part = dir.path().join("part.bin");
    aws.ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "alpha",
        "--key",
        "dir/big.bin",
        "--range",
        "bytes=1000-1999",
        &part.display().to_string(),
    ])
    .await;
    assert_eq!(std::fs::read(&part).expect("read part"), &data[1000..2000]);

    // A presigned GET through the gateway, fetched by a plain HTTP client.
    let url = aws
        .ok(&[
            "s3",
            "presign",
            "s3://alpha/dir/big.bin",
            "--expires-in",
            "300",
        ])
        .await;
    let resp = reqwest::Client::new()
        .get(url.trim())
        .header("range", "bytes=0-99")
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET presigned URL");
    assert_eq!(resp.status(), 206, "presigned ranged GET {url}");
    let got = resp.bytes().await.expect("read presigned body");
    assert!(got.as_ref() == &data[..100], "presigned GET differs");

    let out = aws
        .boto3(
            r#"
s3.put_object(Bucket='alpha', Key='notes/a b.txt', Body=b'hello remote', ContentType='text/plain', Metadata={'who': 'boto3'})
o = s3.get_object(Bucket='alpha', Key='notes/a b.txt')
print(o['Body'].read().decode(), o['ContentType'], o['Metadata'])
r = s3.get_object(Bucket='alpha', Key='notes/a b.txt', Range='bytes=6-11')
print(r['Body'].read().decode(), r['ContentRange'])
print(sorted(x['Key'] for x in s3.list_objects_v2(Bucket='alpha')['Contents']))
s3.put_object(Bucket='alpha', Key='gone.txt', Body=b'x')
s3.delete_object(Bucket='alpha', Key='gone.txt')
try:
    s3.head_object(Bucket='alpha', Key='gone.txt')
except ClientError as e:
    print('deleted', e.response['ResponseMetadata']['HTTPStatusCode'])
try:
    s3.get_object(Bucket='alpha', Key='nope')
except ClientError as e:
    print('missing', e.response['Error']['Code'])
"#,
        )
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "hello remote text/plain {'who': 'boto3'}",
        "{out}"
    );
    assert_eq!(lines[1], "remote bytes 6-11/12", "{out}");
    assert_eq!(lines[2], "['dir/big.bin', 'notes/a b.txt']", "{out}");
    assert_eq!(lines[3], "deleted 404", "{out}");
    assert_eq!(lines[4], "missing NoSuchKey", "{out}");

    // Everything is really in moto.
    let out = direct
        .boto3(
            r#"
print(sorted((x['Key'], x['Size']) for x in s3.list_objects_v2(Bucket='alpha')['Contents']))
o = s3.get_object(Bucket='alpha', Key='notes/a b.txt')
print(o['Body'].read().decode(), o['Metadata'])
import hashlib
print(hashlib.sha256(s3.get_object(Bucket='alpha', Key='dir/big.bin')['Body'].read()).hexdigest())
"#,
        )
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("[('dir/big.bin', {}), ('notes/a b.txt', 12)]", 13 << 20),
        "{out}"
    );
    assert_eq!(lines[1], "hello remote {'who': 'boto3'}", "{out}");
    assert_eq!(lines[2], sigv4::sha256_hex(&data), "{out}");
    // No object data on local disk.
    let local: Vec<String> = std::fs::read_dir(dir.path().join("root"))
        .expect("list root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        local.iter().all(|n| n.starts_with(".farmgate-keys")),
        "{local:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_key_only_reaches_its_bucket_in_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path()).await;
    let gw = gateway(&dir.path().join("root"), &moto.url).await;
    let direct = clients(&moto.url, store_creds(), dir.path());
    // Bucket B made directly in moto; bucket A through the sync API.
    direct
        .boto3(
            "s3.create_bucket(Bucket='other-b')\n\
             s3.put_object(Bucket='other-b', Key='secret.txt', Body=b'not yours')\n",
        )
        .await;
    gw.store.create_bucket("job-a").expect("create job-a");
    let creds = new_credentials();
    gw.store
        .add_key(creds.clone(), vec!["job-a".into()])
        .expect("add key");
    let job = clients(&gw.endpoint(), creds.clone(), dir.path());

    let file = dir.path().join("artifact.txt");
    std::fs::write(&file, b"job output").expect("write");
    let file_s = file.display().to_string();
    job.ok(&["s3", "cp", &file_s, "s3://job-a/artifact.txt"])
        .await;
    let back = dir.path().join("artifact.back");
    job.ok(&[
        "s3",
        "cp",
        "s3://job-a/artifact.txt",
        &back.display().to_string(),
    ])
    .await;
    assert_eq!(std::fs::read(&back).expect("read"), b"job output");
    let ls = job.ok(&["s3", "ls", "s3://job-a/"]).await;
    assert!(ls.contains("artifact.txt"), "{ls}");
    let buckets = job.ok(&["s3", "ls"]).await;
    assert!(buckets.contains("job-a"), "{buckets}");
    assert!(
        !buckets.contains("other-b"),
        "a job key must only see its own bucket: {buckets}"
    );
    job.fails(&["s3", "ls", "s3://other-b/"], "AccessDenied")
        .await;
    job.fails(&["s3", "cp", &file_s, "s3://other-b/x.txt"], "AccessDenied")
        .await;
    let stolen = dir.path().join("stolen.txt").display().to_string();
    job.fails(&["s3", "cp", "s3://other-b/secret.txt", &stolen], "403")
        .await;
    job.fails(
        &[
            "s3api",
            "copy-object",
            "--bucket",
            "job-a",
            "--key",
            "stolen.txt",
            "--copy-source",
            "other-b/secret.txt",
        ],
        "AccessDenied",
    )
    .await;
    // A copy inside its own bucket is allowed.
    job.ok(&[
        "s3api",
        "copy-object",
        "--bucket",
        "job-a",
        "--key",
        "copy.txt",
        "--copy-source",
        "job-a/artifact.txt",
    ])
    .await;

    let out = direct
        .boto3(
            r#"
print(sorted(x['Key'] for x in s3.list_objects_v2(Bucket='job-a')['Contents']))
print(sorted(x['Key'] for x in s3.list_objects_v2(Bucket='other-b')['Contents']))
print(s3.get_object(Bucket='job-a', Key='copy.txt')['Body'].read().decode())
"#,
        )
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "['artifact.txt', 'copy.txt']", "{out}");
    assert_eq!(lines[1], "['secret.txt']", "{out}");
    assert_eq!(lines[2], "job output", "{out}");

    gw.store.remove_key(&creds.access_key).expect("remove key");
    job.fails(&["s3", "ls", "s3://job-a/"], "InvalidAccessKeyId")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_api_in_remote_mode_from_a_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path()).await;
    let gw = gateway(&dir.path().join("root"), &moto.url).await;
    let store = gw.store.clone();
    assert_eq!(store.remote_url(), Some(moto.url.as_str()));

    // Called right in the runtime's worker thread.
    store.create_bucket("sync-b").expect("create bucket");
    assert!(store.bucket_exists("sync-b"));
    assert!(!store.bucket_exists("never-made"));
    assert!(matches!(
        store.create_bucket("sync-b"),
        Err(S3Error::BucketExists { .. })
    ));
    let big = pattern(3 << 20, 9);
    store
        .put_object("sync-b", "logs/big.bin", &big)
        .expect("put big");
    store
        .put_object("sync-b", "a.txt", b"first")
        .expect("put a");
    assert_eq!(
        store.list_objects("sync-b").expect("list"),
        [
            ("a.txt".to_string(), 5),
            ("logs/big.bin".to_string(), big.len() as u64)
        ]
    );
    let mut out = Vec::new();
    let n = store
        .read_object_to("sync-b", "logs/big.bin", &mut out)
        .expect("read object");
    assert_eq!(n, big.len() as u64);
    assert!(out == big, "read_object_to differs from put_object");
    assert!(matches!(
        store.read_object_to("sync-b", "missing", &mut Vec::new()),
        Err(S3Error::NoSuchKey { .. })
    ));
    assert!(matches!(
        store.list_objects("never-made"),
        Err(S3Error::NoSuchBucket { .. })
    ));
    assert!(matches!(
        store.object_path("sync-b", "a.txt"),
        Err(S3Error::Remote { .. })
    ));

    // From spawn_blocking, with many objects (ListObjectsV2 pages of 1000) and an
    // unfinished multipart upload that the recursive delete aborts.
    let s = store.clone();
    let listed = tokio::task::spawn_blocking(move || {
        for i in 0..1005 {
            s.put_object("sync-b", &format!("many/{i:04}"), b"x")
                .expect("put many");
        }
        s.list_objects("sync-b").expect("list many").len()
    })
    .await
    .expect("blocking task");
    assert_eq!(listed, 1007);
    let direct = clients(&moto.url, store_creds(), dir.path());
    direct
        .boto3("s3.create_multipart_upload(Bucket='sync-b', Key='unfinished')\n")
        .await;
    // Both at once from worker threads: no deadlock.
    let (a, b) = (store.clone(), store.clone());
    let t1 = tokio::spawn(async move { a.list_objects("sync-b").map(|l| l.len()) });
    let t2 = tokio::spawn(async move {
        let mut v = Vec::new();
        b.read_object_to("sync-b", "a.txt", &mut v).map(|_| v)
    });
    let (l1, l2) = tokio::time::timeout(Duration::from_secs(60), async {
        (t1.await.expect("task"), t2.await.expect("task"))
    })
    .await
    .expect("concurrent sync calls finished");
    assert_eq!(l1.expect("list"), 1007);
    assert_eq!(l2.expect("read"), b"first");

    store
        .delete_bucket_recursive("sync-b")
        .expect("delete bucket recursively");
    assert!(!store.bucket_exists("sync-b"));
    let out = direct
        .boto3("print([b['Name'] for b in s3.list_buckets()['Buckets']])\n")
        .await;
    assert_eq!(out.trim(), "[]", "moto still has buckets");
}

/// Signs and sends an aws-chunked (signed chunks) PUT through the gateway.
async fn chunked_put(gw: &Server, path: &str, data: &[u8], tamper: bool) -> (u16, String) {
    let now = Utc::now();
    let datetime = now.format("%Y%m%dT%H%M%SZ").to_string();
    let date = now.format("%Y%m%d").to_string();
    let headers = vec![
        ("host".to_string(), gw.addr.to_string()),
        ("content-encoding".to_string(), "aws-chunked".to_string()),
        (
            "x-amz-decoded-content-length".to_string(),
            data.len().to_string(),
        ),
        (
            "x-amz-content-sha256".to_string(),
            sigv4::STREAMING_PAYLOAD.to_string(),
        ),
        ("x-amz-date".to_string(), datetime.clone()),
    ];
    let a = admin();
    let auth = sigv4::authorization_for(
        &sigv4::OutgoingRequest {
            method: "PUT",
            canonical_uri: &sigv4::canonical_uri(path),
            canonical_query: "",
            headers: &headers,
            payload_hash: sigv4::STREAMING_PAYLOAD,
            datetime: &datetime,
        },
        &a.access_key,
        &a.secret_key,
        "us-east-1",
    );
    let seed = sigv4::parse_authorization(&auth)
        .expect("own header parses")
        .signature;
    let mut signer = sigv4::ChunkSigner {
        key: sigv4::signing_key(&a.secret_key, &date, "us-east-1", "s3"),
        datetime: datetime.clone(),
        scope: format!("{date}/us-east-1/s3/aws4_request"),
        previous: seed,
    };
    let mut body = Vec::new();
    let mut pieces: Vec<&[u8]> = data.chunks(65536).collect();
    pieces.push(&[]);
    for piece in pieces {
        let sig = signer.chunk_signature(&sigv4::sha256_hex(piece));
        body.extend_from_slice(format!("{:x};chunk-signature={sig}\r\n", piece.len()).as_bytes());
        body.extend_from_slice(piece);
        body.extend_from_slice(b"\r\n");
        signer.previous = sig;
    }
    if tamper {
        let i = body.len() / 2;
        body[i] ^= 1;
    }
    let mut req = reqwest::Client::new()
        .put(format!("{}{path}", gw.endpoint()))
        .timeout(Duration::from_secs(60))
        .header("authorization", auth)
        .body(body);
    for (n, v) in headers.iter().filter(|(n, _)| n != "host") {
        req = req.header(n, v);
    }
    let resp = req.send().await.expect("send chunked PUT");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_chunked_bodies_are_decoded_and_checked_before_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path()).await;
    let gw = gateway(&dir.path().join("root"), &moto.url).await;
    gw.store.create_bucket("chunks").expect("bucket");
    let data = pattern(300_000, 3);
    let (status, body) = chunked_put(&gw, "/chunks/good.bin", &data, false).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = chunked_put(&gw, "/chunks/bad.bin", &data, true).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("SignatureDoesNotMatch"), "{body}");
    assert_eq!(
        gw.store.list_objects("chunks").expect("list"),
        [("good.bin".to_string(), data.len() as u64)]
    );
    let mut out = Vec::new();
    gw.store
        .read_object_to("chunks", "good.bin", &mut out)
        .expect("read");
    assert!(out == data, "the decoded body stored in moto differs");

    // Unsigned chunks with a trailing checksum (what SDKs send over HTTPS): decoded, the
    // trailer consumed, the plain content stored.
    let body = b"6\r\nhello \r\n6\r\ntrailr\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n";
    let now = Utc::now();
    let datetime = now.format("%Y%m%dT%H%M%SZ").to_string();
    let headers = vec![
        ("host".to_string(), gw.addr.to_string()),
        ("content-encoding".to_string(), "aws-chunked".to_string()),
        ("x-amz-decoded-content-length".to_string(), "12".to_string()),
        (
            "x-amz-trailer".to_string(),
            "x-amz-checksum-crc32".to_string(),
        ),
        (
            "x-amz-content-sha256".to_string(),
            sigv4::STREAMING_UNSIGNED_TRAILER.to_string(),
        ),
        ("x-amz-date".to_string(), datetime.clone()),
    ];
    let a = admin();
    let auth = sigv4::authorization_for(
        &sigv4::OutgoingRequest {
            method: "PUT",
            canonical_uri: "/chunks/trailer.txt",
            canonical_query: "",
            headers: &headers,
            payload_hash: sigv4::STREAMING_UNSIGNED_TRAILER,
            datetime: &datetime,
        },
        &a.access_key,
        &a.secret_key,
        "us-east-1",
    );
    let mut req = reqwest::Client::new()
        .put(format!("{}/chunks/trailer.txt", gw.endpoint()))
        .timeout(Duration::from_secs(60))
        .header("authorization", auth)
        .body(body.to_vec());
    for (n, v) in headers.iter().filter(|(n, _)| n != "host") {
        req = req.header(n, v);
    }
    let resp = req.send().await.expect("send trailer PUT");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let mut out = Vec::new();
    gw.store
        .read_object_to("chunks", "trailer.txt", &mut out)
        .expect("read");
    assert_eq!(out, b"hello trailr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_gives_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut moto = Moto::start(dir.path()).await;
    let gw = gateway(&dir.path().join("root"), &moto.url).await;
    gw.store.create_bucket("before").expect("bucket while up");
    moto.stop();

    let aws = clients(&gw.endpoint(), admin(), dir.path());
    let out = aws
        .boto3(
            r#"
try:
    s3.list_objects_v2(Bucket='before')
    print('no error')
except ClientError as e:
    print(e.response['ResponseMetadata']['HTTPStatusCode'], e.response['Error']['Code'])
    print(e.response['Error']['Message'])
"#,
        )
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "503 ServiceUnavailable", "{out}");
    assert!(
        lines[1].contains(&moto.url),
        "the message names the store: {out}"
    );

    let s = gw.store.clone();
    let result = tokio::task::spawn_blocking(move || s.list_objects("before"))
        .await
        .expect("blocking task");
    match result {
        Err(S3Error::Remote { url, reason }) => {
            assert_eq!(url, moto.url);
            assert!(!reason.is_empty());
        }
        other => panic!("expected S3Error::Remote, got {other:?}"),
    }
    assert!(matches!(
        gw.store.put_object("before", "k", b"v"),
        Err(S3Error::Remote { .. })
    ));
    assert!(matches!(
        gw.store.read_object_to("before", "k", &mut Vec::new()),
        Err(S3Error::Remote { .. })
    ));
    assert!(!gw.store.bucket_exists("before"));
}
