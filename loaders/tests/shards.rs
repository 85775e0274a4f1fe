//! Sharded checkpoints (diffusers' and transformers' `*.safetensors.index.json`) and the
//! fingerprints model folders keep of their base files, on files built by hand.

mod common;

use common::{f32_file, iota, message, write_file};
use loaders::fingerprint::FileStamp;
use loaders::shards::TensorFiles;
use std::path::Path;

/// Two shards and their index in `dir`: `a` and `b` in the first, `c` in the second.
fn sharded(dir: &Path) -> std::path::PathBuf {
    write_file(dir, "model-00001-of-00002.safetensors", &f32_file(&[("a", &[2], &[1.0, 2.0]), ("b", &[1], &[3.0])], &[]));
    write_file(dir, "model-00002-of-00002.safetensors", &f32_file(&[("c", &[3], &iota(3, 10.0))], &[]));
    let index = r#"{"metadata": {"total_size": 24}, "weight_map": {"a": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}"#;
    write_file(dir, "model.safetensors.index.json", index.as_bytes())
}

#[test]
fn shards_read_as_one_set_from_the_index_or_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let index = sharded(dir.path());
    for opened in [TensorFiles::open(&index).unwrap(), TensorFiles::open(dir.path()).unwrap()] {
        assert_eq!(opened.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(opened.files().len(), 2);
        assert!(opened.files()[0].path().ends_with("model-00001-of-00002.safetensors"));
        assert_eq!(opened.read("c").unwrap().to_f32(), iota(3, 10.0));
        assert_eq!(opened.read("b").unwrap().to_f32(), [3.0]);
        assert_eq!(opened.info("a").unwrap().shape, [2]);
    }
    let one = TensorFiles::open(&dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!((one.len(), one.files().len()), (1, 1));
    assert!(message(one.read("a"), one.path().to_str().unwrap()).contains("no tensor named 'a'"));
}

#[test]
fn an_index_that_disagrees_with_its_shards_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let index = sharded(dir.path());
    let p = index.to_str().unwrap();
    let rewrite = |text: &str| std::fs::write(&index, text).unwrap();
    rewrite(
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "gone.safetensors"}}"#,
    );
    let m = message(TensorFiles::open(&index), p);
    assert!(m.contains("shard 'gone.safetensors' is missing") && m.contains("1 tensors are listed in it"), "{m}");
    rewrite(
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
    );
    assert!(
        message(TensorFiles::open(&index), p).contains("'c' is listed in shard 'model-00001-of-00002.safetensors', which does not hold it")
    );
    rewrite(r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#);
    assert!(message(TensorFiles::open(&index), p).contains("holds 'b', which the index does not list there"));
    rewrite(r#"{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}"#);
    assert!(message(TensorFiles::open(&index), p).contains("not a file name in the index's folder"));
    rewrite(r#"{"weight_map": {"a": "x", "a": "y"}}"#);
    assert!(message(TensorFiles::open(&index), p).contains("duplicate key 'a'"));
    rewrite("[]");
    assert!(message(TensorFiles::open(&index), p).contains("not a sharded-checkpoint index"));
}

#[test]
fn folders_resolve_to_one_checkpoint_or_say_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(message(TensorFiles::open(dir.path()), d).contains("holds no *.safetensors"));
    write_file(dir.path(), "x.safetensors", &f32_file(&[("x", &[1], &[1.0])], &[]));
    assert_eq!(TensorFiles::open(dir.path()).unwrap().names().collect::<Vec<_>>(), ["x"]);
    write_file(dir.path(), "y.safetensors", &f32_file(&[("x", &[1], &[2.0])], &[]));
    assert!(message(TensorFiles::open(dir.path()), d).contains("several *.safetensors files (x.safetensors, y.safetensors)"));
    // A name in two files read as one set.
    let files = [dir.path().join("x.safetensors"), dir.path().join("y.safetensors")];
    let m = message(TensorFiles::from_files(Path::new("set"), &files), "set");
    assert!(m.contains("tensor 'x' is in both") && m.contains("y.safetensors"), "{m}");
    write_file(dir.path(), "model_index.json", b"{}");
    assert!(message(TensorFiles::open(dir.path()), d).contains("is a diffusers pipeline folder"));
}

#[test]
fn a_fingerprint_notices_a_replaced_or_changed_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let path = write_file(dir.path(), "big.bin", &bytes);
    let stamp = FileStamp::of(&path).unwrap();
    assert_eq!(stamp.size, 3_000_000);
    assert!(stamp.fingerprint.starts_with("sha256-sampled:") && stamp.fingerprint.len() == 15 + 64);
    stamp.check(&path).unwrap();
    let p = path.to_str().unwrap();
    // A byte in the header (first MiB) or in the last block changes it; the size alone says replaced.
    for at in [10usize, 2_999_999] {
        let mut changed = bytes.clone();
        changed[at] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        assert!(message(stamp.check(&path), p).contains("has changed since the model folder recorded it"), "byte {at}");
    }
    std::fs::write(&path, &bytes[1..]).unwrap();
    assert!(message(stamp.check(&path), p).contains("is 2999999 bytes, but the model folder recorded 3000000"));
    std::fs::remove_file(&path).unwrap();
    assert!(message(stamp.check(&path), p).contains("is missing"));
    // Files shorter than the sampled blocks are hashed whole.
    let small = write_file(dir.path(), "small.bin", b"abc");
    assert_ne!(FileStamp::of(&small).unwrap(), FileStamp::of(&write_file(dir.path(), "small2.bin", b"abd")).unwrap());
}
