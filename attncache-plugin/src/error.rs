//! Errors of the AttnCache library.

/// Everything that can go wrong in the library, as values.
#[derive(Debug, thiserror::Error)]
pub enum AttnCacheError {
    /// A setting had a value outside its range.
    #[error("invalid value {value:?} for {name}: expected {expected}")]
    InvalidSetting {
        /// The setting's name, as on the command line.
        name: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A projector directory that cannot be used.
    #[error("projector {path}: {reason}")]
    Projector {
        /// The directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// An [`AttnCacheError::InvalidSetting`] for `name`.
pub(crate) fn bad(
    name: &'static str,
    value: String,
    expected: &'static str,
) -> Result<(), AttnCacheError> {
    Err(AttnCacheError::InvalidSetting {
        name,
        value,
        expected,
    })
}
