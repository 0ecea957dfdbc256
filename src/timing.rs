//! Time and chance: a ticker for background tasks that never bursts to catch up, the lazily
//! armed timer a connection keeps its deadlines with, and a cheap per-thread random number
//! for jitter and random choices.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

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

/// One lazily armed timer per connection: it is reset only when a deadline comes earlier
/// than the one it is set to, or after it fired, so a busy keep-alive connection does not
/// touch the timer wheel per request. Armed on first use.
#[derive(Default)]
pub struct LazyTimer {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl LazyTimer {
    /// Ready once `deadline` has passed; registers the wake-up otherwise. The clock is read
    /// only when the timer has fired.
    pub fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let s = match &mut self.sleep {
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
            Some(s) => {
                if s.deadline() > deadline {
                    s.as_mut().reset(deadline);
                }
                s
            }
        };
        loop {
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // It fired at its deadline: `deadline` has passed if it is no later; else the
            // timer is set again for `deadline`.
            if s.deadline() >= deadline || deadline <= Instant::now() {
                return Poll::Ready(());
            }
            s.as_mut().reset(deadline);
        }
    }
}
