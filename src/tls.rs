//! TLS for gRPC: the server's certificate and client-certificate authority from `run`'s flags (re-read on SIGHUP), and the `watch` client's trust and identity from its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::GrpcConfig;

/// How long before its certificate expires the server warns (log, and the
/// `flowlens_tls_cert_expiry_seconds` metric says when all along).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

fn read_pem(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("{flag} {}: not a PEM file", path.display());
    }
    Ok(pem)
}

/// Every certificate in a PEM file, at least one.
fn certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path, flag)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The files the server's TLS comes from.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// When a certificate chain can be used: the latest `notBefore` and the earliest
/// `notAfter` of its certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn unix(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

fn date(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The validity of `certs` (a chain, leaf first), refusing one that is not valid `now`:
/// every client would fail its handshake against it.
fn check_validity(
    certs: &[CertificateDer<'_>],
    path: &Path,
    now: SystemTime,
) -> anyhow::Result<Validity> {
    let mut validity = Validity {
        not_before: UNIX_EPOCH,
        not_after: unix(i64::MAX / 2),
    };
    for (i, der) in certs.iter().enumerate() {
        let which = match i {
            0 => "the certificate".to_owned(),
            n => format!("certificate {} of its chain", n + 1),
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            anyhow::anyhow!(
                "--grpc-tls-cert {}: {which} does not parse: {e}",
                path.display()
            )
        })?;
        let v = cert.validity();
        let (from, until) = (
            unix(v.not_before.timestamp()),
            unix(v.not_after.timestamp()),
        );
        if now < from {
            bail!(
                "--grpc-tls-cert {}: {which} is not valid before {} (the clock says {}): clients \
                 would refuse it; check the clock, or use a certificate valid now",
                path.display(),
                date(from),
                date(now)
            );
        }
        if now > until {
            bail!(
                "--grpc-tls-cert {}: {which} expired on {}: clients would refuse it; renew it",
                path.display(),
                date(until)
            );
        }
        validity.not_before = validity.not_before.max(from);
        validity.not_after = validity.not_after.min(until);
    }
    Ok(validity)
}

impl TlsFiles {
    fn load(&self) -> anyhow::Result<(ServerConfig, Validity)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = certificates(&self.cert, "--grpc-tls-cert")?;
        let validity = check_validity(&certs, &self.cert, SystemTime::now())?;
        let key = PrivateKeyDer::from_pem_slice(&read_pem(&self.key, "--grpc-tls-key")?)
            .with_context(|| format!("--grpc-tls-key {}", self.key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(ca, "--grpc-client-ca")? {
                    roots
                        .add(c)
                        .with_context(|| format!("--grpc-client-ca {}", ca.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .with_context(|| format!("--grpc-client-ca {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "--grpc-tls-cert {} / --grpc-tls-key {}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok((cfg, validity))
    }
}

/// The server's TLS: its files, and the settings last read from them, which new
/// connections use; `reload` re-reads the files (on SIGHUP).
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Validity)>,
    /// The `notAfter` last warned about, and whether it had passed then.
    warned: Mutex<Option<(SystemTime, bool)>>,
}

impl ServerTls {
    /// The server's TLS from the flags, or None for cleartext. Every file is read and
    /// checked here (a certificate outside its validity dates too), so a bad one fails
    /// start-up before anything is attached.
    pub fn from_config(g: &GrpcConfig) -> anyhow::Result<Option<Arc<ServerTls>>> {
        let (cert, key) = match (&g.tls_cert, &g.tls_key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) => {
                if g.client_ca.is_some() {
                    bail!("--grpc-client-ca needs --grpc-tls-cert and --grpc-tls-key: client certificates are checked only over TLS");
                }
                return Ok(None);
            }
            (Some(_), None) => bail!("--grpc-tls-cert needs --grpc-tls-key"),
            (None, Some(_)) => bail!("--grpc-tls-key needs --grpc-tls-cert"),
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: g.client_ca.clone(),
        };
        let (cfg, validity) = files.load()?;
        Ok(Some(Arc::new(ServerTls {
            files,
            current: RwLock::new((Arc::new(cfg), validity)),
            warned: Mutex::new(None),
        })))
    }

    /// Re-reads the files; on any error (a certificate outside its validity dates
    /// included) the settings in use stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (cfg, validity) = self.files.load()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(cfg), validity);
        Ok(())
    }

    /// For the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        tokio_rustls::TlsAcceptor::from(cur.0.clone())
    }

    /// When the certificate in use stops being valid (the earliest of its chain).
    pub fn not_after(&self) -> SystemTime {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .not_after
    }

    /// What to warn about the certificate in use at `now`, once per certificate and state:
    /// that it expires within [`EXPIRY_WARNING`], and again once it has expired.
    pub fn expiry_warning(&self, now: SystemTime) -> Option<String> {
        let not_after = self.not_after();
        let expired = now >= not_after;
        let left = not_after.duration_since(now).unwrap_or_default();
        if !expired && left > EXPIRY_WARNING {
            return None;
        }
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if *warned == Some((not_after, expired)) {
            return None;
        }
        *warned = Some((not_after, expired));
        let cert = self.files.cert.display();
        Some(if expired {
            format!(
                "the gRPC TLS certificate {cert} expired on {}: clients cannot connect; renew it \
                 and send SIGHUP (systemctl reload flowlens)",
                date(not_after)
            )
        } else {
            format!(
                "the gRPC TLS certificate {cert} expires on {} (in {} days); renew it and send \
                 SIGHUP (systemctl reload flowlens)",
                date(not_after),
                left.as_secs() / 86_400
            )
        })
    }

    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// The client's TLS settings for `server`: None for cleartext (`http://`, `unix:`), which
/// refuses the certificate flags rather than ignore them.
pub fn client_config(
    server: &str,
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<Option<ClientTlsConfig>> {
    if !server.starts_with("https://") {
        if ca.is_some() || cert.is_some() || key.is_some() {
            bail!("--ca, --cert and --key need an https:// --server (got {server:?})");
        }
        return Ok(None);
    }
    let mut cfg = ClientTlsConfig::new();
    cfg = match ca {
        Some(ca) => cfg.ca_certificate(Certificate::from_pem(read_pem(ca, "--ca")?)),
        None => cfg.with_native_roots(),
    };
    match (cert, key) {
        (Some(c), Some(k)) => {
            cfg = cfg.identity(Identity::from_pem(
                read_pem(c, "--cert")?,
                read_pem(k, "--key")?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => bail!("--cert needs --key"),
        (None, Some(_)) => bail!("--key needs --cert"),
    }
    Ok(Some(cfg))
}
