//! `coordinator.toml`: every field has a default or a clear error; unknown fields are errors.

use fedmicse_federation::config_file::{ConfigError, base_of, load_toml, resolve};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedmicse_federation::{ServerOptimizer, Strategy, TaskConfig, UpdateRules};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    #[serde(default)]
    pub server: ServerConfig,
    /// Required unless `server.allow_plaintext` is true.
    pub tls: Option<TlsConfig>,
    pub federation: FederationConfig,
    #[serde(default)]
    pub updates: UpdateRules,
    #[serde(default)]
    pub aggregation: AggregationConfig,
    #[serde(default)]
    pub task: TaskConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub inference: InferenceConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub secure_aggregation: SecureAggregationConfig,
}

/// Secure aggregation: the coordinator learns only the sum of each round's updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationConfig {
    pub enabled: bool,
    /// "secagg": every agent masks with every other; "secagg+": with O(log n) neighbours
    /// (less work and traffic for large federations, the same guarantee against a
    /// coordinator that sees fewer than a threshold of colluding agents).
    pub mode: SecureMode,
    /// Seconds each protocol step after the first waits for the agents' answers; the
    /// silent ones count as dropped (their masks are removed, their update left out).
    pub step_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecureMode {
    #[default]
    Secagg,
    #[serde(rename = "secagg+")]
    SecaggPlus,
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        SecureAggregationConfig {
            enabled: false,
            mode: SecureMode::Secagg,
            step_timeout_secs: 60,
        }
    }
}

impl SecureAggregationConfig {
    /// Settings that cannot work together with secure aggregation are refused at start.
    fn validate(&self, c: &CoordinatorConfig) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.step_timeout_secs == 0 {
            return Err("secure_aggregation.step_timeout_secs must be at least 1".into());
        }
        if c.aggregation.strategy != Strategy::Fedavg {
            return Err(format!(
                "aggregation.strategy = {:?} needs every update on its own; with secure aggregation the coordinator only ever sees their sum: use \"fedavg\"",
                c.aggregation.strategy
            ));
        }
        if c.federation.min_clients < 3 {
            return Err(format!(
                "secure aggregation needs federation.min_clients of at least 3 (it is {}): the sum of two updates and either one give away the other",
                c.federation.min_clients
            ));
        }
        if secure_value_bits(c.task.update_dtype).is_none() {
            return Err(format!(
                "task.update_dtype = \"{}\": secure aggregation sums integers; use \"int8\", \"int4\" or \"f32\" (16-bit integers)",
                c.task.update_dtype
            ));
        }
        Ok(())
    }
}

/// Bits of each value agents send under secure aggregation: the integer types' own, and
/// 16 for f32 (the masked sum needs integers; 16 bits keep f32's use: near-lossless).
pub fn secure_value_bits(dtype: fedmicse_tensors::ElementType) -> Option<u32> {
    use fedmicse_tensors::ElementType::*;
    match dtype {
        Int8 => Some(8),
        Int4 => Some(4),
        F32 => Some(16),
        F16 | Bf16 => None,
    }
}

/// The HTTP side: health and readiness probes, Prometheus metrics and, optionally, an
/// embeddings API in the conventions of text-embeddings-inference and OpenAI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where /health, /ready and /metrics listen; none = no HTTP server.
    pub listen: Option<SocketAddr>,
    /// Also serve POST /embed, /similarity and /v1/embeddings (plaintext HTTP without
    /// client authentication: keep it on an internal network or behind a proxy).
    pub embeddings_api: bool,
    /// Largest request body (bytes).
    pub max_body_bytes: usize,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers.
    pub header_timeout_secs: u64,
    /// A connection from which nothing was read for this long is closed.
    pub idle_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            embeddings_api: false,
            max_body_bytes: 2 << 20,
            max_connections: 256,
            header_timeout_secs: 10,
            idle_secs: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Accept plaintext connections without client certificates. Local experiments only:
    /// anyone who can reach the port can then join as any client id.
    pub allow_plaintext: bool,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Seconds a connection has to complete the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// A connection from which nothing was read for this long is closed (agents' keepalive
    /// pings every 30 s keep honest idle connections alive).
    pub connection_idle_secs: u64,
    /// Seconds a unary call (Join, Status, Embed, Similarity) may take, its request included.
    pub call_timeout_secs: u64,
    /// Seconds an update upload or a model download may go without a chunk; the stream is
    /// then closed and its slot freed.
    pub stream_idle_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:7443".parse().expect("address"),
            allow_plaintext: false,
            max_connections: 1024,
            tls_handshake_timeout_secs: 10,
            connection_idle_secs: 120,
            call_timeout_secs: 60,
            stream_idle_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The federation CA that signs agent certificates.
    pub ca: PathBuf,
    /// The coordinator's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Revoked certificates: one client id or `serial:HEX` per line ('#' comments). Re-read
    /// when it changes; no restart needed. `fedmicse certs revoke` appends to it.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
}

