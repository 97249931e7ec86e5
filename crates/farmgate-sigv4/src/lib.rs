//! AWS Signature Version 4 as S3 uses it: canonical requests, signing keys, signatures,
//! the signing of outgoing requests ([`Signer`]), the parsing of `Authorization` headers,
//! and the decoder of `aws-chunked` bodies (with per-chunk signature checks).
//!
//! The one implementation shared by the gateway's S3 server (`farmgate-s3`, which checks
//! incoming signatures and re-signs requests to an external store) and the agent's S3
//! client (`farmgate-agent`'s volumes).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The algorithm name in the `Authorization` header and in presigned URLs.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// SHA-256 of the empty string, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// `x-amz-content-sha256` value of a request whose payload is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// `x-amz-content-sha256` value of an `aws-chunked` body with signed chunks.
pub const STREAMING_PAYLOAD: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
/// `x-amz-content-sha256` value of an `aws-chunked` body with signed chunks and a trailer.
pub const STREAMING_PAYLOAD_TRAILER: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER";
/// `x-amz-content-sha256` value of an `aws-chunked` body with unsigned chunks and a trailer.
pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";

/// Percent-encodes `input` the way SigV4 wants: every byte but `A-Za-z0-9-_.~` becomes
/// `%XX` (upper case hex); `/` is kept when `keep_slash` (URI paths).
pub fn uri_encode(input: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(input.len() * 3);
    for &b in input {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes of `input` to bytes (a malformed escape stays as it is); when
/// `plus_is_space`, `+` decodes to a space (query strings).
pub fn percent_decode(input: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hi = (bytes[i + 1] as char).to_digit(16);
            let lo = (bytes[i + 2] as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b == b'+' { b' ' } else { b });
        i += 1;
    }
    out
}

/// The canonical URI of a raw (still percent-encoded) request path: decoded, then each byte
/// encoded again with [`uri_encode`] (S3 does not normalise or double-encode paths).
pub fn canonical_uri(raw_path: &str) -> String {
    let decoded = percent_decode(raw_path, false);
    if decoded.is_empty() {
        return "/".to_string();
    }
    uri_encode(&decoded, true)
}

/// Splits a raw query string into decoded `(name, value)` pairs, in order.
pub fn parse_query(raw_query: &str) -> Vec<(String, String)> {
    raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                String::from_utf8_lossy(&percent_decode(k, true)).into_owned(),
                String::from_utf8_lossy(&percent_decode(v, true)).into_owned(),
            )
        })
        .collect()
}

/// The canonical query string of a raw query: names and values decoded then encoded again,
/// sorted by name then value; `X-Amz-Signature` left out when `skip_signature` (presigned).
pub fn canonical_query(raw_query: &str, skip_signature: bool) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k, true), false),
                uri_encode(&percent_decode(v, true), false),
            )
        })
        .filter(|(k, _)| !(skip_signature && k == "X-Amz-Signature"))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A header value as it enters a canonical request: trimmed, inner runs of spaces made one.
