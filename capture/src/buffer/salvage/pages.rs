//! Page access to a damaged SQLite file, without SQLite: the database file
//! overlaid with the committed frames of its WAL, page by page, read on
//! demand (a damaged buffer can be larger than memory).
//!
//! Only what the file format guarantees is trusted: the WAL's salts and
//! running checksums decide which frames count (as SQLite's own recovery
//! does), and a page that cannot be read (beyond a truncated end, I/O error)
//! is reported missing rather than guessed.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// SQLite's default page size, used when neither the file nor its WAL says.
const DEFAULT_PAGE_SIZE: usize = 4096;
/// First 16 bytes of every SQLite database file.
pub(crate) const MAGIC: &[u8; 16] = b"SQLite format 3\0";
const WAL_HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

/// What the database header (page 1) says, when it can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// First freelist trunk page (0: none).
    pub freelist_trunk: u32,
}

/// The pages of one database file and its WAL.
#[derive(Debug)]
pub(super) struct Pages {
    db: Option<File>,
    db_len: u64,
    wal: Option<File>,
    /// Latest committed WAL frame of each page: offset of its data.
    wal_frames: HashMap<u32, u64>,
    page_size: usize,
    usable: usize,
    count: u32,
    header: Option<Header>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn valid_page_size(n: usize) -> bool {
    (512..=65536).contains(&n) && n.is_power_of_two()
}

/// Page size and reserved bytes from a database header, when it is sound.
fn db_geometry(head: &[u8]) -> Option<(usize, usize)> {
    if head.len() < 100 || &head[..16] != MAGIC {
        return None;
    }
    let size = match be16(head, 16) {
        1 => 65536,
        n => n as usize,
    };
    let reserved = head[20] as usize;
    (valid_page_size(size) && reserved < size / 2).then_some((size, reserved))
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing `s`.
fn wal_checksum(big_endian: bool, data: &[u8], s: (u32, u32)) -> (u32, u32) {
    let (mut s0, mut s1) = s;
    for c in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (be32(c, 0), be32(c, 4))
        } else {
            (
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        };
        s0 = s0.wrapping_add(x0).wrapping_add(s1);
        s1 = s1.wrapping_add(x1).wrapping_add(s0);
    }
    (s0, s1)
}

/// What a WAL holds.
#[derive(Debug, Default)]
struct WalScan {
    page_size: usize,
    /// Latest committed frame of each page: offset of its data.
    committed: HashMap<u32, u64>,
    /// Pages in the database after the last commit.
    db_pages: u32,
    /// Frames of this WAL generation (same salt) after the first frame whose
    /// running checksum fails, up to the last commit among them.
    tail: Vec<(u32, u64)>,
    /// Commit frames in that tail, and the database size at the last one.
    tail_commits: u32,
    tail_db_pages: u32,
}

/// Reads a WAL as SQLite does: frames count while their salt matches the
/// header and the running checksum holds, up to the last commit. Unlike
/// SQLite it goes on past a checksum failure to find frames of the same
/// generation written after it: a torn write at a crash leaves at most the
/// one transaction being written there (the previous commit was synced
/// before it began), so two or more commits after the failure mean a damaged
/// log whose later commits SQLite would silently drop.
fn read_wal(wal: &File, want_page_size: Option<usize>) -> Option<WalScan> {
    let mut head = [0u8; WAL_HEADER];
    wal.read_exact_at(&mut head, 0).ok()?;
    let magic = be32(&head, 0);
    if magic & !1 != 0x377f_0682 {
        return None;
    }
    let big_endian = magic & 1 == 1;
    let page_size = be32(&head, 8) as usize;
    if !valid_page_size(page_size) || want_page_size.is_some_and(|w| w != page_size) {
        return None;
    }
    let mut sum = wal_checksum(big_endian, &head[..24], (0, 0));
    if sum != (be32(&head, 24), be32(&head, 28)) {
        return None;
    }
    let salt = &head[16..24];
    let mut scan = WalScan {
        page_size,
        ..WalScan::default()
    };
    let mut pending: Vec<(u32, u64)> = Vec::new();
    let mut broken = false;
    let mut frame = vec![0u8; FRAME_HEADER + page_size];
    let mut offset = WAL_HEADER as u64;
    while wal.read_exact_at(&mut frame, offset).is_ok() {
        let data = offset + FRAME_HEADER as u64;
        offset += frame.len() as u64;
        let page = be32(&frame, 0);
        let same_salt = &frame[8..16] == salt;
        let commit_size = be32(&frame, 4);
        if !broken {
            if same_salt && page != 0 {
                sum = wal_checksum(big_endian, &frame[..8], sum);
                sum = wal_checksum(big_endian, &frame[FRAME_HEADER..], sum);
                if sum == (be32(&frame, 16), be32(&frame, 20)) {
                    pending.push((page, data));
                    if commit_size != 0 {
                        scan.committed.extend(pending.drain(..));
                        scan.db_pages = commit_size;
                    }
                    continue;
                }
            }
            // End of what SQLite reads. Frames of older generations (another
            // salt) follow a healthy log. The frames of the transaction being
            // written stay pending: if it commits later, they are tail.
            broken = true;
        }
        if !same_salt {
            continue;
        }
        if page != 0 {
            pending.push((page, data));
        }
        if commit_size != 0 {
            scan.tail.append(&mut pending);
            scan.tail_commits += 1;
            scan.tail_db_pages = commit_size;
        }
    }
    Some(scan)
}

/// Why the WAL next to a database is damaged, if it is: two or more commits
/// written after a frame whose checksum fails (see [`read_wal`]).
pub(crate) fn wal_damage(wal: &Path) -> std::io::Result<Option<String>> {
    let file = match File::open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(read_wal(&file, None)
        .filter(|scan| scan.tail_commits >= 2)
        .map(|scan| {
            format!(
                "write-ahead log damaged: {} commits follow a frame that fails its checksum",
                scan.tail_commits
            )
        }))
}

impl Pages {
    /// Opens `db` (may be missing or empty) and `wal` (optional), read only.
    pub(super) fn open(db: &Path, wal: &Path) -> std::io::Result<Self> {
        let db = match File::open(db) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let db_len = match &db {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        let mut head = [0u8; 100];
        let geometry = db
            .as_ref()
            .and_then(|f| f.read_exact_at(&mut head, 0).ok())
            .and_then(|()| db_geometry(&head));
        let wal = match File::open(wal) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let wal_read = wal
            .as_ref()
            .and_then(|w| read_wal(w, geometry.map(|(size, _)| size)));
        let (page_size, reserved) = match (geometry, &wal_read) {
            (Some(g), _) => g,
            (None, Some(scan)) => (scan.page_size, 0),
            (None, None) => (DEFAULT_PAGE_SIZE, 0),
        };
        let (wal_frames, wal_pages) = match wal_read {
            // A damaged log: its later commits are the newest images there
            // are (a frame that is garbage shows as a damaged page).
            Some(mut scan) if scan.tail_commits >= 2 => {
                scan.committed.extend(scan.tail);
                (scan.committed, scan.tail_db_pages)
            }
            Some(scan) => (scan.committed, scan.db_pages),
            None => Default::default(),
        };
        let file_pages = u32::try_from(db_len / page_size as u64).unwrap_or(u32::MAX);
        let max_frame_page = wal_frames.keys().copied().max().unwrap_or(0);
        let mut pages = Self {
            db,
            db_len,
            wal,
            wal_frames,
            page_size,
            usable: page_size - reserved,
            count: file_pages.max(wal_pages).max(max_frame_page),
            header: None,
        };
        pages.header = pages.page(1).and_then(|p| {
            db_geometry(&p)
                .filter(|g| g.0 == page_size)
                .map(|_| Header {
                    freelist_trunk: be32(&p, 32),
                })
        });
        Ok(pages)
    }

    /// Pages in the database (the larger of the file's and the last commit's).
    pub(super) fn count(&self) -> u32 {
        self.count
    }

    /// Bytes of a page that hold content (page size minus reserved bytes).
    pub(super) fn usable(&self) -> usize {
        self.usable
    }

    /// The database header, when page 1 is sound.
    pub(super) fn header(&self) -> Option<Header> {
        self.header
    }

    /// Latest committed image of page `n` (1-based), or `None` when it is
    /// beyond the data or cannot be read.
    pub(super) fn page(&self, n: u32) -> Option<Vec<u8>> {
        if n == 0 || n > self.count {
            return None;
        }
        let mut buf = vec![0u8; self.page_size];
        if let (Some(&at), Some(wal)) = (self.wal_frames.get(&n), &self.wal) {
            return wal.read_exact_at(&mut buf, at).ok().map(|()| buf);
        }
        let at = (n as u64 - 1) * self.page_size as u64;
        if at + self.page_size as u64 > self.db_len {
            return None;
        }
        self.db.as_ref()?.read_exact_at(&mut buf, at).ok()?;
        Some(buf)
    }

    /// Pages on the freelist, when the header and the trunk chain are sound
    /// (`None` otherwise: then no page can be ruled out as stale).
    pub(super) fn freelist(&self) -> Option<Vec<bool>> {
        let mut free = vec![false; self.count as usize + 1];
        let mut trunk = self.header?.freelist_trunk;
        let mut hops = 0u32;
        while trunk != 0 {
            hops += 1;
            if trunk > self.count || free[trunk as usize] || hops > self.count {
                return None;
            }
            free[trunk as usize] = true;
            let p = self.page(trunk)?;
            let leaves = be32(&p, 4) as usize;
            if leaves > (self.usable / 4).saturating_sub(2) {
                return None;
            }
            for i in 0..leaves {
                let leaf = be32(&p, 8 + 4 * i);
                if leaf == 0 || leaf > self.count {
                    return None;
                }
                free[leaf as usize] = true;
            }
            trunk = be32(&p, 0);
        }
        Some(free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_a_known_sqlite_wal_header() {
        // Header of a WAL written by SQLite 3.x on a little-endian machine.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
            .unwrap();
        let wal = File::open(dir.path().join("t.db-wal")).unwrap();
        let scan = read_wal(&wal, Some(4096)).expect("wal reads");
        assert_eq!(scan.page_size, 4096);
        assert!(scan.committed.contains_key(&2), "{scan:?}");
        assert_eq!(scan.db_pages, 2);
        assert_eq!(scan.tail_commits, 0);
        drop(conn);
    }
}
