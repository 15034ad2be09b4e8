//! The revocation list: client ids and certificate serials that may no longer connect,
//! re-read whenever the file changes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

#[derive(Default)]
struct Loaded {
    ids: HashSet<String>,
    serials: HashSet<String>,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
}

pub struct Revocations {
    path: Option<PathBuf>,
    loaded: std::sync::Mutex<Loaded>,
}

/// Parses the list: a client id or `serial:HEX` per line, '#' starts a comment.
pub fn parse(text: &str) -> (HashSet<String>, HashSet<String>) {
    let (mut ids, mut serials) = (HashSet::new(), HashSet::new());
    for line in text.lines() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match entry.strip_prefix("serial:") {
            Some(s) => {
                serials.insert(s.trim().replace(':', "").to_lowercase());
            }
            None => {
                ids.insert(entry.to_string());
            }
        }
    }
    (ids, serials)
}

impl Revocations {
    pub fn new(path: Option<PathBuf>) -> Self {
        Revocations {
            path,
            loaded: Default::default(),
        }
    }

    /// Whether a certificate (its id and serial) is revoked. The file is checked for
    /// changes at most once a second; an unreadable file keeps the last good list.
    pub fn is_revoked(&self, id: &str, serial: &str) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if l.checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            l.checked = Some(Instant::now());
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified != l.modified {
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        let (ids, serials) = parse(&text);
                        tracing::info!(path = %path.display(), ids = ids.len(), serials = serials.len(), "revocation list loaded");
                        l.ids = ids;
                        l.serials = serials;
                        l.modified = modified;
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot read the revocation list; keeping the last one")
                    }
                }
            }
        }
        l.ids.contains(id) || l.serials.contains(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_serials() {
        let (ids, serials) = parse("# revoked\nsilo-b  # lost laptop\nserial:0A:bc\n\n");
        assert!(ids.contains("silo-b"));
        assert!(serials.contains("0abc"));
        assert_eq!(ids.len(), 1);
    }
}
