//! The threads that serve client connections: one single-threaded runtime per core, each
//! accepting on a socket of its own of every client address (`sockets`), handing a
//! connection to a less loaded worker when the load is uneven ([`Workers::assign`]), and
//! serving its connections to the end, as Nginx's workers do. A connection, its requests,
//! its upstream connections and its timers stay on one thread: no task moves between cores
//! and no wake-up crosses to another thread. The control plane (config, health checks,
//! admin listener, signals) runs on the runtime that started the proxy.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The calling thread's worker index, or [`NO_WORKER`].
    static INDEX: Cell<usize> = const { Cell::new(NO_WORKER) };
}

/// What [`INDEX`] holds on a thread that is no worker.
const NO_WORKER: usize = usize::MAX;

/// The worker the calling thread is (0 on any other thread): an index below
/// [`Workers::len`], for state kept per worker.
pub fn index() -> usize {
    worker().unwrap_or(0)
}

/// The worker the calling thread is, `None` on any other thread. A worker is one thread
/// for its life, so state only its worker writes has one writer.
pub fn worker() -> Option<usize> {
    Some(INDEX.with(Cell::get)).filter(|&i| i != NO_WORKER)
}

/// Makes the calling thread worker `i`, as a worker thread is from its start.
#[cfg(test)]
pub(crate) fn become_worker(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// How many workers serve: `TOKIO_WORKER_THREADS` if set, else one per core. Read once
/// per process.
pub fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// The worker threads of one running proxy.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Client connections each worker serves, each count on a cache line of its own.
    load: Box<[Load]>,
    end: CancellationToken,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Load(AtomicUsize);

impl Workers {
    /// Starts `count` worker threads. They run until [`Workers::end`] is called or the
    /// runtime this is called on goes away (a test's runtime, dropped without a shutdown).
    pub fn start(count: usize) -> io::Result<Workers> {
        let end = CancellationToken::new();
        let guard = end.clone().drop_guard();
        tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        let mut handles = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let end = end.clone();
            std::thread::Builder::new()
                .name(format!("fairway-w{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(i));
                    rt.block_on(end.cancelled());
                })?;
        }
        let load = (0..handles.len()).map(|_| Load::default()).collect();
        Ok(Workers { handles, load, end })
    }

    /// Picks the worker for a connection accepted on worker `me`, and counts the
    /// connection in its load until [`Workers::release`]: `me` unless another serves fewer
    /// connections by more than one (a connection is handed over only to even out the
    /// load, since handing over costs a wake-up of the other worker).
    pub fn assign(&self, me: usize) -> usize {
        let me = me.min(self.load.len() - 1);
        let mine = self.load[me].0.load(Ordering::Relaxed);
        let (mut worker, mut least) = (me, mine);
        for (i, l) in self.load.iter().enumerate() {
            let n = l.0.load(Ordering::Relaxed);
            if n < least {
                (worker, least) = (i, n);
            }
        }
        if least + 1 >= mine {
            worker = me;
        }
        self.load[worker].0.fetch_add(1, Ordering::Relaxed);
        worker
    }

    /// Uncounts a connection that [`Workers::assign`] gave to `worker`.
    pub fn release(&self, worker: usize) {
        self.load[worker].0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The workers' runtimes, to spawn on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Ends every worker: the tasks still on them are dropped (their connections close).
    pub fn end(&self) {
        self.end.cancel();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.end.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_worker() {
        let workers = Workers::start(3).unwrap();
        // Worker 1 accepts everything: it keeps a connection while it serves no more than
        // one above the least loaded, and hands the others over.
        let held: Vec<usize> = (0..9).map(|_| workers.assign(1)).collect();
        let mut per_worker = [0; 3];
        for &w in &held {
            per_worker[w] += 1;
        }
        assert_eq!(per_worker, [3, 4, 2]);
        assert_eq!(held[0], 1, "an idle worker keeps what it accepts");
        assert_eq!(held[1], 1, "one above the least is kept");
        assert_eq!(held[2], 0, "two above is handed over");
        for w in held {
            workers.release(w);
        }
        assert!(
            workers
                .load
                .iter()
                .all(|l| l.0.load(Ordering::Relaxed) == 0)
        );
        workers.end();
    }

    #[tokio::test]
    async fn each_worker_knows_its_index() {
        let workers = Workers::start(2).unwrap();
        for (i, h) in workers.handles().iter().enumerate() {
            assert_eq!(h.spawn(async { index() }).await.unwrap(), i);
        }
        workers.end();
    }
}
