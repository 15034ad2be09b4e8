//! `agent.toml`.

use std::path::{Path, PathBuf};

use fedmicse_federation::config_file::{ConfigError, base_of, load_toml, resolve};
use fedmicse_wire::TlsFiles;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The coordinator: `https://HOST:PORT` (mutual TLS), or `http://HOST:PORT` when the
    /// coordinator allows plaintext for local experiments.
    pub coordinator: String,
    /// Name the coordinator's certificate must carry [default: the host of `coordinator`].
    #[serde(default)]
    pub server_name: Option<String>,
    /// Required for https.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Client id sent in a header over plaintext (with TLS the certificate says who we are).
    #[serde(default)]
    pub plaintext_client_id: Option<String>,
    pub data: DataConfig,
    /// Training device: cpu, cuda, cuda:N.
    #[serde(default = "d_device")]
    pub device: fedmicse_runtime::DeviceSpec,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// The most this agent accepts in a model from the coordinator.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Where the agent keeps what must survive its restart: the error-feedback residual of
    /// int8 / int4 / f16 / bf16 updates. None: kept in memory only.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// Ceilings on a pulled model, checked against the coordinator's header before anything
/// is allocated (a compromised coordinator cannot make the agent run out of memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Tensors in the model.
    pub max_tensors: usize,
    /// Bytes of all tensors together.
    pub max_total_bytes: u64,
    /// Files that come with the model (config.json, tokenizer files), and bytes of each.
    pub max_files: usize,
    pub max_file_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = fedmicse_wire::client::PullLimits::default();
        LimitsConfig {
            max_tensors: d.max_tensors,
            max_total_bytes: d.max_total_bytes,
            max_files: d.max_files,
            max_file_bytes: d.max_file_bytes,
        }
    }
}

impl From<&LimitsConfig> for fedmicse_wire::client::PullLimits {
    fn from(l: &LimitsConfig) -> Self {
        fedmicse_wire::client::PullLimits {
            max_tensors: l.max_tensors,
            max_total_bytes: l.max_total_bytes,
            max_file_bytes: l.max_file_bytes,
            max_files: l.max_files,
        }
    }
}

/// /health and Prometheus /metrics of the agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where to listen; none = no HTTP server.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The silo's sentences, one per line. They never leave this machine.
    pub file: PathBuf,
    /// Use a reproducible sample of N sentences instead of the whole file.
    #[serde(default)]
    pub sample: Option<usize>,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait after a failed call; doubles up to `max_ms`, with jitter (each wait is
    /// 50-100 % of the step). Reset once an update is delivered, not by a poll alone.
    pub initial_ms: u64,
    pub max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

fn d_device() -> fedmicse_runtime::DeviceSpec {
    fedmicse_runtime::DeviceSpec::Cpu
}
fn d_seed() -> u64 {
    48
}

impl AgentConfig {
    /// Reads, resolves (paths relative to the file) and checks `agent.toml`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let mut c: AgentConfig = load_toml(path)?;
        let base = base_of(path);
        resolve(base, &mut c.data.file);
        if let Some(d) = &mut c.state_dir {
            resolve(base, d);
        }
        if let Some(t) = &mut c.tls {
            t.resolve(base);
        }
        c.validate().map_err(|e| ConfigError::new(path, e))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        let https = self.coordinator.starts_with("https://");
        let http = self.coordinator.starts_with("http://");
        if !https && !http {
            return Err(format!(
                "coordinator {:?}: expected https://HOST:PORT",
                self.coordinator
            ));
        }
        if https && self.tls.is_none() {
            return Err("[tls] is missing: an https coordinator needs ca, cert and key".into());
        }
        if http && self.plaintext_client_id.is_none() {
            return Err("plaintext (http://) needs plaintext_client_id".into());
        }
        if self.retry.initial_ms == 0 || self.retry.max_ms < self.retry.initial_ms {
            return Err("retry: need 0 < initial_ms <= max_ms".into());
        }
        let l = &self.limits;
        if l.max_tensors == 0 || l.max_total_bytes == 0 || l.max_files == 0 || l.max_file_bytes == 0
        {
            return Err("limits: every limit must be above 0".into());
        }
        Ok(())
    }

    /// The TLS name to expect: `server_name`, else the URL's host.
    pub fn domain(&self) -> String {
        if let Some(s) = &self.server_name {
            return s.clone();
        }
        let rest = self.coordinator.split("://").nth(1).unwrap_or_default();
        let host = rest.split('/').next().unwrap_or_default();
        match host.rsplit_once(':') {
            Some((h, _)) => h.trim_matches(['[', ']']).to_string(),
            None => host.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let text = r#"
coordinator = "https://fed.example.org:7443"
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
[data]
file = "shard.txt"
"#;
        let c: AgentConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.domain(), "fed.example.org");
        assert!(
            toml::from_str::<AgentConfig>(&text.replace("[data]", "[data]\nfiel = 1")).is_err()
        );
        let mut p = c.clone();
        p.coordinator = "http://127.0.0.1:1".into();
        assert!(p.validate().unwrap_err().contains("plaintext_client_id"));

        assert_eq!(c.limits, LimitsConfig::default());
        let l: AgentConfig = toml::from_str(&format!(
            "{text}\n[limits]\nmax_total_bytes = 1000\nmax_files = 2\n"
        ))
        .unwrap();
        let pull = fedmicse_wire::client::PullLimits::from(&l.limits);
        assert_eq!((pull.max_total_bytes, pull.max_files), (1000, 2));
        assert_eq!(pull.max_tensors, 4096);
        assert!(
            toml::from_str::<AgentConfig>(&format!("{text}\n[limits]\nmax_bytes = 1\n")).is_err()
        );
    }
}
