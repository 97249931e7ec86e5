//! What the gateway's HTTP clients (the artifact cache, the registry cache, the S3
//! remote store, the HTTP PDU drivers) share, so each is written once:
//! [`error_chain`] for messages that say why a request failed, [`add_extra_roots`] for
//! private CAs, [`auth_params`] for `WWW-Authenticate` challenges.

/// An error and its causes, joined with `: ` (a reqwest error's own text says little;
/// its causes say "connection refused" or "certificate not trusted"). A cause whose
/// text is already in the message is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Adds the certificates of each PEM bundle to the roots `builder` trusts (besides the
/// built-in ones). An entry that is not PEM, or holds no certificate, is an error naming
/// it by its place (`#1`, `#2`…).
pub fn add_extra_roots(
    mut builder: reqwest::ClientBuilder,
    pem_bundles: &[Vec<u8>],
) -> Result<reqwest::ClientBuilder, String> {
    for (i, pem) in pem_bundles.iter().enumerate() {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            format!(
                "extra CA certificate bundle #{} is not PEM: {}",
                i + 1,
                error_chain(&e)
            )
        })?;
        if certs.is_empty() {
            return Err(format!(
                "extra CA certificate bundle #{} holds no PEM CERTIFICATE block",
                i + 1
            ));
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    Ok(builder)
}

/// The scheme and the parameters of a `WWW-Authenticate` challenge
/// (`Digest realm="a, b", qop=auth` → `("digest", [("realm", "a, b"), ("qop", "auth")])`):
/// the scheme lowercased, keys lowercased, values unquoted (backslash escapes honoured)
/// and trimmed. Parsing stops at the first piece that is not `key=value`.
pub fn auth_params(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut out = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.trim().is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    (scheme.to_ascii_lowercase(), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_of_registries_and_digest_devices() {
        let (scheme, p) = auth_params(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/alpine:pull".into()),
            ]
        );
        let (scheme, p) = auth_params(
            r#"Digest qop="auth", realm="shelly, \"pro\"", nonce="60dc59c6", algorithm=SHA-256"#,
        );
        assert_eq!(scheme, "digest");
        assert_eq!(p[1], ("realm".into(), "shelly, \"pro\"".into()));
        assert_eq!(p[3], ("algorithm".into(), "SHA-256".into()));
        let (scheme, p) = auth_params("Basic");
        assert_eq!((scheme.as_str(), p.len()), ("basic", 0));
        // Garbage stops the parse, it never loops or panics.
        let (_, p) = auth_params("Bearer realm=\"unterminated");
        assert_eq!(p, vec![("realm".into(), "unterminated".into())]);
        let (_, p) = auth_params("Bearer ,,, =x, y");
        assert!(p.is_empty());
    }

    #[test]
    fn error_chain_names_the_causes_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "request failed: connection refused",
            Some(Box::new(E(
                "connection refused",
                Some(Box::new(E("os error 111", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "request failed: connection refused: os error 111"
        );
    }

    #[test]
    fn extra_roots_refuse_what_is_not_a_certificate() {
        let b = reqwest::Client::builder();
        let e = add_extra_roots(b, &[b"not a pem".to_vec()])
            .err()
            .unwrap_or_default();
        assert!(e.contains("#1"), "{e}");
        assert!(add_extra_roots(reqwest::Client::builder(), &[]).is_ok());
    }
}
