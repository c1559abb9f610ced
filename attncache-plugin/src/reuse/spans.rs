//! Content alignment across stored inputs: which stored positions a new input's positions take
//! when it shares runs of tokens with one or several stored inputs at any offsets (a revised
//! document whose length changed, a chunk that is the tail of one stored chunk and the head of
//! the next).
//!
//! The runs come from the token-run index ([`crate::lookup::span_index`]); [`cover`] picks,
//! longest first, the runs that cover the input, from at most a few stored inputs, and maps
//! every position onto the stored inputs laid end to end. Positions no run covers are
//! *differing*: a blend hit recomputes them from the first layer on.

/// A run of tokens the input shares with a stored input: `query[q_start..q_start + len] ==
/// stored[s_start..s_start + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The stored input's key.
    pub key: u64,
    /// The stored input's length in tokens.
    pub stored_len: usize,
    /// Where the run starts in the input.
    pub q_start: usize,
    /// Where it starts in the stored input.
    pub s_start: usize,
    /// Its length in tokens.
    pub len: usize,
}

/// How an input's positions map onto the stored inputs it shares runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanCover {
    /// The stored inputs taken, `(key, length)`, in the order their positions are laid end to
    /// end (the one covering most positions first).
    pub entries: Vec<(u64, usize)>,
    /// For each input position, the position in the stored inputs laid end to end that it
    /// takes.
    pub source: Vec<u32>,
    /// Input positions no run covers (sorted): recomputed.
    pub differing: Vec<usize>,
}

impl SpanCover {
    /// Whether every position maps onto itself in a single stored input of the same length.
    pub fn is_identity(&self) -> bool {
        self.entries.len() == 1
            && self.entries[0].1 == self.source.len()
            && self
                .source
                .iter()
                .enumerate()
                .all(|(i, s)| *s as usize == i)
    }
}

/// Runs shorter than this are not taken: a few shared tokens say nothing of their context.
pub const MIN_RUN: usize = 8;

