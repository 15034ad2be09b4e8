#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Encoder(#[from] fedmicse_encoder::EncoderError),
    /// Files that cannot be read or written ([`RuntimeError::Io`]) among the rest.
    ///
    /// [`RuntimeError::Io`]: fedmicse_runtime::RuntimeError::Io
    #[error(transparent)]
    Runtime(#[from] fedmicse_runtime::RuntimeError),
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;
