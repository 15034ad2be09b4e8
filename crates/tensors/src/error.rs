use std::path::PathBuf;

/// What can go wrong reading or writing tensor files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

impl TensorError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TensorError + '_ {
        move |source| TensorError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: &std::path::Path, message: impl Into<String>) -> TensorError {
        TensorError::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TensorError>;
