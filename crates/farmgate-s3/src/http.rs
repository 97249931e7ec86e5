//! The S3 REST API over axum: authentication (SigV4 header and presigned query), the
//! request body decoding (plain, checked SHA-256, aws-chunked) and the operations.

use std::fs;
use std::io::{Read, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use axum::Router;
use axum::body::{Body, BodyDataStream};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::StreamExt;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::io_err;
use crate::sigv4::{self, ChunkDecoder, ChunkSigner};
use crate::xml::{self, XmlWriter};
use crate::{
    Identity, ObjectInfo, ObjectMeta, S3Error, S3Store, UploadInfo, parse_request_path, random_hex,
    read_upload_info,
};

/// Largest clock difference accepted between a client and the store.
const MAX_SKEW_SECS: i64 = 15 * 60;
/// Largest XML request body read (DeleteObjects of 1000 long keys fits).
pub(crate) const MAX_XML_BODY: usize = 4 << 20;
const OWNER_ID: &str = "farmgate";

pub(crate) fn router(store: S3Store) -> Router {
    Router::new().fallback(handle).with_state(store)
}

/// An S3 error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn denied(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    fn not_implemented(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            format!("{what} is not implemented by this S3 store"),
        )
    }

    fn into_response(self, resource: &str, request_id: &str, head: bool) -> Response {
        let body = if head {
            Body::empty()
        } else {
            let mut w = XmlWriter::new_plain("Error");
            w.elem("Code", self.code)
                .elem("Message", &self.message)
                .elem("Resource", resource)
                .elem("RequestId", request_id);
            Body::from(w.finish("Error"))
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        resp
    }
}

/// A failure of the gateway itself (a task that panicked, a response that cannot be
/// built): `500 InternalError` with its message.
fn internal_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        e.to_string(),
    )
}

impl From<S3Error> for ApiError {
    fn from(e: S3Error) -> Self {
        let msg = e.to_string();
        match e {
            S3Error::InvalidBucketName { .. } => ApiError::bad("InvalidBucketName", msg),
            S3Error::InvalidKey { .. } | S3Error::KeyConflict { .. } => {
                ApiError::bad("InvalidArgument", msg)
            }
            S3Error::NoSuchBucket { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "NoSuchBucket", msg)
            }
            S3Error::NoSuchKey { .. } => ApiError::new(StatusCode::NOT_FOUND, "NoSuchKey", msg),
            S3Error::NoSuchUpload { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "NoSuchUpload", msg)
            }
            S3Error::BucketExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "BucketAlreadyOwnedByYou", msg)
            }
            S3Error::BucketNotEmpty { .. } => {
                ApiError::new(StatusCode::CONFLICT, "BucketNotEmpty", msg)
            }
            S3Error::Remote { .. } => {
                tracing::warn!(error = %msg, "external S3 store failed");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", msg)
            }
            S3Error::AccessKeyExists { .. }
            | S3Error::NoSuchAccessKey { .. }
            | S3Error::InvalidCredentials { .. }
            | S3Error::KeysFile { .. }
            | S3Error::Io { .. } => {
                tracing::error!(error = %msg, "S3 request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "internal error of the store (details are in the gateway log)",
                )
            }
        }
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

async fn handle(State(store): State<S3Store>, req: Request) -> Response {
    let request_id = random_hex(8).to_uppercase();
    let head = req.method() == Method::HEAD;
    let resource = req.uri().path().to_string();
    let method = req.method().clone();
    let result = match store.remote() {
        Some(remote) => crate::remote::proxy(&store, remote, req).await,
        None => dispatch(&store, req).await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %resource, code = e.code, message = %e.message, "S3 error");
            e.into_response(&resource, &request_id, head)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-amz-request-id", v);
    }
    resp.headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("farmgate-s3"));
    resp
}

/// How the request body is to be read and checked.
pub(crate) enum Payload {
    Unsigned,
    Sha256(String),
    Chunked(Option<ChunkSigner>),
}

pub(crate) struct Auth {
    pub(crate) identity: Identity,
    pub(crate) payload: Payload,
}

fn parse_amz_date(s: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|n| n.and_utc())
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The canonical `(name, value)` list of the signed headers.
fn signed_header_values(parts: &Parts, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|name| {
            let mut values: Vec<String> = parts
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| sigv4::canonical_header_value(&String::from_utf8_lossy(v.as_bytes())))
                .collect();
            if values.is_empty()
                && name == "host"
                && let Some(a) = parts.uri.authority()
            {
                values.push(a.to_string());
            }
            (name.clone(), values.join(","))
        })
        .collect()
}

fn signature_mismatch(access_key: &str) -> ApiError {
    ApiError::denied(
        "SignatureDoesNotMatch",
        format!(
            "the request signature we calculated does not match the signature you provided \
             (access key {access_key}): check the secret key and signing method"
        ),
    )
}

