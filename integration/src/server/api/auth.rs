//! Optional API keys. With keys configured (`--api-key`, or `ATTNCACHE_API_KEY`), every
//! request under `/v1/` and `/v2/` — ours and mistral.rs's — and to `/rerank`, `/tokenize`
//! and `/detokenize` must carry `Authorization: Bearer <key>` with one of them, or it gets
//! 401 with an OpenAI-style body. `/health`, `/info` and `/metrics` stay open for probes
//! and scrapers. Keys are compared in constant time. An accepted
//! request carries an [`ApiKeyId`] extension naming its key, which `--cache-scope per-key`
//! turns into the cache scope it may use.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The accepted keys (none: the server is open).
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Vec<u8>>);

/// Which key a request was accepted with: its index in the server's key list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKeyId(pub usize);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len()) // never the keys themselves
    }
}

/// Equal length and bytes, in time that depends only on the lengths (`subtle`, the
/// RustCrypto crate made for this, rather than a hand-written loop the optimiser may
/// short-circuit).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

impl ApiKeys {
    /// The distinct non-empty keys of `keys`, in order.
    pub fn new(keys: &[String]) -> Self {
        let mut distinct: Vec<Vec<u8>> = Vec::new();
        for k in keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()) {
            if !distinct.iter().any(|d| d == k.as_bytes()) {
                distinct.push(k.as_bytes().to_vec());
            }
        }
        Self(distinct)
    }

    /// A cache scope name per key, in key order: the first 96 bits of
    /// SHA-256("attncache-scope\0" + key) in hex, so directories never show a key.
    pub fn scope_names(&self) -> Vec<String> {
        use sha2::{Digest, Sha256};
        self.0
            .iter()
            .map(|k| {
                let digest = Sha256::new()
                    .chain_update(b"attncache-scope\0")
                    .chain_update(k)
                    .finalize();
                digest[..12].iter().map(|b| format!("{b:02x}")).collect()
            })
            .collect()
    }

    /// Whether no key is required.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no keys (same as [`ApiKeys::is_open`]).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an `Authorization` header value carries an accepted key.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        self.is_open() || self.key_id(authorization).is_some()
    }

    /// The key an `Authorization` header value carries, if it is one of ours.
    pub fn key_id(&self, authorization: Option<&str>) -> Option<ApiKeyId> {
        let key = authorization.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })?;
        let key = key.trim().as_bytes();
        // check every key, so the time does not tell which one matched
        let (found, index) =
            self.0
                .iter()
                .enumerate()
                .fold((false, 0), |(found, index), (i, k)| {
                    let hit = constant_time_eq(k, key);
                    (found | hit, if hit { i } else { index })
                });
        found.then_some(ApiKeyId(index))
    }
}

/// Whether a request to `path` needs a key (when keys are configured).
pub fn is_guarded(path: &str) -> bool {
    path.starts_with("/v1/")
        || path.starts_with("/v2/")
        || matches!(path, "/rerank" | "/score" | "/tokenize" | "/detokenize")
}

/// `app` behind [`require_api_key`] when `keys` holds any key; as it is when open.
pub fn guard(app: axum::Router, keys: Arc<ApiKeys>) -> axum::Router {
    if keys.is_open() {
        app
    } else {
        app.layer(axum::middleware::from_fn_with_state(keys, require_api_key))
    }
}

/// The middleware: 401 for a guarded request (see [`is_guarded`]) without an accepted key.
pub async fn require_api_key(
    State(keys): State<Arc<ApiKeys>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut req = req;
    let guarded = is_guarded(req.uri().path());
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let key_id = keys.key_id(header);
    if guarded && key_id.is_none() {
        let message = if header.is_some() {
            "Incorrect API key provided"
        } else {
            "Missing API key: send `Authorization: Bearer <key>`"
        };
        return ApiError::unauthorized(message).into_response();
    }
    if let Some(key_id) = key_id {
        req.extensions_mut().insert(key_id);
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_exactly() {
        let keys = ApiKeys::new(&["k1".into(), " k2 ".into(), "".into()]);
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(Some("Bearer k1")));
        assert!(keys.accepts(Some("Bearer k2")));
        assert!(!keys.accepts(Some("Bearer k3")));
        assert!(!keys.accepts(Some("Bearer k")));
        assert!(!keys.accepts(Some("Bearer k11")));
        assert!(!keys.accepts(Some("k1")));
        assert!(!keys.accepts(None));
        assert!(format!("{keys:?}").contains("2 keys") && !format!("{keys:?}").contains("k1"));
        let open = ApiKeys::new(&[]);
        assert!(open.is_open() && open.accepts(None) && open.accepts(Some("Bearer x")));
    }

    #[test]
    fn key_ids_are_the_key_index_and_scope_names_hide_the_keys() {
        let keys = ApiKeys::new(&["alpha".into(), "beta".into(), "alpha".into()]);
        assert_eq!(keys.len(), 2, "duplicates are one key");
        assert_eq!(keys.key_id(Some("Bearer alpha")), Some(ApiKeyId(0)));
        assert_eq!(keys.key_id(Some("Bearer beta")), Some(ApiKeyId(1)));
        assert_eq!(keys.key_id(Some("Bearer gamma")), None);
        assert_eq!(keys.key_id(None), None);
        let names = keys.scope_names();
        assert_eq!(names.len(), 2);
        assert_ne!(names[0], names[1]);
        for n in &names {
            assert_eq!(n.len(), 24);
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(!n.contains("alpha") && !n.contains("beta"));
        }
        assert_eq!(
            names,
            ApiKeys::new(&["alpha".into(), "beta".into()]).scope_names()
        );
    }

    #[test]
    fn constant_time_comparison_is_a_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
