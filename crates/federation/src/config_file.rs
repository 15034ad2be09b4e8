//! Reading the TOML configuration files (coordinator, agent, simulation) one way: unknown
//! keys and malformed values are refused with the file's name, and relative paths inside a
//! file are relative to the file, not to wherever the daemon was started.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: &Path, message: impl std::fmt::Display) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// Parses the TOML file at `path` into `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, e))?;
    toml::from_str(&text).map_err(|e| ConfigError::new(path, e))
}

/// The folder relative paths of the file at `path` are taken from.
pub fn base_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Makes `p` relative to `base` when it is relative.
pub fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        file: PathBuf,
    }

    #[test]
    fn errors_name_the_file_and_paths_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "file = \"data.txt\"\n").unwrap();
        let mut s: Sample = load_toml(&p).unwrap();
        resolve(base_of(&p), &mut s.file);
        assert_eq!(s.file, dir.path().join("data.txt"));
        let mut abs = PathBuf::from("/etc/x");
        resolve(base_of(&p), &mut abs);
        assert_eq!(abs, PathBuf::from("/etc/x"));

        std::fs::write(&p, "file = \"x\"\ncolour = 3\n").unwrap();
        let e = load_toml::<Sample>(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&p.display().to_string()) && e.contains("colour"),
            "{e}"
        );
        let e = load_toml::<Sample>(&dir.path().join("none.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.toml"), "{e}");
    }
}
