//! Limits on what one client may take, pure and clock-free: a route's `rate_limit` (a token
//! bucket per client key, CONTRACT §8) here, and `max_connections_per_ip` in
//! `limit/connections.rs`. The caller passes the time in, so the request path and the tests
//! share one deterministic code path.
//!
//! Both tables are sharded `std::sync::Mutex`es around hash tables: a check hashes its key
//! once (that hash picks the shard and probes its table), holds one shard's lock for a few
//! arithmetic operations and never across an await. Keys are hashed with std's `RandomState`
//! (SipHash with a random key), since header values and addresses are chosen by clients and
//! a predictable hash would let them pile every key into one probe chain.
//!
//! # Bounded memory in the rate limiter
//! A limiter keeps at most `max_keys` buckets, split exactly across its shards (every shard
//! holds at least one). When a new key arrives at a full shard, the shard is swept once and
//! frees a batch of an eighth of its capacity (at least one bucket), so the O(n) sweep is paid
//! once per n/8 new keys, never per key:
//! - first every bucket that is full again goes (idle long enough to have refilled): it
//!   carries no information, since a new key starts full anyway (CONTRACT §8);
//! - if that frees less than the batch, the fullest of the rest go until the batch is freed.
//!
//! Forgetting a bucket that is not full hands its key the tokens it lacked: the key comes
//! back with a full bucket. That is the price of bounded memory; nginx answers 503 when its
//! zone is full, and we prefer to keep serving. Taking the fullest buckets first makes that
//! price the smallest possible, and it is also what "full again first" generalizes to. Least
//! recently touched would be a rougher guess at the same thing that ignores how empty a
//! bucket was when last touched: a client that drained its bucket a while ago at `1/m` would
//! be forgiven before one that took a single token a second ago. The clients being limited
//! keep their buckets either way, as theirs are the emptiest.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

mod connections;

pub use connections::{ConnectionsPerIp, IpGuard};

/// Shards per table: enough that worker threads seldom meet on one lock.
const SHARDS: usize = 16;

/// Slack in token arithmetic, so that a sum of fractional refills that should reach a whole
/// token is not refused by a rounding error.
const EPSILON: f64 = 1e-9;

/// What a rate limit counts requests by (the owned form, as stored).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// The client's address (after `trusted_proxies` and the PROXY protocol).
    Ip(IpAddr),
    /// The bytes of the named request header.
    Header(Box<[u8]>),
    /// The named header is absent: all such requests share one bucket.
    Missing,
}

/// A [`Key`] borrowed from the request, so that a check allocates nothing for a key that
/// already has a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRef<'a> {
    /// The client's address; an IPv4-mapped IPv6 address counts as the IPv4 one.
    Ip(IpAddr),
    /// The bytes of the named request header.
    Header(&'a [u8]),
    /// The named header is absent.
    Missing,
}

impl Key {
    /// The borrowed form of this key.
    pub fn as_key_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Ip(ip) => KeyRef::Ip(*ip),
            Key::Header(value) => KeyRef::Header(value),
            Key::Missing => KeyRef::Missing,
        }
    }
}

impl From<KeyRef<'_>> for Key {
    fn from(key: KeyRef<'_>) -> Key {
        match key {
            KeyRef::Ip(ip) => Key::Ip(ip),
            KeyRef::Header(value) => Key::Header(value.into()),
            KeyRef::Missing => Key::Missing,
        }
    }
}

/// A token bucket per key with a bound on the number of keys (see the module docs for what
/// happens at the bound).
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// The bucket size, at least 1.
    burst: f64,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug)]
struct Shard {
    buckets: HashTable<(Key, Bucket)>,
    /// The most buckets this shard keeps; the caps of all shards add up to `max_keys`.
    cap: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens as of `last`, in `0..=burst`.
    tokens: f64,
    /// When the bucket was last refilled, that is last checked.
    last: Instant,
}

