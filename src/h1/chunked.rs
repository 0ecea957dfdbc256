//! The chunked transfer coding (RFC 9112 §7.1), decoded from a connection's read buffer:
//! payload bytes are split off the buffer without copying, framing bytes are consumed, and
//! every part of the grammar is checked and bounded.

use bytes::{Buf, Bytes, BytesMut};

/// The longest chunk line (size, extensions and CRLF) accepted.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;

/// The largest trailer section accepted (its field lines and the final CRLF).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// What is wrong with a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk size that is not 1 to 16 hex digits.
    #[error("invalid chunk size")]
    Size,
    /// A chunk line over [`MAX_CHUNK_LINE`], or a control byte in an extension.
    #[error("invalid or oversized chunk extension")]
    Extension,
    /// Something other than CRLF where a line ends.
    #[error("invalid line ending in chunked body")]
    LineEnding,
    /// A trailer section over [`MAX_TRAILERS`], or a bare CR or NUL in it.
    #[error("invalid or oversized trailer section")]
    Trailers,
}

/// One step of decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Payload bytes.
    Data(Bytes),
    /// The buffer holds no complete next part: read more.
    More,
    /// The body ended (last chunk and trailer section consumed).
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeSpace,
    /// Inside chunk extensions, until CR.
    Extension,
    /// Expecting the LF of the chunk line.
    SizeLf,
    /// Payload bytes of the current chunk.
    Data,
    /// Expecting the CR after the payload.
    DataCr,
    /// Expecting the LF after the payload.
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer field line, until CR.
    TrailerLine,
    /// Expecting the LF that ends a trailer line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    /// Done.
    Done,
}

