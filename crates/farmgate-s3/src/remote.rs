//! Remote mode: the objects live in an external S3 store (MinIO, Garage, Ceph RGW, AWS).
//!
//! The gateway's S3 endpoint authenticates and authorizes each request as in local mode,
//! then forwards it to the external store, re-signed with the store's credentials (SigV4,
//! path-style URLs), streaming bodies both ways. `aws-chunked` bodies are decoded (and their
//! chunk signatures checked) on the way through. The synchronous API of [`crate::S3Store`]
//! does its network I/O on a thread of its own with a current-thread runtime, so it may be
//! called from inside a tokio runtime as well as from plain threads.

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;

use crate::http::{self, ApiError, ApiResult, BodyReader, Payload};
use crate::sigv4::{self, OutgoingRequest};
use crate::xml::{self, XmlWriter};
use crate::{Credentials, Identity, RemoteStore, S3Error, parse_request_path};

/// Longest wait for a TCP (and TLS) connection to the store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence of the store while a response is read.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest ListBuckets answer read to filter it for a restricted key.
const MAX_BUCKET_LIST: usize = 16 << 20;
/// Presigned-URL parameters of the incoming request, never forwarded.
const PRESIGN_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-Content-Sha256",
];

/// A configured external store.
pub(crate) struct Remote {
    /// The URL as configured (without a trailing `/`): what error messages name.
    url: String,
    /// `scheme://host[:port]`.
    origin: String,
    /// The URL's path prefix, encoded, without a trailing `/` ("" when none).
    prefix: String,
    /// The Host header value (port only when not the scheme's default).
    host: String,
    region: String,
    creds: Credentials,
    /// The client of the proxy (used from the runtime that serves the router).
    client: reqwest::Client,
}

use farmgate_httpc::error_chain;

fn new_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        // A redirect would be re-sent with a signature for another URL.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
}

