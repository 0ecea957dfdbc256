//! The chunked decoder (`h1::chunked::Decoder`). Input byte 0 picks a piece size (1–64);
//! the rest is fed as a chunked body in pieces of that size, and again all at once.
//! Besides "no panic": both feedings agree (payload, end, error); the payload is never
//! longer than the input; bytes after the end stay in the buffer untouched. Then the rest
//! of the input, taken as payload and split at the piece size, is encoded with
//! `chunked::size_line` and decodes back to itself.

#![no_main]

use bytes::BytesMut;
use fairway::h1::chunked::{ChunkError, Decoder, Step, size_line};
use libfuzzer_sys::fuzz_target;

/// Payload, whether the end was reached, the first error, and what was left unread.
fn decode(input: &[u8], piece: usize) -> (Vec<u8>, bool, Option<ChunkError>, Vec<u8>) {
    let mut d = Decoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for p in input.chunks(piece) {
        buf.extend_from_slice(p);
        fed += p.len();
        loop {
            match d.decode(&mut buf) {
                Ok(Step::Data(b)) => {
                    assert!(!b.is_empty());
                    out.extend_from_slice(&b);
                }
                Ok(Step::More) => break,
                Ok(Step::End) => {
                    assert!(d.is_done());
                    // Whatever came after the end is still there, in order.
                    let consumed = fed - buf.len();
                    assert_eq!(&input[consumed..fed], &buf[..]);
                    return (out, true, None, input[consumed..].to_vec());
                }
                Err(e) => return (out, false, Some(e), Vec::new()),
            }
        }
    }
    (out, false, None, Vec::new())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let piece = usize::from(first % 64) + 1;
    let split = decode(body, piece);
    let whole = decode(body, body.len().max(1));
    assert!(split.0.len() <= body.len());
    assert_eq!(split, whole);

    // Round trip.
    let mut wire = Vec::new();
    for p in body.chunks(piece) {
        let (line, n) = size_line(p.len());
        wire.extend_from_slice(&line[..n]);
        wire.extend_from_slice(p);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let (payload, ended, err, rest) = decode(&wire, piece);
    assert_eq!(err, None);
    assert!(ended);
    assert!(rest.is_empty());
    assert_eq!(payload, body);
});
