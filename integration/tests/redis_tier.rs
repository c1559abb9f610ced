//! The shared (Redis) cold tier against a real `redis-server` on a loopback port: two stores
//! share entries, a damaged value is a miss plus a warning, Redis dying costs nothing but
//! hits, the byte budget holds, an unreachable server at start is not an error.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use attncache_plugin::storage::entry::{AttentionMaps, Entry, Payload};
use attncache_plugin::storage::store::{token_key, MapStore, StoreConfig};
use attncache_plugin::RedisSettings;
use attncache_server::redis_server::RedisServer;
use candle_core::{DType, Device, Tensor};

const FP: u64 = 0xA77E_5CAC_4E00_0002;

fn entry(tokens: &[u32], layers: usize, heads: usize, salt: f32) -> Entry {
    let l = tokens.len();
    let maps = (0..layers)
        .map(|layer| {
            let data: Vec<f32> = (0..heads * l * l)
                .map(|i| 1.0 + ((i as f32 + salt + layer as f32) * 0.37).sin().abs())
                .collect();
            let t = Tensor::from_vec(data, (heads, l, l), &Device::Cpu).unwrap();
            t.broadcast_div(&t.sum_keepdim(2).unwrap())
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        })
        .collect();
    Entry {
        tokens: tokens.into(),
        feature: vec![salt, 1.0, -2.0].into(),
        feature_id: 7,
        payload: Payload::Maps(AttentionMaps {
            heads,
            layers: maps,
        }),
    }
}

