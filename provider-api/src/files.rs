//! File archives: a directory tree (a container's root file system, or any
//! tree a host walks) stored in a snapshot next to, or instead of, volumes.
//!
//! A host walks the tree and hands each entry, in walk order, to a
//! [`FileArchiveWriter`]; a restore reads the catalog back through a
//! [`FileArchiveReader`] and the contents of regular files by entry. The
//! catalog (every entry's metadata) can be listed and searched without
//! reading any file content.
//!
//! Walking a file system is blocking work: these traits are synchronous and
//! are called from a blocking thread (`tokio::task::spawn_blocking`), the
//! way a tree walker is written anyway.
//!
//! ## Entries
//!
//! Paths are raw bytes (Unix file names need not be UTF-8), relative to the
//! archive's root, components joined by `/`; the root itself is the empty
//! path. A directory comes before everything below it. A hard link's
//! second and later names are [`FileKind::Hardlink`] entries naming the
//! first (which holds the content). ACLs are the `system.posix_acl_access`
//! and `system.posix_acl_default` extended attributes, stored as such.

use crate::error::Result;

/// Owner id shift of an unprivileged container: host ids `host_base ..
/// host_base + count` are the container's `0 .. count` (Proxmox maps
/// `100000..165535` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First host id of the range.
    pub host_base: u32,
    /// Number of ids mapped.
    pub count: u32,
}

impl IdMap {
    /// The container's id for a host id (`None` outside the range).
    pub fn to_archive(&self, host: u32) -> Option<u32> {
        host.checked_sub(self.host_base).filter(|i| *i < self.count)
    }

    /// The host id for a container's id (`None` outside the range).
    pub fn to_host(&self, archived: u32) -> Option<u32> {
        (archived < self.count).then(|| self.host_base.saturating_add(archived))
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file (its content in the archive).
    File,
    /// A directory.
    Dir,
    /// A symbolic link (`link` holds its target, never followed).
    Symlink,
    /// Another name of a regular file archived earlier (`link` holds that
    /// entry's path).
    Hardlink,
    /// A character device (`rdev`).
    CharDevice,
    /// A block device (`rdev`).
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket (restored as a plain socket node).
    Socket,
}

impl FileKind {
    /// One character, as `ls -l` writes it.
    pub fn letter(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::Hardlink => 'h',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
        }
    }
}

/// One entry of a file archive's catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the archive root (raw bytes, `/`-separated; the
    /// root is empty).
    pub path: Vec<u8>,
    /// What it is.
    pub kind: FileKind,
    /// Permission bits with set-uid, set-gid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner, as stored (after any id mapping the host applied).
    pub uid: u32,
    /// Group, as stored.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time at backup, nanoseconds since the epoch (change
    /// detection only; a restore cannot set it).
    pub ctime_ns: i64,
    /// Inode number at backup (change detection only).
    pub inode: u64,
    /// Regular files: the size in bytes.
    pub size: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// Symlink target, or the path of a hard link's first name.
    pub link: Vec<u8>,
    /// Extended attributes (name, value), sorted by name; ACLs among them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Sparse regular files: the data extents (offset, length), ascending;
    /// everything else reads as zeroes. `None`: the whole file is data.
    pub extents: Option<Vec<(u64, u64)>>,
    /// Where its content starts in the archive's data stream: set by the
    /// target when it lists entries, ignored when they are added.
    pub data_offset: u64,
}

impl FileEntry {
    /// An entry with every field but path and kind zero or empty.
    pub fn new(path: impl Into<Vec<u8>>, kind: FileKind) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            size: 0,
            rdev: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            extents: None,
            data_offset: 0,
        }
    }

    /// Bytes of content the archive holds for it (the data extents of a
    /// sparse file, the whole size otherwise; zero for non-files).
    pub fn stored_len(&self) -> u64 {
        match (self.kind, &self.extents) {
            (FileKind::File, Some(ex)) => ex.iter().map(|e| e.1).sum(),
            (FileKind::File, None) => self.size,
            _ => 0,
        }
    }

    /// The path for display (lossy where not UTF-8).
    pub fn display_path(&self) -> String {
        if self.path.is_empty() {
            ".".into()
        } else {
            String::from_utf8_lossy(&self.path).into_owned()
        }
    }
}

/// What writing a file archive cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Entries in the catalog.
    pub entries: u64,
    /// Regular files whose content was read.
    pub files_read: u64,
    /// Regular files whose content was taken from the previous archive
    /// without reading them (unchanged metadata).
    pub files_reused: u64,
    /// Content bytes read from the tree.
    pub bytes_read: u64,
    /// Bytes of new chunks the target stored (after compression).
    pub bytes_stored: u64,
}

/// Writes one file archive, entry by entry in walk order.
pub trait FileArchiveWriter: Send {
    /// The previous archive's entry at `path` when its content can be
    /// reused (see [`reuse`](Self::reuse)); `None` without a previous
    /// archive or entry. Paths must be asked in walk order.
    fn previous(&mut self, path: &[u8]) -> Result<Option<FileEntry>>;
    /// Add an entry without content (anything but a regular file), or a
    /// regular file whose content follows in [`write`](Self::write) calls
    /// (exactly [`FileEntry::stored_len`] bytes, then the next entry).
    fn add(&mut self, entry: FileEntry) -> Result<()>;
    /// Content of the regular file added last.
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Add a regular file whose content is that of the previous archive's
    /// entry `previous` (same stored length): nothing is read.
    fn reuse(&mut self, entry: FileEntry, previous: &FileEntry) -> Result<()>;
    /// Make the archive durable (visible with the snapshot's commit).
    fn finish(self: Box<Self>) -> Result<ArchiveStats>;
}

/// Reads one stored file archive.
pub trait FileArchiveReader: Send + Sync {
    /// Number of entries.
    fn len(&self) -> u64;
    /// Whether the archive has no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every entry, in walk order (the catalog only: no content is read).
    fn entries(&self) -> Result<Box<dyn Iterator<Item = Result<FileEntry>> + Send + '_>>;
    /// Content of a regular file entry: `len` stored bytes from `offset`
    /// (the data extents concatenated, for a sparse file).
    fn read(&self, entry: &FileEntry, offset: u64, len: usize) -> Result<Vec<u8>>;
}
