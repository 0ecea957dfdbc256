//! Time and chance for background tasks and the balancer: a ticker that never bursts to
//! catch up, and a cheap per-thread random number for jitter and random choices.

use std::time::Duration;

/// A periodic tick for background tasks; a late tick delays the next ones instead of
/// bursting to catch up.
pub fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// A small xorshift generator for jitter and balancing, one per thread.
pub fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}
