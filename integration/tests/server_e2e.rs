//! End to end: the real `attncache-server` binary on a free loopback port, the tiny model,
//! real HTTP requests.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{embeddings_body, embeddings_of, norm, Server, TinyModel, TEXTS};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

#[test]
fn serves_openai_embeddings_over_http() {
    let model = TinyModel::new("e2e");
    let server = Server::start(&model, &[]);
    let http = client();

    let health = http.get(format!("{}/health", server.base)).send().unwrap();
    assert_eq!(health.status(), 200);
    let models: serde_json::Value = http
        .get(format!("{}/v1/models", server.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        models["data"].as_array().is_some_and(|d| !d.is_empty()),
        "{models}"
    );

    let started = Instant::now();
    let resp = http
        .post(format!("{}/v1/embeddings", server.base))
        .json(&embeddings_body(TEXTS))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().unwrap();
    eprintln!("{} embeddings in {:?}", TEXTS.len(), started.elapsed());
    assert_eq!(body["object"], "list");
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );
    let embeddings = embeddings_of(&body);
    assert_eq!(embeddings.len(), TEXTS.len());
    for (text, e) in TEXTS.iter().zip(&embeddings) {
        assert_eq!(
            e.len(),
            attncache_server::tiny_model::EMBEDDING_DIM,
            "{text}"
        );
        assert!(e.iter().all(|x| x.is_finite()), "{text}: non-finite value");
        assert!(
            (norm(e) - 1.0).abs() < 1e-4,
            "{text}: norm {} (the model ends with Normalize)",
            norm(e)
        );
    }
    // Different texts give different embeddings; the same text gives the same one.
    assert_ne!(embeddings[1], embeddings[2]);
    let again: serde_json::Value = http
        .post(format!("{}/v1/embeddings", server.base))
        .json(&embeddings_body(&[TEXTS[1]]))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let again = embeddings_of(&again);
    let drift = again[0]
        .iter()
        .zip(&embeddings[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        drift <= 1e-5,
        "same text, batch of 1 vs batch of {}: {drift:e}",
        TEXTS.len()
    );
}

#[test]
fn refuses_f16_for_gemma3_with_a_clear_message() {
    let model = TinyModel::new("f16");
    for dtype in ["f16", "auto", "bf16"] {
        let out = Command::new(env!("CARGO_BIN_EXE_attncache-server"))
            .arg("--model")
            .arg(model.path())
            .args(["--port", "0", "--dtype", dtype])
            .output()
            .expect("run attncache-server");
        assert!(!out.status.success(), "--dtype {dtype} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refused") && stderr.contains("f32"),
            "--dtype {dtype}: {stderr}"
        );
    }
}

#[test]
fn rejects_a_directory_that_is_not_a_model() {
    let dir = std::env::temp_dir().join(format!("attncache-not-a-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_attncache-server"))
        .arg("--model")
        .arg(&dir)
        .args(["--port", "0"])
        .output()
        .expect("run attncache-server");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing config.json"), "{stderr}");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_attncache-server"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--host",
        "--port",
        "--exact-attention",
        "--dtype",
        "--max-seqs",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
