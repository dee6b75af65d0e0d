//! The disk store: owns every base image and virtual disk of a state
//! directory (`images/<id>/`, `disks/<id>/`) and loads them at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::lock;

use super::{BaseImage, VirtualDisk};
use crate::error::{Error, Result};
use crate::ids::new_uuid;

/// All base images and disks, by id. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    images: Mutex<BTreeMap<String, Arc<BaseImage>>>,
    disks: Mutex<BTreeMap<String, Arc<VirtualDisk>>>,
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut out = Vec::new();
            for e in entries {
                let e = e.map_err(Error::io(dir))?;
                if e.path().join("meta.json").is_file() {
                    out.push(e.path());
                }
            }
            Ok(out)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir)(e)),
    }
}

impl DiskStore {
    /// Opens (creating if needed) the store under `root`, loading everything
    /// already there.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["images", "disks"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(Error::io(&p))?;
        }
        let mut images = BTreeMap::new();
        for dir in subdirs(&root.join("images"))? {
            let image = BaseImage::open(&dir)?;
            images.insert(image.id().to_string(), Arc::new(image));
        }
        let mut disks = BTreeMap::new();
        for dir in subdirs(&root.join("disks"))? {
            let disk = VirtualDisk::open(&dir, |id| images.get(id).cloned())?;
            disks.insert(disk.id().to_string(), Arc::new(disk));
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
            images: Mutex::new(images),
            disks: Mutex::new(disks),
        })
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates an empty, writable base image.
    pub fn create_image(&self, size: u64) -> Result<Arc<BaseImage>> {
        super::check_size(size)?;
        let id = new_uuid();
        let image = Arc::new(BaseImage::create(
            &self.root.join("images").join(&id),
            &id,
            size,
        )?);
        lock(&self.images).insert(id, image.clone());
        Ok(image)
    }

    /// Creates an empty disk, linked to base image `base` when given.
    pub fn create_disk(&self, size: u64, base: Option<&str>) -> Result<Arc<VirtualDisk>> {
        let base = base.map(|id| self.image(id)).transpose()?;
        let id = new_uuid();
        let disk = Arc::new(VirtualDisk::create(
            &self.root.join("disks").join(&id),
            &id,
            size,
            base,
        )?);
        lock(&self.disks).insert(id, disk.clone());
        Ok(disk)
    }

    /// Looks up a base image.
    pub fn image(&self, id: &str) -> Result<Arc<BaseImage>> {
        lock(&self.images)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("base image", id))
    }

    /// Looks up a disk.
    pub fn disk(&self, id: &str) -> Result<Arc<VirtualDisk>> {
        lock(&self.disks)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("disk", id))
    }

    /// All disk ids.
    pub fn disk_ids(&self) -> Vec<String> {
        lock(&self.disks).keys().cloned().collect()
    }

    /// All image ids.
    pub fn image_ids(&self) -> Vec<String> {
        lock(&self.images).keys().cloned().collect()
    }

    /// Disks linked to base image `image_id`.
    pub fn disks_using(&self, image_id: &str) -> Vec<String> {
        lock(&self.disks)
            .values()
            .filter(|d| d.base_image().is_some_and(|b| b.id() == image_id))
            .map(|d| d.id().to_string())
            .collect()
    }

    /// Deletes a disk and its files (snapshots included).
    pub fn delete_disk(&self, id: &str) -> Result<()> {
        let disk = lock(&self.disks)
            .remove(id)
            .ok_or_else(|| Error::not_found("disk", id))?;
        std::fs::remove_dir_all(disk.dir()).map_err(Error::io(disk.dir()))
    }

    /// Deletes a base image; refused while a disk is linked to it.
    pub fn delete_image(&self, id: &str) -> Result<()> {
        let users = self.disks_using(id);
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "base image {id} is in use by {} disk(s)",
                users.len()
            )));
        }
        let image = lock(&self.images)
            .remove(id)
            .ok_or_else(|| Error::not_found("base image", id))?;
        std::fs::remove_dir_all(image.dir()).map_err(Error::io(image.dir()))
    }
}
