//! What the request path shares ([`Context`]): the current runtime snapshot, the
//! maintenance switch, the trackers of connection tasks, the shutdown signal, the
//! metrics and the access log; and what it knows about one client connection
//! ([`ConnInfo`]). The control plane stores new snapshots here; the data path only reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::limit::ConnectionsPerIp;
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::workers::Workers;

/// State shared by every listener, connection and request.
#[derive(Debug)]
pub struct Context {
    /// The current snapshot; a request loads it once (CONTRACT §3, §6).
    pub runtime: ArcSwap<Runtime>,
    /// The maintenance switch.
    pub maintenance: Maintenance,
    /// Client connection tasks, waited for on shutdown: one tracker per worker, so that
    /// starting and ending a connection touches no count another worker's do
    /// ([`Context::tracker`]).
    trackers: Box<[TaskTracker]>,
    /// Fires on shutdown: listeners stop accepting, connections drain. Fired by
    /// [`Context::signal_stop`].
    pub stop: CancellationToken,
    /// Set as `stop` fires: what a request looks at, without the token's lock.
    stopping: AtomicBool,
    /// A child of `stop` per worker, for client connections to wait on
    /// ([`Context::stop_here`]).
    stops: Box<[CancellationToken]>,
    /// Metric families and handles.
    pub metrics: Arc<Metrics>,
    /// The access log writer.
    pub access_log: AccessLog,
    /// Open client connections per client address (`max_connections_per_ip`).
    pub per_ip: Arc<ConnectionsPerIp>,
    /// The threads that accept and serve client connections.
    pub workers: Workers,
}

impl Context {
    /// A context serving `runtime`.
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>, workers: Workers) -> Context {
        let stop = CancellationToken::new();
        let stops = (0..workers.len().max(1))
            .map(|_| stop.child_token())
            .collect();
        Context {
            runtime: ArcSwap::from_pointee(runtime),
            maintenance: Maintenance::default(),
            trackers: (0..workers.len().max(1))
                .map(|_| TaskTracker::new())
                .collect(),
            stop,
            stopping: AtomicBool::new(false),
            stops,
            metrics,
            access_log: AccessLog::start(),
            per_ip: Arc::new(ConnectionsPerIp::new()),
            workers,
        }
    }

    /// The tracker of the connection tasks of worker `worker`.
    pub fn tracker(&self, worker: usize) -> &TaskTracker {
        &self.trackers[worker % self.trackers.len()]
    }

    /// Closes every tracker, then waits until the tasks of all have ended.
    pub async fn drain(&self) {
        for t in self.trackers.iter() {
            t.close();
        }
        for t in self.trackers.iter() {
            t.wait().await;
        }
    }

    /// Starts the shutdown: listeners stop accepting, connections drain.
    pub fn signal_stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }

    /// Whether the shutdown has begun (a load, where the token's `is_cancelled` takes its
    /// lock): a response says so with `Connection: close`.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The shutdown signal as the calling worker's connections wait on it: `stop` itself
    /// takes a lock that every thread shares at each look, its child per worker one that
    /// only this worker's connections do.
    pub fn stop_here(&self) -> &CancellationToken {
        &self.stops[crate::workers::index() % self.stops.len()]
    }
}

/// What the proxy knows about one client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
    /// `"http"` or `"https"`.
    pub proto: &'static str,
    /// Bytes read from the client so far (after TLS), once the connection is served:
    /// what a chunked request body costs on the wire, against its payload.
    pub bytes_read: Option<Arc<AtomicU64>>,
}
