//! A client's HTTP/1.1 connection as its loop (`connection::h1`) and the request body being
//! read (`upload::ClientBody`) share it ([`Wire`]): the socket, the read buffer, how much of
//! the current request's body is still to come, and a `100 Continue` owed to the client.
//! The loop holds it as its own ([`HeldWire`]) and shares it behind a lock only while a
//! request body is being read (or the connection is a tunnel). Both run on the
//! connection's one task, so the lock is never contended, and it is never held across an
//! await.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::error::ClientFault;
use crate::h1::chunked::{Decoder, Step};
use crate::stream::{ReadSize, Rewind, give_back, take_buffer};

/// A client's socket: plain, or TLS (boxed: the TLS state is large, and most connections
/// are plain).
pub type ClientIo =
    tokio_util::either::Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// A body's data smaller than this is gathered with what follows it in the buffer, so that
/// a body sent in tiny chunks costs work per buffer read, not per chunk.
const GATHER_MIN: usize = 4 * 1024;

/// The most data gathered into one piece.
const GATHER_MAX: usize = 16 * 1024;

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How much of the current request's body is still to come.
#[derive(Debug)]
pub enum Remaining {
    /// None: no body, or it has been read to its end.
    None,
    /// This many bytes.
    Known(u64),
    /// The rest of a chunked body.
    Chunked(Box<Decoder>),
    /// The body failed (malformed, or the client went away): what follows on the
    /// connection cannot be framed.
    Broken,
}

/// The client side of one HTTP/1.1 connection.
pub struct Wire {
    /// The socket.
    pub io: ClientIo,
    /// Read but not yet used: a request head, body bytes, or a pipelined next request.
    pub buf: BytesMut,
    read_size: ReadSize,
    /// Bytes read from the client so far (what a chunked body costs on the wire).
    pub read_total: Arc<AtomicU64>,
    /// The current request's body still to come.
    pub body: Remaining,
    /// `Some(n)` while a `100 Continue` is owed (`n` of its bytes written): it goes out
    /// when the body is first read.
    pub owe_continue: Option<usize>,
    /// Bytes were written to the client.
    wrote: bool,
    /// `TCP_NODELAY` is on, or needs no setting (TLS connections have it from the start).
    nodelay: bool,
}

/// A [`Wire`] shared by the connection's loop and the body being read.
pub type SharedWire = Arc<Mutex<Wire>>;

/// A connection's [`Wire`] as its loop holds it: its own while no request body is being
/// read (most requests have none), so that reading a head and writing an answer lock
/// nothing; shared behind the lock while a body (or a tunnel) reads from it too.
pub struct HeldWire(Slot);

enum Slot {
    Own(Wire),
    Shared(SharedWire),
    /// Only within [`HeldWire::share`] and [`HeldWire::reclaim`], which move it on.
    Moving,
}

/// The wire, to use now: the loop's own, or locked.
pub enum WireRef<'a> {
    /// The loop's own.
    Own(&'a mut Wire),
    /// Shared, and locked while this lives.
    Locked(MutexGuard<'a, Wire>),
}

impl std::ops::Deref for WireRef<'_> {
    type Target = Wire;
    fn deref(&self) -> &Wire {
        match self {
            WireRef::Own(w) => w,
            WireRef::Locked(g) => g,
        }
    }
}

impl std::ops::DerefMut for WireRef<'_> {
    fn deref_mut(&mut self) -> &mut Wire {
        match self {
            WireRef::Own(w) => w,
            WireRef::Locked(g) => g,
        }
    }
}

impl HeldWire {
    /// The loop's own wire.
    pub fn new(w: Wire) -> HeldWire {
        HeldWire(Slot::Own(w))
    }

