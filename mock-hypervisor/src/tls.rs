//! TLS material for NBDSSL: loaded from `--tls-dir` or generated there.
//!
//! Files (qemu's and libnbd's layout): `ca-cert.pem` (give it to
//! clients), `server-cert.pem`, `server-key.pem`, and `client-cert.pem`,
//! `client-key.pem` for clients of servers that verify their peers. When
//! the directory lacks them, a fresh CA, a server certificate for
//! `localhost` and the listen address, and a client certificate are
//! generated with rcgen and written there (keys 0600).

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
    // Material the user put there is never replaced; the client
    // certificate only exists when the whole set was generated here.
    if !(ca.is_file() && cert.is_file() && key.is_file()) {
        generate(dir, hosts)?;
    }
    Ok(TlsMaterial {
        cert_pem: std::fs::read(&cert).map_err(Error::io(&cert))?,
        key_pem: std::fs::read(&key).map_err(Error::io(&key))?,
        ca_cert: ca,
    })
}

fn generate(dir: &Path, hosts: &[String]) -> Result<()> {
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
    let leaf = |names: Vec<String>, cn: &str, usage: rcgen::ExtendedKeyUsagePurpose| {
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut params = rcgen::CertificateParams::new(names).map_err(tls)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).map_err(tls)?;
        Ok::<_, Error>((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        names,
        "mock-hypervisor",
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        Vec::new(),
        "backup-client",
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    for (name, pem, mode) in [
        ("ca-cert.pem", ca_cert.pem(), 0o644),
        ("server-cert.pem", server_cert, 0o644),
        ("server-key.pem", server_key, 0o600),
        ("client-cert.pem", client_cert, 0o644),
        ("client-key.pem", client_key, 0o600),
    ] {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(pem.as_bytes()))
            .map_err(Error::io(&path))?;
    }
    Ok(())
}
