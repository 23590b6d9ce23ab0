//! Rows out of the table b-trees of a damaged file, in the manner of SQLite's
//! `.recover`: walk each table from its root, take every cell that decodes,
//! and mark the key range of every page that does not as damaged; then scan
//! the pages no tree reached (their parent was lost) for leaf cells whose key
//! falls in a damaged range. Pages on a sound freelist are never read as
//! rows (they hold events already delivered).
//!
//! The buffer's own schema is known, so a row is recognised by its shape as
//! well as by the tree it sits in: `events(NULL, text uuid, text topic, blob
//! key, blob payload, int captured_at_ms, ...)` and `dead_letters(NULL, text,
//! text, blob, blob, int, text reason, int failed_at_ms, [int dlq_delivered])`.

use super::pages::{Pages, be32};

const LEAF: u8 = 0x0D;
const INTERIOR: u8 = 0x05;

/// A column value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Int(i64),
    Real,
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

/// Which buffer table a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Events,
    DeadLetters,
    /// `sqlite_schema`, `sqlite_sequence`, `meta`: any record is a row.
    Other,
}

/// A key range `(lo, hi]` of a table whose page could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Damage {
    pub table: Table,
    pub lo: Option<i64>,
    pub hi: Option<i64>,
    /// Rows later found for this range among orphan pages.
    pub found: u64,
}