pub fn canonical_header_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Builds the canonical request. `headers` are the signed headers as `(lower-case name,
/// canonical value)`, already in the order of `signed_headers` (sorted).
pub fn canonical_request(
    method: &str,
    canonical_uri: &str,
    canonical_query: &str,
    headers: &[(String, String)],
    payload_hash: &str,
) -> String {
    let mut out = format!("{method}\n{canonical_uri}\n{canonical_query}\n");
    for (name, value) in headers {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    out.push_str(&names.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length: this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The SigV4 signing key of `secret` for a date (`YYYYMMDD`), region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// The string to sign of a canonical request (`datetime` is `YYYYMMDDTHHMMSSZ`, `scope`
/// is `date/region/service/aws4_request`).
pub fn string_to_sign(datetime: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{datetime}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// Hex HMAC-SHA256 of `string_to_sign` with `key`: the signature.
pub fn sign(key: &[u8; 32], string_to_sign: &str) -> String {
    hex::encode(hmac(key, string_to_sign.as_bytes()))
}

/// The signature of a canonical request and the signing key that made it: the one
/// implementation behind both the checking of incoming requests and the signing of requests
/// sent to an external store. `date` is `YYYYMMDD`, `datetime` is `YYYYMMDDTHHMMSSZ`.
pub fn signature_of(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    datetime: &str,
    canonical_request: &str,
) -> (String, [u8; 32]) {
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let key = signing_key(secret, date, region, service);
    let sts = string_to_sign(datetime, &scope, canonical_request);
    (sign(&key, &sts), key)
}

/// What [`authorization_for`] signs: a request about to be sent with header authentication.
#[derive(Debug, Clone)]
pub struct OutgoingRequest<'a> {
    /// The HTTP method.
    pub method: &'a str,
    /// The canonical URI (as sent: already encoded with [`uri_encode`]).
    pub canonical_uri: &'a str,
    /// The canonical query string (as sent).
    pub canonical_query: &'a str,
    /// The headers to sign as `(lower-case name, value)`; `host`, `x-amz-date` and
    /// `x-amz-content-sha256` must be among them. Any order.
    pub headers: &'a [(String, String)],
    /// The `x-amz-content-sha256` value.
    pub payload_hash: &'a str,
    /// The request time, `YYYYMMDDTHHMMSSZ` (the `x-amz-date` value).
    pub datetime: &'a str,
}

/// The `Authorization` header value of an outgoing request signed with `access_key` and
/// `secret` for `region` and service `s3`.
pub fn authorization_for(
    req: &OutgoingRequest<'_>,
    access_key: &str,
    secret: &str,
    region: &str,
) -> String {
    authorization_for_service(req, access_key, secret, region, "s3")
}

/// The `Authorization` header value of an outgoing request signed with `access_key` and
/// `secret` for `region` and `service`.
pub fn authorization_for_service(
    req: &OutgoingRequest<'_>,
    access_key: &str,
    secret: &str,
    region: &str,
    service: &str,
) -> String {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), canonical_header_value(v)))
        .collect();
    headers.sort();
    // Several values of one header are joined with commas, as when verifying.
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (n, v) in headers {
        match merged.last_mut() {
            Some((last, value)) if *last == n => {
                value.push(',');
                value.push_str(&v);
            }
            _ => merged.push((n, v)),
        }
    }
    let creq = canonical_request(
        req.method,
        req.canonical_uri,
        req.canonical_query,
        &merged,
        req.payload_hash,
    );
    let date = req.datetime.get(..8).unwrap_or(req.datetime);
    let (signature, _) = signature_of(secret, date, region, service, req.datetime, &creq);
    let names: Vec<&str> = merged.iter().map(|(n, _)| n.as_str()).collect();
    format!(
        "{ALGORITHM} Credential={access_key}/{date}/{region}/{service}/aws4_request, \
         SignedHeaders={}, Signature={signature}",
        names.join(";")
    )
}

/// The SigV4 time format of `time` (UTC): `YYYYMMDDTHHMMSSZ`, the `x-amz-date` value.
pub fn amz_datetime(time: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time)
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

/// Credentials and scope that sign outgoing requests with header authentication.
#[derive(Clone)]
pub struct Signer {
    /// The access key id.
    pub access_key: String,
    /// The secret key.
    pub secret_key: String,
    /// The region of the scope (`us-east-1` when the store does not care).
    pub region: String,
    /// The service of the scope (`s3`).
    pub service: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish()
    }
}

/// A request to sign with [`Signer::sign`]: what goes on the wire, as sent.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    /// The HTTP method (`GET`, `PUT`, ...).
    pub method: &'a str,
    /// The `Host` header value as sent: host, and `:port` unless it is the scheme's default.
    pub host: &'a str,
    /// The path as sent (percent-encoded), e.g. `/bucket/some%20key`.
    pub path: &'a str,
    /// The query string as sent, without `?` (empty when none).
    pub query: &'a str,
    /// Other headers sent with the request that are to be signed, `(name, value)`.
    pub headers: &'a [(String, String)],
    /// The payload's hex SHA-256, or [`UNSIGNED_PAYLOAD`] / [`EMPTY_SHA256`].
    pub payload_hash: &'a str,
}

impl Signer {
    /// A signer for S3 (`service` is `s3`).
    pub fn s3(access_key: &str, secret_key: &str, region: &str) -> Self {
        Signer {
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            region: region.to_string(),
            service: "s3".to_string(),
        }
    }

    /// Signs `req` at `time`: the headers to add to it, `x-amz-date`,
    /// `x-amz-content-sha256` and `authorization` (the signature covers them, `host` and
    /// `req.headers`).
    pub fn sign(
        &self,
        req: &RequestToSign<'_>,
        time: std::time::SystemTime,
    ) -> Vec<(String, String)> {
        self.sign_at(req, &amz_datetime(time))
    }

