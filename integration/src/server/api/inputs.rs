//! What every route does to its inputs before they reach the model: the task prompt
//! (`prompt_name`, sentence-transformers' `prompt + text`) and truncation (`truncate`,
//! `truncation_direction`, the server's `--auto-truncate`), both done with the served
//! model's own tokenizer and prompts ([`crate::server::model_text::ModelText`]).

use super::error::ApiError;
use super::ApiState;
use crate::server::model_text::{truncate_ids, TruncationDirection};

/// One input, as the model receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Prompt {
    /// Text, tokenised by the model.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// The prompt and truncation fields of a request (each route reads them from its own body).
#[derive(Debug, Clone, Default)]
pub struct InputOptions {
    /// A task prompt of the model (`config_sentence_transformers.json`: EmbeddingGemma has
    /// `query`, `document`, `Classification`, …) put before every text input.
    pub prompt_name: Option<String>,
    /// Cut inputs longer than the model reads instead of refusing them.
    pub truncate: Option<bool>,
    /// mistral.rs's name for `truncate`.
    pub truncate_sequence: Option<bool>,
    /// Which end is cut: `right` (default: the start is kept) or `left`.
    pub truncation_direction: Option<TruncationDirection>,
    /// Cut every input to at most this many tokens, below the model's own limit (rerank's
    /// `max_tokens_per_doc`); implies truncation.
    pub max_tokens: Option<usize>,
}

/// An input ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// What the model receives.
    pub prompt: Prompt,
    /// Tokens cut by truncation.
    pub truncated: usize,
    /// Its length in tokens, as the model will see it (the queue batches equal lengths).
    pub tokens: usize,
}

impl InputOptions {
    /// Whether over-long inputs are cut (the request says so, or the server does by default;
    /// `truncate: false` in a request overrides `--auto-truncate`).
    pub fn truncates(&self, state: &ApiState) -> Result<bool, ApiError> {
        match (self.truncate, self.truncate_sequence) {
            (Some(a), Some(b)) if a != b => Err(ApiError::invalid(
                Some("truncate"),
                format!("truncate says {a} but truncate_sequence says {b}"),
            )),
            (a, b) => Ok(a.or(b).unwrap_or(state.auto_truncate)),
        }
    }

    /// The prompt text to put before text inputs: the named one, else the model's default
    /// (sentence-transformers' `default_prompt_name`, usually none). `role` is the default
    /// a route picks for its inputs (rerank: `query` / `document`), used when the model has it
    /// and the request names none.
    pub fn prompt_text<'a>(
        &self,
        state: &'a ApiState,
        role: Option<&str>,
    ) -> Result<Option<&'a str>, ApiError> {
        let text = &state.text;
        match &self.prompt_name {
            Some(name) => text.prompt(name).map(Some).ok_or_else(|| {
                let known: Vec<&str> = text.prompts().keys().map(String::as_str).collect();
                ApiError::invalid(
                    Some("prompt_name"),
                    if known.is_empty() {
                        format!("prompt_name `{name}`: this model has no task prompts")
                    } else {
                        format!(
                            "prompt_name `{name}` is not one of this model's prompts: {}",
                            known.join(", ")
                        )
                    },
                )
            }),
            None => Ok(role
                .and_then(|r| text.prompt(r))
                .or_else(|| text.default_prompt_name().and_then(|n| text.prompt(n)))),
        }
    }
}

/// Puts `prompt` before text inputs and truncates, as `options` say. A named prompt on
/// token-id inputs is refused (their tokens are final); an over-long input without
/// truncation is left for the model to refuse.
pub fn prepare(
    state: &ApiState,
    prompts: Vec<Prompt>,
    options: &InputOptions,
    role: Option<&str>,
) -> Result<Vec<Prepared>, ApiError> {
    let prompt = options.prompt_text(state, role)?;
    if options.prompt_name.is_some() && prompts.iter().any(|p| matches!(p, Prompt::Tokens(_))) {
        return Err(ApiError::invalid(
            Some("prompt_name"),
            "prompt_name applies to text inputs; token-id inputs are sent as they are",
        ));
    }
    let truncate = options.truncates(state)? || options.max_tokens.is_some();
    let max = match (state.text.max_tokens(), options.max_tokens) {
        (Some(model), Some(cap)) => Some(model.min(cap)),
        (model, cap) => model.or(cap),
    }
    .filter(|_| truncate);
    let direction = options.truncation_direction.unwrap_or_default();
    prompts
        .into_iter()
        .map(|p| {
            let p = match (p, prompt) {
                (Prompt::Text(t), Some(pre)) => Prompt::Text(format!("{pre}{t}")),
                (p, _) => p,
            };
            let Some(max) = max else {
                let tokens = token_count(state, &p)?;
                // refused here, with the fix named, rather than by mistral.rs (whose
                // validation error is a bare message)
                if let Some(max) = state.model.max_positions.filter(|&m| tokens > m) {
                    return Err(ApiError::invalid(
                        Some("input"),
                        format!(
                            "an input is longer than the {max} tokens the model reads; send \
                             `truncate: true` to cut it (or start the server with --auto-truncate)"
                        ),
                    ));
                }
                return Ok(Prepared {
                    prompt: p,
                    truncated: 0,
                    tokens,
                });
            };
            match p {
                Prompt::Text(t) => {
                    let cut = state
                        .text
                        .encode_truncated(&t, max, direction)
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    let tokens = cut.ids.len();
                    Ok(match cut.truncated {
                        0 => Prepared {
                            prompt: Prompt::Text(t),
                            truncated: 0,
                            tokens,
                        },
                        n => Prepared {
                            prompt: Prompt::Tokens(cut.ids),
                            truncated: n,
                            tokens,
                        },
                    })
                }
                Prompt::Tokens(mut ids) => {
                    let truncated = truncate_ids(&mut ids, max, direction);
                    Ok(Prepared {
                        tokens: ids.len(),
                        prompt: Prompt::Tokens(ids),
                        truncated,
                    })
                }
            }
        })
        .collect()
}

/// The tokens the model will see for `prompt` (a text is tokenized as mistral.rs does, with
/// the tokenizer's special tokens).
fn token_count(state: &ApiState, prompt: &Prompt) -> Result<usize, ApiError> {
    match prompt {
        Prompt::Tokens(ids) => Ok(ids.len()),
        Prompt::Text(t) => state
            .text
            .encode(t, true)
            .map(|ids| ids.len())
            .map_err(|e| ApiError::internal(e.to_string())),
    }
}

/// [`prepare`] off the async runtime (tokenizing a large batch for truncation takes a while).
pub async fn prepare_blocking(
    state: &std::sync::Arc<ApiState>,
    prompts: Vec<Prompt>,
    options: InputOptions,
    role: Option<&'static str>,
) -> Result<Vec<Prepared>, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || prepare(&state, prompts, &options, role))
        .await
        .map_err(|e| ApiError::internal(format!("input preparation failed: {e}")))?
}
