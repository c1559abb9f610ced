//! Request bodies into request types, naming the field at fault.
//!
//! `serde_path_to_error` reports where deserializing stopped (`input`, `documents[2]`), so
//! a bad value answers 400 with `param` set to the field a client must fix, whatever the
//! type's shape; before, each route tried its fields one by one to find it. Each route
//! lists its fields ([`Field`]): the `param` to report (an alias reports its field's
//! name) and, where serde's message would not tell a client what to send (untagged enums),
//! a hint.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use super::error::ApiError;

/// A field of a request body.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The key in the body.
    key: &'static str,
    /// The field errors name (`key`, or the field an alias stands for).
    param: &'static str,
    /// What to send instead, added to serde's message.
    hint: Option<&'static str>,
}

impl Field {
    /// The field `key`.
    pub const fn new(key: &'static str) -> Self {
        Self {
            key,
            param: key,
            hint: None,
        }
    }

    /// `key`, another name of the field `param`.
    pub const fn alias(key: &'static str, param: &'static str) -> Self {
        Self {
            key,
            param,
            hint: None,
        }
    }

    /// The same field, with a hint of what to send.
    pub const fn hint(self, hint: &'static str) -> Self {
        Self {
            hint: Some(hint),
            ..self
        }
    }
}

/// Deserializes a JSON object body into `T`; an error names the field of `fields` at
/// fault (`{field} is required` for a missing one) or, for anything else (an unknown
/// field, a body that is not an object), none.
pub fn parse<T: DeserializeOwned>(
    value: serde_json::Value,
    fields: &[Field],
) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next());
        let at = e.path().iter().next().and_then(|s| match s {
            Segment::Map { key } => Some(key.as_str()),
            _ => None,
        });
        let Some(field) = missing
            .or(at)
            .and_then(|k| fields.iter().find(|f| f.key == k))
        else {
            if let Some(unknown) = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
            {
                return ApiError::invalid(
                    None,
                    format!("`{unknown}` is not supported by this server ({message})"),
                );
            }
            return ApiError::invalid(None, message);
        };
        let param = field.param;
        if missing.is_some() {
            return ApiError::invalid(Some(param), format!("{param} is required"));
        }
        let message = match field.hint {
            // serde's own message for an untagged enum names a Rust type, not what to send
            Some(hint) if message.contains("untagged enum") => format!("{param}: {hint}"),
            Some(hint) => format!("{param}: {message}; {hint}"),
            None => format!("{param}: {message}"),
        };
        ApiError::invalid(Some(param), message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        input: Vec<u32>,
        #[serde(default, alias = "task")]
        prompt_name: Option<String>,
        #[serde(default)]
        flag: Option<bool>,
    }

    const FIELDS: &[Field] = &[
        Field::new("input").hint("input must be an array of token ids"),
        Field::new("prompt_name"),
        Field::alias("task", "prompt_name"),
        Field::new("flag"),
    ];

    fn error(v: serde_json::Value) -> ApiError {
        parse::<Body>(v, FIELDS).unwrap_err()
    }

    #[test]
    fn the_field_at_fault_is_named() {
        let e = error(serde_json::json!({"input": [1, -2]}));
        assert_eq!(e.param, Some("input"));
        assert!(
            e.message.starts_with("input: invalid value: integer `-2`"),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with("input must be an array of token ids"),
            "{}",
            e.message
        );
        let e = error(serde_json::json!({"input": [1], "flag": "yes"}));
        assert_eq!(
            (e.param, e.message.starts_with("flag: invalid type")),
            (Some("flag"), true)
        );
        // an alias reports the field it stands for
        let e = error(serde_json::json!({"input": [1], "task": 5}));
        assert_eq!(e.param, Some("prompt_name"));
    }

    #[test]
    fn missing_unknown_and_non_objects() {
        let e = error(serde_json::json!({"flag": true}));
        assert_eq!(
            (e.param, e.message.as_str()),
            (Some("input"), "input is required")
        );
        let e = error(serde_json::json!({"input": [1], "other": 1}));
        assert_eq!(e.param, None);
        assert!(
            e.message.starts_with("`other` is not supported"),
            "{}",
            e.message
        );
        for v in [
            serde_json::json!([]),
            serde_json::json!(null),
            serde_json::json!("x"),
        ] {
            let e = error(v);
            assert_eq!(e.param, None);
            assert_eq!(e.message, "the request body must be a JSON object");
        }
        assert!(parse::<Body>(serde_json::json!({"input": [1], "task": "query"}), FIELDS).is_ok());
    }
}
