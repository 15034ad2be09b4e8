use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Encoder(#[from] fedmicse_encoder::EncoderError),
    #[error(transparent)]
    Runtime(#[from] fedmicse_runtime::RuntimeError),
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;
