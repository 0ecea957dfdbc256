//! PROXY protocol v1/v2 parsing: `parse_v1`, `parse_v2` and `read_header` on arbitrary
//! input. Nothing may panic, and `read_header` must never read past the header it accepts.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use fairway::proxy_protocol::{parse_v1, parse_v2, read_header};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A reader that hands out the input at most `chunk` bytes per read, to exercise short
/// reads, and counts what was consumed.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
    consumed: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        self.consumed += n;
        Poll::Ready(Ok(()))
    }
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    // The parsers on their own.
    let _ = parse_v1(data);
    if let [ver_cmd, fam, rest @ ..] = data {
        let _ = parse_v2(*ver_cmd, *fam, rest);
    }

    // The stream reader: first byte picks the read size, the rest is the stream.
    let Some((&c, stream)) = data.split_first() else {
        return;
    };
    let mut reader = Chunked {
        data: stream,
        chunk: usize::from(c % 32) + 1,
        consumed: 0,
    };
    let result = rt().block_on(read_header(&mut reader));
    let consumed = reader.consumed;
    assert!(consumed <= stream.len());
    // v1 is at most 107 bytes; v2 is 16 bytes plus at most 512.
    assert!(consumed <= 16 + 512, "read {consumed} bytes");
    if let Ok(h) = result {
        let header = &stream[..consumed];
        if header.starts_with(b"PROXY ") {
            assert!(header.len() <= 107, "v1 header of {} bytes", header.len());
            assert!(header.ends_with(b"\r\n"));
            assert_eq!(parse_v1(header).ok(), Some(h));
        } else {
            assert!(header.len() >= 16);
            let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
            assert_eq!(header.len(), 16 + len, "read past the v2 header");
            assert_eq!(parse_v2(header[12], header[13], &header[16..]).ok(), Some(h));
        }
    }
});
