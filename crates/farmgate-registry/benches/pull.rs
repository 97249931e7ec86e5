//! 20 concurrent cold `skopeo copy` pulls of an image with a 65 MiB layer, through
//! farmgate-registry and through docker-registry in proxy mode, side by side; bytes fetched
//! from the upstream (counted by a TCP proxy in front of it) and wall time, 2 rounds with
//! fresh caches. Run: `cargo bench -p farmgate-registry --bench pull`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{CacheServer, CountingProxy, DockerRegistry, Image, pull};

const PULLS: usize = 20;
const LAYER: usize = 65 << 20;
const ROUNDS: usize = 2;

struct Row {
    round: usize,
    cache: &'static str,
    ok: usize,
    upstream_bytes: u64,
    secs: f64,
}

/// Runs the pulls of `reference` through `port`; returns (successful pulls, seconds).
async fn pulls(port: u16, reference: &str, image: &Image) -> (usize, f64) {
    let outs: Vec<tempfile::TempDir> = (0..PULLS)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let start = Instant::now();
    let results =
        futures_util::future::join_all(outs.iter().map(|o| pull(port, reference, o.path()))).await;
    let secs = start.elapsed().as_secs_f64();
    let mut ok = 0;
    for (o, out) in results.iter().zip(&outs) {
        let layer = out
            .path()
            .join("blobs/sha256")
            .join(&image.layer_digest[7..]);
        let size = std::fs::metadata(&layer).map(|m| m.len()).unwrap_or(0);
        if o.status.success() && size == image.layer.len() as u64 {
            ok += 1;
        } else {
            eprintln!("pull failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    (ok, secs)
}

fn main() {
    common::need_tools();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let image = Image::build(LAYER, 65);
        let upstream = DockerRegistry::start().await;
        image.push(upstream.port, "test/app", "v1").await;
        let mut rows = Vec::new();
        for round in 1..=ROUNDS {
            {
                let proxy = CountingProxy::start(upstream.port, None).await;
                let cache = CacheServer::start(
                    vec![("up.test", format!("http://127.0.0.1:{}", proxy.port))],
                    Duration::from_secs(3600),
                )
                .await;
                let (ok, secs) = pulls(cache.port, "up.test/test/app:v1", &image).await;
                eprintln!("farmgate-registry round {round}: {:?}", cache.cache.stats());
                rows.push(Row {
                    round,
                    cache: "farmgate-registry",
                    ok,
                    upstream_bytes: proxy.bytes(),
                    secs,
                });
            }
            {
                let proxy = CountingProxy::start(upstream.port, None).await;
                let mirror =
                    DockerRegistry::start_proxy(&format!("http://127.0.0.1:{}", proxy.port)).await;
                let (ok, secs) = pulls(mirror.port, "test/app:v1", &image).await;
                rows.push(Row {
                    round,
                    cache: "docker-registry proxy",
                    ok,
                    upstream_bytes: proxy.bytes(),
                    secs,
                });
            }
        }
        let size = image.total_len();
        println!(
            "\n{PULLS} concurrent cold skopeo pulls, image {size} bytes ({:.1} MiB, one {} MiB layer)\n",
            size as f64 / (1 << 20) as f64,
            LAYER >> 20
        );
        println!("| round | cache | pulls ok | upstream bytes | × image | wall time |");
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {}/{PULLS} | {} | {:.2}× | {:.1} s |",
                r.round,
                r.cache,
                r.ok,
                r.upstream_bytes,
                r.upstream_bytes as f64 / size as f64,
                r.secs
            );
        }
    });
}