pub(crate) fn authenticate(store: &S3Store, parts: &Parts, now: DateTime<Utc>) -> ApiResult<Auth> {
    let raw_query = parts.uri.query().unwrap_or("");
    let method = parts.method.as_str();
    let uri = sigv4::canonical_uri(parts.uri.path());
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| {
            ApiError::bad(
                "AuthorizationHeaderMalformed",
                "the Authorization header is not ASCII",
            )
        })?;
        if value.starts_with("AWS ") {
            return Err(ApiError::bad(
                "InvalidRequest",
                "AWS Signature Version 2 is not supported: sign requests with Signature \
                 Version 4 (AWS4-HMAC-SHA256)",
            ));
        }
        let a = sigv4::parse_authorization(value)
            .map_err(|m| ApiError::bad("AuthorizationHeaderMalformed", m))?;
        let (secret, identity) = store.lookup_key(&a.access_key).ok_or_else(|| {
            ApiError::denied(
                "InvalidAccessKeyId",
                format!(
                    "the access key {:?} does not exist in our records",
                    a.access_key
                ),
            )
        })?;
        let (datetime, time) = match header_str(&parts.headers, "x-amz-date") {
            Some(d) => (d.to_string(), parse_amz_date(d)),
            None => match header_str(&parts.headers, "date")
                .and_then(|d| httpdate::parse_http_date(d).ok())
            {
                Some(t) => {
                    let t: DateTime<Utc> = t.into();
                    (t.format("%Y%m%dT%H%M%SZ").to_string(), Some(t))
                }
                None => (String::new(), None),
            },
        };
        let time = time.ok_or_else(|| {
            ApiError::denied(
                "AccessDenied",
                "AWS authentication requires a valid Date or x-amz-date header",
            )
        })?;
        if (now - time).num_seconds().abs() > MAX_SKEW_SECS {
            return Err(ApiError::denied(
                "RequestTimeTooSkewed",
                format!(
                    "the difference between the request time ({time}) and the server time \
                     ({now}) is more than 15 minutes"
                ),
            ));
        }
        if !datetime.starts_with(&a.date) || a.service != "s3" {
            return Err(ApiError::bad(
                "AuthorizationHeaderMalformed",
                format!(
                    "the credential scope {} does not match the request date {datetime} or \
                     service s3",
                    a.scope()
                ),
            ));
        }
        if !a.signed_headers.iter().any(|h| h == "host") {
            return Err(ApiError::bad(
                "AuthorizationHeaderMalformed",
                "the Host header must be signed",
            ));
        }
        let payload_hash = header_str(&parts.headers, "x-amz-content-sha256").ok_or_else(|| {
            ApiError::bad(
                "InvalidRequest",
                "missing required header for this request: x-amz-content-sha256",
            )
        })?;
        let creq = sigv4::canonical_request(
            method,
            &uri,
            &sigv4::canonical_query(raw_query, false),
            &signed_header_values(parts, &a.signed_headers),
            payload_hash,
        );
        let scope = a.scope();
        let (expected, key) =
            sigv4::signature_of(&secret, &a.date, &a.region, &a.service, &datetime, &creq);
        if !sigv4::constant_time_eq(&expected, &a.signature) {
            tracing::debug!(canonical_request = %creq, "SigV4 mismatch");
            return Err(signature_mismatch(&a.access_key));
        }
        let payload = match payload_hash {
            sigv4::UNSIGNED_PAYLOAD => Payload::Unsigned,
            sigv4::STREAMING_PAYLOAD | sigv4::STREAMING_PAYLOAD_TRAILER => {
                Payload::Chunked(Some(ChunkSigner {
                    key,
                    datetime,
                    scope,
                    previous: a.signature.clone(),
                }))
            }
            sigv4::STREAMING_UNSIGNED_TRAILER => Payload::Chunked(None),
            h if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Payload::Sha256(h.to_ascii_lowercase())
            }
            other => {
                return Err(ApiError::bad(
                    "InvalidArgument",
                    format!(
                        "x-amz-content-sha256 {other:?} is neither a SHA-256 nor a known payload mode"
                    ),
                ));
            }
        };
        return Ok(Auth { identity, payload });
    }

    let query = sigv4::parse_query(raw_query);
    let q = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(alg) = q("X-Amz-Algorithm") else {
        return Err(ApiError::denied(
            "AccessDenied",
            "anonymous access is not allowed: sign requests with AWS Signature Version 4",
        ));
    };
    let malformed = |m: &str| ApiError::bad("AuthorizationQueryParametersError", m.to_string());
    if alg != sigv4::ALGORITHM {
        return Err(malformed("X-Amz-Algorithm must be AWS4-HMAC-SHA256"));
    }
    let credential = q("X-Amz-Credential").ok_or_else(|| malformed("X-Amz-Credential missing"))?;
    let datetime = q("X-Amz-Date").ok_or_else(|| malformed("X-Amz-Date missing"))?;
    let expires = q("X-Amz-Expires").ok_or_else(|| malformed("X-Amz-Expires missing"))?;
    let signed =
        q("X-Amz-SignedHeaders").ok_or_else(|| malformed("X-Amz-SignedHeaders missing"))?;
    let signature = q("X-Amz-Signature").ok_or_else(|| malformed("X-Amz-Signature missing"))?;
    let (access_key, date, region, service) =
        sigv4::parse_credential(credential).map_err(|m| malformed(&m))?;
    let (secret, identity) = store.lookup_key(&access_key).ok_or_else(|| {
        ApiError::denied(
            "InvalidAccessKeyId",
            format!("the access key {access_key:?} does not exist in our records"),
        )
    })?;
    let time = parse_amz_date(datetime)
        .ok_or_else(|| malformed("X-Amz-Date is not of the form YYYYMMDDTHHMMSSZ"))?;
    let expires: i64 = expires
        .parse()
        .ok()
        .filter(|e| (0..=604_800).contains(e))
        .ok_or_else(|| malformed("X-Amz-Expires must be a number of seconds up to 604800"))?;
    if (time - now).num_seconds() > MAX_SKEW_SECS {
        return Err(ApiError::denied(
            "RequestTimeTooSkewed",
            format!("the presigned URL's date {time} is in the future (server time {now})"),
        ));
    }
    if (now - time).num_seconds() > expires {
        return Err(ApiError::denied(
            "AccessDenied",
            format!("request has expired (signed at {time}, valid for {expires} s)"),
        ));
    }
    if !datetime.starts_with(&date) || service != "s3" {
        return Err(malformed(
            "the credential scope does not match X-Amz-Date or service s3",
        ));
    }
    let names: Vec<String> = signed.split(';').map(|s| s.to_ascii_lowercase()).collect();
    let payload_hash = q("X-Amz-Content-Sha256").unwrap_or(sigv4::UNSIGNED_PAYLOAD);
    let creq = sigv4::canonical_request(
        method,
        &uri,
        &sigv4::canonical_query(raw_query, true),
        &signed_header_values(parts, &names),
        payload_hash,
    );
    let (expected, _) = sigv4::signature_of(&secret, &date, &region, &service, datetime, &creq);
    if !sigv4::constant_time_eq(&expected, signature) {
        tracing::debug!(canonical_request = %creq, "SigV4 (presigned) mismatch");
        return Err(signature_mismatch(&access_key));
    }
    let payload = if payload_hash.len() == 64 {
        Payload::Sha256(payload_hash.to_ascii_lowercase())
    } else {
        Payload::Unsigned
    };
    Ok(Auth { identity, payload })
}

