//! The HTTP front: TLS over rustls (`--ssl-keyfile`, `--ssl-certfile`, `--ssl-ca-certs`,
//! `--ssl-cert-reqs`), CORS (`--allowed-origins`, `--allowed-methods`, `--allowed-headers`,
//! `--allow-credentials`, vLLM's defaults: any origin, method and header, no credentials) and
//! `--root-path` (routes answer under the prefix a proxy adds, and at `/`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::http::{HeaderName, HeaderValue, Method, Uri};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

/// The rustls server configuration from PEM files: the certificate chain, its key, and
/// optionally the CAs whose client certificates are accepted (`cert_reqs` 1: optional,
/// 2: required; Python's `ssl.CERT_*` numbers, as vLLM takes them).
pub fn tls_config(cert: &Path, key: &Path, ca: Option<&Path>, cert_reqs: u8) -> Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--ssl-certfile {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--ssl-certfile {}: not PEM certificates", cert.display()))?;
    if chain.is_empty() {
        bail!("--ssl-certfile {}: no certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("--ssl-keyfile {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match (cert_reqs, ca) {
        (0, _) => builder.with_no_client_auth(),
        (1 | 2, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("--ssl-ca-certs {}", ca.display()))? {
                roots.add(c.context("--ssl-ca-certs: not PEM certificates")?).context("--ssl-ca-certs")?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if cert_reqs == 1 { v.allow_unauthenticated() } else { v };
            builder.with_client_cert_verifier(v.build().context("--ssl-ca-certs")?)
        }
        (1 | 2, None) => bail!("--ssl-cert-reqs {cert_reqs} needs --ssl-ca-certs"),
        (n, _) => bail!("--ssl-cert-reqs {n}: 0 (none), 1 (optional) or 2 (required)"),
    };
    let mut config = builder.with_single_cert(chain, key).context("--ssl-certfile / --ssl-keyfile do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A JSON list of strings (vLLM's form for the CORS flags).
fn json_list(flag: &str, text: &str) -> Result<Vec<String>> {
    serde_json::from_str::<Vec<String>>(text)
        .with_context(|| format!("{flag} takes a JSON list of strings, e.g. '[\"*\"]'"))
}

/// The CORS flags as a layer, as Starlette's middleware (vLLM's) behaves: `*` allows any;
/// with credentials allowed, `*` echoes the request's origin, method and headers (a literal
/// `*` is not valid together with credentials).
pub fn cors(origins: &str, methods: &str, headers: &str, credentials: bool) -> Result<CorsLayer> {
    let (origins, methods, headers) = (
        json_list("--allowed-origins", origins)?,
        json_list("--allowed-methods", methods)?,
        json_list("--allowed-headers", headers)?,
    );
    // `*` allows any; with credentials it echoes the request's value instead.
    fn pick<T>(
        list: &[String],
        credentials: bool,
        any: T,
        mirror: T,
        parse: impl Fn(&[String]) -> Result<T>,
    ) -> Result<T> {
        match (list.iter().any(|x| x == "*"), credentials) {
            (true, false) => Ok(any),
            (true, true) => Ok(mirror),
            (false, _) => parse(list),
        }
    }
    let origin = pick(&origins, credentials, AllowOrigin::any(), AllowOrigin::mirror_request(), |l| {
        let list: Vec<HeaderValue> = l
            .iter()
            .map(|o| HeaderValue::from_str(o).with_context(|| format!("--allowed-origins: '{o}'")))
            .collect::<Result<_>>()?;
        Ok(AllowOrigin::list(list))
    })?;
    let method = pick(&methods, credentials, AllowMethods::any(), AllowMethods::mirror_request(), |l| {
        let list: Vec<Method> = l
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .with_context(|| format!("--allowed-methods: '{m}'"))
            })
            .collect::<Result<_>>()?;
        Ok(AllowMethods::list(list))
    })?;
    let header = pick(&headers, credentials, AllowHeaders::any(), AllowHeaders::mirror_request(), |l| {
        let list: Vec<HeaderName> = l
            .iter()
            .map(|h| HeaderName::from_bytes(h.as_bytes()).with_context(|| format!("--allowed-headers: '{h}'")))
            .collect::<Result<_>>()?;
        Ok(AllowHeaders::list(list))
    })?;
    Ok(CorsLayer::new().allow_origin(origin).allow_methods(method).allow_headers(header).allow_credentials(credentials))
}

/// `--root-path`: a non-empty prefix starting with `/`, without a trailing one.
pub fn root_path(p: &str) -> Result<Option<String>> {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        return Ok(None);
    }
    if !t.starts_with('/') || t.contains(['?', '#', ' ']) {
        bail!("--root-path '{p}': a path such as /api/v1");
    }
    Ok(Some(t.to_string()))
}

/// The request's URI with `prefix` taken off its path, when the path is under it.
pub fn strip_prefix(uri: &Uri, prefix: &str) -> Option<Uri> {
    let rest = uri.path().strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let path = if rest.is_empty() { "/" } else { rest };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_come_off_whole_segments_only() {
        let u: Uri = "/api/v1/models?x=1".parse().unwrap();
        assert_eq!(strip_prefix(&u, "/api").unwrap().to_string(), "/v1/models?x=1");
        assert_eq!(strip_prefix(&"/api".parse().unwrap(), "/api").unwrap().to_string(), "/");
        assert!(strip_prefix(&"/apix/v1".parse().unwrap(), "/api").is_none());
        assert_eq!(root_path("/api/").unwrap().as_deref(), Some("/api"));
        assert!(root_path("api").is_err());
        assert_eq!(root_path("").unwrap(), None);
    }

    #[test]
    fn cors_flags_parse_and_credentials_never_pair_with_a_literal_star() {
        assert!(cors("[\"*\"]", "[\"*\"]", "[\"*\"]", true).is_ok());
        assert!(cors("[\"https://a.example\"]", "[\"GET\", \"post\"]", "[\"authorization\"]", false).is_ok());
        assert!(cors("*", "[\"*\"]", "[\"*\"]", false).is_err());
        assert!(cors("[\"*\"]", "[\"BAD METHOD\"]", "[\"*\"]", false).is_err());
    }
}
