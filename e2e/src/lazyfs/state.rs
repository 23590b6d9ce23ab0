//! The file system's state, free of FUSE: a tree of inodes held in memory
//! (what a program sees, the "page cache") over a durable layer on the real
//! disk (what survives a power cut).
//!
//! Durable layer, in the backing directory:
//! - `data/<ino>`: a file's bytes as of its last `fsync`/`fdatasync`;
//! - `tree.json`: every directory's entries as of its last directory fsync.
//!
//! A write, truncate, create, unlink, mkdir or rename changes memory only.
//! `fsync` of a file copies its dirty pages (and length) to `data/<ino>`;
//! `fsync` of a directory copies its current entries to `tree.json`. So a
//! file whose data were synced but whose name never was is gone after a
//! power cut, and an unlinked file whose directory was not synced comes back,
//! as on a real disk with strict POSIX semantics. Metadata (mode, times) is
//! not kept. [`State::load`] rebuilds memory from the durable layer only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

/// Root directory inode.
pub const ROOT: u64 = 1;
const PAGE: u64 = 4096;

/// Result of a file system operation: an errno for the caller.
pub type FsResult<T> = std::result::Result<T, Errno>;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
}

/// What `stat` reports.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: Kind,
    /// Bytes.
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// Links.
    pub nlink: u32,
    /// Last change of contents.
    pub mtime: SystemTime,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    perm: u16,
    nlink: u32,
    mtime: SystemTime,
    /// File: current bytes.
    data: Vec<u8>,
    /// File: pages that differ from `data/<ino>`.
    dirty: BTreeSet<u64>,
    /// Dir: current entries.
    entries: BTreeMap<OsString, u64>,
    /// Dir: parent (for `..`).
    parent: u64,
}

impl Node {
    fn new(kind: Kind, perm: u16, parent: u64) -> Self {
        Self {
            kind,
            perm,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            mtime: SystemTime::now(),
            data: Vec::new(),
            dirty: BTreeSet::new(),
            entries: BTreeMap::new(),
            parent,
        }
    }
}

/// The durable directory tree as stored in `tree.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Tree {
    next_ino: u64,
    /// Directory inode → name → (inode, kind).
    dirs: BTreeMap<u64, BTreeMap<String, (u64, Kind)>>,
}

/// Memory over a durable layer; see the module docs.
#[derive(Debug)]
pub struct State {
    backing: PathBuf,
    nodes: HashMap<u64, Node>,
    durable: Tree,
    next_ino: u64,
    /// Counts of what was made durable, for tests of the layer itself.
    pub synced_files: u64,
    /// Directory syncs.
    pub synced_dirs: u64,
}

