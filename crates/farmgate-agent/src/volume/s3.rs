//! A minimal async S3 client: path-style URLs, SigV4 header signing (`farmgate-sigv4`),
//! ListObjectsV2 with pagination, GetObject streamed to a file, PutObject from a file,
//! DeleteObject.

use std::path::Path;
use std::time::{Duration, SystemTime};

use farmgate_sigv4::{EMPTY_SHA256, RequestToSign, Signer, UNSIGNED_PAYLOAD, uri_encode};
use futures_util::stream::{Stream, unfold};
use reqwest::{Method, Url};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{S3Failure, VolumeError};
use crate::cmdline::MinioAlias;

/// How the body of a PutObject is covered by the signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PayloadSigning {
    /// `UNSIGNED-PAYLOAD`: the file is read once, while it is sent.
    #[default]
    Unsigned,
    /// The file's SHA-256 (read twice: hashed, then sent); the store checks it.
    Sha256,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// The full key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// `LastModified`.
    pub last_modified: SystemTime,
    /// The ETag without quotes.
    pub etag: String,
}

/// An S3 endpoint of a `b2c.minio` alias, with its credentials.
#[derive(Debug, Clone)]
pub struct S3Client {
    alias: String,
    base: Url,
    host: String,
    signer: Signer,
    http: reqwest::Client,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListBucketResult {
    #[serde(default)]
    contents: Vec<ListedObject>,
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_continuation_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedObject {
    key: String,
    #[serde(default)]
    last_modified: String,
    #[serde(default, rename = "ETag")]
    etag: String,
    #[serde(default)]
    size: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Parses an S3 `LastModified` (ISO 8601, e.g. `2024-05-01T10:00:00.000Z`).
fn parse_time(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)))
}

impl S3Client {
    /// A client of `alias`'s endpoint (`http://host:port[/base]`), region `us-east-1`.
    pub fn new(alias: &MinioAlias) -> Result<Self, VolumeError> {
        let config = |m: String| VolumeError::Config {
            message: format!("b2c.minio alias {:?}: {m}", alias.alias),
        };
        let mut base = Url::parse(&alias.url)
            .map_err(|e| config(format!("URL {:?} is not valid: {e}", alias.url)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(config(format!(
                "URL {:?} is neither http nor https",
                alias.url
            )));
        }
        let host = match (base.host_str(), base.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(config(format!("URL {:?} has no host", alias.url))),
        };
        if base.query().is_some() || base.fragment().is_some() {
            return Err(config(format!(
                "URL {:?} has a query or fragment",
                alias.url
            )));
        }
        let path = base.path().trim_end_matches('/').to_string();
        base.set_path(&path);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| config(format!("cannot build an HTTP client: {e}")))?;
        Ok(S3Client {
            alias: alias.alias.clone(),
            base,
            host,
            signer: Signer::s3(&alias.access_key, &alias.secret_key, "us-east-1"),
            http,
        })
    }

    /// The alias name (for messages).
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The path (as sent) of an object or bucket.
    fn path_of(&self, bucket: &str, key: Option<&str>) -> String {
        let mut p = self.base.path().trim_end_matches('/').to_string();
        p.push('/');
        p.push_str(&uri_encode(bucket.as_bytes(), false));
        if let Some(key) = key {
            p.push('/');
            p.push_str(&uri_encode(key.as_bytes(), true));
        }
        p
    }

