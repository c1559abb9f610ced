//! The near-duplicate pairs of the trust stage, in six kinds, each built with a fixed seed
//! from data no calibration saw before: short reviews with one word swapped, documents of
//! review sentences with one replaced, mined SpamAssassin spam and ham near-duplicates,
//! insertions and deletions, several edits per document, and long documents with one span
//! edited.

use attncache_benches::workloads::default_data_dir;

/// One pair: `also_stored` then `stored` are recorded, `served` is asked with the flag off and
/// on.
#[derive(Debug, Clone)]
pub(super) struct Pair {
    pub kind: &'static str,
    pub stored: Vec<u32>,
    /// Further inputs stored before it (a revised chunk's other old chunks), usually none.
    pub also_stored: Vec<Vec<u32>>,
    pub served: Vec<u32>,
}

/// The kinds, in the order the stage serves them: six drawn with the seed, then the real
/// revision stream (`--trust-revisions`, the same pairs whatever the seed).
pub(super) const KINDS: [&str; 7] = [
    "short-word",
    "sentence",
    "mined",
    "indel",
    "multi-edit",
    "long",
    "revisions",
];

/// A small deterministic generator (SplitMix64): the pairs must be the same on every run and
/// machine, and the workspace has no `rand` of its own to pin.
pub(super) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}

/// The sentiment fixtures' review texts (`make fetch-data`), yelp, imdb and amazon.
fn reviews() -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for f in ["yelp", "imdb", "amazon"] {
        let path = default_data_dir()
            .join("sentiment")
            .join(format!("{f}.json"));
        let rows: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("{} (make fetch-data): {e}", path.display()))?,
        )?;
        out.extend(
            rows.iter()
                .filter_map(|r| r["text"].as_str())
                .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" ")),
        );
    }
    Ok(out)
}

const SWAPS: [&str; 6] = ["really", "very", "truly", "quite", "so", "rather"];

/// Everything the kinds are built from.
pub(super) struct Sources<'a> {
    pub tok: &'a tokenizers::Tokenizer,
    /// SpamAssassin emails as token ids (each starts with the BOS token).
    pub emails: &'a [(String, Vec<u32>)],
    /// Mined near-duplicate email pairs `(stored, served, differing)` at `mined_tokens`.
    pub mined: &'a [(usize, usize, usize)],
    pub mined_tokens: usize,
}

impl Sources<'_> {
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tok
            .encode(format!("title: none | text: {text}"), true)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec())
    }
}

/// `per_kind` pairs of every kind (`long` of them for the long kind; the mined kind as many
/// as the corpus has, up to `per_kind`).
pub(super) fn build(
    src: &Sources<'_>,
    per_kind: usize,
    long: usize,
    seed: u64,
) -> anyhow::Result<Vec<Pair>> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let texts = reviews()?;
    // short reviews with one word swapped for an intensifier
    let short: Vec<&String> = texts
        .iter()
        .filter(|t| (12..=40).contains(&t.split(' ').count()))
        .collect();
    let mut order: Vec<usize> = (0..short.len()).collect();
    shuffle(&mut order, &mut rng);
    for &i in order.iter().take(per_kind) {
        let words: Vec<&str> = short[i].split(' ').collect();
        let mut edited = words.clone();
        let at = rng.range(0, words.len());
        edited[at] = SWAPS[rng.range(0, SWAPS.len())];
        out.push(Pair {
            kind: "short-word",
            stored: src.encode(&words.join(" "))?,
            also_stored: Vec::new(),
            served: src.encode(&edited.join(" "))?,
        });
    }
    // documents of 8 review sentences (100-300 tokens), one replaced by another of about the
    // same number of words
    let sentences: Vec<&String> = texts
        .iter()
        .filter(|t| (6..=30).contains(&t.split(' ').count()))
        .collect();
    while out.iter().filter(|p| p.kind == "sentence").count() < per_kind {
        let picks: Vec<&String> = (0..8)
            .map(|_| sentences[rng.range(0, sentences.len())])
            .collect();
        let at = rng.range(0, 8);
        let words = picks[at].split(' ').count();
        let Some(other) = (0..200)
            .map(|_| sentences[rng.range(0, sentences.len())])
            .find(|s| s.split(' ').count().abs_diff(words) <= 2 && *s != picks[at])
        else {
            continue;
        };
        let stored = src.encode(
            &picks
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )?;
        let mut edited = picks.clone();
        edited[at] = other;
        let served = src.encode(
            &edited
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )?;
        if (100..=300).contains(&stored.len()) {
            out.push(Pair {
                kind: "sentence",
                stored,
                also_stored: Vec::new(),
                served,
            });
        }
    }
    // mined near-duplicate emails, spam and ham
    for &(a, b, _) in src.mined.iter().take(per_kind) {
        out.push(Pair {
            kind: "mined",
            stored: src.emails[a].1[..src.mined_tokens].to_vec(),
            also_stored: Vec::new(),
            served: src.emails[b].1[..src.mined_tokens].to_vec(),
        });
    }
    // token-level edits of windows of the email stream (BOS first)
    let bos = src.emails[0].1[0];
    let stream: Vec<u32> = src
        .emails
        .iter()
        .flat_map(|(_, ids)| ids[1..].iter().copied())
        .collect();
    let window = |rng: &mut Rng, len: usize| {
        let at = rng.range(0, stream.len() - len);
        let mut doc = vec![bos];
        doc.extend_from_slice(&stream[at..at + len - 1]);
        doc
    };
    // insertions and deletions of 1-8 tokens (within the length slack), 128-1024 tokens
    for i in 0..per_kind {
        let len = rng.range(128, 1025);
        let doc = window(&mut rng, len);
        let k = rng.range(1, 9);
        let at = rng.range(1, len - k);
        let mut served = doc[..at].to_vec();
        if i % 2 == 0 {
            let filler = window(&mut rng, k + 1);
            served.extend_from_slice(&filler[1..]);
            served.extend_from_slice(&doc[at..]);
        } else {
            served.extend_from_slice(&doc[at + k..]);
        }
        out.push(Pair {
            kind: "indel",
            stored: doc,
            also_stored: Vec::new(),
            served,
        });
    }
    // 2-4 spans of 1-12 tokens replaced, 256-1536 tokens
    for _ in 0..per_kind {
        let len = rng.range(256, 1537);
        let doc = window(&mut rng, len);
        let mut served = doc.clone();
        for _ in 0..rng.range(2, 5) {
            let k = rng.range(1, 13);
            let at = rng.range(1, len - k);
            let filler = window(&mut rng, k + 1);
            served[at..at + k].copy_from_slice(&filler[1..]);
        }
        out.push(Pair {
            kind: "multi-edit",
            stored: doc,
            also_stored: Vec::new(),
            served,
        });
    }
    // long documents, 512/1024/2048 tokens, one 16-token span replaced anywhere in the middle
    // three quarters
    for i in 0..long {
        let len = [512usize, 1024, 2048][i % 3];
        let doc = window(&mut rng, len);
        let mut served = doc.clone();
        let at = rng.range(len / 8, 7 * len / 8 - 16);
        let filler = window(&mut rng, 17);
        served[at..at + 16].copy_from_slice(&filler[1..]);
        out.push(Pair {
            kind: "long",
            stored: doc,
            also_stored: Vec::new(),
            served,
        });
    }
    Ok(out)
}

/// Fisher-Yates with `rng`.
pub(super) fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.range(0, i + 1));
    }
}