/// How a round's updates become the next global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// "fedavg" (sample-weighted mean), "median" or "trimmed_mean" (coordinate-wise).
    pub strategy: Strategy,
    /// Share trimmed at each end by trimmed_mean.
    pub trim_fraction: f64,
    /// "sgd" (W ← W + η·Δ), "fedavgm" (server momentum) or "fedadam" (Reddi et al., 2021).
    pub server_optimizer: ServerOptimizer,
    /// FedAvgM momentum β.
    pub momentum: f64,
    /// FedAdam β₁, β₂ and adaptivity τ.
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

impl AggregationConfig {
    /// Updates trimmed at each end by trimmed_mean when `n` updates arrive.
    pub fn trim_count(&self, n: usize) -> usize {
        fedmicse_federation::robust::trim_count(self.trim_fraction, n)
    }
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            strategy: Strategy::Fedavg,
            trim_fraction: 0.2,
            server_optimizer: ServerOptimizer::Sgd,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// Starting checkpoint (HuggingFace BERT directory).
    pub model: PathBuf,
    /// Checkpoints, round log and state; a restart resumes from here.
    pub state_dir: PathBuf,
    /// Client ids (certificate common names) allowed to join as agents.
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Client ids allowed only to read status and call inference (operators, services).
    #[serde(default)]
    pub operators: Vec<String>,
    #[serde(default = "d_rounds")]
    pub rounds: u64,
    /// Updates needed to commit a round.
    #[serde(default = "d_min_clients")]
    pub min_clients: usize,
    /// Share of the connected agents selected each round (at least `min_clients`).
    #[serde(default = "d_fraction")]
    pub fraction: f64,
    /// Seconds a round waits for updates.
    #[serde(default = "d_deadline")]
    pub round_deadline_secs: u64,
    /// Server learning rate η in W ← W + η·mean(Δ); 1 is plain FedAvg.
    #[serde(default = "d_one")]
    pub server_lr: f64,
    /// An agent not heard from for this long is gone: it is not selected, and an open round
    /// stops waiting for it. Agents poll every `poll_ms` while waiting and send a heartbeat
    /// as often while they train, so this is a few poll intervals.
    #[serde(default = "d_agent_timeout")]
    pub agent_timeout_secs: u64,
    /// How often agents are told to poll while waiting (milliseconds).
    #[serde(default = "d_poll")]
    pub poll_ms: u32,
    /// After a restart, how long the interrupted round waits for the agents selected for it
    /// before it reopens without them (milliseconds; default 5 × poll_ms). They are taken
    /// back whenever they return while it is open.
    #[serde(default)]
    pub restart_grace_ms: Option<u64>,
    /// Round checkpoints kept (older ones are deleted; the newest is always kept).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Seeds agent selection and the training head's initialisation.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Device for evaluation and inference: cpu, cuda, cuda:N.
    #[serde(default)]
    pub device: fedmicse_runtime::DeviceSpec,
    /// Updates received at once (each is held in memory until checked).
    #[serde(default = "d_uploads")]
    pub max_concurrent_uploads: usize,
    /// Model downloads streamed at once (a few chunks of memory each).
    #[serde(default = "d_downloads")]
    pub max_concurrent_downloads: usize,
}

