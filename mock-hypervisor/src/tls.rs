//! TLS material for NBDSSL: loaded from `--tls-dir` or generated there.
//!
//! Files: `ca-cert.pem` (give it to clients), `server-cert.pem`,
//! `server-key.pem`. When the directory lacks them, a fresh CA and a server
//! certificate for `localhost` and the listen address are generated with
//! rcgen and written there.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Certificate and key of the NBD server plus where its CA lives.
#[derive(Clone)]
pub struct TlsMaterial {
    /// `ca-cert.pem`.
    pub ca_cert: PathBuf,
    /// Server certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Server private key (PEM).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_cert", &self.ca_cert)
            .finish_non_exhaustive()
    }
}

/// Loads the material in `dir`, generating it first when missing.
pub fn ensure(dir: &Path, hosts: &[String]) -> Result<TlsMaterial> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let ca = dir.join("ca-cert.pem");
    let cert = dir.join("server-cert.pem");
    let key = dir.join("server-key.pem");
    if !(ca.is_file() && cert.is_file() && key.is_file()) {
        generate(&ca, &cert, &key, hosts)?;
    }
    Ok(TlsMaterial {
        cert_pem: std::fs::read(&cert).map_err(Error::io(&cert))?,
        key_pem: std::fs::read(&key).map_err(Error::io(&key))?,
        ca_cert: ca,
    })
}

fn generate(ca_path: &Path, cert_path: &Path, key_path: &Path, hosts: &[String]) -> Result<()> {
    let tls = |e: rcgen::Error| Error::Tls(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mock-hypervisor CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let key = rcgen::KeyPair::generate().map_err(tls)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(tls)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mock-hypervisor");
    let cert = params.signed_by(&key, &issuer).map_err(tls)?;
    std::fs::write(ca_path, ca_cert.pem()).map_err(Error::io(ca_path))?;
    std::fs::write(cert_path, cert.pem()).map_err(Error::io(cert_path))?;
    std::fs::write(key_path, key.serialize_pem()).map_err(Error::io(key_path))?;
    Ok(())
}
