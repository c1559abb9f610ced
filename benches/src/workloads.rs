//! The evaluation's workloads: labelled texts split into a warm-up store, a calibration
//! split and a test split.
//!
//! - `spam`: SpamAssassin emails (`scripts/fetch-spam`), subject and body as plain text.
//!   Spam campaigns send many variants of one template, so it is the redundant workload.
//! - `sentiment-template`: the npm `sentiment` fixtures (imdb, yelp, amazon) inside a fixed
//!   instruction template, the paper's prefill-only setting.
//! - `sentiment`: the same sentences as raw texts, the diverse workload.
//! - `sentiment-variants`: near-duplicate traffic (edited resubmissions, query logs):
//!   most served inputs are one- or two-word edits of a stored sentence, the rest new
//!   sentences. Its near-duplicates are made by editing, not found in the data.

use std::path::Path;

use anyhow::Context;
use attncache_server::train_head::{load_examples, Example};

/// EmbeddingGemma's prompt for classification inputs.
pub const CLASSIFY_PREFIX: &str = "task: classification | query: ";
/// The fixed instruction template of the `sentiment-template` workload.
pub const TEMPLATE: &str = "Read the customer review below and decide whether the customer was \
satisfied or not, answering positive or negative. Review: {} Answer:";

/// `$ATTNCACHE_DATA_DIR`, else `~/.cache/attncache/data` (where `make fetch-data` and
/// `make fetch-spam` put the data sets).
pub fn default_data_dir() -> std::path::PathBuf {
    std::env::var_os("ATTNCACHE_DATA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/attncache/data")
        })
}

/// Whether a workload is expected to contain near-duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Full of near-duplicates (edited resubmissions, campaign variants).
    Redundant,
    /// A shared template or genre around distinct content (similar, not near-duplicate).
    Templated,
    /// Distinct inputs.
    Diverse,
}

/// One workload, split three ways.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short name (`spam`, `sentiment-template`, `sentiment`).
    pub name: String,
    /// Redundant or diverse.
    pub kind: Kind,
    /// Text put before every input.
    pub prefix: String,
    /// Inputs whose maps are recorded before serving (the warm-up), and the head's training set.
    pub store: Vec<Example>,
    /// Inputs that choose the similarity threshold (also in the head's training set).
    pub calib: Vec<Example>,
    /// Inputs served and measured.
    pub test: Vec<Example>,
}

/// Sizes of the three splits.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Warm-up store.
    pub store: usize,
    /// Calibration.
    pub calib: usize,
    /// Test.
    pub test: usize,
}

impl Sizes {
    fn total(&self) -> usize {
        self.store + self.calib + self.test
    }
}

/// Sentences of the three fixtures, in the order: one of each file in turn.
fn sentiment_examples(dir: &Path) -> anyhow::Result<Vec<Example>> {
    let files = ["imdb", "yelp", "amazon"]
        .iter()
        .map(|f| load_examples(&dir.join(format!("{f}.json"))))
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("sentiment fixtures in {} (make fetch-data)", dir.display()))?;
    let longest = files.iter().map(Vec::len).max().unwrap_or(0);
    Ok((0..longest)
        .flat_map(|i| files.iter().filter_map(move |f| f.get(i).cloned()))
        .collect())
}

/// Splits `all` by stride so every split samples the whole list: of every `total` items in
/// turn, the first `store` go to the store, the next `calib` to calibration, the rest to test.
fn strided_split(all: Vec<Example>, sizes: Sizes) -> anyhow::Result<[Vec<Example>; 3]> {
    let total = sizes.total();
    anyhow::ensure!(
        all.len() >= total,
        "need {total} examples, the data has {}",
        all.len()
    );
    let step = all.len() / total;
    let picked: Vec<Example> = all.into_iter().step_by(step).take(total).collect();
    let mut out: [Vec<Example>; 3] = Default::default();
    let sizes = [sizes.store, sizes.calib, sizes.test];
    for (i, e) in picked.into_iter().enumerate() {
        // the split furthest behind its share so far takes the item (largest remainder)
        let behind = |k: usize| ((i + 1) * sizes[k]) as f64 / total as f64 - out[k].len() as f64;
        let k = (0..3)
            .max_by(|&a, &b| behind(a).total_cmp(&behind(b)))
            .unwrap_or(2);
        out[k].push(e);
    }
    Ok(out)
}