/// Covers an input of `len` tokens with `runs` (any order, overlapping allowed): the longest
/// run first, each taking the positions no longer run took, from at most `max_entries` stored
/// inputs; a run left with fewer than [`MIN_RUN`] free positions is dropped. A position no
/// run covers takes the stored position next to its nearest covered neighbour (it is
/// recomputed, so its stored row only fills a place). `None` when no run is taken.
pub fn cover(len: usize, runs: &[Run], max_entries: usize) -> Option<SpanCover> {
    let mut runs: Vec<Run> = runs
        .iter()
        .copied()
        .filter(|r| {
            r.len >= MIN_RUN && r.q_start + r.len <= len && r.s_start + r.len <= r.stored_len
        })
        .collect();
    // longest first; ties by input position, then key (deterministic)
    runs.sort_by(|a, b| {
        b.len
            .cmp(&a.len)
            .then(a.q_start.cmp(&b.q_start))
            .then(a.key.cmp(&b.key))
            .then(a.s_start.cmp(&b.s_start))
    });
    // owner[i]: (entry slot, stored position)
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; len];
    let mut entries: Vec<(u64, usize)> = Vec::new();
    let mut taken = Vec::new();
    for r in &runs {
        let free = (r.q_start..r.q_start + r.len)
            .filter(|&i| owner[i].is_none())
            .count();
        if free < MIN_RUN {
            continue;
        }
        let slot = match entries.iter().position(|(k, _)| *k == r.key) {
            Some(s) => s,
            None if entries.len() < max_entries => {
                entries.push((r.key, r.stored_len));
                taken.push(0usize);
                entries.len() - 1
            }
            None => continue,
        };
        for t in 0..r.len {
            let i = r.q_start + t;
            if owner[i].is_none() {
                owner[i] = Some((slot, r.s_start + t));
                taken[slot] += 1;
            }
        }
    }
    if entries.is_empty() {
        return None;
    }
    // the entry covering most positions first (a single-entry cover keeps its own offsets)
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| taken[b].cmp(&taken[a]).then(a.cmp(&b)));
    let mut offset = vec![0usize; entries.len()];
    let mut at = 0;
    for &slot in &order {
        offset[slot] = at;
        at += entries[slot].1;
    }
    let place = |slot: usize, pos: usize| (offset[slot] + pos.min(entries[slot].1 - 1)) as u32;
    let mut source = vec![0u32; len];
    let mut differing = Vec::new();
    for i in 0..len {
        match owner[i] {
            Some((slot, pos)) => source[i] = place(slot, pos),
            None => {
                differing.push(i);
                let left = (0..i).rev().find_map(|j| owner[j].map(|o| (o, i - j)));
                source[i] = match left {
                    Some(((slot, pos), d)) => place(slot, pos + d),
                    None => {
                        let right = (i + 1..len).find_map(|j| owner[j].map(|o| (o, j - i)));
                        match right {
                            Some(((slot, pos), d)) => place(slot, pos.saturating_sub(d)),
                            None => 0,
                        }
                    }
                };
            }
        }
    }
    Some(SpanCover {
        entries: order.iter().map(|&s| entries[s]).collect(),
        source,
        differing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(key: u64, stored_len: usize, q_start: usize, s_start: usize, len: usize) -> Run {
        Run {
            key,
            stored_len,
            q_start,
            s_start,
            len,
        }
    }

    #[test]
    fn one_stored_input_at_an_offset_covers_an_insertion() {
        // 40 tokens inserted at 20 of a 100-token input: runs 0..20 and 60..140
        let runs = [run(1, 100, 0, 0, 20), run(1, 100, 60, 20, 80)];
        let c = cover(140, &runs, 4).expect("a cover");
        assert_eq!(c.entries, vec![(1, 100)]);
        assert_eq!(c.differing, (20..60).collect::<Vec<_>>());
        assert_eq!(c.source[..20], (0..20).collect::<Vec<u32>>()[..]);
        assert_eq!(c.source[60..], (20..100).collect::<Vec<u32>>()[..]);
        assert!(c.source.iter().all(|&s| s < 100));
        assert!(!c.is_identity());
    }

    #[test]
    fn the_tail_of_one_input_and_the_head_of_the_next_are_laid_end_to_end() {
        // input = stored A[30..50] + stored B[0..25]; B covers more, so it comes first
        let runs = [run(7, 50, 0, 30, 20), run(9, 60, 20, 0, 25)];
        let c = cover(45, &runs, 4).expect("a cover");
        assert_eq!(c.entries, vec![(9, 60), (7, 50)]);
        assert!(c.differing.is_empty());
        let want: Vec<u32> = (60 + 30..60 + 50).chain(0..25).collect();
        assert_eq!(c.source, want);
    }

    #[test]
    fn a_longer_run_wins_overlaps_and_short_leftovers_are_dropped() {
        let runs = [
            run(1, 100, 0, 0, 50),
            run(2, 100, 45, 0, 12), // 5 free positions left: dropped
            run(3, 100, 10, 0, 5),  // shorter than MIN_RUN
        ];
        let c = cover(57, &runs, 4).expect("a cover");
        assert_eq!(c.entries, vec![(1, 100)]);
        assert_eq!(c.differing, (50..57).collect::<Vec<_>>());
    }

    #[test]
    fn at_most_max_entries_are_taken() {
        let runs = [
            run(1, 30, 0, 0, 30),
            run(2, 30, 30, 0, 20),
            run(3, 30, 50, 0, 10),
        ];
        let c = cover(60, &runs, 2).expect("a cover");
        assert_eq!(c.entries.len(), 2);
        assert_eq!(c.differing, (50..60).collect::<Vec<_>>());
        assert!(cover(60, &[], 2).is_none());
    }

    #[test]
    fn the_same_input_covers_itself_as_the_identity() {
        let c = cover(20, &[run(5, 20, 0, 0, 20)], 4).expect("a cover");
        assert!(c.is_identity());
        assert!(c.differing.is_empty());
    }
}