    /// [`Signer::sign`] with the time given as `YYYYMMDDTHHMMSSZ`.
    pub fn sign_at(&self, req: &RequestToSign<'_>, datetime: &str) -> Vec<(String, String)> {
        let mut headers: Vec<(String, String)> = Vec::with_capacity(req.headers.len() + 3);
        headers.push(("host".to_string(), req.host.to_string()));
        headers.push(("x-amz-date".to_string(), datetime.to_string()));
        headers.push((
            "x-amz-content-sha256".to_string(),
            req.payload_hash.to_string(),
        ));
        headers.extend(
            req.headers
                .iter()
                .filter(|(n, _)| {
                    !matches!(
                        n.to_ascii_lowercase().as_str(),
                        "host" | "x-amz-date" | "x-amz-content-sha256" | "authorization"
                    )
                })
                .cloned(),
        );
        let auth = authorization_for_service(
            &OutgoingRequest {
                method: req.method,
                canonical_uri: &canonical_uri(req.path),
                canonical_query: &canonical_query(req.query, false),
                headers: &headers,
                payload_hash: req.payload_hash,
                datetime,
            },
            &self.access_key,
            &self.secret_key,
            &self.region,
            &self.service,
        );
        vec![
            ("x-amz-date".to_string(), datetime.to_string()),
            (
                "x-amz-content-sha256".to_string(),
                req.payload_hash.to_string(),
            ),
            ("authorization".to_string(), auth),
        ]
    }
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader {
    /// The access key of the credential.
    pub access_key: String,
    /// The scope date, `YYYYMMDD`.
    pub date: String,
    /// The scope region.
    pub region: String,
    /// The scope service (`s3`).
    pub service: String,
    /// The signed header names, lower case, in the order given.
    pub signed_headers: Vec<String>,
    /// The hex signature.
    pub signature: String,
}

impl AuthHeader {
    /// The credential scope `date/region/service/aws4_request`.
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// Parses a credential `AK/date/region/service/aws4_request` into its parts.
pub fn parse_credential(credential: &str) -> Result<(String, String, String, String), String> {
    let parts: Vec<&str> = credential.split('/').collect();
    match parts.as_slice() {
        [ak, date, region, service, "aws4_request"] if !ak.is_empty() => Ok((
            ak.to_string(),
            date.to_string(),
            region.to_string(),
            service.to_string(),
        )),
        _ => Err(format!(
            "malformed credential {credential:?}: expected <access key>/<date>/<region>/<service>/aws4_request"
        )),
    }
}

/// Parses an `Authorization` header value of SigV4.
pub fn parse_authorization(value: &str) -> Result<AuthHeader, String> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| format!("unsupported authorization scheme (only {ALGORITHM} is)"))?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k.trim() {
            "Credential" => credential = Some(v.trim()),
            "SignedHeaders" => signed = Some(v.trim()),
            "Signature" => signature = Some(v.trim()),
            _ => {}
        }
    }
    let credential = credential.ok_or("authorization header has no Credential")?;
    let signed = signed.ok_or("authorization header has no SignedHeaders")?;
    let signature = signature.ok_or("authorization header has no Signature")?;
    let (access_key, date, region, service) = parse_credential(credential)?;
    Ok(AuthHeader {
        access_key,
        date,
        region,
        service,
        signed_headers: signed.split(';').map(|s| s.to_ascii_lowercase()).collect(),
        signature: signature.to_string(),
    })
}

/// What signs the chunks of an `aws-chunked` body.
#[derive(Debug, Clone)]
pub struct ChunkSigner {
    /// The signing key of the request.
    pub key: [u8; 32],
    /// The request's `x-amz-date`.
    pub datetime: String,
    /// The credential scope.
    pub scope: String,
    /// The signature before the next chunk (the seed signature at first).
    pub previous: String,
}

impl ChunkSigner {
    /// The signature of the next chunk whose data hashes to `chunk_sha256` (hex).
    pub fn chunk_signature(&self, chunk_sha256: &str) -> String {
        let sts = format!(
            "{ALGORITHM}-PAYLOAD\n{}\n{}\n{}\n{EMPTY_SHA256}\n{chunk_sha256}",
            self.datetime, self.scope, self.previous
        );
        sign(&self.key, &sts)
    }
}

