//! A test PKI for the TLS tests: one CA, leaf certificates of every usual key type and
//! validity window, and the PEM files the proxy reads.

use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;

/// `[server.tls]` naming `cert.pem` and `key.pem` next to the config (relative paths), the
/// files [`Leaf::files`] writes with an empty prefix.
pub const TLS: &str = "[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";

/// A 2048-bit RSA key in PKCS#8, made once with `openssl genpkey` (ring cannot generate RSA
/// keys). A test key only: it protects nothing.
const RSA_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQC9Ql/X/C5shXJz
X0d1VOoQW2I4zhM+zfZ0/4oGlucFKL+po4R5yBvRu85nDiVXzbFTLQK7zGnITpEp
RuFgKYL4JEduTg36KW0G0wfC6AMOu2J0B7+RrJ+KzJWVLmN0U5OXEI8wsFsL7dfs
O8WABERVSlx/QipNyNN1TZHhXtGFKnWCMge0F2z0ti1R2ZOvr+9gpjCyFnNmEFfU
8UsFff2K7KmNfHc5keNhSjkC9d1dHFpfx/zJvN3quJI8yJXmcdXVZ3RP+HFZB0hW
Ctn65nvC3Nb1RNzDGbW+tEcpHO/X2bdqSvb+3HkKXGhl72Cq74Eb67znuAJfRSBC
55UE1m2rAgMBAAECggEAPEAGogw6vTqIcnkpFw22zAlDjiDwmIRaCuoVBz8AAbD0
vyz6rghJ7u1yanVi5v5pDrkcDywmmumEJddWRVZBxvxJrzBzG6oXdt40sNRKsORv
lc+nqVkCm13A2vKfH7fBmwxfAVmLSpNns2Fd4QC6vkpDgxHNxOCDjOrqX4xfeBw9
Nn7SxV0uL6v9AtHmDOFUIEH6s3bzIuMqb9MaNIXVJSkoaHG+z1SZkZnYZEITX7Vv
daaZr6KsSIt5DNdWjNA97QwqCwNGPOWMCiSYlPiyBwLY3kXx24gIafbEWiOSE3H+
t6pTCAH0Yj7dbCifZxscibdutowuUoVFC7P9A2AA3QKBgQDsYJv5tRI4TbSXMh4H
NVmx7wYBwrLBjrq/ETO6jqseFP4oJv7sV+wsA8sP7sq+0/E4fvWz+1PHtPCAu8Ne
s16VtH+3eKJJGL2fPglSxvcZz0365SV4WcXwrqu+SVEpd3GCKcM1WysMIFpy2R2L
B2mlEILcj1wDkd/0cOGm3QlUtwKBgQDM+G5suFaX8FMoHITX77ck49qp7S3PCLZT
PEbRmvP1H7R8HeRFm+FAr2CFk6A5igLm/gesl1AQB4NyKK0S4LUqYdNveaSvA1Ni
rcAOu58+6UVf6tw3nPSghy5j/bSkk/pc5r+dPelimsm4/wY4tkJlYyxBkY7v0WHD
70/RqNdCrQKBgQChOCdKAfkCU+V3NiSK8BVUKd2j98JqB8pRJQ9uD36gjtrmUeqP
EkyvnIq0PD8mNnIRAW7dqe5ziHJ8qxPOlHJPkwOFBI9TYb97TBmZzsCcZusd04ph
8oDx7oCO0Xy81o2hpJBS5PKQW8S1DmZ6+7xPa9qFSnYMrULdetw9Lgb+MwKBgQCh
0QOEa2dZnk5YHWO3AjXJNuVbP7bpesxOHAkg0z8D5trbHdIoLi7/nTULX4efxVgT
OrueQvrfHL9mMbypaaM86Ww91n/v9yUug1Nbjj3jMdAmMElY0l3CGdbC8/lX8Mc3
7qeZoNYOlXrpxNQJk8IJPukifqKkq92ODPEr6SrAJQKBgQC7fSsXzaJPOs+w6Lq/
U9PCka2hzCugXTsYpYab4CoH1aqUxUqjqLIb0Q6XsiDbMRumMt0wnokx9cbnrR6J
xJ4J66xnH5ZVK23FhiJX1/NiEFV6UBfB445xvlepnMswGHJaSJk4bfNC9sdkMaHB
0Rtfy25TUs/JyZgZ98c3PbJSyg==
-----END PRIVATE KEY-----
";

