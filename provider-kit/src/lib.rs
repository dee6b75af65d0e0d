//! # provider-kit: machinery shared by providers
//!
//! `provider-api` is the minimal contract; this crate holds what several
//! providers need and a vendor would otherwise write again:
//!
//! - [`retry`](mod@retry): retrying an operation whose error is marked retryable
//!   ([`provider_api::Error::is_retryable`]), with capped exponential
//!   backoff and jitter, a bounded number of times, each attempt logged.
//! - [`http_export`]: an image behind an HTTP URL (ranged, resumed
//!   `GET`s) served as a loopback NBD export, with an optional in-order
//!   check (an md5) over every byte the data mover reads.
//! - [`registry`]: platform kinds by name, each a factory that builds a
//!   provider from its configuration table (how a host adds platforms
//!   without knowing them).
//!
//! Providers may use it; nothing in the contract requires it.

pub mod http_export;
pub mod registry;
pub mod retry;

pub use retry::{RetryPolicy, retry};
