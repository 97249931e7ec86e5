//! Cases a real registry will not produce on demand: an upstream that requires a Docker
//! token, serves a corrupted blob, retags, or goes away. The upstream here is a small HTTP
//! server written for the test; the clients are skopeo, curl and reqwest.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::{CacheServer, Image, layout_blob, pull, sha256_hex};

const PREFIX: &str = "fake.test";
const TOKEN: &str = "tok-123";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[derive(Default)]
struct Fake {
    /// tag → manifest digest
    tags: HashMap<String, String>,
    /// digest → (bytes, content type)
    manifests: HashMap<String, Vec<u8>>,
    /// digest → bytes served (possibly not matching the digest)
    blobs: HashMap<String, Vec<u8>>,
    /// "METHOD path" of every authorized request, and the token requests.
    log: Vec<String>,
    port: u16,
}

type Shared = Arc<Mutex<Fake>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Fake> {
    s.lock().expect("fake upstream state")
}

impl Fake {
    fn add_image(&mut self, image: &Image, tag: &str, corrupt_layer: bool) {
        self.tags.insert(tag.into(), image.manifest_digest.clone());
        self.manifests
            .insert(image.manifest_digest.clone(), image.manifest.clone());
        let mut layer = image.layer.clone();
        if corrupt_layer {
            let mid = layer.len() / 2;
            layer[mid] ^= 0xff;
        }
        self.blobs.insert(image.layer_digest.clone(), layer);
        self.blobs
            .insert(image.config_digest.clone(), image.config.clone());
    }

    fn count(&self, prefix: &str) -> usize {
        self.log.iter().filter(|l| l.starts_with(prefix)).count()
    }
}

async fn fake_handler(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_owned();
    let mut st = lock(&s);
    if path == "/token" {
        st.log.push(format!("TOKEN {}", uri.query().unwrap_or("")));
        return (
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#),
        )
            .into_response();
    }
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    if !authorized {
        let challenge = format!(
            r#"Bearer realm="http://127.0.0.1:{}/token",service="fake",scope="repository:test/app:pull""#,
            st.port
        );
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "",
        )
            .into_response();
    }
    st.log.push(format!("{method} {path}"));
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            r#"{"errors":[{"code":"NOT_FOUND"}]}"#,
        )
            .into_response()
    };
    let body = |b: Vec<u8>| {
        if method == Method::HEAD {
            Body::empty()
        } else {
            Body::from(b)
        }
    };
    if let Some(reference) = path.strip_prefix("/v2/test/app/manifests/") {
        let digest = st
            .tags
            .get(reference)
            .cloned()
            .unwrap_or(reference.to_owned());
        let Some(m) = st.manifests.get(&digest).cloned() else {
            return not_found();
        };
        return Response::builder()
            .header(header::CONTENT_TYPE, OCI_MANIFEST)
            .header(header::CONTENT_LENGTH, m.len())
            .header("docker-content-digest", digest)
            .body(body(m))
            .expect("fake response");
    }
    if let Some(digest) = path.strip_prefix("/v2/test/app/blobs/") {
        let Some(b) = st.blobs.get(digest).cloned() else {
            return not_found();
        };
        return Response::builder()
            .header(header::CONTENT_LENGTH, b.len())
            .body(body(b))
            .expect("fake response");
    }
    not_found()
}

