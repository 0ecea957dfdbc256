//! `tls::validity`: the small DER walker that reads a certificate's validity period.
//! Arbitrary bytes must never make it panic or overflow.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fairway::tls::validity(data);
});
