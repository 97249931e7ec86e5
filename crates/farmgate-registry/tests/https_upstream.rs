//! An HTTPS upstream (docker-registry with a certificate for 127.0.0.1 signed by a CA made
//! with the openssl CLI): trusted through `extra_ca_pem`, and a clear 502 without it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{CacheServer, DockerRegistry, Image, layout_blob, pull};

const PREFIX: &str = "tls.test";
const OPENSSL: &str = "/usr/bin/openssl";
const TTL: Duration = Duration::from_secs(3600);

fn openssl(dir: &Path, args: &[&str]) {
    assert!(
        Path::new(OPENSSL).exists(),
        "{OPENSSL} is missing: install the Debian package openssl"
    );
    let out = Command::new(OPENSSL)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `ca.pem`, `server.pem` (for IP 127.0.0.1, signed by the CA) and `server.key`.
fn make_certs(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut a = vec!["req", "-x509", "-nodes", "-days", "2"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=farmgate test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &a);
    let mut a = vec!["req", "-nodes"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("writing server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_trusted_by_extra_ca_and_refused_without() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    let ca = std::fs::read(certs.path().join("ca.pem")).expect("ca.pem");
    let upstream = DockerRegistry::start_tls(
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
        &ca,
    )
    .await;
    let image = Image::build(300_000, 40);
    // skopeo with --dest-tls-verify=false speaks TLS without checking the certificate.
    image.push(upstream.port, "test/app", "v1").await;
    let url = format!("https://127.0.0.1:{}", upstream.port);

    // Trusted through the extra CA.
    let cache = CacheServer::start_with(vec![(PREFIX, url.clone())], TTL, None, |c| {
        c.extra_ca_pem = vec![ca.clone()]
    })
    .await;
    let out = tempfile::tempdir().expect("temp dir");
    let o = pull(cache.port, &format!("{PREFIX}/test/app:v1"), out.path()).await;
    assert!(
        o.status.success(),
        "pull from the https upstream failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(layout_blob(out.path(), &image.layer_digest), image.layer);
    assert_eq!(
        upstream.count_log(&format!("\"GET /v2/test/app/blobs/{} ", image.layer_digest)),
        1
    );

    // Without it: skopeo fails with a 502, and the answer's body says why.
    let untrusting = CacheServer::start(vec![(PREFIX, url.clone())], TTL).await;
    let o = pull(
        untrusting.port,
        &format!("{PREFIX}/test/app:v1"),
        tempfile::tempdir().expect("temp dir").path(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "pull without the CA succeeded");
    // containers/image shows only the status of a 5xx answer, not its body.
    assert!(stderr.contains("502"), "skopeo: {stderr}");
    let resp = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/v2/{PREFIX}/test/app/manifests/v1",
            untrusting.port
        ))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("GET manifest from the cache");
    assert_eq!(resp.status().as_u16(), 502);
    let body: serde_json::Value = resp.json().await.expect("OCI error JSON");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    for needle in [
        url.as_str(),
        PREFIX,
        "TLS handshake failed",
        "certificate is not trusted",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
}

#[test]
fn extra_ca_that_is_not_pem_is_a_config_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = common::cache_config(
        dir.path(),
        vec![(PREFIX, "https://127.0.0.1:1".into())],
        TTL,
    );
    cfg.extra_ca_pem = vec![b"not a certificate".to_vec()];
    let err = match farmgate_registry::RegistryCache::open(cfg) {
        Ok(_) => panic!("a non-PEM CA was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("extra CA certificate bundle #1"), "{err}");
}