/// The sentiment sentences as raw texts (diverse) or inside `template` (`{}` marks the text).
pub fn sentiment(
    dir: &Path,
    name: &str,
    kind: Kind,
    prefix: &str,
    template: Option<&str>,
    sizes: Sizes,
) -> anyhow::Result<Workload> {
    let all = sentiment_examples(dir)?
        .into_iter()
        .map(|e| Example {
            text: template.map_or(e.text.clone(), |t| t.replace("{}", &e.text)),
            label: e.label,
        })
        .collect();
    let [store, calib, test] = strided_split(all, sizes)?;
    Ok(Workload {
        name: name.to_string(),
        kind,
        prefix: prefix.to_string(),
        store,
        calib,
        test,
    })
}

/// Share of a near-duplicate workload's test (and calibration) inputs that edit a stored
/// input.
pub const VARIANT_SHARE: f64 = 0.75;
/// Edits of `spam-variants` fall within an email's first this many words, which the
/// 256-token cut keeps.
pub const SPAM_EDIT_WORDS: usize = 120;

/// Sizes of the fresh (never stored) calibration and test inputs of a near-duplicate workload.
fn fresh_sizes(sizes: Sizes) -> Sizes {
    Sizes {
        store: sizes.store,
        calib: sizes.calib - (sizes.calib as f64 * VARIANT_SHARE).round() as usize,
        test: sizes.test - (sizes.test as f64 * VARIANT_SHARE).round() as usize,
    }
}

/// Near-duplicate traffic (edited resubmissions, query logs): the store holds sentences;
/// calibration and test inputs are, for [`VARIANT_SHARE`] of them, a stored sentence with
/// one or two words replaced by words of other sentences (keeping its label), and otherwise
/// sentences never stored. Deterministic.
pub fn sentiment_variants(dir: &Path, prefix: &str, sizes: Sizes) -> anyhow::Result<Workload> {
    let fresh = fresh_sizes(sizes);
    let [store, calib, test] = strided_split(sentiment_examples(dir)?, fresh)?;
    near_duplicates(
        "sentiment-variants",
        prefix,
        store,
        calib,
        test,
        sizes,
        usize::MAX,
    )
}

/// Spam-campaign traffic: stored SpamAssassin emails, and served emails that are, for
/// [`VARIANT_SHARE`] of them, a stored email with one or two words of its first
/// [`SPAM_EDIT_WORDS`] replaced (a name, a number, a link), the rest newer emails.
pub fn spam_variants(dir: &Path, prefix: &str, sizes: Sizes) -> anyhow::Result<Workload> {
    let base = spam(dir, prefix, fresh_sizes(sizes))?;
    near_duplicates(
        "spam-variants",
        prefix,
        base.store,
        base.calib,
        base.test,
        sizes,
        SPAM_EDIT_WORDS,
    )
}

/// Builds a near-duplicate workload: calibration edits the even-numbered stored inputs and
/// test the odd-numbered ones (one or two words each, within the first `edit_within` words,
/// replaced by words of the fresh inputs); the fresh inputs are spread among the edits.
fn near_duplicates(
    name: &str,
    prefix: &str,
    store: Vec<Example>,
    fresh_calib: Vec<Example>,
    fresh_test: Vec<Example>,
    sizes: Sizes,
    edit_within: usize,
) -> anyhow::Result<Workload> {
    let words: Vec<String> = fresh_calib
        .iter()
        .chain(&fresh_test)
        .flat_map(|e| e.text.split_whitespace())
        .filter(|w| w.chars().all(|c| c.is_alphabetic()) && w.len() >= 3)
        .map(str::to_string)
        .collect();
    anyhow::ensure!(!words.is_empty(), "no replacement words");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut variant = |e: &Example| {
        let mut text = e.text.clone();
        for _ in 0..1 + (next() % 2) {
            let n = text.split_whitespace().count().max(1);
            let i = (next() as usize) % n.min(edit_within);
            let word = &words[(next() as usize) % words.len()];
            text = attncache_server::texts::replace_word(&text, i as f64 / n as f64, word);
        }
        Example {
            text,
            label: e.label.clone(),
        }
    };
    let n_calib = sizes.calib - fresh_calib.len();
    let n_test = sizes.test - fresh_test.len();
    let mut calib: Vec<Example> = store
        .iter()
        .step_by(2)
        .take(n_calib)
        .map(&mut variant)
        .collect();
    let mut test: Vec<Example> = store
        .iter()
        .skip(1)
        .step_by(2)
        .take(n_test)
        .map(&mut variant)
        .collect();
    interleave(&mut calib, fresh_calib);
    interleave(&mut test, fresh_test);
    Ok(Workload {
        name: name.to_string(),
        kind: Kind::Redundant,
        prefix: prefix.to_string(),
        store,
        calib,
        test,
    })
}