/// Reads the request body as it is decoded and checked.
pub(crate) struct BodyReader {
    stream: BodyDataStream,
    expected_sha: Option<String>,
    sha: Sha256,
    decoder: Option<ChunkDecoder>,
    decoded_length: Option<u64>,
    total: u64,
    done: bool,
}

impl BodyReader {
    pub(crate) fn new(body: Body, payload: Payload, headers: &HeaderMap) -> Self {
        let (expected_sha, decoder) = match payload {
            Payload::Unsigned => (None, None),
            Payload::Sha256(h) => (Some(h), None),
            Payload::Chunked(signer) => (None, Some(ChunkDecoder::new(signer))),
        };
        BodyReader {
            stream: body.into_data_stream(),
            expected_sha,
            sha: Sha256::new(),
            decoder,
            decoded_length: header_str(headers, "x-amz-decoded-content-length")
                .and_then(|v| v.parse().ok()),
            total: 0,
            done: false,
        }
    }

    /// The next piece of decoded body, or None at its (checked) end.
    pub(crate) async fn next(&mut self) -> ApiResult<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.stream.next().await {
                Some(Ok(bytes)) => {
                    let out = match self.decoder.as_mut() {
                        Some(dec) => {
                            let mut out = Vec::with_capacity(bytes.len());
                            dec.push(&bytes, &mut out).map_err(|m| {
                                if m.starts_with("signature") {
                                    ApiError::denied("SignatureDoesNotMatch", m)
                                } else {
                                    ApiError::bad("IncompleteBody", m)
                                }
                            })?;
                            Bytes::from(out)
                        }
                        None => bytes,
                    };
                    if out.is_empty() {
                        continue;
                    }
                    if self.expected_sha.is_some() {
                        self.sha.update(&out);
                    }
                    self.total += out.len() as u64;
                    return Ok(Some(out));
                }
                Some(Err(e)) => {
                    return Err(ApiError::bad(
                        "IncompleteBody",
                        format!("reading the request body failed: {e}"),
                    ));
                }
                None => {
                    self.done = true;
                    if let Some(dec) = &self.decoder {
                        dec.finish()
                            .map_err(|m| ApiError::bad("IncompleteBody", m))?;
                        if let Some(n) = self.decoded_length
                            && n != self.total
                        {
                            return Err(ApiError::bad(
                                "IncompleteBody",
                                format!(
                                    "x-amz-decoded-content-length is {n} but the body decoded to {} bytes",
                                    self.total
                                ),
                            ));
                        }
                    }
                    if let Some(expected) = &self.expected_sha {
                        let got = hex::encode(std::mem::take(&mut self.sha).finalize());
                        if &got != expected {
                            return Err(ApiError::bad(
                                "XAmzContentSHA256Mismatch",
                                format!(
                                    "the body's SHA-256 {got} is not the x-amz-content-sha256 {expected}"
                                ),
                            ));
                        }
                    }
                    return Ok(None);
                }
            }
        }
    }

    pub(crate) async fn read_all(&mut self, limit: usize) -> ApiResult<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = self.next().await? {
            if out.len() + b.len() > limit {
                return Err(ApiError::bad(
                    "MaxMessageLengthExceeded",
                    format!("the request body is larger than {limit} bytes"),
                ));
            }
            out.extend_from_slice(&b);
        }
        Ok(out)
    }
}

/// Deletes a temporary file when dropped, unless it was kept.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Streams the body into a new temporary file; returns it with the content's MD5.
async fn receive_to_temp(
    store: &S3Store,
    body: &mut BodyReader,
    headers: &HeaderMap,
) -> ApiResult<(TempGuard, PathBuf, [u8; 16], u64)> {
    let (path, file) = store.temp_file()?;
    let guard = TempGuard(Some(path.clone()));
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut md5 = Md5::new();
    let mut size = 0u64;
    let write_err = |e: std::io::Error| {
        ApiError::from(S3Error::Io {
            action: "write".into(),
            path: path.clone(),
            source: e,
        })
    };
    while let Some(chunk) = body.next().await? {
        md5.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(write_err)?;
    }
    file.flush().await.map_err(write_err)?;
    drop(file);
    let digest: [u8; 16] = md5.finalize().into();
    if let Some(expected) = header_str(headers, "content-md5")
        && expected.trim() != base64(&digest)
    {
        return Err(ApiError::bad(
            "BadDigest",
            format!(
                "the Content-MD5 {expected} does not match the body's MD5 {}",
                base64(&digest)
            ),
        ));
    }
    Ok((guard, path, digest, size))
}

/// Headers stored with an object and returned on GET/HEAD.
fn stored_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let n = name.as_str();
        let keep = n.starts_with("x-amz-meta-")
            || matches!(
                n,
                "content-disposition" | "content-language" | "cache-control" | "expires"
            );
        if let Ok(v) = value.to_str() {
            if keep {
                out.push((n.to_string(), v.to_string()));
            } else if n == "content-encoding" {
                let rest: Vec<&str> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty() && *e != "aws-chunked")
                    .collect();
                if !rest.is_empty() {
                    out.push((n.to_string(), rest.join(",")));
                }
            }
        }
    }
    out
}

fn meta_from_headers(headers: &HeaderMap, etag: String) -> ObjectMeta {
    ObjectMeta {
        etag,
        content_type: header_str(headers, "content-type").map(str::to_string),
        headers: stored_headers(headers),
    }
}

pub(crate) fn xml_response(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    resp
}

fn empty(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

pub(crate) fn set_header(resp: &mut Response, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        axum::http::HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        resp.headers_mut().insert(n, v);
    }
}

fn iso8601(t: SystemTime) -> String {
    DateTime::<Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

pub(crate) fn authorize(identity: &Identity, bucket: &str) -> ApiResult<()> {
    if identity.may_access(bucket) {
        return Ok(());
    }
    let who = match identity {
        Identity::Admin => "admin".to_string(),
        Identity::Restricted { access_key, .. } => access_key.clone(),
    };
    Err(ApiError::denied(
        "AccessDenied",
        format!("access denied: access key {who} may not use bucket {bucket:?}"),
    ))
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }
}

