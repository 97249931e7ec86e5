//! Storage and caches through the gateway: every user job gets a bucket of the embedded
//! S3 endpoint and a key that can use only that bucket, both gone when the job is over;
//! the artifact cache answers on the API port; the registry cache on its own port.
//! Clients are real: boto3 (Debian's python3-boto3), curl.

mod common;

use std::time::{Duration, Instant};

use common::*;
use farmgate_wire::JobStatus;

const LIMIT: Duration = Duration::from_secs(90);

/// Runs a boto3 script against the gateway's S3 endpoint with the given key; the script
/// sees `s3` (a client) and prints one JSON line, which is returned.
fn boto3(gw: &Gateway, key: (&str, &str), body: &str) -> serde_json::Value {
    boto3_at(gw.s3_port, key, body)
}

/// [`boto3`] against any S3 endpoint on 127.0.0.1.
fn boto3_at(port: u16, key: (&str, &str), body: &str) -> serde_json::Value {
    let script = format!(
        r#"
import json, boto3, botocore
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:{port}", aws_access_key_id={ak:?},
                  aws_secret_access_key={sk:?}, region_name="us-east-1",
                  config=Config(s3={{"addressing_style": "path"}}, retries={{"max_attempts": 1}}))
def code(f):
    try:
        f()
        return "ok"
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
{body}
"#,
        ak = key.0,
        sk = key.1,
    );
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 runs (install python3-boto3: scripts/setup.sh does)");
    assert!(
        out.status.success(),
        "boto3 script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        script
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "boto3 script printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_bucket_and_key_serve_only_that_job_and_go_away_at_its_end() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    job_bucket_round_trip(gw, None).await;
}

/// moto's S3 server (PyPI `moto[server]`), the external store of the remote-mode test.
struct Moto {
    port: u16,
    child: std::process::Child,
}

impl Moto {
    async fn start() -> Moto {
        let port = free_port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/setup.sh installs moto[server])");
        let moto = Moto { port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_minio_url_job_buckets_live_in_the_external_store() {
    let moto = Moto::start().await;
    let gw = Gateway::start(
        GatewayOptions::default()
            .dut(1, &["sim"], true)
            .env("MINIO_URL", &format!("http://127.0.0.1:{}", moto.port))
            .env("FARMGATE_LOG", "info,farmgate=debug,farmgate_s3=debug"),
    )
    .await;
    job_bucket_round_trip(gw, Some(moto.port)).await;
}

/// A user job with a share directory: its bucket and key, what they may reach, the
/// files going in and coming back, and both removed at the end. With `external`, the
/// objects must be in that S3 store (looked at directly, not through the gateway).
async fn job_bucket_round_trip(gw: Gateway, external: Option<u16>) {
    // Another bucket, the admin's, with a file the job must not read.
    let r = boto3(
        &gw,
        S3_ADMIN,
        r#"s3.create_bucket(Bucket="admins-own")
s3.put_object(Bucket="admins-own", Key="secret.txt", Body=b"not for jobs")
print(json.dumps({"ok": True}))"#,
    );
    assert_eq!(r["ok"], true);
    // The job prints what its template saw, then runs long enough to be looked at.
    let job = gw.write_job(
        "bucket.yml.j2",
        &sim_job(
            "print S3 {{ minio_url }} {{ job_bucket }} {{ job_bucket_access_key }} {{ job_bucket_secret_key }}; sleep 8000; poweroff",
            "",
            "",
        ),
    );
    // The client's share directory goes into the bucket, and comes back at the end.
    let share = gw.dir.path().join("share");
    std::fs::create_dir_all(share.join("inputs")).expect("share dir");
    std::fs::write(share.join("inputs/params.txt"), "from the client\n").expect("write");
    let farmctl = gw
        .farmctl(&[
            "run",
            "-j",
            "bucket-job-1",
            "-s",
            path_str(&share),
            path_str(&job),
        ])
        .spawn()
        .expect("farmctl starts");
    let deadline = Instant::now() + LIMIT;
    let line = loop {
        let log = gw.get_text("/api/v1/job/bucket-job-1/console.log").await;
        if let Some(l) = log.lines().find(|l| l.contains("] S3 http")) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no S3 line:\n{log}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The same job id again (a client retrying) is refused and leaves the job alone.
    let again = gw
        .farmctl_run(
            &[
                "run",
                "-j",
                "bucket-job-1",
                "-s",
                path_str(&share),
                path_str(&job),
            ],
            LIMIT,
        )
        .await;
    assert_eq!(again.code, Some(7), "{}", again.all());
    assert!(again.stderr.contains("already exists"), "{}", again.all());
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "S3").expect("S3 word");
    let (url, bucket, ak, sk) = (words[i + 1], words[i + 2], words[i + 3], words[i + 4]);
    assert_eq!(url, format!("http://127.0.0.1:{}", gw.s3_port));
    assert!(
        bucket.starts_with("job-525400112201-bucket-job-1-"),
        "{bucket}"
    );
    let r = boto3(
        &gw,
        (ak, sk),
        &format!(
            r#"b = {bucket:?}
put = code(lambda: s3.put_object(Bucket=b, Key="results/out.txt", Body=b"from the DUT"))
got = s3.get_object(Bucket=b, Key="results/out.txt")["Body"].read().decode()
shared = s3.get_object(Bucket=b, Key="inputs/params.txt")["Body"].read().decode()
mine = [x["Name"] for x in s3.list_buckets()["Buckets"]]
other = code(lambda: s3.get_object(Bucket="admins-own", Key="secret.txt"))
other_put = code(lambda: s3.put_object(Bucket="admins-own", Key="x", Body=b"x"))
create = code(lambda: s3.create_bucket(Bucket="job-made-this"))
print(json.dumps({{"put": put, "got": got, "shared": shared, "mine": mine, "other": other, "other_put": other_put, "create": create}}))"#
        ),
    );
    assert_eq!(r["put"], "ok", "{r}");
    assert_eq!(r["got"], "from the DUT", "{r}");
    assert_eq!(
        r["shared"], "from the client\n",
        "the share directory is in the bucket: {r}"
    );
    assert_eq!(
        r["mine"],
        serde_json::json!([bucket]),
        "a job key lists only its bucket: {r}"
    );
    assert_eq!(r["other"], "AccessDenied", "{r}");
    assert_eq!(r["other_put"], "AccessDenied", "{r}");
    assert_eq!(r["create"], "AccessDenied", "{r}\n{}", gw.logs());
    if let Some(port) = external {
        let direct = boto3_at(
            port,
            S3_ADMIN,
            &format!(
                r#"b = {bucket:?}
keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=b).get("Contents", []))
body = s3.get_object(Bucket=b, Key="results/out.txt")["Body"].read().decode()
print(json.dumps({{"keys": keys, "body": body}}))"#
            ),
        );
        assert_eq!(
            direct["keys"],
            serde_json::json!(["inputs/params.txt", "results/out.txt"]),
            "the objects are in the external store: {direct}"
        );
        assert_eq!(direct["body"], "from the DUT", "{direct}");
        assert!(
            !gw.dir.path().join("state/s3").join(bucket).exists(),
            "no object data on the gateway's disk"
        );
    }

