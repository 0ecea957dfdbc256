//! Connections to upstream servers: dial (under `connect_timeout`), one HTTP/1.1 exchange
//! at a time driven by the task of the request it carries ([`exchange`]), the response body
//! read from the same connection ([`ResponseBody`]), and the per-server pool of idle
//! keep-alive connections (`max_idle_per_server`, `pool_idle_timeout`). No connection has a
//! task of its own: an idle one is a socket in the pool and nothing else. A failed [`dial`]
//! is a connect failure: nothing was sent.

mod body;
mod exchange;

pub use body::{ResponseBody, Upgraded};
pub use exchange::{Failed, Outgoing, Sent};

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::stream::{ReadSize, give_back, take_buffer};
use crate::timing::LazyTimer;
use crate::tls::UpstreamTls;

/// Where a server is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IP address and port.
    Socket(SocketAddr),
    /// A `host:port` resolved on each new connection.
    Name(String),
}

impl Target {
    /// Parses a validated `addr`.
    pub fn parse(addr: &str) -> Target {
        match addr.parse::<SocketAddr>() {
            Ok(sa) => Target::Socket(sa),
            Err(_) => Target::Name(addr.to_owned()),
        }
    }
}

/// Pool settings of one upstream.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Idle connections kept per server.
    pub max_idle: usize,
    /// An idle connection older than this is not used again.
    pub idle_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// `resolver`, for servers given by host name that have not resolved yet.
    pub resolver: Option<std::net::SocketAddr>,
}

/// Idle keep-alive connections to one server, in one share per worker thread (a
/// connection's socket is registered with the reactor of the worker that dialed it), each
/// share most recently used last. A worker takes from its own share first, and from
/// another's only when its own is empty.
///
/// `max_idle` bounds the sum of the shares at rest. Under load, a burst of answers may
/// return more connections at once than it allows while the next burst of requests is about
/// to take them again: up to twice `max_idle` are kept then, and the pool sweep
/// ([`Pool::sweep`], each second) closes the oldest beyond `max_idle`. Closing them at
/// once made a proxy with more requests in flight than `max_idle` close and dial again a
/// connection for one request in a hundred; HAProxy purges its idle connections the same
/// way, gradually.
pub struct Pool {
    shares: Box<[Share]>,
}

/// One worker's idle connections, on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Share {
    idle: Mutex<VecDeque<Idle>>,
    /// How many `idle` holds: written only while it is locked (a load and a store, no
    /// locked add), read without the lock to count the pool.
    len: AtomicUsize,
}