/// Bucket subresources this store does not implement.
const UNSUPPORTED_BUCKET: &[&str] = &[
    "policy",
    "cors",
    "lifecycle",
    "tagging",
    "website",
    "logging",
    "notification",
    "replication",
    "encryption",
    "object-lock",
    "ownershipControls",
    "publicAccessBlock",
    "requestPayment",
    "accelerate",
    "analytics",
    "metrics",
    "inventory",
    "intelligent-tiering",
    "acl",
    "versions",
];

async fn dispatch(store: &S3Store, req: Request) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let auth = authenticate(store, &parts, Utc::now())?;
    let (bucket, key) = parse_request_path(parts.uri.path())?;
    let query = Query(sigv4::parse_query(parts.uri.query().unwrap_or("")));
    let mut body = BodyReader::new(body, auth.payload, &parts.headers);
    let headers = &parts.headers;
    let method = &parts.method;
    let identity = &auth.identity;
    let Some(bucket) = bucket else {
        return if method == Method::GET {
            list_buckets(store, identity)
        } else {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not allowed on the service"),
            ))
        };
    };
    authorize(identity, &bucket)?;
    let Some(key) = key else {
        return match *method {
            Method::PUT => {
                if let Some(sub) = UNSUPPORTED_BUCKET.iter().find(|s| query.has(s)) {
                    return Err(ApiError::not_implemented(&format!("PUT ?{sub}")));
                }
                body.read_all(MAX_XML_BODY).await?;
                store.create_bucket(&bucket)?;
                let mut resp = empty(StatusCode::OK);
                set_header(&mut resp, "location", &format!("/{bucket}"));
                Ok(resp)
            }
            Method::DELETE => {
                store.delete_bucket(&bucket)?;
                Ok(empty(StatusCode::NO_CONTENT))
            }
            Method::HEAD => {
                store.require_bucket(&bucket)?;
                let mut resp = empty(StatusCode::OK);
                set_header(&mut resp, "x-amz-bucket-region", store.region());
                Ok(resp)
            }
            Method::GET => {
                store.require_bucket(&bucket)?;
                if query.has("location") {
                    let mut w = XmlWriter::new("LocationConstraint");
                    // us-east-1 is answered as an empty constraint, like AWS does.
                    if store.region() != "us-east-1" {
                        w.elem_text(store.region());
                    }
                    Ok(xml_response(StatusCode::OK, w.finish("LocationConstraint")))
                } else if query.has("versioning") {
                    let w = XmlWriter::new("VersioningConfiguration");
                    Ok(xml_response(
                        StatusCode::OK,
                        w.finish("VersioningConfiguration"),
                    ))
                } else if query.has("uploads") {
                    list_uploads(store, &bucket)
                } else if query.has("acl") {
                    Ok(acl_response())
                } else if let Some(sub) = UNSUPPORTED_BUCKET.iter().find(|s| query.has(s)) {
                    Err(ApiError::not_implemented(&format!("GET ?{sub}")))
                } else {
                    list_objects(store, &bucket, &query)
                }
            }
            Method::POST if query.has("delete") => delete_objects(store, &bucket, &mut body).await,
            _ => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not allowed on a bucket"),
            )),
        };
    };
    match *method {
        Method::PUT => {
            if query.has("uploadId") {
                if headers.contains_key("x-amz-copy-source") {
                    return Err(ApiError::not_implemented("UploadPartCopy"));
                }
                upload_part(store, &bucket, &key, &query, headers, &mut body).await
            } else if query.has("acl") || query.has("tagging") {
                Err(ApiError::not_implemented("object ACLs and tagging"))
            } else if let Some(src) = header_str(headers, "x-amz-copy-source") {
                copy_object(store, identity, &bucket, &key, src, headers, &mut body).await
            } else {
                put_object(store, &bucket, &key, headers, &mut body).await
            }
        }
        Method::GET | Method::HEAD => {
            if query.has("uploadId") && *method == Method::GET {
                list_parts(store, &bucket, &key, &query)
            } else if query.has("acl") && *method == Method::GET {
                store.object_meta(&bucket, &key)?;
                Ok(acl_response())
            } else if query.has("tagging") && *method == Method::GET {
                store.object_meta(&bucket, &key)?;
                let mut w = XmlWriter::new("Tagging");
                w.open("TagSet").close("TagSet");
                Ok(xml_response(StatusCode::OK, w.finish("Tagging")))
            } else {
                get_object(
                    store,
                    &bucket,
                    &key,
                    &query,
                    headers,
                    *method == Method::HEAD,
                )
                .await
            }
        }
        Method::DELETE => {
            if let Some(id) = query.get("uploadId") {
                load_upload(store, &bucket, &key, id)?;
                let dir = store.uploads_dir().join(id);
                fs::remove_dir_all(&dir).map_err(io_err("delete upload", &dir))?;
            } else {
                store.delete_object(&bucket, &key)?;
            }
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Method::POST => {
            if query.has("uploads") {
                create_upload(store, &bucket, &key, headers)
            } else if let Some(id) = query.get("uploadId") {
                complete_upload(store, &bucket, &key, id, &mut body).await
            } else {
                Err(ApiError::not_implemented("this POST on an object"))
            }
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not allowed on an object"),
        )),
    }
}

pub(crate) fn owner(w: &mut XmlWriter, name: &str) {
    w.open(name)
        .elem("ID", OWNER_ID)
        .elem("DisplayName", OWNER_ID)
        .close(name);
}

fn acl_response() -> Response {
    let mut w = XmlWriter::new("AccessControlPolicy");
    owner(&mut w, "Owner");
    w.open("AccessControlList").open("Grant");
    w.raw(
        "<Grantee xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xsi:type=\"CanonicalUser\">",
    );
    w.elem("ID", OWNER_ID).elem("DisplayName", OWNER_ID);
    w.raw("</Grantee>");
    w.elem("Permission", "FULL_CONTROL")
        .close("Grant")
        .close("AccessControlList");
    xml_response(StatusCode::OK, w.finish("AccessControlPolicy"))
}

