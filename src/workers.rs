//! Connection workers: a fixed set of threads, each running its own single-threaded tokio
//! runtime. Every worker accepts on every client listener (like Nginx's worker processes)
//! and serves what it accepts itself, unless it already serves clearly more connections
//! than the least busy worker: then the connection goes there (as HAProxy hands
//! connections to its least loaded thread), so that a burst of connects that one worker
//! wins does not leave the others idle. A connection stays on its worker with everything
//! it starts: its requests, their upstream connections and tunnels. A request then never
//! wakes another thread, and each worker keeps its own share of every upstream pool (see
//! [`crate::client::Pool`]).
//!
//! `server.workers = 0` accepts and serves on the runtime that started the proxy instead.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running on this thread (0 on any other thread).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The default number of workers: one per CPU.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The worker threads of one running proxy.
pub struct Workers {
    workers: Box<[Worker]>,
    done: CancellationToken,
}

struct Worker {
    handle: tokio::runtime::Handle,
    /// Connections being served.
    load: Arc<AtomicUsize>,
}

/// Counts a connection on its worker while it is served.
struct Load(Arc<AtomicUsize>);

impl Load {
    fn on(worker: &Worker) -> Load {
        worker.load.fetch_add(1, Ordering::Relaxed);
        Load(Arc::clone(&worker.load))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Worker {
    fn spawn<F>(&self, f: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Workers {
    /// Starts `n` worker threads (none for 0).
    pub fn start(n: usize) -> io::Result<Workers> {
        let done = CancellationToken::new();
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let until = done.clone();
            std::thread::Builder::new()
                .name(format!("fairway-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    // Tasks still running when the workers stop are dropped with `rt`.
                    rt.block_on(until.cancelled());
                })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Workers {
            workers: workers.into(),
            done,
        })
    }

    /// The number of worker threads.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Runs `accept` on every worker, each with its own handle on `listener` (on the
    /// current runtime without workers). Whichever worker is free first takes the next
    /// connection and serves it.
    pub fn accept_on<F, Fut>(
        &self,
        listener: std::net::TcpListener,
        accept: F,
    ) -> io::Result<Vec<JoinHandle<()>>>
    where
        F: Fn(TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.workers.is_empty() {
            return Ok(vec![tokio::spawn(accept(TcpListener::from_std(listener)?))]);
        }
        let mut tasks = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let own = listener.try_clone()?;
            let accept = accept.clone();
            tasks.push(w.spawn(async move {
                match TcpListener::from_std(own) {
                    Ok(l) => accept(l).await,
                    Err(e) => tracing::error!(error = %e, "cannot register a listener"),
                }
            }));
        }
        Ok(tasks)
    }

    /// Serves a connection accepted on this thread, as a task of `tracker`: here, or on the
    /// least busy worker when this one serves more than an eighth (and at least two) more
    /// connections than it.
    pub fn serve<F, Fut>(&self, tracker: &TaskTracker, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(here) = self.workers.get(current()) else {
            tracker.spawn(serve(stream));
            return;
        };
        let least = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .unwrap_or(here);
        let (mine, theirs) = (
            here.load.load(Ordering::Relaxed),
            least.load.load(Ordering::Relaxed),
        );
        if mine < theirs + 2 + theirs / 8 {
            let load = Load::on(here);
            tracker.spawn(async move {
                let _load = load;
                serve(stream).await;
            });
            return;
        }
        // Moved to the other worker's reactor: deregistered here, registered there.
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to another worker");
                return;
            }
        };
        let load = Load::on(least);
        least.spawn(tracker.track_future(async move {
            let _load = load;
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!(error = %e, "cannot register a connection"),
            }
        }));
    }

    /// Stops the worker threads; what they still run is dropped.
    pub fn stop(&self) {
        self.done.cancel();
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.count())
            .finish()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts connections on `workers` and reports the thread that served each.
    async fn served_on(workers: &Workers, connections: usize) -> Vec<String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tasks = workers
            .accept_on(listener, move |l| {
                let tx = tx.clone();
                async move {
                    while let Ok((s, _)) = l.accept().await {
                        let name = std::thread::current().name().map(str::to_owned);
                        tx.send((current(), name.unwrap_or_default())).unwrap();
                        drop(s);
                    }
                }
            })
            .unwrap();
        assert_eq!(tasks.len(), workers.count().max(1));
        let mut seen = Vec::new();
        for _ in 0..connections {
            let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (index, name) = rx.recv().await.unwrap();
            if name.starts_with("fairway-worker-") {
                assert_eq!(name, format!("fairway-worker-{index}"));
            }
            seen.push(name);
        }
        for t in tasks {
            t.abort();
        }
        seen
    }

    #[tokio::test]
    async fn every_worker_accepts_and_serves_on_its_own_thread() {
        let workers = Workers::start(2).unwrap();
        let seen = served_on(&workers, 20).await;
        assert!(
            seen.iter().all(|n| n.starts_with("fairway-worker-")),
            "{seen:?}"
        );
        workers.stop();
    }

    /// The worker that serves a connection accepted on worker 0 when worker 0 already
    /// serves `loads.0` connections and worker 1 `loads.1`.
    async fn placed_with(loads: (usize, usize)) -> usize {
        let workers = Arc::new(Workers::start(2).unwrap());
        workers.workers[0].load.store(loads.0, Ordering::Relaxed);
        workers.workers[1].load.store(loads.1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let w = Arc::clone(&workers);
        workers.workers[0].spawn(async move {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (stream, _) = l.accept().await.unwrap();
            let tracker = TaskTracker::new();
            w.serve(&tracker, stream, move |_| async move {
                tx.send(current()).unwrap();
            });
        });
        let placed = rx.await.unwrap();
        workers.stop();
        placed
    }

    #[tokio::test]
    async fn a_busier_worker_hands_new_connections_to_the_least_busy_one() {
        assert_eq!(placed_with((0, 0)).await, 0);
        assert_eq!(placed_with((1, 0)).await, 0);
        assert_eq!(placed_with((2, 0)).await, 1);
        assert_eq!(placed_with((40, 36)).await, 0);
        assert_eq!(placed_with((60, 36)).await, 1);
    }

    #[tokio::test]
    async fn without_workers_connections_are_served_on_the_current_runtime() {
        let workers = Workers::start(0).unwrap();
        let seen = served_on(&workers, 3).await;
        assert!(
            seen.iter().all(|n| !n.starts_with("fairway-worker-")),
            "{seen:?}"
        );
    }
}
