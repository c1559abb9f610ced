//! Our `/v1/embeddings` and `/metrics` on the real `attncache-server` binary (tiny model):
//! the per-request cache flag (body and header), exact repeats, OpenAI input shapes and
//! encodings, OpenAI-style errors that leave the server healthy, Prometheus metrics, and
//! the official `openai` Python client.

use crate::common;

use std::time::Duration;

use base64::Engine;
use common::{embeddings_of, outcomes, Server, TinyModel};
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn post(server: &Server, body: &Value, header: Option<&str>) -> (u16, Value) {
    let mut req = client()
        .post(format!("{}/v1/embeddings", server.base))
        .json(body);
    if let Some(h) = header {
        req = req.header("X-Attn-Cache", h);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

/// The token ids the server's `/tokenize` gives for `text`.
fn token_ids(server: &Server, text: &str) -> Vec<u32> {
    let r: Value = client()
        .post(format!("{}/tokenize", server.base))
        .json(&json!({ "prompt": text }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    serde_json::from_value(r["tokens"].clone()).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn per_request_flag_exact_repeats_and_hits() {
    let model = TinyModel::new("api-flag");
    let server = Server::start(&model, &[]); // deployment default: off
    let texts = [
        "the food was great and the staff were lovely",
        "hello there",
    ];

    // no flag: the server default (off), computed exactly
    let (s, off) = post(&server, &json!({"input": texts}), None);
    assert_eq!(s, 200, "{off}");
    assert_eq!(outcomes(&off), ["off", "off"]);
    assert_eq!(off["attn_cache"]["enabled"], false);

    // body flag on: first sight is a miss (recorded), computed exactly like flag off
    let (_, miss) = post(&server, &json!({"input": texts, "attn_cache": true}), None);
    assert_eq!(outcomes(&miss), ["miss", "miss"]);
    let (e_off, e_miss) = (embeddings_of(&off), embeddings_of(&miss));
    for (a, b) in e_off.iter().zip(&e_miss) {
        assert!(max_diff(a, b) <= 1e-6, "a recorded miss is the exact path");
    }

    insta::assert_json_snapshot!("embeddings_miss_response", common::redacted(&miss, 3));
    // header flag on, same texts: exact repeats, the remembered vectors
    let (_, rep) = post(&server, &json!({"input": texts}), Some("on"));
    assert_eq!(outcomes(&rep), ["exact_repeat", "exact_repeat"]);
    assert_eq!(embeddings_of(&rep), e_miss);

    // the same input sent as token ids is a different request: it reaches the model, a map hit
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| token_ids(&server, t)).collect();
    let (_, hit) = post(&server, &json!({"input": ids, "attn_cache": true}), None);
    assert_eq!(outcomes(&hit), ["hit", "hit"]);
    for (a, b) in embeddings_of(&hit).iter().zip(&e_miss) {
        assert!(max_diff(a, b) <= 1e-4, "a hit reuses f16 maps: within 1e-4");
    }
    assert!(
        hit["attn_cache"]["inputs"][0]["lookup_us"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // the flag off after all this: still the exact path, no repeat served
    let (_, off2) = post(&server, &json!({"input": texts}), Some("off"));
    assert_eq!(outcomes(&off2), ["off", "off"]);
    assert_eq!(embeddings_of(&off2), e_off);

    // token ids, one and several
    let (s, tok) = post(
        &server,
        &json!({"input": [5, 6, 7, 8], "attn_cache": true}),
        None,
    );
    assert_eq!(s, 200, "{tok}");
    assert_eq!(tok["usage"]["prompt_tokens"], 4);
    let (s, toks) = post(&server, &json!({"input": [[5, 6, 7, 8], [9, 10]]}), None);
    assert_eq!(s, 200, "{toks}");
    assert_eq!(embeddings_of(&toks)[0], embeddings_of(&tok)[0]);

    // base64 decodes to the float vector
    let (_, b64) = post(
        &server,
        &json!({"input": texts[0], "encoding_format": "base64"}),
        None,
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, e_off[0]);
}

#[test]
fn the_deployment_default_applies_when_a_request_does_not_say() {
    let model = TinyModel::new("api-default");
    let server = Server::start(&model, &["--attn-cache", "on"]);
    let (_, first) = post(&server, &json!({"input": "the room was clean"}), None);
    assert_eq!(outcomes(&first), ["miss"]);
    let (_, second) = post(&server, &json!({"input": "the room was clean"}), None);
    assert_eq!(outcomes(&second), ["exact_repeat"]);
    let (_, off) = post(
        &server,
        &json!({"input": "the room was clean", "attn_cache": false}),
        None,
    );
    assert_eq!(outcomes(&off), ["off"]);
}

#[test]
fn bad_requests_get_openai_errors_and_change_nothing() {
    let model = TinyModel::new("api-errors");
    let server = Server::start(&model, &["--attn-cache", "on"]);
    let cases: Vec<(Value, Option<&str>, u16, Option<&str>)> = vec![
        (json!({"input": []}), None, 400, Some("input")),
        (json!({"input": ""}), None, 400, Some("input")),
        (json!({"input": [[]]}), None, 400, Some("input")),
        (json!({"input": [1.5, 2]}), None, 400, Some("input")),
        (json!({"input": [-1]}), None, 400, Some("input")),
        (json!({"input": [999_999_999]}), None, 400, Some("input")),
        (json!({"input": {"a": 1}}), None, 400, Some("input")),
        (json!({"model": "default"}), None, 400, Some("input")),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            None,
            400,
            Some("encoding_format"),
        ),
        (
            json!({"input": "x", "dimensions": 0}),
            None,
            400,
            Some("dimensions"),
        ),
        (
            json!({"input": "x", "dimensions": 32}),
            None,
            400,
            Some("dimensions"),
        ),
        (json!({"input": "x", "attn_cachee": true}), None, 400, None),
        (
            json!({"input": "x", "model": "gpt-4"}),
            None,
            404,
            Some("model"),
        ),
        (
            json!({"input": "x"}),
            Some("maybe"),
            400,
            Some("X-Attn-Cache"),
        ),
        (
            json!({"input": "x", "attn_cache": false}),
            Some("on"),
            400,
            Some("attn_cache"),
        ),
        (json!({"input": null}), None, 400, Some("input")),
        (json!({"input": true}), None, 400, Some("input")),
        (json!({"input": ["a", 1]}), None, 400, Some("input")),
        (json!({"input": [[1, "a"]]}), None, 400, Some("input")),
        (json!({"input": [[["a"]]]}), None, 400, Some("input")),
        (json!({"input": ["ok", ""]}), None, 400, Some("input")),
        (json!({"input": vec!["x"; 2049]}), None, 400, Some("input")),
        (json!({"input": vec![5; 513]}), None, 400, Some("input")),
        (json!({"input": "x", "model": 5}), None, 400, Some("model")),
        (
            json!({"input": "x", "encoding_format": 5}),
            None,
            400,
            Some("encoding_format"),
        ),
        (
            json!({"input": "x", "dimensions": "64"}),
            None,
            400,
            Some("dimensions"),
        ),
        (
            json!({"input": "x", "dimensions": -1}),
            None,
            400,
            Some("dimensions"),
        ),
        (
            json!({"input": "x", "attn_cache": "yes"}),
            None,
            400,
            Some("attn_cache"),
        ),
        (
            json!({"input": "x", "truncate_sequence": "no"}),
            None,
            400,
            Some("truncate_sequence"),
        ),
        (json!({"input": "x", "user": 5}), None, 400, Some("user")),
        (json!({}), None, 400, Some("input")),
        (json!([]), None, 400, None),
        (json!(null), None, 400, None),
        (json!("input"), None, 400, None),
    ];
    let n = cases.len();
    for (body, header, status, param) in cases {
        let (s, err) = post(&server, &body, header);
        assert_eq!(s, status, "{body} → {err}");
        let e = &err["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{err}"
        );
        assert!(e["type"].as_str().is_some(), "{err}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body} → {err}");
        }
    }
    // not JSON at all, and not declared as JSON
    let http = client();
    let url = format!("{}/v1/embeddings", server.base);
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"input\": ")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    let r = http.post(&url).body("input=x").send().unwrap();
    assert_eq!(r.status(), 415);
    // a text longer than the model's context (512 tokens) without truncate_sequence
    let long = vec!["good"; 600].join(" ");
    let (s, err) = post(&server, &json!({"input": long}), None);
    assert_eq!(s, 400, "{err}");
    // a body over the 32 MiB limit: refused from its Content-Length, before it is read
    let addr = server.base.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        tcp,
        "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{{\"input\": \"",
        40 << 20
    )
    .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    // the wrong method
    let r = http.get(&url).send().unwrap();
    assert_eq!(r.status(), 405);

    // nothing was cached or counted as a lookup by the refused requests; the server is fine
    let metrics = http
        .get(format!("{}/metrics", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains("attncache_lookups_total 0"), "{metrics}");
    let rejected: f64 = metrics
        .lines()
        .find(|l| l.starts_with("attncache_rejected_requests_total{endpoint=\"embeddings\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("rejected counter");
    assert_eq!(
        rejected as usize,
        n + 3,
        "the 413 is refused before routing"
    );
    assert!(n + 5 >= 30, "the table has {} bad requests", n + 5);
    let (s, ok) = post(&server, &json!({"input": "still serving"}), None);
    assert_eq!((s, outcomes(&ok)), (200, vec!["miss".to_string()]));
}

#[test]
fn metrics_count_outcomes_and_lookups() {
    let model = TinyModel::new("api-metrics");
    let server = Server::start(&model, &["--attn-cache", "on"]);
    for _ in 0..2 {
        post(
            &server,
            &json!({"input": ["one two three", "four five"]}),
            None,
        );
    }
    let ids = token_ids(&server, "one two three");
    post(&server, &json!({ "input": [ids] }), None);
    let text = client()
        .get(format!("{}/metrics", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing in\n{text}"))
    };
    assert_eq!(value("attncache_inputs_total{outcome=\"miss\"}"), 2.0);
    // the hot tier's predicted miss-ratio curve, at ¼, ½, 1 and 2 times its budget (512 MiB)
    for mib in [128, 256, 512, 1024] {
        let ratio = value(&format!(
            "attncache_hot_tier_predicted_miss_ratio{{hot_mib=\"{mib}\"}}"
        ));
        assert!((0.0..=1.0).contains(&ratio), "{mib} MiB: {ratio}");
    }
    assert_eq!(
        value("attncache_inputs_total{outcome=\"exact_repeat\"}"),
        2.0
    );
    assert_eq!(value("attncache_inputs_total{outcome=\"hit\"}"), 1.0);
    assert_eq!(value("attncache_lookups_total"), 3.0);
    assert_eq!(value("attncache_hits_total"), 1.0);
    assert_eq!(value("attncache_lookup_duration_seconds_count"), 3.0);
    assert!(value("attncache_hot_bytes") > 0.0);
    assert_eq!(
        value("attncache_http_requests_total{endpoint=\"embeddings\",status=\"200\"}"),
        3.0
    );
    assert!(text.contains("# HELP attncache_hit_rate"), "{text}");
}

#[test]
fn the_official_openai_python_client_works() {
    let model = TinyModel::new("api-openai");
    let dir = tempfile::tempdir().unwrap();
    let head = train_tiny_head(&model, dir.path());
    let server = Server::start(
        &model,
        &[
            "--classifier",
            head.to_str().unwrap(),
            "--api-key",
            "sk-test-1,sk-test-2",
        ],
    );
    let r = common::run_python_client("openai_client.py", &server.base, "sk-test-2");
    let dim = attncache_server::tiny_model::EMBEDDING_DIM as u64;
    assert_eq!(r["default_lengths"], json!([dim, dim]));
    assert_eq!(r["default_indices"], json!([0, 1]));
    assert!(r["usage"].as_u64().unwrap() > 0);
    let f: Vec<f32> = serde_json::from_value(r["float"].clone()).unwrap();
    let b: Vec<f32> = serde_json::from_value(r["base64_first"].clone()).unwrap();
    assert_eq!(f, b, "base64 (client default) decodes to the float vector");
    assert_eq!(r["first_outcome"], "miss");
    assert_eq!(r["again_outcome"], "exact_repeat");
    assert_eq!(r["again_same"], true);
    assert_eq!(r["not_found"], "model_not_found");
    assert_eq!(r["empty"], "input");
    assert_eq!(r["dims_full"], dim);
    assert_eq!(r["dims_bad"], "dimensions");
    assert_eq!(r["default_outcome"], "off");
    assert_eq!(r["wrong_key"], "invalid_api_key");
    assert_eq!(r["off_outcome"], "off");
    assert_eq!(r["classify_labels"], 2);
    assert_eq!(r["classify_num_classes"], 2);
    assert_eq!(r["classify_outcome"], "miss");
}

/// Trains a head on the tiny model with `attncache train-head`; returns its directory.
fn train_tiny_head(model: &TinyModel, dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("labelled.jsonl");
    let mut lines = String::new();
    for (i, w) in ["great", "lovely", "clean", "awful", "rude", "dirty"]
        .iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        let label = if i % 6 < 3 { "pos" } else { "neg" };
        lines +=
            &format!("{{\"text\": \"the room was {w} number {i}\", \"label\": \"{label}\"}}\n");
    }
    std::fs::write(&data, lines).unwrap();
    let head = dir.join("head");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_attncache"))
        .args(["train-head", "--model"])
        .arg(model.path())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&head)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("held-out"), "{stdout}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(head.join("head.json")).unwrap()).unwrap();
    assert_eq!(config["labels"], json!(["neg", "pos"]));
    assert_eq!(config["test_examples"], 6);
    head
}

#[test]
fn train_a_head_then_classify_with_and_without_the_cache() {
    let model = TinyModel::new("api-classify");
    let dir = tempfile::tempdir().unwrap();
    let head = train_tiny_head(&model, dir.path());

    // without --classifier the route says how to get one
    let plain = Server::start(&model, &[]);
    let r = client()
        .post(format!("{}/v1/classify", plain.base))
        .json(&json!({"input": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().unwrap()["error"]["code"],
        "classifier_not_configured"
    );
    drop(plain);

    let server = Server::start(&model, &["--classifier", head.to_str().unwrap()]);
    let classify = |body: Value| -> (u16, Value) {
        let r = client()
            .post(format!("{}/v1/classify", server.base))
            .json(&body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    let texts = ["the room was great number 1", "the room was rude number 4"];
    let (s, off) = classify(json!({"model": "default", "input": texts}));
    assert_eq!(s, 200, "{off}");
    assert_eq!(off["object"], "list");
    assert!(off["id"].as_str().unwrap().starts_with("classify-"));
    assert!(off["created"].as_u64().unwrap() > 0);
    assert!(off["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    for (i, d) in off["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["num_classes"], 2);
        let probs: Vec<f32> = serde_json::from_value(d["probs"].clone()).unwrap();
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{d}");
        let best = if probs[0] >= probs[1] { "neg" } else { "pos" };
        assert_eq!(d["label"], best);
    }
    // the response body, as a reviewed snapshot (id and timestamp redacted)
    insta::assert_json_snapshot!("classify_response", common::redacted(&off, 3));
    // the cache flag: a miss then an exact repeat, with the same probabilities
    let (_, on) = classify(json!({"input": texts, "attn_cache": true}));
    assert_eq!(outcomes(&on), ["miss", "miss"]);
    let (_, again) = classify(json!({"input": texts, "attn_cache": true}));
    assert_eq!(outcomes(&again), ["exact_repeat", "exact_repeat"]);
    // a recorded miss is the exact path (up to batching order: within 1e-5)
    for (a, b) in on["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(off["data"].as_array().unwrap())
    {
        assert_eq!(a["label"], b["label"]);
        let (p, q): (Vec<f32>, Vec<f32>) = (
            serde_json::from_value(a["probs"].clone()).unwrap(),
            serde_json::from_value(b["probs"].clone()).unwrap(),
        );
        assert!(max_diff(&p, &q) <= 1e-5, "{p:?} vs {q:?}");
    }
    assert_eq!(again["data"], on["data"]);
    let (s, bad) = classify(json!({"input": [1, 2]}));
    assert_eq!((s, bad["error"]["param"].clone()), (400, json!("input")));

    // a head of another model is refused at start, naming the problem
    let other = TinyModel::new("api-classify-other");
    std::fs::write(other.path().join("config.json"), {
        let mut c: Value = serde_json::from_str(
            &std::fs::read_to_string(other.path().join("config.json")).unwrap(),
        )
        .unwrap();
        c["rms_norm_eps"] = json!(1e-5);
        c.to_string()
    })
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attncache-server"))
        .arg("--model")
        .arg(other.path())
        .args(["--port", "0", "--classifier"])
        .arg(&head)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("train-head"), "{stderr}");
}

#[test]
fn overload_is_refused_at_once_with_429_and_retry_after() {
    let model = TinyModel::new("api-busy");
    let server = Server::start(&model, &["--max-in-flight", "2"]);
    let (s, ok) = post(&server, &json!({"input": ["a b", "c d"]}), None);
    assert_eq!(s, 200, "{ok}");
    let r = client()
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"input": ["a b", "c d", "e f"]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "server_busy");
    // permits come back: the server still serves
    let (s, _) = post(&server, &json!({"input": ["a b", "c d"]}), None);
    assert_eq!(s, 200);
}

#[test]
fn api_keys_guard_every_v1_route_and_leave_probes_open() {
    let model = TinyModel::new("api-keys");
    let server = Server::start(&model, &["--api-key", "k1", "--api-key", "k2"]);
    let body = json!({"model": "default", "input": "the food was great"});
    let send = |path: &str, key: Option<&str>| {
        let mut req = client().post(format!("{}{path}", server.base)).json(&body);
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().unwrap_or(Value::Null))
    };
    let (status, err) = send("/v1/embeddings", None);
    assert_eq!(status, 401);
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert_eq!(err["error"]["type"], "authentication_error");
    assert_eq!(send("/v1/embeddings", Some("k3")).0, 401);
    assert_eq!(send("/v1/embeddings", Some("k")).0, 401);
    assert_eq!(send("/v1/embeddings", Some("k1")).0, 200);
    assert_eq!(send("/v1/embeddings", Some("k2")).0, 200);
    assert_eq!(send("/v1/classify", None).0, 401);
    // mistral.rs's own routes behind ours are guarded too
    let models = |key: Option<&str>| {
        let mut req = client().get(format!("{}/v1/models", server.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        req.send().unwrap().status().as_u16()
    };
    assert_eq!(models(None), 401);
    assert_eq!(models(Some("k2")), 200);
    // probes and scrapers need no key
    let get = |path: &str| {
        client()
            .get(format!("{}{path}", server.base))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get("/health"), 200);
    assert_eq!(get("/metrics"), 200);
}

/// Writes a gate that predicts an error of 1e-4 for every neighbour.
fn flat_gate(dir: &std::path::Path) -> String {
    let path = dir.join("gate.json");
    let gate = json!({
        "coefficients": [1e-4f64.ln(), 0.0, 0.0, 0.0],
        "margin": 0.0, "quantile": 0.9, "max_loss": 0.01, "points": 0, "policy": "test",
        "reuse": {"length_slack": 1}
    });
    std::fs::write(&path, gate.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn the_error_gate_decides_near_hits_and_reports_them() {
    let model = TinyModel::new("api-gate");
    let dir = tempfile::tempdir().unwrap();
    let gate = flat_gate(dir.path());
    let stored = "the staff were lovely and the room was clean";
    let longer = "the staff were really lovely and the room was clean";
    // the gate's recorded policy (length slack 1) applies: another length is a near hit
    let server = Server::start(&model, &["--error-gate", &gate, "--repeat-mib", "0"]);
    let (_, miss) = post(&server, &json!({"input": stored, "attn_cache": true}), None);
    assert_eq!(outcomes(&miss), ["miss"]);
    let (s, near) = post(&server, &json!({"input": longer, "attn_cache": true}), None);
    assert_eq!(s, 200, "{near}");
    assert_eq!(outcomes(&near), ["near_hit"], "{near}");
    let report = &near["attn_cache"]["inputs"][0];
    assert_eq!(report["differing_tokens"], 1, "{report}");
    let predicted = report["predicted_error"].as_f64().unwrap();
    assert!((predicted - 1e-4).abs() < 1e-6, "{report}");
    assert!(report.get("recomputed_rows").is_none(), "{report}");
    let e = &embeddings_of(&near)[0];
    assert!(e.iter().all(|x| x.is_finite()));
    // a stricter target than the gate's prediction: the same input is computed exactly
    let strict = Server::start(
        &model,
        &[
            "--error-gate",
            &gate,
            "--max-error",
            "0.00001",
            "--repeat-mib",
            "0",
        ],
    );
    post(&strict, &json!({"input": stored, "attn_cache": true}), None);
    let (_, refused) = post(&strict, &json!({"input": longer, "attn_cache": true}), None);
    assert_eq!(outcomes(&refused), ["miss"]);
    let (_, off) = post(&strict, &json!({"input": longer}), None);
    assert!(max_diff(&embeddings_of(&refused)[0], &embeddings_of(&off)[0]) <= 1e-6);
    // flags override the gate's policy: no slack, so the longer input has no neighbour
    let no_slack = Server::start(
        &model,
        &[
            "--error-gate",
            &gate,
            "--reuse-layers",
            "0,1",
            "--repeat-mib",
            "0",
        ],
    );
    post(
        &no_slack,
        &json!({"input": stored, "attn_cache": true}),
        None,
    );
    let (_, other_len) = post(
        &no_slack,
        &json!({"input": longer, "attn_cache": true}),
        None,
    );
    assert_eq!(outcomes(&other_len), ["miss"]);
}