fn list_buckets(store: &S3Store, identity: &Identity) -> ApiResult<Response> {
    let mut w = XmlWriter::new("ListAllMyBucketsResult");
    owner(&mut w, "Owner");
    w.open("Buckets");
    for (name, created) in store.buckets()? {
        if identity.may_access(&name) {
            w.open("Bucket")
                .elem("Name", &name)
                .elem("CreationDate", &iso8601(created))
                .close("Bucket");
        }
    }
    w.close("Buckets");
    Ok(xml_response(
        StatusCode::OK,
        w.finish("ListAllMyBucketsResult"),
    ))
}

/// One page of a listing.
struct Listing {
    contents: Vec<ObjectInfo>,
    prefixes: Vec<String>,
    truncated: bool,
    next_marker: Option<String>,
}

fn paginate(
    all: Vec<ObjectInfo>,
    prefix: &str,
    delimiter: Option<&str>,
    marker: Option<&str>,
    max: usize,
) -> Listing {
    let mut l = Listing {
        contents: Vec::new(),
        prefixes: Vec::new(),
        truncated: false,
        next_marker: None,
    };
    let mut count = 0;
    let mut last: Option<String> = None;
    for o in all {
        if !o.key.starts_with(prefix) || marker.is_some_and(|m| o.key.as_str() <= m) {
            continue;
        }
        let cp = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
            o.key[prefix.len()..]
                .find(d)
                .map(|i| o.key[..prefix.len() + i + d.len()].to_string())
        });
        if let Some(cp) = cp {
            if l.prefixes.last() == Some(&cp) || marker.is_some_and(|m| cp.as_str() <= m) {
                continue;
            }
            if count == max {
                l.truncated = true;
                break;
            }
            last = Some(cp.clone());
            l.prefixes.push(cp);
        } else {
            if count == max {
                l.truncated = true;
                break;
            }
            last = Some(o.key.clone());
            l.contents.push(o);
        }
        count += 1;
    }
    if l.truncated {
        l.next_marker = last;
    }
    l
}

fn list_objects(store: &S3Store, bucket: &str, query: &Query) -> ApiResult<Response> {
    let v2 = query.get("list-type") == Some("2");
    let prefix = query.get("prefix").unwrap_or("");
    let delimiter = query.get("delimiter").filter(|d| !d.is_empty());
    let max: usize = match query.get("max-keys") {
        Some(m) => m
            .parse::<usize>()
            .map_err(|_| {
                ApiError::bad("InvalidArgument", format!("max-keys {m:?} is not a number"))
            })?
            .min(1000),
        None => 1000,
    };
    let url = query.get("encoding-type") == Some("url");
    let enc = |s: &str| {
        if url {
            sigv4::uri_encode(s.as_bytes(), true)
        } else {
            s.to_string()
        }
    };
    let token = match query.get("continuation-token") {
        Some(t) => Some(
            hex::decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::bad("InvalidArgument", "the continuation token is not valid")
                })?,
        ),
        None => None,
    };
    let marker = if v2 {
        token
            .clone()
            .or(query.get("start-after").map(str::to_string))
    } else {
        query.get("marker").map(str::to_string)
    };
    let listing = paginate(
        store.object_infos(bucket)?,
        prefix,
        delimiter,
        marker.as_deref(),
        max,
    );
    let mut w = XmlWriter::new("ListBucketResult");
    w.elem("Name", bucket).elem("Prefix", &enc(prefix));
    if v2 {
        if let Some(sa) = query.get("start-after") {
            w.elem("StartAfter", &enc(sa));
        }
        if let Some(t) = query.get("continuation-token") {
            w.elem("ContinuationToken", t);
        }
        w.elem(
            "KeyCount",
            &(listing.contents.len() + listing.prefixes.len()).to_string(),
        );
    } else {
        w.elem("Marker", &enc(query.get("marker").unwrap_or("")));
    }
    w.elem("MaxKeys", &max.to_string());
    if let Some(d) = delimiter {
        w.elem("Delimiter", &enc(d));
    }
    if url {
        w.elem("EncodingType", "url");
    }
    w.elem(
        "IsTruncated",
        if listing.truncated { "true" } else { "false" },
    );
    if let Some(next) = &listing.next_marker {
        if v2 {
            w.elem("NextContinuationToken", &hex::encode(next));
        } else {
            w.elem("NextMarker", &enc(next));
        }
    }
    for o in &listing.contents {
        let etag = match store.object_meta(bucket, &o.key) {
            Ok((m, _)) => m.etag,
            // Deleted meanwhile: still listed, without an ETag.
            Err(_) => String::new(),
        };
        w.open("Contents")
            .elem("Key", &enc(&o.key))
            .elem("LastModified", &iso8601(o.modified))
            .elem("ETag", &format!("\"{etag}\""))
            .elem("Size", &o.size.to_string())
            .elem("StorageClass", "STANDARD");
        if !v2 || query.get("fetch-owner") == Some("true") {
            owner(&mut w, "Owner");
        }
        w.close("Contents");
    }
    for p in &listing.prefixes {
        w.open("CommonPrefixes")
            .elem("Prefix", &enc(p))
            .close("CommonPrefixes");
    }
    Ok(xml_response(StatusCode::OK, w.finish("ListBucketResult")))
}

async fn delete_objects(
    store: &S3Store,
    bucket: &str,
    body: &mut BodyReader,
) -> ApiResult<Response> {
    store.require_bucket(bucket)?;
    let raw = body.read_all(MAX_XML_BODY).await?;
    let req: xml::DeleteRequest = xml::parse(&raw).map_err(|m| ApiError::bad("MalformedXML", m))?;
    if req.objects.len() > 1000 {
        return Err(ApiError::bad(
            "MalformedXML",
            "DeleteObjects takes at most 1000 keys",
        ));
    }
    let mut w = XmlWriter::new("DeleteResult");
    for o in &req.objects {
        match store.delete_object(bucket, &o.key) {
            Ok(()) => {
                if !req.quiet {
                    w.open("Deleted").elem("Key", &o.key).close("Deleted");
                }
            }
            Err(e) => {
                let e = ApiError::from(e);
                w.open("Error")
                    .elem("Key", &o.key)
                    .elem("Code", e.code)
                    .elem("Message", &e.message)
                    .close("Error");
            }
        }
    }
    Ok(xml_response(StatusCode::OK, w.finish("DeleteResult")))
}

