//! The served model's text side, read from its directory: the tokenizer (`tokenizer.json`,
//! the file mistral.rs tokenizes with), the task prompts of
//! `config_sentence_transformers.json` (`prompts`, `default_prompt_name`) and the longest
//! input. The routes use it to count and cut tokens before a request reaches mistral.rs,
//! and to put a task prompt before a text as sentence-transformers does (`prompt + text`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What went wrong reading a model's text side.
#[derive(Debug, thiserror::Error)]
pub enum ModelTextError {
    /// `tokenizer.json` could not be loaded.
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// `config_sentence_transformers.json` exists but is not what sentence-transformers writes.
    #[error("{path}: {message}")]
    Prompts {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// Tokenizing or decoding failed.
    #[error("the tokenizer failed: {0}")]
    Encode(String),
}

/// Which end of an over-long input is cut (`truncation_direction`, TEI's spelling also
/// accepted: `Left`/`Right`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TruncationDirection {
    /// Keep the start, cut the end (sentence-transformers and TEI's default).
    #[default]
    #[serde(alias = "Right")]
    Right,
    /// Keep the end, cut the start.
    #[serde(alias = "Left")]
    Left,
}

/// The part of `config_sentence_transformers.json` we read.
#[derive(Debug, Default, Deserialize)]
struct SentenceTransformersConfig {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

/// A tokenized input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Token ids, special tokens included where the tokenizer adds them.
    pub ids: Vec<u32>,
    /// Tokens cut by truncation (0: none).
    pub truncated: usize,
}

/// The served model's tokenizer, prompts and input limit.
pub struct ModelText {
    tokenizer: tokenizers::Tokenizer,
    prompts: BTreeMap<String, String>,
    default_prompt_name: Option<String>,
    max_tokens: Option<usize>,
}

impl std::fmt::Debug for ModelText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelText")
            .field("prompts", &self.prompts)
            .field("default_prompt_name", &self.default_prompt_name)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl ModelText {
    /// Reads `dir`'s tokenizer and prompts; `max_tokens` is the longest input the model
    /// reads (`None`: unknown, nothing is cut).
    pub fn load(dir: &Path, max_tokens: Option<usize>) -> Result<Self, ModelTextError> {
        let path = dir.join("tokenizer.json");
        let tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelTextError::Tokenizer {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let st_path = dir.join("config_sentence_transformers.json");
        let st = match std::fs::read_to_string(&st_path) {
            Ok(text) => serde_json::from_str::<SentenceTransformersConfig>(&text).map_err(|e| {
                ModelTextError::Prompts {
                    path: st_path.display().to_string(),
                    message: e.to_string(),
                }
            })?,
            Err(_) => SentenceTransformersConfig::default(),
        };
        if let Some(name) = &st.default_prompt_name {
            if !st.prompts.contains_key(name) {
                return Err(ModelTextError::Prompts {
                    path: st_path.display().to_string(),
                    message: format!("default_prompt_name `{name}` is not one of `prompts`"),
                });
            }
        }
        Ok(Self {
            tokenizer,
            prompts: st.prompts,
            default_prompt_name: st.default_prompt_name,
            max_tokens,
        })
    }

    /// The task prompts by name (`query`, `document`, …), as the model directory lists them.
    pub fn prompts(&self) -> &BTreeMap<String, String> {
        &self.prompts
    }

    /// The prompt sentence-transformers uses when none is named (usually none).
    pub fn default_prompt_name(&self) -> Option<&str> {
        self.default_prompt_name.as_deref()
    }

    /// The longest input the model reads, in tokens.
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    /// The text of prompt `name`, if the model has it.
    pub fn prompt(&self, name: &str) -> Option<&str> {
        self.prompts.get(name).map(String::as_str)
    }

    /// Token ids of `text` (with the special tokens the model's tokenizer adds when
    /// `add_special_tokens`), as mistral.rs would give them to the model.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelTextError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelTextError::Encode(e.to_string()))
    }

    /// The tokens of `ids` as the vocabulary spells them (`None` for an unknown id).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<Option<String>> {
        ids.iter()
            .map(|&id| self.tokenizer.id_to_token(id))
            .collect()
    }

    /// `text`'s token ids (special tokens added), cut to `max` tokens from `direction`'s
    /// end if longer: the special tokens the tokenizer puts at the start and the end stay,
    /// as in sentence-transformers (Hugging Face tokenizers' truncation).
    pub fn encode_truncated(
        &self,
        text: &str,
        max: usize,
        direction: TruncationDirection,
    ) -> Result<Tokenized, ModelTextError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| ModelTextError::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        if ids.len() <= max {
            return Ok(Tokenized {
                ids: ids.to_vec(),
                truncated: 0,
            });
        }
        let special = encoding.get_special_tokens_mask();
        let head = special.iter().take_while(|&&s| s == 1).count();
        let tail = special[head..]
            .iter()
            .rev()
            .take_while(|&&s| s == 1)
            .count();
        let (head, tail) = if head + tail >= max {
            (0, 0)
        } else {
            (head, tail)
        };
        let content = &ids[head..ids.len() - tail];
        let keep = max - head - tail;
        let kept = match direction {
            TruncationDirection::Right => &content[..keep],
            TruncationDirection::Left => &content[content.len() - keep..],
        };
        let mut out = Vec::with_capacity(max);
        out.extend_from_slice(&ids[..head]);
        out.extend_from_slice(kept);
        out.extend_from_slice(&ids[ids.len() - tail..]);
        Ok(Tokenized {
            truncated: ids.len() - out.len(),
            ids: out,
        })
    }

    /// `ids` as text (`skip_special_tokens`: leave out `<bos>`, `<eos>`, …).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelTextError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelTextError::Encode(e.to_string()))
    }
}

