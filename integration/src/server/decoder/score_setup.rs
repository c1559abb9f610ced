//! How a decoder reads a query–document pair for scoring: `--score-template` split at its
//! `{query}` and `{document}` slots ([`ScoreTemplate`]), its fixed text tokenized once at start
//! and the yes/no words' ids ([`ScoreSetup`]).

use std::sync::Arc;

use mistralrs_server_core::types::SharedMistralRsState;

use super::prefill::tokenize;
use crate::server::api::error::ApiError;

/// The default `--score-template`.
pub use crate::server::cli::DEFAULT_SCORE_TEMPLATE as DEFAULT_TEMPLATE;

/// A part of the template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Query,
    Document,
}

/// `--score-template`: fixed text with one `{query}` and one `{document}` slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreTemplate {
    parts: Vec<Part>,
}

impl ScoreTemplate {
    /// Splits `template` at its slots; an error (for the start-up message) unless it holds
    /// each of `{query}` and `{document}` exactly once.
    pub fn parse(template: &str) -> Result<Self, String> {
        for slot in ["{query}", "{document}"] {
            let n = template.matches(slot).count();
            if n != 1 {
                return Err(format!(
                    "--score-template must hold {slot} exactly once, not {n} times"
                ));
            }
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            let next = ["{query}", "{document}"]
                .iter()
                .filter_map(|slot| rest.find(slot).map(|at| (at, *slot)))
                .min();
            let Some((at, slot)) = next else {
                parts.push(Part::Text(rest.to_string()));
                break;
            };
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_string()));
            }
            parts.push(if slot == "{query}" {
                Part::Query
            } else {
                Part::Document
            });
            rest = &rest[at + slot.len()..];
        }
        Ok(Self { parts })
    }
}

/// A template part, tokenized where it is fixed.
#[derive(Debug, Clone)]
enum Piece {
    Ids(Vec<u32>),
    Query,
    Document,
}

/// What scoring needs, prepared once at start: the template's fixed text as token ids and
/// the yes/no words' ids, or why they are not one token each.
pub struct ScoreSetup {
    pieces: Vec<Piece>,
    labels: Result<Arc<[u32]>, String>,
}

impl ScoreSetup {
    /// Tokenizes `template`'s fixed text (the first part with the model's special tokens,
    /// as a prompt is) and the two words with mistral.rs's tokenizer.
    pub async fn prepare(
        mistral: &SharedMistralRsState,
        template: &ScoreTemplate,
        yes: &str,
        no: &str,
    ) -> anyhow::Result<Self> {
        let mut pieces = Vec::with_capacity(template.parts.len());
        for (i, part) in template.parts.iter().enumerate() {
            pieces.push(match part {
                Part::Text(t) => {
                    Piece::Ids(tokenize(mistral, t, i == 0).await.map_err(|e| {
                        anyhow::anyhow!("tokenizing --score-template: {}", e.message)
                    })?)
                }
                Part::Query => Piece::Query,
                Part::Document => Piece::Document,
            });
        }
        let mut ids = Vec::with_capacity(2);
        let mut problem = None;
        for (flag, word) in [("--score-yes", yes), ("--score-no", no)] {
            let got = tokenize(mistral, word, false)
                .await
                .map_err(|e| anyhow::anyhow!("tokenizing {flag}: {}", e.message))?;
            match got[..] {
                [id] => ids.push(id),
                _ => {
                    problem.get_or_insert(format!(
                        "{flag} {word:?} is {} tokens of this model, not one: start the server \
                         with --score-yes and --score-no set to single-token words (mind the \
                         leading space, e.g. \" yes\")",
                        got.len()
                    ));
                }
            }
        }
        if problem.is_none() && ids[0] == ids[1] {
            problem = Some("--score-yes and --score-no are the same token".into());
        }
        if let Some(p) = &problem {
            tracing::warn!("/v1/score and /v1/rerank are off: {p}");
        }
        Ok(Self {
            pieces,
            labels: match problem {
                None => Ok(ids.into()),
                Some(p) => Err(p),
            },
        })
    }

    /// The yes and no ids, or a 400 saying why scoring is off.
    pub(super) fn labels(&self) -> Result<Arc<[u32]>, ApiError> {
        self.labels
            .clone()
            .map_err(|p| ApiError::invalid(None, format!("scoring is off on this server: {p}")))
    }

    /// The ids of one pair: the template's pieces with the query's and the document's ids.
    pub(super) fn join(&self, query: &[u32], document: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Ids(ids) => out.extend_from_slice(ids),
                Piece::Query => out.extend_from_slice(query),
                Piece::Document => out.extend_from_slice(document),
            }
        }
        out
    }

    /// Which slot opens the prompt, if one does (it then takes the model's special tokens):
    /// `(query first, document first)`.
    pub(super) fn slot_first(&self) -> (bool, bool) {
        match self.pieces.first() {
            Some(Piece::Query) => (true, false),
            Some(Piece::Document) => (false, true),
            _ => (false, false),
        }
    }

    /// Tokens the template adds to a pair.
    pub(super) fn fixed_tokens(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Ids(ids) => ids.len(),
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_splits_at_its_two_slots() {
        let t = ScoreTemplate::parse("Q: {query}\nD: {document}\nA:").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Text("Q: ".into()),
                Part::Query,
                Part::Text("\nD: ".into()),
                Part::Document,
                Part::Text("\nA:".into()),
            ]
        );
        let t = ScoreTemplate::parse("{document}{query}").unwrap();
        assert_eq!(t.parts, vec![Part::Document, Part::Query]);
        assert!(ScoreTemplate::parse(DEFAULT_TEMPLATE).is_ok());
    }

    #[test]
    fn a_template_without_each_slot_once_is_refused() {
        for bad in ["{query}", "{document}", "{query}{query}{document}", "none"] {
            let err = ScoreTemplate::parse(bad).unwrap_err();
            assert!(err.contains("exactly once"), "{bad}: {err}");
        }
    }
}