fn d_rounds() -> u64 {
    10
}
fn d_min_clients() -> usize {
    2
}
fn d_fraction() -> f64 {
    1.0
}
fn d_deadline() -> u64 {
    3600
}
fn d_one() -> f64 {
    1.0
}
fn d_agent_timeout() -> u64 {
    10
}

impl FederationConfig {
    /// `model` and `state_dir` with every other field at its documented default (the
    /// values a config file gets when it leaves them out).
    pub fn new(model: PathBuf, state_dir: PathBuf) -> Self {
        FederationConfig {
            model,
            state_dir,
            allowlist: Vec::new(),
            operators: Vec::new(),
            rounds: d_rounds(),
            min_clients: d_min_clients(),
            fraction: d_fraction(),
            round_deadline_secs: d_deadline(),
            server_lr: d_one(),
            agent_timeout_secs: d_agent_timeout(),
            poll_ms: d_poll(),
            restart_grace_ms: None,
            keep_checkpoints: d_keep(),
            seed: d_seed(),
            device: Default::default(),
            max_concurrent_uploads: d_uploads(),
            max_concurrent_downloads: d_downloads(),
        }
    }

    /// How long a restarted coordinator waits for the interrupted round's agents.
    pub fn restart_grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.restart_grace_ms.unwrap_or(5 * u64::from(self.poll_ms)),
        )
    }
}
fn d_poll() -> u32 {
    1000
}
fn d_keep() -> usize {
    5
}
fn d_seed() -> u64 {
    48
}
fn d_uploads() -> usize {
    4
}
fn d_downloads() -> usize {
    16
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// STS dev file (score<TAB>s1<TAB>s2) evaluated after every round; none = no evaluation.
    pub dev_file: Option<PathBuf>,
    /// Use only the first N pairs (0 = all).
    pub max_pairs: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Serve Embed/Similarity from the newest global model.
    pub enabled: bool,
    /// Sentences per request.
    pub max_sentences: usize,
    /// Bytes per sentence.
    pub max_sentence_bytes: usize,
    /// Tokens per sentence (longer ones are truncated).
    pub max_len: usize,
    /// Requests computed at once; the rest queue.
    pub max_concurrent: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            enabled: true,
            max_sentences: 256,
            max_sentence_bytes: 16 * 1024,
            max_len: 128,
            max_concurrent: 2,
        }
    }
}

