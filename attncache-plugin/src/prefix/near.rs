//! Stored prompts that go on where a new prompt's exact prefix ends, for decoder blend
//! reuse (`hook::decoder_blend` aligns the new prompt with them and takes their K/V where
//! the ids agree):
//!
//! - the blocks stored after the prefix's last one, followed block by block while most of
//!   their runs of [`GRAM`] ids occur in the rest of the new prompt (a near duplicate of a
//!   stored prompt: words replaced, inserted or removed);
//! - where that stops short, a block stored anywhere whose ids occur as they are further on
//!   in the new prompt (the store's content index), followed the same way: a document
//!   that recurs after another query, a paragraph moved by a long insertion. Each such
//!   span is anchored where its first block's ids occur, and its stored positions are
//!   kept, so moved keys can be rotated to their new positions.
//!
//! Only RAM is searched (the links from a block to the blocks stored after it are kept in
//! RAM, [`PrefixStore`]'s `children`: the 8 most recent of each block).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::PrefixKv;

use super::block::Shapes;
use super::{content_key, join_rows, Block, Piece, PrefixStore};

/// Stored K/V for the positions after a new prompt's exact prefix: one or more spans of
/// stored prompts, laid end to end.
#[derive(Debug, Clone)]
pub struct Continuation {
    /// First position of the new prompt it is aligned from (a block boundary, at or before
    /// the exact prefix's end).
    pub start: usize,
    /// The spans' stored ids, end to end.
    pub ids: Vec<u32>,
    /// Per layer, K (after RoPE) and V `[1, kv_heads, ids.len(), head_dim]`.
    pub layers: Vec<(Tensor, Tensor)>,
    /// The spans, in the order of the new prompt's positions (at least one).
    pub spans: Vec<Span>,
}

/// A run of one stored prompt's blocks in a [`Continuation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The new prompt's position its first row is anchored at; it is aligned with the new
    /// prompt from there up to the next span's anchor.
    pub at: usize,
    /// Its rows in [`Continuation::ids`] and [`Continuation::layers`].
    pub rows: Range<usize>,
    /// The position its first row had in its stored prompt (its keys carry RoPE for it).
    pub stored_at: usize,
    /// Found by content further on (the content index), not as the stored prompt that
    /// continues the exact prefix.
    pub by_content: bool,
}

/// Smallest share of a block's runs of [`GRAM`] ids that must occur in the rest of the new
/// prompt for the block to be followed.
const MIN_AGREEMENT: f64 = 0.5;
/// Ids per run compared between a stored block and the new prompt.
const GRAM: usize = 4;
/// Stored positions followed beyond the new prompt's length (insertions in the stored one).
const BEYOND: usize = 64;
/// Most spans found by content in one lookup.
const MAX_JUMPS: usize = 8;

