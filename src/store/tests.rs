use super::*;
use std::fs;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open_or_create(dir.path().join("artifacts")).unwrap();
    (dir, s)
}

fn gc(s: &Store, roots: &[Root], dry_run: bool) -> Result<GcReport, GcError> {
    let roots = roots.to_vec();
    s.gc(move |_| Ok(RootSet::from(roots)), dry_run, || {})
}

fn bar() -> indicatif::ProgressBar {
    indicatif::ProgressBar::hidden()
}

#[test]
fn bytes_roundtrip_and_objects_are_readonly() {
    let (_d, s) = store();
    let d = s.put_bytes(b"hello").unwrap();
    assert_eq!(d, Digest::of(b"hello"));
    assert_eq!(s.read_bytes(&d).unwrap(), b"hello");
    let meta = fs::metadata(s.object_path(&d)).unwrap();
    assert!(meta.permissions().readonly());
    // Idempotent.
    assert_eq!(s.put_bytes(b"hello").unwrap(), d);
}

#[test]
fn dir_roundtrip_via_checkout() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("a.txt"), "alpha").unwrap();
    fs::write(src.join("sub/b.txt"), "beta").unwrap();
    fs::write(src.join("sub/deeper/c.bin"), [0u8, 1, 2, 255]).unwrap();
    let a = s.put_dir(&src).unwrap();
    assert_eq!(a.kind, ArtifactKind::Tree);
    assert_eq!(a.size, 5 + 4 + 4);
    assert_eq!(Store::digest_dir(&src).unwrap(), a);
    for mode in [LinkMode::Copy, LinkMode::Hardlink, LinkMode::Auto] {
        let out = d.path().join(format!("out-{mode:?}"));
        s.checkout(&a, &out, mode).unwrap();
        assert_eq!(
            fs::read(out.join("sub/deeper/c.bin")).unwrap(),
            [0u8, 1, 2, 255]
        );
        assert_eq!(Store::digest_dir(&out).unwrap(), a);
    }
    // The tree lists paths sorted, '/'-separated.
    let tree = s.read_tree(&a.digest).unwrap();
    let paths: Vec<_> = tree.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a.txt", "sub/b.txt", "sub/deeper/c.bin"]);
    assert!(matches!(
        s.checkout(&a, &d.path().join("out-Copy"), LinkMode::Copy),
        Err(StoreError::DestinationExists { .. })
    ));
}

#[test]
fn corrupt_object_is_detected() {
    let (_d, s) = store();
    let d = s.put_bytes(b"precious").unwrap();
    let p = s.object_path(&d);
    crate::fs::set_writable(&p).unwrap();
    fs::write(&p, b"tampered").unwrap();
    assert!(matches!(s.read_bytes(&d), Err(StoreError::Corrupt { .. })));
    assert!(matches!(
        s.verify_object(&d),
        Err(StoreError::Corrupt { .. })
    ));
    let roots = [Root {
        artifact: ArtifactRef {
            kind: ArtifactKind::Blob,
            digest: d,
            size: 8,
        },
        origin: "test".into(),
    }];
    let r = s.fsck(&RootSet::from(roots.to_vec()), &bar()).unwrap();
    assert_eq!(r.corrupt.len(), 1);
    assert!(!r.is_clean());
}

#[test]
fn stat_cache_skips_rehash_and_notices_changes() {
    let (d, s) = store();
    let f = d.path().join("data.txt");
    fs::write(&f, "one").unwrap();
    let a = s.put_file(&f).unwrap();
    assert_eq!(a.digest, Digest::of(b"one"));
    // The cache entry is keyed by path and stat; poison its digest to prove a hit skips hashing.
    let cache_file = s.statcache_path(&std::path::absolute(&f).unwrap());
    let mut entry: serde_json::Value =
        serde_json::from_slice(&fs::read(&cache_file).unwrap()).unwrap();
    let other = s.put_bytes(b"other").unwrap();
    entry["digest"] = serde_json::json!(other.to_string());
    // The entry was made right after the file was written, so it is racy and not trusted yet; date
    // it 10 s later, as if the digest had been cached after the file had settled.
    entry["cached_at_ns"] =
        serde_json::json!(entry["cached_at_ns"].as_i64().unwrap() + 10_000_000_000);
    fs::write(&cache_file, serde_json::to_vec(&entry).unwrap()).unwrap();
    assert_eq!(
        s.put_file(&f).unwrap().digest,
        other,
        "cache hit must not re-hash"
    );
    // Changing the file changes its stat, so the cache is bypassed.
    std::thread::sleep(std::time::Duration::from_millis(5));
    fs::write(&f, "two").unwrap();
    assert_eq!(s.put_file(&f).unwrap().digest, Digest::of(b"two"));
}