impl CoordinatorConfig {
    /// Reads and checks a TOML file; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let mut config: CoordinatorConfig = load_toml(path)?;
        config.resolve_paths(base_of(path));
        config.validate().map_err(|e| ConfigError::new(path, e))?;
        Ok(config)
    }

    /// Relative paths in a config file are relative to the file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let tls = self.tls.as_mut();
        let files = tls.into_iter().flat_map(|t| {
            [&mut t.ca, &mut t.cert, &mut t.key]
                .into_iter()
                .chain(t.revocation_list.as_mut())
        });
        for p in [&mut self.federation.model, &mut self.federation.state_dir]
            .into_iter()
            .chain(files)
            .chain(self.eval.dev_file.as_mut())
        {
            resolve(base, p);
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let f = &self.federation;
        if self.tls.is_none() && !self.server.allow_plaintext {
            return Err("[tls] is missing: mutual TLS is required (set server.allow_plaintext = true only for local experiments)".into());
        }
        if self.tls.is_some() && f.allowlist.is_empty() {
            return Err("federation.allowlist is empty: list the client ids (certificate names) allowed to join".into());
        }
        f.validate()?;
        self.updates.validate()?;
        self.validate_limits()?;
        self.aggregation.validate(f.min_clients)?;
        if self.inference.max_sentences == 0 || self.inference.max_len < 3 {
            return Err("inference.max_sentences must be ≥ 1 and inference.max_len ≥ 3".into());
        }
        self.task.validate()?;
        self.secure_aggregation.validate(self)?;
        Ok(())
    }

    /// Connection limits and timeouts.
    fn validate_limits(&self) -> Result<(), String> {
        let srv = &self.server;
        if srv.max_connections == 0 || self.http.max_connections == 0 {
            return Err(
                "server.max_connections and http.max_connections must be at least 1".into(),
            );
        }
        for (name, v) in [
            (
                "server.tls_handshake_timeout_secs",
                srv.tls_handshake_timeout_secs,
            ),
            ("server.connection_idle_secs", srv.connection_idle_secs),
            ("server.call_timeout_secs", srv.call_timeout_secs),
            ("server.stream_idle_secs", srv.stream_idle_secs),
            ("http.header_timeout_secs", self.http.header_timeout_secs),
            ("http.idle_secs", self.http.idle_secs),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

impl FederationConfig {
    /// Round settings, including those that could never run a round.
    fn validate(&self) -> Result<(), String> {
        let f = self;
        if f.rounds == 0 {
            return Err("federation.rounds must be at least 1".into());
        }
        if f.min_clients == 0 {
            return Err("federation.min_clients must be at least 1".into());
        }
        if !(f.fraction > 0.0 && f.fraction <= 1.0) {
            return Err(format!(
                "federation.fraction {} must be in (0, 1]",
                f.fraction
            ));
        }
        if !(f.server_lr > 0.0 && f.server_lr.is_finite()) {
            return Err(format!(
                "federation.server_lr {} must be positive",
                f.server_lr
            ));
        }
        if f.round_deadline_secs == 0 {
            return Err("federation.round_deadline_secs must be positive".into());
        }
        // Configurations that could never run a round.
        if !f.allowlist.is_empty() && f.min_clients > f.allowlist.len() {
            return Err(format!(
                "federation.min_clients = {} but the allowlist names only {} agent(s): no round could ever open",
                f.min_clients,
                f.allowlist.len()
            ));
        }
        if f.poll_ms == 0 {
            return Err("federation.poll_ms must be at least 1".into());
        }
        let poll_ms = u64::from(f.poll_ms);
        if f.round_deadline_secs.saturating_mul(1000) < 2 * poll_ms {
            return Err(format!(
                "federation.round_deadline_secs = {} is shorter than two poll intervals (poll_ms = {}): agents could not even learn that a round is open",
                f.round_deadline_secs, f.poll_ms
            ));
        }
        if f.agent_timeout_secs.saturating_mul(1000) < 3 * poll_ms {
            return Err(format!(
                "federation.agent_timeout_secs = {} is shorter than three poll intervals (poll_ms = {}): live agents would count as gone between two polls",
                f.agent_timeout_secs, f.poll_ms
            ));
        }
        if f.max_concurrent_uploads == 0 || f.max_concurrent_downloads == 0 {
            return Err(
                "federation.max_concurrent_uploads and max_concurrent_downloads must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

impl AggregationConfig {
    /// Rule settings; a robust rule must be able to outvote a hostile update with
    /// `min_clients` updates.
    fn validate(&self, min_clients: usize) -> Result<(), String> {
        let a = self;
        if !(0.0..0.5).contains(&a.trim_fraction) {
            return Err(format!(
                "aggregation.trim_fraction {} must be in [0, 0.5)",
                a.trim_fraction
            ));
        }
        if !(0.0..1.0).contains(&a.momentum)
            || !(0.0..1.0).contains(&a.beta1)
            || !(0.0..1.0).contains(&a.beta2)
        {
            return Err("aggregation.momentum, beta1 and beta2 must be in [0, 1)".into());
        }
        if !(a.tau > 0.0) {
            return Err("aggregation.tau must be positive".into());
        }
        // A robust rule needs enough updates to outvote a hostile one; refuse settings in
        // which it would quietly be a plain mean.
        match a.strategy {
            Strategy::Median if min_clients < 3 => {
                return Err(format!(
                    "aggregation.strategy = \"median\" needs federation.min_clients of at least 3 (it is {}): the median of two updates is their mean",
                    min_clients
                ));
            }
            Strategy::TrimmedMean if a.trim_count(min_clients) == 0 => {
                let need = (1.0 / a.trim_fraction).ceil().max(3.0);
                return Err(format!(
                    "aggregation.strategy = \"trimmed_mean\" with trim_fraction {} trims nothing with {} updates: raise trim_fraction or federation.min_clients to at least {need}",
                    a.trim_fraction, min_clients
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[tls]
ca = "c/ca.pem"
cert = "c/coordinator.pem"
key = "c/coordinator.key"
[federation]
model = "m"
state_dir = "s"
allowlist = ["a", "b"]
"#;

    #[test]
    fn federation_defaults_in_code_match_a_file_that_leaves_them_out() {
        let c: CoordinatorConfig = toml::from_str(MINIMAL).unwrap();
        let want = FederationConfig {
            allowlist: vec!["a".into(), "b".into()],
            ..FederationConfig::new("m".into(), "s".into())
        };
        assert_eq!(c.federation, want);
    }

    #[test]
    fn secure_aggregation_refuses_what_cannot_work_with_it() {
        let secure = |extra: &str| {
            let text = format!(
                "{}\n[secure_aggregation]\nenabled = true\nmode = \"secagg+\"\n{extra}",
                MINIMAL.replace(
                    "allowlist = [\"a\", \"b\"]",
                    "allowlist = [\"a\", \"b\", \"c\"]\nmin_clients = 3"
                )
            );
            let c: CoordinatorConfig = toml::from_str(&text).unwrap();
            c.validate()
        };
        secure("").unwrap();
        for (extra, why) in [
            (
                "[aggregation]\nstrategy = \"median\"",
                "only ever sees their sum",
            ),
            ("[task]\nupdate_dtype = \"bf16\"", "sums integers"),
            ("step_timeout_secs = 0", "step_timeout_secs"),
        ] {
            let e = secure(extra).unwrap_err();
            assert!(e.contains(why), "{extra}: {e}");
        }
        let mut c: CoordinatorConfig = toml::from_str(MINIMAL).unwrap();
        c.secure_aggregation.enabled = true;
        c.federation.min_clients = 2;
        assert!(
            c.validate()
                .unwrap_err()
                .contains("min_clients of at least 3")
        );
        assert_eq!(
            secure_value_bits(fedmicse_tensors::ElementType::Int4),
            Some(4)
        );
    }

    #[test]
    fn parses_minimal_and_rejects_unknown_fields() {
        let c: CoordinatorConfig = toml::from_str(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.federation.rounds, 10);
        let err = toml::from_str::<CoordinatorConfig>(&MINIMAL.replace("allowlist", "alowlist"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("alowlist"), "{err}");
        let err =
            toml::from_str::<CoordinatorConfig>(&format!("{MINIMAL}\n[task]\nbatchsize = 3\n"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("batchsize"), "{err}");
        let mut c2 = c.clone();
        c2.tls = None;
        assert!(c2.validate().unwrap_err().contains("mutual TLS"));
        c2.server.allow_plaintext = true;
        c2.validate().unwrap();
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Arbitrary text is a config or an error naming the problem, never a panic.
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
                if let Ok(c) = toml::from_str::<CoordinatorConfig>(&text) {
                    let _ = c.validate();
                }
            }

            /// Mutations of a valid file: values replaced by arbitrary TOML values.
            #[test]
            fn mutated_configs_never_panic(line in 0usize..9, value in prop_oneof![
                Just("-1".to_string()), Just("1e309".to_string()), Just("nan".to_string()),
                Just("\"\"".to_string()), Just("[]".to_string()), Just("{}".to_string()),
                "[0-9]{1,25}", "\"\\PC{0,20}\""]) {
                let lines: Vec<&str> = MINIMAL.lines().filter(|l| l.contains('=')).collect();
                let l = lines[line % lines.len()];
                let key = l.split('=').next().unwrap();
                let text = MINIMAL.replace(l, &format!("{key}= {value}"));
                if let Ok(c) = toml::from_str::<CoordinatorConfig>(&text) {
                    let _ = c.validate();
                }
                let extra = format!("{MINIMAL}\n[aggregation]\ntrim_fraction = {value}\n");
                if let Ok(c) = toml::from_str::<CoordinatorConfig>(&extra) {
                    let _ = c.validate();
                }
            }

            #[test]
            fn revocation_lists_never_panic(text in "\\PC{0,300}") {
                let _ = crate::revoke::parse(&text);
            }
        }
    }
}
