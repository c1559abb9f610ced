//! The announcement stream: every replica follows `base:stream` and indexes the entries the
//! others stored, so they become hits here within one stream read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{AsyncConnectionConfig, RedisResult, Value};

use super::{Inner, RETRY_AFTER};
use crate::storage::entry::{self, Indexed};

/// How long one `XREAD` of the stream blocks waiting for new messages.
const STREAM_BLOCK: Duration = Duration::from_millis(500);

/// Messages read from the stream per call, at most.
const STREAM_BATCH: usize = 256;

impl Inner {
    /// Handles one announcement: indexes another replica's entry of this model.
    fn announce(&self, message: &redis::streams::StreamId) {
        let origin = match message.map.get("origin") {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        if origin == self.origin {
            return;
        }
        let Some(Value::BulkString(prefix)) = message.map.get("prefix") else {
            return;
        };
        let Ok(header) = entry::read_header(prefix, self.fingerprint) else {
            tracing::debug!(id = %message.id, "ignoring an announcement of another format or model");
            return;
        };
        let Some((tokens, feature)) = entry::read_prefix(prefix, &header) else {
            return;
        };
        let key = crate::storage::stable_hash::token_key(&tokens);
        let bytes = (entry::HEADER_BYTES + header.payload) as u64;
        self.known.insert(key, (header.len, bytes));
        self.health.announced.fetch_add(1, Ordering::Relaxed);
        self.announced.lock().push(Indexed {
            key,
            len: header.len,
            tokens: tokens.into(),
            feature,
            feature_id: header.feature_id,
        });
    }
}

/// Follows the announcement stream from its start until the tier is dropped, reconnecting
/// after failures; also refreshes the shared entry and byte counts after news, and at least
/// once a second.
pub(super) async fn follow_stream(inner: Arc<Inner>) {
    let mut last_id = "0-0".to_string();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(inner.config.timeout()))
        .set_response_timeout(Some(STREAM_BLOCK + inner.config.timeout() * 10));
    let mut refreshed = Instant::now() - Duration::from_secs(10);
    while !inner.stop.load(Ordering::Relaxed) {
        let mut conn = match inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                inner.mark_down(&e.to_string());
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        // Redis answers again: get the shared connection reconnected too (its first call
        // after an outage fails and starts the reconnect) before calls resume
        for _ in 0..5 {
            let mut shared = inner.conn.clone();
            let pong: RedisResult<String> = redis::cmd("PING").query_async(&mut shared).await;
            if pong.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while !inner.stop.load(Ordering::Relaxed) {
            let read: RedisResult<Option<redis::streams::StreamReadReply>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(STREAM_BATCH)
                .arg("BLOCK")
                .arg(STREAM_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&inner.keys.stream)
                .arg(&last_id)
                .query_async(&mut conn)
                .await;
            let mut news = false;
            match read {
                Ok(reply) => {
                    inner.mark_up();
                    for stream in reply.map(|r| r.keys).unwrap_or_default() {
                        for message in &stream.ids {
                            inner.announce(message);
                            last_id.clone_from(&message.id);
                            news = true;
                        }
                    }
                }
                Err(e) => {
                    inner.mark_down(&e.to_string());
                    break;
                }
            }
            if news || refreshed.elapsed() >= Duration::from_secs(1) {
                refreshed = Instant::now();
                let counts: RedisResult<(u64, Option<u64>)> = redis::pipe()
                    .cmd("ZCARD")
                    .arg(&inner.keys.lru)
                    .cmd("GET")
                    .arg(&inner.keys.total)
                    .query_async(&mut conn)
                    .await;
                if let Ok((entries, bytes)) = counts {
                    inner.entries.store(entries, Ordering::Relaxed);
                    inner.bytes.store(bytes.unwrap_or(0), Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}
