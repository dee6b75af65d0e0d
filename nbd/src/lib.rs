//! # nbd: an async NBD client and server on tokio
//!
//! NBD is the data path of the backup library: providers expose snapshot
//! disks as NBD exports (qemu-nbd, qemu-storage-daemon, nbdkit, vendor
//! servers), the engine reads them with this crate's [`client`], and a
//! restore exposes the repository as an export through this crate's
//! [`server`] so that `qemu-img convert nbd://…` or `nbdcopy` can read it.
//!
//! ## Why hand-written
//!
//! crates.io `nbd` 0.3 speaks only the old option set (no `NBD_OPT_GO`,
//! no structured replies, no block status, no TLS); `tokio-nbd` is a GPL
//! server whose meta-context and TLS paths panic; libnbd has no crate.
//!
//! ## Protocol subset
//!
//! The reference is the NBD protocol (doc/proto.md of the NBD project) and
//! qemu's docs/interop/nbd.txt for the `qemu:` meta contexts.
//!
//! * Handshake: fixed newstyle with `NO_ZEROES`; options `GO`/`INFO`
//!   (with `INFO_BLOCK_SIZE`: min, preferred and max are honoured),
//!   `LIST`, `STARTTLS` (x509 via rustls/ring; the client always verifies
//!   the server against a CA and never falls back to plaintext),
//!   `STRUCTURED_REPLY`, `SET_META_CONTEXT`, `LIST_META_CONTEXT`,
//!   `EXPORT_NAME` (fallback), `ABORT`. Oldstyle and extended headers are
//!   not supported.
//! * Commands: `READ`, `WRITE` (with `FUA`), `WRITE_ZEROES` (`NO_HOLE`),
//!   `TRIM`, `FLUSH`, `BLOCK_STATUS`, `DISC` (the server also accepts
//!   `CACHE`).
//! * Replies: simple, and structured chunks `OFFSET_DATA`, `OFFSET_HOLE`,
//!   `BLOCK_STATUS`, `ERROR`, `ERROR_OFFSET`, `NONE`.
//! * Meta contexts: any; `base:allocation`, `qemu:dirty-bitmap:NAME` and
//!   `qemu:allocation-depth` are the ones tested against qemu-nbd.
//!
//! Every length, offset and field from the peer is checked; a violation
//! becomes an [`Error`] of kind [`ErrorKind::Protocol`] naming the field,
//! and nothing a peer sends makes either side panic or allocate without
//! bound (option replies ≤ 1 MiB, non-data chunks ≤ 16 MiB, data only
//! into buffers sized by our own requests; the server caps payloads at
//! 32 MiB and in-flight payload memory per connection and in total, and
//! drops the work of clients that are gone: see [`server`]).
//!
//! ## Pipelining
//!
//! A [`client::Client`] is `Clone + Send + Sync`; every clone shares one
//! connection (or a pool when the server advertises multi-conn and
//! [`client::ConnectOptions::connections`] asks for it). Requests from
//! many tasks are in flight at once: a writer task batches them (flushing
//! when its queue is empty), a reader task matches replies by cookie and
//! reads data straight into the caller's buffer. Large reads are split at
//! the server's maximum block size and the pieces sent concurrently.
//!
//! ## Example
//!
//! ```
//! # async fn demo() -> nbd::Result<()> {
//! use std::sync::Arc;
//! use nbd::client::{Client, ConnectOptions, Address};
//! use nbd::server::{MemoryExport, Server, ServerConfig};
//!
//! // serve a sparse in-memory disk
//! let server = Server::new(ServerConfig::default())?;
//! let disk = MemoryExport::new(64 << 20);
//! disk.fill(1 << 20, &[0xab; 65536])?; // one 64 KiB block allocated
//! server.add_export("disk", Arc::new(disk));
//! let addr = server.listen_tcp("127.0.0.1:0".parse().unwrap()).await?;
//!
//! // read it back, skipping holes
//! let opts = ConnectOptions::new(Address::tcp(addr), "disk").meta_context("base:allocation");
//! let client = Client::connect(&opts).await?;
//! for e in client.block_status(0, client.size(), "base:allocation").await? {
//!     if !e.is_zero() {
//!         let data = client.read(e.offset, e.length as usize).await?;
//!         assert!(data.iter().all(|&b| b == 0xab));
//!     }
//! }
//! client.disconnect().await?;
//! server.shutdown().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

pub mod client;
pub mod error;
/// Entry points for fuzzing (feature `fuzzing`; not a stable API).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
pub mod server;
pub mod tls;
pub mod uri;

pub use error::{Error, ErrorKind, Result};
pub use proto::{BlockSize, Extent};
