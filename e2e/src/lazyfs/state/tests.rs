use std::ffi::OsStr;

use super::*;

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn reload(s: &State) -> State {
    State::load(&s.backing).unwrap()
}

fn content(s: &State, file: &str) -> Option<Vec<u8>> {
    let a = s.lookup(ROOT, name(file)).ok()?;
    Some(s.read(a.ino, 0, u32::MAX).unwrap().to_vec())
}

#[test]
fn unsynced_writes_and_names_are_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let a = s.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
    s.write(a.ino, 0, b"hello").unwrap();
    assert_eq!(content(&s, "a").unwrap(), b"hello");
    assert_eq!(s.unsynced_pages(), 1);
    let s = reload(&s);
    assert_eq!(content(&s, "a"), None, "name never synced");
}

#[test]
fn file_sync_keeps_data_only_once_its_name_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let a = s.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
    s.write(a.ino, 0, b"one").unwrap();
    s.sync_file(a.ino).unwrap();
    assert_eq!(content(&reload(&s), "a"), None, "data synced, name not");
    s.sync_dir(ROOT).unwrap();
    s.write(a.ino, 3, b" two").unwrap();
    let r = reload(&s);
    assert_eq!(
        content(&r, "a").unwrap(),
        b"one",
        "second write never synced"
    );
    s.sync_file(a.ino).unwrap();
    assert_eq!(content(&reload(&s), "a").unwrap(), b"one two");
}

#[test]
fn name_synced_before_data_comes_back_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let a = s.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
    s.sync_dir(ROOT).unwrap();
    s.write(a.ino, 0, b"x").unwrap();
    assert_eq!(content(&reload(&s), "a").unwrap(), b"");
}

#[test]
fn truncation_is_durable_only_after_sync_and_old_bytes_never_return() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let a = s.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
    s.write(a.ino, 0, &vec![7u8; 10_000]).unwrap();
    s.sync_file(a.ino).unwrap();
    s.sync_dir(ROOT).unwrap();
    s.truncate(a.ino, 100).unwrap();
    assert_eq!(content(&reload(&s), "a").unwrap().len(), 10_000);
    // Grow again past the old end: the gap must read as zeros after a sync.
    s.write(a.ino, 12_000, b"end").unwrap();
    s.sync_file(a.ino).unwrap();
    let got = content(&reload(&s), "a").unwrap();
    assert_eq!(got.len(), 12_003);
    assert!(got[..100].iter().all(|&b| b == 7));
    assert!(
        got[100..12_000].iter().all(|&b| b == 0),
        "stale bytes came back"
    );
    assert_eq!(&got[12_000..], b"end");
}

#[test]
fn unlink_and_rename_need_a_directory_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let a = s.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
    s.write(a.ino, 0, b"A").unwrap();
    s.sync_file(a.ino).unwrap();
    s.sync_dir(ROOT).unwrap();
    s.remove(ROOT, name("a"), false).unwrap();
    assert_eq!(
        content(&reload(&s), "a").unwrap(),
        b"A",
        "unlink not synced"
    );
    s.sync_dir(ROOT).unwrap();
    assert_eq!(content(&reload(&s), "a"), None);

    let b = s.create(ROOT, name("b.tmp"), Kind::File, 0o644).unwrap();
    s.write(b.ino, 0, b"B").unwrap();
    s.sync_file(b.ino).unwrap();
    s.sync_dir(ROOT).unwrap();
    s.rename(ROOT, name("b.tmp"), ROOT, name("b"), false)
        .unwrap();
    let r = reload(&s);
    assert_eq!(
        (content(&r, "b.tmp").unwrap(), content(&r, "b")),
        (b"B".to_vec(), None)
    );
    s.sync_dir(ROOT).unwrap();
    let r = reload(&s);
    assert_eq!(
        (content(&r, "b.tmp"), content(&r, "b").unwrap()),
        (None, b"B".to_vec())
    );
}

#[test]
fn lost_inodes_are_not_reused_with_stale_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let a = s.create(ROOT, name("a"), Kind::File, 0o644).unwrap();
    s.write(a.ino, 0, b"stale").unwrap();
    s.sync_file(a.ino).unwrap();
    let mut r = reload(&s);
    let b = r.create(ROOT, name("b"), Kind::File, 0o644).unwrap();
    assert_ne!(a.ino, b.ino);
    assert_eq!(r.read(b.ino, 0, 100).unwrap(), b"");
    r.sync_file(b.ino).unwrap();
    r.sync_dir(ROOT).unwrap();
    assert_eq!(content(&reload(&r), "b").unwrap(), b"");
}

#[test]
fn directories_and_their_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::load(dir.path()).unwrap();
    let d = s.create(ROOT, name("d"), Kind::Dir, 0o755).unwrap();
    let f = s.create(d.ino, name("f"), Kind::File, 0o644).unwrap();
    s.write(f.ino, 0, b"F").unwrap();
    s.sync_file(f.ino).unwrap();
    s.sync_dir(d.ino).unwrap();
    assert!(
        reload(&s).lookup(ROOT, name("d")).is_err(),
        "d not synced in /"
    );
    s.sync_dir(ROOT).unwrap();
    let r = reload(&s);
    let d2 = r.lookup(ROOT, name("d")).unwrap();
    let f2 = r.lookup(d2.ino, name("f")).unwrap();
    assert_eq!(r.read(f2.ino, 0, 10).unwrap(), b"F");
    assert_eq!(s.remove(ROOT, name("d"), true), Err(Errno::ENOTEMPTY));
}
