//! The S3 endpoint driven by real clients: aws-cli (PyPI `awscli`), boto3 (PyPI `boto3`),
//! s3cmd (Debian `s3cmd`), plus raw HTTP for what clients refuse to send (path escapes,
//! skewed clocks, aws-chunked bodies).

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
mod common;

use common::{Aws, Server, admin, run, text};
use farmgate_s3::sigv4;
use farmgate_s3::{Credentials, new_credentials};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AWS_INSTALL: &str = "install aws-cli and boto3 with `pip install awscli boto3`";

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
async fn aws_cli_multipart_roundtrip_and_presign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("root")).await;
    let aws = Aws::new(&server.endpoint(), admin(), dir.path(), AWS_INSTALL);

    aws.ok(&["s3", "mb", "s3://roundtrip"]).await;
    let big = dir.path().join("big.bin");
    let data = pattern(20 << 20, 1);
    std::fs::write(&big, &data).expect("write file");
    let big_s = big.display().to_string();
    aws.ok(&["s3", "cp", &big_s, "s3://roundtrip/dir/big.bin"])
        .await;

    let ls = aws.ok(&["s3", "ls", "s3://roundtrip/"]).await;
    assert!(ls.contains("PRE dir/"), "{ls}");
    let ls = aws.ok(&["s3", "ls", "--recursive", "s3://roundtrip"]).await;
    assert!(ls.contains(&format!("{} dir/big.bin", 20 << 20)), "{ls}");

    // 20 MiB with aws-cli's 8 MiB threshold and chunk size: a 3-part upload.
    let head = aws
        .ok(&[
            "s3api",
            "head-object",
            "--bucket",
            "roundtrip",
            "--key",
            "dir/big.bin",
        ])
        .await;
    assert!(head.contains("-3\\\""), "multipart ETag expected: {head}");

    let back = dir.path().join("back.bin");
    let back_s = back.display().to_string();
    aws.ok(&["s3", "cp", "s3://roundtrip/dir/big.bin", &back_s])
        .await;
    assert!(
        std::fs::read(&back).expect("read download") == data,
        "the download differs from the upload"
    );

    // A ranged read.
    let part = dir.path().join("part.bin");
    aws.ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "roundtrip",
        "--key",
        "dir/big.bin",
        "--range",
        "bytes=1000-1999",
        &part.display().to_string(),
    ])
    .await;
    assert_eq!(std::fs::read(&part).expect("read part"), &data[1000..2000]);

    // A presigned GET fetched by a plain HTTP client.
    let url = aws
        .ok(&[
            "s3",
            "presign",
            "s3://roundtrip/dir/big.bin",
            "--expires-in",
            "300",
        ])
        .await;
    let resp = reqwest::Client::new()
        .get(url.trim())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET presigned URL");
    assert_eq!(resp.status(), 200, "presigned GET {url}");
    let got = resp.bytes().await.expect("read presigned body");
    assert!(got.as_ref() == data.as_slice(), "presigned GET differs");
    // Tampered presigned URL: refused.
    let bad = url.trim().replace("big.bin", "big.bim");
    let resp = reqwest::Client::new()
        .get(bad)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET tampered URL");
    assert_eq!(resp.status(), 403);
    assert!(
        resp.text()
            .await
            .unwrap_or_default()
            .contains("SignatureDoesNotMatch")
    );

    aws.fails(&["s3", "rb", "s3://roundtrip"], "BucketNotEmpty")
        .await;
    aws.ok(&["s3", "rm", "s3://roundtrip/dir/big.bin"]).await;
    let ls = aws.ok(&["s3", "ls", "--recursive", "s3://roundtrip"]).await;
    assert!(ls.trim().is_empty(), "{ls}");
    aws.ok(&["s3", "rb", "s3://roundtrip"]).await;
    assert!(!server.store.bucket_exists("roundtrip"));
    // Nothing left behind: no data, metadata, temporary or upload files.
    for sub in [".meta", ".tmp", ".uploads"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join("root").join(sub))
            .expect("read dir")
            .collect();
        assert!(left.is_empty(), "{sub} not empty: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_listing_pagination_copy_and_batch_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("root")).await;
    server.store.create_bucket("listing").expect("bucket");
    for key in ["a/1", "a/2", "b", "c/x/1", "c/y", "d e+f", "z"] {
        server
            .store
            .put_object("listing", key, key.as_bytes())
            .expect("put");
    }
    let aws = Aws::new(&server.endpoint(), admin(), dir.path(), AWS_INSTALL);
    let out = aws
        .boto3(
            r#"
pages = s3.get_paginator('list_objects_v2').paginate(Bucket='listing', Delimiter='/', PaginationConfig={'PageSize': 2})
keys, prefixes, n = [], [], 0
for p in pages:
    n += 1
    keys += [o['Key'] for o in p.get('Contents', [])]
    prefixes += [c['Prefix'] for c in p.get('CommonPrefixes', [])]
print(n, keys, prefixes)
v1 = s3.list_objects(Bucket='listing', Prefix='c/', Marker='c/x/1')
print([o['Key'] for o in v1['Contents']])
s3.copy_object(Bucket='listing', Key='copied', CopySource={'Bucket': 'listing', 'Key': 'd e+f'}, ContentType='text/plain', MetadataDirective='REPLACE', Metadata={'who': 'test'})
h = s3.head_object(Bucket='listing', Key='copied')
print(h['ContentType'], h['Metadata'], h['ContentLength'])
r = s3.delete_objects(Bucket='listing', Delete={'Objects': [{'Key': 'a/1'}, {'Key': 'a/2'}, {'Key': 'missing'}]})
print(sorted(d['Key'] for d in r['Deleted']))
print(s3.get_bucket_location(Bucket='listing')['LocationConstraint'])
try:
    s3.get_object(Bucket='listing', Key='nope')
except s3.exceptions.NoSuchKey as e:
    print('NoSuchKey', e.response['Error']['Code'])
"#,
        )
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "3 ['b', 'd e+f', 'z'] ['a/', 'c/']",
        "paginated ListObjectsV2 (5 entries, pages of 2):\n{out}"
    );
    assert_eq!(lines[1], "['c/y']", "ListObjects V1 with marker:\n{out}");
    assert_eq!(lines[2], "text/plain {'who': 'test'} 5", "{out}");
    assert_eq!(lines[3], "['a/1', 'a/2', 'missing']", "{out}");
    assert_eq!(lines[4], "None", "us-east-1 location:\n{out}");
    assert_eq!(lines[5], "NoSuchKey NoSuchKey", "{out}");
    let keys: Vec<String> = server
        .store
        .list_objects("listing")
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["b", "c/x/1", "c/y", "copied", "d e+f", "z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3cmd_put_ls_get() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("root")).await;
    let cfg = dir.path().join("s3cfg");
    let a = admin();
    std::fs::write(
        &cfg,
        format!(
            "[default]\naccess_key = {}\nsecret_key = {}\nhost_base = {}\nhost_bucket = {}\n\
             use_https = False\nsignature_v2 = False\nbucket_location = us-east-1\n\
             check_ssl_certificate = False\nguess_mime_type = False\n",
            a.access_key, a.secret_key, server.addr, server.addr
        ),
    )
    .expect("write s3cfg");
    let cfg_s = cfg.display().to_string();
    let s3cmd = |args: Vec<String>| {
        let cfg_s = cfg_s.clone();
        async move {
            let mut all: Vec<&str> = vec!["-c", &cfg_s];
            all.extend(args.iter().map(String::as_str));
            let out = run(
                "s3cmd",
                &all,
                &[],
                "install s3cmd with `apt-get install -y s3cmd`",
            )
            .await;
            assert!(
                out.status.success(),
                "s3cmd {args:?} failed:\n{}",
                text(&out)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    s3cmd(v(&["mb", "s3://viacmd"])).await;
    let file = dir.path().join("hello.txt");
    let data = pattern(300_000, 7);
    std::fs::write(&file, &data).expect("write");
    let file_s = file.display().to_string();
    s3cmd(v(&["put", &file_s, "s3://viacmd/sub/hello.txt"])).await;
    let ls = s3cmd(v(&["ls", "s3://viacmd/sub/"])).await;
    assert!(ls.contains("s3://viacmd/sub/hello.txt"), "{ls}");
    let ls = s3cmd(v(&["ls"])).await;
    assert!(ls.contains("s3://viacmd"), "{ls}");
    let back = dir.path().join("back.txt");
    let back_s = back.display().to_string();
    s3cmd(v(&["get", "s3://viacmd/sub/hello.txt", &back_s])).await;
    assert!(
        std::fs::read(&back).expect("read") == data,
        "s3cmd get differs"
    );
    s3cmd(v(&["del", "s3://viacmd/sub/hello.txt"])).await;
    s3cmd(v(&["rb", "s3://viacmd"])).await;
    assert!(!server.store.bucket_exists("viacmd"));
}

/// The issue's must-show test: a job key works on its bucket and nowhere else; removed, it
/// is refused; a wrong secret is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_key_only_reaches_its_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("root")).await;
    server.store.create_bucket("job-1234").expect("bucket");
    server.store.create_bucket("other-job").expect("bucket");
    server
        .store
        .put_object("other-job", "secret.txt", b"not yours")
        .expect("put");
    let creds = new_credentials();
    server
        .store
        .add_key(creds.clone(), vec!["job-1234".into()])
        .expect("add key");
    let job = Aws::new(&server.endpoint(), creds.clone(), dir.path(), AWS_INSTALL);

    let file = dir.path().join("artifact.txt");
    std::fs::write(&file, b"job output").expect("write");
    let file_s = file.display().to_string();
    job.ok(&["s3", "cp", &file_s, "s3://job-1234/artifact.txt"])
        .await;
    let ls = job.ok(&["s3", "ls", "s3://job-1234/"]).await;
    assert!(ls.contains("artifact.txt"), "{ls}");
    let buckets = job.ok(&["s3", "ls"]).await;
    assert!(buckets.contains("job-1234"), "{buckets}");
    assert!(
        !buckets.contains("other-job"),
        "a job key must only see its own bucket: {buckets}"
    );
    job.fails(&["s3", "ls", "s3://other-job/"], "AccessDenied")
        .await;
    job.fails(
        &["s3", "cp", &file_s, "s3://other-job/x.txt"],
        "AccessDenied",
    )
    .await;
    let stolen = dir.path().join("stolen.txt").display().to_string();
    job.fails(&["s3", "cp", "s3://other-job/secret.txt", &stolen], "403")
        .await;
    job.fails(&["s3", "mb", "s3://new-bucket"], "AccessDenied")
        .await;
    assert_eq!(
        server.store.list_objects("other-job").expect("list"),
        [("secret.txt".to_string(), 9)]
    );

    let wrong = Aws::new(
        &server.endpoint(),
        Credentials {
            access_key: creds.access_key.clone(),
            secret_key: "wrong-secret-wrong-secret-wrong-secret-x".into(),
        },
        dir.path(),
        AWS_INSTALL,
    );
    wrong
        .fails(&["s3", "ls", "s3://job-1234/"], "SignatureDoesNotMatch")
        .await;
    let unknown = Aws::new(
        &server.endpoint(),
        new_credentials(),
        dir.path(),
        AWS_INSTALL,
    );
    unknown
        .fails(&["s3", "ls", "s3://job-1234/"], "InvalidAccessKeyId")
        .await;

    server.store.remove_key(&creds.access_key).expect("remove");
    job.fails(&["s3", "ls", "s3://job-1234/"], "InvalidAccessKeyId")
        .await;
    server
        .store
        .delete_bucket_recursive("job-1234")
        .expect("delete bucket");
    assert!(!server.store.bucket_exists("job-1234"));
    assert!(!dir.path().join("root/job-1234").exists());
    assert!(!dir.path().join("root/.meta/job-1234").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_objects_and_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let creds = new_credentials();
    {
        let server = Server::start(&root).await;
        server.store.create_bucket("persist").expect("bucket");
        server
            .store
            .add_key(creds.clone(), vec!["persist".into()])
            .expect("add key");
        let job = Aws::new(&server.endpoint(), creds.clone(), dir.path(), AWS_INSTALL);
        let file = dir.path().join("f.txt");
        std::fs::write(&file, b"kept across restarts").expect("write");
        job.ok(&[
            "s3",
            "cp",
            &file.display().to_string(),
            "s3://persist/a/f.txt",
        ])
        .await;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join(".farmgate-keys.json"))
        .expect("keys file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "keys file mode");

    let server = Server::start(&root).await;
    assert_eq!(
        server.store.list_objects("persist").expect("list"),
        [("a/f.txt".to_string(), 20)]
    );
    let job = Aws::new(&server.endpoint(), creds, dir.path(), AWS_INSTALL);
    let back = dir.path().join("back.txt");
    job.ok(&[
        "s3",
        "cp",
        "s3://persist/a/f.txt",
        &back.display().to_string(),
    ])
    .await;
    assert_eq!(std::fs::read(&back).expect("read"), b"kept across restarts");
}

/// Signs and sends one raw HTTP/1.1 request (exact path bytes, no client normalisation).
struct Raw {
    addr: SocketAddr,
    creds: Credentials,
}

struct RawResponse {
    status: u16,
    text: String,
}

impl Raw {
    /// The Authorization header and seed signature of a request.
    fn sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &mut Vec<(String, String)>,
        payload_hash: &str,
        time: DateTime<Utc>,
    ) -> (String, String) {
        let datetime = time.format("%Y%m%dT%H%M%SZ").to_string();
        let date = time.format("%Y%m%d").to_string();
        headers.push(("host".into(), self.addr.to_string()));
        headers.push(("x-amz-content-sha256".into(), payload_hash.into()));
        headers.push(("x-amz-date".into(), datetime.clone()));
        headers.sort();
        let creq = sigv4::canonical_request(
            method,
            &sigv4::canonical_uri(path),
            &sigv4::canonical_query(query, false),
            headers,
            payload_hash,
        );
        let scope = format!("{date}/us-east-1/s3/aws4_request");
        let key = sigv4::signing_key(&self.creds.secret_key, &date, "us-east-1", "s3");
        let sig = sigv4::sign(&key, &sigv4::string_to_sign(&datetime, &scope, &creq));
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        (
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={}, Signature={sig}",
                self.creds.access_key,
                names.join(";")
            ),
            sig,
        )
    }

    async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        authorization: &str,
        body: &[u8],
    ) -> RawResponse {
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(self.addr)
                .await
                .expect("connect");
            let mut req = format!("{method} {target} HTTP/1.1\r\n");
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            if !authorization.is_empty() {
                req.push_str(&format!("authorization: {authorization}\r\n"));
            }
            req.push_str(&format!(
                "content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            ));
            s.write_all(req.as_bytes()).await.expect("send head");
            s.write_all(body).await.expect("send body");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read response");
            let text = String::from_utf8_lossy(&out).into_owned();
            let status = text
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("status line");
            RawResponse { status, text }
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .expect("raw request finished in time")
    }

    async fn request(&self, method: &str, target: &str, body: &[u8]) -> RawResponse {
        self.request_at(method, target, body, Utc::now()).await
    }

    async fn request_at(
        &self,
        method: &str,
        target: &str,
        body: &[u8],
        time: DateTime<Utc>,
    ) -> RawResponse {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut headers = Vec::new();
        let hash = sigv4::sha256_hex(body);
        let (auth, _) = self.sign(method, path, query, &mut headers, &hash, time);
        self.send(method, target, &headers, &auth, body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let server = Server::start(&root).await;
    server.store.create_bucket("safe").expect("bucket");
    let raw = Raw {
        addr: server.addr,
        creds: admin(),
    };
    for target in [
        "/safe/../escaped",
        "/safe/%2e%2e/escaped",
        "/safe/a/%2E%2E/%2e%2e/escaped",
        "/safe/..%2fescaped",
        "/safe/%2fescaped",
        "/safe/..",
        "/safe/a%00b",
        "/%2e%2e/escaped",
        "/..%2Fescaped",
    ] {
        let r = raw.request("PUT", target, b"x").await;
        assert_eq!(r.status, 400, "PUT {target}:\n{}", r.text);
        assert!(
            r.text.contains("InvalidArgument") || r.text.contains("InvalidBucketName"),
            "PUT {target}:\n{}",
            r.text
        );
        let r = raw.request("GET", target, b"").await;
        assert_eq!(r.status, 400, "GET {target}:\n{}", r.text);
    }
    let stray: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "root")
        .collect();
    assert!(stray.is_empty(), "files outside the root: {stray:?}");
    assert!(server.store.list_objects("safe").expect("list").is_empty());

    // The clock check.
    let r = raw
        .request_at(
            "GET",
            "/safe/",
            b"",
            Utc::now() - chrono::Duration::minutes(30),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("RequestTimeTooSkewed"), "{}", r.text);

    // A body that does not match its signed SHA-256.
    let (path, body) = ("/safe/obj", b"real body");
    let mut headers = Vec::new();
    let (auth, _) = raw.sign(
        "PUT",
        path,
        "",
        &mut headers,
        &sigv4::sha256_hex(b"other body"),
        Utc::now(),
    );
    let r = raw.send("PUT", path, &headers, &auth, body).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("XAmzContentSHA256Mismatch"), "{}", r.text);
    assert!(server.store.list_objects("safe").expect("list").is_empty());

    // Unsigned requests.
    let r = raw.send("GET", "/safe/", &[], "", b"").await;
    assert_eq!(r.status, 403, "{}", r.text);
}

/// Builds an aws-chunked body of `data` in `chunk`-byte chunks, each chunk signed.
fn chunked_body(data: &[u8], chunk: usize, signer: &mut sigv4::ChunkSigner) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pieces: Vec<&[u8]> = data.chunks(chunk).collect();
    pieces.push(&[]);
    for piece in pieces {
        let sig = signer.chunk_signature(&sigv4::sha256_hex(piece));
        out.extend_from_slice(format!("{:x};chunk-signature={sig}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
        signer.previous = sig;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_chunked_signed_upload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("root")).await;
    server.store.create_bucket("chunks").expect("bucket");
    let raw = Raw {
        addr: server.addr,
        creds: admin(),
    };
    let data = pattern(200_000, 3);
    for (key, tamper) in [("good.bin", false), ("bad.bin", true)] {
        let path = format!("/chunks/{key}");
        let now = Utc::now();
        let mut headers = vec![
            ("content-encoding".to_string(), "aws-chunked".to_string()),
            (
                "x-amz-decoded-content-length".to_string(),
                data.len().to_string(),
            ),
        ];
        let (auth, seed) = raw.sign(
            "PUT",
            &path,
            "",
            &mut headers,
            sigv4::STREAMING_PAYLOAD,
            now,
        );
        let date = now.format("%Y%m%d").to_string();
        let mut signer = sigv4::ChunkSigner {
            key: sigv4::signing_key(&admin().secret_key, &date, "us-east-1", "s3"),
            datetime: now.format("%Y%m%dT%H%M%SZ").to_string(),
            scope: format!("{date}/us-east-1/s3/aws4_request"),
            previous: seed,
        };
        let mut body = chunked_body(&data, 65536, &mut signer);
        if tamper {
            let i = body.len() / 2;
            body[i] ^= 1;
        }
        let r = raw.send("PUT", &path, &headers, &auth, &body).await;
        if tamper {
            assert_eq!(r.status, 403, "{}", r.text);
            assert!(r.text.contains("SignatureDoesNotMatch"), "{}", r.text);
        } else {
            assert_eq!(r.status, 200, "{}", r.text);
        }
    }
    assert_eq!(
        server.store.list_objects("chunks").expect("list"),
        [("good.bin".to_string(), data.len() as u64)]
    );
    let stored = std::fs::read(
        server
            .store
            .object_path("chunks", "good.bin")
            .expect("path"),
    )
    .expect("read object");
    assert!(stored == data, "decoded chunked body differs");
}