impl Remote {
    /// Checks the configuration (nothing is sent).
    pub(crate) fn new(cfg: &RemoteStore) -> Result<Remote, S3Error> {
        let shown = cfg.url.trim().trim_end_matches('/').to_string();
        let fail = |reason: &str| S3Error::Remote {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let url = reqwest::Url::parse(&shown)
            .map_err(|e| fail(&format!("not a valid URL ({e}); expected http://host:port")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail("the URL must start with http:// or https://"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(fail("the URL must not have a query or fragment"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(fail(
                "the URL must not carry credentials: configure the store's access and secret keys",
            ));
        }
        let host = url.host_str().ok_or_else(|| fail("the URL has no host"))?;
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        if cfg.region.trim().is_empty() {
            return Err(fail("the region is empty"));
        }
        crate::check_credentials(&cfg.creds)?;
        let prefix = sigv4::canonical_uri(url.path())
            .trim_end_matches('/')
            .to_string();
        let client = new_client().map_err(|r| fail(&r))?;
        Ok(Remote {
            origin: format!("{}://{host}", url.scheme()),
            url: shown,
            prefix,
            host,
            region: cfg.region.trim().to_string(),
            creds: cfg.creds.clone(),
            client,
        })
    }

    /// The store's URL as configured.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, reason: impl Into<String>) -> S3Error {
        S3Error::Remote {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> S3Error {
        self.err(format!(
            "the store cannot be reached or broke off: {}",
            error_chain(e)
        ))
    }

    /// A request to the store, signed. `path` is canonical (encoded, starting with `/`)
    /// and does not include the URL's prefix; `query` is canonical. `headers` are
    /// `(lower-case name, value)`; those to sign (`x-amz-*`, Content-MD5, Content-Type)
    /// are signed with Host, X-Amz-Date and X-Amz-Content-Sha256.
    fn request(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        query: &str,
        mut headers: Vec<(String, String)>,
        payload_hash: &str,
    ) -> reqwest::RequestBuilder {
        let full_path = format!("{}{path}", self.prefix);
        let mut url = format!("{}{full_path}", self.origin);
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let datetime = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        headers.push(("host".into(), self.host.clone()));
        headers.push(("x-amz-date".into(), datetime.clone()));
        headers.push(("x-amz-content-sha256".into(), payload_hash.to_string()));
        let signed: Vec<(String, String)> = headers
            .iter()
            .filter(|(n, _)| {
                n == "host" || n == "content-md5" || n == "content-type" || n.starts_with("x-amz-")
            })
            .cloned()
            .collect();
        let authorization = sigv4::authorization_for(
            &OutgoingRequest {
                method: method.as_str(),
                canonical_uri: &full_path,
                canonical_query: query,
                headers: &signed,
                payload_hash,
                datetime: &datetime,
            },
            &self.creds.access_key,
            &self.creds.secret_key,
            &self.region,
        );
        let mut rb = client.request(method, url);
        for (n, v) in headers {
            rb = rb.header(n, v);
        }
        rb.header("authorization", authorization)
    }

    /// Runs `fut` to completion on a thread of its own with a current-thread runtime:
    /// usable from runtime worker threads, `spawn_blocking` and plain threads alike.
    fn block_on<T: Send>(
        &self,
        fut: impl Future<Output = Result<T, S3Error>> + Send,
    ) -> Result<T, S3Error> {
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| self.err(format!("cannot start the I/O runtime: {e}")))?;
                rt.block_on(fut)
            });
            worker
                .join()
                .unwrap_or_else(|_| Err(self.err("the I/O thread of the request panicked")))
        })
    }

    /// A fresh client for one synchronous call (its connections die with its runtime).
    fn sync_client(&self) -> Result<reqwest::Client, S3Error> {
        new_client().map_err(|r| self.err(r))
    }

    /// Sends a request and turns an error answer into an [`S3Error`] about `bucket`/`key`.
    async fn send_ok(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
        bucket: &str,
        key: Option<&str>,
    ) -> Result<reqwest::Response, S3Error> {
        let resp = rb.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        let parsed: xml::ErrorBody = xml::parse(&body).unwrap_or_default();
        Err(self.answer_error(what, status, &parsed, bucket, key))
    }

    fn answer_error(
        &self,
        what: &str,
        status: StatusCode,
        body: &xml::ErrorBody,
        bucket: &str,
        key: Option<&str>,
    ) -> S3Error {
        let bucket = bucket.to_string();
        let no_code = body.code.is_empty();
        match (body.code.as_str(), key) {
            ("NoSuchBucket", _) => S3Error::NoSuchBucket { bucket },
            ("NoSuchKey", Some(k)) => S3Error::NoSuchKey {
                bucket,
                key: k.to_string(),
            },
            (_, None) if no_code && status == StatusCode::NOT_FOUND => {
                S3Error::NoSuchBucket { bucket }
            }
            (_, Some(k)) if no_code && status == StatusCode::NOT_FOUND => S3Error::NoSuchKey {
                bucket,
                key: k.to_string(),
            },
            ("BucketAlreadyOwnedByYou" | "BucketAlreadyExists", _) => {
                S3Error::BucketExists { bucket }
            }
            ("BucketNotEmpty", _) => S3Error::BucketNotEmpty { bucket },
            (code, _) => self.err(format!(
                "{what}: the store answered HTTP {status}{}{}",
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" {code}")
                },
                if body.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", body.message)
                },
            )),
        }
    }

    /// Creates a bucket; [`S3Error::BucketExists`] if it exists (AWS's us-east-1, and moto,
    /// answer 200 to re-creating one's own bucket: asked first, as local mode refuses it).
    pub(crate) fn create_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        if self.bucket_exists(bucket)? {
            return Err(S3Error::BucketExists {
                bucket: bucket.to_string(),
            });
        }
        let client = self.sync_client()?;
        let body = if self.region == "us-east-1" {
            String::new()
        } else {
            let mut w = XmlWriter::new("CreateBucketConfiguration");
            w.elem("LocationConstraint", &self.region);
            w.finish("CreateBucketConfiguration")
        };
        let hash = sigv4::sha256_hex(body.as_bytes());
        let rb = self
            .request(
                &client,
                Method::PUT,
                &format!("/{bucket}"),
                "",
                Vec::new(),
                &hash,
            )
            .body(body);
        self.block_on(async {
            self.send_ok(rb, &format!("create bucket {bucket}"), bucket, None)
                .await
                .map(drop)
        })
    }

    pub(crate) fn bucket_exists(&self, bucket: &str) -> Result<bool, S3Error> {
        let client = self.sync_client()?;
        let rb = self.request(
            &client,
            Method::HEAD,
            &format!("/{bucket}"),
            "",
            Vec::new(),
            sigv4::EMPTY_SHA256,
        );
        self.block_on(async {
            let resp = rb.send().await.map_err(|e| self.unreachable(&e))?;
            match resp.status() {
                s if s.is_success() => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                s => Err(self.err(format!("HEAD bucket {bucket}: the store answered HTTP {s}"))),
            }
        })
    }

    pub(crate) fn put_object(&self, bucket: &str, key: &str, data: &[u8]) -> Result<(), S3Error> {
        let client = self.sync_client()?;
        let hash = sigv4::sha256_hex(data);
        let rb = self
            .request(
                &client,
                Method::PUT,
                &object_path(bucket, key),
                "",
                Vec::new(),
                &hash,
            )
            .body(Bytes::copy_from_slice(data));
        self.block_on(async {
            self.send_ok(rb, &format!("put object {bucket}/{key}"), bucket, Some(key))
                .await
                .map(drop)
        })
    }

    /// One page of ListObjectsV2.
    async fn list_page(
        &self,
        client: &reqwest::Client,
        bucket: &str,
        token: Option<&str>,
    ) -> Result<xml::ListBucketResult, S3Error> {
        let mut raw = "list-type=2".to_string();
        if let Some(t) = token {
            raw.push_str("&continuation-token=");
            raw.push_str(&sigv4::uri_encode(t.as_bytes(), false));
        }
        let rb = self.request(
            client,
            Method::GET,
            &format!("/{bucket}"),
            &sigv4::canonical_query(&raw, false),
            Vec::new(),
            sigv4::EMPTY_SHA256,
        );
        let what = format!("list bucket {bucket}");
        let resp = self.send_ok(rb, &what, bucket, None).await?;
        let body = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        xml::parse(&body).map_err(|m| self.err(format!("{what}: {m}")))
    }

    async fn list_all(
        &self,
        client: &reqwest::Client,
        bucket: &str,
    ) -> Result<Vec<(String, u64)>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_page(client, bucket, token.as_deref()).await?;
            out.extend(page.contents.into_iter().map(|o| (o.key, o.size)));
            match page.next_continuation_token {
                Some(t) if page.is_truncated && token.as_deref() != Some(t.as_str()) => {
                    token = Some(t);
                }
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    pub(crate) fn list_objects(&self, bucket: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let client = self.sync_client()?;
        self.block_on(self.list_all(&client, bucket))
    }

    pub(crate) fn delete_bucket_recursive(&self, bucket: &str) -> Result<(), S3Error> {
        let client = self.sync_client()?;
        self.block_on(async {
            // Objects: each round deletes one page; a round that deletes nothing ends it.
            loop {
                let page = self.list_page(&client, bucket, None).await?;
                if page.contents.is_empty() {
                    break;
                }
                for o in &page.contents {
                    let rb = self.request(
                        &client,
                        Method::DELETE,
                        &object_path(bucket, &o.key),
                        "",
                        Vec::new(),
                        sigv4::EMPTY_SHA256,
                    );
                    let what = format!("delete object {bucket}/{}", o.key);
                    match self.send_ok(rb, &what, bucket, Some(&o.key)).await {
                        Ok(_) | Err(S3Error::NoSuchKey { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            // Unfinished multipart uploads.
            let rb = self.request(
                &client,
                Method::GET,
                &format!("/{bucket}"),
                "uploads=",
                Vec::new(),
                sigv4::EMPTY_SHA256,
            );
            let what = format!("list multipart uploads of bucket {bucket}");
            let resp = self.send_ok(rb, &what, bucket, None).await?;
            let body = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
            let uploads: xml::ListUploadsResult =
                xml::parse(&body).map_err(|m| self.err(format!("{what}: {m}")))?;
            for u in &uploads.uploads {
                let query = sigv4::canonical_query(
                    &format!(
                        "uploadId={}",
                        sigv4::uri_encode(u.upload_id.as_bytes(), false)
                    ),
                    false,
                );
                let rb = self.request(
                    &client,
                    Method::DELETE,
                    &object_path(bucket, &u.key),
                    &query,
                    Vec::new(),
                    sigv4::EMPTY_SHA256,
                );
                let what = format!(
                    "abort multipart upload {} of {bucket}/{}",
                    u.upload_id, u.key
                );
                // Finished or aborted meanwhile: fine.
                let _ = self.send_ok(rb, &what, bucket, Some(&u.key)).await;
            }
            let rb = self.request(
                &client,
                Method::DELETE,
                &format!("/{bucket}"),
                "",
                Vec::new(),
                sigv4::EMPTY_SHA256,
            );
            self.send_ok(rb, &format!("delete bucket {bucket}"), bucket, None)
                .await
                .map(drop)
        })
    }

    /// Streams an object into `out` (which stays on the calling thread: the I/O thread
    /// hands it the body piece by piece through a bounded channel).
    pub(crate) fn read_object_to(
        &self,
        bucket: &str,
        key: &str,
        out: &mut dyn Write,
    ) -> Result<u64, S3Error> {
        let client = self.sync_client()?;
        let rb = self.request(
            &client,
            Method::GET,
            &object_path(bucket, key),
            "",
            Vec::new(),
            sigv4::EMPTY_SHA256,
        );
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
        std::thread::scope(|s| {
            let worker = s.spawn(move || -> Result<(), S3Error> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| self.err(format!("cannot start the I/O runtime: {e}")))?;
                rt.block_on(async {
                    let what = format!("get object {bucket}/{key}");
                    let resp = self.send_ok(rb, &what, bucket, Some(key)).await?;
                    let mut stream = resp.bytes_stream();
                    while let Some(piece) = stream.next().await {
                        let piece = piece.map_err(|e| {
                            self.err(format!("{what}: reading the body: {}", error_chain(&e)))
                        })?;
                        // The reader went away (its write failed): stop quietly.
                        if tx.send(piece).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            });
            let mut written = 0u64;
            let mut write_error = None;
            while let Ok(piece) = rx.recv() {
                if let Err(e) = out.write_all(&piece) {
                    write_error = Some(e);
                    break;
                }
                written += piece.len() as u64;
            }
            drop(rx);
            let fetched = worker
                .join()
                .unwrap_or_else(|_| Err(self.err("the I/O thread of the request panicked")));
            if let Some(e) = write_error {
                return Err(S3Error::Io {
                    action: format!("write the content of object {bucket}/{key} to the output"),
                    path: std::path::PathBuf::from(format!("{}/{bucket}/{key}", self.url)),
                    source: e,
                });
            }
            fetched.map(|()| written)
        })
    }
}

/// The canonical path of an object.
fn object_path(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{}", sigv4::uri_encode(key.as_bytes(), true))
}

/// The bucket of an `x-amz-copy-source` value (`[/]bucket/key[?versionId=..]`, encoded).
fn copy_source_bucket(source: &str) -> ApiResult<String> {
    let path = source.split('?').next().unwrap_or("");
    let path = format!("/{}", path.trim_start_matches('/'));
    match parse_request_path(&path)? {
        (Some(bucket), Some(_)) => Ok(bucket),
        _ => Err(ApiError::bad(
            "InvalidArgument",
            format!("x-amz-copy-source {source:?} must be <bucket>/<key>"),
        )),
    }
}

/// The canonical query forwarded: the incoming one without presigned-URL parameters.
fn outgoing_query(raw: &str) -> String {
    let kept: Vec<&str> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(k, _)| k);
            let name = String::from_utf8_lossy(&sigv4::percent_decode(name, true)).into_owned();
            !PRESIGN_PARAMS.contains(&name.as_str())
        })
        .collect();
    sigv4::canonical_query(&kept.join("&"), false)
}

/// Whether an incoming request header goes on to the store.
fn forwarded_request_header(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "content-md5"
            | "range"
            | "if-match"
            | "if-none-match"
            | "if-modified-since"
            | "if-unmodified-since"
            | "cache-control"
            | "content-disposition"
            | "content-language"
            | "expires"
            | "x-amz-metadata-directive"
            | "x-amz-tagging"
            | "x-amz-tagging-directive"
            | "x-amz-storage-class"
            | "x-amz-website-redirect-location"
    ) || name.starts_with("x-amz-meta-")
        || name.starts_with("x-amz-copy-source")
        || name.starts_with("x-amz-server-side-encryption")
}

/// The headers forwarded, as `(lower-case name, value)`. Checksum headers are not: the
/// trailing checksums of aws-chunked bodies are consumed here, so the store must not
/// expect them.
fn request_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let n = name.as_str();
        let Ok(v) = value.to_str() else { continue };
        if forwarded_request_header(n) {
            out.push((n.to_string(), v.to_string()));
        } else if n == "content-encoding" {
            let rest: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("aws-chunked"))
                .collect();
            if !rest.is_empty() {
                out.push((n.to_string(), rest.join(",")));
            }
        }
    }
    out
}

