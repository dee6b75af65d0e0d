//! Shell completions and manual pages, generated from the command
//! definitions (`clap_complete`, `clap_mangen`) so that they never drift
//! from `--help`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write vmbackup.1 and one vmbackup-COMMAND.1 per command into this
    /// directory (created if missing) instead of printing vmbackup.1.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Print the completion script of `args.shell` for `cmd`.
pub fn completions(args: &CompletionsArgs, mut cmd: clap::Command) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "vmbackup", &mut script);
    print_all(&script).context("writing the completion script")
}

/// Write `bytes` to stdout; a reader that stopped early (`| head`) is not
/// an error.
fn print_all(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Print vmbackup(1), or write every page into `args.dir`.
pub fn man(args: &ManArgs, cmd: clap::Command) -> Result<()> {
    match &args.dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .context("rendering the manual page")?;
            print_all(&page).context("writing the manual page")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))
        }
    }
}