/// Reads one SQLite varint at `at`: `(value, length)`.
fn varint(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for i in 0..9 {
        let byte = *b.get(at + i)?;
        if i == 8 {
            return Some(((v << 8) | byte as u64, 9));
        }
        v = (v << 7) | (byte & 0x7f) as u64;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Decodes a record; `None` unless its header and body account for every byte.
pub(super) fn record(p: &[u8]) -> Option<Vec<Value>> {
    let (header_len, mut at) = varint(p, 0)?;
    let header_len = usize::try_from(header_len).ok()?;
    if header_len > p.len() || header_len < at {
        return None;
    }
    let mut types = Vec::new();
    while at < header_len {
        let (t, n) = varint(p, at)?;
        types.push(t);
        at += n;
    }
    if at != header_len {
        return None;
    }
    let mut body = header_len;
    let mut out = Vec::with_capacity(types.len());
    for t in types {
        let len = match t {
            0 | 8 | 9 => 0,
            1..=4 => t as usize,
            5 => 6,
            6 | 7 => 8,
            10 | 11 => return None,
            n => ((n - 12) / 2) as usize,
        };
        let bytes = p.get(body..body.checked_add(len)?)?;
        body += len;
        out.push(match t {
            0 => Value::Null,
            8 => Value::Int(0),
            9 => Value::Int(1),
            1..=6 => {
                let mut v: i64 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
                for &b in bytes {
                    v = (v << 8) | b as i64;
                }
                Value::Int(v)
            }
            7 => Value::Real,
            n if n % 2 == 0 => Value::Blob(bytes.to_vec()),
            _ => Value::Text(bytes.to_vec()),
        });
    }
    (body == p.len()).then_some(out)
}

/// The table a row's shape belongs to, if any.
pub(super) fn shape(v: &[Value]) -> Option<Table> {
    let base = v.len() >= 6
        && v[0] == Value::Null
        && matches!(v[1], Value::Text(_))
        && matches!(v[2], Value::Text(_))
        && matches!(v[3], Value::Blob(_))
        && matches!(v[4], Value::Blob(_))
        && matches!(v[5], Value::Int(_));
    if !base {
        return None;
    }
    if v.len() >= 8 && matches!(v[6], Value::Text(_)) && matches!(v[7], Value::Int(_)) {
        Some(Table::DeadLetters)
    } else {
        Some(Table::Events)
    }
}

/// One leaf cell: `(rowid, record)`, or `Err(())` when it cannot be read.
type Cell = Result<(i64, Vec<Value>), ()>;

/// A sound b-tree page: its type, cell offsets and right-most child.
struct PageView {
    kind: u8,
    cells: Vec<usize>,
    right: u32,
}

fn view(pages: &Pages, n: u32, p: &[u8]) -> Option<PageView> {
    let base = if n == 1 { 100 } else { 0 };
    let kind = *p.get(base)?;
    let header = match kind {
        LEAF => 8,
        INTERIOR => 12,
        _ => return None,
    };
    let count = u16::from_be_bytes([p[base + 3], p[base + 4]]) as usize;
    let first = base + header + 2 * count;
    if first > pages.usable() {
        return None;
    }
    let mut cells = Vec::with_capacity(count);
    for i in 0..count {
        let at = base + header + 2 * i;
        let off = u16::from_be_bytes([p[at], p[at + 1]]) as usize;
        if off < first || off >= pages.usable() {
            return None;
        }
        cells.push(off);
    }
    let right = if kind == INTERIOR {
        be32(p, base + 8)
    } else {
        0
    };
    if kind == INTERIOR && right == 0 {
        return None;
    }
    Some(PageView { kind, cells, right })
}

/// Reads a table-leaf cell at `off`, following its overflow chain.
fn leaf_cell(pages: &Pages, p: &[u8], off: usize) -> Cell {
    let usable = pages.usable();
    let (len, a) = varint(p, off).ok_or(())?;
    let (rowid, b) = varint(p, off + a).ok_or(())?;
    let total = pages.count() as u64 * usable as u64;
    if len > total {
        return Err(());
    }
    let len = len as usize;
    let max_local = usable - 35;
    let min_local = ((usable - 12) * 32 / 255) - 23;
    let local = if len <= max_local {
        len
    } else {
        let k = min_local + (len - min_local) % (usable - 4);
        if k <= max_local { k } else { min_local }
    };
    let start = off + a + b;
    let mut payload = p.get(start..start + local).ok_or(())?.to_vec();
    if local < len {
        let mut next = be32(p.get(start + local..start + local + 4).ok_or(())?, 0);
        let mut hops = 0;
        while payload.len() < len {
            hops += 1;
            if next == 0 || next > pages.count() || hops > pages.count() {
                return Err(());
            }
            let o = pages.page(next).ok_or(())?;
            let take = (len - payload.len()).min(usable - 4);
            payload.extend_from_slice(&o[4..4 + take]);
            next = be32(&o, 0);
        }
        // The last page of a chain points nowhere: anything else means a page
        // of the chain was overwritten and the payload is not this row's.
        if next != 0 {
            return Err(());
        }
    }
    let values = record(&payload).ok_or(())?;
    Ok((rowid as i64, values))
}

/// Walks a b-tree from its root, keeping within `(lo, hi]`.
pub(super) struct Walk<'a> {
    pub pages: &'a Pages,
    /// Pages already reached by some tree.
    pub seen: &'a mut [bool],
    /// Ranges whose page could not be read.
    pub damage: &'a mut Vec<Damage>,
    /// Leaf cells that could not be read.
    pub bad_cells: u64,
    /// Leaf pages read.
    pub leaves: u64,
    /// Rows read from those leaves.
    pub rows: u64,
}

impl Walk<'_> {
    /// Visits every readable row of the tree at `root` in key order.
    pub fn table(
        &mut self,
        table: Table,
        root: u32,
        visit: &mut dyn FnMut(i64, Vec<Value>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        // Depth-first with an explicit stack: (page, lo, hi), right-most last.
        let mut stack = vec![(root, None, None)];
        while let Some((n, lo, hi)) = stack.pop() {
            let page = (n as usize) < self.seen.len() && !self.seen[n as usize];
            let page = if page { self.pages.page(n) } else { None };
            let Some(p) = page else {
                self.damage.push(Damage {
                    table,
                    lo,
                    hi,
                    found: 0,
                });
                continue;
            };
            self.seen[n as usize] = true;
            let Some(v) = view(self.pages, n, &p) else {
                self.damage.push(Damage {
                    table,
                    lo,
                    hi,
                    found: 0,
                });
                continue;
            };
            if v.kind == LEAF {
                self.leaves += 1;
                for off in v.cells {
                    match leaf_cell(self.pages, &p, off) {
                        Ok((rowid, values)) if fits(table, &values) => {
                            self.rows += 1;
                            visit(rowid, values)?;
                        }
                        _ => self.bad_cells += 1,
                    }
                }
                continue;
            }
            let mut children = Vec::with_capacity(v.cells.len() + 1);
            let mut prev = lo;
            let mut sound = true;
            for off in v.cells {
                let child = p.get(off..off + 4).map(|c| be32(c, 0)).unwrap_or(0);
                let key = varint(&p, off + 4).map(|(k, _)| k as i64);
                // A child past the end (a truncated file) is a lost range, not
                // a sign that this page is garbage; keys out of order are.
                let in_order = |k: i64| prev.is_none_or(|p| k > p) && hi.is_none_or(|h| k <= h);
                match key {
                    Some(k) if child != 0 && in_order(k) => {
                        children.push((child, prev, Some(k)));
                        prev = Some(k);
                    }
                    _ => {
                        sound = false;
                        break;
                    }
                }
            }
            if !sound {
                self.damage.push(Damage {
                    table,
                    lo,
                    hi,
                    found: 0,
                });
                continue;
            }
            children.push((v.right, prev, hi));
            stack.extend(children.into_iter().rev());
        }
        Ok(())
    }
}

/// Whether a record found in `table`'s tree is one of its rows. The tree is
/// trusted for the table; the shape only guards against garbage that decodes.
fn fits(table: Table, v: &[Value]) -> bool {
    match table {
        Table::Events => shape(v).is_some(),
        Table::DeadLetters => shape(v) == Some(Table::DeadLetters),
        Table::Other => true,
    }
}

/// Leaf cells of a page no tree reached, if it is a sound table leaf.
pub(super) fn orphan_cells(pages: &Pages, n: u32) -> Vec<Cell> {
    let Some(p) = pages.page(n) else {
        return Vec::new();
    };
    match view(pages, n, &p) {
        Some(v) if v.kind == LEAF => v
            .cells
            .into_iter()
            .map(|off| leaf_cell(pages, &p, off))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_as_sqlite_writes_them() {
        assert_eq!(varint(&[0x05], 0), Some((5, 1)));
        assert_eq!(varint(&[0x81, 0x00], 0), Some((128, 2)));
        assert_eq!(varint(&[0xff; 9], 0), Some((u64::MAX, 9)));
        assert_eq!(varint(&[0x81], 0), None);
    }

    #[test]
    fn records_must_account_for_every_byte() {
        // header 3 bytes: len, int8, text of 2 bytes (serial 17).
        let good = [3, 1, 17, 0xff, b'h', b'i'];
        assert_eq!(
            record(&good),
            Some(vec![Value::Int(-1), Value::Text(b"hi".to_vec())])
        );
        assert_eq!(record(&good[..5]), None);
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(record(&long), None);
    }
}
