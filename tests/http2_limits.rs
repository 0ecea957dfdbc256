//! HTTP/2 abuse (CONTRACT §3; SECURITY.md): streams past `SETTINGS_MAX_CONCURRENT_STREAMS`
//! wait (a client that follows the settings) or are refused with `REFUSED_STREAM` (one that
//! does not), and a rapid reset of thousands of streams gets the connection closed with
//! `GOAWAY`, over the h2 crate and over raw frames. A well-behaved client ([`Steady`]) keeps
//! getting 200s beside every case.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::h2raw::*;
use common::steady::*;
use common::usage::HEAVY;
use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Two clients: the h2 crate, and raw frames

/// GET `uri` on an HTTP/2 connection: the status, or the error that ended the stream.
async fn h2_status(send: h2::client::SendRequest<Bytes>, uri: String) -> Result<u16, h2::Error> {
    let mut send = send.ready().await?;
    let (resp, _) = send.send_request(Request::get(uri).body(()).unwrap(), true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

#[derive(Debug)]
struct H2Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl H2Frame {
    /// The error code of an RST_STREAM or GOAWAY frame.
    fn error_code(&self) -> u32 {
        let at = if self.kind == FRAME_GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// Reads frames off a raw HTTP/2 connection.
#[derive(Default)]
struct H2Frames {
    buf: Vec<u8>,
}

impl H2Frames {
    /// The next frame; `None` once the peer has closed (EOF or reset).
    async fn next(&mut self, s: &mut TcpStream) -> Option<H2Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = H2Frame {
                        kind: self.buf[3],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut tmp = [0u8; 16 * 1024];
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_past_max_concurrent_streams_wait_or_are_refused() {
    let _heavy = HEAVY.lock().await;
    let app = TestUpstream::start("app").await;
    app.set_delay(Duration::from_millis(1500));
    let mut b = bench("", &[app.addr], "").await;
    let addr = b.addr();

    // A client that follows the SETTINGS: 300 at once, the last 44 wait for a free slot.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut advertised = send.current_max_send_streams();
    for _ in 0..250 {
        if advertised != usize::MAX {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        advertised = send.current_max_send_streams();
    }
    assert_eq!(advertised, 256, "SETTINGS_MAX_CONCURRENT_STREAMS");
    let tasks: Vec<_> = (0..300)
        .map(|i| tokio::spawn(h2_status(send.clone(), format!("http://{addr}/h2/{i}"))))
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(200) => ok += 1,
            other => panic!("stream answered {other:?}"),
        }
    }
    assert_eq!(ok, 300);
    let peak = app.knobs.most_in_flight.load(Ordering::SeqCst);
    println!("polite h2 client: 300 served, at most {peak} at once upstream");
    assert!(peak <= 256, "{peak} streams in flight at once");
    assert!(peak >= 200, "only {peak} streams in flight at once");
    drop(send);
    let _ = driver.await;

    // A client that sends 300 requests before it has read the SETTINGS (raw frames): the
    // server refuses what is past its limit (RST_STREAM REFUSED_STREAM), serving the rest.
    app.knobs.most_in_flight.store(0, Ordering::SeqCst);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    for i in 0..300u32 {
        let headers = hpack_get(&addr.to_string(), &format!("/h2raw/{i}"));
        out.extend(h2_frame(
            FRAME_HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &headers,
        ));
    }
    s.write_all(&out).await.unwrap();
    let (mut answered, mut refused) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let mut frames = H2Frames::default();
    while answered.len() + refused.len() < 300 {
        let f = tokio::time::timeout(Duration::from_secs(10), frames.next(&mut s))
            .await
            .expect("no frame within 10 s")
            .expect("connection closed before every stream was answered");
        match f.kind {
            FRAME_HEADERS => {
                answered.insert(f.stream);
            }
            FRAME_RST_STREAM => {
                assert_eq!(f.error_code(), REFUSED_STREAM, "stream {} reset", f.stream);
                refused.insert(f.stream);
            }
            FRAME_GOAWAY => panic!("GOAWAY {:#x}", f.error_code()),
            _ => {}
        }
    }
    println!(
        "300 streams sent before the SETTINGS were read: {} served, {} refused",
        answered.len(),
        refused.len()
    );
    assert_eq!(answered.len(), 256);
    assert_eq!(refused.len(), 44);
    // The refused ones are the last opened.
    assert_eq!(refused.iter().next().copied(), Some(2 * 256 + 1));
    let peak = app.knobs.most_in_flight.load(Ordering::SeqCst);
    assert!(peak <= 256, "{peak} streams in flight at once");
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_gets_the_connection_closed() {
    let app = TestUpstream::start("app").await;
    app.set_delay(Duration::from_millis(100));
    let mut b = bench("", &[app.addr], "").await;
    let addr = b.addr();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let start = Instant::now();
    let mut opened = 0;
    let mut refused: Option<h2::Error> = None;
    let mut ready = Some(send);
    for i in 0..10_000 {
        let mut send = match ready.take().unwrap().ready().await {
            Ok(s) => s,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        let req = Request::get(format!("http://{addr}/reset/{i}"))
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Ok((resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                drop(resp);
                opened += 1;
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        ready = Some(send);
        if i % 64 == 63 {
            // Let the connection task write what is queued.
            tokio::task::yield_now().await;
        }
    }
    drop(ready);
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the connection is still open 10 s after the resets")
        .unwrap();
    let took = start.elapsed();
    println!(
        "rapid reset: {opened} streams opened and reset; client stopped by {refused:?}; \
         connection ended {ended:?} after {took:?}; {} reached the upstream",
        app.hits()
    );
    let err = refused
        .or(ended.err())
        .expect("the proxy let 10,000 reset streams through without closing the connection");
    assert!(
        err.is_go_away() || err.is_io(),
        "the connection ended with {err:?}, not a GOAWAY"
    );
    assert!(opened < 10_000, "all 10,000 streams were accepted");
    assert!(
        app.hits() < 1_000,
        "{} reset streams still went upstream",
        app.hits()
    );

    // The same on raw frames, to see what the proxy says: HEADERS then RST_STREAM (CANCEL)
    // for 1,000 streams in one burst; the proxy answers GOAWAY (ENHANCE_YOUR_CALM) and
    // closes the connection.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    for i in 0..1_000u32 {
        let headers = hpack_get(&addr.to_string(), &format!("/raw-reset/{i}"));
        out.extend(h2_frame(FRAME_HEADERS, END_HEADERS, 2 * i + 1, &headers));
        out.extend(h2_frame(
            FRAME_RST_STREAM,
            0,
            2 * i + 1,
            &CANCEL.to_be_bytes(),
        ));
    }
    let _ = s.write_all(&out).await;
    let mut frames = H2Frames::default();
    let mut goaway = None;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(f) = frames.next(&mut s).await {
            if f.kind == FRAME_GOAWAY {
                goaway = Some(f.error_code());
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection still open 5 s after 1,000 resets"
    );
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "GOAWAY error code");

    assert_eq!(get(&b.url("/after-reset")).await.status, 200);
    b.steady_ok().await;
}
