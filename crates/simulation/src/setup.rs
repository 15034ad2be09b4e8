//! The coordinator's and the agents' configurations of a simulation, and its output folder
//! (`coordinator/` state and `certs/`, created afresh for each run).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedmicse_agent::AgentConfig;
use fedmicse_agent::config::DataConfig;
use fedmicse_coordinator::CoordinatorConfig;
use fedmicse_coordinator::config::{FederationConfig, InferenceConfig, ServerConfig, TlsConfig};
use fedmicse_wire::TlsFiles;
use fedmicse_wire::certs;

use crate::config::SimulateConfig;

/// Days the simulation's certificates are valid.
const CERT_DAYS: i64 = 7;

/// Where a simulation keeps its coordinator state and certificates, under `output`.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub state: PathBuf,
    pub certs: PathBuf,
    /// One state directory per agent (its error-feedback residual).
    pub agents: PathBuf,
}

impl Dirs {
    pub fn new(output: &Path) -> Self {
        Dirs {
            state: output.join("coordinator"),
            certs: output.join("certs"),
            agents: output.join("agents"),
        }
    }

    /// A simulation starts from scratch: creates `output`, throws away the state and
    /// certificates of a previous run, and issues a CA, the coordinator's and each agent's
    /// certificate.
    pub fn prepare(&self, output: &Path, ids: &[String]) -> Result<()> {
        std::fs::create_dir_all(output)
            .with_context(|| format!("creating {}", output.display()))?;
        for d in [&self.state, &self.certs, &self.agents] {
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
        certs::init(&self.certs, &[], CERT_DAYS)?;
        for id in ids {
            certs::issue(&self.certs, id, &self.certs, CERT_DAYS)?;
        }
        Ok(())
    }
}

/// The agents' ids: `agent-1` … `agent-N`.
pub fn agent_ids(clients: usize) -> Vec<String> {
    (1..=clients).map(|i| format!("agent-{i}")).collect()
}

/// The coordinator of a simulation: mutual TLS on 127.0.0.1, every agent allowlisted,
/// every checkpoint kept, and (unless `[federation].min_clients` says otherwise) the
/// `honest` agents alone enough to commit a round.
pub fn coordinator_config(
    c: &SimulateConfig,
    ids: &[String],
    honest: usize,
    dirs: &Dirs,
) -> CoordinatorConfig {
    let min_clients = c.federation.min_clients.unwrap_or(honest).min(c.clients);
    CoordinatorConfig {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            allow_plaintext: false,
            ..Default::default()
        },
        tls: Some(TlsConfig {
            ca: dirs.certs.join("ca.pem"),
            cert: dirs.certs.join("coordinator.pem"),
            key: dirs.certs.join("coordinator.key"),
            revocation_list: None,
        }),
        federation: FederationConfig {
            allowlist: ids.to_vec(),
            rounds: c.rounds,
            min_clients,
            fraction: c.federation.fraction,
            round_deadline_secs: c.federation.round_deadline_secs,
            server_lr: c.federation.server_lr,
            agent_timeout_secs: 15,
            poll_ms: 200,
            keep_checkpoints: c.rounds as usize + 1,
            seed: c.seed,
            device: c.device,
            ..FederationConfig::new(c.model.clone(), dirs.state.clone())
        },
        updates: c.updates.clone(),
        task: c.task.clone(),
        eval: c.eval.clone(),
        inference: InferenceConfig::default(),
        aggregation: c.aggregation.clone(),
        secure_aggregation: c.secure_aggregation.clone(),
        http: Default::default(),
    }
}

/// Agent `id` of a simulation, talking to the coordinator on 127.0.0.1:`port` with its
/// certificate from `dirs.certs`. Its shard is handed over in memory.
pub fn agent_config(c: &SimulateConfig, id: &str, port: u16, dirs: &Dirs) -> AgentConfig {
    AgentConfig {
        coordinator: format!("https://127.0.0.1:{port}"),
        server_name: Some("localhost".into()),
        tls: Some(TlsFiles {
            ca: dirs.certs.join("ca.pem"),
            cert: dirs.certs.join(format!("{id}.pem")),
            key: dirs.certs.join(format!("{id}.key")),
        }),
        plaintext_client_id: None,
        data: DataConfig {
            file: PathBuf::from("(in memory)"),
            sample: None,
            seed: c.seed,
        },
        device: c.device,
        retry: Default::default(),
        http: Default::default(),
        limits: Default::default(),
        state_dir: Some(dirs.agents.join(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(clients: usize, min_clients: Option<usize>) -> SimulateConfig {
        let mut c: SimulateConfig =
            toml::from_str("model = \"m\"\ndata = \"d\"\noutput = \"o\"\nrounds = 4").unwrap();
        c.clients = clients;
        c.federation.min_clients = min_clients;
        c
    }

    #[test]
    fn honest_agents_alone_commit_a_round() {
        let dirs = Dirs::new(Path::new("out"));
        let ids = agent_ids(5);
        assert_eq!(ids[0], "agent-1");
        assert_eq!(ids[4], "agent-5");
        let cc = coordinator_config(&config(5, None), &ids, 4, &dirs);
        assert_eq!(cc.federation.min_clients, 4);
        assert_eq!(cc.federation.allowlist, ids);
        assert_eq!(cc.federation.keep_checkpoints, 5);
        assert_eq!(cc.federation.state_dir, PathBuf::from("out/coordinator"));
        assert_eq!(
            cc.tls.as_ref().unwrap().ca,
            PathBuf::from("out/certs/ca.pem")
        );
        cc.validate().unwrap();
        // The configuration's min_clients wins, capped at the number of agents.
        let cc = coordinator_config(&config(5, Some(2)), &ids, 4, &dirs);
        assert_eq!(cc.federation.min_clients, 2);
        let cc = coordinator_config(&config(5, Some(9)), &ids, 4, &dirs);
        assert_eq!(cc.federation.min_clients, 5);
    }

    #[test]
    fn agents_use_their_own_certificate() {
        let dirs = Dirs::new(Path::new("out"));
        let a = agent_config(&config(3, None), "agent-2", 4242, &dirs);
        assert_eq!(a.coordinator, "https://127.0.0.1:4242");
        let tls = a.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("out/certs/agent-2.pem"));
        assert_eq!(tls.key, PathBuf::from("out/certs/agent-2.key"));
        assert_eq!(a.data.seed, 48);
    }

    #[test]
    fn prepare_starts_from_scratch() {
        let out = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(out.path());
        std::fs::create_dir_all(dirs.state.join("round-3")).unwrap();
        dirs.prepare(out.path(), &agent_ids(2)).unwrap();
        assert!(!dirs.state.exists());
        for f in ["ca.pem", "coordinator.pem", "agent-1.pem", "agent-2.key"] {
            assert!(dirs.certs.join(f).is_file(), "{f}");
        }
    }
}