/// Whether a response header of the store goes back to the client.
fn forwarded_response_header(name: &str) -> bool {
    matches!(
        name,
        "etag"
            | "content-length"
            | "content-type"
            | "last-modified"
            | "content-range"
            | "accept-ranges"
            | "content-encoding"
            | "content-disposition"
            | "content-language"
            | "cache-control"
            | "expires"
            | "location"
    ) || (name.starts_with("x-amz-") && name != "x-amz-request-id" && name != "x-amz-id-2")
}

/// The first error of the incoming body, kept for the answer to the client.
type BodyFailure = Arc<Mutex<Option<ApiError>>>;

/// The decoded incoming body as a stream for the outgoing request. An error (bad chunk
/// signature, SHA-256 mismatch, truncated body) aborts the outgoing request and is kept.
fn body_stream(reader: BodyReader, failure: BodyFailure) -> reqwest::Body {
    let stream = futures_util::stream::unfold(Some(reader), move |state| {
        let failure = failure.clone();
        async move {
            let mut reader = state?;
            match reader.next().await {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(reader))),
                Ok(None) => None,
                Err(e) => {
                    let message = e.message.clone();
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    Some((Err(std::io::Error::other(message)), None))
                }
            }
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// Serves one request in remote mode.
pub(crate) async fn proxy(
    store: &crate::S3Store,
    remote: &Remote,
    req: Request,
) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let auth = http::authenticate(store, &parts, Utc::now())?;
    let (bucket, key) = parse_request_path(parts.uri.path())?;
    let identity = auth.identity.clone();
    if let Some(b) = &bucket {
        http::authorize(&identity, b)?;
    }
    if let Some(src) = http::header_str(&parts.headers, "x-amz-copy-source") {
        let src_bucket = copy_source_bucket(src)?;
        http::authorize(&identity, &src_bucket)?;
    }
    let method = parts.method.clone();
    let path = sigv4::canonical_uri(parts.uri.path());
    let query = outgoing_query(parts.uri.query().unwrap_or(""));
    let mut headers = request_headers(&parts.headers);
    let chunked = matches!(auth.payload, Payload::Chunked(_));
    // A signed payload hash is passed on, so the store checks the body too.
    let mut payload_hash = match &auth.payload {
        Payload::Sha256(h) => h.clone(),
        _ => sigv4::UNSIGNED_PAYLOAD.to_string(),
    };
    let length_header = if chunked {
        "x-amz-decoded-content-length"
    } else {
        "content-length"
    };
    let length = match http::header_str(&parts.headers, length_header) {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::bad(
                "InvalidArgument",
                format!("{length_header} {v:?} is not a number"),
            )
        })?),
        None => None,
    };
    let completes_upload = method == Method::POST
        && key.is_some()
        && sigv4::parse_query(&query)
            .iter()
            .any(|(k, _)| k == "uploadId");
    let mut reader = BodyReader::new(body, auth.payload, &parts.headers);
    let failure: BodyFailure = Arc::new(Mutex::new(None));
    let outgoing_body = if completes_upload {
        // Small XML: the per-part checksums are dropped (the store never saw them).
        let raw = reader.read_all(http::MAX_XML_BODY).await?;
        let text = String::from_utf8(raw)
            .map_err(|_| ApiError::bad("MalformedXML", "the XML body is not UTF-8"))?;
        let stripped = xml::strip_elements(&text, "Checksum");
        payload_hash = sigv4::sha256_hex(stripped.as_bytes());
        Some(reqwest::Body::from(stripped))
    } else if length == Some(0)
        || (length.is_none() && !chunked && matches!(method, Method::GET | Method::HEAD))
    {
        // Checks the (empty) body against its signed hash.
        reader.read_all(0).await?;
        if length == Some(0) {
            Some(reqwest::Body::from(Vec::new()))
        } else {
            None
        }
    } else {
        if let Some(n) = length {
            headers.push(("content-length".into(), n.to_string()));
        }
        Some(body_stream(reader, failure.clone()))
    };
    let mut rb = remote.request(
        &remote.client,
        method.clone(),
        &path,
        &query,
        headers,
        &payload_hash,
    );
    if let Some(b) = outgoing_body {
        rb = rb.body(b);
    }
    let result = rb.send().await;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    let resp = result.map_err(|e| ApiError::from(remote.unreachable(&e)))?;
    if bucket.is_none()
        && method == Method::GET
        && resp.status().is_success()
        && matches!(identity, Identity::Restricted { .. })
    {
        return filtered_bucket_list(remote, resp, &identity).await;
    }
    Ok(pass_response(resp))
}