struct FakeServer {
    state: Shared,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    async fn start() -> FakeServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state: Shared = Arc::default();
        lock(&state).port = port;
        let app = axum::Router::new()
            .fallback(fake_handler)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeServer { state, port, task }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_and_corrupted_blob_refused() {
    let fake = FakeServer::start().await;
    let good = Image::build(300_000, 11);
    let bad = Image::build(300_000, 12);
    lock(&fake.state).add_image(&good, "good", false);
    lock(&fake.state).add_image(&bad, "bad", true);
    let cache = CacheServer::start(
        vec![(PREFIX, format!("http://127.0.0.1:{}", fake.port))],
        Duration::from_secs(3600),
    )
    .await;

    // The good image comes through the token flow.
    let out = tempfile::tempdir().expect("temp dir");
    let o = pull(cache.port, &format!("{PREFIX}/test/app:good"), out.path()).await;
    assert!(
        o.status.success(),
        "pull failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(layout_blob(out.path(), &good.layer_digest), good.layer);
    let tokens = lock(&fake.state).count("TOKEN ");
    assert!(tokens >= 1, "no token was fetched");
    assert!(
        lock(&fake.state)
            .log
            .iter()
            .any(|l| l.contains("scope=repository%3Atest%2Fapp%3Apull")),
        "token request without the challenge's scope: {:?}",
        lock(&fake.state).log
    );

    // HEAD of a cached blob gives its length (curl, a real client).
    let head = std::process::Command::new("curl")
        .args(["-sfI", "--max-time", "10"])
        .arg(format!(
            "http://127.0.0.1:{}/v2/{PREFIX}/test/app/blobs/{}",
            cache.port, good.layer_digest
        ))
        .output()
        .expect("running curl");
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", good.layer.len())),
        "HEAD answer: {head}"
    );
    assert!(
        head.contains(&format!("docker-content-digest: {}", good.layer_digest)),
        "{head}"
    );

    // The corrupted layer is refused, to skopeo and to a plain HTTP client, and not kept.
    let out = tempfile::tempdir().expect("temp dir");
    let o = pull(cache.port, &format!("{PREFIX}/test/app:bad"), out.path()).await;
    assert!(!o.status.success(), "pull of a corrupted layer succeeded");
    let client = reqwest::Client::new();
    let url = format!(
        "http://127.0.0.1:{}/v2/{PREFIX}/test/app/blobs/{}",
        cache.port, bad.layer_digest
    );
    for attempt in 0..2 {
        let r = client
            .get(&url)
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        let complete = match r {
            Err(_) => false,
            Ok(r) if !r.status().is_success() => {
                let text = r.text().await.unwrap_or_default();
                assert!(text.contains("DIGEST_INVALID"), "error body: {text}");
                false
            }
            Ok(r) => match r.bytes().await {
                Ok(b) => sha256_hex(&b) == bad.layer_digest[7..] || b.len() == bad.layer.len(),
                Err(_) => false,
            },
        };
        assert!(
            !complete,
            "attempt {attempt}: a complete corrupted body was delivered"
        );
    }
    let stored = cache
        .cache_dir()
        .join("blobs/sha256")
        .join(&bad.layer_digest[7..9])
        .join(&bad.layer_digest[7..]);
    assert!(
        !stored.exists(),
        "corrupted blob kept at {}",
        stored.display()
    );
    let tmp: Vec<_> = std::fs::read_dir(cache.cache_dir().join("tmp"))
        .expect("tmp dir")
        .collect();
    assert!(tmp.is_empty(), "leftover temporary files: {tmp:?}");
    let s = cache.cache.stats();
    assert!(s.blob_misses >= 3, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_ttl_revalidation_and_stale_when_upstream_down() {
    let fake = FakeServer::start().await;
    let a = Image::build(1000, 21);
    let b = Image::build(1000, 22);
    lock(&fake.state).add_image(&a, "t", false);
    let cache = CacheServer::start(
        vec![(PREFIX, format!("http://127.0.0.1:{}", fake.port))],
        Duration::from_millis(500),
    )
    .await;
    let client = reqwest::Client::new();
    let get = |reference: &str| {
        client
            .get(format!(
                "http://127.0.0.1:{}/v2/{PREFIX}/test/app/manifests/{reference}",
                cache.port
            ))
            .header(header::ACCEPT, OCI_MANIFEST)
            .timeout(Duration::from_secs(20))
            .send()
    };
    let digest_of = |r: &reqwest::Response| {
        r.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let gets = |f: &FakeServer| lock(&f.state).count("GET /v2/test/app/manifests/t");
    let heads = |f: &FakeServer| lock(&f.state).count("HEAD /v2/test/app/manifests/t");

    let r = get("t").await.expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r), a.manifest_digest);
    assert_eq!(r.headers()[header::CONTENT_TYPE], OCI_MANIFEST);
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        a.manifest.as_slice()
    );
    assert_eq!(gets(&fake), 1);

    // Retagged upstream; within the TTL the cache still answers A without asking.
    lock(&fake.state).add_image(&b, "t", false);
    let r = get("t").await.expect("request");
    assert_eq!(digest_of(&r), a.manifest_digest);
    assert_eq!((gets(&fake), heads(&fake)), (1, 0));

    // After the TTL: HEAD shows a new digest, the manifest is fetched again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = get("t").await.expect("request");
    assert_eq!(digest_of(&r), b.manifest_digest);
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        b.manifest.as_slice()
    );
    assert_eq!((gets(&fake), heads(&fake)), (2, 1));

