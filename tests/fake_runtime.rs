//! A whole federation (coordinator and three agents over the real mTLS gRPC stack) on a
//! fake model runtime: two tensors of a few values, an embedder whose vectors are a plain
//! function of the text and the weights, trainers that add known deltas. No BERT is built
//! and no tokenizer read, so this checks the federation's arithmetic and serving alone, in
//! a second or so.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::fed::*;
use fedmicse_encoder::{HostTensor, TensorMap};
use fedmicse_federation::{TaskConfig, UpdateRules};
use fedmicse_runtime::{
    BaseModel, DeviceSpec, EmbedOptions, Embedder, LocalTrainer, ModelParts, ModelRuntime,
    ModelTemplate, RuntimeError, TrainReport,
};
use fedmicse_wire::pb;

/// Width of the fake model (and so of its training head, `mlp.dense.*`).
const HIDDEN: usize = 2;

/// Opens any directory as the same tiny checkpoint.
struct FakeRuntime;

struct FakeTemplate;

impl ModelRuntime for FakeRuntime {
    fn open(
        &self,
        _dir: &Path,
        _device: DeviceSpec,
    ) -> Result<Box<dyn ModelTemplate>, RuntimeError> {
        Ok(Box::new(FakeTemplate))
    }
}

impl ModelTemplate for FakeTemplate {
    fn base(&self) -> Result<BaseModel, RuntimeError> {
        Ok(BaseModel {
            tensors: TensorMap::from([
                (
                    "encoder.a".to_string(),
                    HostTensor::new(vec![2, 3], vec![0.5, -1.0, 0.25, 2.0, 0.0, -0.75]),
                ),
                (
                    "encoder.b".to_string(),
                    HostTensor::new(vec![HIDDEN], vec![1.0, -2.0]),
                ),
            ]),
            // Agents are sent the model's files with its weights; the coordinator needs
            // none of them itself.
            files: vec![("config.json".into(), br#"{"model_type": "fake"}"#.to_vec())],
            hidden_size: HIDDEN,
            export_files: Vec::new(),
        })
    }

    fn embedder(&self, tensors: TensorMap) -> Result<Arc<dyn Embedder>, RuntimeError> {
        Ok(Arc::new(FakeEmbedder { tensors }))
    }
}

/// Embeds with whatever encoder tensors it was built from.
struct FakeEmbedder {
    tensors: TensorMap,
}

/// The fake model's sentence vector: `[Σa · n, Σb + n]` with `n` the sentence's characters.
fn fake_vector(tensors: &TensorMap, sentence: &str) -> Vec<f32> {
    let sum = |name: &str| tensors[name].data.iter().sum::<f32>();
    let n = sentence.chars().count() as f32;
    vec![sum("encoder.a") * n, sum("encoder.b") + n]
}

impl Embedder for FakeEmbedder {
    fn embed(
        &self,
        sentences: &[&str],
        opts: &EmbedOptions,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        assert!(!opts.normalize, "the test asks for raw vectors");
        Ok(sentences
            .iter()
            .map(|s| fake_vector(&self.tensors, s))
            .collect())
    }

    fn count_tokens(&self, sentence: &str, max_len: usize) -> usize {
        (sentence.split_whitespace().count() + 2).min(max_len)
    }

    fn has_pooler(&self) -> bool {
        false
    }
}

/// The delta agent `agent` trains in `round`: a distinct small value per agent, round and
/// coordinate.
fn known_delta(global: &TensorMap, agent: usize, round: u64) -> TensorMap {
    global
        .iter()
        .map(|(name, t)| {
            let data = (0..t.data.len())
                .map(|k| 0.01 * (agent as f32 + 1.0) * round as f32 - 0.003 * k as f32)
                .collect();
            (name.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

/// Adds [`known_delta`] for its agent and the round (its calls so far, plus one) to every
/// tensor it is given; remembers the shard sizes it was asked to train on.
struct KnownStep {
    agent: usize,
    calls: Mutex<Vec<usize>>,
}

impl LocalTrainer for KnownStep {
    fn train(
        &self,
        start: ModelParts<'_>,
        shard: &[String],
        _task: &TaskConfig,
        _seed: u64,
    ) -> Result<(TensorMap, TrainReport), RuntimeError> {
        assert!(start.files.iter().any(|(n, _)| n == "config.json"));
        let round = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(shard.len());
            calls.len() as u64
        };
        let delta = known_delta(start.tensors, self.agent, round);
        let trained = start
            .tensors
            .iter()
            .map(|(name, t)| {
                let data = t.data.iter().zip(&delta[name].data).map(|(w, d)| w + d);
                (
                    name.clone(),
                    HostTensor::new(t.shape.clone(), data.collect()),
                )
            })
            .collect();
        let report = TrainReport {
            steps: 1,
            mean_loss: 0.5,
            ..Default::default()
        };
        Ok((trained, report))
    }
}

/// Two rounds with three agents (2, 3 and 5 sentences): the committed model is FedAvg of
/// the known deltas, round after round, and inference answers with the fake embedder over
/// the newest round's weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_rounds_on_a_fake_runtime_commit_fedavg_and_serve_the_newest_model() {
    let ids = ["a", "b", "c"];
    let shard_sizes = [2usize, 3, 5];
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    certs_for(&certs, &ids);
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &ids);
    config.federation.rounds = 2;
    config.updates = UpdateRules::none();
    let running = start_with(config, Arc::new(FakeRuntime)).await;
    let start = running.global().tensors.clone();
    assert_eq!(
        start.keys().collect::<Vec<_>>(),
        [
            "encoder.a",
            "encoder.b",
            "mlp.dense.bias",
            "mlp.dense.weight"
        ],
        "the fake encoder and the seeded training head"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let trainers: Vec<Arc<KnownStep>> = (0..ids.len())
        .map(|agent| {
            Arc::new(KnownStep {
                agent,
                calls: Default::default(),
            })
        })
        .collect();
    let agents: Vec<_> = ids
        .iter()
        .zip(shard_sizes)
        .zip(&trainers)
        .map(|((id, size), trainer)| {
            let shard = (0..size).map(|i| format!("{id} sentence {i}")).collect();
            let config = agent_config(running.addr.port(), &certs, id);
            let agent = fedmicse_agent::Agent::new(&config, shard, trainer.clone()).unwrap();
            tokio::spawn(agent.run(stop_rx.clone()))
        })
        .collect();
    tokio::time::timeout(std::time::Duration::from_secs(60), running.wait_done())
        .await
        .expect("two rounds in a minute");
    for (agent, trainer) in agents.into_iter().zip(&trainers) {
        let report = agent.await.unwrap().unwrap();
        assert_eq!(report.rounds_trained, vec![1, 2]);
        let shard = shard_sizes[trainer.agent];
        assert_eq!(*trainer.calls.lock().unwrap(), [shard, shard]);
    }
    drop(stop_tx);

    // FedAvg computed here, round by round, in f64: W ← W + Σ nᵢΔᵢ / Σ nᵢ.
    let mut want = start.clone();
    for round in 1..=2 {
        let deltas: Vec<TensorMap> = (0..ids.len())
            .map(|agent| known_delta(&want, agent, round))
            .collect();
        let updates: Vec<(u64, &TensorMap)> = shard_sizes
            .iter()
            .zip(&deltas)
            .map(|(&n, d)| (n as u64, d))
            .collect();
        want = fedavg(&want, &updates);
    }
    let got = running.global();
    assert_eq!(got.round, 2);
    for (name, w) in &want {
        eprintln!(
            "{name}: {}",
            common::max_abs_diff(&got.tensors[name].data, &w.data)
        );
    }
    assert_tensors_within(&got.tensors, &want, 1e-6);
    let history = running.history();
    assert_eq!(history.len(), 3, "round 0 and two rounds");
    assert!(history[1..].iter().all(|r| r.clients == 3), "{history:?}");

    // gRPC inference: the fake embedder's vectors over round 2's encoder tensors.
    let sentences = ["a short one", "", "Zürich at night, much longer"];
    let mut conn = connect(running.addr, &certs, "a");
    let r = conn
        .embed(
            sentences.iter().map(|s| s.to_string()).collect(),
            pb::Pooling::Cls,
            false,
        )
        .await
        .unwrap();
    assert_eq!(r.model_round, 2);
    assert_eq!(r.dimension, 2);
    let served: Vec<Vec<f32>> = r.embeddings.into_iter().map(|v| v.values).collect();
    let committed: Vec<Vec<f32>> = sentences
        .iter()
        .map(|s| fake_vector(&got.tensors, s))
        .collect();
    assert_eq!(served, committed);
    for (s, v) in sentences.iter().zip(&served) {
        let expected = fake_vector(&want, s);
        assert!(
            common::max_abs_diff(v, &expected) <= 1e-5,
            "{s:?}: {v:?} vs {expected:?}"
        );
    }
    running.shutdown().await;
}
