//! TLS for gRPC: the server's certificate and client-certificate authority from `run`'s flags, and the `watch` client's trust and identity from its own.

use std::path::Path;

use anyhow::{bail, Context};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::GrpcConfig;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn read_pem(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("{flag} {}: not a PEM file", path.display());
    }
    Ok(pem)
}

/// The server's TLS settings, or None for cleartext. Every file is read and parsed here,
/// so a bad one fails start-up before anything is attached.
pub fn server_config(g: &GrpcConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
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
    let identity = Identity::from_pem(
        read_pem(cert, "--grpc-tls-cert")?,
        read_pem(key, "--grpc-tls-key")?,
    );
    let mut cfg = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &g.client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read_pem(ca, "--grpc-client-ca")?));
    }
    // Builds the acceptor once now: a key that does not match, or PEM without a
    // certificate, is reported by flag instead of at the first connection.
    tonic::transport::Server::builder()
        .tls_config(cfg.clone())
        .map_err(|e| anyhow::anyhow!("{}", crate::fatal::chain(&e)))
        .with_context(|| {
            format!(
                "--grpc-tls-cert {} / --grpc-tls-key {}",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Some(cfg))
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
