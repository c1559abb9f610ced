//! Text sets for the tools: loading them, and near-duplicate variants of them.

use std::path::PathBuf;

use anyhow::Context;

/// Reads texts from JSON (strings or `{"text": …}` objects) or plain lines; drops empty ones.
pub fn load_texts(paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for p in paths {
        let raw = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        match serde_json::from_str::<serde_json::Value>(&raw) {
            Ok(serde_json::Value::Array(items)) => {
                for item in items {
                    let text = item
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| item["text"].as_str().map(str::to_string));
                    out.extend(text);
                }
            }
            _ => out.extend(raw.lines().map(str::to_string)),
        }
    }
    out.retain(|t| !t.trim().is_empty());
    Ok(out)
}

/// Replaces the middle word of `text` with `word` (a one-word edit that usually keeps the
/// token count).
pub fn one_word_variant(text: &str, word: &str) -> String {
    replace_word(text, 0.5, word)
}

/// Replaces the word at fraction `at` (0: first, 1: last) of `text`'s words with `word`.
pub fn replace_word(text: &str, at: f64, word: &str) -> String {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let i = ((words.len() as f64 * at) as usize).min(words.len().saturating_sub(1));
    if let Some(w) = words.get_mut(i) {
        *w = word;
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_load_from_json_objects_strings_and_lines() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        std::fs::write(
            &a,
            r#"[{"text": "one", "class": 1}, {"text": "", "class": null}, "two"]"#,
        )
        .unwrap();
        let b = dir.path().join("b.txt");
        std::fs::write(&b, "three\n\nfour\n").unwrap();
        assert_eq!(
            load_texts(&[a, b]).unwrap(),
            ["one", "two", "three", "four"]
        );
        assert_eq!(one_word_variant("a b c d", "X"), "a b X d");
        assert_eq!(replace_word("a b c d", 0.0, "X"), "X b c d");
        assert_eq!(replace_word("a b c d", 1.0, "X"), "a b c X");
        assert_eq!(replace_word("", 0.5, "X"), "");
    }
}