/// Inserts `extra` evenly among `items`.
fn interleave(items: &mut Vec<Example>, extra: Vec<Example>) {
    let n = items.len() + extra.len();
    let mut out = Vec::with_capacity(n);
    let (mut a, mut b) = (std::mem::take(items).into_iter(), extra.into_iter());
    let k = b.len();
    for i in 0..n {
        let take_extra = k > 0 && (i * k / n) != ((i + 1) * k / n);
        match if take_extra { b.next() } else { a.next() } {
            Some(e) => out.push(e),
            None => out.extend(a.next().or_else(|| b.next())),
        }
    }
    *items = out;
}

/// One raw email of the corpus.
#[derive(Debug, serde::Deserialize)]
struct RawEmail {
    id: String,
    group: String,
    text: String,
}

/// SpamAssassin emails. From every group, the first (oldest) emails in proportion to the
/// group's size; each group's share is split in time order: older emails warm the store,
/// newer ones are served (a cache warmed on yesterday's mail serving today's).
pub fn spam(dir: &Path, prefix: &str, sizes: Sizes) -> anyhow::Result<Workload> {
    let mut groups: Vec<Vec<RawEmail>> = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("spam-assassin at {} (scripts/fetch-spam)", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.path())
        .collect();
    names.sort();
    for group in names {
        let mut files: Vec<_> = std::fs::read_dir(&group)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let emails = files
            .iter()
            .map(|p| {
                let raw = std::fs::read_to_string(p)?;
                serde_json::from_str::<RawEmail>(&raw).with_context(|| p.display().to_string())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        groups.push(emails);
    }
    let all: usize = groups.iter().map(Vec::len).sum();
    anyhow::ensure!(
        all >= sizes.total(),
        "need {} emails, found {all}",
        sizes.total()
    );
    let (mut store, mut calib, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for g in &mut groups {
        g.sort_by(|a, b| a.id.cmp(&b.id));
        let share = |n: usize| (n * g.len()).div_ceil(all);
        let (s, c, t) = (share(sizes.store), share(sizes.calib), share(sizes.test));
        let label = |e: &RawEmail| {
            if e.group.starts_with("spam") {
                "spam"
            } else {
                "ham"
            }
        };
        for (i, e) in g.iter().take(s + c + t).enumerate() {
            let ex = Example {
                text: email_text(&e.text),
                label: label(e).to_string(),
            };
            if i < s {
                store.push(ex)
            } else if i < s + c {
                calib.push(ex)
            } else {
                test.push(ex)
            }
        }
    }
    store.truncate(sizes.store);
    calib.truncate(sizes.calib);
    test.truncate(sizes.test);
    Ok(Workload {
        name: "spam".into(),
        kind: Kind::Templated,
        prefix: prefix.to_string(),
        store,
        calib,
        test,
    })
}

/// The readable text of a raw email: its subject and body, with quoted-printable decoded,
/// HTML tags and entities removed, MIME part headers, boundaries and base64 lines dropped,
/// and whitespace collapsed.
pub fn email_text(raw: &str) -> String {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
    let mut subject = String::new();
    let mut in_subject = false;
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if in_subject {
                subject.push(' ');
                subject.push_str(line.trim());
            }
            continue;
        }
        let value = line
            .get(..8)
            .filter(|h| h.eq_ignore_ascii_case("subject:"))
            .and_then(|_| line.get(8..));
        in_subject = value.is_some();
        if let Some(v) = value {
            subject = v.trim().to_string();
        }
    }
    let body = if raw.to_ascii_lowercase().contains("quoted-printable") {
        decode_quoted_printable(body)
    } else {
        body.to_string()
    };
    let kept: Vec<&str> = body
        .lines()
        .filter(|l| {
            let t = l.trim();
            let lower = t.to_ascii_lowercase();
            !(t.starts_with("--")
                || lower.starts_with("content-")
                || lower.starts_with("mime-version")
                || (t.len() >= 60 && !t.contains(' ')))
        })
        .collect();
    let text = strip_html(&kept.join("\n"));
    let body: Vec<&str> = text.split_whitespace().collect();
    format!("Subject: {subject}\n{}", body.join(" "))
}

/// Quoted-printable: soft line breaks removed, `=XX` decoded (invalid escapes kept as is).
fn decode_quoted_printable(s: &str) -> String {
    let s = s.replace("=\n", "");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes tags, `<style>`/`<script>` contents and comments; decodes the common entities.
fn strip_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let lower = s.to_ascii_lowercase();
    let mut i = 0;
    while i < s.len() {
        let rest = &lower[i..];
        if rest.starts_with("<style") || rest.starts_with("<script") {
            let close = if rest.starts_with("<style") {
                "</style>"
            } else {
                "</script>"
            };
            i += rest.find(close).map_or(rest.len(), |j| j + close.len());
        } else if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(rest.len(), |j| j + 3);
        } else if rest.starts_with('<') {
            match rest.find('>') {
                Some(j) => {
                    i += j + 1;
                    out.push(' ');
                }
                None => {
                    out.push('<');
                    i += 1;
                }
            }
        } else {
            let next = rest.find('<').unwrap_or(rest.len());
            out.push_str(&s[i..i + next]);
            i += next;
        }
    }
    out.replace("&nbsp;", " ")
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_text_keeps_subject_and_readable_body() {
        let raw = "From: a@b\nSubject: Cheap\n  pills now\nContent-Type: text/html\n\
Content-Transfer-Encoding: quoted-printable\n\n<html><style>p {color: red}</style>\
<body><p>Buy =3D now&nbsp;&amp; save=\n big</p><!-- hidden --></body></html>\n\
------=_NextPart_000\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\n";
        assert_eq!(
            email_text(raw),
            "Subject: Cheap pills now\nBuy = now & save big"
        );
    }

    #[test]
    fn email_without_body_or_subject_is_still_text() {
        assert_eq!(email_text("From: x"), "Subject: \n");
        assert_eq!(
            email_text("From: éé\nSubjéct: no\nSubject: oui é\n\nç"),
            "Subject: oui é\nç"
        );
        assert_eq!(
            email_text("Subject: hi\n\nplain   body\n"),
            "Subject: hi\nplain body"
        );
    }

    #[test]
    fn quoted_printable_keeps_invalid_escapes_and_utf8() {
        assert_eq!(decode_quoted_printable("a=3Db =ZZ c=C3=A9="), "a=b =ZZ cé=");
    }

    fn ex(i: usize) -> Example {
        Example {
            text: i.to_string(),
            label: (i % 2).to_string(),
        }
    }

    #[test]
    fn strided_split_spreads_every_split_over_the_data() {
        let all: Vec<Example> = (0..100).map(ex).collect();
        let sizes = Sizes {
            store: 6,
            calib: 1,
            test: 3,
        };
        let [s, c, t] = strided_split(all, sizes).unwrap();
        assert_eq!((s.len(), c.len(), t.len()), (6, 1, 3));
        let firsts: Vec<usize> = [&s, &c, &t]
            .iter()
            .map(|v| v[0].text.parse().unwrap())
            .collect();
        // all three start early and end late in the data: no split is one block
        assert!(firsts.iter().all(|&f| f < 70), "{firsts:?}");
        assert!(t.last().unwrap().text.parse::<usize>().unwrap() >= 80);
        assert!(strided_split((0..5).map(ex).collect(), sizes).is_err());
    }
}
