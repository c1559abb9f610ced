//! Optional API keys. With keys configured (`--api-key`, or `ATTNCACHE_API_KEY`), every
//! request under `/v1/` — ours and mistral.rs's — must carry `Authorization: Bearer <key>`
//! with one of them, or it gets 401 with an OpenAI-style body. `/health` and `/metrics`
//! stay open for probes and scrapers. Keys are compared in constant time.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The accepted keys (none: the server is open).
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len()) // never the keys themselves
    }
}

/// Equal length and bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    /// The non-empty keys of `keys`.
    pub fn new(keys: &[String]) -> Self {
        Self(
            keys.iter()
                .map(|k| k.trim())
                .filter(|k| !k.is_empty())
                .map(|k| k.as_bytes().to_vec())
                .collect(),
        )
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
        let Some(key) = authorization.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        }) else {
            return self.is_open();
        };
        let key = key.trim().as_bytes();
        // check every key, so the time does not tell which one matched
        self.is_open()
            || self
                .0
                .iter()
                .fold(false, |ok, k| constant_time_eq(k, key) | ok)
    }
}

/// The middleware: 401 for a `/v1/` request without an accepted key.
pub async fn require_api_key(
    State(keys): State<Arc<ApiKeys>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let guarded = req.uri().path().starts_with("/v1/");
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if guarded && !keys.accepts(header) {
        let message = if header.is_some() {
            "Incorrect API key provided"
        } else {
            "Missing API key: send `Authorization: Bearer <key>`"
        };
        return ApiError::unauthorized(message).into_response();
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
    fn constant_time_comparison_is_a_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
