//! # provider-kit: machinery shared by providers
//!
//! `provider-api` is the minimal contract; this crate holds what several
//! providers need and a vendor would otherwise write again:
//!
//! - [`retry`]: retrying an operation whose error is marked retryable
//!   ([`provider_api::Error::is_retryable`]), with capped exponential
//!   backoff and jitter, a bounded number of times, each attempt logged.
//!
//! Providers may use it; nothing in the contract requires it.
#![warn(missing_docs)]

pub mod retry;

pub use retry::{RetryPolicy, retry};
