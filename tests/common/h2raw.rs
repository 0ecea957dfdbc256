//! HTTP/2 on raw frames, for tests that must send what a well-behaved client library never
//! would (reset floods, flow-control violations).

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const FRAME_DATA: u8 = 0x0;
pub const FRAME_HEADERS: u8 = 0x1;
pub const FRAME_RST_STREAM: u8 = 0x3;
pub const FRAME_SETTINGS: u8 = 0x4;
pub const FRAME_GOAWAY: u8 = 0x7;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame on the wire.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for `GET http://authority/path` (literals, no Huffman, no
/// dynamic table).
pub fn hpack_get(authority: &str, path: &str) -> Vec<u8> {
    // :method GET and :scheme http from the static table.
    let mut block = vec![0x82, 0x86];
    // :authority (index 1) and :path (index 4), literal without indexing.
    for (index, value) in [(0x01u8, authority), (0x04, path)] {
        assert!(value.len() < 127);
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// An HPACK header block for `POST http://authority/path` (as [`hpack_get`]).
pub fn hpack_post(authority: &str, path: &str) -> Vec<u8> {
    let mut block = hpack_get(authority, path);
    // :method POST instead of GET (static table index 3).
    block[0] = 0x83;
    block
}
