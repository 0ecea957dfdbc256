//! The streaming compressor of one response body: input goes in as the upstream sends it,
//! output comes out in pieces, and a flush makes everything so far decodable, so that a pause
//! of the upstream's body is no pause of what the client can read (CONTRACT §8).

use std::io::{self, Write};

use bytes::buf::Writer;
use bytes::{BufMut, Bytes, BytesMut};
use zstd::zstd_safe::CParameter;

use super::{Algorithm, Level};

/// Where a codec's output collects until it is taken. Taking splits the filled part off as
/// [`Bytes`], without a copy; once those are sent and dropped, the buffer's room is used
/// again instead of a new allocation.
type Sink = Writer<BytesMut>;

/// The sink's first allocation: a flush's or a codec buffer's worth of output.
const SINK_CAPACITY: usize = 16 * 1024;

/// Brotli's own output buffer, copied into the sink whenever it fills.
const BROTLI_BUFFER: usize = 16 * 1024;

/// Brotli's window, 2^20 bytes (1 MiB). Past twice its window, the brotli crate's output is
/// markedly larger than that of Google's library (20–45 % at quality 5 for 4 MiB bodies and a
/// 512 KiB window), so the window is as large as memory allows: bodies up to 2 MiB compress
/// fully, for 1 MiB more per response than with 2^19.
const BROTLI_LGWIN: u32 = 20;

/// zstd's window at `default` and `best`, 2^20 bytes (1 MiB); level 3 would take 2 MiB and
/// level 19 8 MiB for a body of unknown length, for under 0.5 % smaller output.
const ZSTD_WINDOW_LOG: u32 = 20;

/// A streaming compressor for one response body in one [`Algorithm`].
///
/// Memory per response, resident, measured with bodies of 20 KiB and of 1 MiB of JavaScript
/// (the codec's state and window; the output not yet taken comes on top):
///
/// | | `fastest` | `default` | `best` |
/// |---|---|---|---|
/// | gzip | 0.35–0.45 MiB | 0.35–0.45 MiB | 0.35–0.45 MiB |
/// | br | 0.15–0.2 MiB | 3.5–8 MiB | 11–17 MiB |
/// | zstd | 0.2–1 MiB | 0.9–2.1 MiB | 6.8–8 MiB |
///
/// Brotli's share grows with the input compressed since its last flush, up to 12 MiB at
/// `default`: it keeps the commands of a whole meta-block (up to twice its window) before
/// writing them out.
pub struct Encoder {
    codec: Codec,
}

enum Codec {
    Gzip(flate2::write::GzEncoder<Sink>),
    // Boxed: brotli's state is some kilobytes, the others are a few pointers.
    Br(Box<brotli::CompressorWriter<Sink>>),
    Zstd(zstd::stream::write::Encoder<'static, Sink>),
}

impl Encoder {
    /// An encoder at `level` (mapped as [`Level`] says). Fails only when zstd refuses its
    /// context or parameters, which the fixed parameters here never make it do.
    pub fn new(alg: Algorithm, level: Level) -> io::Result<Encoder> {
        let sink = BytesMut::with_capacity(SINK_CAPACITY).writer();
        let codec = match alg {
            Algorithm::Gzip => {
                let zlib_level = match level {
                    Level::Fastest => 1,
                    Level::Default => 6,
                    Level::Best => 9,
                };
                let c = flate2::Compression::new(zlib_level);
                Codec::Gzip(flate2::write::GzEncoder::new(sink, c))
            }
            Algorithm::Br => {
                let quality = match level {
                    Level::Fastest => 1,
                    Level::Default => 5,
                    Level::Best => 11,
                };
                Codec::Br(Box::new(brotli::CompressorWriter::new(
                    sink,
                    BROTLI_BUFFER,
                    quality,
                    BROTLI_LGWIN,
                )))
            }
            Algorithm::Zstd => {
                let (zstd_level, params): (i32, &[CParameter]) = match level {
                    // Level 1's own window (512 KiB) is already below the cap.
                    Level::Fastest => (1, &[]),
                    Level::Default => (3, &[CParameter::WindowLog(ZSTD_WINDOW_LOG)]),
                    // Level 19's own match tables take 80 MiB; these take 6, for output
                    // about 3 % larger.
                    Level::Best => (
                        19,
                        &[
                            CParameter::WindowLog(ZSTD_WINDOW_LOG),
                            CParameter::HashLog(19),
                            CParameter::ChainLog(20),
                        ],
                    ),
                };
                let mut e = zstd::stream::write::Encoder::new(sink, zstd_level)?;
                for &p in params {
                    e.set_parameter(p)?;
                }
                Codec::Zstd(e)
            }
        };
        Ok(Encoder { codec })
    }

    /// Compresses `input`. The output collects inside, to be had from [`take`](Self::take)
    /// or [`flush`](Self::flush); a codec may hold some input back until then.
    pub fn write(&mut self, input: &[u8]) -> io::Result<()> {
        match &mut self.codec {
            Codec::Gzip(e) => e.write_all(input),
            Codec::Br(e) => e.write_all(input),
            Codec::Zstd(e) => e.write_all(input),
        }
    }

