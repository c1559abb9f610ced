//! What the tier keeps in Redis: the key names of a scope and the Lua scripts that
//! keep its byte budget (see the module doc of [`super`]).

/// The byte budget's bookkeeping in Lua, shared by the entries' and the prefix blocks'
/// write scripts: records a value's size (ARGV[1]) and use (member ARGV[2], time ARGV[3]),
/// then deletes the least recently used values while the total is over the budget
/// (ARGV[4]); the values' keys are `ARGV[$base] .. member`. KEYS: lru, sizes, total. Leaves
/// `evicted` and `total` set for the script's end.
macro_rules! budget_lua {
    ($base:literal) => {
        concat!(
            r"
local size = tonumber(ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[2])
if old then redis.call('DECRBY', KEYS[3], old) end
redis.call('HSET', KEYS[2], ARGV[2], size)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
local total = redis.call('INCRBY', KEYS[3], size)
local evicted = 0
while total > tonumber(ARGV[4]) do
  local victim = redis.call('ZPOPMIN', KEYS[1])
  if #victim == 0 then break end
  local m = victim[1]
  local s = redis.call('HGET', KEYS[2], m)
  redis.call('HDEL', KEYS[2], m)
  redis.call('DEL', ARGV[",
            $base,
            r"] .. m)
  if s then total = redis.call('DECRBY', KEYS[3], s) end
  evicted = evicted + 1
end
"
        )
    };
}

/// Records an entry's size and use, evicts past the budget and announces it; runs right
/// after the entry's `SET` in one `MULTI` (the value itself never passes through Lua, which
/// would copy it twice). KEYS: lru, sizes, total, stream. ARGV: size, member, now, budget,
/// origin, prefix bytes, stream length, value-key base. Returns {evicted, total bytes,
/// entries}.
pub(super) const WRITE_SCRIPT: &str = concat!(
    budget_lua!(8),
    r"redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'origin', ARGV[5], 'prefix', ARGV[6])
return {evicted, total, redis.call('ZCARD', KEYS[1])}
"
);

/// [`WRITE_SCRIPT`] without the announcement, for values other replicas find by key alone
/// (prefix blocks). KEYS: lru, sizes, total. ARGV: size, member, now, budget, value-key
/// base. Returns {evicted, total bytes, values}.
pub(crate) const WRITE_QUIET_SCRIPT: &str = concat!(
    budget_lua!(5),
    "return {evicted, total, redis.call('ZCARD', KEYS[1])}\n"
);

/// Forgets an entry (corrupt, or expired by its TTL) or a prefix block. KEYS: value, lru, sizes, total.
/// ARGV: member.
pub(crate) const FORGET_SCRIPT: &str = r"
local s = redis.call('HGET', KEYS[3], ARGV[1])
if s then redis.call('DECRBY', KEYS[4], s) end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
";

/// Key names of one scope.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) entries: String,
    pub(super) lru: String,
    pub(super) sizes: String,
    pub(super) total: String,
    pub(super) stream: String,
    /// Prefix of read probes (`time_reads`): outside the entries, never announced.
    pub(super) probe: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, fingerprint: u64, scope: &str) -> Self {
        let base = format!("{prefix}:{fingerprint:016x}:{scope}");
        Self {
            entries: format!("{base}:e:"),
            lru: format!("{base}:lru"),
            sizes: format!("{base}:sizes"),
            total: format!("{base}:bytes"),
            stream: format!("{base}:stream"),
            probe: format!("{base}:probe:"),
        }
    }

    pub(super) fn member(key: u64, len: usize) -> String {
        format!("{len:05}:{key:016x}")
    }

    pub(super) fn value(&self, member: &str) -> String {
        format!("{}{member}", self.entries)
    }
}
