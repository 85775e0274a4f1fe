//! Atomic file writes: the new content goes into a temp file beside the target, is fsynced, and
//! is renamed over the target, then the directory is fsynced. A crash or a full disk leaves
//! either the old file or the new one, never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Writes `path` with what `fill` writes. An existing `path` is an error unless `overwrite`.
pub fn write_atomic(path: &Path, overwrite: bool, fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>) -> Result<()> {
    if !overwrite && path.exists() {
        return Err(Error::Exists { path: path.to_path_buf() });
    }
    let temp = TempFile::create(path)?;
    let mut out = BufWriter::with_capacity(1 << 20, &temp.file);
    let written = fill(&mut out).and_then(|()| out.flush());
    drop(out);
    written.map_err(|e| Error::io(&temp.path, "write", e))?;
    temp.file.sync_all().map_err(|e| Error::io(&temp.path, "fsync", e))?;
    temp.persist(path)
}

/// Copies `src` to `dst` the same way (temp file, fsync, rename), streaming, calling
/// `progress(bytes copied so far)` along the way.
pub fn copy_atomic(src: &Path, dst: &Path, overwrite: bool, mut progress: impl FnMut(u64)) -> Result<()> {
    let mut from = File::open(src).map_err(|e| Error::io(src, "open", e))?;
    let mut read_failed = None;
    write_atomic(dst, overwrite, |out| {
        let mut buf = vec![0u8; 8 << 20];
        let mut done = 0u64;
        loop {
            let n = match std::io::Read::read(&mut from, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    read_failed = Some(e.to_string());
                    return Err(e);
                }
            };
            out.write_all(&buf[..n])?;
            done += n as u64;
            progress(done);
        }
    })
    .map_err(|e| match read_failed {
        Some(why) => Error::invalid(src, format!("cannot read: {why}")),
        None => e,
    })
}

/// A temp file beside the target, removed unless `persist` renames it into place.
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    fn create(target: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().ok_or_else(|| Error::invalid(target, "not a file name"))?.to_string_lossy();
        let unique = format!(".{name}.{}.{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = target.with_file_name(unique);
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| Error::io(target, "create its temp file", e))?;
        Ok(TempFile { path, file, persisted: false })
    }

    fn persist(mut self, target: &Path) -> Result<()> {
        fs::rename(&self.path, target).map_err(|e| Error::io(target, "rename a temp file onto", e))?;
        self.persisted = true;
        // The rename is durable only once the directory entry is on disk.
        #[cfg(unix)]
        {
            let dir = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, "fsync the directory", e))?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the error that brought us here is the one worth reporting.
            let _ = fs::remove_file(&self.path);
        }
    }
}