impl RateLimiter {
    /// A limiter letting `rate_per_sec` requests per second through for each key, `burst` at
    /// once from a full bucket, and keeping at most `max_keys` buckets. A `burst` or
    /// `max_keys` of 0 counts as 1.
    ///
    /// # Panics
    /// If `rate_per_sec` is not a positive finite number: config validation rejects it first.
    pub fn new(rate_per_sec: f64, burst: u32, max_keys: usize) -> RateLimiter {
        RateLimiter::with_shards(rate_per_sec, burst, max_keys, SHARDS)
    }

    fn with_shards(rate: f64, burst: u32, max_keys: usize, shards: usize) -> RateLimiter {
        assert!(
            rate.is_finite() && rate > 0.0,
            "a rate limit needs a positive rate, got {rate}"
        );
        let max_keys = max_keys.max(1);
        // Never more shards than keys, so that every shard holds at least one bucket and
        // the caps add up to exactly `max_keys`.
        let n = shards.clamp(1, max_keys);
        let shards = (0..n)
            .map(|i| {
                let cap = max_keys / n + usize::from(i < max_keys % n);
                Mutex::new(Shard {
                    buckets: HashTable::new(),
                    cap,
                })
            })
            .collect();
        RateLimiter {
            rate,
            burst: f64::from(burst.max(1)),
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Takes one token from `key`'s bucket at time `now`, or says how long until one is
    /// available (see [`retry_after_secs`] for the `Retry-After` header).
    pub fn check(&self, key: KeyRef<'_>, now: Instant) -> Result<(), Duration> {
        let key = match key {
            KeyRef::Ip(ip) => KeyRef::Ip(ip.to_canonical()),
            other => other,
        };
        let hash = self.hasher.hash_one(key);
        let mut shard = lock(&self.shards[shard_index(hash, self.shards.len())]);
        if let Some((_, bucket)) = shard.buckets.find_mut(hash, |(k, _)| k.as_key_ref() == key) {
            return self.take(bucket, now);
        }
        if shard.buckets.len() >= shard.cap {
            shard.make_room(now, self.rate, self.burst);
        }
        let mut bucket = Bucket {
            tokens: self.burst,
            last: now,
        };
        let taken = self.take(&mut bucket, now);
        shard
            .buckets
            .insert_unique(hash, (Key::from(key), bucket), |(k, _)| {
                self.hasher.hash_one(k.as_key_ref())
            });
        taken
    }

    /// The number of buckets kept, at most `max_keys`.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).buckets.len()).sum()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, bucket: &mut Bucket, now: Instant) -> Result<(), Duration> {
        bucket.tokens = level(bucket, now, self.rate, self.burst);
        // A clock read before another thread's check may arrive second: it refills nothing
        // and must not move `last` back.
        bucket.last = bucket.last.max(now);
        if bucket.tokens >= 1.0 - EPSILON {
            bucket.tokens = (bucket.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            // Rounded up to the nanosecond, so that a caller who waits exactly this long
            // finds a whole token.
            let nanos = ((1.0 - bucket.tokens) / self.rate * 1e9).ceil();
            Err(Duration::from_nanos(nanos as u64))
        }
    }

    #[cfg(test)]
    fn contains(&self, key: KeyRef<'_>) -> bool {
        let hash = self.hasher.hash_one(key);
        lock(&self.shards[shard_index(hash, self.shards.len())])
            .buckets
            .find(hash, |(k, _)| k.as_key_ref() == key)
            .is_some()
    }
}

impl Shard {
    /// Frees a batch of an eighth of the shard (at least one bucket): the buckets that are
    /// full again, then the fullest others (see the module docs).
    fn make_room(&mut self, now: Instant, rate: f64, burst: f64) {
        let batch = (self.cap / 8).max(1);
        let before = self.buckets.len();
        self.buckets
            .retain(|(_, b)| level(b, now, rate, burst) < burst - EPSILON);
        let freed = before - self.buckets.len();
        if freed >= batch || self.buckets.is_empty() {
            return;
        }
        let need = (batch - freed).min(self.buckets.len());
        let mut levels: Vec<f64> = self
            .buckets
            .iter()
            .map(|(_, b)| level(b, now, rate, burst))
            .collect();
        // The `need` fullest first; `threshold` is the level of the last of them.
        let (fuller, threshold, _) = levels.select_nth_unstable_by(need - 1, |a, b| b.total_cmp(a));
        let threshold = *threshold;
        // Buckets at exactly the threshold level are taken only as many as needed.
        let mut at_threshold = 1 + fuller.iter().filter(|&&l| l == threshold).count();
        self.buckets.retain(|(_, b)| {
            let l = level(b, now, rate, burst);
            if l > threshold {
                false
            } else if l == threshold && at_threshold > 0 {
                at_threshold -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The tokens in `bucket` at `now`.
fn level(bucket: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

/// The `Retry-After` value for a wait of `d`: whole seconds rounded up, at least 1
/// (CONTRACT §8).
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Parses a `rate` of the form `N/s` or `N/m` (N a positive integer) into requests per
/// second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let form =
        || format!("rate {s:?}: expected N/s or N/m, N a positive integer (\"10/s\", \"600/m\")");
    let (n, unit) = s.split_once('/').ok_or_else(form)?;
    let per = match unit {
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(form()),
    };
    // `u64::from_str` would also take a leading `+`.
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(form());
    }
    match n.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n as f64 / per),
        _ => Err(form()),
    }
}

/// The default `burst` for a rate: the per-second rate rounded up, at least 1 (CONTRACT §8).
pub fn default_burst(rate_per_sec: f64) -> u32 {
    // `as` saturates, and maps NaN to 0.
    (rate_per_sec.ceil() as u32).max(1)
}

/// The shard for `hash`. Bits 32 and up: hashbrown probes with the low bits and tags with
/// the top seven, and a shard whose keys all shared those would use its table poorly.
fn shard_index(hash: u64, shards: usize) -> usize {
    ((hash >> 32) as usize) % shards
}

/// Nothing panics while a shard is locked, but a poisoned lock must not take the request
/// path down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_burst_passes_then_refusal_until_refill() {
        let limiter = RateLimiter::new(10.0, 3, 100);
        let t0 = Instant::now();
        let a = KeyRef::Ip(ip(1));
        for _ in 0..3 {
            assert_eq!(limiter.check(a, t0), Ok(()));
        }
        assert_eq!(limiter.check(a, t0), Err(Duration::from_millis(100)));
        assert_eq!(
            limiter.check(a, t0 + secs(0.05)),
            Err(Duration::from_millis(50))
        );
        assert_eq!(limiter.check(a, t0 + secs(0.1)), Ok(()));
        assert!(limiter.check(a, t0 + secs(0.1)).is_err());
        // A long pause refills up to the burst and no further.
        let later = t0 + secs(60.0);
        for _ in 0..3 {
            assert_eq!(limiter.check(a, later), Ok(()));
        }
        assert!(limiter.check(a, later).is_err());
    }

    #[test]
    fn fractional_rates_refill_continuously() {
        let rate = parse_rate("30/m").unwrap();
        assert_eq!(rate, 0.5);
        let limiter = RateLimiter::new(rate, default_burst(rate), 100);
        let t0 = Instant::now();
        let k = KeyRef::Header(b"tenant-a");
        assert_eq!(limiter.check(k, t0), Ok(()));
        assert_eq!(limiter.check(k, t0), Err(Duration::from_secs(2)));
        assert_eq!(limiter.check(k, t0 + secs(1.5)), Err(secs(0.5)));
        assert_eq!(limiter.check(k, t0 + secs(2.0)), Ok(()));

        // Thirds of a token add up to a whole one.
        let limiter = RateLimiter::new(20.0 / 60.0, 1, 100);
        assert_eq!(limiter.check(k, t0), Ok(()));
        for i in 1..3 {
            assert!(limiter.check(k, t0 + secs(f64::from(i))).is_err());
        }
        assert_eq!(limiter.check(k, t0 + secs(3.0)), Ok(()));
    }

    #[test]
    fn waiting_the_given_time_is_enough() {
        let limiter = RateLimiter::new(7.0, 1, 100);
        let mut now = Instant::now();
        let k = KeyRef::Missing;
        assert_eq!(limiter.check(k, now), Ok(()));
        for _ in 0..100 {
            let wait = limiter.check(k, now).unwrap_err();
            now += wait;
            assert_eq!(limiter.check(k, now), Ok(()));
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(999)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(120)), 120);
    }

    #[test]
    fn keys_are_independent() {
        let limiter = RateLimiter::new(1.0, 1, 100);
        let t0 = Instant::now();
        let keys = [
            KeyRef::Ip(ip(1)),
            KeyRef::Ip(ip(2)),
            KeyRef::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            KeyRef::Header(b"a"),
            KeyRef::Header(b""),
            KeyRef::Missing,
        ];
        for k in keys {
            assert_eq!(limiter.check(k, t0), Ok(()), "{k:?}");
        }
        for k in keys {
            assert!(limiter.check(k, t0).is_err(), "{k:?}");
        }
        assert_eq!(limiter.len(), keys.len());
        // The IPv4-mapped form of 0.0.0.1 is the same client.
        let mapped = IpAddr::V6(Ipv4Addr::from(1).to_ipv6_mapped());
        assert!(limiter.check(KeyRef::Ip(mapped), t0).is_err());
        assert_eq!(limiter.len(), keys.len());
    }

    #[test]
    fn time_read_out_of_order_adds_nothing() {
        let limiter = RateLimiter::new(1.0, 1, 100);
        let t0 = Instant::now();
        let t1 = t0 + secs(0.5);
        let k = KeyRef::Missing;
        assert_eq!(limiter.check(k, t1), Ok(()));
        assert_eq!(limiter.check(k, t0), Err(Duration::from_secs(1)));
        assert_eq!(limiter.check(k, t1 + secs(1.0)), Ok(()));
    }

    #[test]
    fn the_key_bound_holds_under_many_keys() {
        // A million in release; fewer in a debug build to keep the run short.
        let keys: u32 = if cfg!(debug_assertions) {
            200_000
        } else {
            1_000_000
        };
        let max_keys = 100_000;
        let limiter = RateLimiter::new(1.0, 5, max_keys);
        let t0 = Instant::now();
        let started = Instant::now();
        for n in 0..keys {
            // Every client drains a little and time moves slowly: few buckets refill.
            let now = t0 + Duration::from_micros(u64::from(n));
            assert_eq!(limiter.check(KeyRef::Ip(ip(n)), now), Ok(()));
            if n % 50_000 == 0 {
                assert!(limiter.len() <= max_keys);
            }
        }
        assert!(limiter.len() <= max_keys);
        assert!(limiter.len() >= max_keys - max_keys / 8 - SHARDS);
        // A quadratic eviction would take minutes here.
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tiny_bounds_are_exact() {
        for max_keys in [0, 1, 2, 5, 17, 31] {
            let limiter = RateLimiter::new(1.0, 1, max_keys);
            let t0 = Instant::now();
            for n in 0..200 {
                assert_eq!(limiter.check(KeyRef::Ip(ip(n)), t0), Ok(()));
                assert!(limiter.len() <= max_keys.max(1), "max_keys {max_keys}");
            }
        }
    }

    #[test]
    fn idle_full_buckets_are_forgotten_first() {
        let limiter = RateLimiter::with_shards(1.0, 2, 8, 1);
        let t0 = Instant::now();
        // Key 0 takes one token and refills within a second; the others are drained late.
        assert_eq!(limiter.check(KeyRef::Ip(ip(0)), t0), Ok(()));
        let t10 = t0 + secs(10.0);
        for n in 1..8 {
            for _ in 0..2 {
                assert_eq!(limiter.check(KeyRef::Ip(ip(n)), t10), Ok(()));
            }
        }
        assert_eq!(limiter.check(KeyRef::Ip(ip(100)), t10), Ok(()));
        assert_eq!(limiter.len(), 8);
        assert!(!limiter.contains(KeyRef::Ip(ip(0))));
        for n in 1..8 {
            assert!(limiter.contains(KeyRef::Ip(ip(n))), "{n}");
            assert!(limiter.check(KeyRef::Ip(ip(n)), t10).is_err());
        }
    }

    #[test]
    fn when_none_is_full_the_fullest_go() {
        let limiter = RateLimiter::with_shards(1.0, 10, 2, 1);
        let t0 = Instant::now();
        let (a, b) = (KeyRef::Header(b"a"), KeyRef::Header(b"b"));
        // `a` drains its bucket first, `b` takes half of its own later.
        for _ in 0..10 {
            assert_eq!(limiter.check(a, t0), Ok(()));
        }
        for _ in 0..5 {
            assert_eq!(limiter.check(b, t0 + secs(1.0)), Ok(()));
        }
        // At 2 s, `a` holds 2 tokens and `b` 6: `b` goes although `a` is older.
        assert_eq!(limiter.check(KeyRef::Missing, t0 + secs(2.0)), Ok(()));
        assert!(limiter.contains(a));
        assert!(!limiter.contains(b));
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn eviction_frees_a_batch_at_once() {
        let limiter = RateLimiter::with_shards(1.0, 2, 64, 1);
        let t0 = Instant::now();
        for n in 0..64 {
            assert_eq!(limiter.check(KeyRef::Ip(ip(n)), t0), Ok(()));
        }
        assert_eq!(limiter.len(), 64);
        assert_eq!(limiter.check(KeyRef::Ip(ip(64)), t0), Ok(()));
        assert_eq!(limiter.len(), 64 - 8 + 1);
        for n in 65..72 {
            assert_eq!(limiter.check(KeyRef::Ip(ip(n)), t0), Ok(()));
        }
        assert_eq!(limiter.len(), 64);
    }

    #[test]
    fn an_evicted_key_comes_back_full() {
        let limiter = RateLimiter::with_shards(1.0 / 60.0, 2, 1, 1);
        let t0 = Instant::now();
        let a = KeyRef::Header(b"a");
        assert_eq!(limiter.check(a, t0), Ok(()));
        assert_eq!(limiter.check(a, t0), Ok(()));
        assert!(limiter.check(a, t0).is_err());
        assert_eq!(limiter.check(KeyRef::Header(b"b"), t0), Ok(()));
        assert!(!limiter.contains(a));
        assert_eq!(limiter.check(a, t0), Ok(()));
        assert_eq!(limiter.check(a, t0), Ok(()));
        assert!(limiter.check(a, t0).is_err());
    }

    #[test]
    fn rates_parse_per_second_and_per_minute() {
        assert_eq!(parse_rate("10/s"), Ok(10.0));
        assert_eq!(parse_rate("600/m"), Ok(10.0));
        assert_eq!(parse_rate("1/m"), Ok(1.0 / 60.0));
        for bad in [
            "",
            "10",
            "/s",
            "0/s",
            "-1/s",
            "+5/s",
            "1.5/s",
            "10/h",
            "10/S",
            " 10/s",
            "10/s ",
            "10//s",
            "1e3/s",
            "99999999999999999999/s",
        ] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.contains("N/s or N/m"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn default_burst_is_the_rate_rounded_up() {
        assert_eq!(default_burst(10.0), 10);
        assert_eq!(default_burst(10.5), 11);
        assert_eq!(default_burst(0.5), 1);
        assert_eq!(default_burst(1.0 / 60.0), 1);
        assert_eq!(default_burst(1e12), u32::MAX);
    }
}