async fn put_object(
    store: &S3Store,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
    body: &mut BodyReader,
) -> ApiResult<Response> {
    store.require_bucket(bucket)?;
    let (mut guard, tmp, digest, _) = receive_to_temp(store, body, headers).await?;
    let etag = hex::encode(digest);
    store.commit_object(&tmp, bucket, key, &meta_from_headers(headers, etag.clone()))?;
    guard.keep();
    let mut resp = empty(StatusCode::OK);
    set_header(&mut resp, "etag", &format!("\"{etag}\""));
    Ok(resp)
}

async fn copy_object(
    store: &S3Store,
    identity: &Identity,
    bucket: &str,
    key: &str,
    source: &str,
    headers: &HeaderMap,
    body: &mut BodyReader,
) -> ApiResult<Response> {
    body.read_all(MAX_XML_BODY).await?;
    let source = source.split('?').next().unwrap_or("");
    let src_path = format!("/{}", source.trim_start_matches('/'));
    let (Some(src_bucket), Some(src_key)) = parse_request_path(&src_path)? else {
        return Err(ApiError::bad(
            "InvalidArgument",
            format!("x-amz-copy-source {source:?} must be <bucket>/<key>"),
        ));
    };
    authorize(identity, &src_bucket)?;
    store.require_bucket(bucket)?;
    let (src_meta, _) = store.object_meta(&src_bucket, &src_key)?;
    let from = store.object_path(&src_bucket, &src_key)?;
    let replace = header_str(headers, "x-amz-metadata-directive")
        .is_some_and(|d| d.eq_ignore_ascii_case("REPLACE"));
    let meta = if replace {
        meta_from_headers(headers, src_meta.etag.clone())
    } else {
        src_meta
    };
    let (tmp, file) = store.temp_file()?;
    drop(file);
    let mut guard = TempGuard(Some(tmp.clone()));
    let (s, b, k, t) = (store.clone(), bucket.to_string(), key.to_string(), tmp);
    let etag = meta.etag.clone();
    tokio::task::spawn_blocking(move || -> Result<(), S3Error> {
        fs::copy(&from, &t).map_err(io_err("copy", &from))?;
        s.commit_object(&t, &b, &k, &meta)
    })
    .await
    .map_err(internal_error)??;
    guard.keep();
    let mut w = XmlWriter::new("CopyObjectResult");
    w.elem("LastModified", &iso8601(SystemTime::now()))
        .elem("ETag", &format!("\"{etag}\""));
    Ok(xml_response(StatusCode::OK, w.finish("CopyObjectResult")))
}

/// Parses a `Range: bytes=...` header against an object size: Ok(None) when the header is
/// absent or not a single byte range (served whole), Err when not satisfiable.
fn parse_range(value: Option<&str>, size: u64) -> ApiResult<Option<(u64, u64)>> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            format!("the range bytes={spec} is not satisfiable for an object of {size} bytes"),
        )
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(unsatisfiable());
        }
        (size - n.min(size), size - 1)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            u64::MAX
        } else {
            match b.parse::<u64>() {
                Ok(e) if e >= start => e,
                _ => return Ok(None),
            }
        };
        if start >= size {
            return Err(unsatisfiable());
        }
        (start, end.min(size - 1))
    };
    Ok(Some(range))
}

async fn get_object(
    store: &S3Store,
    bucket: &str,
    key: &str,
    query: &Query,
    headers: &HeaderMap,
    head: bool,
) -> ApiResult<Response> {
    let path = store.object_path(bucket, key)?;
    let (meta, _) = store.object_meta(bucket, key)?;
    // Open then stat the handle: the length served is the one of the file read.
    let file = fs::File::open(&path).map_err(|_| S3Error::NoSuchKey {
        bucket: bucket.to_string(),
        key: key.to_string(),
    })?;
    let md = file.metadata().map_err(io_err("stat", &path))?;
    let size = md.len();
    let modified = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let etag = format!("\"{}\"", meta.etag);
    let not_modified_since = |h: &str| {
        header_str(headers, h)
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .map(|t| {
                let secs = |t: SystemTime| {
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                };
                secs(modified) <= secs(t)
            })
    };
    if let Some(m) = header_str(headers, "if-match")
        && m.trim() != "*"
        && !m.split(',').any(|e| e.trim() == etag)
    {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            format!("If-Match {m} does not match the ETag {etag}"),
        ));
    }
    if not_modified_since("if-unmodified-since") == Some(false) {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "the object was modified since If-Unmodified-Since",
        ));
    }
    let none_match = header_str(headers, "if-none-match");
    if none_match.is_some_and(|m| m.split(',').any(|e| e.trim() == etag || e.trim() == "*"))
        || (none_match.is_none() && not_modified_since("if-modified-since") == Some(true))
    {
        let mut resp = empty(StatusCode::NOT_MODIFIED);
        set_header(&mut resp, "etag", &etag);
        return Ok(resp);
    }
    let range = parse_range(header_str(headers, "range"), size)?;
    let (start, len) = match range {
        Some((a, b)) => (a, b - a + 1),
        None => (0, size),
    };
    let body = if head || len == 0 {
        Body::empty()
    } else {
        let mut f = tokio::fs::File::from_std(file);
        f.seek(SeekFrom::Start(start))
            .await
            .map_err(io_err("seek", &path))?;
        use tokio::io::AsyncReadExt;
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            f.take(len),
            256 << 10,
        ))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if let Some((a, b)) = range {
        set_header(&mut resp, "content-range", &format!("bytes {a}-{b}/{size}"));
    }
    set_header(&mut resp, "content-length", &len.to_string());
    set_header(
        &mut resp,
        "content-type",
        meta.content_type
            .as_deref()
            .unwrap_or("binary/octet-stream"),
    );
    set_header(&mut resp, "etag", &etag);
    set_header(
        &mut resp,
        "last-modified",
        &httpdate::fmt_http_date(modified),
    );
    set_header(&mut resp, "accept-ranges", "bytes");
    for (n, v) in &meta.headers {
        set_header(&mut resp, n, v);
    }
    for (param, name) in [
        ("response-content-type", "content-type"),
        ("response-content-disposition", "content-disposition"),
        ("response-content-encoding", "content-encoding"),
        ("response-content-language", "content-language"),
        ("response-cache-control", "cache-control"),
        ("response-expires", "expires"),
    ] {
        if let Some(v) = query.get(param) {
            set_header(&mut resp, name, v);
        }
    }
    Ok(resp)
}

