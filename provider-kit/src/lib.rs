//! # provider-kit: machinery shared by providers
//!
//! `provider-api` is the minimal contract; this crate holds what several
//! providers need and a vendor would otherwise write again:
//!
//! - [`retry`](mod@retry): retrying an operation whose error is marked retryable
//!   ([`provider_api::Error::is_retryable`]), with capped exponential
//!   backoff and jitter, a bounded number of times, each attempt logged.
//! - [`http_client`](mod@http_client): the REST providers' HTTP client (timeouts, the
//!   platform's CA as the only root, a user agent naming this library).
//! - [`http_export`]: an image behind an HTTP URL (ranged, resumed
//!   `GET`s) served as a loopback NBD export, with an optional in-order
//!   check (an md5) over every byte the data mover reads.
//! - [`guest_state`]: one record per guest between a backup's or a
//!   restore's calls ([`GuestStates`]), and the poison-tolerant [`lock`].
//! - [`poll`]: waiting for a platform's task or job (interval, backoff,
//!   timeout whose error names the last status seen).
//! - [`registry`]: platform kinds by name, each a factory that builds a
//!   provider from its configuration table (how a host adds platforms
//!   without knowing them).
//!
//! Providers may use it; nothing in the contract requires it.

pub mod guest_state;
pub mod http_client;
pub mod http_export;
pub mod poll;
pub mod registry;
pub mod retry;

pub use guest_state::{GuestStates, lock};
pub use http_client::{HttpClientOptions, http_client};
pub use retry::{RetryPolicy, retry};