    let out = tokio::time::timeout(LIMIT, farmctl.wait_with_output())
        .await
        .expect("the job ends")
        .expect("farmctl output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(JobStatus::Complete.exit_code()),
        "{stderr}"
    );
    // What the DUT wrote came back into the share directory.
    assert_eq!(
        std::fs::read_to_string(share.join("results/out.txt")).unwrap_or_default(),
        "from the DUT",
        "{stderr}"
    );
    assert!(stderr.contains("Share directory"), "{stderr}");
    // At the end the key is refused and the bucket is gone (removed in the background).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let after = boto3(
            &gw,
            (ak, sk),
            &format!(
                r#"print(json.dumps({{"job_key": code(lambda: s3.list_objects_v2(Bucket={bucket:?}))}}))"#
            ),
        );
        let admin = boto3(
            &gw,
            S3_ADMIN,
            &format!(
                r#"print(json.dumps({{"head": code(lambda: s3.head_bucket(Bucket={bucket:?})), "other": code(lambda: s3.head_bucket(Bucket="admins-own"))}}))"#
            ),
        );
        let gone_outside = external.is_none_or(|port| {
            boto3_at(
                port,
                S3_ADMIN,
                &format!(
                    r#"print(json.dumps({{"head": code(lambda: s3.head_bucket(Bucket={bucket:?}))}}))"#
                ),
            )["head"]
                == "404"
        });
        if after["job_key"] == "InvalidAccessKeyId" && admin["head"] == "404" && gone_outside {
            assert_eq!(admin["other"], "ok", "only the job's bucket goes");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job key or bucket still there: {after} {admin}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_cache_and_registry_cache_answer_on_the_gateway() {
    let gw = Gateway::start(GatewayOptions::default().dut(1, &["sim"], true)).await;
    // A local origin: python's http.server over a directory with one artifact.
    let origin_dir = gw.dir.path().join("origin");
    std::fs::create_dir_all(&origin_dir).expect("origin dir");
    let artifact: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(origin_dir.join("kernel.img"), &artifact).expect("artifact");
    let origin_port = free_port();
    let mut origin = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &origin_port.to_string(),
        ])
        .current_dir(&origin_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let url = format!("http://127.0.0.1:{origin_port}/kernel.img");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(&url).await.is_err() {
        assert!(Instant::now() < deadline, "origin did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fetch = |path: String| {
        let out = gw.dir.path().join("fetched");
        let status = std::process::Command::new("curl")
            .args(["-s", "--fail", "--max-time", "30", "-o"])
            .arg(&out)
            .arg(format!("{}{path}", gw.url()))
            .status()
            .expect("curl runs");
        (status.success(), std::fs::read(&out).unwrap_or_default())
    };
    // A job whose storage.http names a URL: the DUT's first fetch downloads it through
    // the artifact cache, so later fetches (by any DUT or through /cache/) are hits.
    let mut job_text = sim_job("print storage ready; sleep 8000; poweroff", "", "");
    job_text.push_str(&format!(
        "    storage:\n      http:\n        - path: 'img/(.*)'\n          url: 'http://127.0.0.1:{origin_port}/\\1'\n"
    ));
    let job = gw.write_job("storage-url.yml.j2", &job_text);
    let mut farmctl = gw
        .farmctl(&["run", "-j", "storage-url-1", path_str(&job)])
        .spawn()
        .expect("farmctl starts");
    let deadline = Instant::now() + LIMIT;
    loop {
        let log = gw.get_text("/api/v1/job/storage-url-1/console.log").await;
        if log.contains("storage ready") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job not running:\n{log}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dut_file = "/api/v1/dut/52:54:00:11:22:01/storage/img/kernel.img".to_string();
    let (ok, body) = fetch(dut_file.clone());
    assert!(
        ok && body == artifact,
        "the DUT's storage file, first fetch"
    );
    let stats: serde_json::Value = gw.get_json("/cache-stats").await;
    assert_eq!(
        stats["misses"], 1,
        "the storage URL went through the cache: {stats}"
    );
    let part = std::process::Command::new("curl")
        .args(["-s", "--fail", "--max-time", "30", "-r", "1000-1999"])
        .arg(format!("{}{dut_file}", gw.url()))
        .output()
        .expect("curl runs");
    assert!(part.status.success(), "range request on a storage file");
    assert_eq!(part.stdout, artifact[1000..2000], "the range asked for");
    let (ok, body) = fetch(format!("/cache/{url}"));
    assert!(
        ok && body == artifact,
        "first fetch through /cache/ is a hit"
    );
    let (ok, body) = fetch(format!("/cache?url={url}"));
    assert!(ok && body == artifact, "second fetch, ?url= form");
    let _ = origin.kill();
    let _ = origin.wait();
    // The origin is gone: the cache serves from disk, to the DUT too.
    let (ok, body) = fetch(format!("/cache/{url}"));
    assert!(ok && body == artifact, "served from disk");
    let (ok, body) = fetch(dut_file);
    assert!(ok && body == artifact, "storage file served from disk");
    let stats: serde_json::Value = gw.get_json("/cache-stats").await;
    assert_eq!(stats["misses"], 1, "{stats}");
    assert_eq!(stats["hits"], 5, "{stats}");
    // A storage URL the cache has never seen, with its origin gone: a clear error
    // naming the storage path and the URL.
    let missing = std::process::Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .arg(format!(
            "{}/api/v1/dut/52:54:00:11:22:01/storage/img/other.img",
            gw.url()
        ))
        .output()
        .expect("curl runs");
    let said = String::from_utf8_lossy(&missing.stdout);
    assert!(
        said.contains("storage file img/other.img")
            && said.contains(&format!("127.0.0.1:{origin_port}/other.img")),
        "{said}"
    );
    let r = gw.farmctl_run(&["cancel", "storage-url-1"], LIMIT).await;
    assert_eq!(r.code, Some(0), "{}", r.all());
    let status = tokio::time::timeout(LIMIT, farmctl.wait())
        .await
        .expect("farmctl ends after the cancel")
        .expect("farmctl status");
    assert!(
        !status.success(),
        "a cancelled job is not a success: {status}"
    );
    // The registry cache speaks the OCI distribution API on its port.
    let r = gw
        .http
        .get(format!("http://127.0.0.1:{}/v2/", gw.registry_port))
        .send()
        .await
        .expect("GET /v2/");
    assert!(r.status().is_success(), "{}", r.status());
    let r = gw
        .http
        .get(format!(
            "http://127.0.0.1:{}/v2/nowhere.example/x/manifests/latest",
            gw.registry_port
        ))
        .send()
        .await
        .expect("GET unknown upstream");
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("NAME_UNKNOWN"), "{body}");
    gw.stop().await;
}
