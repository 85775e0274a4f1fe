//! One error type for the crate. Every message is one line that starts with the file it is about,
//! so that a batch log or a CLI user can act on it without a backtrace.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused: `action` says what we were doing ("open", "rename onto").
    #[error("{}: cannot {action}: {err}", path.display())]
    Io { path: PathBuf, action: &'static str, err: std::io::Error },

    /// The bytes are not a well-formed safetensors file (bad header, offsets, sizes).
    #[error("{}: not a safetensors file: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },

    /// A well-formed file whose content does not fit what was asked of it: an unknown key,
    /// a dtype we cannot compute with, a LoRA half without its partner.
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },

    /// `write` was asked not to replace an existing file.
    #[error("{}: already exists (pass --overwrite to replace it)", path.display())]
    Exists { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, action: &'static str, source: std::io::Error) -> Error {
        Error::Io { path: path.to_path_buf(), action, err: source }
    }

    pub(crate) fn malformed(path: &Path, reason: impl Into<String>) -> Error {
        Error::Malformed { path: path.to_path_buf(), reason: reason.into() }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Error {
        Error::Invalid { path: path.to_path_buf(), reason: reason.into() }
    }
}
