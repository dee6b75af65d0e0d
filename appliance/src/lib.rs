//! # appliance: OVA/OVF import and export
//!
//! - [`ova`]: reading an OVA (a tar archive) safely: headers only, each
//!   member's offset and size, refusing links, paths that leave the
//!   archive, sizes beyond the file and duplicate names; writing one.
//! - [`ovf`]: a tolerant parser of OVF descriptors as real exporters write
//!   them, hardened against hostile XML; a writer for exports.
//! - [`spec`]: the platform-neutral guest specification an import stores
//!   (`provider_api::spec`, re-exported: it is part of the contract).
//! - [`units`]: allocation units (`byte * 2^30`, `MegaBytes`).
//!
//! Why by hand: no maintained crate parses OVF (the format is a DMTF XML
//! schema; `quick-xml` does the XML), and the `tar` crate reads headers but
//! has no policy for untrusted archives: the checks are ours.

pub mod error;
pub mod import;
pub mod ova;
pub mod ovf;
pub use provider_api::spec;
pub mod units;

pub use error::{Error, ErrorKind, Result};
pub use provider_api::GuestSpec;
