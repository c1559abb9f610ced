//! `GET /openapi.json`: the OpenAPI 3.1 document of our routes, derived (utoipa) from the
//! request and response types the routes themselves use, so it cannot drift from them; a
//! test checks that it lists exactly the routes of [`super::routes`]. mistral.rs's own
//! routes (chat, `/v1/models`, …) are documented by mistral.rs.

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "attncache-server",
        description = "mistral.rs's OpenAI-compatible server with AttnCache: embeddings, \
                       classification, rerank and tokenization, with a per-request attention \
                       cache flag"
    ),
    paths(
        super::embeddings::embeddings,
        super::classify::classify,
        super::rerank::rerank,
        super::rerank::rerank_v2_doc,
        super::rerank::rerank_root_doc,
        super::tokenize::tokenize,
        super::tokenize::tokenize_v1_doc,
        super::tokenize::detokenize,
        super::tokenize::detokenize_v1_doc,
        super::info::info,
        super::metrics::metrics,
        openapi,
    ),
    components(schemas(super::error::ErrorBody))
)]
pub struct ApiDoc;

/// The route.
#[utoipa::path(get, path = "/openapi.json", tag = "info",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_exactly_the_routes_served() {
        let doc = ApiDoc::openapi();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in &doc.paths.paths {
            let json = serde_json::to_value(item).expect("path item");
            for method in ["get", "post", "put", "delete", "patch"] {
                if json.get(method).is_some() {
                    documented.push((method.to_string(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = super::super::routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn request_and_response_types_are_in_the_components() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("json");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for name in [
            "EmbeddingRequest",
            "EmbeddingResponse",
            "InputReport",
            "RerankRequest",
            "RerankResponse",
            "TokenizeRequest",
            "ClassifyResponse",
            "Info",
            "ErrorBody",
            "TruncationDirection",
        ] {
            assert!(schemas.contains_key(name), "{name} missing");
        }
    }
}