fn maps_of(e: &Entry) -> Vec<Vec<f32>> {
    e.map_layers()
        .iter()
        .map(|t| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

fn store(url: &str, prefix: &str, budget: u64) -> MapStore {
    store_for(url, prefix, budget, FP)
}

/// A Redis-backed store for the model fingerprint `fingerprint`.
fn store_for(url: &str, prefix: &str, budget: u64, fingerprint: u64) -> MapStore {
    let settings = RedisSettings {
        url: url.into(),
        prefix: prefix.into(),
        timeout_ms: 300,
        ..RedisSettings::default()
    };
    MapStore::open(StoreConfig {
        hot_bytes: 64 << 20,
        cold_dir: None,
        cold_bytes: budget,
        fingerprint,
        redis: Some(settings.clone()),
        scope: "global".into(),
    })
    .expect("open a Redis-backed store")
}

/// Waits until `store` has learned of `n` entries stored elsewhere, returning them.
fn announced(store: &MapStore, n: usize) -> Vec<attncache_plugin::storage::store::Indexed> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(store.take_announced());
        assert!(
            Instant::now() < deadline,
            "only {} of {n} announcements arrived within 10 s",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// The shared tier's health, which a Redis-backed store always has.
fn health(store: &MapStore) -> attncache_plugin::storage::SharedHealth {
    store.shared_health().expect("a Redis-backed store")
}

fn redis_conn(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn entry_keys(conn: &mut redis::Connection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}:*:e:*"))
        .query(conn)
        .unwrap()
}

#[test]
fn an_entry_stored_through_one_store_is_a_hit_on_another() {
    let server = RedisServer::start().expect("redis-server");
    let a = store(&server.url(), "share", 1 << 30);
    let b = store(&server.url(), "share", 1 << 30);
    let tokens: Vec<u32> = (10..42).collect();
    let stored = entry(&tokens, 3, 2, 0.5);
    assert!(b.get(&tokens).is_none(), "nothing stored yet");

    a.insert(stored.clone());
    a.flush();
    let news = announced(&b, 1);
    assert_eq!(news.len(), 1);
    assert_eq!(news[0].key, token_key(&tokens));
    assert_eq!(&*news[0].tokens, &tokens[..]);
    assert_eq!(news[0].feature, vec![0.5, 1.0, -2.0]);
    assert_eq!(news[0].feature_id, 7);
    assert!(
        a.take_announced().is_empty(),
        "a store does not announce its own entries to itself"
    );

    let got = b.get(&tokens).expect("B reads A's entry from Redis");
    assert_eq!(maps_of(&got), maps_of(&stored));
    assert_eq!(b.stats().cold_hits.load(Ordering::Relaxed), 1);
    // now in B's own hot tier
    assert!(b.get(&tokens).is_some());
    assert_eq!(b.stats().hot_hits.load(Ordering::Relaxed), 1);
    let (entries, bytes) = a.cold_usage();
    assert_eq!(entries, 1);
    assert!(bytes > stored.bytes() as u64, "{bytes}");
    assert!(!health(&b).down);

    // another prefix is another deployment, another scope another tenant: nothing shared
    let other = store(&server.url(), "elsewhere", 1 << 30);
    let tenant = |name: &str| {
        let settings = RedisSettings {
            url: server.url(),
            prefix: "share".into(),
            ..RedisSettings::default()
        };
        MapStore::open(StoreConfig {
            hot_bytes: 64 << 20,
            cold_dir: None,
            cold_bytes: 1 << 30,
            fingerprint: FP,
            redis: Some(settings.clone()),
            scope: format!("scope-{name}"),
        })
        .expect("open a scoped store")
    };
    let (t1, t2) = (tenant("t1"), tenant("t2"));
    t1.insert(entry(&tokens, 3, 2, 0.5));
    t1.flush();
    assert_eq!(announced(&tenant("t1"), 1).len(), 1, "same tenant: shared");
    std::thread::sleep(Duration::from_millis(700));
    for s in [&other, &t2] {
        assert!(s.take_announced().is_empty());
        assert!(s.get(&tokens).is_none());
    }
}

#[test]
fn a_corrupted_value_is_a_miss_with_a_warning_and_is_removed() {
    let server = RedisServer::start().expect("redis-server");
    let a = store(&server.url(), "dmg", 1 << 30);
    let b = store(&server.url(), "dmg", 1 << 30);
    let tokens: Vec<u32> = (100..124).collect();
    a.insert(entry(&tokens, 2, 2, 1.5));
    a.flush();
    announced(&b, 1);

    let mut conn = redis_conn(&server);
    let keys = entry_keys(&mut conn, "dmg");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let len: usize = redis::cmd("STRLEN").arg(&keys[0]).query(&mut conn).unwrap();
    // flip one byte of the maps (past the header, tokens and feature)
    let at = len - 17;
    let byte: Vec<u8> = redis::cmd("GETRANGE")
        .arg(&keys[0])
        .arg(at)
        .arg(at)
        .query(&mut conn)
        .unwrap();
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&keys[0])
        .arg(at)
        .arg(vec![byte[0] ^ 0x5a])
        .query(&mut conn)
        .unwrap();

    assert!(b.get(&tokens).is_none(), "a damaged value is never used");
    assert_eq!(b.stats().corrupt.load(Ordering::Relaxed), 1);
    assert_eq!(b.stats().cold_hits.load(Ordering::Relaxed), 0);
    let exists: i64 = redis::cmd("EXISTS").arg(&keys[0]).query(&mut conn).unwrap();
    assert_eq!(exists, 0, "the damaged value is deleted");
    let total: i64 = redis::cmd("GET")
        .arg(format!("dmg:{FP:016x}:global:bytes"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(total, 0, "and no longer counted in the budget");
    assert!(!health(&b).down);

    // a value stored under another input's key is caught too
    let other: Vec<u32> = (200..224).collect();
    a.insert(entry(&other, 2, 2, 2.5));
    a.flush();
    announced(&b, 1);
    let keys = entry_keys(&mut conn, "dmg");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let swapped = attncache_plugin::storage::entry::encode(&entry(&tokens, 2, 2, 1.5), FP).unwrap();
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg(swapped)
        .query(&mut conn)
        .unwrap();
    assert!(b.get(&other).is_none());
    assert_eq!(b.stats().corrupt.load(Ordering::Relaxed), 2);
}

#[test]
fn redis_dying_costs_hits_not_requests_and_the_tier_recovers() {
    let mut server = RedisServer::start().expect("redis-server");
    let port = server.port();
    let a = store(&server.url(), "down", 1 << 30);
    let b = store(&server.url(), "down", 1 << 30);
    let first: Vec<u32> = (1..33).collect();
    let second: Vec<u32> = (33..65).collect();
    a.insert(entry(&first, 2, 2, 0.1));
    a.insert(entry(&second, 2, 2, 0.2));
    a.flush();
    announced(&b, 2);
    assert!(b.get(&first).is_some());

    server.kill();
    let started = Instant::now();
    assert!(b.get(&second).is_none(), "Redis is gone: a miss");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a miss within the timeout, took {:?}",
        started.elapsed()
    );
    assert!(b.get(&first).is_some(), "B's hot tier still serves");
    assert!(health(&b).down);
    assert!(health(&b).errors >= 1);
    // while marked down, calls are skipped at once
    let started = Instant::now();
    assert!(b.get(&second).is_none());
    assert!(started.elapsed() < Duration::from_millis(100));
    // writes are skipped, not queued forever, and do not block the caller
    let third: Vec<u32> = (65..97).collect();
    let started = Instant::now();
    a.insert(entry(&third, 2, 2, 0.3));
    assert!(started.elapsed() < Duration::from_millis(100));
    a.flush();
    assert!(a.get(&third).is_some(), "A keeps it in RAM");
    assert!(a.stats().cold_write_failures.load(Ordering::Relaxed) >= 1);

    // Redis comes back (empty: no persistence): the tier reconnects and shares again
    let _server = RedisServer::start_on(port).expect("redis-server again");
    let fourth: Vec<u32> = (97..129).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        a.insert(entry(&fourth, 2, 2, 0.4));
        a.flush();
        if !health(&a).down && a.cold_usage().0 == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the tier did not reconnect");
        std::thread::sleep(Duration::from_millis(300));
    }
    let news = announced(&b, 1);
    assert!(news.iter().any(|n| n.key == token_key(&fourth)));
    assert!(b.get(&fourth).is_some(), "shared again after the restart");
}

#[test]
fn prefix_blocks_in_redis_keep_their_byte_budget_and_are_not_announced() {
    use attncache_plugin::prefix::{BlockTier, RedisBlocks};
    let server = RedisServer::start().expect("redis-server");
    let settings = RedisSettings {
        url: server.url(),
        prefix: "blocks".into(),
        ..RedisSettings::default()
    };
    let tier = RedisBlocks::open(settings, 7, 300).expect("open");
    // last use is kept in milliseconds: space the writes so that no two share one
    let put = |key: u64| {
        let evicted = tier.write(key, &[key as u8; 100]).expect("write");
        std::thread::sleep(Duration::from_millis(5));
        evicted
    };
    assert_eq!((put(1), put(2), put(3)), (0, 0, 0));
    // reading 1 makes 2 the least recently used: a fourth block removes it
    assert_eq!(tier.read(1).expect("read"), Some(vec![1u8; 100]));
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(put(4), 1);
    assert_eq!(tier.read(2).expect("read"), None);
    assert_eq!(tier.read(4).expect("read"), Some(vec![4u8; 100]));
    assert_eq!(tier.usage(), (3, 300));
    tier.remove(4);
    assert_eq!(tier.read(4).expect("read"), None);
    // nothing announced: the entries' stream of any scope stays empty
    let mut conn = redis::Client::open(server.url().as_str())
        .expect("client")
        .get_connection()
        .expect("connection");
    let streams: Vec<String> = redis::cmd("KEYS")
        .arg("blocks:*stream*")
        .query(&mut conn)
        .expect("keys");
    assert!(streams.is_empty(), "{streams:?}");
}

#[test]
fn the_byte_budget_keeps_the_most_recently_used_entries() {
    let server = RedisServer::start().expect("redis-server");
    let one = attncache_plugin::storage::entry::encode(&entry(&[0; 32], 2, 2, 0.0), FP)
        .unwrap()
        .len() as u64;
    let a = store(&server.url(), "budget", 3 * one);
    let b = store(&server.url(), "budget", 3 * one);
    let inputs: Vec<Vec<u32>> = (0..6u32).map(|i| vec![i + 1; 32]).collect();
    // last use is kept in milliseconds: space the writes so that no two share one
    let put = |i: usize| {
        a.insert(entry(&inputs[i], 2, 2, i as f32));
        a.flush();
        std::thread::sleep(Duration::from_millis(5));
    };
    (0..3).for_each(put);
    announced(&b, 3);
    // use the first one, so the second is now the least recently used
    assert!(b.get(&inputs[0]).is_some());
    std::thread::sleep(Duration::from_millis(5));
    (3..5).for_each(put);
    let (entries, bytes) = a.cold_usage();
    assert_eq!(entries, 3);
    assert!(bytes <= 3 * one, "{bytes} > {}", 3 * one);
    assert_eq!(a.stats().cold_evictions.load(Ordering::Relaxed), 2);
    announced(&b, 2);
    let c = store(&server.url(), "budget", 3 * one); // no hot tier of its own yet
    announced(&c, 5);
    assert!(c.get(&inputs[0]).is_some(), "recently used: kept");
    assert!(c.get(&inputs[1]).is_none(), "least recently used: evicted");
    assert!(
        c.get(&inputs[2]).is_none(),
        "next least recently used: evicted"
    );
    assert!(c.get(&inputs[3]).is_some());
    assert!(c.get(&inputs[4]).is_some());
}

#[test]
fn an_unreachable_server_at_start_is_a_warning_not_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = store(&format!("redis://127.0.0.1:{port}"), "none", 1 << 30);
    let tokens: Vec<u32> = (1..17).collect();
    s.insert(entry(&tokens, 1, 1, 0.0));
    s.flush();
    assert!(s.get(&tokens).is_some(), "served from the hot tier");
    assert!(s.get(&[9; 16]).is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !health(&s).down {
        assert!(Instant::now() < deadline, "never marked down");
        std::thread::sleep(Duration::from_millis(20));
    }
    // an invalid URL is refused by name
    let bad = RedisSettings {
        url: "http://not-redis".into(),
        ..RedisSettings::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("redis_url"), "{err}");
    // TLS is not compiled in: refused at start rather than failing on every call
    let tls = RedisSettings {
        url: "rediss://127.0.0.1:6380".into(),
        ..RedisSettings::default()
    };
    assert!(tls.validate().is_err());
    // and a password never reaches an error message
    let secret = RedisSettings {
        url: "redis://:hunter2@[bad".into(),
        ..RedisSettings::default()
    };
    let err = secret.validate().unwrap_err().to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn timing_reads_prices_a_shared_hit_without_storing_or_announcing_anything() {
    use attncache_plugin::tiering::costs::{measure, ColdSource, EntryShape};
    let mut server = RedisServer::start().expect("redis-server");
    let a = store(&server.url(), "probe", 1 << 30);
    let b = store(&server.url(), "probe", 1 << 30);
    let tier = a.cold_tier().expect("a Redis cold tier");
    assert_eq!(tier.kind(), "redis");

    // the bytes read back are the bytes written, once per repetition
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut reads = 0;
    let times = tier
        .time_reads(&payload, 4, &mut |got: &[u8]| {
            reads += 1;
            if got == payload.as_slice() {
                Ok(())
            } else {
                Err("other bytes".into())
            }
        })
        .expect("time reads");
    assert_eq!((times.len(), reads), (4, 4));
    assert!(times.iter().all(|t| t.is_finite() && *t > 0.0), "{times:?}");

    // the costs the hot tier's sizing uses, with cold hits read from Redis
    let shape = EntryShape {
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
        tokens: 48,
    };
    let m = measure(&shape, ColdSource::Tier(tier), 3).expect("measure through Redis");
    assert!(
        m.cold_hit_ns.is_finite() && m.cold_hit_ns > 0.0 && m.hot_hit_ns > 0.0,
        "{m:?}"
    );

    // nothing is left behind, nothing counts against the budget, no replica indexes it
    let mut conn = redis_conn(&server);
    let left: Vec<String> = redis::cmd("KEYS").arg("probe:*").query(&mut conn).unwrap();
    assert!(
        left.iter().all(|k| !k.contains(":probe:")),
        "probe keys left: {left:?}"
    );
    assert!(entry_keys(&mut conn, "probe").is_empty());
    assert_eq!(a.cold_usage(), (0, 0));
    std::thread::sleep(Duration::from_millis(200));
    assert!(b.take_announced().is_empty(), "a probe is never announced");

    // a tier that is down says so instead of returning made-up times
    server.kill();
    let started = Instant::now();
    let down = tier.time_reads(&payload, 2, &mut |_: &[u8]| Ok(()));
    assert!(down.is_err(), "{down:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_sizing_prices_a_hot_miss_as_a_redis_read_not_as_a_recomputation() {
    use attncache_plugin::tiering::sizing::CostModel;
    use attncache_plugin::{AttnCache, CacheConfig};
    let server = RedisServer::start().expect("redis-server");
    let cost = CostModel {
        hot_hit_ns: 1e6,
        cold_hit_ns: 2e6,
        miss_ns: 5e6,
        request_ns: 0.0,
    };
    let shared = AttnCache::open(
        CacheConfig {
            redis: Some(RedisSettings {
                url: server.url(),
                prefix: "priced".into(),
                ..RedisSettings::default()
            }),
            ..CacheConfig::default()
        },
        FP,
    )
    .expect("a Redis-backed cache");
    assert_eq!(shared.cold_kind(), Some("redis"));
    shared.set_tier_costs(cost);
    // a hot-tier miss reads Redis: the measured read cost stands (it used to be the miss's)
    assert_eq!(shared.hot_tier_sizing().cost, Some(cost));

    // with no cold tier at all a hot-tier miss is a recomputation
    let ram_only = AttnCache::open(CacheConfig::default(), FP).expect("a RAM-only cache");
    assert_eq!(ram_only.cold_kind(), None);
    ram_only.set_tier_costs(cost);
    let priced = ram_only.hot_tier_sizing().cost.expect("costs set");
    assert_eq!(priced.cold_hit_ns, cost.miss_ns);
}

/// Entries filed under the model fingerprint of an earlier build's key scheme are misses for
/// a store of the stable one, and stay in Redis untouched (never deleted as corrupt): the
/// tier only counts them, in the background, and logs that count.
#[test]
fn entries_of_the_old_key_scheme_are_misses_and_left_in_place() {
    let server = RedisServer::start().expect("redis-server");
    let old = store_for(&server.url(), "keys", 1 << 30, FP);
    let tokens: Vec<u32> = (20..52).collect();
    old.insert(entry(&tokens, 2, 2, 0.5));
    old.flush();
    drop(old);
    let mut conn = redis_conn(&server);
    assert_eq!(entry_keys(&mut conn, "keys").len(), 1);

    let stable = store_for(&server.url(), "keys", 1 << 30, FP ^ 0xFFFF);
    assert_eq!(
        stable.legacy_entries(FP),
        0,
        "a shared tier counts in the background, never on the start's path"
    );
    assert!(stable.get(&tokens).is_none(), "the old entry is a miss");
    std::thread::sleep(Duration::from_millis(300)); // the background count has run
    assert_eq!(stable.stats().corrupt.load(Ordering::Relaxed), 0);
    assert_eq!(
        entry_keys(&mut conn, "keys").len(),
        1,
        "and it is still in Redis"
    );
}