impl Share {
    /// Runs `f` on the share's connections, locked, and notes how many are left.
    fn with<R>(&self, f: impl FnOnce(&mut VecDeque<Idle>) -> R) -> Option<R> {
        let mut q = self.idle.lock().ok()?;
        let r = f(&mut q);
        if self.len.load(Ordering::Relaxed) != q.len() {
            self.len.store(q.len(), Ordering::Relaxed);
        }
        Some(r)
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

impl Default for Pool {
    /// A pool with a share for each worker.
    fn default() -> Pool {
        Pool::with_shares(crate::workers::count())
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    /// A pool of `n` shares (at least one).
    pub fn with_shares(n: usize) -> Pool {
        Pool {
            shares: (0..n.max(1)).map(|_| Share::default()).collect(),
        }
    }

    /// Number of idle connections held.
    pub fn idle_count(&self) -> usize {
        self.shares
            .iter()
            .map(|s| s.len.load(Ordering::Relaxed))
            .sum()
    }

    /// The share of the calling worker.
    fn home(&self) -> usize {
        crate::workers::index() % self.shares.len()
    }

    /// Every share, the calling worker's first.
    fn shares_home_first(&self) -> impl Iterator<Item = usize> + use<> {
        let (home, n) = (self.home(), self.shares.len());
        (0..n).map(move |i| (home + i) % n)
    }

    /// The most recently used idle connection that is still open and young enough at
    /// `now`: from the calling worker's share, else from another's (then moved to the
    /// calling worker's reactor).
    pub fn take(&self, idle_timeout: Duration, now: Instant) -> Option<Box<Conn>> {
        let home = self.home();
        for share in self.shares_home_first() {
            if let Some(mut conn) = self.take_from(share, idle_timeout, now) {
                conn.reused = true;
                if share != home {
                    conn = Box::new(conn.moved_here()?);
                }
                return Some(conn);
            }
        }
        None
    }

    fn take_from(&self, share: usize, idle_timeout: Duration, now: Instant) -> Option<Box<Conn>> {
        self.shares[share].with(|q| {
            while let Some(idle) = q.pop_back() {
                if now.duration_since(idle.since) >= idle_timeout {
                    // Everything older is expired too.
                    q.clear();
                    break;
                }
                if !idle.conn.peer_closed() {
                    return Some(idle.conn);
                }
            }
            None
        })?
    }

    /// Keeps `conn` as the most recently used idle connection of the calling worker's
    /// share. With twice `max_idle` held already, the oldest of that share makes room (or,
    /// with none there, `conn` is closed); with `max_idle` 0 nothing is kept.
    pub fn put(&self, mut conn: Box<Conn>, max_idle: usize) {
        if max_idle == 0 {
            return;
        }
        // Nothing is buffered on a connection that ended its exchange cleanly: an idle
        // connection holds no buffer. Its read buffer goes to the thread's spares (a grown
        // one is freed), and the next exchange takes one when it reads.
        if conn.buf.is_empty() {
            give_back(std::mem::take(&mut conn.buf));
            conn.read_size = ReadSize::default();
        }
        let home = self.home();
        // Workers putting at once may each see room for one more: the sweep closes what
        // is beyond the bound.
        if self.idle_count() >= max_idle.saturating_mul(2) {
            // Full: this connection takes the place of the oldest of this share, else of
            // another's (one share locked at a time), else it is closed.
            let oldest = self
                .shares_home_first()
                .find_map(|i| self.shares[i].with(VecDeque::pop_front).flatten());
            if oldest.is_none() {
                return;
            }
        }
        let since = crate::timing::now();
        self.shares[home].with(|q| q.push_back(Idle { conn, since }));
    }

    /// Closes idle connections older than `idle_timeout`, then the oldest beyond
    /// `max_idle`.
    pub fn sweep(&self, idle_timeout: Duration, max_idle: usize) {
        let now = Instant::now();
        for s in self.shares.iter() {
            s.with(|q| {
                while q
                    .front()
                    .is_some_and(|i| now.duration_since(i.since) >= idle_timeout)
                {
                    q.pop_front();
                }
            });
        }
        while self.idle_count() > max_idle {
            // The share whose oldest is the oldest of all (one share locked at a time).
            let oldest = (0..self.shares.len())
                .filter_map(|i| Some((self.shares[i].with(|q| q.front().map(|c| c.since))??, i)))
                .min();
            let Some((_, i)) = oldest else { break };
            self.shares[i].with(VecDeque::pop_front);
        }
    }
}

/// A connection to one server, ready for one exchange at a time. It has no task: the
/// request's own task writes the request, reads the response head and then the body.
pub struct Conn {
    io: Stream,
    /// Read but not yet used: the start of a response head or body.
    buf: BytesMut,
    /// Whether it came from the pool (a failure before any response byte is then retried
    /// on a fresh connection, CONTRACT §2 `pool_idle_timeout`).
    pub reused: bool,
    /// Bytes written to the server's socket so far: a try that wrote none provably never
    /// reached the server (RFC 9110 §9.2.2), whatever its method.
    written: Arc<AtomicU64>,
    /// Set once a request has been written in full; cleared when one starts. Only a
    /// connection whose request went out whole can carry another.
    request_complete: bool,
    /// Set once the current request's body has been polled: from then on the request
    /// cannot be sent again as it is.
    body_touched: bool,
    /// How much the next read asks for.
    read_size: ReadSize,
    /// Keeps the deadline of the response head.
    timer: LazyTimer,
}

impl Conn {
    /// Bytes written on this connection so far (TLS records included).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the last request's body was read from (and so cannot be sent again).
    pub fn body_touched(&self) -> bool {
        self.body_touched
    }

    /// The connection registered with the calling thread's reactor instead of the one
    /// that dialed it (a plain socket is moved; a TLS one stays where it is, and its
    /// readiness reaches this thread through its wake-ups). `None` if the socket cannot be
    /// moved: it is closed.
    fn moved_here(mut self) -> Option<Conn> {
        self.timer = LazyTimer::default();
        self.io = match self.io {
            Either::Left(c) => {
                let std = c.inner.into_std().ok()?;
                Either::Left(Counted {
                    inner: TcpStream::from_std(std).ok()?,
                    written: c.written,
                })
            }
            tls => tls,
        };
        Some(self)
    }

    /// Whether the server has closed the connection, or sent something unasked, while it
    /// was idle: either way it cannot carry a request. Costs at most one non-blocking peek.
    fn peer_closed(&self) -> bool {
        let tcp = match &self.io {
            Either::Left(c) => &c.inner,
            Either::Right(t) => &t.get_ref().0.inner,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut peek = ReadBuf::new(&mut byte);
        tcp.poll_peek(&mut cx, &mut peek).is_ready()
    }

    /// Reads more into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == 0 {
            self.buf = take_buffer();
        }
        self.read_size.poll_fill(&mut self.io, &mut self.buf, cx)
    }
}

/// The socket of a connection: plain, or TLS (boxed: the TLS state is large, and most
/// connections are plain).
pub type Stream = Either<Counted, Box<tokio_rustls::client::TlsStream<Counted>>>;

/// Opens a new connection to `target` (`addr`: the entry as written, whose host is the TLS
/// name). With `tls`, the TLS handshake is part of the connect and shares its timeout.
pub async fn dial(
    target: &Target,
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&UpstreamTls>,
    resolver: Option<std::net::SocketAddr>,
) -> io::Result<Box<Conn>> {
    let written = Arc::new(AtomicU64::new(0));
    let connect = async {
        let stream = match target {
            Target::Socket(sa) => TcpStream::connect(sa).await,
            Target::Name(name) => connect_name(name, resolver).await,
        }?;
        stream.set_nodelay(true)?;
        let stream = Counted {
            inner: stream,
            written: Arc::clone(&written),
        };
        match tls {
            None => Ok::<_, io::Error>(Either::Left(stream)),
            Some(tls) => {
                let host = crate::config::split_host_port(addr).map_or(addr, |(h, _)| h);
                let name = tls.name_for(host).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no TLS name for {addr}"),
                    )
                })?;
                let s = tls.connector.connect(name, stream).await?;
                Ok(Either::Right(Box::new(s)))
            }
        }
    };
    let io = match tokio::time::timeout(connect_timeout, connect).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {connect_timeout:?}"),
            ));
        }
    };
    Ok(Box::new(Conn {
        io,
        buf: BytesMut::new(),
        reused: false,
        written,
        request_complete: false,
        body_touched: false,
        read_size: ReadSize::default(),
        timer: LazyTimer::default(),
    }))
}

