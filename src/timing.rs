//! Time and chance: the clock a connection reads once per poll ([`now`], [`OneReading`]), a
//! ticker for background tasks that never bursts to catch up, the lazily armed timer a
//! connection keeps its deadlines with, and a cheap per-thread random number for jitter and
//! random choices.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, RawWakerVTable, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

thread_local! {
    /// Inside a poll of a [`OneReading`] future: `Some`, holding the time once read.
    static READING: Cell<Option<Option<Instant>>> = const { Cell::new(None) };
}

/// The current time. Inside a poll of a [`OneReading`] future, the clock is read once and
/// that time is given for the rest of the poll: a poll does not block, so it lasts
/// microseconds, and a request read, sent upstream, answered and counted in one poll reads
/// the clock once instead of at each of those steps (a clock read costs as much as parsing
/// a header line). Anywhere else it is `Instant::now()`.
pub fn now() -> Instant {
    READING.with(|r| match r.get() {
        None => Instant::now(),
        Some(Some(t)) => t,
        Some(None) => {
            let t = Instant::now();
            r.set(Some(Some(t)));
            t
        }
    })
}

pin_project_lite::pin_project! {
    /// A future whose polls each read the clock at most once ([`now`]): a client
    /// connection's task.
    pub struct OneReading<F> {
        #[pin]
        fut: F,
    }
}

impl<F: Future> OneReading<F> {
    /// Wraps `fut`.
    pub fn new(fut: F) -> Self {
        OneReading { fut }
    }
}

impl<F: Future> Future for OneReading<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // The time read in this poll is forgotten when it returns, even by a panic, and an
        // enclosing reading (a poll inside a poll) gets its own back.
        struct Restore(Option<Option<Instant>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                READING.with(|r| r.set(self.0));
            }
        }
        let _restore = Restore(READING.with(|r| r.replace(Some(None))));
        self.project().fut.poll(cx)
    }
}

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
/// touch the timer wheel per request. Armed on first use. A poll by the task that polled it
/// last, while it has not fired, returns at once: the wake-up is registered already (if it
/// fires right after, it wakes that task, which polls again).
#[derive(Default)]
pub struct LazyTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the armed timer was last polled with, as its data and vtable addresses,
    /// until it is reset or fires.
    polled_by: Option<(usize, usize)>,
}

/// Which task a waker wakes, as far as it can be told cheaply: a waker with the same data
/// and vtable wakes the same task.
fn waker_id(w: &Waker) -> (usize, usize) {
    (
        w.data() as usize,
        std::ptr::from_ref::<RawWakerVTable>(w.vtable()) as usize,
    )
}

