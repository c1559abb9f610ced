//! A stored prompt that goes on where a new prompt's exact prefix ends: the blocks stored
//! after the prefix's last one, followed block by block while most of their runs of
//! [`GRAM`] ids occur in the rest of the new prompt (a near duplicate of a stored prompt:
//! words replaced, inserted or removed). Decoder blend reuse aligns the new prompt with
//! them (`hook::decoder_blend`) and takes their K/V where the ids agree.
//!
//! Only RAM is searched (the links from a block to the blocks stored after it are kept in
//! RAM, [`PrefixStore`]'s `children`: the 8 most recent of each block).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::PrefixKv;

use super::{join_rows, Block, Piece, PrefixStore};

/// The K/V of a stored prompt at the positions after a new prompt's exact prefix.
#[derive(Debug, Clone)]
pub struct Continuation {
    /// First position it covers (a block boundary, at or before the exact prefix's end).
    pub start: usize,
    /// Its ids at positions `start..start + ids.len()`.
    pub ids: Vec<u32>,
    /// Per layer, K (after RoPE) and V `[1, kv_heads, ids.len(), head_dim]`.
    pub layers: Vec<(Tensor, Tensor)>,
}

/// Smallest share of a block's runs of [`GRAM`] ids that must occur in the rest of the new
/// prompt for the block to be followed.
const MIN_AGREEMENT: f64 = 0.5;
/// Ids per run compared between a stored block and the new prompt.
const GRAM: usize = 4;
/// Stored positions followed beyond the new prompt's length (insertions in the stored one).
const BEYOND: usize = 64;

/// A hash of each run of [`GRAM`] ids of `ids`.
fn grams(ids: &[u32]) -> impl Iterator<Item = u64> + '_ {
    ids.windows(GRAM).map(|w| {
        w.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
            (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

impl PrefixStore {
    /// Like [`PrefixStore::lookup`], and also the stored prompt that continues the prefix
    /// with the rest of `toks`' content, when one goes on past the exact prefix.
    pub fn lookup_near(&self, toks: &[u32]) -> Result<Option<(PrefixKv, Option<Continuation>)>> {
        let Some(chain) = self.chain(toks) else {
            return Ok(None);
        };
        let prefix = self.answer(&chain)?;
        let b = self.block_tokens;
        let shapes = chain.pieces.first().map(|(p, _)| p.shapes.clone());
        // the block at the chain's end: the partial one, else the best child of the last
        let mut pieces: Vec<Piece> = Vec::new();
        let mut pos = chain.whole;
        let mut parent = chain.last_whole;
        let rest: std::collections::HashSet<u64> = grams(&toks[chain.whole..]).collect();
        while pos < toks.len() + BEYOND {
            let Some((key, block)) = self.best_child(parent, &rest) else {
                break;
            };
            if shapes.as_ref() != Some(&block.shapes) || block.tokens.len() != b {
                break;
            }
            pieces.push((block, 0..b));
            parent = key;
            pos += b;
        }
        if pos <= prefix.len {
            return Ok(Some((prefix, None)));
        }
        let ids: Vec<u32> = pieces
            .iter()
            .flat_map(|(blk, _)| blk.tokens.iter().copied())
            .collect();
        let layers = join_rows(&pieces, b)?;
        let cont = Continuation {
            start: chain.whole,
            ids,
            layers,
        };
        Ok(Some((prefix, Some(cont))))
    }

    /// The stored child of `parent` (in RAM) with the most runs of ids in `rest` (the new
    /// prompt's), if at least [`MIN_AGREEMENT`] of its runs are.
    fn best_child(
        &self,
        parent: u64,
        rest: &std::collections::HashSet<u64>,
    ) -> Option<(u64, Arc<Block>)> {
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
        let (prefix, cont) = store.lookup_near(&asked).unwrap().expect("a prefix");
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
        let (prefix, cont) = store.lookup_near(&asked).unwrap().expect("a prefix");
        assert_eq!(prefix.len, 4);
        assert!(cont.is_none());
        // nothing stored at all: no answer
        assert!(store.lookup_near(&[9, 9, 9, 9, 9]).unwrap().is_none());
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
        let (prefix, cont) = store.lookup_near(&asked).unwrap().expect("a prefix");
        assert_eq!(prefix.len, 17);
        let cont = cont.expect("a continuation");
        assert_eq!(cont.start, 16);
        // followed to the stored prompt's end
        assert_eq!(cont.ids, stored[16..].to_vec());
    }
}
