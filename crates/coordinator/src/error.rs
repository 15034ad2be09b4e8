//! The coordinator's errors. Their messages are what operators read (in logs and when the
//! daemon refuses to start), so each names the file or setting at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedmicse_runtime::RuntimeError;
use fedmicse_tensors::TensorError;

/// Reading or writing the durable state: checkpoints, the round log, `state.json`, stored
/// updates.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// A file does not hold what it should (a stored update's metadata, a digest).
    #[error("{0}")]
    Invalid(String),
    /// The state directory is damaged: what is wrong, and the way back.
    #[error("{0}")]
    Damaged(String),
}

impl StoreError {
    /// Wraps an IO error with the path it concerns.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Why a coordinator cannot start, serve or commit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unworkable.
    #[error("{0}")]
    Config(String),
    #[error("model {}: {source}", path.display())]
    Model {
        path: PathBuf,
        #[source]
        source: RuntimeError,
    },
    #[error("eval.dev_file: {0}")]
    DevFile(String),
    #[error("task.trainable {0:?} matches no tensor of the model")]
    Trainable(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tensors(#[from] TensorError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Listen(#[source] std::io::Error),
    #[error("HTTP listen {0}: {1}")]
    HttpListen(SocketAddr, #[source] std::io::Error),
    #[error("{0}")]
    Tls(String),
}