    /// Makes everything written so far decodable by the client (a sync flush: gzip's
    /// `Z_SYNC_FLUSH`, brotli's and zstd's flush operations) and returns the output produced
    /// since it was last taken. Costs a few bytes and some compression each time: call it
    /// when the input pauses, not for every piece.
    pub fn flush(&mut self) -> io::Result<Bytes> {
        match &mut self.codec {
            Codec::Gzip(e) => e.flush()?,
            Codec::Br(e) => e.flush()?,
            Codec::Zstd(e) => e.flush()?,
        }
        Ok(self.take())
    }

    /// The output produced since it was last taken, without flushing (possibly empty), so
    /// that a long body can be relayed in pieces as it compresses.
    pub fn take(&mut self) -> Bytes {
        let sink = match &mut self.codec {
            Codec::Gzip(e) => e.get_mut(),
            Codec::Br(e) => e.get_mut(),
            Codec::Zstd(e) => e.get_mut(),
        };
        sink.get_mut().split().freeze()
    }

    /// Ends the stream: the output not yet taken, the input held back and the codec's
    /// trailer. An empty body still makes a valid stream.
    pub fn finish(self) -> io::Result<Bytes> {
        let sink = match self.codec {
            Codec::Gzip(e) => e.finish()?,
            // Brotli's finish cannot fail but for the sink, which is memory.
            Codec::Br(e) => e.into_inner(),
            Codec::Zstd(e) => e.finish()?,
        };
        Ok(sink.into_inner().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGORITHMS: [Algorithm; 3] = [Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip];
    const LEVELS: [Level; 3] = [Level::Fastest, Level::Default, Level::Best];

    /// `len` bytes of JavaScript-like text: the same few statements with varying names and
    /// numbers, so that it compresses about as well as a real bundle.
    fn javascript(len: usize) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "user", "item", "request", "config", "value", "node", "cache", "state", "event",
            "index", "buffer", "result",
        ];
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let mut out = String::with_capacity(len + 200);
        while out.len() < len {
            let a = WORDS[next() as usize % WORDS.len()];
            let b = WORDS[next() as usize % WORDS.len()];
            let n = next() % 1000;
            out.push_str(&match next() % 4 {
                0 => format!("function {a}_{n}({b}) {{\n  return {b}.{a} + {n};\n}}\n"),
                1 => format!(
                    "const {a}{n} = await fetch(`/api/{b}/${{id}}`, {{ method: \"GET\" }});\n"
                ),
                2 => format!(
                    "if ({a}.length > {n}) {{ {b}.push({a}[{n}]); }} else {{ {b} = null; }}\n"
                ),
                _ => format!("export default {{ {a}: {n}, {b}: \"{a}-{b}-{n}\" }};\n"),
            });
        }
        out.truncate(len);
        out.into_bytes()
    }

    /// A streaming decoder of the algorithm, fed the compressed stream as it comes.
    enum Decoder {
        Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
        Br(Box<brotli::DecompressorWriter<Vec<u8>>>),
        Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
    }

