//! Pulls with skopeo through the cache from a real docker-registry upstream.

mod common;

use std::time::Duration;

use common::{CacheServer, CountingProxy, DockerRegistry, Image, layout_blob, pull};

const PREFIX: &str = "up.test";

fn blob_gets(reg: &DockerRegistry, digest: &str) -> usize {
    reg.count_log(&format!("\"GET /v2/test/app/blobs/{digest} "))
}

fn manifest_requests(reg: &DockerRegistry) -> usize {
    reg.count_log("/v2/test/app/manifests/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pull_through_cache_then_hit() {
    let upstream = DockerRegistry::start().await;
    let image = Image::build(1 << 20, 1);
    image.push(upstream.port, "test/app", "v1").await;
    let pushed_manifest_requests = manifest_requests(&upstream);

    let cache = CacheServer::start(
        vec![(PREFIX, format!("http://127.0.0.1:{}", upstream.port))],
        Duration::from_secs(3600),
    )
    .await;
    let out = tempfile::tempdir().expect("temp dir");
    let o = pull(cache.port, &format!("{PREFIX}/test/app:v1"), out.path()).await;
    assert!(
        o.status.success(),
        "cold pull failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        layout_blob(out.path(), &image.layer_digest),
        image.layer,
        "layer bytes differ"
    );
    assert_eq!(layout_blob(out.path(), &image.config_digest), image.config);
    assert_eq!(blob_gets(&upstream, &image.layer_digest), 1);
    assert_eq!(blob_gets(&upstream, &image.config_digest), 1);
    let s = cache.cache.stats();
    assert_eq!((s.blob_misses, s.manifest_misses), (2, 1), "{s:?}");
    assert!(s.upstream_bytes >= image.total_len(), "{s:?}");
    let after_cold = manifest_requests(&upstream);
    assert!(after_cold > pushed_manifest_requests);

    // Second pull: everything from the cache, nothing upstream.
    let out2 = tempfile::tempdir().expect("temp dir");
    let o = pull(cache.port, &format!("{PREFIX}/test/app:v1"), out2.path()).await;
    assert!(
        o.status.success(),
        "warm pull failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(layout_blob(out2.path(), &image.layer_digest), image.layer);
    assert_eq!(blob_gets(&upstream, &image.layer_digest), 1);
    assert_eq!(blob_gets(&upstream, &image.config_digest), 1);
    assert_eq!(
        manifest_requests(&upstream),
        after_cold,
        "warm pull asked upstream for the manifest"
    );
    let s2 = cache.cache.stats();
    assert_eq!((s2.blob_misses, s2.manifest_misses), (2, 1), "{s2:?}");
    assert!(s2.blob_hits >= 2 && s2.manifest_hits >= 1, "{s2:?}");
    assert_eq!(s2.upstream_bytes, s.upstream_bytes);

    // By digest too, and the blob is stored content-addressed.
    let o = pull(
        cache.port,
        &format!("{PREFIX}/test/app@{}", image.manifest_digest),
        tempfile::tempdir().expect("temp dir").path(),
    )
    .await;
    assert!(
        o.status.success(),
        "by-digest pull failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stored = cache
        .cache_dir()
        .join("blobs/sha256")
        .join(&image.layer_digest[7..9])
        .join(&image.layer_digest[7..]);
    assert_eq!(std::fs::read(stored).expect("stored layer"), image.layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_fetch_each_blob_once() {
    let upstream = DockerRegistry::start().await;
    let image = Image::build(8 << 20, 2);
    image.push(upstream.port, "test/app", "v1").await;
    // Throttled to ~16 MiB/s so the pulls overlap the download.
    let proxy = CountingProxy::start(upstream.port, Some(16 << 20)).await;
    let cache = CacheServer::start(
        vec![(PREFIX, format!("http://127.0.0.1:{}", proxy.port))],
        Duration::from_secs(3600),
    )
    .await;
    let outs: Vec<tempfile::TempDir> = (0..5)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let reference = format!("{PREFIX}/test/app:v1");
    let pulls = outs.iter().map(|o| pull(cache.port, &reference, o.path()));
    let results = futures_util::future::join_all(pulls).await;
    for (i, o) in results.iter().enumerate() {
        assert!(
            o.status.success(),
            "pull {i} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            layout_blob(outs[i].path(), &image.layer_digest),
            image.layer,
            "pull {i}"
        );
    }
    assert_eq!(
        blob_gets(&upstream, &image.layer_digest),
        1,
        "layer fetched upstream more than once"
    );
    assert_eq!(
        blob_gets(&upstream, &image.config_digest),
        1,
        "config fetched upstream more than once"
    );
    let s = cache.cache.stats();
    assert_eq!(s.blob_misses, 2, "{s:?}");
    assert_eq!(s.manifest_misses, 1, "{s:?}");
    assert!(
        s.coalesced >= 1,
        "no request joined a download in progress: {s:?}"
    );
    assert_eq!(s.blob_hits + s.coalesced + s.blob_misses, 10, "{s:?}");
    // Upstream traffic ≈ one image (plus HTTP headers).
    let bytes = proxy.bytes();
    assert!(
        bytes >= image.total_len() && bytes < image.total_len() + 64 * 1024,
        "upstream sent {bytes} bytes for an image of {}",
        image.total_len()
    );
}
