//! Errors of the registry cache and their OCI error responses.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// What went wrong, in a form that maps onto an OCI distribution error response
/// (`{"errors":[{"code":...,"message":...}]}`).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file or directory of the cache could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`create`, `read`, `rename`...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration given to [`crate::RegistryCache::open`] is unusable.
    #[error("invalid registry cache configuration: {0}")]
    Config(String),
    /// The request path names a repository in a malformed way (`NAME_INVALID`, 400).
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    /// The prefix names no configured upstream (`NAME_UNKNOWN`, 404).
    #[error("unknown repository: {0}")]
    NameUnknown(String),
    /// A digest is malformed or of an unsupported algorithm (`DIGEST_INVALID`, 400).
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    /// The upstream has no such manifest (`MANIFEST_UNKNOWN`, 404).
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// The upstream has no such blob (`BLOB_UNKNOWN`, 404).
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    /// The request is not part of the pull side of the distribution API (`UNSUPPORTED`, 404).
    #[error("unsupported request: {0}")]
    Unsupported(String),
    /// The upstream refused (401, 403 or 429), passed on with the same status.
    #[error("upstream {upstream} refused with {status}: {message}")]
    Denied {
        /// The upstream's prefix and URL.
        upstream: String,
        /// The upstream's HTTP status.
        status: u16,
        /// What the upstream said.
        message: String,
    },
    /// The upstream sent content whose digest is not the one asked for (502).
    #[error("upstream {upstream} sent corrupted content: {message}")]
    DigestMismatch {
        /// The upstream's prefix and URL.
        upstream: String,
        /// Expected and actual digest or size.
        message: String,
    },
    /// The upstream is unreachable or answered with an error (502).
    #[error("upstream {upstream}: {message}")]
    Upstream {
        /// The upstream's prefix and URL.
        upstream: String,
        /// What failed.
        message: String,
    },
    /// Another request's failure, relayed to a client that waited on the same fetch.
    #[error("{message}")]
    Relayed {
        /// HTTP status to answer.
        status: u16,
        /// OCI error code.
        code: &'static str,
        /// The original error's text.
        message: String,
    },
}

impl RegistryError {
    /// The HTTP status and OCI error code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            RegistryError::Io { .. } | RegistryError::Config(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN")
            }
            RegistryError::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            RegistryError::NameUnknown(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            RegistryError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            RegistryError::ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            RegistryError::BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            RegistryError::Unsupported(_) => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
            RegistryError::Denied { status, .. } => match *status {
                401 => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
                429 => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
                _ => (StatusCode::FORBIDDEN, "DENIED"),
            },
            RegistryError::DigestMismatch { .. } => (StatusCode::BAD_GATEWAY, "DIGEST_INVALID"),
            RegistryError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
            RegistryError::Relayed { status, code, .. } => (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
                code,
            ),
        }
    }

    /// A copy of this error for another client waiting on the same upstream fetch.
    pub(crate) fn relay(&self) -> RegistryError {
        let (status, code) = self.status_and_code();
        RegistryError::Relayed {
            status: status.as_u16(),
            code,
            message: self.to_string(),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        if status.is_server_error() {
            tracing::warn!(%status, code, "registry cache: {message}");
        } else {
            tracing::debug!(%status, code, "registry cache: {message}");
        }
        let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
        let mut resp = (status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}