/// The names every default test certificate is valid for.
pub const LOCAL: &[&str] = &["localhost", "127.0.0.1"];

/// Key types and encodings a leaf certificate's key file can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 in PKCS#8 (`PRIVATE KEY`).
    EcdsaP256,
    /// ECDSA P-256 in SEC1 (`EC PRIVATE KEY`), as `openssl ecparam -genkey` writes it.
    EcdsaP256Sec1,
    /// ECDSA P-384 in PKCS#8.
    EcdsaP384,
    /// Ed25519 in PKCS#8.
    Ed25519,
    /// RSA 2048 in PKCS#8.
    Rsa,
    /// RSA 2048 in PKCS#1 (`RSA PRIVATE KEY`), as older tools write it.
    RsaPkcs1,
}

/// A key pair for `kind` and its key file as the proxy reads it.
fn key_of(kind: KeyKind) -> (KeyPair, String) {
    match kind {
        KeyKind::EcdsaP256 | KeyKind::EcdsaP384 | KeyKind::Ed25519 => {
            let alg = match kind {
                KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                _ => &rcgen::PKCS_ED25519,
            };
            let k = KeyPair::generate_for(alg).unwrap();
            let pem = k.serialize_pem();
            (k, pem)
        }
        KeyKind::EcdsaP256Sec1 => {
            let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            // A PKCS#8 EC key wraps the SEC1 `ECPrivateKey` in its OCTET STRING.
            let pem = pem("EC PRIVATE KEY", pkcs8_inner(&k.serialize_der()));
            (k, pem)
        }
        KeyKind::Rsa => (KeyPair::from_pem(RSA_PKCS8).unwrap(), RSA_PKCS8.to_owned()),
        KeyKind::RsaPkcs1 => {
            let k = KeyPair::from_pem(RSA_PKCS8).unwrap();
            // Likewise the PKCS#1 `RSAPrivateKey`.
            let pem = pem("RSA PRIVATE KEY", pkcs8_inner(&k.serialize_der()));
            (k, pem)
        }
    }
}

/// One DER element: (tag, content, rest).
fn der(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (input[0], input[1]);
    let (len, at) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    (tag, &input[at..at + len], &input[at + len..])
}

/// The private key inside a PKCS#8 `PrivateKeyInfo` (SEC1 for EC, PKCS#1 for RSA).
fn pkcs8_inner(pkcs8: &[u8]) -> &[u8] {
    let (_, info, _) = der(pkcs8);
    let (_, _, rest) = der(info); // version
    let (_, _, rest) = der(rest); // algorithm
    let (tag, key, _) = der(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey is an OCTET STRING");
    key
}

/// PEM text with `label` around `der`.
fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                B64[((v >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A test certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as PEM files and DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// notAfter as Unix seconds.
    pub not_after: i64,
}

/// Distinct serial numbers for every certificate the tests issue.
static SERIAL: AtomicU64 = AtomicU64::new(1000);

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(p, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// An ECDSA P-256 leaf for `names`, valid from 2020 to 2040.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.issue(names, KeyKind::EcdsaP256, (2020, 1, 1), (2040, 1, 1))
    }

    /// A leaf for `names` with a `kind` key, valid between the two dates (y, m, d; UTC).
    pub fn issue(
        &self,
        names: &[&str],
        kind: KeyKind,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Leaf {
        let (key, key_pem) = key_of(kind);
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        p.serial_number = Some(SerialNumber::from_slice(
            &SERIAL.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
        ));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem,
            der: cert.der().to_vec(),
            not_after: p.not_after.unix_timestamp(),
        }
    }
}

impl Leaf {
    /// The files `cert.pem` and `key.pem` under `prefix` (`""` or `"dir/"`).
    pub fn files(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            (format!("{prefix}cert.pem"), self.cert_pem.clone()),
            (format!("{prefix}key.pem"), self.key_pem.clone()),
        ]
    }
}