#[derive(Debug)]
enum ChunkState {
    Header,
    Data { remaining: u64 },
    DataEnd,
    Trailer,
    Done,
}

/// Streaming decoder of an `aws-chunked` body (`<hex size>[;chunk-signature=<sig>]\r\n
/// <data>\r\n ... 0[;...]\r\n[trailers]\r\n`). With a [`ChunkSigner`] each chunk's signature
/// is checked, chained from the seed signature.
#[derive(Debug)]
pub struct ChunkDecoder {
    state: ChunkState,
    line: Vec<u8>,
    signer: Option<ChunkSigner>,
    chunk_sig: String,
    hasher: Sha256,
    decoded: u64,
}

/// Longest chunk header or trailer line accepted.
const MAX_LINE: usize = 4096;

impl ChunkDecoder {
    /// A decoder; `signer` checks chunk signatures when given.
    pub fn new(signer: Option<ChunkSigner>) -> Self {
        ChunkDecoder {
            state: ChunkState::Header,
            line: Vec::new(),
            signer,
            chunk_sig: String::new(),
            hasher: Sha256::new(),
            decoded: 0,
        }
    }

    /// Total decoded payload bytes so far.
    pub fn decoded_len(&self) -> u64 {
        self.decoded
    }

    /// Feeds encoded bytes; decoded payload is appended to `out`. Errors say what is
    /// malformed, or which chunk's signature does not match (`Err` starting "signature").
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Header | ChunkState::Trailer | ChunkState::DataEnd => {
                    let Some(pos) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        if self.line.len() > MAX_LINE {
                            return Err("aws-chunked line longer than 4096 bytes".into());
                        }
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..pos]);
                    input = &input[pos + 1..];
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line)?;
                }
                ChunkState::Data { remaining } => {
                    let n = remaining.min(input.len() as u64) as usize;
                    let (data, rest) = input.split_at(n);
                    self.hasher.update(data);
                    out.extend_from_slice(data);
                    self.decoded += n as u64;
                    input = rest;
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data { remaining }
                    };
                }
                ChunkState::Done => {
                    if input.iter().all(|b| b.is_ascii_whitespace()) {
                        return Ok(());
                    }
                    return Err("data after the final aws-chunked chunk".into());
                }
            }
        }
        Ok(())
    }

    fn check_signature(&mut self) -> Result<(), String> {
        let Some(signer) = self.signer.as_mut() else {
            return Ok(());
        };
        let hash = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let expected = signer.chunk_signature(&hash);
        if !constant_time_eq(&expected, &self.chunk_sig) {
            return Err(format!(
                "signature of the aws-chunked chunk ending at decoded byte {} does not match",
                self.decoded
            ));
        }
        signer.previous = expected;
        Ok(())
    }

    fn on_line(&mut self, line: &[u8]) -> Result<(), String> {
        match self.state {
            ChunkState::DataEnd => {
                if !line.is_empty() {
                    return Err("aws-chunked chunk data not followed by CRLF".into());
                }
                self.check_signature()?;
                self.state = ChunkState::Header;
            }
            ChunkState::Header => {
                let text = std::str::from_utf8(line)
                    .map_err(|_| "aws-chunked chunk header is not UTF-8".to_string())?;
                let mut parts = text.split(';');
                let size_text = parts.next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_text, 16)
                    .map_err(|_| format!("aws-chunked chunk size {size_text:?} is not hex"))?;
                self.chunk_sig.clear();
                for ext in parts {
                    if let Some(sig) = ext.trim().strip_prefix("chunk-signature=") {
                        self.chunk_sig = sig.to_string();
                    }
                }
                if self.signer.is_some() && self.chunk_sig.is_empty() {
                    return Err("aws-chunked chunk without chunk-signature".into());
                }
                self.hasher = Sha256::new();
                if size == 0 {
                    self.check_signature()?;
                    self.state = ChunkState::Trailer;
                } else {
                    self.state = ChunkState::Data { remaining: size };
                }
            }
            ChunkState::Trailer => {
                // Trailing headers (checksums, trailer signature) are read and not checked.
                if line.is_empty() {
                    self.state = ChunkState::Done;
                }
            }
            ChunkState::Data { .. } | ChunkState::Done => {}
        }
        Ok(())
    }

    /// Ends the body: an error if it stopped before the final chunk.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            ChunkState::Done => Ok(()),
            // The blank line after the last chunk (or trailers) is optional in practice.
            ChunkState::Trailer if self.line.is_empty() => Ok(()),
            _ => Err(format!(
                "aws-chunked body ended early (after {} decoded bytes, before its final chunk)",
                self.decoded
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), canonical_header_value(v)))
            .collect()
    }

    /// The "GET Object" example of the AWS SigV4 documentation for S3 (header auth).
    #[test]
    fn aws_example_get_object() {
        let creq = canonical_request(
            "GET",
            &canonical_uri("/test.txt"),
            &canonical_query("", false),
            &headers(&[
                ("host", "examplebucket.s3.amazonaws.com"),
                ("range", "bytes=0-9"),
                ("x-amz-content-sha256", EMPTY_SHA256),
                ("x-amz-date", "20130524T000000Z"),
            ]),
            EMPTY_SHA256,
        );
        assert_eq!(
            creq,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n\
             x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let sts = string_to_sign(
            "20130524T000000Z",
            "20130524/us-east-1/s3/aws4_request",
            &creq,
        );
        assert_eq!(
            sts,
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n\
             7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
        );
        let key = signing_key(SECRET, "20130524", "us-east-1", "s3");
        assert_eq!(
            sign(&key, &sts),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The presigned-URL example of the AWS SigV4 documentation ("GET /test.txt", 86400 s).
    #[test]
    fn aws_example_presigned_url() {
        let raw_query = "X-Amz-Algorithm=AWS4-HMAC-SHA256\
            &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
            &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
            &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";
        let creq = canonical_request(
            "GET",
            &canonical_uri("/test.txt"),
            &canonical_query(raw_query, true),
            &headers(&[("host", "examplebucket.s3.amazonaws.com")]),
            UNSIGNED_PAYLOAD,
        );
        let sts = string_to_sign(
            "20130524T000000Z",
            "20130524/us-east-1/s3/aws4_request",
            &creq,
        );
        assert_eq!(
            sts.lines().last(),
            Some("3bfa292879f6447bbcda7001decf97f4a54dc650c8942174ae0a9121cf58ad04")
        );
        let key = signing_key(SECRET, "20130524", "us-east-1", "s3");
        assert_eq!(
            sign(&key, &sts),
            "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    /// The streaming ("aws-chunked", signed chunks) PUT example of the AWS documentation:
    /// 66560 bytes of 'a' in a 65536-byte chunk, a 1024-byte chunk and the final chunk.
    #[test]
    fn aws_example_chunked_upload() {
        let seed = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9";
        let sigs = [
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
        ];
        let mut body = Vec::new();
        for (size, sig) in [(65536usize, sigs[0]), (1024, sigs[1]), (0, sigs[2])] {
            body.extend_from_slice(format!("{size:x};chunk-signature={sig}\r\n").as_bytes());
            body.extend(std::iter::repeat_n(b'a', size));
            body.extend_from_slice(b"\r\n");
        }
        let signer = ChunkSigner {
            key: signing_key(SECRET, "20130524", "us-east-1", "s3"),
            datetime: "20130524T000000Z".into(),
            scope: "20130524/us-east-1/s3/aws4_request".into(),
            previous: seed.into(),
        };
        // Fed in awkward pieces, to cross header, data and CRLF boundaries.
        let mut dec = ChunkDecoder::new(Some(signer.clone()));
        let mut out = Vec::new();
        for piece in body.chunks(7) {
            dec.push(piece, &mut out).expect("valid chunk");
        }
        dec.finish().expect("complete body");
        assert_eq!(out.len(), 66560);
        assert!(out.iter().all(|&b| b == b'a'));

        // One byte changed in the data: the first chunk's signature must fail.
        let mut bad = body.clone();
        let pos = body.len() / 2;
        bad[pos] = b'b';
        let mut dec = ChunkDecoder::new(Some(signer));
        let mut out = Vec::new();
        let err = dec.push(&bad, &mut out).expect_err("tampered chunk");
        assert!(err.starts_with("signature"), "{err}");
    }

    /// Signing an outgoing request then verifying it with the incoming path's pieces agrees.
    #[test]
    fn outgoing_signature_matches_the_aws_example() {
        let headers = vec![
            (
                "Host".to_string(),
                "examplebucket.s3.amazonaws.com".to_string(),
            ),
            ("range".to_string(), "bytes=0-9".to_string()),
            ("x-amz-date".to_string(), "20130524T000000Z".to_string()),
            ("x-amz-content-sha256".to_string(), EMPTY_SHA256.to_string()),
        ];
        let auth = authorization_for(
            &OutgoingRequest {
                method: "GET",
                canonical_uri: "/test.txt",
                canonical_query: "",
                headers: &headers,
                payload_hash: EMPTY_SHA256,
                datetime: "20130524T000000Z",
            },
            "AKIAIOSFODNN7EXAMPLE",
            SECRET,
            "us-east-1",
        );
        let parsed = parse_authorization(&auth).expect("parsable header");
        assert_eq!(
            parsed.signed_headers,
            ["host", "range", "x-amz-content-sha256", "x-amz-date"]
        );
        assert_eq!(
            parsed.signature,
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// [`Signer::sign_at`] on the "GET Object" example gives the documented signature and
    /// `Authorization` header.
    #[test]
    fn signer_matches_the_aws_get_object_example() {
        let signer = Signer::s3("AKIAIOSFODNN7EXAMPLE", SECRET, "us-east-1");
        let extra = vec![("Range".to_string(), "bytes=0-9".to_string())];
        let added = signer.sign_at(
            &RequestToSign {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: "",
                headers: &extra,
                payload_hash: EMPTY_SHA256,
            },
            "20130524T000000Z",
        );
        assert_eq!(
            added,
            vec![
                ("x-amz-date".to_string(), "20130524T000000Z".to_string()),
                ("x-amz-content-sha256".to_string(), EMPTY_SHA256.to_string()),
                (
                    "authorization".to_string(),
                    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
                     SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
                     Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
                        .to_string()
                ),
            ]
        );
    }

    /// The "GET Bucket Lifecycle" and "Get Bucket (List Objects)" examples of the AWS
    /// SigV4 documentation for S3: query strings in the signature.
    #[test]
    fn signer_matches_the_aws_query_examples() {
        let signer = Signer::s3("AKIAIOSFODNN7EXAMPLE", SECRET, "us-east-1");
        let sig = |query: &str| {
            let added = signer.sign_at(
                &RequestToSign {
                    method: "GET",
                    host: "examplebucket.s3.amazonaws.com",
                    path: "/",
                    query,
                    headers: &[],
                    payload_hash: EMPTY_SHA256,
                },
                "20130524T000000Z",
            );
            let auth = &added[2].1;
            parse_authorization(auth).map(|a| a.signature)
        };
        assert_eq!(
            sig("lifecycle"),
            Ok("fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543".to_string())
        );
        assert_eq!(
            sig("max-keys=2&prefix=J"),
            Ok("34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7".to_string())
        );
    }

    #[test]
    fn amz_datetime_format() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600);
        assert_eq!(amz_datetime(t), "20130524T000000Z");
    }

    #[test]
    fn unsigned_trailer_body_decodes() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n";
        let mut dec = ChunkDecoder::new(None);
        let mut out = Vec::new();
        dec.push(body, &mut out).expect("valid body");
        dec.finish().expect("complete");
        assert_eq!(out, b"hello world");
        let mut dec = ChunkDecoder::new(None);
        dec.push(b"5\r\nhel", &mut out).expect("partial");
        assert!(dec.finish().is_err(), "a truncated body must be refused");
    }

    #[test]
    fn parse_authorization_header() {
        let a = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-date,Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024",
        )
        .expect("valid header");
        assert_eq!(a.access_key, "AKIAIOSFODNN7EXAMPLE");
        assert_eq!(a.scope(), "20130524/us-east-1/s3/aws4_request");
        assert_eq!(a.signed_headers, ["host", "range", "x-amz-date"]);
        assert!(parse_authorization("AWS AKIA:sig").is_err());
    }

    #[test]
    fn encoding_rules() {
        assert_eq!(uri_encode(b"a b/c~d+e", true), "a%20b/c~d%2Be");
        assert_eq!(uri_encode(b"a/b", false), "a%2Fb");
        assert_eq!(canonical_uri("/b/%7Ekey%20x"), "/b/~key%20x");
        assert_eq!(canonical_query("b=2&a=&c", false), "a=&b=2&c=");
        assert_eq!(percent_decode("%2e%2E%zz%4", false), b"..%zz%4");
    }
}