/// A finished part of a multipart upload, `<upload dir>/<n>.json` beside `<n>`.
#[derive(Debug, Serialize, Deserialize)]
struct PartInfo {
    etag: String,
    size: u64,
}

fn upload_dir(store: &S3Store, id: &str) -> ApiResult<PathBuf> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(S3Error::NoSuchUpload {
            upload_id: id.to_string(),
        }
        .into());
    }
    Ok(store.uploads_dir().join(id))
}

fn load_upload(store: &S3Store, bucket: &str, key: &str, id: &str) -> ApiResult<UploadInfo> {
    let dir = upload_dir(store, id)?;
    match read_upload_info(&dir) {
        Ok(info) if info.bucket == bucket && info.key == key => Ok(info),
        _ => Err(S3Error::NoSuchUpload {
            upload_id: id.to_string(),
        }
        .into()),
    }
}

fn create_upload(
    store: &S3Store,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    store.require_bucket(bucket)?;
    store.object_path(bucket, key)?;
    let id = random_hex(16);
    let dir = store.uploads_dir().join(&id);
    let info = UploadInfo {
        bucket: bucket.to_string(),
        key: key.to_string(),
        meta: meta_from_headers(headers, String::new()),
        initiated: Utc::now(),
    };
    fs::create_dir(&dir).map_err(io_err("create upload directory", &dir))?;
    let info_path = dir.join("info.json");
    let json = serde_json::to_vec(&info).map_err(|e| S3Error::Io {
        action: "encode".into(),
        path: info_path.clone(),
        source: std::io::Error::other(e),
    })?;
    fs::write(&info_path, json).map_err(io_err("write", &info_path))?;
    let mut w = XmlWriter::new("InitiateMultipartUploadResult");
    w.elem("Bucket", bucket)
        .elem("Key", key)
        .elem("UploadId", &id);
    Ok(xml_response(
        StatusCode::OK,
        w.finish("InitiateMultipartUploadResult"),
    ))
}

fn part_number(query: &Query) -> ApiResult<u32> {
    query
        .get("partNumber")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| {
            ApiError::bad(
                "InvalidArgument",
                "partNumber must be an integer between 1 and 10000",
            )
        })
}

async fn upload_part(
    store: &S3Store,
    bucket: &str,
    key: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &mut BodyReader,
) -> ApiResult<Response> {
    let id = query.get("uploadId").unwrap_or("");
    load_upload(store, bucket, key, id)?;
    let n = part_number(query)?;
    let (mut guard, tmp, digest, size) = receive_to_temp(store, body, headers).await?;
    let dir = upload_dir(store, id)?;
    let etag = hex::encode(digest);
    let info = serde_json::to_vec(&PartInfo {
        etag: etag.clone(),
        size,
    })
    .map_err(internal_error)?;
    let part = dir.join(n.to_string());
    let part_info = dir.join(format!("{n}.json"));
    let (info_tmp, mut f) = store.temp_file()?;
    let mut info_guard = TempGuard(Some(info_tmp.clone()));
    f.write_all(&info).map_err(io_err("write", &info_tmp))?;
    drop(f);
    // Aborted meanwhile: the directory is gone and the renames fail.
    fs::rename(&tmp, &part).map_err(|_| S3Error::NoSuchUpload {
        upload_id: id.to_string(),
    })?;
    guard.keep();
    fs::rename(&info_tmp, &part_info).map_err(io_err("rename into place", &part_info))?;
    info_guard.keep();
    let mut resp = empty(StatusCode::OK);
    set_header(&mut resp, "etag", &format!("\"{etag}\""));
    Ok(resp)
}

