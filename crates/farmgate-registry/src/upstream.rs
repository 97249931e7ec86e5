//! Requests to upstream registries, with the Docker token flow: an upstream 401 carrying
//! `WWW-Authenticate: Bearer realm=...,service=...,scope=...` makes the cache fetch a token
//! from the realm (anonymously, or with the client's Authorization header when it sent one)
//! and retry with it. Tokens are kept until they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, header};
use sha2::{Digest as _, Sha256};

use crate::{RegistryError, Upstream};

/// Media types asked for when the client sent no Accept header.
pub(crate) const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Client for the upstreams, with a token cache.
pub(crate) struct UpstreamClient {
    http: reqwest::Client,
    timeout: Duration,
    /// (upstream URL, scope, client credential hash) → (token, expiry).
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// How an upstream is named in errors: `prefix (url)`.
pub(crate) fn describe(up: &Upstream) -> String {
    format!("{} ({})", up.prefix, up.url)
}

impl UpstreamClient {
    /// A client trusting the built-in roots plus the PEM certificates of `extra_ca_pem`.
    pub(crate) fn new(
        timeout: Duration,
        extra_ca_pem: &[Vec<u8>],
    ) -> Result<UpstreamClient, RegistryError> {
        let builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .user_agent(concat!("farmgate-registry/", env!("CARGO_PKG_VERSION")));
        let builder = farmgate_httpc::add_extra_roots(builder, extra_ca_pem)
            .map_err(RegistryError::Config)?;
        let http = builder
            .build()
            .map_err(|e| RegistryError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(UpstreamClient {
            http,
            timeout,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The per-read idle timeout for bodies.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `method` to `<upstream>/v2/<name>/<tail>`, authenticating with a token when
    /// the upstream asks for one. Returns the final response whatever its status.
    pub(crate) async fn send(
        &self,
        up: &Upstream,
        method: Method,
        name: &str,
        tail: &str,
        accept: Option<&HeaderValue>,
        client_auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/v2/{}/{}", up.url.trim_end_matches('/'), name, tail);
        let scope = format!("repository:{name}:pull");
        let key = token_key(up, &scope, client_auth);
        let cached = self.cached_token(&key);
        let resp = self
            .request(up, &method, &url, accept, cached.as_deref().map(bearer))
            .await?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Some(challenge) = challenge else {
            return Ok(resp);
        };
        let auth = match parse_challenge(&challenge) {
            Some(Challenge::Bearer(params)) => {
                let token = self.fetch_token(up, &params, &scope, client_auth).await?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (token.0.clone(), token.1));
                bearer(&token.0)
            }
            Some(Challenge::Basic) => match client_auth {
                Some(a) => a.clone(),
                None => return Ok(resp),
            },
            None => return Ok(resp),
        };
        self.request(up, &method, &url, accept, Some(auth)).await
    }

    fn cached_token(&self, key: &str) -> Option<String> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tokens.retain(|_, (_, exp)| *exp > now);
        tokens.get(key).map(|(t, _)| t.clone())
    }

    async fn request(
        &self,
        up: &Upstream,
        method: &Method,
        url: &str,
        accept: Option<&HeaderValue>,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut req = self.http.request(method.clone(), url);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a.clone());
        }
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        match tokio::time::timeout(self.timeout, req.send()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RegistryError::Upstream {
                upstream: describe(up),
                message: format!("{method} {url} failed: {}", explain(&e)),
            }),
            Err(_) => Err(RegistryError::Upstream {
                upstream: describe(up),
                message: format!("{method} {url}: no answer within {:?}", self.timeout),
            }),
        }
    }

    /// GETs a token from the challenge's realm. Returns (token, expiry).
    async fn fetch_token(
        &self,
        up: &Upstream,
        params: &HashMap<String, String>,
        scope: &str,
        client_auth: Option<&HeaderValue>,
    ) -> Result<(String, Instant), RegistryError> {
        let err = |message: String| RegistryError::Upstream {
            upstream: describe(up),
            message,
        };
        let realm = params
            .get("realm")
            .ok_or_else(|| err("Bearer challenge without a realm".into()))?;
        let mut url = url::Url::parse(realm).map_err(|e| {
            err(format!(
                "Bearer challenge realm {realm:?} is not a URL: {e}"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(err(format!(
                "Bearer challenge realm {realm:?} is not http(s)"
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = params.get("service") {
                q.append_pair("service", s);
            }
            q.append_pair(
                "scope",
                params.get("scope").map(String::as_str).unwrap_or(scope),
            );
        }
        let mut req = self.http.get(url.clone());
        if let Some(a) = client_auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| {
                err(format!(
                    "token endpoint {url}: no answer within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| err(format!("token endpoint {url}: {}", explain(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            let s = status.as_u16();
            return Err(if matches!(s, 401 | 403 | 429) {
                RegistryError::Denied {
                    upstream: describe(up),
                    status: s,
                    message: format!("token endpoint {url} answered {status}"),
                }
            } else {
                err(format!("token endpoint {url} answered {status}"))
            });
        }
        let body = tokio::time::timeout(self.timeout, resp.bytes())
            .await
            .map_err(|_| {
                err(format!(
                    "token endpoint {url}: body not sent within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| err(format!("token endpoint {url}: {}", error_chain(&e))))?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            err(format!(
                "token endpoint {url}: answer is not token JSON: {e}"
            ))
        })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err(format!("token endpoint {url}: answer has no token")))?;
        if HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            return Err(err(format!(
                "token endpoint {url}: token is not a valid header value"
            )));
        }
        // Docker's default lifetime is 60 s; renew a little early.
        let life = t.expires_in.unwrap_or(60).clamp(10, 3600).saturating_sub(5);
        Ok((token, Instant::now() + Duration::from_secs(life)))
    }
}

fn token_key(up: &Upstream, scope: &str, client_auth: Option<&HeaderValue>) -> String {
    let who = client_auth
        .map(|a| hex::encode(Sha256::digest(a.as_bytes())))
        .unwrap_or_default();
    format!("{}\n{scope}\n{who}", up.url)
}

fn bearer(token: &str) -> HeaderValue {
    // Validated when the token was fetched.
    HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"))
}

pub(crate) use farmgate_httpc::error_chain;

/// The cause chain of a failed request, led by a plain statement when it is a TLS
/// certificate rejection (the chain alone reads like `invalid peer certificate:
/// UnknownIssuer`).
fn explain(e: &reqwest::Error) -> String {
    let chain = error_chain(e);
    if chain.contains("invalid peer certificate") || chain.contains("InvalidCertificate") {
        let why = if chain.contains("UnknownIssuer") {
            "the upstream's TLS certificate is not trusted (signed by an unknown CA; \
             add that CA to the cache's extra CA certificates)"
        } else {
            "the upstream's TLS certificate was rejected"
        };
        format!("TLS handshake failed: {why}: {chain}")
    } else {
        chain
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Bearer k="v",...`.
    Bearer(HashMap<String, String>),
    /// `Basic realm=...`.
    Basic,
}

/// Parses `Bearer realm="...",service="...",scope="..."` (quoted values may contain commas
/// and backslash escapes) or `Basic ...`.
pub(crate) fn parse_challenge(s: &str) -> Option<Challenge> {
    let (scheme, params) = farmgate_httpc::auth_params(s);
    match scheme.as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer(params.into_iter().collect())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        let Some(Challenge::Bearer(p)) = c else {
            panic!("not a bearer challenge: {c:?}");
        };
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/alpine:pull,push");
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