/// `ids` cut to `max` from `direction`'s end (token-id inputs: no special tokens are kept,
/// the ids are the caller's).
pub fn truncate_ids(ids: &mut Vec<u32>, max: usize, direction: TruncationDirection) -> usize {
    if ids.len() <= max {
        return 0;
    }
    let cut = ids.len() - max;
    match direction {
        TruncationDirection::Right => ids.truncate(max),
        TruncationDirection::Left => {
            ids.drain(..cut);
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (tempfile::TempDir, ModelText) {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::tools::tiny_model::write(dir.path(), 7).expect("tiny model");
        let text = ModelText::load(dir.path(), Some(60)).expect("load");
        (dir, text)
    }

    #[test]
    fn truncation_cuts_the_named_end() {
        let (_d, text) = tiny();
        let all = text.encode("the a an and or", true).expect("encode");
        assert_eq!(all.len(), 5);
        let right = text
            .encode_truncated("the a an and or", 3, TruncationDirection::Right)
            .expect("right");
        assert_eq!((right.ids.as_slice(), right.truncated), (&all[..3], 2));
        let left = text
            .encode_truncated("the a an and or", 3, TruncationDirection::Left)
            .expect("left");
        assert_eq!((left.ids.as_slice(), left.truncated), (&all[2..], 2));
        let short = text
            .encode_truncated("the a", 3, TruncationDirection::Left)
            .expect("short");
        assert_eq!(short.truncated, 0);
    }

    #[test]
    fn truncation_keeps_the_special_tokens_the_tokenizer_adds() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::tools::tiny_model::write(dir.path(), 7).expect("tiny model");
        let path = dir.path().join("tokenizer.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let special = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}});
        let seq = serde_json::json!({"Sequence": {"id": "A", "type_id": 0}});
        json["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [special("<bos>"), seq.clone(), special("<eos>")],
            "pair": [special("<bos>"), seq, special("<eos>")],
            "special_tokens": {
                "<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]},
                "<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}
            }
        });
        std::fs::write(&path, json.to_string()).expect("write");
        let text = ModelText::load(dir.path(), None).expect("load");
        let all = text.encode("the a an and or", true).expect("encode");
        assert_eq!((all[0], all[6], all.len()), (2, 1, 7));
        let right = text
            .encode_truncated("the a an and or", 4, TruncationDirection::Right)
            .expect("right");
        assert_eq!(right.ids, vec![2, all[1], all[2], 1]);
        assert_eq!(right.truncated, 3);
        let left = text
            .encode_truncated("the a an and or", 4, TruncationDirection::Left)
            .expect("left");
        assert_eq!(left.ids, vec![2, all[4], all[5], 1]);
        assert_eq!(
            text.decode(&right.ids, true).expect("decode"),
            "the a",
            "special tokens are skipped"
        );
    }

    #[test]
    fn token_ids_are_cut_from_either_end() {
        let mut ids = vec![1, 2, 3, 4];
        assert_eq!(truncate_ids(&mut ids, 2, TruncationDirection::Left), 2);
        assert_eq!(ids, vec![3, 4]);
        let mut ids = vec![1, 2, 3, 4];
        assert_eq!(truncate_ids(&mut ids, 3, TruncationDirection::Right), 1);
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(truncate_ids(&mut ids, 9, TruncationDirection::Right), 0);
    }

    #[test]
    fn prompts_come_from_the_sentence_transformers_config() {
        let (_d, text) = tiny();
        assert!(text.prompt("query").is_some());
        assert!(text.prompt("document").is_some());
        assert_eq!(text.default_prompt_name(), None);
        assert_eq!(text.prompt("nonsense"), None);
    }

    #[test]
    fn a_default_prompt_that_is_not_listed_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::tools::tiny_model::write(dir.path(), 7).expect("tiny model");
        std::fs::write(
            dir.path().join("config_sentence_transformers.json"),
            r#"{"prompts": {"query": "q "}, "default_prompt_name": "missing"}"#,
        )
        .expect("write");
        let err = ModelText::load(dir.path(), None).expect_err("refused");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
