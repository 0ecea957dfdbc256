//! The configuration file: a serde mirror of the TOML (CONTRACT §2) with defaults, unit
//! parsing (durations, sizes, CIDRs) and the semantic checks that serde cannot express.
//!
//! `load(path)` reads, parses and validates; every failure is a [`ConfigError`] naming the
//! file, the line and column, the key path and what to change. `Runtime::build` turns the
//! validated [`Config`] into the snapshot that serves requests.
//!
//! The raw TOML sections live in `sections`, the value types with their own parsing in
//! `units` and the checks after parsing in `validate`; this file reads and parses.

use std::path::Path;

use crate::error::{ConfigError, KeyPath};

mod sections;
mod traffic;
mod units;
mod validate;

pub use sections::{
    AdminSection, Config, HealthCheckSection, LogSection, PassiveSection, RouteSection,
    ServerEntry, ServerSection, SniCertSection, TlsSection, UpstreamSection,
};
pub use traffic::{
    CompressionSection, HeaderRulesSection, Rate, RateKey, RateLimitSection, SameSite, Secure,
    StickySection,
};
pub use units::{
    AccessFormat, Addr, BalanceKind, ByteSize, Cidr, Dur, Listen, StatusRange, parse_duration,
    parse_size, split_host_port,
};
pub use validate::MAX_WEIGHT;

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
    parse(path, &text)
}

/// Parses and validates `text`, naming `path` in errors.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let de =
        toml::Deserializer::parse(text).map_err(|e| ConfigError::toml(path, text, None, &e))?;
    let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = KeyPath::from_serde(e.path());
        ConfigError::toml(path, text, Some(key), e.inner())
    })?;
    cfg.validate()
        .map_err(|(key, message)| ConfigError::at_key(path, text, key, message))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    // `p`, `err` and `MIN` serve the tests in sections.rs and validate.rs too.
    pub(super) fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("fairway.toml"), text)
    }

    pub(super) const MIN: &str = r#"
[server]
listen = "127.0.0.1:8080"

[upstreams.app]
servers = ["127.0.0.1:13000", { addr = "127.0.0.1:13001", weight = 2 }]
"#;

    #[test]
    fn a_mapped_trusted_proxy_below_96_names_its_entry() {
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::ffff:10.0.0.0/80\"]\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n",
        );
        assert!(
            e.starts_with("fairway.toml:3:") && e.contains("server.trusted_proxies[1]: "),
            "{e}"
        );
        assert!(
            e.contains("::ffff:10.0.0.0/80") && e.contains("below 96"),
            "{e}"
        );
    }

    pub(super) fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\nconect_timeout = \"1s\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n",
        );
        assert!(e.starts_with("fairway.toml:3:1: "), "{e}");
        assert!(e.contains("conect_timeout"), "{e}");
        assert!(e.contains("connect_timeout"), "{e}");
    }

    #[test]
    fn bad_value_names_key_path() {
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\nidle_timeout = \"soon\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n",
        );
        assert!(
            e.starts_with("fairway.toml:3:16: server.idle_timeout: "),
            "{e}"
        );
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\", { addr = \"127.0.0.1:3\", weight = 0 }]\n",
        );
        assert!(e.contains("fairway.toml:4:"), "{e}");
        assert!(e.contains("upstreams.a.servers[1].weight"), "{e}");
    }

    #[test]
    fn bad_toml_syntax_has_location() {
        let e = err("[server\nlisten = 1\n");
        assert!(e.starts_with("fairway.toml:1:"), "{e}");
    }
}
