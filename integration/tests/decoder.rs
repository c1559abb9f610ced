//! A decoder LLM served prefill-only: the tiny generated llama GGUF through the real
//! `attncache-server` binary, `POST /v1/classify` over label words, and every error a
//! client can cause answered 400 without harm.

use std::process::Command;

use serde_json::{json, Value};

use crate::common::Server;

/// The tiny decoder written to a fresh directory, removed on drop.
struct TinyDecoder {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl TinyDecoder {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = attncache_server::tiny_decoder::write(dir.path(), 11).expect("write decoder");
        Self { dir, path }
    }

    fn start(&self, extra: &[&str]) -> Server {
        let _ = self.dir.path();
        start_file(&self.path, extra)
    }
}

/// attncache-server on the decoder file `path`, on a free port, with `extra` flags.
fn start_file(path: &std::path::Path, extra: &[&str]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_attncache-server"));
    command
        .arg("--model")
        .arg(path)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(extra);
    Server::start_command(command)
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .post(format!("{}{path}", server.base))
        .json(body)
        .send()
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn probs(v: &Value) -> Vec<Vec<f64>> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            d["probs"]
                .as_array()
                .expect("probs")
                .iter()
                .map(|p| p.as_f64().expect("prob"))
                .collect()
        })
        .collect()
}

#[test]
fn a_decoder_classifies_by_label_words_and_a_batch_equals_its_inputs_alone() {
    let model = TinyDecoder::new();
    let server = model.start(&[]);
    let labels = ["good", "bad", "boring"];
    let texts = [
        "the movie was really",
        "the food at this place was not",
        "the plot of this book is very very",
    ];
    let (status, batch) = post(
        &server,
        "/v1/classify",
        &json!({"input": texts, "labels": labels, "logprobs": true}),
    );
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["object"], "list");
    assert_eq!(batch["model"], "tiny-decoder");
    let batch_probs = probs(&batch);
    assert_eq!(batch_probs.len(), 3);
    for (i, (p, d)) in batch_probs
        .iter()
        .zip(batch["data"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(d["index"], i);
        assert_eq!(d["num_classes"], 3);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{p:?}");
        let best = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(d["label"], labels[best]);
        // log-probabilities under the whole vocabulary: negative, and in the same order
        let lp: Vec<f64> = d["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(lp.iter().all(|x| *x < 0.0), "{lp:?}");
        let ratio = (lp[0] - lp[1]).exp();
        assert!(
            (ratio - p[0] / p[1]).abs() <= 1e-3 * ratio.max(1.0),
            "{lp:?} {p:?}"
        );
    }
    assert!(batch["usage"]["prompt_tokens"].as_u64().unwrap() >= 12);
    // without logprobs the output head computes the labels' rows only: the same
    // probabilities, no logprobs, and /info counts the forwards that did so
    let heads_before = info(&server)["label_row_heads"].as_u64().unwrap();
    let (status, labels_only) = post(
        &server,
        "/v1/classify",
        &json!({"input": texts, "labels": labels}),
    );
    assert_eq!(status, 200, "{labels_only}");
    for (i, (a, b)) in probs(&labels_only).iter().zip(&batch_probs).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-5,
                "input {i}: label rows {x}, whole head {y}"
            );
        }
        assert!(
            labels_only["data"][i].get("logprobs").is_none(),
            "{labels_only}"
        );
    }
    assert!(
        info(&server)["label_row_heads"].as_u64().unwrap() > heads_before,
        "the label rows path did not run"
    );
    // the inputs differ: so do their answers (the last position of each is read)
    assert_ne!(batch_probs[0], batch_probs[1]);
    for (i, text) in texts.iter().enumerate() {
        let (status, one) = post(
            &server,
            "/v1/classify",
            &json!({"input": text, "labels": labels}),
        );
        assert_eq!(status, 200, "{one}");
        for (a, b) in probs(&one)[0].iter().zip(&batch_probs[i]) {
            assert!(
                (a - b).abs() <= 1e-5,
                "input {i}: alone {a}, in the batch {b}"
            );
        }
    }
    // the same request again: the same answer
    let (_, again) = post(
        &server,
        "/v1/classify",
        &json!({"input": texts, "labels": labels, "logprobs": true}),
    );
    assert_eq!(probs(&again), batch_probs);
    let (status, info) = (
        200,
        reqwest::blocking::get(format!("{}/info", server.base))
            .unwrap()
            .json::<Value>()
            .unwrap(),
    );
    assert_eq!(status, 200);
    assert_eq!(info["model_kind"], "decoder");
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["max_input_length"], 256);
    let health = reqwest::blocking::get(format!("{}/health", server.base)).unwrap();
    assert!(health.status().is_success());
}

#[test]
fn bad_decoder_requests_get_a_400_naming_the_field() {
    let model = TinyDecoder::new();
    let server = model.start(&[]);
    let long = vec!["the"; 300].join(" ");
    let cases = [
        (
            json!({"input": "the movie", "labels": ["good", "great movie"]}),
            "labels",
            "not one",
        ),
        (
            json!({"input": "the movie", "labels": []}),
            "labels",
            "1 to",
        ),
        (
            json!({"input": "the movie", "labels": ["good", "good"]}),
            "labels",
            "same token",
        ),
        (json!({"input": "the movie"}), "labels", "required"),
        (
            json!({"input": long, "labels": ["good", "bad"]}),
            "input",
            "over the model's context",
        ),
        (
            json!({"input": [], "labels": ["good", "bad"]}),
            "input",
            "1 to",
        ),
        (
            json!({"input": "the movie", "labels": ["good"], "model": "gpt-4"}),
            "model",
            "does not exist",
        ),
    ];
    for (body, param, says) in cases {
        let (status, err) = post(&server, "/v1/classify", &body);
        assert!(status == 400 || status == 404, "{body}: {status} {err}");
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    }
    let (status, err) = post(&server, "/v1/embeddings", &json!({"input": "the movie"}));
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "unsupported_for_model");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("decoder"));
    // nothing above harmed the server
    let (status, ok) = post(
        &server,
        "/v1/classify",
        &json!({"input": "the movie", "labels": ["good", "bad"]}),
    );
    assert_eq!(status, 200, "{ok}");
}

