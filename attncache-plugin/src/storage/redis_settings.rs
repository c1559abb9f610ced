//! [`RedisSettings`]: where a shared cold tier lives in Redis, and [`redacted_url`] for
//! logging its URL. Built with or without the `redis` cargo feature, so a configuration can
//! name Redis everywhere; only the tier itself ([`crate::storage::redis_tier`]) needs it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{bad, AttnCacheError};

/// Where a shared cold tier lives in Redis, and how long a request waits for it: the one
/// settings struct of the Redis tier, from the flags or TOML to the tier itself.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Server URL, `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Key prefix; replicas with the same prefix and model share entries.
    pub prefix: String,
    /// Seconds an entry lives after its last use (0: until the byte budget evicts it).
    pub ttl_secs: u64,
    /// Longest a request waits for Redis, milliseconds, plus the entry's bytes at
    /// 100 MiB/s (then: a miss, and Redis is skipped for a second). Writes, off the request
    /// path, wait 10x.
    pub timeout_ms: u64,
    /// Announcements of new entries kept in each scope's stream (a replica that falls
    /// further behind, or starts later, does not index the older entries; exact-token hits
    /// on them still work).
    pub stream_len: usize,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "attncache".into(),
            ttl_secs: 0,
            timeout_ms: 200,
            stream_len: 10_000,
        }
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redacted_url(&self.url))
            .field("prefix", &self.prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("timeout_ms", &self.timeout_ms)
            .field("stream_len", &self.stream_len)
            .finish()
    }
}

impl RedisSettings {
    /// How long a request waits for Redis (before the entry's transfer time).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Rejects settings that cannot work (and, in a build without the `redis` feature,
    /// any Redis settings).
    pub fn validate(&self) -> Result<(), AttnCacheError> {
        self.check_url()?;
        let prefix_ok = (1..=64).contains(&self.prefix.len())
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !prefix_ok {
            return bad(
                "redis_prefix",
                self.prefix.clone(),
                "1-64 characters from [0-9A-Za-z_.-]",
            );
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return bad(
                "redis_timeout_ms",
                self.timeout_ms.to_string(),
                "1 to 60000 milliseconds",
            );
        }
        if self.stream_len == 0 {
            return bad("redis_stream_len", "0".into(), "1 or more");
        }
        Ok(())
    }

    /// The URL as the Redis client parses it.
    #[cfg(feature = "redis")]
    fn check_url(&self) -> Result<(), AttnCacheError> {
        redis::Client::open(self.url.as_str())
            .map(drop)
            .map_err(|e| AttnCacheError::InvalidSetting {
                name: "redis_url",
                value: format!("{} ({e})", redacted_url(&self.url)),
                expected: "redis://[user:password@]host:port[/db]",
            })
    }

    /// Without the `redis` feature there is no Redis tier to name.
    #[cfg(not(feature = "redis"))]
    fn check_url(&self) -> Result<(), AttnCacheError> {
        bad(
            "redis_url",
            redacted_url(&self.url),
            "no Redis tier: this build lacks the `redis` cargo feature",
        )
    }
}

/// `url` with any password replaced by `***` (for logs).
pub fn redacted_url(url: &str) -> String {
    // the `url` crate's parser (WHATWG rules: the last `@` before the host ends the user
    // part), not a hand search for `@`, which a `@` in the path or query would fool
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            // both fail only for URLs that cannot have credentials, which this one has
            let _ = u.set_password(None);
            let _ = u.set_username("***");
            u.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => "[a redis url that does not parse]".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            redacted_url("redis://user:s3cret@cache.internal:6379/2"),
            "redis://***@cache.internal:6379/2"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        // an `@` in the password, or after the host, is parsed as URLs are
        assert_eq!(redacted_url("redis://:p@ss@h:1"), "redis://***@h:1");
        assert_eq!(redacted_url("redis://h:1/0?n=a@b"), "redis://h:1/0?n=a@b");
        assert!(!redacted_url("redis//:s3cret@h").contains("s3cret"));
        let settings = RedisSettings {
            url: "redis://:hunter2@h:1".into(),
            ..RedisSettings::default()
        };
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
