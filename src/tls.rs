//! TLS for gRPC: the server's certificate and client-certificate authority from `run`'s flags (re-read on SIGHUP), and the `watch` client's trust and identity from its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::GrpcConfig;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

impl TlsFiles {
    fn load(&self) -> anyhow::Result<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = certificates(&self.cert, "--grpc-tls-cert")?;
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
        Ok(cfg)
    }
}

/// The server's TLS: its files, and the settings last read from them, which new
/// connections use; `reload` re-reads the files (on SIGHUP).
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// The server's TLS from the flags, or None for cleartext. Every file is read and
    /// checked here, so a bad one fails start-up before anything is attached.
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
        let current = RwLock::new(Arc::new(files.load()?));
        Ok(Some(Arc::new(ServerTls { files, current })))
    }

    /// Re-reads the files; on any error the settings in use stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let cfg = Arc::new(self.files.load()?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
        Ok(())
    }

    /// For the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let cfg = self.current.read().unwrap_or_else(|e| e.into_inner());
        tokio_rustls::TlsAcceptor::from(cfg.clone())
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
