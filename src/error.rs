//! The library's one error type. Each variant says whether the fault lies in what the user gave
//! (a file, a line, a field, an option: exit status 2 at the CLI) or elsewhere (exit status 1).
//! Messages are lowercase, name the place, and where possible say what to do.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in tailscope's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input at a place in a file: `path:line: message` (line is 1-based).
    #[error("{}:{line}: {message}", path.display())]
    AtLine {
        /// The file.
        path: PathBuf,
        /// The line, 1-based.
        line: usize,
        /// What is wrong there.
        message: String,
    },
    /// Bad input in a file as a whole, or in one of its fields: `path: message`.
    #[error("{}: {message}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A bad option or argument value: `--name: message`.
    #[error("{name}: {message}")]
    Invalid {
        /// The option, argument or field.
        name: String,
        /// What is wrong with its value.
        message: String,
    },
    /// An operating-system error while reading or writing `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A Parquet/DataFrame operation failed (not the user's input).
    #[error("table {context}: {source}")]
    Table {
        /// Which table.
        context: String,
        /// polars' error.
        #[source]
        source: polars::error::PolarsError,
    },
    /// A tokenizer operation failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A step of a pipeline spec failed.
    #[error("step `{step}` of {}", spec.display())]
    Step {
        /// The step (`train`, `ntk`, ...).
        step: String,
        /// The spec file.
        spec: PathBuf,
        /// What went wrong in it.
        #[source]
        source: Box<Error>,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Bad input at `path:line`.
    pub fn at_line(path: impl AsRef<Path>, line: usize, message: impl Into<String>) -> Self {
        Error::AtLine {
            path: path.as_ref().to_path_buf(),
            line,
            message: message.into(),
        }
    }

    /// Bad input in `path` as a whole, or in one of its fields.
    pub fn in_file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::InFile {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A bad option or argument `name`.
    pub fn invalid(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            name: name.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A DataFrame operation failed.
    pub fn table(context: impl Into<String>, source: polars::error::PolarsError) -> Self {
        Error::Table {
            context: context.into(),
            source,
        }
    }

    /// True when the user can fix this by changing their input or options (CLI exit status 2).
    /// A missing or unreadable input file counts as bad input.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::AtLine { .. } | Error::InFile { .. } | Error::Invalid { .. } => true,
            Error::Step { source, .. } => source.is_bad_input(),
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::InvalidData
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::NotADirectory
            ),
            _ => false,
        }
    }
}
