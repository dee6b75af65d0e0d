//! `mock-hypervisor --state-dir DIR --listen 127.0.0.1:0 [--tls-dir DIR] [--seed demo]`
//!
//! Prints one JSON line with the endpoints on stdout and serves until
//! SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mock_hypervisor::{MockConfig, MockHypervisor, Seed};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SeedArg {
    Demo,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Emulates virtualization platforms (SCP) with real disks, CBT and NBD"
)]
struct Args {
    /// State directory (created if missing; survives restarts).
    #[arg(long)]
    state_dir: PathBuf,
    /// HTTP listen address; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// NBD listen address (default: the HTTP IP, any port).
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// TLS directory for NBDSSL (ca-cert.pem, server-cert.pem,
    /// server-key.pem; generated when missing).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Refuse NBD clients that do not use TLS.
    #[arg(long)]
    nbd_tls_required: bool,
    /// Create demo content on a new state directory.
    #[arg(long, value_enum)]
    seed: Option<SeedArg>,
    /// SCP platform version (6.11.2 and 6.11.3 differ in base image CBT).
    #[arg(long, default_value = "6.11.3")]
    scp_version: String,
    /// SCP account name.
    #[arg(long, default_value = "admin")]
    scp_username: String,
    /// SCP account password.
    #[arg(long, default_value = "admin-password")]
    scp_password: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = MockConfig::new(args.state_dir);
    config.listen = args.listen;
    config.nbd_listen = args.nbd_listen;
    config.tls_dir = args.tls_dir;
    config.nbd_tls_required = args.nbd_tls_required;
    config.seed = args.seed.map(|SeedArg::Demo| Seed::Demo);
    config.scp.version = args.scp_version;
    config.scp.username = args.scp_username;
    config.scp.password = args.scp_password;
    let mock = MockHypervisor::start(config)
        .await
        .context("starting the mock hypervisor")?;
    println!("{}", serde_json::to_string(mock.endpoints())?);
    wait_for_stop().await;
    mock.shutdown().await;
    Ok(())
}

async fn wait_for_stop() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
