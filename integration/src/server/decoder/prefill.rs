//! One prefill through mistral.rs: a prompt's last-position logits, for chosen token ids
//! ([`last_logits`]), and mistral.rs's own tokenizer ([`tokenize`]), so ids are exactly the
//! ones the model reads.
//!
//! The logits come from a completion of one token (`max_len` 1, deterministic sampling) with
//! a logits processor that copies the prompt step's row ([`Capture`]): mistral.rs hands a
//! processor the last prompt position's logits before sampling. (Its `return_raw_logits`
//! fails for batches of more than one sequence and, mixed with ordinary sequences in one
//! batch, stops the engine, so it is not used.)

use std::sync::Arc;

use candle_core::{DType, Tensor};
use mistralrs_core::{
    Constraint, CustomLogitsProcessor, NormalRequest, Request, RequestMessage,
    Response as ModelResponse, SamplingParams, TokenizationRequest,
};
use mistralrs_server_core::types::SharedMistralRsState;
use parking_lot::Mutex;

use crate::server::api::error::ApiError;

/// What a prefill gives back: the chosen ids' logits and the log-sum-exp over the whole
/// vocabulary (so `logit − lse` is a label's log-probability under the model).
#[derive(Debug, Clone, PartialEq)]
pub struct LastLogits {
    /// The logits of the requested ids, in their order.
    pub logits: Vec<f32>,
    /// `log Σ exp(logit)` over every token (over the requested ids only when the output head
    /// computed only their rows: `HeadRows::Asked`).
    pub logsumexp: f32,
    /// Tokens the model read.
    pub prompt_tokens: usize,
}

/// The chosen ids' logits and the vocabulary's log-sum-exp, as read from one logits row.
type Captured = candle_core::Result<(Vec<f32>, f32)>;

/// Copies the prompt step's logits of `ids` (the first call, whose context is the prompt or
/// its computed part).
struct Capture {
    prompt_len: usize,
    ids: Arc<[u32]>,
    got: Mutex<Option<Captured>>,
}

impl Capture {
    fn take(logits: &Tensor, ids: &[u32]) -> Captured {
        let row = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let picked = ids
            .iter()
            .map(|&i| {
                row.get(i as usize)
                    .copied()
                    .ok_or_else(|| candle_core::Error::Msg(format!("token {i} beyond the logits")))
            })
            .collect::<candle_core::Result<Vec<f32>>>()?;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
        Ok((picked, max + sum.ln() as f32))
    }
}

impl CustomLogitsProcessor for Capture {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        // the prompt step: its context is the whole prompt, or only the part computed after a
        // reused prefix (the decode step that follows has one token more than the prompt)
        if context.len() <= self.prompt_len {
            let mut got = self.got.lock();
            if got.is_none() {
                *got = Some(Self::take(logits, &self.ids));
            }
        }
        Ok(logits.clone())
    }
}

/// mistral.rs's token ids of `text` (`special`: with the model's special tokens, as a
/// prompt; without, as a label).
pub async fn tokenize(
    mistral: &SharedMistralRsState,
    text: &str,
    special: bool,
) -> Result<Vec<u32>, ApiError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = Request::Tokenize(TokenizationRequest {
        text: either::Either::Right(text.to_string()),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens: special,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    });
    mistralrs_server_core::handler_core::send_request_with_model(mistral, request, None)
        .await
        .map_err(|e| ApiError::internal(format!("cannot reach the model: {e}")))?;
    match rx.recv().await {
        Some(Ok(ids)) => Ok(ids),
        Some(Err(e)) => Err(ApiError::internal(format!("tokenization failed: {e}"))),
        None => Err(ApiError::internal(
            "the model dropped the tokenization request",
        )),
    }
}

/// Prefills `prompt` (token ids) and returns the last position's logits of `ids`.
pub async fn last_logits(
    mistral: &SharedMistralRsState,
    id: usize,
    prompt: Vec<u32>,
    ids: Arc<[u32]>,
) -> Result<LastLogits, ApiError> {
    let prompt_len = prompt.len();
    let capture = Arc::new(Capture {
        prompt_len,
        ids,
        got: Mutex::new(None),
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let request = Request::Normal(Box::new(NormalRequest {
        id,
        messages: RequestMessage::CompletionTokens(prompt),
        sampling_params: SamplingParams {
            max_len: Some(1),
            ..SamplingParams::deterministic()
        },
        response: tx,
        return_logprobs: false,
        is_streaming: false,
        suffix: None,
        constraint: Constraint::None,
        tool_choice: None,
        tools: None,
        logits_processors: Some(vec![capture.clone() as Arc<dyn CustomLogitsProcessor>]),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        // inputs over the context are refused before they get here
        truncate_sequence: false,
    }));
    mistralrs_server_core::handler_core::send_request_with_model(mistral, request, None)
        .await
        .map_err(|e| ApiError::internal(format!("cannot reach the model: {e}")))?;
    let prompt_tokens = match rx.recv().await {
        Some(ModelResponse::CompletionDone(done)) => done.usage.prompt_tokens,
        Some(ModelResponse::ValidationError(e)) => {
            return Err(ApiError::invalid(Some("input"), e.to_string()));
        }
        Some(ModelResponse::InternalError(e)) => return Err(ApiError::internal(e.to_string())),
        Some(ModelResponse::CompletionModelError(msg, _)) => return Err(ApiError::internal(msg)),
        Some(_) => return Err(ApiError::internal("unexpected response from the model")),
        None => return Err(ApiError::internal("the model dropped the request")),
    };
    let got = capture.got.lock().take();
    match got {
        Some(Ok((logits, logsumexp))) if logits.iter().all(|x| x.is_finite()) => Ok(LastLogits {
            logits,
            logsumexp,
            prompt_tokens,
        }),
        Some(Ok(_)) => Err(ApiError::internal("the model produced non-finite logits")),
        Some(Err(e)) => Err(ApiError::internal(format!("reading the logits: {e}"))),
        None => Err(ApiError::internal(
            "the model finished without a prompt step",
        )),
    }
}
