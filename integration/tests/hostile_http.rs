//! Hostile HTTP over the wire: 500+ generated requests against the real `attncache-server`
//! through raw TCP — deeply nested JSON, huge and 100k-input bodies, invalid UTF-8, NaN /
//! negative / huge / fractional token ids, truncated and random bodies, wrong methods and
//! content types, bodies announced over the limit, stalled bodies. Every one must get a
//! 4xx answer (413 for oversize, 408 for a stalled body), the server must stay healthy, a
//! valid request must still give exactly the same answer, and nothing may reach the cache.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{metric, Server, TinyModel};

/// A deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One request: method, path, extra headers, body, and whether to announce a length.
struct Raw {
    kind: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<String>,
    body: Vec<u8>,
}

fn post_json(kind: &'static str, body: impl Into<Vec<u8>>) -> Raw {
    Raw {
        kind,
        method: "POST",
        path: "/v1/embeddings",
        headers: vec!["Content-Type: application/json".into()],
        body: body.into(),
    }
}

/// Sends `raw` on a fresh connection and returns the status code of the answer.
fn send(addr: &str, raw: &Raw) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\n", raw.method, raw.path);
    for h in &raw.headers {
        head += h;
        head += "\r\n";
    }
    if !raw.headers.iter().any(|h| h.starts_with("Content-Length")) {
        head += &format!("Content-Length: {}\r\n", raw.body.len());
    }
    head += "Connection: close\r\n\r\n";
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    // the server may answer (and close) before reading a body it refuses
    let _ = s.write_all(&raw.body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {:?}", text.get(..60)))
}