#[test]
fn a_decoder_with_embedding_only_flags_is_refused_at_start() {
    let model = TinyDecoder::new();
    let out = Command::new(env!("CARGO_BIN_EXE_attncache-server"))
        .arg("--model")
        .arg(&model.path)
        .args(["--port", "0", "--error-gate", "config/gate-default.json"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--error-gate") && stderr.contains("decoder"),
        "{stderr}"
    );
}

/// `/v1/classify` on `texts` (one request) and then each text alone: the probabilities.
fn classify_all(server: &Server, texts: &[&str], labels: &[&str]) -> Vec<Vec<f64>> {
    let (status, v) = post(
        server,
        "/v1/classify",
        &json!({"input": texts, "labels": labels}),
    );
    assert_eq!(status, 200, "{v}");
    let mut all = probs(&v);
    for text in texts {
        let (status, v) = post(
            server,
            "/v1/classify",
            &json!({"input": text, "labels": labels}),
        );
        assert_eq!(status, 200, "{v}");
        all.extend(probs(&v));
    }
    all
}

fn info(server: &Server) -> Value {
    reqwest::blocking::get(format!("{}/info", server.base))
        .expect("info")
        .json()
        .expect("info json")
}

const TEXTS: [&str; 4] = [
    "the movie was really",
    "the food at this place was not good and the service was slow so we left before the end",
    "a",
    "the plot of this book is very very long and the end is not what i wanted but the words are good",
];
const LABELS: [&str; 3] = ["good", "bad", "boring"];

#[test]
fn fast_equals_stock_on_f32_weights_and_its_kernel_ran() {
    // f32 weights: both modes multiply the same f32 matrices; only the attention kernel differs
    let dir = tempfile::tempdir().expect("tempdir");
    let path = attncache_server::tiny_decoder::write_with(
        dir.path(),
        5,
        attncache_server::tiny_decoder::TinyWeights::F32,
    )
    .expect("write decoder");
    let start = |mode: &str| start_file(&path, &["--exact-attention", mode]);
    let stock = start("stock");
    let stock_probs = classify_all(&stock, &TEXTS, &LABELS);
    let stock_info = info(&stock);
    assert_eq!(stock_info["exact_attention"], "stock");
    assert_eq!(stock_info["attention_calls"]["fast"], 0, "{stock_info}");
    // stock keeps mistral.rs's own output head, every row
    assert_eq!(stock_info["label_row_heads"], 0, "{stock_info}");
    drop(stock);
    let fast = start("fast");
    let fast_probs = classify_all(&fast, &TEXTS, &LABELS);
    let fast_info = info(&fast);
    assert_eq!(fast_info["exact_attention"], "fast");
    assert_eq!(fast_info["weights"], "f32, dequantized once at load");
    // every prefill layer went through our kernel: 2 layers x (1 batch + 4 single) calls at least
    let fast_calls = fast_info["attention_calls"]["fast"].as_u64().unwrap();
    assert!(fast_calls >= 10, "{fast_info}");
    // and every output head computed the labels' rows only (1 batch + 4 single forwards)
    let heads = fast_info["label_row_heads"].as_u64().unwrap();
    assert!(heads >= 5, "{fast_info}");
    for (i, (f, s)) in fast_probs.iter().zip(&stock_probs).enumerate() {
        for (a, b) in f.iter().zip(s) {
            assert!((a - b).abs() <= 1e-5, "input {i}: fast {f:?}, stock {s:?}");
        }
    }
}

#[test]
fn fast_on_quantized_weights_is_the_exactly_dequantized_model() {
    // Q4_1 weights: fast multiplies them dequantized exactly, in f32; stock rounds the
    // activations to 8 bits in every matmul (as llama.cpp does), a different function
    let quantized = TinyDecoder::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let dequantized = attncache_server::tiny_decoder::write_with(
        dir.path(),
        11, // TinyDecoder's seed: the same weights
        attncache_server::tiny_decoder::TinyWeights::Dequantized,
    )
    .expect("write decoder");
    let fast = quantized.start(&[]);
    let fast_probs = classify_all(&fast, &TEXTS, &LABELS);
    assert_eq!(info(&fast)["weights"], "f32, dequantized once at load");
    drop(fast);
    let reference = start_file(&dequantized, &["--exact-attention", "stock"]);
    let reference_probs = classify_all(&reference, &TEXTS, &LABELS);
    drop(reference);
    for (i, (f, r)) in fast_probs.iter().zip(&reference_probs).enumerate() {
        for (a, b) in f.iter().zip(r) {
            assert!(
                (a - b).abs() <= 1e-5,
                "input {i}: fast {f:?}, dequantized model {r:?}"
            );
        }
    }
    let stock = quantized.start(&["--exact-attention", "stock"]);
    let stock_probs = classify_all(&stock, &TEXTS, &LABELS);
    assert_eq!(
        info(&stock)["weights"],
        "quantized as in the file (8-bit activations per matmul)"
    );
    let worst = fast_probs
        .iter()
        .zip(&stock_probs)
        .flat_map(|(f, s)| f.iter().zip(s).map(|(a, b)| (a - b).abs()))
        .fold(0.0f64, f64::max);
    eprintln!("largest |fast - stock| probability on Q4_1 weights: {worst:.3e}");
    assert!(
        worst > 1e-5,
        "stock computed what fast did: were the activations not rounded?"
    );
}

#[test]
fn a_qwen2_decoder_runs_the_fast_path_exactly_with_its_biases() {
    use attncache_server::tiny_decoder::{write_arch, TinyArch, TinyWeights};
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |sub: &str, weights| {
        write_arch(&dir.path().join(sub), 13, weights, TinyArch::Qwen2).expect("write qwen2")
    };
    let (quantized, dequantized) = (
        write("q", TinyWeights::Quantized),
        write("d", TinyWeights::Dequantized),
    );
    // fast on the Q4_1 file: the exactly dequantized model (biases included), our kernels ran
    let fast = start_file(&quantized, &[]);
    let fast_probs = classify_all(&fast, &TEXTS, &LABELS);
    let fast_info = info(&fast);
    assert_eq!(fast_info["architecture"], "qwen2", "{fast_info}");
    assert_eq!(fast_info["weights"], "f32, dequantized once at load");
    assert!(
        fast_info["attention_calls"]["fast"].as_u64() >= Some(10),
        "{fast_info}"
    );
    let reference = start_file(&dequantized, &["--exact-attention", "stock"]);
    let reference_probs = classify_all(&reference, &TEXTS, &LABELS);
    drop(reference);
    for (i, (f, r)) in fast_probs.iter().zip(&reference_probs).enumerate() {
        for (a, b) in f.iter().zip(r) {
            assert!(
                (a - b).abs() <= 1e-5,
                "input {i}: fast {f:?}, dequantized {r:?}"
            );
        }
    }
    // and its prefix reuse is exact as well
    let shared = words("the", 60);
    let second = format!("{shared} food was bad");
    let (exact, _, _) = classify_one(&fast, &second, false);
    classify_one(&fast, &format!("{shared} movie was good"), true);
    let (got, outcome, reused) = classify_one(&fast, &second, true);
    assert_eq!(outcome, "prefix_hit");
    assert!(reused >= 48, "reused {reused}");
    assert_close(&got, &exact, "qwen2 prefix reuse");
}

#[test]
fn token_id_inputs_are_read_exactly_and_checked() {
    let model = TinyDecoder::new();
    let server = model.start(&[]);
    let vocab = attncache_server::tiny_decoder::vocabulary();
    let id = |w: &str| {
        vocab
            .iter()
            .position(|t| *t == format!("▁{w}"))
            .expect("a word of the vocabulary") as u32
    };
    let words = ["the", "movie", "was", "really"];
    let (status, as_text) = post(
        &server,
        "/v1/classify",
        &json!({"input": words.join(" "), "labels": LABELS}),
    );
    assert_eq!(status, 200, "{as_text}");
    // the text's tokens: the words, after the special tokens the tokenizer adds (if any)
    let read = as_text["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(read == words.len() || read == words.len() + 1, "{as_text}");
    let mut ids: Vec<u32> = words.iter().map(|w| id(w)).collect();
    if read > words.len() {
        ids.insert(0, 1); // <s>
    }
    let other: Vec<u32> = ["the", "food", "was", "not"]
        .iter()
        .map(|w| id(w))
        .collect();
    let (status, as_ids) = post(
        &server,
        "/v1/classify",
        &json!({"input": [ids.clone(), other.clone()], "labels": LABELS}),
    );
    assert_eq!(status, 200, "{as_ids}");
    assert_eq!(
        as_ids["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids.len() + other.len()
    );
    let (text_probs, id_probs) = (probs(&as_text), probs(&as_ids));
    for (a, b) in text_probs[0].iter().zip(&id_probs[0]) {
        assert!((a - b).abs() <= 1e-6, "{text_probs:?} {id_probs:?}");
    }
    assert_ne!(id_probs[0], id_probs[1]);
    let (status, one) = post(
        &server,
        "/v1/classify",
        &json!({"input": ids, "labels": LABELS}),
    );
    assert_eq!(status, 200, "{one}");
    // alone vs in a batch of two: the same function, summed in another order
    for (a, b) in probs(&one)[0].iter().zip(&id_probs[0]) {
        assert!((a - b).abs() <= 1e-6, "alone {a}, in the batch {b}");
    }
    for (body, says) in [
        (
            json!({"input": [5, 9999999], "labels": LABELS}),
            "beyond the vocabulary",
        ),
        (json!({"input": [[]], "labels": LABELS}), "empty"),
    ] {
        let (status, err) = post(&server, "/v1/classify", &body);
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["param"], "input", "{err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    }
}

/// A prompt of `n` words of the tiny vocabulary, starting with `lead`.
fn words(lead: &str, n: usize) -> String {
    let pool = [
        "the", "movie", "was", "really", "good", "and", "the", "food", "not", "bad", "very",
        "long", "plot", "book", "end", "words",
    ];
    let mut out = vec![lead.to_string()];
    out.extend((0..n.saturating_sub(1)).map(|i| pool[(i * 7 + 3) % pool.len()].to_string()));
    out.join(" ")
}

fn cache_report(v: &Value, i: usize) -> (String, u64) {
    let r = &v["attn_cache"]["inputs"][i];
    (
        r["outcome"].as_str().unwrap_or_default().to_string(),
        r["prefix_tokens"].as_u64().unwrap_or(u64::MAX),
    )
}

#[test]
fn a_stored_prompt_prefix_is_reused_exactly_and_only_with_the_flag() {
    for mode in ["fast", "stock"] {
        let model = TinyDecoder::new();
        let server = model.start(&["--exact-attention", mode]);
        let shared = words("the", 60);
        // the first prompt's own part is long enough to fill the block the shared part ends in
        let first = format!("{shared} movie was good {}", words("book", 20));
        let second = format!("{shared} food was bad and not good");
        let classify = |text: &str, flag: bool| {
            let (status, v) = post(
                &server,
                "/v1/classify",
                &json!({"input": text, "labels": LABELS, "attn_cache": flag}),
            );
            assert_eq!(status, 200, "{v}");
            v
        };
        // flag off: nothing stored, nothing reused
        let off = classify(&second, false);
        assert_eq!(cache_report(&off, 0), ("off".into(), 0), "{off}");
        let miss = classify(&first, true);
        assert_eq!(cache_report(&miss, 0), ("miss".into(), 0), "{miss}");
        // the second prompt shares the 60 words' tokens with the first: the whole blocks of
        // 16 among them, then the rest of the block they end in (the first prompt stored it)
        let hit = classify(&second, true);
        let (outcome, reused) = cache_report(&hit, 0);
        assert_eq!(outcome, "prefix_hit", "{mode}: {hit}");
        let total = off["usage"]["prompt_tokens"].as_u64().unwrap();
        let shared_tokens = classify(&shared, false)["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap();
        assert!(shared_tokens % 16 != 0, "the shared part ends mid-block");
        assert_eq!(reused, shared_tokens, "{mode}: reused {reused} of {total}");
        for (a, b) in probs(&hit)[0].iter().zip(&probs(&off)[0]) {
            assert!((a - b).abs() <= 1e-5, "{mode}: prefix reuse {a}, exact {b}");
        }
        assert_eq!(
            hit["usage"]["prompt_tokens"], off["usage"]["prompt_tokens"],
            "the whole prompt is counted"
        );
        // the same prompt again: all of it but the last token comes from the store
        let again = classify(&second, true);
        let (outcome, reused_again) = cache_report(&again, 0);
        assert_eq!(outcome, "prefix_hit");
        assert!(reused_again >= reused, "{reused_again} < {reused}");
        for (a, b) in probs(&again)[0].iter().zip(&probs(&off)[0]) {
            assert!((a - b).abs() <= 1e-5, "{mode}: repeat {a}, exact {b}");
        }
        let info = info(&server);
        let store = &info["attn_cache"]["prefix_store"];
        assert_eq!(store["hits"], 2, "{info}");
        // what a deployment scrapes says the same
        let text = reqwest::blocking::get(format!("{}/metrics", server.base))
            .expect("metrics")
            .text()
            .expect("metrics text");
        let metric = |name: &str| crate::common::metric(&text, name);
        assert_eq!(metric("attncache_prefix_hits_total"), 2.0, "{text}");
        assert_eq!(metric("attncache_prefix_misses_total"), 1.0, "{text}");
        assert!(metric("attncache_prefix_blocks") >= 3.0, "{text}");
        let line = |needle: &str| text.lines().any(|l| l.starts_with(needle));
        assert!(
            line("attncache_inputs_total{outcome=\"prefix_hit\"} 2"),
            "{text}"
        );
        // two requests with the flag off: the exact answer and the shared part's length
        assert!(line("attncache_inputs_total{outcome=\"off\"} 2"), "{text}");
        assert!(
            line("attncache_http_requests_total{endpoint=\"classify\",status=\"200\"} 5"),
            "{text}"
        );
        assert!(
            !text.contains("attncache_prefix_cold_"),
            "no cold tier: {text}"
        );
        assert!(store["blocks_held"].as_u64().unwrap() >= 3, "{info}");
        assert_eq!(store["rejected"], 0, "{info}");
    }
}

/// `/v1/score` scores: the `score` of each datum.
fn scores(v: &Value) -> Vec<f64> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| d["score"].as_f64().expect("score"))
        .collect()
}

/// Score words that are one token of the tiny decoder, and a template whose parts tokenize
/// as the whole text does (each part starts a word).
const SCORE_FLAGS: [&str; 6] = [
    "--score-yes",
    "good",
    "--score-no",
    "bad",
    "--score-template",
    "{query}{document}",
];

#[test]
fn score_and_rerank_give_p_yes_of_the_pair_as_classify_does() {
    let model = TinyDecoder::new();
    let server = model.start(&SCORE_FLAGS);
    let query = "the food at this place";
    let docs = [
        "was good",
        "was not good and the service was slow",
        "is bad",
    ];
    let (status, v) = post(
        &server,
        "/v1/score",
        &json!({"text_1": query, "text_2": docs}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    let got = scores(&v);
    assert_eq!(got.len(), 3);
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "score");
    }
    // the same prompt through /v1/classify over the two words: p(good)
    for (doc, s) in docs.iter().zip(&got) {
        let text = format!("{query} {doc}");
        let (status, c) = post(
            &server,
            "/v1/classify",
            &json!({"input": text, "labels": ["good", "bad"]}),
        );
        assert_eq!(status, 200, "{c}");
        let p = probs(&c)[0][0];
        assert!((p - s).abs() <= 1e-5, "{doc}: score {s}, classify {p}");
    }
    assert_ne!(got[0], got[1]);
    // paired form: as many queries as documents
    let (status, paired) = post(
        &server,
        "/v1/score",
        &json!({"text_1": [query, query], "text_2": [docs[0], docs[1]]}),
    );
    assert_eq!(status, 200, "{paired}");
    for (a, b) in scores(&paired).iter().zip(&got) {
        assert!((a - b).abs() <= 1e-6);
    }
    // rerank: the same scores, best first, top_n and documents as asked
    let (status, r) = post(
        &server,
        "/v1/rerank",
        &json!({"query": query, "documents": docs, "top_n": 2}),
    );
    assert_eq!(status, 200, "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by(|&a, &b| got[b].total_cmp(&got[a]));
    for (res, &want) in results.iter().zip(&order) {
        assert_eq!(res["index"], want, "{r}");
        let s = res["relevance_score"].as_f64().unwrap();
        assert!((s - got[want]).abs() <= 1e-6, "{r}");
        assert_eq!(res["document"]["text"], docs[want]);
    }
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() >= 15, "{r}");
    let (status, r) = post(
        &server,
        "/v2/rerank",
        &json!({"query": query, "documents": [{"text": docs[0]}], "return_documents": false}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(r["results"][0].get("document").is_none(), "{r}");
}

#[test]
fn rerank_documents_of_one_query_reuse_its_prefix_exactly() {
    let model = TinyDecoder::new();
    let server = model.start(&SCORE_FLAGS);
    // a query of more than one 16-token block, so that its K/V is stored and found
    let query = "the food at this place was not good and the service was slow so we left before \
                 the end of the night and my friends";
    let docs = ["were happy", "were not happy", "will not be back"];
    let rerank = |docs: &[&str], cache: bool| {
        let (status, r) = post(
            &server,
            "/v1/rerank",
            &json!({"query": query, "documents": docs, "attn_cache": cache}),
        );
        assert_eq!(status, 200, "{r}");
        r
    };
    let score_of = |r: &Value, i: usize| -> f64 {
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["index"] == i)
            .unwrap()["relevance_score"]
            .as_f64()
            .unwrap()
    };
    let exact = rerank(&docs, false);
    assert_eq!(exact["attn_cache"]["inputs"][0]["outcome"], "off");
    // the first document stores the query's prefix; the others then take it
    let first = rerank(&docs[..1], true);
    assert_eq!(
        first["attn_cache"]["inputs"][0]["outcome"], "miss",
        "{first}"
    );
    let rest = rerank(&docs[1..], true);
    for (k, report) in rest["attn_cache"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(report["outcome"], "prefix_hit", "{rest}");
        assert!(report["prefix_tokens"].as_u64().unwrap() >= 16, "{rest}");
        let (a, b) = (score_of(&rest, k), score_of(&exact, k + 1));
        assert!(
            (a - b).abs() <= 1e-5,
            "document {}: reused {a}, exact {b}",
            k + 1
        );
    }
    assert!((score_of(&first, 0) - score_of(&exact, 0)).abs() <= 1e-5);
    // within one request too: the first document runs alone and stores the query's
    // prefix, the others take it (another query, so nothing of it is stored yet)
    let (status, one) = post(
        &server,
        "/v1/rerank",
        &json!({"query": format!("so {query}"), "documents": docs, "attn_cache": true}),
    );
    assert_eq!(status, 200, "{one}");
    let (status, one_exact) = post(
        &server,
        "/v1/rerank",
        &json!({"query": format!("so {query}"), "documents": docs}),
    );
    assert_eq!(status, 200, "{one_exact}");
    let outcomes: Vec<&str> = one["attn_cache"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["miss", "prefix_hit", "prefix_hit"], "{one}");
    for i in 0..docs.len() {
        let (a, b) = (score_of(&one, i), score_of(&one_exact, i));
        assert!(
            (a - b).abs() <= 1e-5,
            "document {i}: one request {a}, exact {b}"
        );
    }
}

#[test]
fn bad_score_and_rerank_requests_get_a_400_and_harm_nothing() {
    let model = TinyDecoder::new();
    let server = model.start(&SCORE_FLAGS);
    let long = vec!["the"; 300].join(" ");
    let cases = [
        (
            "/v1/rerank",
            json!({"query": "", "documents": ["a"]}),
            json!("query"),
        ),
        (
            "/v1/rerank",
            json!({"query": "the food", "documents": []}),
            json!("documents"),
        ),
        (
            "/v1/rerank",
            json!({"query": "the food", "documents": [""]}),
            json!("documents"),
        ),
        (
            "/v1/rerank",
            json!({"query": "the food", "documents": [long]}),
            json!("documents"),
        ),
        (
            "/v1/rerank",
            json!({"query": "the food", "documents": [1]}),
            json!("documents"),
        ),
        (
            "/v1/score",
            json!({"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}),
            json!("text_1"),
        ),
        ("/v1/score", json!({"text_1": "a"}), json!("text_2")),
        (
            "/v1/score",
            json!({"text_1": "a", "text_2": "b", "top_k": 1}),
            Value::Null,
        ),
    ];
    for (path, body, param) in cases {
        let (status, err) = post(&server, path, &body);
        assert_eq!(status, 400, "{path} {body}: {err}");
        assert_eq!(err["error"]["param"], param, "{path} {body}: {err}");
    }
    // a document over the context is cut to fit when asked
    let (status, ok) = post(
        &server,
        "/v1/rerank",
        &json!({"query": "the food", "documents": [long], "truncate": true}),
    );
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["usage"]["prompt_tokens"], 256, "{ok}");
    // the default words are not one token of the tiny model: scoring answers 400 saying so
    let plain = model.start(&[]);
    let (status, err) = post(
        &plain,
        "/v1/score",
        &json!({"text_1": "the food", "text_2": "was good"}),
    );
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--score-yes"),
        "{err}"
    );
    let (status, _) = post(
        &plain,
        "/v1/classify",
        &json!({"input": "the movie", "labels": ["good", "bad"]}),
    );
    assert_eq!(status, 200);
}

#[test]
fn the_cohere_python_sdk_reranks_with_a_decoder_behind_an_api_key() {
    let model = TinyDecoder::new();
    let mut flags = SCORE_FLAGS.to_vec();
    flags.extend(["--api-key", "co-dec"]);
    let server = model.start(&flags);
    let r = crate::common::run_python_client("cohere_client.py", &server.base, "co-dec");
    assert_eq!(r["count"], 2, "{r}");
    let scores: Vec<f64> = serde_json::from_value(r["scores"].clone()).unwrap();
    assert!(scores[0] >= scores[1], "{r}");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{r}");
    assert_eq!(r["bad_request"], 400, "{r}");
    assert_eq!(r["wrong_key"], 401, "{r}");
    // the key guards the decoder's own routes too, under every path they answer on
    let (status, _) = post(
        &server,
        "/v1/classify",
        &json!({"input": "the movie", "labels": ["good", "bad"]}),
    );
    assert_eq!(status, 401);
    for path in ["/score", "/v1/score"] {
        let (status, _) = post(
            &server,
            path,
            &json!({"text_1": "the movie", "text_2": ["good", "bad"]}),
        );
        assert_eq!(status, 401, "{path}");
    }
    for path in ["/rerank", "/v2/rerank"] {
        let (status, _) = post(
            &server,
            path,
            &json!({"query": "the movie", "documents": ["good", "bad"]}),
        );
        assert_eq!(status, 401, "{path}");
    }
}

/// `/v1/classify` of `text` over [`LABELS`] with the cache flag as given: (probs, outcome,
/// prefix tokens).
fn classify_one(server: &Server, text: &str, flag: bool) -> (Vec<f64>, String, u64) {
    let (status, v) = post(
        server,
        "/v1/classify",
        &json!({"input": text, "labels": LABELS, "attn_cache": flag}),
    );
    assert_eq!(status, 200, "{v}");
    let (outcome, reused) = cache_report(&v, 0);
    (probs(&v).remove(0), outcome, reused)
}

/// Waits until the prefix store's cold tier has written every block it stored.
fn wait_for_cold_writes(server: &Server) -> Value {
    let t0 = std::time::Instant::now();
    loop {
        let store = info(server)["attn_cache"]["prefix_store"].clone();
        let (stored, written) = (&store["blocks_stored"], &store["cold"]["writes"]);
        if stored.as_u64() > Some(0) && stored == written {
            return store;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "writes never finished: {store}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= 1e-5, "{what}: {a} vs exact {b}");
    }
}

#[test]
fn prefix_blocks_on_disk_survive_a_restart_and_a_damaged_one_is_a_miss() {
    let model = TinyDecoder::new();
    let cache = tempfile::tempdir().expect("tempdir");
    let flags = ["--cache-dir", cache.path().to_str().expect("utf-8 path")];
    let prompt = words("the", 70);
    let exact = {
        let server = model.start(&flags);
        let (exact, outcome, _) = classify_one(&server, &prompt, false);
        assert_eq!(outcome, "off");
        let (stored, outcome, _) = classify_one(&server, &prompt, true);
        assert_eq!(outcome, "miss");
        assert_close(&stored, &exact, "a miss");
        let store = wait_for_cold_writes(&server);
        assert_eq!(store["cold_tier"], "disk", "{store}");
        exact
    };
    // a new process: the prompt's prefix comes from the files, exactly
    let blocks = cache.path().join("prefix-blocks");
    {
        let server = model.start(&flags);
        let (got, outcome, reused) = classify_one(&server, &prompt, true);
        assert_eq!(outcome, "prefix_hit");
        assert!(reused >= 64, "reused {reused}");
        assert_close(&got, &exact, "prefix from disk");
        let store = info(&server)["attn_cache"]["prefix_store"].clone();
        assert!(store["cold"]["reads"].as_u64() >= Some(4), "{store}");
        assert_eq!(store["cold"]["corrupt"], 0, "{store}");
    }
    // every block file damaged: a miss, the exact answer, the files removed
    let files: Vec<_> = std::fs::read_dir(&blocks)
        .expect("block dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let mut bytes = std::fs::read(f).expect("read block");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(f, bytes).expect("write block");
    }
    let server = model.start(&flags);
    let (got, outcome, reused) = classify_one(&server, &prompt, true);
    assert_eq!((outcome.as_str(), reused), ("miss", 0));
    assert_close(&got, &exact, "after damage");
    let store = info(&server)["attn_cache"]["prefix_store"].clone();
    assert_eq!(
        store["cold"]["corrupt"], 1,
        "the chain ends at its first block: {store}"
    );
    // the miss stored the prompt again: its blocks replace the damaged files
    wait_for_cold_writes(&server);
    drop(server);
    let server = model.start(&flags);
    let (again, outcome, reused) = classify_one(&server, &prompt, true);
    assert_eq!(outcome, "prefix_hit");
    assert!(reused >= 64, "reused {reused}");
    assert_close(&again, &exact, "after repair");
    let store = info(&server)["attn_cache"]["prefix_store"].clone();
    assert_eq!(store["cold"]["corrupt"], 0, "{store}");
}

#[test]
fn replicas_share_prefix_blocks_through_redis_and_a_damaged_one_is_a_miss() {
    use attncache_server::redis_server::RedisServer;
    let redis_server = RedisServer::start().expect("redis-server");
    let url = redis_server.url();
    let model = TinyDecoder::new();
    let flags = ["--cache-backend", "redis", "--redis-url", url.as_str()];
    let prompt = words("the", 70);
    let first = model.start(&flags);
    let (exact, _, _) = classify_one(&first, &prompt, false);
    classify_one(&first, &prompt, true);
    let store = wait_for_cold_writes(&first);
    assert_eq!(store["cold_tier"], "redis", "{store}");
    // another replica (a separate process) takes the prefix the first one computed
    let second = model.start(&flags);
    let (got, outcome, reused) = classify_one(&second, &prompt, true);
    assert_eq!(outcome, "prefix_hit");
    assert!(reused >= 64, "reused {reused}");
    assert_close(&got, &exact, "prefix from Redis");
    // every block value damaged in Redis: a third replica misses and answers exactly
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client.get_connection().expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("attncache:*:pfx:b:*")
        .query(&mut conn)
        .expect("keys");
    assert!(keys.len() >= 4, "{keys:?}");
    for k in &keys {
        let mut v: Vec<u8> = redis::cmd("GET").arg(k).query(&mut conn).expect("get");
        let mid = v.len() / 2;
        v[mid] ^= 0xff;
        let () = redis::cmd("SET")
            .arg(k)
            .arg(v)
            .query(&mut conn)
            .expect("set");
    }
    let third = model.start(&flags);
    let (got, outcome, reused) = classify_one(&third, &prompt, true);
    assert_eq!((outcome.as_str(), reused), ("miss", 0));
    assert_close(&got, &exact, "after damage");
    let store = info(&third)["attn_cache"]["prefix_store"].clone();
    assert_eq!(store["cold"]["corrupt"], 1, "{store}");
    // Redis gone: still the exact answer, from the replica's RAM or computed
    drop(redis_server);
    let (got, _, _) = classify_one(&third, &words("a", 40), true);
    let (want, _, _) = classify_one(&third, &words("a", 40), false);
    assert_close(&got, &want, "with Redis down");
}

/// `/v1/classify` of `text` with the cache flag as given: (probs, the input's report).
fn classify_report(server: &Server, text: &str, flag: bool) -> (Vec<f64>, Value) {
    let (status, v) = post(
        server,
        "/v1/classify",
        &json!({"input": text, "labels": LABELS, "attn_cache": flag}),
    );
    assert_eq!(status, 200, "{v}");
    (probs(&v).remove(0), v["attn_cache"]["inputs"][0].clone())
}

#[test]
fn decoder_blend_past_an_edit_is_exact_when_it_recomputes_everything_and_refusals_are_exact() {
    use attncache_server::tiny_decoder::{write_arch, TinyArch, TinyWeights};
    let model = TinyDecoder::new();
    let qwen_dir = tempfile::tempdir().expect("tempdir");
    let qwen = write_arch(qwen_dir.path(), 13, TinyWeights::Quantized, TinyArch::Qwen2)
        .expect("write qwen2");
    // a stored prompt and the same with one word replaced after its first 40 words
    let head = words("the", 40);
    let tail = words("book", 80);
    let stored = format!("{head} movie was good {tail}");
    let edited = format!("{head} movie was bad {tail}");
    // (flags, what the edited prompt's answer must be)
    let every = ["--decoder-blend-share", "1"];
    let some = ["--decoder-blend-share", "0.1"];
    let none = ["--decoder-blend-max-share", "0"];
    let inserted = format!("{head} movie was really very good {tail}");
    let cases = [
        (every, "every"),
        (some, "some"),
        (none, "refused"),
        (every, "inserted"),
    ];
    for (path, (extra, case)) in [model.path.as_path(), qwen.as_path()]
        .into_iter()
        .flat_map(|p| cases.map(|c| (p, c)))
    {
        // the inserted case: two words more before the stored prompt's tail (it moves)
        let edited = if case == "inserted" {
            &inserted
        } else {
            &edited
        };
        let mut flags = vec!["--reuse", "blend", "--decoder-blend-check-layer", "0"];
        flags.extend(extra);
        let server = start_file(path, &flags);
        let (_, first) = classify_report(&server, &stored, true);
        assert_eq!(first["outcome"], "miss", "{first}");
        let (exact, off) = classify_report(&server, edited, false);
        assert_eq!(off["outcome"], "off");
        let (served, report) = classify_report(&server, edited, true);
        let total = {
            let (_, v) = post(
                &server,
                "/v1/classify",
                &json!({"input": edited, "labels": LABELS}),
            );
            v["usage"]["prompt_tokens"].as_u64().unwrap()
        };
        let prefix = report["prefix_tokens"].as_u64().unwrap();
        assert!(prefix >= 32 && prefix < total - 8, "{case}: {report}");
        let info = info(&server);
        let counts = &info["attn_cache"]["decoder_blend"]["counts"];
        match case {
            "refused" => {
                // more positions would need recomputing than allowed: a plain prefix hit
                assert_eq!(report["outcome"], "prefix_hit", "{report}");
                assert_close(&served, &exact, "refused blend");
                assert_eq!(
                    (&counts["hits"], &counts["refused"]),
                    (&json!(0), &json!(1))
                );
            }
            _ => {
                assert_eq!(report["outcome"], "blend_hit", "{case}: {report}");
                let (recomputed, blended) = (
                    report["recomputed"].as_u64().unwrap(),
                    report["blended"].as_u64().unwrap(),
                );
                assert_eq!(recomputed + blended, total - prefix, "{report}");
                assert_eq!(counts["hits"], 1, "{info}");
                if case == "every" || case == "inserted" {
                    // S is every computed position: the exact answer
                    assert_eq!(blended, 0, "{report}");
                    assert_close(&served, &exact, "blend recomputing every position");
                } else {
                    // the edited word, the positions past the stored prompt's whole blocks,
                    // the last one and a fifth of the rest are recomputed; the others reused
                    assert!(blended > 0 && recomputed > 1, "{report}");
                    assert!(served.iter().all(|p| p.is_finite()), "{served:?}");
                }
            }
        }
        // nothing of a blended forward is stored: the edited prompt is still not a prefix
        let (again, report) = classify_report(&server, edited, true);
        if case != "refused" {
            assert_eq!(report["outcome"], "blend_hit", "{case}: {report}");
            if case == "every" || case == "inserted" {
                assert_close(&again, &exact, "a second blend");
            }
        }
        // what a deployment scrapes says the same
        let text = reqwest::blocking::get(format!("{}/metrics", server.base))
            .expect("metrics")
            .text()
            .expect("metrics text");
        let hits = crate::common::metric(&text, "attncache_decoder_blend_hits_total");
        assert_eq!(
            hits,
            if case == "refused" { 0.0 } else { 2.0 },
            "{case}: {text}"
        );
        if case != "refused" {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("attncache_inputs_total{outcome=\"blend_hit\"} 2")),
                "{text}"
            );
        }
    }
}

#[test]
fn decoder_blend_takes_a_document_stored_after_another_query_and_is_exact_recomputing_all() {
    let model = TinyDecoder::new();
    // a reranker's prompt: a shared head, a query, a document; the document recurs after
    // another query (the query's words are spelt in single characters: no run of them
    // occurs in the document)
    let head = words("the", 40);
    let doc: Vec<&str> = {
        let pool = [
            "movie", "was", "really", "good", "and", "food", "not", "bad", "very",
        ];
        let mut x = 7u64;
        (0..90)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                pool[((x >> 33) % pool.len() as u64) as usize]
            })
            .collect()
    };
    let doc = doc.join(" ");
    // with the head as the exact prefix, and with no prefix at all (another query opens
    // the prompt: not even its first block is stored)
    let cases = [
        ("1", "every", head.as_str()),
        ("0.1", "some", head.as_str()),
        ("1", "every", ""),
        ("0.1", "some", ""),
        ("0.1", "too stale", head.as_str()),
    ];
    for (share, case, head) in cases {
        let stored = format!("{head} q1 x2 z3 k4 q5 x6 : {doc}");
        let asked = format!("{head} a9 b8 c7 d6 e5 f4 g3 h2 : {doc}");
        let mut flags = vec![
            "--reuse",
            "blend",
            "--decoder-blend-check-layer",
            "0",
            "--decoder-blend-share",
            share,
        ];
        if case == "too stale" {
            // no stale deviation is below 0: refused at the check layer
            flags.extend(["--decoder-blend-stale-below", "0"]);
        }
        let server = start_file(&model.path, &flags);
        let (_, first) = classify_report(&server, &stored, true);
        assert_eq!(first["outcome"], "miss", "{first}");
        let (exact, _) = classify_report(&server, &asked, false);
        let (served, report) = classify_report(&server, &asked, true);
        if case == "too stale" {
            // refused at the check layer: computed exactly from there on, and stored whole
            assert_eq!(report["outcome"], "blend_refused", "{report}");
            assert!(
                report["stale_deviation"].as_f64().unwrap() >= 0.0,
                "{report}"
            );
            assert!(report.get("recomputed").is_none(), "{report}");
            assert_close(&served, &exact, "a blend refused at the check layer");
            let counts = &info(&server)["attn_cache"]["decoder_blend"]["counts"];
            assert_eq!(counts["refused_stale"], 1, "{counts}");
            let head_only = report["prefix_tokens"].as_u64().unwrap();
            let (again, report) = classify_report(&server, &asked, true);
            let (_, v) = post(
                &server,
                "/v1/classify",
                &json!({"input": asked, "labels": LABELS}),
            );
            let total = v["usage"]["prompt_tokens"].as_u64().unwrap();
            // every whole block of the prompt is stored now (the last partial one never is)
            let again_prefix = report["prefix_tokens"].as_u64().unwrap();
            assert!(
                again_prefix > head_only && again_prefix + 16 > total,
                "{report}"
            );
            assert_close(&again, &exact, "the refused prompt, stored and asked again");
            continue;
        }
        // the head is the exact prefix; the document comes from the stored prompt at its
        // new offset (its keys rotated there)
        assert_eq!(report["outcome"], "blend_hit", "{case}: {report}");
        let stale = report["stale_deviation"].as_f64().unwrap();
        assert!(stale.is_finite() && stale >= 0.0, "{report}");
        let prefix = report["prefix_tokens"].as_u64().unwrap();
        assert_eq!(prefix == 0, head.is_empty(), "{report}");
        let counts = &info(&server)["attn_cache"]["decoder_blend"]["counts"];
        assert_eq!(counts["found_by_content"], 1, "{counts}");
        let blended = report["blended"].as_u64().unwrap();
        if case == "every" {
            assert_eq!(blended, 0, "{report}");
            assert_close(
                &served,
                &exact,
                "a moved document with every position recomputed",
            );
        } else {
            assert!(blended >= 32, "{report}");
            assert!(served.iter().all(|p| p.is_finite()), "{served:?}");
        }
    }
}

#[test]
fn a_decoder_blend_gate_file_sets_the_policy_refuses_over_its_bound_and_names_its_model() {
    let model = TinyDecoder::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let head = words("the", 40);
    let tail = words("book", 80);
    let stored = format!("{head} movie was good {tail}");
    let edited = format!("{head} movie was bad {tail}");
    let fingerprint = {
        let server = model.start(&[]);
        info(&server)["model_fingerprint"]
            .as_str()
            .expect("model_fingerprint")
            .to_string()
    };
    let gate = |name: &str, fingerprint: &str, stale_below: f64| {
        let path = dir.path().join(name);
        let body = json!({
            "kind": "decoder_blend_stale", "model": {"fingerprint": fingerprint},
            "check_layer": 0, "share": 0.1, "stale_below": stale_below,
            "calibration": {"hits": 0},
        });
        std::fs::write(&path, body.to_string()).expect("write gate");
        path.to_string_lossy().into_owned()
    };
    // a bound no deviation is under refuses (exact past the prefix); a loose one takes the hit
    for (bound, want) in [(0.0, "blend_refused"), (1e9, "blend_hit")] {
        let file = gate("gate.json", &fingerprint, bound);
        let server = model.start(&["--reuse", "blend", "--blend-gate", &file]);
        let (_, first) = classify_report(&server, &stored, true);
        assert_eq!(first["outcome"], "miss", "{first}");
        let (exact, _) = classify_report(&server, &edited, false);
        let (served, report) = classify_report(&server, &edited, true);
        assert_eq!(report["outcome"], want, "{report}");
        assert!(
            report["stale_deviation"].as_f64().unwrap() >= 0.0,
            "{report}"
        );
        let blend = &info(&server)["attn_cache"]["decoder_blend"];
        assert_eq!(
            (&blend["check_layer"], &blend["gate"]["kind"]),
            (&json!(0), &json!("decoder_blend_stale")),
            "{blend}"
        );
        if want == "blend_refused" {
            assert_close(&served, &exact, "a hit the gate refused");
            assert_eq!(blend["counts"]["refused_stale"], 1, "{blend}");
        } else {
            assert!(report["blended"].as_u64().unwrap() > 0, "{report}");
        }
    }
    // a gate for another model, or flags that contradict the gate, stop the start
    let foreign = gate("foreign.json", "another|llama|2|100|1", 0.5);
    let own = gate("own.json", &fingerprint, 0.5);
    for (flags, says) in [
        (
            vec!["--reuse", "blend", "--blend-gate", &foreign],
            "fitted for the model",
        ),
        (
            vec![
                "--reuse",
                "blend",
                "--blend-gate",
                &own,
                "--decoder-blend-stale-below",
                "0.1",
            ],
            "--decoder-blend-stale-below",
        ),
        (
            vec![
                "--reuse",
                "blend",
                "--blend-gate",
                &own,
                "--decoder-blend-check-layer",
                "1",
            ],
            "--decoder-blend-check-layer",
        ),
        (vec!["--blend-gate", &own], "--reuse blend"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attncache-server"))
            .arg("--model")
            .arg(&model.path)
            .args(["--port", "0"])
            .args(&flags)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
    }
}

#[test]
fn a_safetensors_directory_is_served_in_both_modes_and_its_prefix_reused_exactly() {
    use attncache_server::tiny_decoder_dir::{write_arch, TinyArch};
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path =
            write_arch(&dir.path().join("tiny-llama"), 21, arch).expect("write the directory");
        safetensors_directory_served(&path, arch);
    }
}

fn safetensors_directory_served(
    path: &std::path::Path,
    arch: attncache_server::tiny_decoder_dir::TinyArch,
) {
    let path = path.to_path_buf();
    let mut by_mode = Vec::new();
    for mode in ["fast", "stock"] {
        let server = start_file(&path, &["--exact-attention", mode]);
        let about = info(&server);
        assert_eq!(
            (&about["model_kind"], &about["model_id"], &about["layers"]),
            (&json!("decoder"), &json!("tiny-llama"), &json!(2)),
            "{about}"
        );
        assert_eq!(
            about["weights"], "the directory's float weights, cast to f32 at load",
            "{about}"
        );
        // a batch equals its inputs asked alone
        let all = classify_all(&server, &TEXTS, &LABELS);
        let (batch, alone) = all.split_at(TEXTS.len());
        for (b, a) in batch.iter().zip(alone) {
            for (x, y) in b.iter().zip(a) {
                assert!((x - y).abs() <= 1e-5, "{mode}: batch {b:?}, alone {a:?}");
            }
        }
        let calls = about["attention_calls"]["fast"].as_u64().unwrap();
        let calls = info(&server)["attention_calls"]["fast"].as_u64().unwrap() - calls;
        assert_eq!(
            calls > 0,
            mode == "fast",
            "{mode}: {calls} calls in our kernel"
        );
        // exact prefix reuse from the store, as for a GGUF decoder
        let shared = words("the", 60);
        let first = format!("{shared} movie was good {}", words("book", 20));
        let second = format!("{shared} food was bad and not good");
        let (_, stored) = classify_report(&server, &first, true);
        assert_eq!(stored["outcome"], "miss", "{stored}");
        let (exact, _) = classify_report(&server, &second, false);
        let (reused, report) = classify_report(&server, &second, true);
        assert_eq!(report["outcome"], "prefix_hit", "{arch:?} {mode}: {report}");
        assert!(report["prefix_tokens"].as_u64().unwrap() >= 48, "{report}");
        assert_close(&reused, &exact, "prefix reuse on a safetensors decoder");
        by_mode.push(batch.to_vec());
    }
    // the plugin's kernels (fast) compute what mistral.rs's own forward (stock) does
    for (f, s) in by_mode[0].iter().zip(&by_mode[1]) {
        for (a, b) in f.iter().zip(s) {
            assert!((a - b).abs() <= 1e-5, "{arch:?}: fast {f:?}, stock {s:?}");
        }
    }
}

fn assert_within(got: &[f64], want: &[f64], tol: f64, what: &str) {
    for (a, b) in got.iter().zip(want) {
        assert!(
            (a - b).abs() <= tol,
            "{what}: {a} vs exact {b} (tolerance {tol})"
        );
    }
}

#[test]
fn decoder_map_reuse_takes_the_maps_of_a_prompt_sharing_its_prefix_and_refuses_the_rest() {
    use attncache_server::tiny_decoder::{write_arch, TinyArch, TinyWeights};
    let model = TinyDecoder::new();
    decoder_map_reuse_served(&model.path);
    // qwen2's hunk (q, k and v with a bias)
    let qwen_dir = tempfile::tempdir().expect("tempdir");
    let qwen = write_arch(qwen_dir.path(), 13, TinyWeights::Quantized, TinyArch::Qwen2)
        .expect("write qwen2");
    decoder_map_reuse_served(&qwen);
    decoder_maps_over_prefix_served(&model.path);
    decoder_maps_over_prefix_served(&qwen);
}

/// Map reuse on top of exact prefix reuse (`--decoder-maps-over-prefix`) on the tiny GGUF
/// decoder at `path`: the head comes from the prefix store, exact, and only the rows after
/// it from the maps.
fn decoder_maps_over_prefix_served(path: &std::path::Path) {
    let head = words("the", 60);
    let stored = format!("{head} movie was good {}", words("book", 20));
    let near = format!("{head} film was really bad {}", words("plot", 26));
    let far = words("end", 70);
    // what the maps alone give the near prompt (every row from them)
    let maps_alone = {
        let server = start_file(path, &["--decoder-maps"]);
        classify_report(&server, &stored, true);
        let (served, report) = classify_report(&server, &near, true);
        assert_eq!(report["outcome"], "maps_hit", "{report}");
        assert_eq!(report["prefix_tokens"], 0, "{report}");
        served
    };
    for case in ["paper", "rest", "all"] {
        let mut flags = vec!["--decoder-maps", "--decoder-maps-over-prefix"];
        match case {
            "rest" => flags.push("--decoder-maps-recompute-rest"),
            "all" => flags.extend(["--decoder-maps-recompute-last", "100000"]),
            _ => {}
        }
        let server = start_file(path, &flags);
        let (_, first) = classify_report(&server, &stored, true);
        assert_eq!(first["outcome"], "miss", "{first}");
        let (exact, _) = classify_report(&server, &near, false);
        let (served, report) = classify_report(&server, &near, true);
        assert_eq!(
            report["outcome"],
            "maps_hit",
            "{case}: {report} {}",
            info(&server)
        );
        let past = report["prefix_tokens"].as_u64().unwrap();
        let shared = report["maps_shared"].as_u64().unwrap();
        // whole blocks of the 61 shared tokens from the prefix store
        assert!((48..=shared).contains(&past), "{report}");
        assert!(
            (served.iter().sum::<f64>() - 1.0).abs() < 1e-6,
            "{served:?}"
        );
        match case {
            // the rows after the head from the same maps as without the prefix store; the
            // head's rows exact instead of f16
            "paper" => assert_within(&served, &maps_alone, 2e-3, "maps over a reused prefix"),
            "rest" => assert_within(
                &served,
                &exact,
                2e-3,
                "maps between the prefix and the rest",
            ),
            "all" => assert_close(&served, &exact, "maps over a prefix, every row recomputed"),
            _ => {}
        }
        // a prompt the stores give nothing: exact
        let (far_exact, _) = classify_report(&server, &far, false);
        let (far_served, report) = classify_report(&server, &far, true);
        assert_eq!(report["outcome"], "miss", "{report}");
        assert_close(&far_served, &far_exact, "a prompt with nothing stored");
        let info = info(&server);
        let maps = &info["attn_cache"]["decoder_maps"];
        assert_eq!(maps["over_prefix"], true, "{info}");
        assert_eq!(maps["counts"]["hits"], 1, "{info}");
        // the hit's two layers took their rows after the head from the maps
        assert_eq!(info["attention_calls"]["maps"], 2, "{info}");
    }
}

/// Map reuse on the tiny GGUF decoder at `path`.
fn decoder_map_reuse_served(path: &std::path::Path) {
    let head = words("the", 60);
    let stored = format!("{head} movie was good {}", words("book", 20));
    let near = format!("{head} film was really bad {}", words("plot", 26));
    let far = words("end", 70);
    // the paper's reuse (every row from the maps); the rows after the shared prefix
    // recomputed; every row recomputed (from the k and q the model offers: exact)
    for case in ["paper", "rest", "all"] {
        let mut flags = vec!["--decoder-maps", "--decoder-maps-min-shared", "0.5"];
        match case {
            "rest" => flags.push("--decoder-maps-recompute-rest"),
            "all" => flags.extend(["--decoder-maps-recompute-last", "100000"]),
            _ => {}
        }
        let recompute_rest = case == "rest";
        let server = start_file(path, &flags);
        let (_, first) = classify_report(&server, &stored, true);
        assert_eq!(first["outcome"], "miss", "{first}");
        // a prompt sharing the 60-word head: the stored maps
        let (exact, off) = classify_report(&server, &near, false);
        assert_eq!(off["outcome"], "off");
        let (served, report) = classify_report(&server, &near, true);
        assert_eq!(report["outcome"], "maps_hit", "{report}");
        let shared = report["maps_shared"].as_u64().unwrap();
        assert!(shared >= 61, "{report}"); // the start token and at least the 60 words
        assert!(
            (served.iter().sum::<f64>() - 1.0).abs() < 1e-6,
            "{served:?}"
        );
        match case {
            // only the shared rows come from the maps (f16): exact up to their rounding
            "rest" => assert_within(&served, &exact, 2e-3, "maps on the shared prefix only"),
            "all" => assert_close(&served, &exact, "maps with every row recomputed"),
            _ => {}
        }
        // the stored prompt itself: every row from its own maps, f16 rounding only
        let (stored_exact, _) = classify_report(&server, &stored, false);
        let (again, report) = classify_report(&server, &stored, true);
        assert_eq!(report["outcome"], "maps_hit", "{report}");
        // all of it shared, and the near prompt shared less
        assert!(report["maps_shared"].as_u64().unwrap() > shared, "{report}");
        match case {
            "all" => assert_close(&again, &stored_exact, "every row recomputed"),
            _ => assert_within(&again, &stored_exact, 2e-3, "a stored prompt's own maps"),
        }
        // too little shared: computed exactly (and recorded)
        let (far_exact, _) = classify_report(&server, &far, false);
        let (far_served, report) = classify_report(&server, &far, true);
        assert_eq!(report["outcome"], "miss", "{report}");
        assert_close(&far_served, &far_exact, "a refused prompt");
        let info = info(&server);
        let maps = &info["attn_cache"]["decoder_maps"];
        assert_eq!(maps["recompute_rest"], recompute_rest, "{info}");
        assert_eq!(
            (&maps["counts"]["hits"], &maps["counts"]["recorded"]),
            (&json!(2), &json!(2)),
            "{info}"
        );
        assert_eq!(maps["counts"]["entries"], 2, "{info}");
        // both hits took the maps in both layers; with no row recomputed q/k were never
        // projected there
        let calls = &info["attention_calls"];
        assert_eq!(calls["maps"], 4, "{info}");
        let skipped = if case == "paper" { 4 } else { 0 };
        assert_eq!(calls["qk_skipped"], skipped, "{info}");
        // the kernels' time is counted apart: the exact kernel's (the misses, the flag-off
        // requests) and the stored-map layers' (the hits), and the lookups'
        let seconds = &info["attention_seconds"];
        assert!(seconds["exact"].as_f64() > Some(0.0), "{info}");
        assert!(seconds["maps"].as_f64() > Some(0.0), "{info}");
        assert!(maps["counts"]["lookup_ns"].as_u64() > Some(0), "{info}");
        assert_eq!(
            maps["counts"]["attention_ns"].as_f64(),
            seconds["maps"].as_f64().map(|s| (s * 1e9).round()),
            "{info}"
        );
        let text = reqwest::blocking::get(format!("{}/metrics", server.base))
            .expect("metrics")
            .text()
            .expect("metrics text");
        let hits = crate::common::metric(&text, "attncache_decoder_maps_hits_total");
        assert_eq!(hits, 2.0, "{text}");
        for name in [
            "attncache_exact_attention_seconds_total",
            "attncache_decoder_maps_attention_seconds_total",
            "attncache_decoder_maps_lookup_seconds_total",
        ] {
            assert!(crate::common::metric(&text, name) > 0.0, "{name}: {text}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("attncache_inputs_total{outcome=\"maps_hit\"} 2")),
            "{text}"
        );
    }
}

#[test]
fn decoder_map_reuse_is_refused_at_start_where_it_cannot_run() {
    use attncache_server::tiny_decoder_dir::{self, TinyArch};
    let model = TinyDecoder::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let safetensors = tiny_decoder_dir::write_arch(&dir.path().join("tiny"), 21, TinyArch::Llama)
        .expect("write the directory");
    for (path, extra, says) in [
        (&model.path, vec!["--reuse", "blend"], "--reuse blend"),
        (
            &model.path,
            vec!["--exact-attention", "stock"],
            "--exact-attention fast",
        ),
        (&safetensors, vec![], "GGUF llama or qwen2"),
        (
            &model.path,
            vec!["--decoder-maps-min-shared", "0"],
            "decoder-maps-min-shared",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attncache-server"))
            .arg("--model")
            .arg(path)
            .args(["--port", "0", "--decoder-maps"])
            .args(&extra)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}
