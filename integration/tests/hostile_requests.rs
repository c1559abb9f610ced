//! Property test: request parsing never panics on arbitrary JSON, and anything it accepts
//! is a well-formed request.

use attncache_server::api::embeddings::{parse, Input};
use proptest::prelude::*;
use serde_json::Value;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| serde_json::json!(i)),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::hash_map(
                prop_oneof![
                    Just("input".to_string()),
                    Just("model".to_string()),
                    Just("encoding_format".to_string()),
                    Just("dimensions".to_string()),
                    Just("attn_cache".to_string()),
                    Just("user".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn parsing_never_panics_and_accepts_only_well_formed_requests(v in json()) {
        match parse(v.clone()) {
            Ok(req) => {
                prop_assert!(v.get("input").is_some());
                let shape_ok = match &req.input {
                    Input::Text(_) => v["input"].is_string(),
                    Input::Texts(t) => v["input"].as_array().is_some_and(|a| a.len() == t.len()),
                    Input::Tokens(t) => v["input"].as_array().is_some_and(|a| a.len() == t.len()),
                    Input::TokenBatch(b) => v["input"].as_array().is_some_and(|a| a.len() == b.len()),
                };
                prop_assert!(shape_ok, "{v}");
            }
            Err(e) => {
                prop_assert_eq!(e.status.as_u16(), 400);
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}