/// Connects to `host:port`, resolving through `resolver` when set (on the blocking pool),
/// else through the system resolver; tries each address in turn.
async fn connect_name(name: &str, resolver: Option<std::net::SocketAddr>) -> io::Result<TcpStream> {
    let Some(resolver) = resolver else {
        return TcpStream::connect(name).await;
    };
    let (host, port) = crate::config::split_host_port(name)
        .map(|(h, p)| (h.to_owned(), p))
        .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
    let addrs =
        tokio::task::spawn_blocking(move || crate::resolve::resolve(&host, port, Some(resolver)))
            .await
            .map_err(io::Error::other)??;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address"));
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A socket that counts the bytes written to it.
pub struct Counted {
    inner: TcpStream,
    written: Arc<AtomicU64>,
}

impl Counted {
    fn count(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.count(&r);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A plain or a TLS stream.
type Either<A, B> = tokio_util::either::Either<A, B>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_connection_in_the_pool_holds_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Target::Socket(listener.local_addr().unwrap());
        let mut conn = dial(&target, "127.0.0.1", Duration::from_secs(5), None, None)
            .await
            .unwrap();
        let _server_side = listener.accept().await.unwrap();
        // As after an exchange: the buffer read into, and emptied.
        conn.buf = take_buffer();
        let pool = Pool::default();
        pool.put(conn, 4);
        let conn = pool
            .take(Duration::from_secs(60), Instant::now())
            .expect("kept idle");
        assert_eq!(conn.buf.capacity(), 0);
    }

    /// Dials `n` connections to `listener`, on the calling thread's reactor.
    async fn dial_n(target: &Target, n: usize) -> Vec<Box<Conn>> {
        let mut conns = Vec::new();
        for _ in 0..n {
            let c = dial(target, "127.0.0.1", Duration::from_secs(5), None, None);
            conns.push(c.await.unwrap());
        }
        conns
    }

    #[tokio::test]
    async fn the_shares_of_the_workers_hold_max_idle_in_all_once_swept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Target::Socket(listener.local_addr().unwrap());
        let accepted = tokio::spawn(async move {
            let mut peers = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                peers.push(s);
            }
        });
        let workers = crate::workers::Workers::start(2).unwrap();
        let pool = Arc::new(Pool::with_shares(2));
        let (h0, h1) = (&workers.handles()[0], &workers.handles()[1]);
        let lens = |pool: &Pool| -> Vec<usize> {
            pool.shares
                .iter()
                .map(|s| s.idle.lock().unwrap().len())
                .collect()
        };
        // With max_idle 2, worker 0 returns 3 connections, worker 1 then 2: a burst may
        // leave twice max_idle, so the fifth takes the place of worker 1's own oldest.
        for (h, n) in [(h0, 3), (h1, 2)] {
            let (pool, target) = (Arc::clone(&pool), target.clone());
            h.spawn(async move {
                for c in dial_n(&target, n).await {
                    pool.put(c, 2);
                }
            })
            .await
            .unwrap();
        }
        assert_eq!(pool.idle_count(), 4);
        assert_eq!(lens(&pool)[..2], [3, 1]);
        // The sweep closes the oldest beyond max_idle: worker 0's first two.
        pool.sweep(Duration::from_secs(60), 2);
        assert_eq!(pool.idle_count(), 2);
        assert_eq!(lens(&pool)[..2], [1, 1]);
        // Put back to 4 (two more from worker 0) for the takes below.
        let (p, t) = (Arc::clone(&pool), target.clone());
        h0.spawn(async move {
            for c in dial_n(&t, 2).await {
                p.put(c, 2);
            }
        })
        .await
        .unwrap();
        assert_eq!(lens(&pool)[..2], [3, 1]);
        // Worker 1 takes its own, then worker 0's (moved to its reactor, and usable).
        let p = Arc::clone(&pool);
        let taken = h1
            .spawn(async move {
                let mut taken = Vec::new();
                while let Some(mut c) = p.take(Duration::from_secs(60), Instant::now()) {
                    assert!(c.reused);
                    tokio::io::AsyncWriteExt::write_all(&mut c.io, b"x")
                        .await
                        .unwrap();
                    taken.push(c);
                }
                taken.len()
            })
            .await
            .unwrap();
        assert_eq!(taken, 4);
        assert_eq!(pool.idle_count(), 0);
        workers.end();
        accepted.abort();
    }
}
