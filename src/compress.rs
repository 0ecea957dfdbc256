//! Response compression as pure building blocks (CONTRACT §8 `[compression]`): the
//! algorithms and levels, and which coding a client gets ([`negotiate`]) here; which responses
//! are compressed ([`is_compressible`], [`media_type_matches`]) and how a compressed
//! response's head changes ([`rewrite_headers`]) in `compress/response.rs`; the streaming
//! compressor that a response body drives, [`Encoder`], in `compress/encoder.rs`. Synchronous
//! and free of I/O: the data path decides when to call them.

mod encoder;
mod response;

pub use encoder::Encoder;
pub use response::{is_compressible, media_type_matches, rewrite_headers};

use serde::Deserialize;

/// A content coding fairway can produce (`[compression] algorithms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Zstandard (RFC 8878, `Content-Encoding: zstd`).
    Zstd,
    /// Brotli (RFC 7932, `Content-Encoding: br`).
    Br,
    /// gzip (RFC 1952, `Content-Encoding: gzip`).
    Gzip,
}

impl Algorithm {
    /// The content-coding name, as in `Content-Encoding` and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Zstd => "zstd",
            Algorithm::Br => "br",
            Algorithm::Gzip => "gzip",
        }
    }

    /// The algorithm a content-coding name stands for, in any case; `x-gzip` is gzip
    /// (RFC 9110 §8.4.1.3).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::from_token(name.as_bytes())
    }

    fn from_token(t: &[u8]) -> Option<Algorithm> {
        if t.eq_ignore_ascii_case(b"zstd") {
            Some(Algorithm::Zstd)
        } else if t.eq_ignore_ascii_case(b"br") {
            Some(Algorithm::Br)
        } else if t.eq_ignore_ascii_case(b"gzip") || t.eq_ignore_ascii_case(b"x-gzip") {
            Some(Algorithm::Gzip)
        } else {
            None
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How hard to compress (`[compression] level`), mapped per algorithm:
///
/// | level | gzip (zlib level) | br (quality) | zstd (level) |
/// |---|---|---|---|
/// | `fastest` | 1 | 1 | 1 |
/// | `default` | 6 | 5 | 3 |
/// | `best` | 9 | 11 | 19 |
///
/// gzip's levels are zlib's, as Nginx's `gzip_comp_level` (whose default is 1; zlib's is 6).
/// Brotli's `default` is the quality nearest gzip 6 in CPU that still compresses better: on JavaScript and JSON of
/// 16 KiB to 1 MiB, quality 5 took 16–25 ms per MiB against gzip 6's 9–21, and its output was
/// 2–18 % smaller; quality 4 took 12–18 ms, but its output was larger than gzip 6's in most
/// cases measured. `best` costs up to 100 times the CPU of `default` (brotli 11 and zstd 19
/// take 0.2 to 1.6 s per MiB): for an operator who knows the responses are worth it. Windows
/// are capped so that an encoder takes a few MiB; [`Encoder`] lists them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Least CPU.
    Fastest,
    /// The balance of CPU and size that web servers default to.
    #[default]
    Default,
    /// Smallest output, at many times the CPU.
    Best,
}

/// The highest quality value, `q=1`, in thousandths.
const Q_MAX: u16 = 1000;

/// Picks the coding for a response from the request's `Accept-Encoding` values (every line,
/// each a comma-separated list of codings with optional `;q=` weights, RFC 9110 §12.5.3).
///
/// Among the algorithms in `allowed` that the client accepts, the highest q-value wins and a
/// tie goes to the earlier entry of `allowed`. `q=0` refuses a coding; `*` stands for every
/// coding the header does not name (so `*;q=0` refuses them all). A coding named more than
/// once counts with its lowest q-value, so that a refusal stands. A q-value that is not one
/// of RFC 9110's (`0` to `1`, up to three decimals) counts as `q=0`: a weight that cannot be
/// read is no consent. No header, an empty one, or only `identity`: `None`.
pub fn negotiate<'a>(
    accept_encoding: impl Iterator<Item = &'a [u8]>,
    allowed: &[Algorithm],
) -> Option<Algorithm> {
    // The q-value of each algorithm named explicitly, and of `*`.
    let mut named: [Option<u16>; 3] = [None; 3];
    let mut star: Option<u16> = None;
    for value in accept_encoding {
        for element in value.split(|&b| b == b',') {
            let mut parts = element.split(|&b| b == b';');
            let coding = parts.next().unwrap_or_default().trim_ascii();
            if coding.is_empty() {
                continue;
            }
            let q = weight(parts);
            let slot = if coding == b"*" {
                &mut star
            } else if let Some(alg) = Algorithm::from_token(coding) {
                &mut named[alg.index()]
            } else {
                continue;
            };
            *slot = Some(slot.map_or(q, |old| old.min(q)));
        }
    }
    let mut best: Option<(Algorithm, u16)> = None;
    for &alg in allowed {
        let q = named[alg.index()].or(star).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((alg, q));
        }
    }
    best.map(|(alg, _)| alg)
}