/// A hash of each run of [`GRAM`] ids of `ids`.
fn grams(ids: &[u32]) -> impl Iterator<Item = u64> + '_ {
    ids.windows(GRAM).map(|w| {
        w.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
            (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

impl PrefixStore {
    /// The K/V of `toks`' longest stored prefix (as [`PrefixStore::lookup`]: `None` when
    /// not even its first block is stored), and the stored prompts that go on past it with
    /// the rest of `toks`' content, when any do (with no prefix, those found by content
    /// from the first position on).
    pub fn lookup_near(&self, toks: &[u32]) -> Result<(Option<PrefixKv>, Option<Continuation>)> {
        let chain = self.chain(toks);
        let prefix = chain.as_ref().map(|c| self.answer(c)).transpose()?;
        let b = self.block_tokens;
        let whole = chain.as_ref().map_or(0, |c| c.whole);
        let mut shapes = chain
            .as_ref()
            .and_then(|c| c.pieces.first())
            .map(|(p, _)| p.shapes.clone());
        let rest: HashSet<u64> = grams(&toks[whole..]).collect();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut spans: Vec<Span> = Vec::new();
        // the blocks stored after the prefix's last whole one
        if let (Some(chain), Some(shapes)) = (&chain, &shapes) {
            let followed = self.follow(chain.last_whole, &rest, shapes, toks.len() - whole);
            if !followed.is_empty() {
                spans.push(Span {
                    at: whole,
                    rows: 0..followed.len() * b,
                    stored_at: whole,
                    by_content: false,
                });
                pieces.extend(followed.into_iter().map(|blk| (blk, 0..b)));
            }
        }
        // further on, blocks stored anywhere whose ids occur as they are
        let mut covered = whole + pieces.len() * b;
        while spans.len() < MAX_JUMPS {
            let Some((at, key, first, stored_at)) = self.seen_at(toks, covered, shapes.as_ref())
            else {
                break;
            };
            let like = shapes.get_or_insert_with(|| first.shapes.clone());
            let more = self.follow(key, &rest, like, (toks.len() - at).saturating_sub(b));
            let n = (1 + more.len()) * b;
            let from = pieces.len() * b;
            spans.push(Span {
                at,
                rows: from..from + n,
                stored_at,
                by_content: true,
            });
            pieces.push((first, 0..b));
            pieces.extend(more.into_iter().map(|blk| (blk, 0..b)));
            covered = at + n;
        }
        // nothing stored goes on past the exact prefix
        let end = spans.iter().map(|s| s.at + s.rows.len()).max().unwrap_or(0);
        if end <= prefix.as_ref().map_or(0, |p| p.len) {
            return Ok((prefix, None));
        }
        let ids: Vec<u32> = pieces
            .iter()
            .flat_map(|(blk, _)| blk.tokens.iter().copied())
            .collect();
        let layers = join_rows(&pieces, b)?;
        let cont = Continuation {
            start: whole,
            ids,
            layers,
            spans,
        };
        Ok((prefix, Some(cont)))
    }

    /// The stored blocks after block `parent`, each the best child of the one before (see
    /// [`PrefixStore::best_child`]), for up to `want` positions (plus [`BEYOND`]).
    fn follow(
        &self,
        mut parent: u64,
        rest: &HashSet<u64>,
        shapes: &Shapes,
        want: usize,
    ) -> Vec<Arc<Block>> {
        let b = self.block_tokens;
        let mut out = Vec::new();
        while out.len() * b < want + BEYOND {
            let Some((key, block)) = self.best_child(parent, rest) else {
                break;
            };
            if block.shapes != *shapes || block.tokens.len() != b {
                break;
            }
            out.push(block);
            parent = key;
        }
        out
    }

    /// The first position from `from` on where a whole stored block's ids occur in `toks`
    /// (the content index; RAM only), with that block's key, the block and its position in
    /// its stored prompt; with `shapes`, only a block of those layer shapes.
    fn seen_at(
        &self,
        toks: &[u32],
        from: usize,
        shapes: Option<&Shapes>,
    ) -> Option<(usize, u64, Arc<Block>, usize)> {
        let b = self.block_tokens;
        (from..=toks.len().checked_sub(b)?).find_map(|at| {
            let run = &toks[at..at + b];
            let (key, stored_at) = self.content.get(&content_key(run))?;
            // a block evicted since, or a hash collision: no match
            let block = self
                .blocks
                .get(&key)
                .filter(|blk| blk.tokens == run && shapes.is_none_or(|s| blk.shapes == *s))?;
            Some((at, key, block, stored_at))
        })
    }

    /// The stored child of `parent` (in RAM) with the most runs of ids in `rest` (the new
    /// prompt's), if at least [`MIN_AGREEMENT`] of its runs are.
    fn best_child(&self, parent: u64, rest: &HashSet<u64>) -> Option<(u64, Arc<Block>)> {
        let children = self.children.get(&parent)?;
        children
            .iter()
            .filter_map(|&key| {
                let b = self.blocks.get(&key).filter(|b| b.parent == parent)?;
                let runs = b.tokens.len().saturating_sub(GRAM - 1);
                let agree = grams(&b.tokens).filter(|g| rest.contains(g)).count();
                let needed = (runs as f64 * MIN_AGREEMENT).ceil() as usize;
                (agree >= needed.max(1)).then_some((key, b, agree))
            })
            .max_by_key(|(_, _, agree)| *agree)
            .map(|(key, b, _)| (key, b))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::kv;
    use super::*;

    #[test]
    fn a_stored_prompt_edited_in_place_is_followed_past_the_edit() {
        let store = PrefixStore::new(1 << 30, 16, "m");
        // stored: 66 ids (four whole blocks stored)
        let stored: Vec<u32> = (100..166).collect();
        store.insert(&stored, &kv(2, &stored)).unwrap();
        // asked: the same with id 20 replaced; 68 ids
        let mut asked: Vec<u32> = (100..168).collect();
        asked[20] = 7;
        let (prefix, cont) = store.lookup_near(&asked).unwrap();
        let prefix = prefix.expect("a prefix");
        // the exact prefix: the first block, then the partial one up to the edit
        assert_eq!(prefix.len, 20);
        let cont = cont.expect("a continuation");
        assert_eq!(cont.start, 16);
        assert_eq!(cont.ids, stored[16..64].to_vec());
        // its K/V are the stored prompt's at those positions, exactly
        for ((k, v), (wk, wv)) in cont.layers.iter().zip(&kv(2, &stored)) {
            for (t, w) in [(k, wk), (v, wv)] {
                let w = w.narrow(2, 16, 48).unwrap();
                let d = (t - w).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn a_stored_prompt_that_differs_everywhere_after_the_prefix_is_no_continuation() {
        let store = PrefixStore::new(1 << 30, 4, "m");
        let stored: Vec<u32> = (0..16).collect();
        store.insert(&stored, &kv(1, &stored)).unwrap();
        let mut asked: Vec<u32> = (0..4).collect();
        asked.extend(50..62);
        let (prefix, cont) = store.lookup_near(&asked).unwrap();
        let prefix = prefix.expect("a prefix");
        assert_eq!(prefix.len, 4);
        assert!(cont.is_none());
        // nothing stored at all: no answer
        let (prefix, cont) = store.lookup_near(&[9, 9, 9, 9, 9]).unwrap();
        assert!(prefix.is_none() && cont.is_none());
    }
}

#[cfg(test)]
mod by_content {
    use super::super::tests::kv;
    use super::*;

    /// A head, a query and a document, as a reranker's prompt.
    fn prompt(query: std::ops::Range<u32>, doc: &[u32]) -> Vec<u32> {
        let mut p: Vec<u32> = (1..9).collect();
        p.extend(query);
        p.extend(doc);
        p
    }

    #[test]
    fn a_document_stored_after_another_query_is_found_at_its_new_offset() {
        let store = PrefixStore::new(1 << 30, 8, "m");
        let doc: Vec<u32> = (500..540).collect();
        // stored: head (8 ids), a query of 13 ids, the document
        let stored = prompt(100..113, &doc);
        store.insert(&stored, &kv(1, &stored)).unwrap();
        // asked: the same head, another query of 19 ids, the same document
        let asked = prompt(200..219, &doc);
        let (prefix, cont) = store.lookup_near(&asked).unwrap();
        let prefix = prefix.expect("a prefix");
        assert_eq!(prefix.len, 8);
        let cont = cont.expect("a continuation");
        // the stored prompt's first whole block inside the document: stored position 24
        // (document ids 503..), where the asked prompt has them at 30
        let span = &cont.spans[0];
        assert!(span.by_content);
        assert_eq!((span.at, span.stored_at), (30, 24));
        assert_eq!(cont.ids[span.rows.clone()], stored[24..56]);
        // its K/V are the stored prompt's at those stored positions, exactly
        let (k, _) = &cont.layers[0];
        let want = kv(1, &stored)[0].0.narrow(2, 24, 32).unwrap();
        let got = k.narrow(2, span.rows.start, span.rows.len()).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn with_no_stored_prefix_a_document_is_found_from_the_first_position() {
        let store = PrefixStore::new(1 << 30, 8, "m");
        let doc: Vec<u32> = (500..540).collect();
        let mut stored: Vec<u32> = (100..113).collect();
        stored.extend(&doc);
        store.insert(&stored, &kv(1, &stored)).unwrap();
        // another query first: not even the first block is stored
        let mut asked: Vec<u32> = (200..205).collect();
        asked.extend(&doc);
        let (prefix, cont) = store.lookup_near(&asked).unwrap();
        assert!(prefix.is_none());
        let cont = cont.expect("a continuation");
        assert_eq!(cont.start, 0);
        // stored position 16 (document id 503) sits at 8 in the asked prompt
        let span = &cont.spans[0];
        assert_eq!((span.at, span.stored_at, span.by_content), (8, 16, true));
        assert_eq!(cont.ids[span.rows.clone()], stored[16..48]);
    }

    #[test]
    fn a_block_that_left_the_store_is_no_match_and_no_error() {
        let store = PrefixStore::new(1 << 30, 8, "m");
        let doc: Vec<u32> = (500..540).collect();
        let stored = prompt(100..113, &doc);
        store.insert(&stored, &kv(1, &stored)).unwrap();
        // the document's blocks leave RAM; the content index still names them
        let keys: Vec<u64> = store
            .blocks
            .iter()
            .filter(|(_, blk)| blk.tokens.iter().any(|t| *t >= 500))
            .map(|(k, _)| *k)
            .collect();
        assert!(!keys.is_empty());
        for k in keys {
            store.blocks.invalidate(&k);
        }
        let asked = prompt(200..219, &doc);
        let (prefix, cont) = store.lookup_near(&asked).unwrap();
        let prefix = prefix.expect("a prefix");
        assert_eq!(prefix.len, 8);
        assert!(cont.is_none(), "{cont:?}");
    }
}

#[cfg(test)]
mod shifted {
    use super::super::tests::kv;
    use super::*;

    #[test]
    fn a_stored_prompt_is_followed_past_an_insertion() {
        let store = PrefixStore::new(1 << 30, 8, "m");
        let stored: Vec<u32> = (100..164).collect();
        store.insert(&stored, &kv(1, &stored)).unwrap();
        // three ids inserted after position 16: every later id sits 3 positions on
        let mut asked: Vec<u32> = stored[..17].to_vec();
        asked.extend([7, 8, 9]);
        asked.extend(&stored[17..]);
        let (prefix, cont) = store.lookup_near(&asked).unwrap();
        let prefix = prefix.expect("a prefix");
        assert_eq!(prefix.len, 17);
        let cont = cont.expect("a continuation");
        assert_eq!(cont.start, 16);
        // followed to the stored prompt's end
        assert_eq!(cont.ids, stored[16..].to_vec());
    }
}