    /// The wire, to read or write now.
    pub fn get(&mut self) -> WireRef<'_> {
        match &mut self.0 {
            Slot::Own(w) => WireRef::Own(w),
            Slot::Shared(s) => WireRef::Locked(lock(s)),
            Slot::Moving => unreachable!("a wire is moving only within share and reclaim"),
        }
    }

    /// A handle to the wire for what reads it beside the loop (a request body, a tunnel):
    /// from now on every use locks it, until [`HeldWire::reclaim`].
    pub fn share(&mut self) -> SharedWire {
        let shared = match std::mem::replace(&mut self.0, Slot::Moving) {
            Slot::Own(w) => Arc::new(Mutex::new(w)),
            Slot::Shared(s) => s,
            Slot::Moving => unreachable!("a wire is moving only within share and reclaim"),
        };
        self.0 = Slot::Shared(Arc::clone(&shared));
        shared
    }

    /// Takes the wire back as the loop's own once no handle from [`HeldWire::share`] is
    /// left (the request's body has been dropped).
    pub fn reclaim(&mut self) {
        if let Slot::Shared(s) = &self.0
            && Arc::strong_count(s) == 1
            && let Slot::Shared(s) = std::mem::replace(&mut self.0, Slot::Moving)
        {
            self.0 = match Arc::try_unwrap(s) {
                Ok(m) => Slot::Own(m.into_inner().unwrap_or_else(|e| e.into_inner())),
                Err(s) => Slot::Shared(s),
            };
        }
    }

    /// The wire itself, if nothing else holds it any more.
    pub fn into_inner(mut self) -> Option<Wire> {
        self.reclaim();
        match self.0 {
            Slot::Own(w) => Some(w),
            Slot::Shared(_) | Slot::Moving => None,
        }
    }
}

/// Locks the wire (never contended; a poisoned lock is taken over as it is).
pub fn lock(w: &Mutex<Wire>) -> MutexGuard<'_, Wire> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl Wire {
    /// A connection on `io`, with `buf` read already.
    pub fn new(io: ClientIo, buf: BytesMut) -> Wire {
        let tls = matches!(io, tokio_util::either::Either::Right(_));
        Wire {
            io,
            buf,
            read_size: ReadSize::default(),
            read_total: Arc::new(AtomicU64::new(0)),
            body: Remaining::None,
            owe_continue: None,
            wrote: false,
            nodelay: tls,
        }
    }

    /// Called before each write to the client. Nagle's algorithm holds a small write back
    /// only while bytes written earlier are not yet acknowledged, so the first write of a
    /// connection never waits: `TCP_NODELAY` is set just before the second one. A client
    /// that gets one answer and closes (`Connection: close`) costs one system call less.
    pub fn before_write(&mut self) {
        if self.wrote {
            self.nodelay_on();
        }
        self.wrote = true;
    }

    /// Sets `TCP_NODELAY` once, on a plain TCP connection.
    fn nodelay_on(&mut self) {
        if !self.nodelay {
            self.nodelay = true;
            if let tokio_util::either::Either::Left(tcp) = &self.io {
                let _ = tcp.set_nodelay(true);
            }
        }
    }

    /// Waits until the socket may have something to read, without a system call where the
    /// socket's readiness is known (plain TCP); TLS reads instead.
    pub fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.io {
            tokio_util::either::Either::Left(tcp) => tcp.poll_read_ready(cx),
            tokio_util::either::Either::Right(_) => Poll::Ready(Ok(())),
        }
    }

    /// Reads more into the buffer; `Ok(0)` at end of stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == 0 {
            self.buf = take_buffer();
        }
        let n = ready!(self.read_size.poll_fill(&mut self.io, &mut self.buf, cx))?;
        // The wire is this count's one writer: no locked add needed.
        let total = self.read_total.load(Ordering::Relaxed);
        self.read_total.store(total + n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    /// Gives back the read buffer's memory when it holds nothing (between requests).
    pub fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            give_back(std::mem::take(&mut self.buf));
            self.read_size = ReadSize::default();
        }
    }

    /// Writes what is left of an owed `100 Continue`.
    pub fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(done) = self.owe_continue {
            if done == CONTINUE.len() {
                self.owe_continue = None;
                break;
            }
            self.before_write();
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.owe_continue = Some(done + n);
        }
        Poll::Ready(Ok(()))
    }

    /// The next bytes of the current request's body: as much as the buffer holds (tiny
    /// chunks gathered), reading more when it holds nothing. A failure breaks the body.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ClientFault>>> {
        if self.owe_continue.is_some() && ready!(self.poll_continue(cx)).is_err() {
            self.body = Remaining::Broken;
            return Poll::Ready(Some(Err(ClientFault::Gone)));
        }
        let r = self.poll_body_bytes(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            self.body = Remaining::Broken;
        }
        r
    }

    fn poll_body_bytes(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, ClientFault>>> {
        loop {
            match &mut self.body {
                Remaining::None => return Poll::Ready(None),
                Remaining::Broken => return Poll::Ready(Some(Err(ClientFault::Gone))),
                Remaining::Known(n) => {
                    if !self.buf.is_empty() {
                        let take = (*n).min(self.buf.len() as u64) as usize;
                        *n -= take as u64;
                        if *n == 0 {
                            self.body = Remaining::None;
                        }
                        return Poll::Ready(Some(Ok(self.buf.split_to(take).freeze())));
                    }
                }
                Remaining::Chunked(d) => {
                    let mut gathered: Option<BytesMut> = None;
                    loop {
                        match d.decode(&mut self.buf) {
                            Ok(Step::Data(b)) => match gathered.as_mut() {
                                None if b.len() >= GATHER_MIN => {
                                    return Poll::Ready(Some(Ok(b)));
                                }
                                None => {
                                    let mut g = BytesMut::with_capacity(GATHER_MAX);
                                    g.extend_from_slice(&b);
                                    gathered = Some(g);
                                }
                                Some(g) => {
                                    g.extend_from_slice(&b);
                                    if g.len() >= GATHER_MAX {
                                        break;
                                    }
                                }
                            },
                            Ok(Step::End) => {
                                if gathered.is_none() {
                                    self.body = Remaining::None;
                                    return Poll::Ready(None);
                                }
                                break;
                            }
                            Ok(Step::More) => break,
                            Err(_) => {
                                return Poll::Ready(Some(Err(ClientFault::Malformed(
                                    "malformed chunked body",
                                ))));
                            }
                        }
                    }
                    if let Some(g) = gathered {
                        if d.is_done() {
                            self.body = Remaining::None;
                        }
                        return Poll::Ready(Some(Ok(g.freeze())));
                    }
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(Some(Err(ClientFault::Gone))),
                Ok(_) => {}
            }
        }
    }
}

/// A request body read from its client's HTTP/1.1 connection.
pub struct WireBody {
    wire: SharedWire,
    /// The declared length, for the size hint.
    length: Option<u64>,
}

impl WireBody {
    /// The body now starting on `wire` (whose [`Wire::body`] is set).
    pub fn new(wire: SharedWire) -> WireBody {
        let length = match &lock(&wire).body {
            Remaining::Known(n) => Some(*n),
            _ => None,
        };
        WireBody { wire, length }
    }

    /// The next bytes of the body; `None` at its end.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ClientFault>>> {
        lock(&self.wire).poll_body(cx)
    }

    /// Whether the body has been read to its end.
    pub fn is_end(&self) -> bool {
        matches!(lock(&self.wire).body, Remaining::None)
    }

    /// The whole body's declared length, if it has one.
    pub fn length(&self) -> Option<u64> {
        self.length
    }
}