/// The store's ListBuckets answer with only the buckets `identity` may use.
async fn filtered_bucket_list(
    remote: &Remote,
    resp: reqwest::Response,
    identity: &Identity,
) -> ApiResult<Response> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_BUCKET_LIST as u64)
    {
        return Err(remote
            .err("the bucket list of the store is larger than 16 MiB")
            .into());
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| ApiError::from(remote.unreachable(&e)))?;
    let list: xml::ListAllMyBuckets =
        xml::parse(&body).map_err(|m| ApiError::from(remote.err(format!("list buckets: {m}"))))?;
    let mut w = XmlWriter::new("ListAllMyBucketsResult");
    http::owner(&mut w, "Owner");
    w.open("Buckets");
    for b in list.buckets.bucket {
        if identity.may_access(&b.name) {
            w.open("Bucket")
                .elem("Name", &b.name)
                .elem("CreationDate", &b.creation_date)
                .close("Bucket");
        }
    }
    w.close("Buckets");
    Ok(http::xml_response(
        StatusCode::OK,
        w.finish("ListAllMyBucketsResult"),
    ))
}

/// The store's answer as the client's: status, the headers that matter, streamed body.
fn pass_response(resp: reqwest::Response) -> Response {
    let status = resp.status();
    let headers: Vec<_> = resp
        .headers()
        .iter()
        .filter(|(n, _)| forwarded_response_header(n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    for (n, v) in headers {
        out.headers_mut().append(n, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presign_parameters_are_not_forwarded() {
        assert_eq!(
            outgoing_query(
                "X-Amz-Algorithm=AWS4-HMAC-SHA256&uploadId=a%2Fb&X-Amz-Signature=00&partNumber=2&uploads"
            ),
            "partNumber=2&uploadId=a%2Fb&uploads="
        );
    }

    #[test]
    fn copy_source_names_its_bucket() {
        assert_eq!(
            copy_source_bucket("src/a%20b?versionId=1").ok(),
            Some("src".into())
        );
        assert_eq!(copy_source_bucket("/src/k").ok(), Some("src".into()));
        assert!(copy_source_bucket("src").is_err());
        assert!(copy_source_bucket("src/../x").is_err());
    }

    #[test]
    fn bad_store_urls_are_refused() {
        let creds = Credentials {
            access_key: "AK".into(),
            secret_key: "SK".into(),
        };
        for url in ["ftp://h", "not a url", "http://u:p@h:9000", "http://h/?x=1"] {
            let cfg = RemoteStore {
                url: url.into(),
                region: "us-east-1".into(),
                creds: creds.clone(),
            };
            assert!(
                matches!(Remote::new(&cfg), Err(S3Error::Remote { .. })),
                "{url}"
            );
        }
        let r = Remote::new(&RemoteStore {
            url: "http://127.0.0.1:9000/prefix/".into(),
            region: "us-east-1".into(),
            creds,
        })
        .expect("valid URL");
        assert_eq!(r.host, "127.0.0.1:9000");
        assert_eq!(r.prefix, "/prefix");
        assert_eq!(r.url(), "http://127.0.0.1:9000/prefix");
    }
}
