//! NBD URIs (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`), as in
//! the NBD URI specification (doc/uri.md of the NBD project).

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP host (name or IP) and port.
    Tcp {
        /// Host name or IP address (without brackets for IPv6).
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix domain socket path.
    Unix(PathBuf),
}

impl Address {
    /// TCP address from a socket address.
    pub fn tcp(addr: std::net::SocketAddr) -> Self {
        Address::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// `nbds` schemes: TLS is mandatory.
    pub tls: bool,
    /// The server address.
    pub address: Address,
    /// The export name (percent-decoded path without the leading `/`).
    pub export: String,
    /// `tls-certificates=DIR` query parameter: a directory with
    /// `ca-cert.pem` and optionally `client-cert.pem` + `client-key.pem`.
    pub tls_certificates: Option<PathBuf>,
}

impl NbdUri {
    /// Parse a URI.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::invalid(format!("NBD URI {s:?}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad("scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export =
            percent_decode(path).ok_or_else(|| bad("bad percent-encoding in the export name"))?;
        let mut socket = None;
        let mut tls_certificates = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|kv| !kv.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v).ok_or_else(|| bad("bad percent-encoding in the query"))?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-certificates" => tls_certificates = Some(PathBuf::from(v)),
                _ => {} // other parameters (tls-psk-file, ...) are ignored
            }
        }
        // drop user info
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad("a unix URI takes no host"));
            }
            Address::Unix(socket.ok_or_else(|| bad("missing ?socket=PATH"))?)
        } else {
            let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                (h.to_owned(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), Some(p)),
                    None => (authority.to_owned(), None),
                }
            };
            let port = match port {
                Some(p) if !p.is_empty() => p.parse().map_err(|_| bad("bad port"))?,
                _ => DEFAULT_PORT,
            };
            let host = if host.is_empty() {
                "localhost".to_owned()
            } else {
                host
            };
            Address::Tcp { host, port }
        };
        Ok(NbdUri {
            tls,
            address,
            export,
            tls_certificates,
        })
    }
}

impl std::str::FromStr for NbdUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        match &self.address {
            Address::Tcp { .. } => {
                write!(f, "{s}://{}/{}", self.address, percent_encode(&self.export))
            }
            Address::Unix(p) => write!(
                f,
                "{s}+unix:///{}?socket={}",
                percent_encode(&self.export),
                percent_encode(&p.to_string_lossy())
            ),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let u = NbdUri::parse("nbd://127.0.0.1:1234/vm").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        assert_eq!((u.export.as_str(), u.tls), ("vm", false));
        let u = NbdUri::parse("nbds://[::1]/a%20b?tls-certificates=/tmp/pki").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "a b");
        assert!(u.tls);
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/tmp/pki")));
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/n.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/run/n.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        for bad in [
            "http://x/",
            "nbd+unix:///x",
            "nbd://h:port/",
            "nbd://[::1/x",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