    // After the TTL again, unchanged: a HEAD only.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = get("t").await.expect("request");
    assert_eq!(digest_of(&r), b.manifest_digest);
    assert_eq!((gets(&fake), heads(&fake)), (2, 2));

    // Upstream 404s are passed on with OCI codes.
    let r = get("nope").await.expect("request");
    assert_eq!(r.status(), 404);
    assert!(r.text().await.expect("body").contains("MANIFEST_UNKNOWN"));
    let r = client
        .get(format!(
            "http://127.0.0.1:{}/v2/{PREFIX}/test/app/blobs/sha256:{}",
            cache.port,
            "0".repeat(64)
        ))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    assert!(r.text().await.expect("body").contains("BLOB_UNKNOWN"));

    // Upstream gone: the stale tag is served, an uncached manifest is a 502 naming it.
    let fake_port = fake.port;
    drop(fake);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = get("t").await.expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r), b.manifest_digest);
    let r = get(&format!("sha256:{}", "1".repeat(64)))
        .await
        .expect("request");
    assert_eq!(r.status(), 502);
    let text = r.text().await.expect("body");
    assert!(
        text.contains("UNAVAILABLE") && text.contains(&format!("127.0.0.1:{fake_port}")),
        "{text}"
    );
    // A cached digest needs no upstream.
    let r = get(&a.manifest_digest).await.expect("request");
    assert_eq!(r.status(), 200);
    let s = cache.cache.stats();
    assert_eq!(s.manifest_misses, 2, "{s:?}");
    assert!(s.manifest_hits >= 4, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_prefix_and_path_escapes_refused() {
    let fake = FakeServer::start().await;
    let cache = CacheServer::start(
        vec![(PREFIX, format!("http://127.0.0.1:{}", fake.port))],
        Duration::from_secs(60),
    )
    .await;
    let curl = |path: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--path-as-is",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://127.0.0.1:{}{path}", cache.port))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        (code.parse::<u16>().unwrap_or(0), body.to_owned())
    };
    let (code, body) = curl("/v2/");
    assert_eq!((code, body.as_str()), (200, "{}"));

    let (code, body) = curl("/v2/nope.example/library/alpine/manifests/latest");
    assert_eq!(code, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("OCI error JSON");
    assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN", "{body}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope.example"))
    );

    let escapes = [
        format!("/v2/{PREFIX}/test/app/blobs/sha256:../../x"),
        format!("/v2/{PREFIX}/test/app/blobs/sha256:..%2F..%2F..%2Fx"),
        format!("/v2/{PREFIX}/test/app/blobs/sha256%3A{}", "a".repeat(64)),
        format!("/v2/{PREFIX}/../../../tmp/blobs/sha256:{}", "a".repeat(64)),
        format!("/v2/{PREFIX}/test/app/manifests/../../../../etc/passwd"),
        format!("/v2/{PREFIX}/test/app/manifests/sha256:../x"),
        "/v2/../../etc/blobs/sha256:x".to_owned(),
    ];
    for p in &escapes {
        let (code, body) = curl(p);
        assert!((400..500).contains(&code), "{p} → {code} {body}");
        if !body.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&body).expect("OCI error JSON");
            assert!(v["errors"][0]["code"].is_string(), "{body}");
        }
    }
    // Nothing reached the upstream, nothing was written beside or inside the cache.
    assert!(
        lock(&fake.state).log.is_empty(),
        "{:?}",
        lock(&fake.state).log
    );
    let beside: Vec<_> = std::fs::read_dir(cache.dir.path())
        .expect("cache parent")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("cache")]);
    for sub in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
        let n = std::fs::read_dir(cache.cache_dir().join(sub))
            .expect("cache dir")
            .count();
        assert_eq!(n, 0, "{sub} not empty");
    }
}
