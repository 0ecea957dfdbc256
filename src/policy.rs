//! What a route adds to the requests it routes (CONTRACT §8): compression, its rate limit and
//! its header rules, built once per snapshot. A route's rate-limit buckets outlive a reload that
//! leaves the route and its limit as they were.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compress::{Algorithm, Level};
use crate::config::{
    CompressionSection, HeaderRulesSection, RateKey, RateLimitSection, RouteSection,
};
use crate::headers::{HeaderRules, RawFields};
use crate::limit::{KeyRef, RateLimiter};

/// `[compression]` as it applies to a request.
#[derive(Debug)]
pub struct Compression {
    /// The encodings that may be used, preferred first on a tie.
    pub algorithms: Vec<Algorithm>,
    /// Known lengths below this are not compressed.
    pub min_length: u64,
    /// Media types compressed.
    pub types: Vec<String>,
    /// How hard.
    pub level: Level,
}

impl Compression {
    /// The settings of `[compression]`, whether or not it is enabled.
    pub fn new(s: &CompressionSection) -> Compression {
        Compression {
            algorithms: s.algorithms.clone(),
            min_length: s.min_length.0,
            types: s.types.clone(),
            level: s.level,
        }
    }
}

/// A route's additions; the default adds nothing.
#[derive(Debug, Default)]
pub struct RoutePolicy {
    /// Compression, when on for this route (its own `compression`, or `[compression]
    /// enabled`).
    pub compression: Option<Arc<Compression>>,
    /// `rate_limit`.
    pub rate_limit: Option<RouteLimit>,
    /// `request_headers`.
    pub request_headers: Option<HeaderRules>,
    /// `response_headers`.
    pub response_headers: Option<HeaderRules>,
}

/// A route's token buckets and what they are keyed by.
#[derive(Debug)]
pub struct RouteLimit {
    limiter: Arc<RateLimiter>,
    key: RateKey,
    /// What the buckets were built from: a reload keeps them when this is unchanged.
    built_from: (Option<String>, String, RateLimitSection, usize),
}

impl RouteLimit {
    /// Takes a token for a request from `client_ip` with `headers`, or says how long until
    /// one is there.
    pub fn check(&self, client_ip: IpAddr, fields: &RawFields) -> Result<(), Duration> {
        let key = match &self.key {
            RateKey::ClientIp => KeyRef::Ip(client_ip),
            RateKey::Header(name) => match fields.get(name.as_str().as_bytes()) {
                Some(v) => KeyRef::Header(v),
                None => KeyRef::Missing,
            },
        };
        self.limiter.check(key, Instant::now())
    }

    /// Buckets in use, for tests.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

fn rules(section: &Option<HeaderRulesSection>) -> Option<HeaderRules> {
    section.as_ref().map(|s| {
        HeaderRules::new(
            s.set.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            s.remove.iter().map(String::as_str),
        )
    })
}

impl RoutePolicy {
    /// The policy of config route `r`; `compression` is `[compression]` (`enabled` there
    /// unless the route says otherwise); `prev` are the previous snapshot's policies, whose
    /// buckets are kept for a route unchanged in host, prefix and limit.
    pub fn build(
        r: &RouteSection,
        compression: (&Arc<Compression>, bool),
        max_keys: usize,
        prev: &[RoutePolicy],
    ) -> RoutePolicy {
        let rate_limit = r.rate_limit.as_ref().map(|rl| {
            let built_from = (r.host.clone(), r.path_prefix.clone(), rl.clone(), max_keys);
            let kept = prev
                .iter()
                .filter_map(|p| p.rate_limit.as_ref())
                .find(|l| l.built_from == built_from)
                .map(|l| Arc::clone(&l.limiter));
            RouteLimit {
                limiter: kept
                    .unwrap_or_else(|| Arc::new(RateLimiter::new(rl.rate.0, rl.burst(), max_keys))),
                key: rl.key.clone(),
                built_from,
            }
        });
        let (shared, enabled) = compression;
        RoutePolicy {
            compression: r.compression.unwrap_or(enabled).then(|| Arc::clone(shared)),
            rate_limit,
            request_headers: rules(&r.request_headers),
            response_headers: rules(&r.response_headers),
        }
    }
}
