//! `vmbackup key`: create and inspect the passphrase-protected key file of
//! client-side encryption (`datastore::key`), and its recovery copy.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use datastore::key::{KeyFile, MasterKey};

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

/// Where a key file's passphrase comes from.
#[derive(Debug, Args)]
pub struct Passphrase {
    /// File whose first line is the passphrase (default: the
    /// VMBACKUP_PASSPHRASE environment variable).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

impl Passphrase {
    /// The passphrase.
    pub fn read(&self) -> Result<String> {
        if let Some(p) = &self.passphrase_file {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the passphrase file {}", p.display()))?;
            return Ok(text.lines().next().unwrap_or_default().to_owned());
        }
        match std::env::var("VMBACKUP_PASSPHRASE") {
            Ok(p) => Ok(p),
            Err(_) => bail!("no passphrase: pass --passphrase-file or set VMBACKUP_PASSPHRASE"),
        }
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Generate a master key and write it, wrapped by the passphrase, to a
    /// new key file (never overwrites one).
    Create {
        /// The key file to create.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        passphrase: Passphrase,
    },
    /// Check the passphrase and show the key's fingerprint and creation time.
    Show {
        /// The key file.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        passphrase: Passphrase,
    },
    /// Print the master key as hex: the recovery copy to keep offline.
    ExportMaster {
        /// The key file.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        passphrase: Passphrase,
    },
    /// Read a recovery copy (hex) from stdin and write it, wrapped by the
    /// passphrase, to a new key file.
    ImportMaster {
        /// The key file to create.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        passphrase: Passphrase,
    },
}

/// Open the master key in `file` with the passphrase.
pub fn open_key(file: &std::path::Path, passphrase: &Passphrase) -> Result<MasterKey> {
    let kf = KeyFile::load(file)?;
    let pass = passphrase.read()?;
    kf.open(&pass)
        .with_context(|| format!("opening key file {}", file.display()))
}

/// Create a key file with a new master key; returns the key.
pub fn create_key(file: &std::path::Path, passphrase: &Passphrase) -> Result<MasterKey> {
    let key = MasterKey::generate();
    KeyFile::seal(&key, &passphrase.read()?)?
        .store_new(file)
        .with_context(|| format!("creating key file {}", file.display()))?;
    Ok(key)
}

pub fn run(args: KeyArgs, json: bool) -> Result<()> {
    let show = |file: &KeyFile| {
        if json {
            println!(
                "{}",
                serde_json::json!({"fingerprint": file.fingerprint, "created": file.created})
            );
        } else {
            println!("fingerprint {}", file.fingerprint);
            println!("created     {}", file.created);
        }
    };
    match args.command {
        KeyCommand::Create { file, passphrase } => {
            let sealed = KeyFile::seal(&MasterKey::generate(), &passphrase.read()?)?;
            sealed.store_new(&file)?;
            show(&sealed);
        }
        KeyCommand::Show { file, passphrase } => {
            let kf = KeyFile::load(&file)?;
            kf.open(&passphrase.read()?)
                .with_context(|| format!("opening key file {}", file.display()))?;
            show(&kf);
        }
        KeyCommand::ExportMaster { file, passphrase } => {
            println!("{}", open_key(&file, &passphrase)?.export_master());
        }
        KeyCommand::ImportMaster { file, passphrase } => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading the master key from stdin")?;
            let key = MasterKey::import_master(&text)?;
            let sealed = KeyFile::seal(&key, &passphrase.read()?)?;
            sealed.store_new(&file)?;
            show(&sealed);
        }
    }
    Ok(())
}