impl LazyTimer {
    /// Ready once `deadline` has passed; registers the wake-up otherwise. The clock is read
    /// only when the timer has fired.
    pub fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let s = match &mut self.sleep {
            None => {
                self.polled_by = None;
                self.sleep
                    .insert(Box::pin(tokio::time::sleep_until(deadline)))
            }
            Some(s) => {
                if s.deadline() > deadline {
                    s.as_mut().reset(deadline);
                    self.polled_by = None;
                }
                s
            }
        };
        let by = waker_id(cx.waker());
        if self.polled_by == Some(by) && !s.is_elapsed() {
            return Poll::Pending;
        }
        // A task out of its budget gets `Pending` from the timer before the timer takes its
        // waker (it is woken to poll again): such a poll registers nothing.
        let registers = tokio::task::coop::has_budget_remaining();
        loop {
            if s.as_mut().poll(cx).is_pending() {
                self.polled_by = registers.then_some(by);
                return Poll::Pending;
            }
            self.polled_by = None;
            // It fired at its deadline: `deadline` has passed if it is no later; else the
            // timer is set again for `deadline`.
            if s.deadline() >= deadline || deadline <= Instant::now() {
                return Poll::Ready(());
            }
            s.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until the real clock has moved past `t`.
    fn past(t: Instant) {
        while Instant::now() <= t {
            std::hint::spin_loop();
        }
    }

    #[tokio::test]
    async fn one_reading_reads_the_clock_once_per_poll() {
        let outside = now();
        past(outside);
        assert!(now() > outside, "outside a reading, now() is the clock");

        let mut polls = 0;
        let mut times = Vec::new();
        let fut = OneReading::new(std::future::poll_fn(|cx| {
            polls += 1;
            let first = now();
            past(first);
            // The same time for the rest of this poll...
            assert_eq!(now(), first);
            // ...and for a reading nested in it, which gets its own.
            let inner = OneReading::new(async { now() });
            let nested = futures_util::FutureExt::now_or_never(inner).unwrap();
            assert!(nested > first);
            assert_eq!(now(), first, "the enclosing reading is back");
            times.push(first);
            if polls < 2 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }));
        fut.await;
        assert!(times[1] > times[0], "each poll reads the clock anew");
        let after = now();
        past(after);
        assert!(now() > after, "the reading ends with the poll");
    }

    /// Polls `timer` for `deadline` once, with the waker of `count`.
    fn poll_once(
        timer: &mut LazyTimer,
        count: &std::sync::Arc<Counter>,
        deadline: Instant,
    ) -> Poll<()> {
        let waker = Waker::from(std::sync::Arc::clone(count));
        timer.poll_until(&mut Context::from_waker(&waker), deadline)
    }

    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Counter {
        fn woken(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Waits, without polling the timer, until `count` has been woken.
    async fn woken(count: &Counter) {
        let give_up = Instant::now() + Duration::from_secs(5);
        while count.woken() == 0 {
            assert!(Instant::now() < give_up, "the timer never woke its task");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_lazy_timer_wakes_its_task_though_polled_again_before_its_deadline() {
        let count = std::sync::Arc::new(Counter::default());
        let mut timer = LazyTimer::default();
        let deadline = Instant::now() + Duration::from_millis(30);
        // Polled again and again by the same task before the deadline: still armed.
        for _ in 0..3 {
            assert!(poll_once(&mut timer, &count, deadline).is_pending());
        }
        woken(&count).await;
        assert!(Instant::now() >= deadline);
        assert!(poll_once(&mut timer, &count, deadline).is_ready());
    }

    #[tokio::test]
    async fn a_lazy_timer_polled_by_another_task_wakes_that_one() {
        let (first, second) = (
            std::sync::Arc::new(Counter::default()),
            std::sync::Arc::new(Counter::default()),
        );
        let mut timer = LazyTimer::default();
        let deadline = Instant::now() + Duration::from_millis(20);
        assert!(poll_once(&mut timer, &first, deadline).is_pending());
        assert!(poll_once(&mut timer, &second, deadline).is_pending());
        woken(&second).await;
        assert!(poll_once(&mut timer, &second, deadline).is_ready());
    }

    #[tokio::test]
    async fn a_lazy_timer_set_earlier_is_registered_anew() {
        let count = std::sync::Arc::new(Counter::default());
        let mut timer = LazyTimer::default();
        let late = Instant::now() + Duration::from_secs(60);
        assert!(poll_once(&mut timer, &count, late).is_pending());
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(poll_once(&mut timer, &count, soon).is_pending());
        woken(&count).await;
        assert!(poll_once(&mut timer, &count, soon).is_ready());
        // A later deadline after it fired: armed again, and pending.
        let again = Instant::now() + Duration::from_secs(60);
        assert!(poll_once(&mut timer, &count, again).is_pending());
    }

    #[tokio::test]
    async fn a_lazy_timer_first_polled_out_of_budget_still_fires() {
        let mut timer = LazyTimer::default();
        let deadline = Instant::now() + Duration::from_millis(20);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..1000 {
            tx.send(()).unwrap();
        }
        let mut polls = 0;
        let fired = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| {
                polls += 1;
                if polls == 1 {
                    // The task's budget spent: the timer's first poll takes no waker.
                    while tokio::task::coop::has_budget_remaining() {
                        let _ = rx.poll_recv(cx);
                    }
                }
                timer.poll_until(cx, deadline)
            }),
        )
        .await;
        assert!(fired.is_ok(), "the timer never fired");
        assert!(polls >= 2);
    }
}
