//! Size-bounded blob store: least-recently-used blobs are evicted when a new blob takes the
//! store over `max_size`, blobs in use are kept, and the order survives a restart. Pulls
//! with skopeo from a real docker-registry upstream.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{CacheServer, DockerRegistry, Image, layout_blob, pull, sha256_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFIX: &str = "up.test";
const TTL: Duration = Duration::from_secs(3600);
const MIB: u64 = 1 << 20;

fn blob_gets(reg: &DockerRegistry, repo: &str, digest: &str) -> usize {
    reg.count_log(&format!("\"GET /v2/{repo}/blobs/{digest} "))
}

fn blob_file(cache: &CacheServer, digest: &str) -> PathBuf {
    cache
        .cache_dir()
        .join("blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..])
}

async fn pull_ok(cache: &CacheServer, repo: &str, image: &Image, what: &str) {
    let out = tempfile::tempdir().expect("temp dir");
    let o = pull(cache.port, &format!("{PREFIX}/{repo}:v1"), out.path()).await;
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        layout_blob(out.path(), &image.layer_digest),
        image.layer,
        "{what}: layer bytes differ"
    );
    assert_eq!(layout_blob(out.path(), &image.config_digest), image.config);
}

fn exists(p: &Path) -> bool {
    p.is_file()
}

