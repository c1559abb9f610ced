//! What users of other embedding servers expect, on the real `attncache-server` binary
//! (tiny model): `/tokenize` and `/detokenize`, task prompts, truncation, `/v1/rerank`
//! (and the `cohere` Python SDK against it), `/info`, an honest `not_cached` report, and
//! the queue in front of the engine.
//! Every bad request gets an OpenAI-style 4xx and changes nothing in the cache.

use crate::common;

use std::time::Duration;

use common::{cosine, embeddings_of, max_abs_diff, outcomes, Server, TinyModel};
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{}{path}", server.base))
        .json(body)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

fn embed(server: &Server, body: Value) -> (Vec<Vec<f32>>, Value) {
    let (status, r) = post(server, "/v1/embeddings", &body);
    assert_eq!(status, 200, "{r}");
    (embeddings_of(&r), r)
}

/// The value of an unlabelled Prometheus counter.
fn counter(server: &Server, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Equal up to the order of float additions (batches of different sizes).
fn assert_same(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d <= 1e-5, "{what}: max |diff| {d}");
}

fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string() && e["code"].is_string(), "{body}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

/// `n` words of the tiny vocabulary, one token each.
fn words(n: usize) -> String {
    let vocab = ["the", "a", "room", "was", "clean", "and", "food", "great"];
    (0..n)
        .map(|i| vocab[i % vocab.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn tokenize_gives_the_ids_embeddings_give_the_model() {
    let model = TinyModel::new("parity-tokenize");
    let server = Server::start(&model, &[]);
    let text = "the staff were lovely and the room was clean";
    let (status, t) = post(
        &server,
        "/tokenize",
        &json!({"prompt": text, "return_token_strs": true}),
    );
    assert_eq!(status, 200, "{t}");
    let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(t["count"], ids.len());
    assert_eq!(t["max_model_len"], 512);
    assert_eq!(t["token_strs"][0], "the");
    let (by_text, r) = embed(&server, json!({"input": text}));
    let (by_ids, _) = embed(&server, json!({"input": ids}));
    assert_same(
        &by_text,
        &by_ids,
        "the ids /tokenize gives are what the model reads",
    );
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());
    // the same under /v1/, and with a task prompt put before the text
    let (_, with_prompt) = post(
        &server,
        "/v1/tokenize",
        &json!({"prompt": text, "prompt_name": "query"}),
    );
    let (_, prompt_only) = post(&server, "/tokenize", &json!({"prompt": "you ? "}));
    assert_eq!(
        with_prompt["count"].as_u64().unwrap(),
        prompt_only["count"].as_u64().unwrap() + ids.len() as u64
    );

    let (status, d) = post(&server, "/detokenize", &json!({"tokens": ids}));
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["prompt"], text);

    for (path, body, param, code) in [
        ("/tokenize", json!({}), Some("prompt"), 400),
        ("/tokenize", json!({"prompt": 3}), None, 400),
        (
            "/tokenize",
            json!({"prompt": "a", "model": "other"}),
            Some("model"),
            404,
        ),
        ("/tokenize", json!({"prompt": "a", "extra": 1}), None, 400),
        (
            "/tokenize",
            json!({"prompt": "a", "prompt_name": "nope"}),
            Some("prompt_name"),
            400,
        ),
        (
            "/detokenize",
            json!({"tokens": [1, 999999]}),
            Some("tokens"),
            400,
        ),
        ("/detokenize", json!({"tokens": "abc"}), None, 400),
        ("/detokenize", json!({}), Some("tokens"), 400),
    ] {
        let (status, body) = post(&server, path, &body);
        assert_error(status, &body, code, param);
    }
}

#[test]
fn task_prompts_go_before_texts_as_in_sentence_transformers() {
    let model = TinyModel::new("parity-prompts");
    let server = Server::start(&model, &[]);
    let texts = ["the food was great", "the room was clean"];
    let (named, _) = embed(&server, json!({"input": texts, "prompt_name": "query"}));
    let (by_task, _) = embed(&server, json!({"input": texts, "task": "query"}));
    let prefixed: Vec<String> = texts.iter().map(|t| format!("you ? {t}")).collect();
    let (by_hand, _) = embed(&server, json!({ "input": prefixed }));
    let (plain, _) = embed(&server, json!({ "input": texts }));
    assert_same(
        &named,
        &by_hand,
        "prompt_name puts the prompt before the text",
    );
    assert_same(&by_task, &by_hand, "`task` is the same field");
    assert!(
        max_abs_diff(&named, &plain) > 1e-3,
        "the prompt changes the embedding"
    );

    let recorded = counter(&server, "attncache_recorded_total");
    for (body, param) in [
        (
            json!({"input": "a", "prompt_name": "nope", "attn_cache": true}),
            "prompt_name",
        ),
        (
            json!({"input": [1, 2, 3], "prompt_name": "query", "attn_cache": true}),
            "prompt_name",
        ),
        (json!({"input": "a", "prompt_name": 5}), "prompt_name"),
    ] {
        let (status, r) = post(&server, "/v1/embeddings", &body);
        assert_error(status, &r, 400, Some(param));
    }
    let (_, r) = post(
        &server,
        "/v1/embeddings",
        &json!({"input": "a", "prompt_name": "nope"}),
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("query") && msg.contains("document"), "{msg}");
    assert_eq!(counter(&server, "attncache_recorded_total"), recorded);
}

#[test]
fn truncation_cuts_the_named_end_and_says_how_much() {
    let model = TinyModel::new("parity-truncate");
    let server = Server::start(&model, &[]);
    let long = words(520); // the tiny model reads 512 tokens
    let (status, r) = post(
        &server,
        "/v1/embeddings",
        &json!({"input": long, "attn_cache": true}),
    );
    assert_error(status, &r, 400, Some("input"));
    assert!(
        r["error"]["message"].as_str().unwrap().contains("truncate"),
        "{r}"
    );
    let (_, t) = post(&server, "/tokenize", &json!({ "prompt": long }));
    let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(ids.len(), 520);

    let (right, r) = embed(&server, json!({"input": long, "truncate": true}));
    assert_eq!(r["attn_cache"]["inputs"][0]["truncated_tokens"], 8, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 512);
    let (first, _) = embed(&server, json!({ "input": &ids[..512] }));
    assert_same(&right, &first, "right truncation keeps the start");
    // flag on, asked twice: the repeat is answered from the memo and reports the same cut
    let cut_on = json!({"input": long, "truncate": true, "attn_cache": true});
    embed(&server, cut_on.clone());
    let (again, r) = embed(&server, cut_on);
    assert_eq!(
        r["attn_cache"]["inputs"][0]["outcome"], "exact_repeat",
        "{r}"
    );
    assert_eq!(r["attn_cache"]["inputs"][0]["truncated_tokens"], 8, "{r}");
    assert_same(
        &again,
        &right,
        "a repeat of a cut input is the cut input's embedding",
    );
    let (left, r) = embed(
        &server,
        json!({"input": long, "truncate": true, "truncation_direction": "left"}),
    );
    assert_eq!(r["attn_cache"]["inputs"][0]["truncated_tokens"], 8);
    let (last, _) = embed(&server, json!({ "input": &ids[8..] }));
    assert_same(&left, &last, "left truncation keeps the end");
    // token-id inputs are cut the same way; mistral.rs's spelling still works
    let (cut_ids, _) = embed(
        &server,
        json!({"input": ids, "truncate_sequence": true, "truncation_direction": "Left"}),
    );
    assert_same(&cut_ids, &last, "token ids are cut from the left too");
    // a short input is not touched
    let (_, r) = embed(&server, json!({"input": "the food", "truncate": true}));
    assert!(r["attn_cache"]["inputs"][0]
        .get("truncated_tokens")
        .is_none());

    for body in [
        json!({"input": long, "truncate": true, "truncate_sequence": false}),
        json!({"input": long, "truncate": true, "truncation_direction": "middle"}),
        json!({"input": long, "truncate": "yes"}),
    ] {
        let (status, r) = post(&server, "/v1/embeddings", &body);
        assert_error(status, &r, 400, None);
    }

    // --auto-truncate: cut unless the request says truncate: false
    let auto = Server::start(&model, &["--auto-truncate"]);
    let (by_default, r) = embed(&auto, json!({ "input": long }));
    assert_eq!(r["attn_cache"]["inputs"][0]["truncated_tokens"], 8);
    assert_same(
        &by_default,
        &right,
        "--auto-truncate cuts as truncate: true does",
    );
    let (status, r) = post(
        &auto,
        "/v1/embeddings",
        &json!({"input": long, "truncate": false}),
    );
    assert_error(status, &r, 400, Some("input"));
    let (_, info) = {
        let resp = client().get(format!("{}/info", auto.base)).send().unwrap();
        (resp.status().as_u16(), resp.json::<Value>().unwrap())
    };
    assert_eq!(info["auto_truncate"], true);
}

#[test]
fn rerank_scores_by_the_embedding_models_cosine_with_its_prompts() {
    let model = TinyModel::new("parity-rerank");
    let server = Server::start(&model, &[]);
    let query = "the food was great";
    let docs = [
        "the room was dirty",
        "the food was great and the staff were lovely",
        "win cash now",
    ];
    let (status, r) = post(
        &server,
        "/v1/rerank",
        &json!({"model": "default", "query": query, "documents": docs}),
    );
    assert_eq!(status, 200, "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    // the scores are the cosines of the prompted embeddings
    let (q, _) = embed(&server, json!({"input": query, "prompt_name": "query"}));
    let (d, _) = embed(&server, json!({"input": docs, "prompt_name": "document"}));
    for res in results {
        let i = res["index"].as_u64().unwrap() as usize;
        let want = cosine(&q[0], &d[i]) as f64;
        let got = res["relevance_score"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "doc {i}: {got} vs {want}");
        assert_eq!(res["document"]["text"], docs[i]);
    }
    let scores: Vec<f64> = results
        .iter()
        .map(|x| x["relevance_score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(
        r["usage"]["total_tokens"], r["usage"]["prompt_tokens"],
        "{r}"
    );

    // the other paths, {text} documents, top_n and return_documents
    for path in ["/v2/rerank", "/rerank"] {
        let (status, again) = post(
            &server,
            path,
            &json!({"query": query, "documents": docs.map(|t| json!({"text": t})),
                    "top_n": 2, "return_documents": false}),
        );
        assert_eq!(status, 200, "{again}");
        let top = again["results"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["index"], results[0]["index"]);
        assert!(top[0].get("document").is_none());
    }

    // with the cache on, documents re-ranked for another query are exact repeats
    let on = json!({"query": query, "documents": docs, "attn_cache": true});
    let (_, first) = post(&server, "/v1/rerank", &on);
    assert_eq!(first["attn_cache"]["enabled"], true);
    assert_eq!(first["attn_cache"]["query"]["outcome"], "miss");
    let other = json!({"query": "the room was clean", "documents": docs, "attn_cache": true});
    let (_, second) = post(&server, "/v1/rerank", &other);
    let outcomes: Vec<&str> = second["attn_cache"]["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["exact_repeat"; 3], "{second}");
    assert_eq!(second["attn_cache"]["query"]["outcome"], "miss");

    let recorded = counter(&server, "attncache_recorded_total");
    for (body, code, param) in [
        (json!({"documents": docs}), 400, Some("query")),
        (json!({"query": query}), 400, Some("documents")),
        (
            json!({"query": query, "documents": []}),
            400,
            Some("documents"),
        ),
        (
            json!({"query": query, "documents": [""]}),
            400,
            Some("documents"),
        ),
        (
            json!({"query": query, "documents": [7]}),
            400,
            Some("documents"),
        ),
        (json!({"query": "", "documents": docs}), 400, Some("query")),
        (
            json!({"query": query, "documents": docs, "model": "x"}),
            404,
            Some("model"),
        ),
        (
            json!({"query": query, "documents": docs, "priority": 1}),
            400,
            None,
        ),
        (
            json!({"query": query, "documents": docs, "max_tokens_per_doc": 0}),
            400,
            Some("max_tokens_per_doc"),
        ),
        (
            json!({"query": words(600), "documents": docs, "attn_cache": true}),
            400,
            Some("input"),
        ),
    ] {
        let (status, r) = post(&server, "/v1/rerank", &body);
        assert_error(status, &r, code, param);
    }
    assert_eq!(counter(&server, "attncache_recorded_total"), recorded);
    // max_tokens_per_doc cuts documents
    let (status, cut) = post(
        &server,
        "/v1/rerank",
        &json!({"query": query, "documents": [words(40)], "max_tokens_per_doc": 6}),
    );
    assert_eq!(status, 200, "{cut}");
    assert_eq!(
        cut["attn_cache"]["documents"][0]["truncated_tokens"],
        40 + 2 - 6,
        "the document prompt is 2 tokens: {cut}"
    );
}

#[test]
fn the_cohere_python_sdk_reranks_against_the_server() {
    let model = TinyModel::new("parity-cohere");
    let server = Server::start(&model, &["--api-key", "co-test"]);
    let r = common::run_python_client("cohere_client.py", &server.base, "co-test");
    assert_eq!(r["count"], 2, "{r}");
    let (status, direct) = post(
        &server,
        "/v2/rerank",
        &json!({"query": "the food was great",
                "documents": ["the room was dirty", "the food was great and cheap", "win cash"]}),
    );
    assert_eq!(status, 401, "the key guards /v2/: {direct}");
    let indices: Vec<u64> = serde_json::from_value(r["indices"].clone()).unwrap();
    let scores: Vec<f64> = serde_json::from_value(r["scores"].clone()).unwrap();
    assert_eq!(indices.len(), 2);
    assert!(scores[0] >= scores[1], "{r}");
    assert_eq!(r["bad_request"], 400, "{r}");
    assert_eq!(r["wrong_key"], 401, "{r}");
}

#[test]
fn info_describes_the_served_model_and_cache() {
    let model = TinyModel::new("parity-info");
    let server = Server::start(&model, &["--attn-cache", "on", "--api-key", "k1"]);
    let resp = client()
        .get(format!("{}/info", server.base))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "/info stays open for probes");
    let info: Value = resp.json().unwrap();
    assert_eq!(info["model_type"], "gemma3_text");
    assert_eq!(info["max_input_length"], 512);
    assert_eq!(
        info["embedding_dimensions"],
        attncache_server::tiny_model::EMBEDDING_DIM
    );
    assert_eq!(info["prompts"]["query"], "you ? ");
    assert_eq!(info["prompts"]["document"], "it is ");
    assert_eq!(info["default_prompt_name"], Value::Null);
    assert_eq!(info["auto_truncate"], false);
    assert_eq!(info["attn_cache"]["enabled_by_default"], true);
    assert_eq!(info["attn_cache"]["reuse"], "maps");
    assert_eq!(info["attn_cache"]["max_tokens"], 1024);
    // the model routes need the key
    for path in ["/rerank", "/tokenize", "/v1/rerank", "/v1/tokenize"] {
        let (status, body) = post(&server, path, &json!({"prompt": "a"}));
        assert_error(status, &body, 401, None);
    }
}

#[test]
fn an_input_the_cache_will_not_store_is_reported_not_cached() {
    let model = TinyModel::new("parity-notcached");
    let server = Server::start(&model, &["--cache-max-tokens", "16"]);
    let (_, r) = embed(
        &server,
        json!({"input": [words(30), words(30), "the food was great"], "attn_cache": true}),
    );
    assert_eq!(outcomes(&r), ["not_cached", "not_cached", "miss"], "{r}");
    assert_eq!(counter(&server, "attncache_not_cached_total"), 2.0);
    assert_eq!(counter(&server, "attncache_misses_total"), 1.0);
    assert_eq!(counter(&server, "attncache_lookups_total"), 1.0);
    // exact repeats of a not-cached input are still answered from the memo
    let (_, r) = embed(&server, json!({"input": words(30), "attn_cache": true}));
    assert_eq!(outcomes(&r), ["exact_repeat"]);
}

#[test]
fn the_queue_serves_concurrent_requests_in_input_order_and_counts_them() {
    let model = TinyModel::new("parity-queue");
    // one batch inside at a time, two inputs in it: most inputs wait, and equal lengths
    // from different requests share batches
    let server = Server::start(&model, &["--engine-batches", "1", "--max-seqs", "2"]);
    let inputs: Vec<Vec<String>> = (0..6)
        .map(|r| vec![words(3 + r % 2), words(9), words(5 + r), words(3)])
        .collect();
    let alone: Vec<Vec<Vec<f32>>> = inputs
        .iter()
        .map(|req| {
            req.iter()
                .flat_map(|t| embed(&server, json!({"input": t, "attn_cache": false})).0)
                .collect()
        })
        .collect();
    let together: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|req| {
                let server = &server;
                s.spawn(move || embed(server, json!({"input": req, "attn_cache": false})).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_same(a, t, &format!("request {r}, answered in input order"));
    }
    let text = server.metrics();
    let sent = 2.0 * 4.0 * inputs.len() as f64;
    assert_eq!(
        common::metric(&text, "attncache_queue_wait_seconds_count"),
        sent,
        "every input passed the queue"
    );
    assert_eq!(
        common::metric(&text, "attncache_engine_batch_size_sum"),
        sent,
        "every input was in one batch"
    );
    assert!(common::metric(&text, "attncache_engine_batch_size_count") <= sent);
    assert_eq!(common::metric(&text, "attncache_queue_depth"), 0.0);
    assert_eq!(common::metric(&text, "attncache_engine_inputs"), 0.0);
}

#[test]
fn openapi_json_documents_every_route_and_each_answers() {
    let model = TinyModel::new("parity-openapi");
    let server = Server::start(&model, &[]);
    let resp = client()
        .get(format!("{}/openapi.json", server.base))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let doc: Value = resp.json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "{:?}", paths.keys());
    for (path, item) in paths {
        for method in ["get", "post"] {
            if item.get(method).is_none() {
                continue;
            }
            let url = format!("{}{path}", server.base);
            let resp = match method {
                "get" => client().get(&url).send().unwrap(),
                _ => client().post(&url).json(&json!({})).send().unwrap(),
            };
            let status = resp.status().as_u16();
            let body = resp.text().unwrap();
            // our routes answer: GETs with 200, POSTs of `{}` with our own 4xx error body
            // (a missing field, or no classifier loaded), never mistral.rs's fallback
            match method {
                "get" => assert_eq!(status, 200, "{method} {path}: {body}"),
                _ => {
                    assert!(
                        matches!(status, 400 | 404),
                        "{method} {path}: {status} {body}"
                    );
                    let v: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|_| panic!("{method} {path}: {body}"));
                    assert!(v["error"]["code"].is_string(), "{method} {path}: {body}");
                }
            }
        }
    }
    // the request types carry their fields
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["EmbeddingRequest"]["properties"]["prompt_name"].is_object());
    assert!(schemas["RerankRequest"]["properties"]["documents"].is_object());
}

#[test]
fn a_head_trained_with_label_names_answers_them() {
    let model = TinyModel::new("parity-labels");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("labelled.jsonl");
    let mut lines = String::new();
    for (i, w) in ["great", "lovely", "clean", "awful", "rude", "dirty"]
        .iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        let label = if i % 6 < 3 { 1 } else { 0 };
        lines += &format!("{{\"text\": \"the room was {w}\", \"label\": {label}}}\n");
    }
    std::fs::write(&data, lines).unwrap();
    let head = dir.path().join("head");
    let train = |names: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_attncache"))
            .args(["train-head", "--model"])
            .arg(model.path())
            .arg("--data")
            .arg(&data)
            .args(["--label-names", names, "--out"])
            .arg(&head)
            .output()
            .unwrap()
    };
    let refused = train("0=negative,7=seven");
    assert!(
        !refused.status.success(),
        "a label the data lacks is refused"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains('7'));
    let run = train("0=negative,1=positive");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let server = Server::start(&model, &["--classifier", head.to_str().unwrap()]);
    let (status, r) = post(
        &server,
        "/v1/classify",
        &json!({"input": ["the room was great", "the room was dirty"]}),
    );
    assert_eq!(status, 200, "{r}");
    for d in r["data"].as_array().unwrap() {
        let label = d["label"].as_str().unwrap();
        assert!(["negative", "positive"].contains(&label), "{r}");
    }
    let info: Value = client()
        .get(format!("{}/info", server.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["classifier_labels"], json!(["negative", "positive"]));
}
