//! Two `attncache-server` replicas (real binaries, tiny model) sharing one cache through a
//! real `redis-server`: what replica A stores is a hit on replica B, a damaged value in
//! Redis is a miss with the exact answer, and Redis dying mid-run fails no request.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use attncache_server::redis_server::RedisServer;
use common::{embeddings_of, metric, outcomes, Server, TinyModel};
use serde_json::{json, Value};

fn post(server: &Server, texts: &[&str]) -> (u16, Value) {
    let resp = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"input": texts}))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

/// The flags of a replica using the Redis at `url`, then `rest`.
fn replica_flags<'a>(url: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--attn-cache",
        "on",
        "--cache-backend",
        "redis",
        "--redis-url",
        url,
    ];
    flags.extend_from_slice(rest);
    flags
}

/// How many times Redis has run `command` (lower case) since it started.
fn redis_calls(conn: &mut redis::Connection, command: &str) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Waits until `server` has indexed `n` entries announced by other replicas.
fn wait_announced(server: &Server, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = metric(&server.metrics(), "attncache_shared_announced_total");
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica learned of {got} entries, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn entry_keys(conn: &mut redis::Connection) -> HashSet<String> {
    redis::cmd("KEYS")
        .arg("attncache:*:e:*")
        .query::<Vec<String>>(conn)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn two_replicas_share_one_cache_through_redis() {
    let mut redis_server = RedisServer::start().expect("redis-server");
    let url = redis_server.url();
    let model = TinyModel::new("scale-out");
    let flags = replica_flags(
        &url,
        &["--redis-timeout-ms", "300", "--hot-sizing", "fixed"],
    );
    let a = Server::start(&model, &flags);
    let b = Server::start(&model, &flags);
    assert_eq!(metric(&a.metrics(), "attncache_shared_tier_up"), 1.0);

    // A computes and stores; B, which never saw these texts, hits on A's entries
    let texts = [
        "the food was great and the staff were lovely",
        "a long wait, cold soup and a rude waiter",
        "hello there",
    ];
    let (s, on_a) = post(&a, &texts);
    assert_eq!(s, 200, "{on_a}");
    assert_eq!(outcomes(&on_a), ["miss", "miss", "miss"]);
    wait_announced(&b, 3.0);
    let (s, on_b) = post(&b, &texts);
    assert_eq!(s, 200, "{on_b}");
    assert_eq!(outcomes(&on_b), ["hit", "hit", "hit"], "{on_b}");
    let d = max_diff(&embeddings_of(&on_a), &embeddings_of(&on_b));
    assert!(d <= 1e-4, "a hit reuses A's f16 maps: within 1e-4, got {d}");
    let mb = b.metrics();
    assert_eq!(
        metric(&mb, "attncache_cold_hits_total"),
        3.0,
        "read from Redis"
    );
    assert_eq!(metric(&mb, "attncache_recorded_total"), 0.0);
    assert_eq!(metric(&mb, "attncache_corrupt_entries_total"), 0.0);
    assert_eq!(metric(&mb, "attncache_cold_entries"), 3.0, "{mb}");

    // a damaged value in Redis: a miss, the exact answer, counted like a corrupt file
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let before = entry_keys(&mut conn);
    let fresh = ["a completely different review of a small cafe"];
    let (_, exact_a) = post(&a, &fresh);
    assert_eq!(outcomes(&exact_a), ["miss"]);
    wait_announced(&b, 4.0);
    let added: Vec<String> = entry_keys(&mut conn).difference(&before).cloned().collect();
    assert_eq!(added.len(), 1, "{added:?}");
    let len: usize = redis::cmd("STRLEN")
        .arg(&added[0])
        .query(&mut conn)
        .unwrap();
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&added[0])
        .arg(len - 3)
        .arg(b"\x13\x37\x42".to_vec())
        .query(&mut conn)
        .unwrap();
    let (s, damaged) = post(&b, &fresh);
    assert_eq!(s, 200, "{damaged}");
    assert_eq!(
        outcomes(&damaged),
        ["miss"],
        "a damaged entry is never used"
    );
    let d = max_diff(&embeddings_of(&exact_a), &embeddings_of(&damaged));
    assert!(d <= 1e-6, "computed exactly: {d}");
    assert_eq!(metric(&b.metrics(), "attncache_corrupt_entries_total"), 1.0);

    // Redis dies: every request still succeeds, with the exact path or local hits
    redis_server.kill();
    let others = ["the service was slow but friendly", "hello there"];
    for replica in [&a, &b] {
        let (s, body) = post(replica, &others);
        assert_eq!(s, 200, "{body}");
        let (s, body) = post(replica, &texts);
        assert_eq!(s, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for replica in [&a, &b] {
        while metric(&replica.metrics(), "attncache_shared_tier_up") != 0.0 {
            assert!(Instant::now() < deadline, "Redis down was never reported");
            std::thread::sleep(Duration::from_millis(50));
        }
        let health = reqwest::blocking::get(format!("{}/health", replica.base)).unwrap();
        assert_eq!(health.status(), 200);
        assert!(metric(&replica.metrics(), "attncache_shared_tier_errors_total") >= 1.0);
    }
}

#[test]
fn the_redis_flags_are_checked_before_the_model_loads() {
    let model = TinyModel::new("scale-out-flags");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_attncache-server"))
            .args(Server::args(&model, extra))
            .env_remove("ATTNCACHE_REDIS_URL")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--cache-backend", "redis"]);
    assert!(err.contains("--redis-url"), "{err}");
    let err = run(&["--redis-url", "redis://127.0.0.1:1"]);
    assert!(err.contains("--cache-backend redis"), "{err}");
    let err = run(&["--cache-backend", "redis", "--redis-url", "http://x"]);
    assert!(err.contains("redis_url"), "{err}");
    let err = run(&[
        "--cache-backend",
        "redis",
        "--redis-url",
        "redis://127.0.0.1:1",
        "--cache-dir",
        "/tmp/x",
    ]);
    assert!(
        err.contains("cache-dir") || err.contains("cache_dir"),
        "{err}"
    );
}

#[test]
fn automatic_hot_sizing_prices_cold_hits_by_reading_from_redis() {
    let redis_server = RedisServer::start().expect("redis-server");
    let url = redis_server.url();
    let model = TinyModel::new("scale-out-sizing");
    let flags = replica_flags(&url, &["--hot-sizing", "auto"]);
    let a = Server::start(&model, &flags);
    let b = Server::start(&model, &flags);
    let m = a.metrics();
    let cold = m
        .lines()
        .find(|l| l.starts_with("attncache_tier_cost_seconds{kind=\"cold_hit\"}"))
        .unwrap_or_else(|| panic!("no cold-hit cost in the metrics:\n{m}"));
    let seconds: f64 = cold
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(seconds.is_finite() && seconds > 0.0, "{cold}");
    // the startup probe leaves nothing in Redis and is no entry for the other replica
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(
        keys.iter().all(|k| !k.contains(":probe:")),
        "probe left: {keys:?}"
    );
    assert!(entry_keys(&mut conn).is_empty(), "{keys:?}");
    assert_eq!(
        metric(&b.metrics(), "attncache_shared_announced_total"),
        0.0
    );
    // no request was served yet: every GET so far is a replica timing its reads (7 each)
    let gets = redis_calls(&mut conn, "get");
    assert!(
        gets >= 14,
        "the replicas read no probe from Redis: {gets} GETs"
    );
    let (s, body) = post(&a, &["the shared tier is priced as it is"]);
    assert_eq!(s, 200, "{body}");
}

#[test]
fn a_replica_started_while_redis_is_down_prices_cold_hits_by_redis_once_it_answers() {
    // a port where nothing listens yet
    let mut first = RedisServer::start().expect("redis-server");
    let port = first.port();
    let url = first.url();
    first.kill();
    let model = TinyModel::new("scale-out-reprice");
    let a = Server::start(
        &model,
        &replica_flags(
            &url,
            &[
                "--redis-timeout-ms",
                "300",
                "--hot-sizing",
                "auto",
                "--hot-resize-secs",
                "1",
            ],
        ),
    );
    let (s, body) = post(&a, &["served while Redis is down"]);
    assert_eq!(s, 200, "{body}");

    // Redis comes up: the next sizing round times reads from it (the probe: one SET, 7
    // GETs, one DEL; no request is served meanwhile, so nothing else writes)
    let redis_server = RedisServer::start_on(port).expect("redis-server on the same port");
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while redis_calls(&mut conn, "del") < 1 {
        assert!(
            Instant::now() < deadline,
            "the replica never timed reads from Redis after it came up"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(redis_calls(&mut conn, "get") >= 7);
    // once priced by Redis it stops probing (three more sizing rounds)
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        (redis_calls(&mut conn, "set"), redis_calls(&mut conn, "del")),
        (1, 1),
        "one probe, written once and removed"
    );
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(
        keys.iter().all(|k| !k.contains(":probe:")),
        "probe left: {keys:?}"
    );
    let m = a.metrics();
    let cold: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("attncache_tier_cost_seconds{kind=\"cold_hit\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cold-hit cost in the metrics:\n{m}"));
    assert!(cold.is_finite() && cold > 0.0, "{cold}");
    drop(redis_server);
}