fn generate(rng: &mut Rng) -> Vec<Raw> {
    let mut out = Vec::new();
    let valid =
        br#"{"model": "default", "input": ["the food was great", "hello"], "attn_cache": true}"#;
    // deeply nested arrays and objects
    for i in 0..50 {
        let depth = [64, 129, 1000, 100_000][i % 4] + rng.below(50);
        let (open, close) = if i % 2 == 0 {
            ("[", "]")
        } else {
            ("{\"a\":", "}")
        };
        let body = format!(
            "{{\"input\": {}1{}}}",
            open.repeat(depth),
            close.repeat(depth)
        );
        out.push(post_json("nested", body));
    }
    // invalid UTF-8 inside a string, and as the whole body
    for i in 0..50 {
        let mut body = br#"{"input": "the "#.to_vec();
        body.extend((0..1 + rng.below(8)).map(|_| 0x80 + rng.below(0x40) as u8));
        if i % 2 == 0 {
            body.extend(br#" food"}"#);
        }
        out.push(post_json("invalid utf-8", body));
    }
    // bad token ids
    let ids = [
        "NaN",
        "-1",
        "1e30",
        "4294967296",
        "1.5",
        "\"7\"",
        "null",
        "-0.0",
        "Infinity",
        "1e400",
    ];
    for i in 0..60 {
        let bad = ids[i % ids.len()];
        let body = if i % 3 == 0 {
            format!("{{\"input\": [[5, {bad}, 6]]}}")
        } else {
            format!("{{\"input\": [5, 6, {bad}]}}")
        };
        out.push(post_json("token ids", body));
    }
    // 100k inputs, and one huge string
    for _ in 0..3 {
        let body = format!(
            "{{\"input\": [{}\"a\"]}}",
            "\"the food\",".repeat(100_000 - 1)
        );
        out.push(post_json("100k inputs", body));
    }
    for _ in 0..2 {
        let body = format!(
            "{{\"input\": \"{}\"}}",
            "the food was great ".repeat(150_000)
        );
        out.push(post_json("huge input", body));
    }
    // bodies announced over the limit (never sent)
    for _ in 0..20 {
        out.push(Raw {
            kind: "announced over 32 MiB",
            method: "POST",
            path: "/v1/embeddings",
            headers: vec![
                "Content-Type: application/json".into(),
                format!("Content-Length: {}", (33u64 << 20) + rng.next() % (1 << 40)),
            ],
            body: Vec::new(),
        });
    }
    // truncated valid bodies: never valid JSON
    for _ in 0..150 {
        let cut = rng.below(valid.len() - 1);
        out.push(post_json("truncated", valid[..cut].to_vec()));
    }
    // random bytes
    for _ in 0..100 {
        let n = 1 + rng.below(300);
        let body: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        out.push(post_json("random bytes", body));
    }
    // wrong content types, methods, lengths
    for i in 0..30 {
        let mut r = post_json("content type", valid.to_vec());
        r.headers = match i % 3 {
            0 => vec!["Content-Type: text/plain".into()],
            1 => vec![],
            _ => vec!["Content-Type: application/x-www-form-urlencoded".into()],
        };
        out.push(r);
    }
    for i in 0..20 {
        let mut r = post_json("method", valid.to_vec());
        r.method = ["PUT", "DELETE", "PATCH", "GET"][i % 4];
        out.push(r);
    }
    for i in 0..20 {
        let mut r = post_json("bad length header", valid.to_vec());
        r.headers.push(
            [
                "Content-Length: abc",
                "Content-Length: -5",
                "Content-Length: 1 2",
            ][i % 3]
                .into(),
        );
        out.push(r);
    }
    // bad requests on the classification route too (no head loaded: 4xx either way)
    for _ in 0..20 {
        let cut = rng.below(valid.len() - 1);
        let mut r = post_json("classify truncated", valid[..cut].to_vec());
        r.path = "/v1/classify";
        out.push(r);
    }
    out
}

fn counters(base: &str) -> (f64, f64, f64) {
    let m = reqwest::blocking::get(format!("{base}/metrics"))
        .expect("metrics")
        .text()
        .expect("text");
    (
        metric(&m, "attncache_lookups_total"),
        metric(&m, "attncache_recorded_total"),
        metric(&m, "attncache_corrupt_entries_total"),
    )
}

fn embed(base: &str) -> Vec<u8> {
    let resp = reqwest::blocking::Client::new()
        .post(format!("{base}/v1/embeddings"))
        .json(&serde_json::json!({"input": ["the food was great", "hello"], "encoding_format": "base64"}))
        .send()
        .expect("valid request");
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().expect("json");
    v["data"].to_string().into_bytes()
}

#[test]
fn five_hundred_hostile_requests_all_get_4xx_and_change_nothing() {
    let model = TinyModel::new("hostile-http");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &model,
        &[
            "--attn-cache",
            "on",
            "--cache-dir",
            dir.path().to_str().unwrap(),
            "--body-timeout-secs",
            "2",
        ],
    );
    let base = server.base.clone();
    let addr = base.trim_start_matches("http://").to_string();
    let reference = embed(&base);
    let before = counters(&base);

    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let requests = generate(&mut rng);
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for r in &requests {
        let got = send(&addr, r);
        if let Ok(code) = got {
            *seen.entry((r.kind, code)).or_insert(0) += 1;
        }
        match got {
            Ok(code) if (400..500).contains(&code) => {}
            Ok(code) => failures.push(format!("{}: answered {code}", r.kind)),
            Err(e) => failures.push(format!("{}: {e}", r.kind)),
        }
    }
    eprintln!("answers by kind: {seen:?}");
    // stalled bodies: a length is announced, a few bytes arrive, then nothing
    let stalled: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let head = format!(
                    "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"input\""
                );
                s.write_all(head.as_bytes()).unwrap();
                let started = std::time::Instant::now();
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
                (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
            })
        })
        .collect();
    for t in stalled {
        let (answer, waited) = t.join().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "stalled body: {:?}",
            answer.get(..40)
        );
        assert!(
            waited < Duration::from_secs(10),
            "408 came after {waited:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile requests were not refused with a 4xx: {:?}",
        failures.len(),
        requests.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        requests.len() + 4 >= 500,
        "only {} requests",
        requests.len()
    );

    // healthy, unchanged, nothing cached
    let health = reqwest::blocking::get(format!("{base}/health")).expect("health");
    assert!(health.status().is_success());
    let after = counters(&base);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2),
        (0.0, 0.0, 0.0),
        "hostile requests reached the cache"
    );
    assert_eq!(
        embed(&base),
        reference,
        "a valid request now answers differently"
    );
}
