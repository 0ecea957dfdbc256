//! Connection workers: a fixed set of threads, each running its own single-threaded tokio
//! runtime. An accepted client connection is handed to the worker serving the fewest
//! connections (HAProxy hands connections to its least loaded thread the same way) and
//! stays there with everything it starts: its requests, their upstream connections and
//! tunnels. A request then never wakes another thread, and each worker keeps its own share
//! of every upstream pool (see [`crate::client::Pool`]).
//!
//! `server.workers = 0` serves connections on the runtime that accepted them instead.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
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

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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

    /// Serves `stream` with `serve` on the least loaded worker (on the current runtime
    /// without workers), as a task of `tracker`.
    pub fn serve<F, Fut>(&self, tracker: &TaskTracker, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(w) = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            tracker.spawn(serve(stream));
            return;
        };
        // Moved to the worker's reactor: deregistered here, registered there.
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        w.load.fetch_add(1, Ordering::Relaxed);
        let load = Load(Arc::clone(&w.load));
        w.handle.spawn(tracker.track_future(async move {
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

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_worker_and_run_there() {
        let workers = Workers::start(2).unwrap();
        let tracker = TaskTracker::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        let mut ran_on = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            workers.serve(&tracker, stream, move |s| async move {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send((current(), name)).unwrap();
                // Held open until the test ends, so that the load stays counted.
                std::future::pending::<()>().await;
                drop(s);
            });
            ran_on.push(rx.recv().await.unwrap());
        }
        let loads: Vec<usize> = workers
            .workers
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, [2, 2]);
        ran_on.sort();
        let names: Vec<(usize, Option<String>)> = [0, 0, 1, 1]
            .into_iter()
            .map(|i| (i, Some(format!("fairway-worker-{i}"))))
            .collect();
        assert_eq!(ran_on, names);
        workers.stop();
    }

    #[tokio::test]
    async fn without_workers_connections_run_on_the_current_runtime() {
        let workers = Workers::start(0).unwrap();
        let tracker = TaskTracker::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        workers.serve(&tracker, stream, move |_| async move {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap();
        });
        let name = rx.await.unwrap();
        assert!(!name.unwrap_or_default().starts_with("fairway-worker"));
    }
}
