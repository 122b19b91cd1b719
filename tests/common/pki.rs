//! Certificates made at test time (rcgen): a CA with a server and a client certificate, and a client certificate of another CA.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::SystemTime;

/// A CA with a server and a client certificate, and a client certificate of another CA,
/// as PEM files in a temporary directory.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
    pub stranger: (PathBuf, PathBuf),
}

impl Pki {
    pub fn generate() -> Pki {
        Pki::with_server_validity(None)
    }

    /// As `generate`, the server certificate valid only from `.0` to `.1` (rcgen's default
    /// is 1975 to 4096).
    pub fn with_server_validity(validity: Option<(SystemTime, SystemTime)>) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write PEM");
            p
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).expect("CA cert");
            (cert.pem(), Issuer::new(params, key))
        };
        let leaf = |issuer: &Issuer<'_, KeyPair>, sans: &[&str], name: &str| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, name);
            if let (Some((from, until)), "server") = (validity, name) {
                params.not_before = from.into();
                params.not_after = until.into();
            }
            let cert = params.signed_by(&key, issuer).expect("leaf cert");
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let (ca_pem, issuer) = ca("flowlens test CA");
        let (_, other) = ca("another CA");
        Pki {
            ca: write("ca.pem", ca_pem),
            server: leaf(&issuer, &["127.0.0.1", "localhost"], "server"),
            client: leaf(&issuer, &[], "client"),
            stranger: leaf(&other, &[], "stranger"),
            _dir: dir,
        }
    }
}
