//! A cheap fingerprint of a large file, to notice that a file a model folder refers to (a 24 GB
//! base transformer it does not copy) was replaced or rewritten, without reading all of it.
//!
//! SHA-256 over the file's size, its first MiB (for a safetensors file: the header, which names
//! every tensor with its dtype, shape and offsets), 16 evenly spaced 64 KiB blocks and the last
//! 64 KiB: about 2 MiB read, by `pread`, so nothing stays mapped or resident. A file that keeps
//! its size and header but changes values only between the sampled blocks goes unnoticed; that
//! is the price of not hashing gigabytes at every load.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const HEAD: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const BLOCKS: u64 = 16;

/// A file's size and fingerprint, as a model folder records them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    pub size: u64,
    /// `sha256-sampled:` and the hex digest.
    pub fingerprint: String,
}

const SCHEME: &str = "sha256-sampled:";

impl FileStamp {
    pub fn of(path: &Path) -> Result<FileStamp> {
        let mut file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let size = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
        let mut hash = Sha256::new();
        hash.update(size.to_le_bytes());
        let mut ranges = vec![(0, HEAD.min(size))];
        for i in 1..=BLOCKS {
            let start = (size / (BLOCKS + 1)) * i;
            ranges.push((start, BLOCK.min(size - start)));
        }
        ranges.push((size.saturating_sub(BLOCK), BLOCK.min(size)));
        let mut buf = Vec::new();
        for (start, len) in ranges {
            buf.resize(len as usize, 0);
            file.seek(SeekFrom::Start(start)).and_then(|_| file.read_exact(&mut buf)).map_err(|e| Error::io(path, "read", e))?;
            hash.update(&buf);
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(FileStamp { size, fingerprint: format!("{SCHEME}{hex}") })
    }

    /// Errors unless `path` still has this size and fingerprint, saying which changed.
    pub fn check(&self, path: &Path) -> Result<()> {
        if !path.is_file() {
            return Err(Error::invalid(path, "is missing (the model folder refers to it; was it moved or deleted?)"));
        }
        let now = FileStamp::of(path)?;
        if now.size != self.size {
            return Err(Error::invalid(
                path,
                format!("is {} bytes, but the model folder recorded {}: the file was replaced", now.size, self.size),
            ));
        }
        if now.fingerprint != self.fingerprint {
            return Err(Error::invalid(path, "has changed since the model folder recorded it (its fingerprint differs)"));
        }
        Ok(())
    }
}