#[test]
fn newer_format_is_refused() {
    let (d, _s) = store();
    let root = d.path().join("artifacts");
    fs::write(root.join("FORMAT"), r#"{"store_format":99}"#).unwrap();
    let err = Store::open(&root).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerFormat { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("FORMAT"));
}

#[test]
fn gc_removes_only_unreachable() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("keep.txt"), "keep").unwrap();
    let kept = s.put_dir(&src).unwrap();
    let orphan = s.put_bytes(b"orphan").unwrap();
    fs::write(s.tmp_dir().join("leftover"), "x").unwrap();
    let roots = [Root {
        artifact: kept.clone(),
        origin: "test".into(),
    }];
    let dry = gc(&s, &roots, true).unwrap();
    assert_eq!(dry.removed_objects.len(), 1);
    assert!(s.has(&orphan));
    let r = gc(&s, &roots, false).unwrap();
    assert_eq!(r.removed_objects, vec![(orphan, 6)]);
    assert_eq!(r.removed_temp_files, 1);
    assert!(!s.has(&orphan));
    assert!(s.has(&kept.digest));
    let f = s.fsck(&RootSet::from(roots.to_vec()), &bar()).unwrap();
    assert!(f.is_clean() && f.orphaned.is_empty(), "{f:?}");
}

#[test]
fn bad_tree_manifests_are_rejected() {
    for bad in [
        r#"{"fuselab_tree":1,"entries":[{"path":"../x","digest":"0000000000000000000000000000000000000000000000000000000000000000","size":1}]}"#,
        r#"{"fuselab_tree":1,"entries":[{"path":"b","digest":"0000000000000000000000000000000000000000000000000000000000000000","size":1},{"path":"a","digest":"0000000000000000000000000000000000000000000000000000000000000000","size":1}]}"#,
        r#"{"fuselab_tree":7,"entries":[]}"#,
    ] {
        assert!(Tree::from_bytes(bad.as_bytes()).is_err(), "{bad}");
    }
}

#[test]
fn prefixes_resolve() {
    let (_d, s) = store();
    let d = s.put_bytes(b"abc").unwrap();
    assert_eq!(s.resolve_prefix(&d.to_string()[..8]).unwrap(), d);
    assert!(matches!(
        s.resolve_prefix("zz"),
        Err(StoreError::BadDigest { .. })
    ));
}

#[test]
fn link_ingest_shares_the_inode_and_protects_it() {
    use std::os::unix::fs::MetadataExt;
    let (d, s) = store();
    let f = d.path().join("big.bin");
    fs::write(&f, vec![7u8; 100_000]).unwrap();
    let a = s.put_file_with(&f, Ingest::Link).unwrap();
    let obj = s.object_path(&a.digest);
    assert_eq!(
        fs::metadata(&f).unwrap().ino(),
        fs::metadata(&obj).unwrap().ino()
    );
    assert!(fs::metadata(&f).unwrap().permissions().readonly());
    s.verify_object(&a.digest).unwrap();
    // The stat cache was refreshed after linking changed the ctime: a second add is a pure hit.
    let cache: serde_json::Value = serde_json::from_slice(
        &fs::read(s.statcache_path(&std::path::absolute(&f).unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cache["stat"]["ctime_ns"].as_i64().map(i128::from),
        Some(crate::fs::StatKey::of(&fs::metadata(&f).unwrap()).ctime_ns)
    );
}

/// Finding 11 (git's "racy clean"): a file rewritten with the same size within one timestamp tick of
/// being hashed keeps its stat. This machine's filesystems stamp files finely enough that a real
/// rewrite always changes the stat, so the coarse tick is simulated: the cache entry made for the old
/// content is given the stat the rewritten file has, exactly what a coarse clock would have left.
#[test]
fn stat_cache_does_not_trust_a_file_rewritten_within_the_same_tick() {
    let (d, s) = store();
    let f = d.path().join("racy.txt");
    fs::write(&f, "aaaa").unwrap();
    assert_eq!(s.put_file(&f).unwrap().digest, Digest::of(b"aaaa"));
    fs::write(&f, "bbbb").unwrap();
    let cache_file = s.statcache_path(&std::path::absolute(&f).unwrap());
    let mut entry: serde_json::Value =
        serde_json::from_slice(&fs::read(&cache_file).unwrap()).unwrap();
    let now = crate::fs::StatKey::of(&fs::metadata(&f).unwrap());
    entry["stat"] = serde_json::to_value(&now).unwrap();
    fs::write(&cache_file, serde_json::to_vec(&entry).unwrap()).unwrap();
    assert_eq!(
        s.put_file(&f).unwrap().digest,
        Digest::of(b"bbbb"),
        "an entry cached within the racy window of the file's last change was trusted"
    );
    // Once the file has settled (entry dated well after its last change), the cache is used again.
    let mut entry: serde_json::Value =
        serde_json::from_slice(&fs::read(&cache_file).unwrap()).unwrap();
    let poison = s.put_bytes(b"poison").unwrap();
    entry["digest"] = serde_json::json!(poison.to_string());
    entry["cached_at_ns"] =
        serde_json::json!(now.mtime_ns.max(now.ctime_ns) as i64 + 3_000_000_000);
    fs::write(&cache_file, serde_json::to_vec(&entry).unwrap()).unwrap();
    assert_eq!(s.put_file(&f).unwrap().digest, poison);
}
