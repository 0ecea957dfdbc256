//! Upgraded connections (WebSocket): after the upstream's `101`, bytes are copied both ways
//! until either side closes or no byte moves for `tunnel_idle_timeout`; at shutdown a
//! WebSocket client gets a close frame ("going away") between two frames.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::server::ActiveGuard;

/// The upstream's side of an upgraded connection, with what running it needs; the client
/// connection that got the `101` runs it.
pub struct Tunnel {
    /// The upstream's side.
    pub upstream: crate::client::Upgraded,
    /// `tunnel_idle_timeout`.
    pub idle: Duration,
    /// Fires at shutdown.
    pub stop: CancellationToken,
    /// Keeps the request counted as active on its server.
    pub guard: ActiveGuard,
}

/// The close frame sent to WebSocket clients at shutdown: status 1001, "going away".
const GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xe9];

/// How long a client gets to answer the close frame before the tunnel is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs one tunnel until either side closes, it idles past `idle`, or shutdown. At
/// shutdown a WebSocket client gets a close frame (1001) at a frame boundary, so that it
/// reconnects at once instead of waiting on a dead connection.
pub async fn run<C>(client: C, t: Tunnel)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let c = Watched {
        inner: client,
        activity: Arc::clone(&activity),
    };
    let u = Watched {
        inner: t.upstream,
        activity: Arc::clone(&activity),
    };
    let server = Arc::clone(t.guard.server());
    // Only WebSocket upgrades are tunnelled (`headers::is_upgrade_request`): the upstream's
    // frames are followed so that shutdown can close the tunnel between two of them.
    let (mut c_read, mut c_write) = tokio::io::split(c);
    let (mut u_read, mut u_write) = tokio::io::split(u);
    let client_to_upstream = async {
        let r = tokio::io::copy(&mut c_read, &mut u_write).await;
        let _ = u_write.shutdown().await;
        r.map(|_| ())
    };
    let upstream_to_client = copy_frames(&mut u_read, &mut c_write, &t.stop);
    tokio::pin!(client_to_upstream);
    tokio::select! {
        r = &mut client_to_upstream => {
            if let Err(e) = r {
                tracing::debug!(server = %server.addr, error = %e, "tunnel closed with an error");
            }
        }
        r = upstream_to_client => match r {
            Ok(Ended::Eof) => {}
            Ok(Ended::GoingAway) => {
                // Let the client's close frame through to the upstream, briefly.
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut client_to_upstream).await;
            }
            Err(e) => tracing::debug!(server = %server.addr, error = %e, "tunnel closed with an error"),
        },
        _ = activity.idle_for(t.idle) => {
            tracing::debug!(server = %server.addr, "tunnel closed: tunnel_idle_timeout");
        }
    }
    drop(t.guard);
}

/// How the upstream-to-client direction ended.
enum Ended {
    Eof,
    GoingAway,
}

/// Copies upstream WebSocket frames to the client; once `stop` fires, finishes the frame
/// in progress, sends a close frame and stops.
async fn copy_frames<R, W>(from: &mut R, to: &mut W, stop: &CancellationToken) -> io::Result<Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut closing = false;
    loop {
        if closing && frames.at_boundary() {
            to.write_all(&GOING_AWAY).await?;
            to.flush().await?;
            return Ok(Ended::GoingAway);
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            _ = stop.cancelled(), if !closing => {
                closing = true;
                continue;
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(Ended::Eof);
        }
        let chunk = &buf[..n];
        if closing {
            if let Some(end) = frames.boundary_within(chunk) {
                to.write_all(&chunk[..end]).await?;
                continue;
            }
        } else {
            frames.consume(chunk);
        }
        to.write_all(chunk).await?;
    }
}

/// Follows WebSocket frame boundaries in a byte stream (RFC 6455 §5.2).
#[derive(Debug, Default)]
struct Frames {
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// Header bytes seen of the next frame.
    head: [u8; 14],
    have: usize,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.have == 0
    }

    /// Header length once its first two bytes are known.
    fn head_len(&self) -> usize {
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes([
                self.head[2],
                self.head[3],
                self.head[4],
                self.head[5],
                self.head[6],
                self.head[7],
                self.head[8],
                self.head[9],
            ]),
            n => u64::from(n),
        }
    }

    /// Advances over one byte-run; returns how many bytes it took. Stops early at a
    /// boundary when `stop_at_boundary`.
    fn advance(&mut self, bytes: &[u8], stop_at_boundary: bool) -> (usize, bool) {
        let mut i = 0;
        while i < bytes.len() {
            if stop_at_boundary && self.at_boundary() {
                return (i, true);
            }
            if self.remaining > 0 {
                let take = self.remaining.min((bytes.len() - i) as u64);
                self.remaining -= take;
                i += take as usize;
                continue;
            }
            self.head[self.have] = bytes[i];
            self.have += 1;
            i += 1;
            if self.have >= 2 && self.have == self.head_len() {
                self.remaining = self.payload_len();
                self.have = 0;
            }
        }
        (i, stop_at_boundary && self.at_boundary())
    }

    fn consume(&mut self, bytes: &[u8]) {
        self.advance(bytes, false);
    }

    /// The offset of the first frame boundary in `bytes` (0 if already at one).
    fn boundary_within(&mut self, bytes: &[u8]) -> Option<usize> {
        match self.advance(bytes, true) {
            (at, true) => Some(at),
            _ => None,
        }
    }
}

/// When bytes last moved, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match payload {
            0..=125 => f.push(m | payload as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(7u8, payload));
        f
    }

    #[test]
    fn boundaries_are_found_across_chunks() {
        let mut stream = frame(3, false);
        let second = stream.len();
        stream.extend(frame(300, false));
        let third = stream.len();
        stream.extend(frame(70_000, true));
        let end = stream.len();
        for (cut, next) in [
            (0, 0),
            (1, second),
            (5, second),
            (second, second),
            (second + 3, third),
            (third + 1, end),
            (end - 1, end),
        ] {
            let mut f = Frames::default();
            f.consume(&stream[..cut]);
            let at = f.boundary_within(&stream[cut..]).map(|o| o + cut);
            assert_eq!(at, Some(next), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn shutdown_finishes_the_frame_then_says_going_away() {
        let stop = CancellationToken::new();
        let (mut up, mut up_peer) = tokio::io::duplex(1 << 20);
        let (mut client_peer, mut client) = tokio::io::duplex(1 << 20);
        let big = frame(50_000, false);
        // Half a frame is on its way when shutdown starts.
        up_peer.write_all(&big[..1000]).await.unwrap();
        let s2 = stop.clone();
        let task = tokio::spawn(async move { copy_frames(&mut up, &mut client_peer, &s2).await });
        tokio::task::yield_now().await;
        stop.cancel();
        up_peer.write_all(&big[1000..]).await.unwrap();
        up_peer.write_all(&frame(10, false)).await.unwrap();
        assert!(matches!(task.await.unwrap().unwrap(), Ended::GoingAway));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..big.len()], &big[..]);
        // The next frame may have been read in one go with the end of the big one, before
        // the copy saw the shutdown; then it is passed on whole. Never a part of it.
        let rest = &got[big.len()..];
        let next = frame(10, false);
        assert!(
            rest == GOING_AWAY || rest == [&next[..], &GOING_AWAY[..]].concat(),
            "{rest:?}"
        );
    }
}
