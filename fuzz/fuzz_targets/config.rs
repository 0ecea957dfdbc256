//! Arbitrary bytes as a config file: `config::parse` must never panic (errors are fine),
//! and a config that parses must build a runtime snapshot without panicking.

#![no_main]

use std::path::Path;

use fairway::metrics::Metrics;
use fairway::runtime::{Files, Runtime};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match fairway::config::parse(path, text) {
        Ok(cfg) => {
            let _ = cfg.warnings();
            let metrics = Metrics::new();
            let first = Runtime::build(cfg.clone(), None, &metrics, Files::default());
            // A reload onto the same config reuses every server.
            let second = Runtime::build(cfg, Some(&first), &metrics, Files::default());
            assert_eq!(second.version, first.version + 1);
            assert_eq!(first.upstreams.len(), second.upstreams.len());
            first.forget_removed(&second, &metrics);
            let _ = metrics.encode();
        }
        Err(e) => {
            // The error must render (it names file, line and key).
            let _ = e.to_string();
        }
    }
});
