//! The directory provider passes the conformance kit's container checks,
//! through both restore mechanisms (directory, and tar extracted by GNU
//! tar).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use conformance::{ContainerDriver, ContainerKit};
use provider_api::{Guest, Result};
use provider_dir::DirProvider;

/// The "platform": container trees under `trees/`, restores under
/// `restored/`.
struct Dirs {
    trees: PathBuf,
    restored: PathBuf,
}

#[async_trait]
impl ContainerDriver for Dirs {
    async fn create_container(&self, name: &str) -> Result<(Guest, PathBuf)> {
        let root = self.trees.join(name);
        std::fs::create_dir_all(&root).unwrap();
        Ok((Guest::container(name), root))
    }

    async fn restored_root(&self, guest: &Guest) -> Result<PathBuf> {
        Ok(self.restored.join(&guest.id.0))
    }

    async fn remove_container(&self, guest: &Guest) -> Result<()> {
        for base in [&self.trees, &self.restored] {
            let p = base.join(&guest.id.0);
            if p.exists() {
                std::fs::remove_dir_all(&p).unwrap();
            }
        }
        Ok(())
    }

    async fn leftovers(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for base in [&self.trees, &self.restored] {
            if let Ok(rd) = std::fs::read_dir(base) {
                for e in rd {
                    out.push(e.unwrap().path().display().to_string());
                }
            }
        }
        Ok(out)
    }
}

async fn run(tar: bool) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = Dirs {
        trees: tmp.path().join("trees"),
        restored: tmp.path().join("restored"),
    };
    let mut p = DirProvider::new(
        [(
            "conformance-ct".to_owned(),
            dirs.trees.join("conformance-ct"),
        )],
        dirs.restored.clone(),
    );
    if tar {
        p = p.with_tar_restore();
    }
    ContainerKit::new(Arc::new(p), Arc::new(dirs))
        .run()
        .await
        .unwrap_or_else(|f| panic!("{f}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_checks_pass_with_directory_restore() {
    let notes = run(false).await;
    assert!(notes.iter().any(|n| n.contains("Directory")), "{notes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_checks_pass_with_tar_restore() {
    let notes = run(true).await;
    assert!(notes.iter().any(|n| n.contains("Tar")), "{notes:?}");
}