impl State {
    /// Rebuilds memory from what `backing` holds durably (creating an empty
    /// root on first use).
    pub fn load(backing: &Path) -> Result<Self> {
        let data_dir = backing.join("data");
        fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let tree_path = backing.join("tree.json");
        let mut durable: Tree = match fs::read(&tree_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).context("reading tree.json")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Tree::default(),
            Err(e) => return Err(e).context("reading tree.json"),
        };
        durable.dirs.entry(ROOT).or_default();
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(Kind::Dir, 0o755, ROOT));
        // Walk from the root: only what a durable name reaches exists.
        let mut todo = vec![ROOT];
        while let Some(dir) = todo.pop() {
            let entries = durable.dirs.get(&dir).cloned().unwrap_or_default();
            for (name, (ino, kind)) in entries {
                nodes
                    .get_mut(&dir)
                    .expect("walked dir")
                    .entries
                    .insert(name.into(), ino);
                if let Some(node) = nodes.get_mut(&ino) {
                    node.nlink += 1;
                    continue;
                }
                let mut node = Node::new(kind, if kind == Kind::Dir { 0o755 } else { 0o644 }, dir);
                match kind {
                    Kind::Dir => todo.push(ino),
                    Kind::File => match fs::read(data_dir.join(ino.to_string())) {
                        Ok(bytes) => node.data = bytes,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e).context("reading durable data"),
                    },
                }
                nodes.insert(ino, node);
            }
        }
        let mut next_ino = durable.next_ino.max(ROOT + 1);
        for entry in fs::read_dir(&data_dir)? {
            let entry = entry?;
            let Some(ino) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            // Data no durable name reaches is left alone (harmless), but its
            // inode number is never handed out again.
            next_ino = next_ino.max(ino + 1);
        }
        next_ino = next_ino.max(nodes.keys().max().copied().unwrap_or(ROOT) + 1);
        durable.dirs.retain(|ino, _| nodes.contains_key(ino));
        Ok(Self {
            backing: backing.to_owned(),
            nodes,
            durable,
            next_ino,
            synced_files: 0,
            synced_dirs: 0,
        })
    }

    fn node(&self, ino: u64) -> FsResult<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> FsResult<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> FsResult<&Node> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(n)
    }

    fn file_mut(&mut self, ino: u64) -> FsResult<&mut Node> {
        let n = self.node_mut(ino)?;
        if n.kind != Kind::File {
            return Err(Errno::EISDIR);
        }
        Ok(n)
    }

    /// `stat` of an inode.
    pub fn attr(&self, ino: u64) -> FsResult<Attr> {
        let n = self.node(ino)?;
        Ok(Attr {
            ino,
            kind: n.kind,
            size: if n.kind == Kind::File {
                n.data.len() as u64
            } else {
                4096
            },
            perm: n.perm,
            nlink: n.nlink,
            mtime: n.mtime,
        })
    }

    /// The inode `name` in `parent` points to.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    /// Entries of a directory, `.` and `..` first.
    pub fn list(&self, dir: u64) -> FsResult<Vec<(u64, Kind, OsString)>> {
        let d = self.dir(dir)?;
        let mut out = vec![
            (dir, Kind::Dir, ".".into()),
            (d.parent, Kind::Dir, "..".into()),
        ];
        for (name, ino) in &d.entries {
            out.push((*ino, self.node(*ino)?.kind, name.clone()));
        }
        Ok(out)
    }

    /// Creates a file or directory named `name` in `parent`.
    pub fn create(&mut self, parent: u64, name: &OsStr, kind: Kind, perm: u16) -> FsResult<Attr> {
        if name.to_str().is_none() {
            return Err(Errno::EINVAL);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, Node::new(kind, perm, parent));
        let p = self.node_mut(parent)?;
        p.entries.insert(name.to_owned(), ino);
        p.mtime = SystemTime::now();
        if kind == Kind::Dir {
            p.nlink += 1;
        }
        self.attr(ino)
    }

    /// Removes `name` from `parent` (a directory only when `dir` and empty).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        let n = self.node(ino)?;
        match (n.kind, dir) {
            (Kind::Dir, false) => return Err(Errno::EISDIR),
            (Kind::File, true) => return Err(Errno::ENOTDIR),
            (Kind::Dir, true) if !n.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        let p = self.node_mut(parent)?;
        p.entries.remove(name);
        p.mtime = SystemTime::now();
        if dir {
            p.nlink -= 1;
        }
        let n = self.node_mut(ino)?;
        n.nlink = n.nlink.saturating_sub(if dir { 2 } else { 1 });
        Ok(())
    }

    /// `rename(2)`; `noreplace` is `RENAME_NOREPLACE`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        if new_name.to_str().is_none() {
            return Err(Errno::EINVAL);
        }
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        let kind = self.node(ino)?.kind;
        if let Some(&old) = self.dir(new_parent)?.entries.get(new_name) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(Errno::EEXIST);
            }
            let old_dir = self.node(old)?.kind == Kind::Dir;
            if old_dir != (kind == Kind::Dir) {
                return Err(if old_dir {
                    Errno::EISDIR
                } else {
                    Errno::ENOTDIR
                });
            }
            self.remove(new_parent, new_name, old_dir)?;
        }
        self.node_mut(parent)?.entries.remove(name);
        self.node_mut(new_parent)?
            .entries
            .insert(new_name.to_owned(), ino);
        if kind == Kind::Dir {
            self.node_mut(ino)?.parent = new_parent;
            self.node_mut(parent)?.nlink -= 1;
            self.node_mut(new_parent)?.nlink += 1;
        }
        Ok(())
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<&[u8]> {
        let n = self.node(ino)?;
        let len = n.data.len() as u64;
        let start = offset.min(len) as usize;
        let end = offset.saturating_add(u64::from(size)).min(len) as usize;
        Ok(&n.data[start..end])
    }

    /// Writes `data` at `offset` (memory only).
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let n = self.file_mut(ino)?;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end as usize > n.data.len() {
            n.data.resize(end as usize, 0);
        }
        n.data[offset as usize..end as usize].copy_from_slice(data);
        if !data.is_empty() {
            n.dirty.extend(offset / PAGE..=(end - 1) / PAGE);
        }
        n.mtime = SystemTime::now();
        Ok(data.len() as u32)
    }

    /// Sets a file's length (memory only). Shrinking marks the cut-off
    /// pages dirty so a later sync cannot resurrect their old bytes.
    pub fn truncate(&mut self, ino: u64, size: u64) -> FsResult<()> {
        let n = self.file_mut(ino)?;
        let old = n.data.len() as u64;
        if size < old {
            n.dirty.extend(size / PAGE..=(old - 1) / PAGE);
        }
        n.data.resize(size as usize, 0);
        n.mtime = SystemTime::now();
        Ok(())
    }

    /// Sets permission bits (memory only, never durable).
    pub fn chmod(&mut self, ino: u64, perm: u16) -> FsResult<()> {
        self.node_mut(ino)?.perm = perm;
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file: its bytes and length become durable.
    pub fn sync_file(&mut self, ino: u64) -> FsResult<()> {
        let path = self.backing.join("data").join(ino.to_string());
        let n = self.file_mut(ino)?;
        let io = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio()));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let len = n.data.len() as u64;
        f.set_len(len).map_err(io)?;
        for page in std::mem::take(&mut n.dirty) {
            let start = page * PAGE;
            if start >= len {
                continue;
            }
            let end = (start + PAGE).min(len);
            f.write_all_at(&n.data[start as usize..end as usize], start)
                .map_err(io)?;
        }
        self.synced_files += 1;
        Ok(())
    }

    /// `fsync` of a directory: its current entries become durable.
    pub fn sync_dir(&mut self, ino: u64) -> FsResult<()> {
        let d = self.dir(ino)?;
        let mut entries = BTreeMap::new();
        for (name, child) in &d.entries {
            let name = name.to_str().ok_or(Errno::EINVAL)?.to_owned();
            entries.insert(name, (*child, self.node(*child)?.kind));
        }
        self.durable.dirs.insert(ino, entries);
        self.durable.next_ino = self.next_ino;
        let io = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio()));
        let json = serde_json::to_vec(&self.durable).map_err(|_| Errno::EIO)?;
        let tmp = self.backing.join("tree.json.tmp");
        fs::write(&tmp, json).map_err(io)?;
        fs::rename(&tmp, self.backing.join("tree.json")).map_err(io)?;
        self.synced_dirs += 1;
        Ok(())
    }

    /// Bytes held in memory that are not durable: dirty pages of files.
    pub fn unsynced_pages(&self) -> usize {
        self.nodes.values().map(|n| n.dirty.len()).sum()
    }
}

fn libc_eio() -> i32 {
    Errno::EIO as i32
}

#[cfg(test)]
mod tests;
