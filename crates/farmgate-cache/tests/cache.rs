//! The cache end to end: a local origin, the cache's router on 127.0.0.1, real curl and
//! reqwest clients.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_share_one_slow_download_then_disk() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(config(dir.path())).await;
    // 20 MiB at ~7 MiB/s: the origin takes ~3 s.
    let size = 20 * MIB;
    let up = origin.url(&format!("/blob/big?size={size}&rate={}", 7 * MIB));
    let url = gw.cache_url(&up);
    let expected = sha256_hex(&content("big", size));
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = url.clone();
        let file = out.path().join(format!("b{i}"));
        tasks.push(tokio::spawn(async move {
            // The last client starts mid-download.
            if i == 9 {
                tokio::time::sleep(Duration::from_millis(1200)).await;
            }
            let f = file.to_str().unwrap().to_string();
            let o = curl(&["-o", &f, "-w", "%{time_starttransfer} %{http_code}", &url]).await;
            (i, o, file)
        }));
    }
    // A reqwest client, also mid-download, times its first body byte.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t0 = Instant::now();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-cache"], "COALESCED");
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let reqwest_ttfb = t0.elapsed();
    assert!(!first.is_empty());
    let mut n = first.len();
    while let Some(c) = body.next().await {
        n += c.unwrap().len();
    }
    assert_eq!(n, size);
    for t in tasks {
        let (i, o, file) = t.await.unwrap();
        assert_eq!(o.code, 0, "curl {i}: {}", o.stderr);
        let w = String::from_utf8_lossy(&o.stdout).to_string();
        let (ttfb, code) = w.split_once(' ').unwrap();
        assert_eq!(code, "200", "curl {i}");
        let ttfb: f64 = ttfb.parse().unwrap();
        if i == 9 {
            assert!(
                ttfb < 1.0,
                "mid-download curl waited {ttfb} s for its first byte"
            );
        }
        let data = std::fs::read(&file).unwrap();
        assert_eq!(sha256_hex(&data), expected, "curl {i} body differs");
    }
    let total = started.elapsed();
    assert!(
        total > Duration::from_millis(2500),
        "the origin was not slow ({total:?})"
    );
    assert!(
        reqwest_ttfb < Duration::from_secs(1),
        "mid-download reqwest waited {reqwest_ttfb:?} for its first byte"
    );
    assert_eq!(origin.hits("/blob/big"), 1, "origin hits");
    let s = gw.cache.stats();
    assert_eq!((s.misses, s.coalesced), (1, 10), "{s:?}");
    assert_eq!(s.upstream_bytes, size as u64);

    // Second round: from disk, no origin request.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { curl_get(&url, &[]).await }));
    }
    for t in tasks {
        let (status, body, xc) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(xc, "HIT");
        assert_eq!(sha256_hex(&body), expected);
    }
    assert_eq!(
        origin.hits("/blob/big"),
        1,
        "second round reached the origin"
    );
    let stats: serde_json::Value = reqwest::get(format!("{}/cache-stats", gw.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["hits"], 10);
    assert_eq!(stats["entries"], 1);
    assert_eq!(stats["bytes"], size as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_head_and_query_form() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(config(dir.path())).await;
    let size = 3 * MIB;
    let up = origin.url(&format!("/blob/r?size={size}&rate={}", 2 * MIB));
    let data = content("r", size);

    // HEAD on a miss: headers as soon as the upstream answers (starts the download).
    let out = curl(&["-I", &gw.cache_url(&up)]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let dump = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(dump.starts_with("HTTP/1.1 200"), "{dump}");
    assert_eq!(header_of(&dump, "content-length"), size.to_string());
    assert_eq!(header_of(&dump, "content-type"), "application/x-test-blob");
    assert_eq!(header_of(&dump, "x-cache"), "MISS");
    // A range of the entry still being downloaded is streamed as it arrives.
    let (status, body, xc) =
        curl_get(&gw.cache_url(&up), &["-r", &format!("{}-{}", MIB, MIB + 9)]).await;
    assert_eq!((status, xc.as_str()), (206, "COALESCED"));
    assert_eq!(&body[..], &data[MIB..MIB + 10]);
    // Wait for completion (the download belongs to the cache, not to the HEAD client).
    let (status, body, _) = curl_get(&gw.cache_url(&up), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), size);

    let (status, body, xc) = curl_get(&gw.cache_url(&up), &["-r", "100-199"]).await;
    assert_eq!((status, xc.as_str()), (206, "HIT"));
    assert_eq!(&body[..], &data[100..200]);
    let (status, body, _) = curl_get(&gw.cache_url(&up), &["-r", "-5"]).await;
    assert_eq!(status, 206);
    assert_eq!(&body[..], &data[size - 5..]);
    let (status, _, _) = curl_get(&gw.cache_url(&up), &["-r", &format!("{size}-")]).await;
    assert_eq!(status, 416);

    let out = curl(&["-I", &gw.cache_url(&up)]).await;
    let dump = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(header_of(&dump, "content-length"), size.to_string());
    assert_eq!(header_of(&dump, "accept-ranges"), "bytes");
    assert_eq!(header_of(&dump, "x-cache"), "HIT");

    // The ?url= form names the same entry.
    let enc: String = url::form_urlencoded::byte_serialize(up.as_bytes()).collect();
    let (status, body, xc) = curl_get(&format!("{}/cache?url={enc}", gw.base()), &[]).await;
    assert_eq!((status, xc.as_str()), (200, "HIT"));
    assert_eq!(sha256_hex(&body), sha256_hex(&data));
    assert_eq!(origin.hits("/blob/r"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_allowlist_and_escapes() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(config(dir.path())).await;

    let up = origin.url("/missing");
    let (status, body, _) = curl_get(&gw.cache_url(&up), &[]).await;
    assert_eq!(status, 404);
    assert_eq!(
        String::from_utf8_lossy(&body).trim(),
        format!("upstream answered 404 for {up}")
    );
    assert_eq!(gw.cache.stats().entries, 0);

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (status, body, _) =
        curl_get(&gw.cache_url(&format!("http://127.0.0.1:{port}/x")), &[]).await;
    let msg = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 502, "{msg}");
    assert!(msg.contains("upstream host 127.0.0.1"), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");

    for (path, what) in [
        ("/cache/..%2f..%2fetc/passwd", "encoded dot-dot"),
        ("/cache/../../etc/passwd", "dot-dot"),
        ("/cache/file:///etc/passwd", "file URL"),
        (
            "/cache?url=file%3A%2F%2F%2Fetc%2Fpasswd",
            "file URL in query",
        ),
        ("/cache/ftp://127.0.0.1/x", "ftp URL"),
        ("/cache/http://user:pw@127.0.0.1/x", "credentials"),
    ] {
        let url = format!("{}{path}", gw.base());
        let (status, body, _) = curl_get(&url, &["--path-as-is"]).await;
        assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&body));
    }
    // Nothing but the cache's own layout in its directory.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["index.json", "objects", "tmp"]);
    assert_eq!(
        std::fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .count(),
        0
    );

    // Allowlist.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = config(dir2.path());
    cfg.allow_hosts = Some(vec!["*.example.org".into(), "localhost".into()]);
    let gw2 = start_gateway(cfg).await;
    let (status, body, _) = curl_get(&gw2.cache_url(&origin.url("/blob/a")), &[]).await;
    assert_eq!(status, 403);
    assert_eq!(
        String::from_utf8_lossy(&body).trim(),
        "host 127.0.0.1 is not in the cache's allowlist"
    );
    let ok = format!("http://localhost:{}/blob/a?size=1000", origin.addr.port());
    let (status, body, _) = curl_get(&gw2.cache_url(&ok), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_from_disk_and_eviction_is_lru() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_bytes = 3 * MIB as u64 + 10;
    let up = |n: &str| origin.url(&format!("/blob/{n}?size={MIB}"));
    {
        let gw = start_gateway(cfg.clone()).await;
        for n in ["a", "b", "c"] {
            let (status, body, xc) = curl_get(&gw.cache_url(&up(n)), &[]).await;
            assert_eq!((status, xc.as_str(), body.len()), (200, "MISS", MIB));
        }
        assert_eq!(gw.cache.stats().entries, 3);
        wait_index(dir.path(), 3, "/blob/c").await;
    }
    // Reopen: the index is loaded, entries come from disk.
    let gw = start_gateway(cfg.clone()).await;
    assert_eq!(gw.cache.stats().entries, 3);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Use a then c: b becomes the least recently used.
    for n in ["a", "c"] {
        let (status, body, xc) = curl_get(&gw.cache_url(&up(n)), &[]).await;
        assert_eq!((status, xc.as_str()), (200, "HIT"));
        assert_eq!(sha256_hex(&body), sha256_hex(&content(n, MIB)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, xc) = curl_get(&gw.cache_url(&up("d")), &[]).await;
    assert_eq!(xc, "MISS");
    let s = gw.cache.stats();
    assert_eq!((s.entries, s.evictions), (3, 1), "{s:?}");
    assert!(s.bytes <= cfg.max_bytes);
    for (n, want) in [("a", "HIT"), ("c", "HIT"), ("d", "HIT"), ("b", "MISS")] {
        let (_, _, xc) = curl_get(&gw.cache_url(&up(n)), &[]).await;
        assert_eq!(xc, want, "entry {n}");
    }
    assert_eq!(origin.hits("/blob/a"), 1);
    assert_eq!(origin.hits("/blob/b"), 2);
    // Partial files of a dead run are dropped at open.
    std::fs::write(dir.path().join("tmp/junk.part"), b"x").unwrap();
    std::fs::write(dir.path().join("objects/not-a-key"), b"x").unwrap();
    // b came back last: the index lists it once its refetch is saved.
    wait_index(dir.path(), 3, "/blob/b").await;
    drop(gw);
    let gw = start_gateway(cfg).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert!(!dir.path().join("objects/not-a-key").exists());
    assert_eq!(gw.cache.stats().entries, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_refetches_or_revalidates() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ttl = Duration::from_millis(500);
    let gw = start_gateway(cfg).await;
    // No validators: refetched.
    let plain = origin.url("/blob/t?size=5000");
    assert_eq!(curl_get(&gw.cache_url(&plain), &[]).await.2, "MISS");
    assert_eq!(curl_get(&gw.cache_url(&plain), &[]).await.2, "HIT");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, body, xc) = curl_get(&gw.cache_url(&plain), &[]).await;
    assert_eq!((status, xc.as_str(), body.len()), (200, "MISS", 5000));
    assert_eq!(origin.hits("/blob/t"), 2);
    // With an ETag: revalidated with If-None-Match, 304 keeps the stored body.
    let tagged = origin.url("/blob/e?size=5000&etag=true");
    assert_eq!(curl_get(&gw.cache_url(&tagged), &[]).await.2, "MISS");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, body, xc) = curl_get(&gw.cache_url(&tagged), &[]).await;
    assert_eq!((status, xc.as_str()), (200, "HIT"));
    assert_eq!(sha256_hex(&body), sha256_hex(&content("e", 5000)));
    assert_eq!(origin.hits("/blob/e"), 2);
    assert_eq!(
        origin
            .state
            .not_modified
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(curl_get(&gw.cache_url(&tagged), &[]).await.2, "HIT");
    assert_eq!(origin.hits("/blob/e"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_mid_download_and_digest_mismatch_abort_clients() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(config(dir.path())).await;
    let size = 4 * MIB;
    let up = origin.url(&format!("/blob/f?size={size}&rate={}", 4 * MIB));
    origin.fail_next_at(MIB as u64);
    let out = tempfile::tempdir().unwrap();
    let f = out.path().join("f");
    let o = curl(&["-o", f.to_str().unwrap(), &gw.cache_url(&up)]).await;
    assert_ne!(o.code, 0, "curl succeeded on a broken download");
    assert!(std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0) < size as u64);
    let s = gw.cache.stats();
    assert_eq!((s.entries, s.upstream_errors), (0, 1), "{s:?}");
    // The next request fetches again and succeeds.
    let (status, body, xc) = curl_get(&gw.cache_url(&up), &[]).await;
    assert_eq!((status, xc.as_str()), (200, "MISS"));
    assert_eq!(sha256_hex(&body), sha256_hex(&content("f", size)));
    assert_eq!(origin.hits("/blob/f"), 2);

    // A wrong sha256 hint: the client is cut before the last byte, nothing is stored.
    let data = content("g", 100_000);
    let up = origin.url("/blob/g?size=100000");
    let enc: String = url::form_urlencoded::byte_serialize(up.as_bytes()).collect();
    let wrong = "00".repeat(32);
    // The mismatch shows as a cut transfer, or as a 502 when the download already failed.
    let o = curl(&[
        "--fail",
        "-o",
        "/dev/null",
        &format!("{}/cache?url={enc}&sha256={wrong}", gw.base()),
    ])
    .await;
    assert_ne!(o.code, 0, "a digest mismatch was served as success");
    assert_eq!(gw.cache.stats().entries, 1);
    let good = sha256_hex(&data);
    let (status, body, _) =
        curl_get(&format!("{}/cache?url={enc}&sha256={good}", gw.base()), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&body), good);
    assert_eq!(gw.cache.stats().entries, 2);
    wait_index(dir.path(), 2, &good).await;
}