    fn http_err(
        &self,
        op: &'static str,
        bucket: &str,
        key: &str,
        e: reqwest::Error,
    ) -> VolumeError {
        VolumeError::Http {
            op,
            alias: self.alias.clone(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            message: error_chain(&e),
        }
    }

    /// Sends a signed request; a non-2xx answer becomes [`VolumeError::S3`].
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        op: &'static str,
        method: Method,
        bucket: &str,
        key: Option<&str>,
        query: &str,
        payload_hash: &str,
        extra: Vec<(String, String)>,
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response, VolumeError> {
        let path = self.path_of(bucket, key);
        let key_text = key.unwrap_or("");
        let mut url = self.base.clone();
        url.set_path(&path);
        url.set_query(if query.is_empty() { None } else { Some(query) });
        // The URL parser must not have rewritten what is signed (dot segments, escapes).
        if url.path() != path {
            return Err(VolumeError::Config {
                message: format!(
                    "alias {:?}: bucket {bucket:?} key {key_text:?} does not make a stable URL path",
                    self.alias
                ),
            });
        }
        let signed = self.signer.sign(
            &RequestToSign {
                method: method.as_str(),
                host: &self.host,
                path: &path,
                query,
                headers: &extra,
                payload_hash,
            },
            SystemTime::now(),
        );
        let mut req = self.http.request(method, url);
        for (n, v) in extra.iter().chain(signed.iter()) {
            req = req.header(n.as_str(), v.as_str());
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.http_err(op, bucket, key_text, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let parsed: ErrorBody = quick_xml::de::from_str(&text).unwrap_or_default();
        Err(VolumeError::S3(Box::new(S3Failure {
            op,
            alias: self.alias.clone(),
            bucket: bucket.to_string(),
            key: key_text.to_string(),
            status,
            code: if parsed.code.is_empty() {
                format!("HTTP {status}")
            } else {
                parsed.code
            },
            message: if parsed.message.is_empty() {
                text.chars().take(200).collect()
            } else {
                parsed.message
            },
        })))
    }

    /// A request about one object, without query nor body.
    async fn no_body(
        &self,
        op: &'static str,
        method: Method,
        bucket: &str,
        key: &str,
    ) -> Result<reqwest::Response, VolumeError> {
        let no_headers = Vec::new();
        self.send(
            op,
            method,
            bucket,
            Some(key),
            "",
            EMPTY_SHA256,
            no_headers,
            None,
        )
        .await
    }

    /// Every object of `bucket` whose key starts with `prefix` (ListObjectsV2, all pages).
    pub async fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<ObjectEntry>, VolumeError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // Parameters in canonical (sorted) order, values encoded as SigV4 wants.
            let mut query = String::new();
            if let Some(t) = &token {
                query.push_str("continuation-token=");
                query.push_str(&uri_encode(t.as_bytes(), false));
                query.push('&');
            }
            query.push_str("list-type=2&prefix=");
            query.push_str(&uri_encode(prefix.as_bytes(), false));
            let resp = self
                .send(
                    "ListObjectsV2",
                    Method::GET,
                    bucket,
                    None,
                    &query,
                    EMPTY_SHA256,
                    Vec::new(),
                    None,
                )
                .await?;
            let text = resp
                .text()
                .await
                .map_err(|e| self.http_err("ListObjectsV2", bucket, prefix, e))?;
            let page: ListBucketResult =
                quick_xml::de::from_str(&text).map_err(|e| VolumeError::Protocol {
                    op: "ListObjectsV2",
                    alias: self.alias.clone(),
                    bucket: bucket.to_string(),
                    key: prefix.to_string(),
                    message: format!("the listing is not valid XML: {e}"),
                })?;
            for o in page.contents {
                let last_modified =
                    parse_time(&o.last_modified).ok_or_else(|| VolumeError::Protocol {
                        op: "ListObjectsV2",
                        alias: self.alias.clone(),
                        bucket: bucket.to_string(),
                        key: o.key.clone(),
                        message: format!("LastModified {:?} is not a date", o.last_modified),
                    })?;
                out.push(ObjectEntry {
                    key: o.key,
                    size: o.size,
                    last_modified,
                    etag: o.etag.trim_matches('"').to_string(),
                });
            }
            match (page.is_truncated, page.next_continuation_token) {
                (true, Some(t)) if !t.is_empty() && token.as_deref() != Some(&t) => token = Some(t),
                (true, _) => {
                    return Err(VolumeError::Protocol {
                        op: "ListObjectsV2",
                        alias: self.alias.clone(),
                        bucket: bucket.to_string(),
                        key: prefix.to_string(),
                        message: "truncated listing without a new continuation token".into(),
                    });
                }
                (false, _) => return Ok(out),
            }
        }
    }

    /// Downloads an object into `dest` (created or truncated), streaming; returns its size.
    pub async fn get_object_to_file(
        &self,
        bucket: &str,
        key: &str,
        dest: &Path,
    ) -> Result<u64, VolumeError> {
        let mut resp = self.no_body("GetObject", Method::GET, bucket, key).await?;
        let expected = resp.content_length();
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(VolumeError::io("create", dest))?;
        let mut total = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| self.http_err("GetObject", bucket, key, e))?
        {
            file.write_all(&chunk)
                .await
                .map_err(VolumeError::io("write", dest))?;
            total += chunk.len() as u64;
        }
        file.flush().await.map_err(VolumeError::io("write", dest))?;
        if let Some(n) = expected.filter(|&n| n != total) {
            return Err(VolumeError::Protocol {
                op: "GetObject",
                alias: self.alias.clone(),
                bucket: bucket.to_string(),
                key: key.to_string(),
                message: format!("got {total} bytes of a {n}-byte object"),
            });
        }
        Ok(total)
    }

    /// Uploads the file `src` as an object; returns the ETag (without quotes).
    pub async fn put_object_from_file(
        &self,
        bucket: &str,
        key: &str,
        src: &Path,
        signing: PayloadSigning,
    ) -> Result<String, VolumeError> {
        let hash = match signing {
            PayloadSigning::Unsigned => UNSIGNED_PAYLOAD.to_string(),
            PayloadSigning::Sha256 => sha256_file(src).await?,
        };
        let file = tokio::fs::File::open(src)
            .await
            .map_err(VolumeError::io("open", src))?;
        let len = file
            .metadata()
            .await
            .map_err(VolumeError::io("stat", src))?
            .len();
        let extra = vec![
            ("content-length".to_string(), len.to_string()),
            (
                "content-type".to_string(),
                "application/octet-stream".to_string(),
            ),
        ];
        // Exactly `len` bytes are sent, even if the file grows meanwhile.
        let body = reqwest::Body::wrap_stream(tokio_stream_of(file.take(len)));
        let resp = self
            .send(
                "PutObject",
                Method::PUT,
                bucket,
                Some(key),
                "",
                &hash,
                extra,
                Some(body),
            )
            .await?;
        Ok(resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim_matches('"')
            .to_string())
    }

    /// Deletes an object (absent objects are not an error, as in S3).
    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), VolumeError> {
        self.no_body("DeleteObject", Method::DELETE, bucket, key)
            .await?;
        Ok(())
    }
}

/// A stream of the chunks read from `reader` (64 KiB at a time).
fn tokio_stream_of<R>(
    reader: R,
) -> impl Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; 1 << 16];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    })
}

/// Hex SHA-256 of a file's content.
async fn sha256_file(path: &Path) -> Result<String, VolumeError> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(VolumeError::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(VolumeError::io("read", path))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
