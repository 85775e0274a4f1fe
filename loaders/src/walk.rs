//! The inputs of a batch: files taken as given, folders walked recursively for images, and the
//! `--shard i/n` split that lets many machines share one folder without coordinating.
//!
//! Paths stay `OsStr` from end to end, never lossy strings, so non-ASCII and (on Unix) non-UTF-8
//! names come through intact. Inside a folder, files are matched by extension (png, jpg, jpeg,
//! webp, any case); hidden entries (a name starting with `.`) and other files are skipped
//! without a word. Symbolic links are followed, except into a folder that is already being
//! walked above them (a loop). A link whose target is missing is kept if its name is an image's,
//! so that the batch reports it by name.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Extensions taken from folders, compared ASCII case-insensitively.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// One image to process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Where to read it.
    pub path: PathBuf,
    /// Where it sits under the folder it was found in (its file name if given as a file), so
    /// that the output tree can mirror the input tree.
    pub relative: PathBuf,
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_name(path: &Path) -> bool {
    path.extension().and_then(OsStr::to_str).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The images named by `inputs`, in order: each file as given, each folder's images sorted by
/// their relative path. A missing or unreadable input or subfolder is an error naming it.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<Input>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| Error::io(input, "open the input", e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            let mut ancestors = HashSet::new();
            walk(input, Path::new(""), &mut ancestors, &mut found)?;
            found.sort_by(|a, b| a.relative.cmp(&b.relative));
            out.extend(found);
        } else {
            let name = input.file_name().ok_or_else(|| Error::invalid(input, "not a file name"))?;
            out.push(Input { path: input.clone(), relative: PathBuf::from(name) });
        }
    }
    Ok(out)
}

/// Adds the images under `dir` (at `relative` below the walk's root) to `found`. `ancestors`
/// holds the canonical paths of the folders being walked, to stop at a symlink loop.
fn walk(dir: &Path, relative: &Path, ancestors: &mut HashSet<PathBuf>, found: &mut Vec<Input>) -> Result<()> {
    let canonical = fs::canonicalize(dir).map_err(|e| Error::io(dir, "resolve the folder", e))?;
    if !ancestors.insert(canonical.clone()) {
        return Ok(()); // a link back into a folder being walked: a loop
    }
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, "list the folder", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "list the folder", e))?;
        let name = entry.file_name();
        if is_hidden(&name) {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, "stat", e))?;
        let is_dir = if kind.is_symlink() { fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false) } else { kind.is_dir() };
        if is_dir {
            walk(&path, &relative.join(&name), ancestors, found)?;
        } else if is_image_name(&path) {
            found.push(Input { relative: relative.join(&name), path });
        }
    }
    ancestors.remove(&canonical);
    Ok(())
}

/// Every `n`-th item starting at the `i`-th (1-based, `1 <= i <= n`), as `--shard i/n` asks:
/// the shards `1/n` to `n/n` split the items with no overlap and nothing left out.
pub fn shard<T>(items: Vec<T>, i: usize, n: usize) -> Vec<T> {
    assert!(n >= 1 && (1..=n).contains(&i), "shard {i}/{n}: need 1 <= i <= n");
    items.into_iter().skip(i - 1).step_by(n).collect()
}

/// Parses `--shard i/n` ("2/5") into `(i, n)` with `1 <= i <= n`.
pub fn parse_shard(spec: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| Error::invalid(Path::new("--shard"), format!("`{spec}`: {why}"));
    let (i, n) = spec.split_once('/').ok_or_else(|| bad("expected i/n, such as 2/5"))?;
    let num = |s: &str, what: &str| s.trim().parse::<usize>().map_err(|_| bad(&format!("{what} `{s}` is not a whole number")));
    let (i, n) = (num(i, "i")?, num(n, "n")?);
    if n == 0 {
        return Err(bad("n must be at least 1"));
    }
    if i == 0 || i > n {
        return Err(bad(&format!("i must be between 1 and {n} (shards are numbered from 1)")));
    }
    Ok((i, n))
}