/// A client's socket with the bytes read from it already put back in front: a connection
/// that turns out to speak HTTP/2.
pub type Prefixed = Rewind<ClientIo>;

impl From<Wire> for Prefixed {
    fn from(mut w: Wire) -> Prefixed {
        // HTTP/2 writes frames as they come: no write of it waits for Nagle.
        w.nodelay_on();
        Rewind::new(w.buf.freeze(), w.io)
    }
}

/// A shared wire as a plain byte stream, bytes read already first: a connection that has
/// become a tunnel.
pub struct WireIo(pub SharedWire);

impl tokio::io::AsyncRead for WireIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut w = lock(&self.0);
        if !w.buf.is_empty() {
            let n = w.buf.len().min(buf.remaining());
            buf.put_slice(&w.buf.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut w.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WireIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut w = lock(&self.0);
        w.before_write();
        Pin::new(&mut w.io).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (SharedWire, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let wire = Wire::new(tokio_util::either::Either::Left(server), BytesMut::new());
        (Arc::new(Mutex::new(wire)), client)
    }

    #[tokio::test]
    async fn nodelay_is_set_just_before_the_second_write() {
        let (wire, _client) = pair().await;
        let mut w = lock(&wire);
        let nodelay = |w: &Wire| match &w.io {
            tokio_util::either::Either::Left(tcp) => tcp.nodelay().unwrap(),
            tokio_util::either::Either::Right(_) => unreachable!("a plain TCP pair"),
        };
        assert!(!nodelay(&w));
        w.before_write();
        assert!(!nodelay(&w), "the first write never waits for Nagle");
        w.before_write();
        assert!(nodelay(&w));
    }

    #[tokio::test]
    async fn a_held_wire_is_shared_while_a_handle_lives_and_the_loops_own_after() {
        let (wire, _client) = pair().await;
        let w = Arc::try_unwrap(wire).ok().unwrap().into_inner().unwrap();
        let mut held = HeldWire::new(w);
        assert!(matches!(held.get(), WireRef::Own(_)));
        let body = held.share();
        body.lock().unwrap().buf.extend_from_slice(b"body");
        assert!(matches!(held.get(), WireRef::Locked(_)));
        assert_eq!(&held.get().buf[..], b"body", "one wire, seen from both");
        held.reclaim();
        assert!(
            matches!(held.get(), WireRef::Locked(_)),
            "still shared while the handle lives"
        );
        drop(body);
        held.reclaim();
        assert!(matches!(held.get(), WireRef::Own(_)));
        let tunnel = held.share();
        assert!(held.get().buf.len() == 4);
        drop(tunnel);
        assert_eq!(&held.into_inner().unwrap().buf[..], b"body");
    }

    async fn read_all(body: &mut WireBody) -> Result<Vec<Bytes>, ClientFault> {
        let mut out = Vec::new();
        while let Some(b) = std::future::poll_fn(|cx| body.poll_data(cx)).await {
            out.push(b?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn tiny_chunks_in_one_read_come_out_as_one_piece() {
        use tokio::io::AsyncWriteExt;
        let (wire, mut client) = pair().await;
        lock(&wire).body = Remaining::Chunked(Box::default());
        let mut sent = Vec::new();
        for _ in 0..1000 {
            sent.extend_from_slice(b"1\r\nx\r\n");
        }
        sent.extend_from_slice(b"0\r\n\r\nGET /next");
        client.write_all(&sent).await.unwrap();
        let mut body = WireBody::new(Arc::clone(&wire));
        let pieces = read_all(&mut body).await.unwrap();
        assert_eq!(pieces.iter().map(Bytes::len).sum::<usize>(), 1000);
        assert!(pieces.len() < 10, "{} pieces", pieces.len());
        assert!(body.is_end());
        assert_eq!(&lock(&wire).buf[..], b"GET /next");
    }

    #[tokio::test]
    async fn a_known_length_body_stops_at_its_end_and_a_short_one_is_the_clients() {
        use tokio::io::AsyncWriteExt;
        let (wire, mut client) = pair().await;
        lock(&wire).body = Remaining::Known(5);
        client.write_all(b"helloGET").await.unwrap();
        let mut body = WireBody::new(Arc::clone(&wire));
        assert_eq!(body.length(), Some(5));
        assert_eq!(read_all(&mut body).await.unwrap().concat(), b"hello");
        assert_eq!(&lock(&wire).buf[..], b"GET");

        lock(&wire).buf.clear();
        lock(&wire).body = Remaining::Known(10);
        client.write_all(b"abc").await.unwrap();
        drop(client);
        let mut body = WireBody::new(Arc::clone(&wire));
        assert_eq!(read_all(&mut body).await, Err(ClientFault::Gone));
        assert!(matches!(lock(&wire).body, Remaining::Broken));
    }

    #[tokio::test]
    async fn bad_chunk_framing_is_malformed() {
        use tokio::io::AsyncWriteExt;
        let (wire, mut client) = pair().await;
        lock(&wire).body = Remaining::Chunked(Box::default());
        client.write_all(b"zz\r\nhello\r\n").await.unwrap();
        let mut body = WireBody::new(Arc::clone(&wire));
        assert!(matches!(
            read_all(&mut body).await,
            Err(ClientFault::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn the_owed_continue_goes_out_before_the_body_is_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (wire, mut client) = pair().await;
        {
            let mut w = lock(&wire);
            w.body = Remaining::Known(2);
            w.owe_continue = Some(0);
        }
        let mut body = WireBody::new(Arc::clone(&wire));
        let reader = tokio::spawn(async move { read_all(&mut body).await });
        let mut got = vec![0u8; CONTINUE.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONTINUE);
        client.write_all(b"ok").await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap().concat(), b"ok");
    }
}