fn read_part(dir: &Path, n: u32) -> Option<PartInfo> {
    let bytes = fs::read(dir.join(format!("{n}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn complete_upload(
    store: &S3Store,
    bucket: &str,
    key: &str,
    id: &str,
    body: &mut BodyReader,
) -> ApiResult<Response> {
    let info = load_upload(store, bucket, key, id)?;
    let raw = body.read_all(MAX_XML_BODY).await?;
    let req: xml::CompleteRequest =
        xml::parse(&raw).map_err(|m| ApiError::bad("MalformedXML", m))?;
    if req.parts.is_empty() {
        return Err(ApiError::bad(
            "MalformedXML",
            "CompleteMultipartUpload lists no part",
        ));
    }
    let dir = upload_dir(store, id)?;
    let mut previous = 0;
    for p in &req.parts {
        if p.part_number <= previous {
            return Err(ApiError::bad(
                "InvalidPartOrder",
                "the parts must be listed in ascending order of part number",
            ));
        }
        previous = p.part_number;
        let ok = read_part(&dir, p.part_number)
            .is_some_and(|stored| stored.etag == p.etag.trim().trim_matches('"'));
        if !ok {
            return Err(ApiError::bad(
                "InvalidPart",
                format!(
                    "part {} of upload {id} was not uploaded or its ETag is not {}",
                    p.part_number, p.etag
                ),
            ));
        }
    }
    let numbers: Vec<u32> = req.parts.iter().map(|p| p.part_number).collect();
    let (tmp, file) = store.temp_file()?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let (s, b, k) = (store.clone(), bucket.to_string(), key.to_string());
    let etag = tokio::task::spawn_blocking(move || -> Result<String, S3Error> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut md5s = Vec::with_capacity(numbers.len() * 16);
        let mut buf = vec![0u8; 1 << 20];
        for n in &numbers {
            let part = dir.join(n.to_string());
            let mut f = fs::File::open(&part).map_err(io_err("open part", &part))?;
            let mut h = Md5::new();
            loop {
                let r = f.read(&mut buf).map_err(io_err("read part", &part))?;
                if r == 0 {
                    break;
                }
                h.update(&buf[..r]);
                out.write_all(&buf[..r]).map_err(io_err("write", &tmp))?;
            }
            md5s.extend_from_slice(&h.finalize());
        }
        out.flush().map_err(io_err("write", &tmp))?;
        drop(out);
        let etag = format!("{}-{}", hex::encode(Md5::digest(&md5s)), numbers.len());
        let meta = ObjectMeta {
            etag: etag.clone(),
            ..info.meta
        };
        s.commit_object(&tmp, &b, &k, &meta)?;
        let _ = fs::remove_dir_all(&dir);
        Ok(etag)
    })
    .await
    .map_err(internal_error)??;
    guard.keep();
    let mut w = XmlWriter::new("CompleteMultipartUploadResult");
    w.elem("Location", &format!("/{bucket}/{key}"))
        .elem("Bucket", bucket)
        .elem("Key", key)
        .elem("ETag", &format!("\"{etag}\""));
    Ok(xml_response(
        StatusCode::OK,
        w.finish("CompleteMultipartUploadResult"),
    ))
}

fn list_parts(store: &S3Store, bucket: &str, key: &str, query: &Query) -> ApiResult<Response> {
    let id = query.get("uploadId").unwrap_or("");
    load_upload(store, bucket, key, id)?;
    let dir = upload_dir(store, id)?;
    let mut parts: Vec<(u32, PartInfo, SystemTime)> = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(n) = name.parse::<u32>()
                && let Some(p) = read_part(&dir, n)
            {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                parts.push((n, p, t));
            }
        }
    }
    parts.sort_by_key(|p| p.0);
    let marker: u32 = query
        .get("part-number-marker")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let max: usize = query
        .get("max-parts")
        .and_then(|m| m.parse().ok())
        .unwrap_or(1000)
        .min(1000);
    let remaining: Vec<_> = parts.into_iter().filter(|p| p.0 > marker).collect();
    let truncated = remaining.len() > max;
    let page = &remaining[..remaining.len().min(max)];
    let mut w = XmlWriter::new("ListPartsResult");
    w.elem("Bucket", bucket)
        .elem("Key", key)
        .elem("UploadId", id)
        .elem("PartNumberMarker", &marker.to_string());
    if let Some(last) = page.last() {
        w.elem("NextPartNumberMarker", &last.0.to_string());
    }
    w.elem("MaxParts", &max.to_string())
        .elem("IsTruncated", if truncated { "true" } else { "false" })
        .elem("StorageClass", "STANDARD");
    owner(&mut w, "Initiator");
    owner(&mut w, "Owner");
    for (n, p, t) in page {
        w.open("Part")
            .elem("PartNumber", &n.to_string())
            .elem("LastModified", &iso8601(*t))
            .elem("ETag", &format!("\"{}\"", p.etag))
            .elem("Size", &p.size.to_string())
            .close("Part");
    }
    Ok(xml_response(StatusCode::OK, w.finish("ListPartsResult")))
}

fn list_uploads(store: &S3Store, bucket: &str) -> ApiResult<Response> {
    let mut uploads: Vec<(String, UploadInfo)> = Vec::new();
    if let Ok(entries) = fs::read_dir(store.uploads_dir()) {
        for e in entries.flatten() {
            if let Ok(info) = read_upload_info(&e.path())
                && info.bucket == bucket
            {
                uploads.push((e.file_name().to_string_lossy().into_owned(), info));
            }
        }
    }
    uploads.sort_by(|a, b| (&a.1.key, &a.0).cmp(&(&b.1.key, &b.0)));
    let mut w = XmlWriter::new("ListMultipartUploadsResult");
    w.elem("Bucket", bucket)
        .elem("KeyMarker", "")
        .elem("UploadIdMarker", "")
        .elem("MaxUploads", "1000")
        .elem("IsTruncated", "false");
    for (id, info) in &uploads {
        w.open("Upload").elem("Key", &info.key).elem("UploadId", id);
        owner(&mut w, "Initiator");
        owner(&mut w, "Owner");
        w.elem("StorageClass", "STANDARD")
            .elem(
                "Initiated",
                &info.initiated.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            )
            .close("Upload");
    }
    Ok(xml_response(
        StatusCode::OK,
        w.finish("ListMultipartUploadsResult"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(key: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size: 1,
            modified: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn pagination_with_delimiter() {
        let all: Vec<ObjectInfo> = ["a/1", "a/2", "b", "c/x/1", "c/y", "d"]
            .iter()
            .map(|k| info(k))
            .collect();
        let l = paginate(all.clone(), "", Some("/"), None, 2);
        assert_eq!(l.prefixes, ["a/"]);
        assert_eq!(l.contents.len(), 1);
        assert!(l.truncated);
        assert_eq!(l.next_marker.as_deref(), Some("b"));
        let l = paginate(all.clone(), "", Some("/"), Some("b"), 2);
        assert_eq!(l.prefixes, ["c/"]);
        assert_eq!(l.contents[0].key, "d");
        assert!(!l.truncated);
        let l = paginate(all.clone(), "c/", Some("/"), None, 1000);
        assert_eq!(l.prefixes, ["c/x/"]);
        assert_eq!(l.contents[0].key, "c/y");
        // Resuming after a common prefix skips all of its keys.
        let l = paginate(all, "", Some("/"), Some("a/"), 1);
        assert_eq!(l.contents[0].key, "b");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100).ok(), Some(Some((0, 9))));
        assert_eq!(
            parse_range(Some("bytes=90-"), 100).ok(),
            Some(Some((90, 99)))
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), 100).ok(),
            Some(Some((90, 99)))
        );
        assert_eq!(
            parse_range(Some("bytes=50-500"), 100).ok(),
            Some(Some((50, 99)))
        );
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100).ok(), Some(None));
        assert_eq!(parse_range(None, 100).ok(), Some(None));
        assert!(parse_range(Some("bytes=100-"), 100).is_err());
        assert!(parse_range(Some("bytes=-5"), 0).is_err());
    }

    #[test]
    fn base64_of_md5() {
        // The Content-MD5 of an empty body.
        assert_eq!(base64(&Md5::digest(b"")), "1B2M2Y8AsgTpgAmY7PhCfg==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }
}