/// The weight among a coding's parameters: `Q_MAX` without one, 0 when it is malformed.
/// Parameters other than `q` are ignored.
fn weight<'a>(params: impl Iterator<Item = &'a [u8]>) -> u16 {
    let mut q = Q_MAX;
    for p in params {
        let p = p.trim_ascii();
        let (name, value) = match p.iter().position(|&b| b == b'=') {
            Some(i) => (p[..i].trim_ascii(), p[i + 1..].trim_ascii()),
            None => (p, &b""[..]),
        };
        if name.eq_ignore_ascii_case(b"q") {
            q = parse_qvalue(value).unwrap_or(0);
        }
    }
    q
}

/// A qvalue in thousandths: `0`, `0.` and up to three digits, `1`, or `1.` and up to three
/// zeros (RFC 9110 §12.4.2).
fn parse_qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v {
        [d, b'.', frac @ ..] => (*d, frac),
        [d] => (*d, &b""[..]),
        _ => return None,
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b'0' => Some(thousandths),
        b'1' if thousandths == 0 => Some(Q_MAX),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::{Br, Gzip, Zstd};

    const ALL: &[Algorithm] = &[Zstd, Br, Gzip];

    fn pick(lines: &[&str], allowed: &[Algorithm]) -> Option<Algorithm> {
        negotiate(lines.iter().map(|l| l.as_bytes()), allowed)
    }

    #[test]
    fn names() {
        for alg in [Zstd, Br, Gzip] {
            assert_eq!(Algorithm::from_name(alg.as_str()), Some(alg));
        }
        assert_eq!(Algorithm::from_name("GZip"), Some(Gzip));
        assert_eq!(Algorithm::from_name("BR"), Some(Br));
        assert_eq!(Algorithm::from_name("x-gzip"), Some(Gzip));
        assert_eq!(Algorithm::from_name("deflate"), None);
        assert_eq!(Algorithm::from_name(""), None);
    }

    #[test]
    fn config_spellings() {
        #[derive(Deserialize)]
        struct T {
            algorithms: Vec<Algorithm>,
            level: Level,
        }
        let t: T = toml::from_str(
            r#"algorithms = ["zstd", "br", "gzip"]
level = "fastest""#,
        )
        .unwrap();
        assert_eq!(t.algorithms, [Zstd, Br, Gzip]);
        assert_eq!(t.level, Level::Fastest);
        for (s, l) in [("default", Level::Default), ("best", Level::Best)] {
            let t: T = toml::from_str(&format!("algorithms = []\nlevel = \"{s}\"")).unwrap();
            assert_eq!(t.level, l);
        }
        assert!(toml::from_str::<T>("algorithms = [\"deflate\"]\nlevel = \"best\"").is_err());
        assert_eq!(Level::default(), Level::Default);
    }

    #[test]
    fn browsers_usual_headers() {
        assert_eq!(pick(&["gzip, deflate, br"], ALL), Some(Br));
        assert_eq!(pick(&["gzip, deflate, br, zstd"], ALL), Some(Zstd));
        assert_eq!(pick(&["gzip, deflate"], ALL), Some(Gzip));
        assert_eq!(pick(&["gzip, deflate, br"], &[Gzip, Br]), Some(Gzip));
    }

    #[test]
    fn highest_q_wins() {
        assert_eq!(pick(&["br;q=0.5, gzip;q=0.8"], ALL), Some(Gzip));
        assert_eq!(pick(&["br;q=0.9, gzip;q=0.8, zstd;q=0.1"], ALL), Some(Br));
        assert_eq!(pick(&["gzip;q=0.001, br;q=0"], ALL), Some(Gzip));
        assert_eq!(pick(&["zstd;q=0.999, br;q=1"], ALL), Some(Br));
    }

    #[test]
    fn ties_go_to_the_allowed_order() {
        assert_eq!(pick(&["gzip, br, zstd"], ALL), Some(Zstd));
        assert_eq!(pick(&["gzip, br, zstd"], &[Gzip, Br, Zstd]), Some(Gzip));
        assert_eq!(pick(&["gzip;q=0.5, br;q=0.5"], &[Gzip, Br]), Some(Gzip));
        assert_eq!(pick(&["gzip;q=0.5, br;q=0.5"], &[Br, Gzip]), Some(Br));
        assert_eq!(pick(&["*"], ALL), Some(Zstd));
        assert_eq!(pick(&["*"], &[Gzip]), Some(Gzip));
    }

    #[test]
    fn star_stands_for_the_codings_not_named() {
        assert_eq!(pick(&["zstd;q=0, *"], ALL), Some(Br));
        assert_eq!(pick(&["zstd;q=0, *"], &[Zstd]), None);
        assert_eq!(pick(&["gzip;q=0, *"], &[Gzip, Br]), Some(Br));
        assert_eq!(pick(&["gzip;q=0, *"], &[Gzip]), None);
        assert_eq!(pick(&["*;q=0"], ALL), None);
        assert_eq!(pick(&["gzip, *;q=0"], ALL), Some(Gzip));
        assert_eq!(pick(&["br;q=0.3, *;q=0.5"], &[Br, Gzip]), Some(Gzip));
        assert_eq!(pick(&["identity, *;q=0"], ALL), None);
    }

    #[test]
    fn case_and_whitespace() {
        assert_eq!(pick(&["GZIP"], ALL), Some(Gzip));
        assert_eq!(pick(&["Br;Q=0.5, GZip;q=0.4"], ALL), Some(Br));
        assert_eq!(pick(&[" gzip ; q=1.0 "], ALL), Some(Gzip));
        assert_eq!(pick(&["\tbr\t;\tq = 0.5\t,\tgzip;q=0.4"], ALL), Some(Br));
        assert_eq!(pick(&[",, gzip ,"], ALL), Some(Gzip));
        assert_eq!(pick(&["x-gzip"], ALL), Some(Gzip));
    }

    #[test]
    fn zero_refuses() {
        assert_eq!(pick(&["gzip;q=0.000"], ALL), None);
        assert_eq!(pick(&["gzip;q=0"], ALL), None);
        assert_eq!(pick(&["gzip;q=0."], ALL), None);
        assert_eq!(pick(&["gzip;q=0, br;q=0.0, zstd;q=0.00"], ALL), None);
        // Named twice: the refusal stands.
        assert_eq!(pick(&["gzip, gzip;q=0"], ALL), None);
        assert_eq!(pick(&["gzip;q=0", "gzip"], ALL), None);
    }

    #[test]
    fn malformed_weights_count_as_zero() {
        for bad in [
            "gzip;q=1.5",
            "gzip;q=2",
            "gzip;q=0.0001",
            "gzip;q=1.001",
            "gzip;q=abc",
            "gzip;q=",
            "gzip;q",
            "gzip;q=.5",
            "gzip;q=-1",
            "gzip;q=0.5.",
        ] {
            assert_eq!(pick(&[bad], ALL), None, "{bad}");
        }
        assert_eq!(pick(&["gzip;q=x, br"], ALL), Some(Br));
        assert_eq!(pick(&["gzip;q=1.000"], ALL), Some(Gzip));
        assert_eq!(pick(&["gzip;q=1."], ALL), Some(Gzip));
        // Other parameters are ignored.
        assert_eq!(pick(&["gzip;level=9"], ALL), Some(Gzip));
    }

    #[test]
    fn several_header_lines() {
        assert_eq!(pick(&["gzip;q=0.5", "br;q=0.8"], ALL), Some(Br));
        assert_eq!(pick(&["gzip", "zstd"], ALL), Some(Zstd));
        assert_eq!(pick(&["zstd;q=0", "*"], ALL), Some(Br));
    }

    #[test]
    fn nothing_accepted() {
        assert_eq!(pick(&[], ALL), None);
        assert_eq!(pick(&[""], ALL), None);
        assert_eq!(pick(&["  ,  "], ALL), None);
        assert_eq!(pick(&["identity"], ALL), None);
        assert_eq!(pick(&["deflate, compress"], ALL), None);
        assert_eq!(pick(&["gzip, br"], &[]), None);
        assert_eq!(pick(&["gzip"], &[Br, Zstd]), None);
    }

    #[test]
    fn qvalues() {
        assert_eq!(parse_qvalue(b"0"), Some(0));
        assert_eq!(parse_qvalue(b"0.5"), Some(500));
        assert_eq!(parse_qvalue(b"0.05"), Some(50));
        assert_eq!(parse_qvalue(b"0.123"), Some(123));
        assert_eq!(parse_qvalue(b"1"), Some(1000));
        assert_eq!(parse_qvalue(b"1.00"), Some(1000));
        assert_eq!(parse_qvalue(b"1.5"), None);
        assert_eq!(parse_qvalue(b"01"), None);
        assert_eq!(parse_qvalue(b""), None);
    }
}