async fn upstream_with(images: &[(&str, &Image)]) -> DockerRegistry {
    let upstream = DockerRegistry::start().await;
    for (repo, image) in images {
        image.push(upstream.port, repo, "v1").await;
    }
    upstream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bound_evicts_older_image_and_refetches_it() {
    let a = Image::build(MIB as usize, 10);
    let b = Image::build(MIB as usize, 12);
    let upstream = upstream_with(&[("test/a", &a), ("test/b", &b)]).await;
    let max = MIB * 3 / 2;
    let cache = CacheServer::start_with(
        vec![(PREFIX, format!("http://127.0.0.1:{}", upstream.port))],
        TTL,
        None,
        |c| c.max_size = Some(max),
    )
    .await;

    pull_ok(&cache, "test/a", &a, "pull of A").await;
    assert!(exists(&blob_file(&cache, &a.layer_digest)));
    assert_eq!(cache.cache.stats().evicted_blobs, 0);

    pull_ok(&cache, "test/b", &b, "pull of B").await;
    assert!(
        !exists(&blob_file(&cache, &a.layer_digest)),
        "A's layer was not evicted"
    );
    assert!(exists(&blob_file(&cache, &b.layer_digest)));
    assert!(exists(&blob_file(&cache, &b.config_digest)));
    let s = cache.cache.stats();
    assert!(s.evicted_blobs >= 1, "{s:?}");
    assert!(s.evicted_bytes >= a.layer.len() as u64, "{s:?}");
    assert!(s.blob_store_bytes <= max, "{s:?}");
    // Manifests are kept.
    let manifest = cache
        .cache_dir()
        .join("manifests/sha256")
        .join(&a.manifest_digest[7..]);
    assert!(exists(&manifest), "A's manifest was evicted");
    assert_eq!(blob_gets(&upstream, "test/a", &a.layer_digest), 1);

    // A again: its layer comes from upstream a second time, and B's goes.
    pull_ok(&cache, "test/a", &a, "second pull of A").await;
    assert_eq!(blob_gets(&upstream, "test/a", &a.layer_digest), 2);
    assert!(exists(&blob_file(&cache, &a.layer_digest)));
    assert!(
        !exists(&blob_file(&cache, &b.layer_digest)),
        "B's layer was not evicted"
    );
    let s2 = cache.cache.stats();
    assert!(s2.evicted_blobs > s.evicted_blobs, "{s2:?}");
    assert!(s2.blob_store_bytes <= max, "{s2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_order_survives_restart() {
    let a = Image::build(MIB as usize, 20);
    let b = Image::build(MIB as usize, 22);
    let c = Image::build(MIB as usize, 24);
    let upstream = upstream_with(&[("test/a", &a), ("test/b", &b), ("test/c", &c)]).await;
    let url = format!("http://127.0.0.1:{}", upstream.port);
    // Room for two images, not three.
    let max = MIB * 5 / 2;
    assert!(a.total_len() + b.total_len() < max && a.total_len() * 3 > max);
    let first = CacheServer::start_with(vec![(PREFIX, url.clone())], TTL, None, |cfg| {
        cfg.max_size = Some(max)
    })
    .await;
    pull_ok(&first, "test/a", &a, "pull of A").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    pull_ok(&first, "test/b", &b, "pull of B").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A is now the most recently used (served from the cache).
    pull_ok(&first, "test/a", &a, "second pull of A").await;
    assert_eq!(blob_gets(&upstream, "test/a", &a.layer_digest), 1);
    assert_eq!(first.cache.stats().evicted_blobs, 0);
    let dir = first.dir.clone();
    let stored = first.cache.stats().blob_store_bytes;
    drop(first);

    let second = CacheServer::start_with(vec![(PREFIX, url)], TTL, Some(dir), |cfg| {
        cfg.max_size = Some(max)
    })
    .await;
    assert_eq!(second.cache.stats().blob_store_bytes, stored);
    pull_ok(&second, "test/c", &c, "pull of C after the restart").await;
    let s = second.cache.stats();
    assert!(s.evicted_blobs >= 1, "{s:?}");
    assert!(
        !exists(&blob_file(&second, &b.layer_digest)),
        "B (least recently used before the restart) was not evicted"
    );
    assert!(
        exists(&blob_file(&second, &a.layer_digest))
            && exists(&blob_file(&second, &a.config_digest)),
        "A (used after B) was evicted: recency was lost in the restart"
    );
    // A still comes from the cache.
    pull_ok(&second, "test/a", &a, "pull of A after the restart").await;
    assert_eq!(blob_gets(&upstream, "test/a", &a.layer_digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_being_streamed_is_not_evicted() {
    let a = Image::build(16 * MIB as usize, 30);
    let b = Image::build(4 * MIB as usize, 32);
    let upstream = upstream_with(&[("test/a", &a), ("test/b", &b)]).await;
    let max = 18 * MIB;
    let cache = CacheServer::start_with(
        vec![(PREFIX, format!("http://127.0.0.1:{}", upstream.port))],
        TTL,
        None,
        |cfg| cfg.max_size = Some(max),
    )
    .await;
    pull_ok(&cache, "test/a", &a, "pull of A").await;

    // A client with a tiny receive buffer starts reading A's layer and pauses: the cache
    // cannot have sent the whole 16 MiB into the socket buffers.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut conn = sock
        .connect(([127, 0, 0, 1], cache.port).into())
        .await
        .expect("connect to the cache");
    conn.write_all(
        format!(
            "GET /v2/{PREFIX}/test/a/blobs/{} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n",
            a.layer_digest
        )
        .as_bytes(),
    )
    .await
    .expect("send GET");
    let mut got = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut got))
        .await
        .expect("first bytes within 10 s")
        .expect("read");
    got.truncate(n);
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    // B takes the store over the bound: A's layer is in use and stays.
    pull_ok(&cache, "test/b", &b, "pull of B").await;
    assert!(
        exists(&blob_file(&cache, &a.layer_digest)),
        "A's layer was deleted while a client was reading it"
    );
    // (B's blobs, unpinned once sent, may go instead: the store stays within the bound
    // only if what is unpinned allows.)
    let s = cache.cache.stats();
    assert!(s.evicted_blobs >= 1, "{s:?}");

    // The paused client reads the rest, intact.
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut got))
        .await
        .expect("rest of A's layer within 30 s")
        .expect("read the rest");
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of the response head")
        + 4;
    let body = &got[head_end..];
    assert_eq!(body.len(), a.layer.len());
    assert_eq!(format!("sha256:{}", sha256_hex(body)), a.layer_digest);
    drop(conn);

    // Unpinned now: the next stored blob brings the store back within the bound, evicting
    // A's layer.
    let c = Image::build(3 * MIB as usize, 34);
    c.push(upstream.port, "test/c", "v1").await;
    pull_ok(&cache, "test/c", &c, "pull of C").await;
    assert!(!exists(&blob_file(&cache, &a.layer_digest)));
    assert!(exists(&blob_file(&cache, &c.layer_digest)));
    let s = cache.cache.stats();
    assert!(s.blob_store_bytes <= max, "{s:?}");
}
