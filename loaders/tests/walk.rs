//! Batch inputs: folder walking, extension matching, names that are not ASCII, shards.

use std::fs;
use std::path::{Path, PathBuf};

use loaders::walk::{collect_inputs, parse_shard, shard, Input};

fn touch(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"x").unwrap();
}

fn relatives(inputs: &[Input]) -> Vec<PathBuf> {
    inputs.iter().map(|i| i.relative.clone()).collect()
}

#[test]
fn folders_are_walked_recursively_and_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "sub/deep/e.png", "sub/f.JPG", "été 写真.png", "notes.txt", "README", ".hidden.png"]
    {
        touch(&root.join(name));
    }
    touch(&root.join(".cache/g.png")); // inside a hidden folder
    fs::create_dir_all(root.join("empty")).unwrap();
    let found = collect_inputs(std::slice::from_ref(&root)).unwrap();
    let want: Vec<PathBuf> =
        ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "sub/deep/e.png", "sub/f.JPG", "été 写真.png"].iter().map(PathBuf::from).collect();
    assert_eq!(relatives(&found), want);
    for input in &found {
        assert_eq!(input.path, root.join(&input.relative));
        assert!(input.path.is_file());
    }
}

#[test]
fn files_are_taken_as_given_and_missing_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x/photo.Jpg");
    let other = dir.path().join("notes.txt");
    touch(&file);
    touch(&other);
    let found = collect_inputs(&[file.clone(), other.clone()]).unwrap();
    assert_eq!(found, vec![Input { path: file, relative: "photo.Jpg".into() }, Input { path: other, relative: "notes.txt".into() }]);
    let missing = dir.path().join("nope.png");
    let msg = collect_inputs(std::slice::from_ref(&missing)).unwrap_err().to_string();
    assert!(msg.starts_with(&missing.display().to_string()), "{msg}");
}

#[cfg(unix)]
#[test]
fn non_utf8_names_survive_and_symlink_loops_are_not_followed() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    let odd = OsStr::from_bytes(b"caf\xe9.png"); // Latin-1, not UTF-8
    touch(&root.join(odd));
    touch(&root.join("sub/a.png"));
    std::os::unix::fs::symlink(&root, root.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(root.join("sub/a.png"), root.join("link.png")).unwrap();
    std::os::unix::fs::symlink(root.join("gone.png"), root.join("broken.png")).unwrap();
    let found = collect_inputs(std::slice::from_ref(&root)).unwrap();
    let want: Vec<PathBuf> = vec!["broken.png".into(), PathBuf::from(odd), "link.png".into(), "sub/a.png".into()];
    assert_eq!(relatives(&found), want);
    assert!(found[1].path.exists());
}

#[test]
fn shards_split_the_inputs_without_overlap() {
    let items: Vec<usize> = (0..11).collect();
    assert_eq!(shard(items.clone(), 1, 3), vec![0, 3, 6, 9]);
    assert_eq!(shard(items.clone(), 2, 3), vec![1, 4, 7, 10]);
    assert_eq!(shard(items.clone(), 3, 3), vec![2, 5, 8]);
    assert_eq!(shard(items.clone(), 1, 1), items);
    let mut all: Vec<usize> = (1..=4).flat_map(|i| shard(items.clone(), i, 4)).collect();
    all.sort();
    assert_eq!(all, items);
    assert_eq!(shard(vec![1, 2], 5, 5), Vec::<i32>::new());
}

#[test]
fn shard_specs_are_parsed_with_clear_errors() {
    assert_eq!(parse_shard("2/5").unwrap(), (2, 5));
    assert_eq!(parse_shard("1/1").unwrap(), (1, 1));
    assert_eq!(parse_shard(" 3 / 4 ").unwrap(), (3, 4));
    for (spec, says) in [
        ("2", "expected i/n"),
        ("0/5", "between 1 and 5"),
        ("6/5", "between 1 and 5"),
        ("1/0", "at least 1"),
        ("a/5", "`a`"),
        ("1/-2", "`-2`"),
    ] {
        let msg = parse_shard(spec).unwrap_err().to_string();
        assert!(msg.starts_with("--shard:") && msg.contains(says), "{spec}: {msg}");
    }
}