    impl Decoder {
        fn new(alg: Algorithm) -> Decoder {
            match alg {
                Algorithm::Gzip => {
                    Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new())))
                }
                // Its writer stops once its input is used up, even with decoded output left
                // over for want of room: room for all the output at once.
                Algorithm::Br => Decoder::Br(Box::new(brotli::DecompressorWriter::new(
                    Vec::new(),
                    1 << 20,
                ))),
                Algorithm::Zstd => {
                    Decoder::Zstd(zstd::stream::write::Decoder::new(Vec::new()).unwrap())
                }
            }
        }

        fn feed(&mut self, compressed: &[u8]) {
            let w: &mut dyn Write = match self {
                Decoder::Gzip(d) => d,
                Decoder::Br(d) => d,
                Decoder::Zstd(d) => d,
            };
            w.write_all(compressed).unwrap();
            w.flush().unwrap();
        }

        /// Everything decoded so far.
        fn decoded(&self) -> &[u8] {
            match self {
                Decoder::Gzip(d) => d.get_ref(),
                Decoder::Br(d) => d.get_ref(),
                Decoder::Zstd(d) => d.get_ref(),
            }
        }
    }

    /// Decodes a whole stream, checking that it ends.
    fn decode(alg: Algorithm, stream: &[u8]) -> Vec<u8> {
        match alg {
            Algorithm::Gzip => {
                let mut d = flate2::write::GzDecoder::new(Vec::new());
                d.write_all(stream).unwrap();
                d.finish().unwrap()
            }
            Algorithm::Br => {
                let mut d = brotli::DecompressorWriter::new(Vec::new(), 4096);
                d.write_all(stream).unwrap();
                d.close().unwrap();
                d.into_inner().unwrap()
            }
            Algorithm::Zstd => zstd::stream::decode_all(stream).unwrap(),
        }
    }

    /// Uneven pieces, the way an upstream's body arrives.
    fn pieces(input: &[u8]) -> impl Iterator<Item = &[u8]> {
        const SIZES: [usize; 7] = [1, 700, 16_384, 13, 65_536, 31_337, 4_096];
        let mut rest = input;
        let mut i = 0;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (piece, tail) = rest.split_at(SIZES[i % SIZES.len()].min(rest.len()));
            rest = tail;
            i += 1;
            Some(piece)
        })
    }

    #[test]
    fn every_algorithm_and_level_round_trips() {
        let input = javascript(1 << 20);
        for alg in ALGORITHMS {
            for level in LEVELS {
                let mut enc = Encoder::new(alg, level).unwrap();
                let mut stream = Vec::new();
                let mut written = 0;
                let mut flushed = false;
                for piece in pieces(&input) {
                    enc.write(piece).unwrap();
                    written += piece.len();
                    stream.extend_from_slice(&enc.take());
                    if !flushed && written >= input.len() / 2 {
                        stream.extend_from_slice(&enc.flush().unwrap());
                        flushed = true;
                    }
                }
                stream.extend_from_slice(&enc.finish().unwrap());
                assert!(decode(alg, &stream) == input, "{alg:?} {level:?}");
                assert!(
                    stream.len() * 3 < input.len(),
                    "{alg:?} {level:?}: {} bytes",
                    stream.len()
                );
            }
        }
    }

    /// A pause flushes what is compressed so far: after each flush, the client can decode
    /// exactly the input written until then, and nothing is held back.
    #[test]
    fn a_flush_makes_everything_so_far_decodable() {
        let input = javascript(300_000);
        for alg in ALGORITHMS {
            for level in LEVELS {
                let mut enc = Encoder::new(alg, level).unwrap();
                let mut dec = Decoder::new(alg);
                let mut written = 0;
                for (i, piece) in pieces(&input).enumerate() {
                    enc.write(piece).unwrap();
                    written += piece.len();
                    dec.feed(&enc.take());
                    if i % 3 == 1 {
                        dec.feed(&enc.flush().unwrap());
                        let decoded = dec.decoded();
                        assert!(
                            decoded == &input[..written],
                            "{alg:?} {level:?}: {} bytes decoded after {written} written",
                            decoded.len()
                        );
                    }
                }
                dec.feed(&enc.finish().unwrap());
                assert!(dec.decoded() == input, "{alg:?} {level:?}");
            }
        }
    }

    #[test]
    fn an_empty_body_is_a_valid_stream() {
        for alg in ALGORITHMS {
            for level in LEVELS {
                let stream = Encoder::new(alg, level).unwrap().finish().unwrap();
                assert!(!stream.is_empty(), "{alg:?} {level:?}");
                assert_eq!(decode(alg, &stream), b"", "{alg:?} {level:?}");

                let mut enc = Encoder::new(alg, level).unwrap();
                let mut stream = enc.flush().unwrap().to_vec();
                stream.extend_from_slice(&enc.finish().unwrap());
                assert_eq!(decode(alg, &stream), b"", "{alg:?} {level:?} flushed");
            }
        }
    }

    #[test]
    fn flushes_in_a_row_and_takes_without_output() {
        let input = javascript(50_000);
        for alg in ALGORITHMS {
            let mut enc = Encoder::new(alg, Level::Default).unwrap();
            let mut stream = Vec::new();
            enc.write(&input[..20_000]).unwrap();
            stream.extend_from_slice(&enc.flush().unwrap());
            stream.extend_from_slice(&enc.flush().unwrap());
            assert!(enc.take().is_empty(), "{alg:?}");
            enc.write(&input[20_000..]).unwrap();
            stream.extend_from_slice(&enc.take());
            stream.extend_from_slice(&enc.take());
            stream.extend_from_slice(&enc.finish().unwrap());
            assert!(decode(alg, &stream) == input, "{alg:?}");
        }
    }

    /// `len` bytes that do not compress.
    fn noise(len: usize) -> Vec<u8> {
        let mut seed = 7u64;
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (seed >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn output_comes_out_before_the_end_without_flushing() {
        // Incompressible input, so that output must come out as the codec's buffers fill.
        let noise = noise(2 << 20);
        for alg in ALGORITHMS {
            let mut enc = Encoder::new(alg, Level::Fastest).unwrap();
            let mut stream = Vec::new();
            for piece in noise.chunks(64 * 1024) {
                enc.write(piece).unwrap();
                stream.extend_from_slice(&enc.take());
            }
            assert!(stream.len() > 1 << 20, "{alg:?}: {} bytes", stream.len());
            stream.extend_from_slice(&enc.finish().unwrap());
            assert!(decode(alg, &stream) == noise, "{alg:?}");
        }
    }

    #[test]
    fn the_output_buffer_is_reused_once_its_output_is_dropped() {
        let noise = noise(1 << 20);
        for alg in ALGORITHMS {
            let mut enc = Encoder::new(alg, Level::Fastest).unwrap();
            let mut starts = Vec::new();
            for piece in noise.chunks(50_000) {
                enc.write(piece).unwrap();
                let out = enc.flush().unwrap();
                starts.push(out.as_ptr());
            }
            // After the first pieces have grown it to size, every piece is written into the
            // same allocation.
            assert!(starts[2..].iter().all(|&p| p == starts[2]), "{alg:?}");
        }
    }
}
