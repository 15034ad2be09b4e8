//! Mutual TLS with rustls (ring): the coordinator requires client certificates signed by
//! the federation's CA, agents verify the coordinator's certificate, and the identity in an
//! agent's certificate (common name, else the first DNS name) is its client id.

use std::path::{Path, PathBuf};

use serde_like::TlsError;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Installs ring as rustls' process-wide provider (idempotent). Without it, a tree that
/// also enables aws-lc would make rustls panic at the first handshake.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// PEM files of one party: the federation CA, its own certificate and private key (the
/// `[tls]` table of the coordinator's and the agents' configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The federation CA: verifies the other side.
    pub ca: PathBuf,
    /// This party's certificate (an agent's common name is its client id) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes relative paths relative to `base` (the folder of the configuration file).
    pub fn resolve(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            fedmicse_federation::config_file::resolve(base, p);
        }
    }

    /// `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME.key` — the layout `fedmicse certs` writes.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
        let bytes =
            std::fs::read(path).map_err(|e| TlsError(format!("{what} {}: {e}", path.display())))?;
        if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
            return Err(TlsError(format!(
                "{what} {}: not a PEM file (no -----BEGIN line)",
                path.display()
            )));
        }
        Ok(bytes)
    }

    fn load(&self) -> Result<(Certificate, Identity), TlsError> {
        let ca = Self::read(&self.ca, "CA certificate")?;
        let cert = Self::read(&self.cert, "certificate")?;
        let key = Self::read(&self.key, "private key")?;
        check_certificate(&cert, &self.cert)?;
        check_certificate(&ca, &self.ca)?;
        Ok((Certificate::from_pem(ca), Identity::from_pem(cert, key)))
    }

    /// Server side: our identity, and client certificates required, signed by the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        install_crypto_provider();
        let (ca, identity) = self.load()?;
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
    }

    /// Client side: trust only the federation CA, present our certificate, and expect the
    /// server to be `domain` (a DNS name or IP in its certificate).
    pub fn client_config(&self, domain: &str) -> Result<ClientTlsConfig, TlsError> {
        install_crypto_provider();
        let (ca, identity) = self.load()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(identity)
            .domain_name(domain))
    }
}

/// Parses a PEM certificate far enough to give a clear error for garbage or expired files.
fn check_certificate(pem: &[u8], path: &Path) -> Result<(), TlsError> {
    let der = pem_to_der(pem).ok_or_else(|| {
        TlsError(format!(
            "{}: no certificate in the PEM file",
            path.display()
        ))
    })?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| TlsError(format!("{}: not a valid certificate: {e}", path.display())))?;
    if !cert.validity().is_valid() {
        return Err(TlsError(format!(
            "{}: certificate is not valid now (valid {} to {})",
            path.display(),
            cert.validity().not_before,
            cert.validity().not_after
        )));
    }
    Ok(())
}

/// The first CERTIFICATE block of a PEM file, decoded.
pub fn pem_to_der(pem: &[u8]) -> Option<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    (p.label == "CERTIFICATE").then_some(p.contents)
}

/// Identity and serial of a peer's leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The common name, else the first DNS subject alternative name.
    pub id: String,
    /// Serial number, lower-case hex without separators.
    pub serial: String,
}

/// Reads the identity from a DER certificate.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| TlsError(format!("peer certificate unreadable: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|ext| {
            ext.value.general_names.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
        });
    let id = cn
        .or(san)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TlsError("peer certificate has no common name or DNS name".into()))?;
    Ok(PeerIdentity {
        id,
        serial: cert.raw_serial_as_string().replace(':', "").to_lowercase(),
    })
}

mod serde_like {
    /// A TLS setup problem, with the file and the reason.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("TLS: {0}")]
    pub struct TlsError(pub String);
}

pub use serde_like::TlsError as Error;