/// A chunked-body decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// Payload bytes left in the current chunk (or the size being read).
    remaining: u64,
    /// Hex digits of the size read so far.
    digits: u8,
    /// Bytes of the current chunk line seen.
    line: usize,
    /// Bytes of the trailer section seen.
    trailers: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// At the start of a body.
    pub fn new() -> Decoder {
        Decoder {
            state: State::Size,
            remaining: 0,
            digits: 0,
            line: 0,
            trailers: 0,
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes still expected in the current chunk.
    pub fn remaining_in_chunk(&self) -> u64 {
        if self.state == State::Data {
            self.remaining
        } else {
            0
        }
    }

    /// Consumes framing from `buf` and splits off the next payload bytes, if any.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkError> {
        loop {
            if self.state == State::Done {
                return Ok(Step::End);
            }
            if self.state == State::Data {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = self.remaining.min(buf.len() as u64) as usize;
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Step::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Step::More);
            };
            buf.advance(1);
            self.byte(b)?;
        }
    }

    /// One framing byte.
    fn byte(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::Size | State::SizeSpace | State::Extension | State::SizeLf => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(ChunkError::Extension);
                }
            }
            State::TrailerStart | State::TrailerLine | State::TrailerLf | State::EndLf => {
                self.trailers += 1;
                if self.trailers > MAX_TRAILERS {
                    return Err(ChunkError::Trailers);
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (State::Size, _) if b.is_ascii_hexdigit() => {
                if self.digits == 16 {
                    return Err(ChunkError::Size);
                }
                self.digits += 1;
                self.remaining = (self.remaining << 4) | u64::from(hex(b));
                State::Size
            }
            (State::Size, _) if self.digits == 0 => return Err(ChunkError::Size),
            (State::Size | State::SizeSpace, b' ' | b'\t') => State::SizeSpace,
            (State::Size | State::SizeSpace, b';') => State::Extension,
            (State::Size | State::SizeSpace | State::Extension, b'\r') => State::SizeLf,
            (State::Size | State::SizeSpace, _) => return Err(ChunkError::Size),
            (State::Extension, b'\n' | 0) => return Err(ChunkError::Extension),
            (State::Extension, _) => State::Extension,
            (State::SizeLf, b'\n') => {
                self.line = 0;
                self.digits = 0;
                if self.remaining == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            (State::SizeLf, _) => return Err(ChunkError::LineEnding),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Size,
            (State::DataCr | State::DataLf, _) => return Err(ChunkError::LineEnding),
            (State::TrailerStart, b'\r') => State::EndLf,
            // A trailer line cannot start with whitespace (obs-fold) or be a bare LF.
            (State::TrailerStart, b' ' | b'\t' | b'\n' | 0) => return Err(ChunkError::Trailers),
            (State::TrailerLine, b'\r') => State::TrailerLf,
            (State::TrailerLine, b'\n' | 0) => return Err(ChunkError::Trailers),
            (State::TrailerStart | State::TrailerLine, _) => State::TrailerLine,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::TrailerLf, _) => return Err(ChunkError::Trailers),
            (State::EndLf, b'\n') => State::Done,
            (State::EndLf, _) => return Err(ChunkError::LineEnding),
            (State::Data | State::Done, _) => unreachable!("handled by decode"),
        };
        Ok(())
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// The chunk line for `len` payload bytes: `{len:x}\r\n`, in a fixed buffer.
pub fn size_line(len: usize) -> ([u8; 18], usize) {
    let mut out = [0u8; 18];
    let digits = if len == 0 {
        1
    } else {
        (usize::BITS - len.leading_zeros()).div_ceil(4) as usize
    };
    for (i, o) in out[..digits].iter_mut().enumerate() {
        let d = (len >> (4 * (digits - 1 - i))) & 0xf;
        *o = b"0123456789abcdef"[d];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    (out, digits + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; the payload, or the error.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut d = Decoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match d.decode(&mut buf)? {
                    Step::Data(b) => out.extend_from_slice(&b),
                    Step::More => break,
                    Step::End => return Ok((out, buf.is_empty())),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1;q=\"x\"\r\n world\r\nA \r\n0123456789\r\n0\r\nX-Sum: 11\r\n\r\n";
        for step in [1, 2, 3, 7, 64, body.len()] {
            let (data, clean) = decode_all(body, step).unwrap();
            assert_eq!(data, b"hello world0123456789", "step {step}");
            assert!(clean);
        }
    }

    #[test]
    fn bytes_after_the_end_stay_in_the_buffer() {
        let mut d = Decoder::new();
        let mut buf = BytesMut::from(&b"1\r\nx\r\n0\r\n\r\nHTTP/1.1 200"[..]);
        assert_eq!(d.decode(&mut buf), Ok(Step::Data(Bytes::from_static(b"x"))));
        assert_eq!(d.decode(&mut buf), Ok(Step::End));
        assert_eq!(&buf[..], b"HTTP/1.1 200");
    }

    #[test]
    fn refuses_what_rfc_9112_refuses() {
        let cases: &[(&[u8], ChunkError)] = &[
            (b"zz\r\n", ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"-1\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n", ChunkError::Size),
            (b"11111111111111111\r\n", ChunkError::Size),
            (b"5\nhello\r\n", ChunkError::Size),
            (b"5\rxhello", ChunkError::LineEnding),
            (b"5\r\nhelloXX0\r\n\r\n", ChunkError::LineEnding),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::LineEnding),
            (b"0\r\n\n", ChunkError::Trailers),
            (b"0\r\n folded\r\n\r\n", ChunkError::Trailers),
            (b"0\r\nA: b\rc\r\n\r\n", ChunkError::Trailers),
            (b"0\r\n\rX", ChunkError::LineEnding),
            (b"5 x\r\n", ChunkError::Size),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode_all(input, 1).map(|_| ()),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn bounds_lines_and_trailers() {
        let mut long = b"5;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE));
        assert_eq!(
            decode_all(&long, 4096).map(|_| ()),
            Err(ChunkError::Extension)
        );
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-T: 0123456789\r\n");
        }
        assert_eq!(
            decode_all(&trailers, 4096).map(|_| ()),
            Err(ChunkError::Trailers)
        );
        // 16 hex digits is the most, and overflow is impossible within it.
        let (data, _) = decode_all(b"000000000000000A\r\n0123456789\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!(data.len(), 10);
    }

    #[test]
    fn size_lines() {
        for (len, want) in [
            (0, "0\r\n"),
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (16384, "4000\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            let (b, n) = size_line(len);
            assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), want);
        }
    }
}
