use std::path::PathBuf;

/// Everything that can go wrong while loading, saving or running an encoder.
/// Messages say what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    MissingFile(String),
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: not a BERT checkpoint: model_type is {found:?}, expected \"bert\"")]
    NotBert { path: PathBuf, found: String },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("checkpoint lacks {} tensor(s) the model needs: {}", .0.len(), preview(.0))]
    MissingTensors(Vec<String>),
    #[error("checkpoint has {} tensor(s) that are not part of a BERT model: {}", .0.len(), preview(.0))]
    UnknownTensors(Vec<String>),
    #[error("{path}: cannot read weights: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("device: {0}")]
    Device(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Tensors(#[from] fedmicse_tensors::TensorError),
    #[error("tensor read-back failed: {0}")]
    Backend(String),
}

fn preview(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … ({} more)", names.len() - SHOWN));
    }
    s
}

pub type Result<T> = std::result::Result<T, EncoderError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EncoderError {
    let path = path.into();
    move |source| EncoderError::Io { path, source }
}
