//! Coordinator behaviour no other test covers: plaintext mode end to end, the robust
//! aggregation rules and FedAvgM through the coordinator, half-precision updates, partial
//! selection over several rounds, and checkpoint pruning.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::fed::*;
use common::*;
use fedmicse_coordinator::Running;
use fedmicse_encoder::{HostTensor, TensorMap};
use fedmicse_federation::{ServerOptimizer, Strategy, UpdateRules};
use fedmicse_wire::ElementType;
use fedmicse_wire::client::{Connection, Target};
use fedmicse_wire::pb;
use tonic::Code;

async fn finish(running: &Running, secs: u64) {
    tokio::time::timeout(Duration::from_secs(secs), running.wait_done())
        .await
        .expect("the federation finished in time");
}

/// W + rule(the updates' values), coordinate by coordinate, in f64.
fn coordinatewise(
    global: &TensorMap,
    updates: &[&TensorMap],
    rule: impl Fn(&mut [f64]) -> f64,
) -> TensorMap {
    global
        .iter()
        .map(|(name, w)| {
            let data = (0..w.data.len())
                .map(|i| {
                    let mut v: Vec<f64> = updates.iter().map(|u| u[name].data[i] as f64).collect();
                    (w.data[i] as f64 + rule(&mut v)) as f32
                })
                .collect();
            (name.clone(), HostTensor::new(w.shape.clone(), data))
        })
        .collect()
}

fn sorted(v: &mut [f64]) -> &[f64] {
    v.sort_by(f64::total_cmp);
    v
}

/// `map` scaled by `k`.
fn scaled(map: &TensorMap, k: f32) -> TensorMap {
    map.iter()
        .map(|(n, t)| {
            let data = t.data.iter().map(|x| x * k).collect();
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

/// Largest absolute difference over all tensors.
fn max_diff(a: &TensorMap, b: &TensorMap) -> f32 {
    b.iter()
        .map(|(n, t)| max_abs_diff(&a[n].data, &t.data))
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_mode_runs_a_fedavg_round_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), 32, 2, 2, 64);
    let mut config = coordinator_config(
        &model,
        &dir.path().join("state"),
        &dir.path().join("no-certs"),
        &[],
    );
    config.tls = None;
    config.server.allow_plaintext = true;
    config.federation.min_clients = 3;
    let running = start(config).await;
    let plain = |id: Option<&str>| {
        Connection::new(&Target {
            url: format!("http://127.0.0.1:{}", running.addr.port()),
            tls: None,
            domain: "localhost".into(),
            plaintext_client_id: id.map(str::to_string),
        })
        .unwrap()
    };
    // Without a client id header a plaintext caller is nobody.
    let err = plain(None).join(1).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(err.message().contains("plaintext"), "{}", err.message());

    let global = running.global().tensors.clone();
    let ids = ["lab-1", "lab-2", "lab-3"];
    let mut conns: Vec<Connection> = ids.iter().map(|id| plain(Some(id))).collect();
    for (c, id) in conns.iter_mut().zip(ids) {
        assert_eq!(c.join(100).await.unwrap().client_id, id);
    }
    let deltas: Vec<Vec<TensorMap>> = (0..3)
        .map(|i| vec![synthetic_delta(&global, 30 + i, 0.01)])
        .collect();
    let sent = drive_agents(&mut conns, &deltas, 1).await;
    assert_eq!(sent[&1], BTreeSet::from([0, 1, 2]));
    finish(&running, 30).await;
    // drive_agents weighs agent i with 10 · (i + 1) samples.
    let want = fedavg(
        &global,
        &[
            (10, &deltas[0][0]),
            (20, &deltas[1][0]),
            (30, &deltas[2][0]),
        ],
    );
    let got = running.global();
    assert_eq!(got.round, 1);
    assert_tensors_within(&got.tensors, &want, 1e-6);
    assert_eq!(running.history().last().unwrap().clients, 3);
    // Inference over plaintext serves the committed round.
    let r = conns[0]
        .embed(vec!["a plaintext request".into()], pb::Pooling::Mean, true)
        .await
        .unwrap();
    assert_eq!(r.model_round, 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn median_aggregation_commits_the_coordinatewise_median() {
    let ids = ["a", "b", "c"];
    let fed = federation(&ids);
    let mut config = fed.config(&ids);
    config.aggregation.strategy = Strategy::Median;
    config.updates = UpdateRules::none(); // the rule alone
    let running = start(config).await;
    let global = running.global().tensors.clone();
    // Two honest updates and one 100× larger: the median ignores the outlier.
    let deltas: Vec<Vec<TensorMap>> = vec![
        vec![synthetic_delta(&global, 41, 0.01)],
        vec![synthetic_delta(&global, 42, 0.01)],
        vec![synthetic_delta(&global, 43, 1.0)],
    ];
    let mut conns = connect_all(running.addr, &fed.certs, &ids);
    drive_agents(&mut conns, &deltas, 1).await;
    finish(&running, 30).await;
    let updates: Vec<&TensorMap> = deltas.iter().map(|d| &d[0]).collect();
    let want = coordinatewise(&global, &updates, |v| sorted(v)[1]);
    let got = running.global();
    assert_eq!(got.round, 1);
    assert_tensors_within(&got.tensors, &want, 1e-6);
    // Not what FedAvg would have made of the outlier.
    let mean = fedavg(
        &global,
        &[(10, updates[0]), (20, updates[1]), (30, updates[2])],
    );
    assert!(max_diff(&got.tensors, &mean) > 0.1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trimmed_mean_drops_the_extremes_of_five_updates() {
    let ids = ["a", "b", "c", "d", "e"];
    let fed = federation(&ids);
    let mut config = fed.config(&ids);
    config.aggregation.strategy = Strategy::TrimmedMean;
    config.aggregation.trim_fraction = 0.2; // ⌊0.2 · 5⌋ = 1 at each end
    config.updates = UpdateRules::none();
    let running = start(config).await;
    let global = running.global().tensors.clone();
    // Four honest updates and one scaled far up: at every coordinate the largest and the
    // smallest value are dropped and the middle three averaged (unweighted).
    let deltas: Vec<Vec<TensorMap>> = (0..5)
        .map(|i| {
            let scale = if i == 4 { 2.0 } else { 0.01 };
            vec![synthetic_delta(&global, 50 + i, scale)]
        })
        .collect();
    let mut conns = connect_all(running.addr, &fed.certs, &ids);
    drive_agents(&mut conns, &deltas, 1).await;
    finish(&running, 30).await;
    let updates: Vec<&TensorMap> = deltas.iter().map(|d| &d[0]).collect();
    let want = coordinatewise(&global, &updates, |v| {
        sorted(v)[1..4].iter().sum::<f64>() / 3.0
    });
    let got = running.global();
    assert_eq!(got.round, 1);
    assert_tensors_within(&got.tensors, &want, 1e-6);
    // Neither the plain mean nor the median.
    let mean = coordinatewise(&global, &updates, |v| v.iter().sum::<f64>() / 5.0);
    let median = coordinatewise(&global, &updates, |v| sorted(v)[2]);
    assert!(max_diff(&got.tensors, &mean) > 0.05);
    assert!(max_diff(&got.tensors, &median) > 1e-4);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedavgm_carries_momentum_into_the_next_round() {
    let ids = ["a", "b"];
    let fed = federation(&ids);
    let mut config = fed.config(&ids);
    config.federation.rounds = 2;
    config.federation.server_lr = 0.5;
    config.aggregation.server_optimizer = ServerOptimizer::Fedavgm;
    config.aggregation.momentum = 0.9;
    config.updates = UpdateRules::none();
    let running = start(config).await;
    let w0 = running.global().tensors.clone();
    let deltas: Vec<Vec<TensorMap>> = (0..2)
        .map(|i| {
            (0..2)
                .map(|r| synthetic_delta(&w0, 60 + 10 * i + r, 0.01))
                .collect()
        })
        .collect();
    let mut conns = connect_all(running.addr, &fed.certs, &ids);
    let sent = drive_agents(&mut conns, &deltas, 2).await;
    assert_eq!(sent.len(), 2);
    finish(&running, 30).await;
    // Δᵣ = FedAvg step of round r (weights 10 and 20); v₁ = Δ₁, v₂ = β·v₁ + Δ₂;
    // W₂ = W₀ + η·v₁ + η·v₂.
    let (lr, beta) = (0.5f64, 0.9f64);
    let zero = scaled(&w0, 0.0);
    let step = |r: usize| fedavg(&zero, &[(10, &deltas[0][r]), (20, &deltas[1][r])]);
    let (d1, d2) = (step(0), step(1));
    let want: TensorMap = w0
        .iter()
        .map(|(name, w)| {
            let data = (0..w.data.len())
                .map(|i| {
                    let v1 = d1[name].data[i] as f64;
                    let v2 = beta * v1 + d2[name].data[i] as f64;
                    (w.data[i] as f64 + lr * v1 + lr * v2) as f32
                })
                .collect();
            (name.clone(), HostTensor::new(w.shape.clone(), data))
        })
        .collect();
    let got = running.global();
    assert_eq!(got.round, 2);
    assert_tensors_within(&got.tensors, &want, 1e-6);
    // Without momentum the model would be elsewhere by about η·β·Δ₁.
    let sgd: TensorMap = w0
        .iter()
        .map(|(name, w)| {
            let data = (0..w.data.len())
                .map(|i| {
                    let s = d1[name].data[i] as f64 + d2[name].data[i] as f64;
                    (w.data[i] as f64 + lr * s) as f32
                })
                .collect();
            (name.clone(), HostTensor::new(w.shape.clone(), data))
        })
        .collect();
    assert!(max_diff(&got.tensors, &sgd) > 1e-3);
    running.shutdown().await;
}

fn rounded(map: &TensorMap, round: impl Fn(f32) -> f32) -> TensorMap {
    map.iter()
        .map(|(n, t)| {
            let data = t.data.iter().map(|&x| round(x)).collect();
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

async fn half_precision_is_fedavg_of_the_rounded_values(
    name: &str,
    dtype: ElementType,
    round: impl Fn(f32) -> f32 + Copy,
) {
    let (global, updates, got, _) = two_agent_round(dtype, 70, 0.1, |d| d).await;
    let exact: Vec<(u64, &TensorMap)> = updates.iter().map(|(n, d)| (*n, d)).collect();
    let halves: Vec<(u64, TensorMap)> = updates
        .iter()
        .map(|(n, d)| (*n, rounded(d, round)))
        .collect();
    let halves: Vec<(u64, &TensorMap)> = halves.iter().map(|(n, d)| (*n, d)).collect();
    // The committed model is FedAvg of the values as sent (rounded to the half type)...
    assert_tensors_within(&got, &fedavg(&global, &halves), 1e-6);
    // ...which differs from FedAvg of the f32 deltas by the half type's rounding.
    let off = max_diff(&got, &fedavg(&global, &exact));
    assert!(off > 2e-6, "{name}: {off}: the values were not rounded");
    // Relative precision 2⁻¹¹ (f16) or 2⁻⁸ (bf16) of deltas below 0.05.
    let bound = if dtype == ElementType::F16 {
        3e-5
    } else {
        2e-4
    };
    assert!(
        off < bound,
        "{name}: {off} is more than the type's rounding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn f16_updates_commit_fedavg_of_their_values() {
    half_precision_is_fedavg_of_the_rounded_values("f16", ElementType::F16, |x| {
        half::f16::from_f32(x).to_f32()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bf16_updates_commit_fedavg_of_their_values() {
    half_precision_is_fedavg_of_the_rounded_values("bf16", ElementType::Bf16, |x| {
        half::bf16::from_f32(x).to_f32()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fraction_of_the_agents_is_selected_each_round() {
    let ids = ["a", "b", "c", "d", "e", "f"];
    let fed = federation(&ids);
    let mut config = fed.config(&ids);
    config.federation.rounds = 3;
    config.federation.fraction = 0.5;
    config.federation.min_clients = 2;
    let seed = config.federation.seed;
    let running = start(config).await;
    let global = running.global().tensors.clone();
    let mut conns = connect_all(running.addr, &fed.certs, &ids);
    // Round 1 opens as soon as two agents are there: with 2 connected it takes
    // max(2, ⌈0.5 · 2⌉) = 2. The other four register while it runs.
    conns[0].join(100).await.unwrap();
    conns[1].join(100).await.unwrap();
    let mut probe = connect(running.addr, &fed.certs, "a");
    wait_phase(&mut probe, pb::Phase::Training, 1).await;
    for c in conns[2..].iter_mut() {
        c.join(100).await.unwrap();
    }
    let deltas: Vec<Vec<TensorMap>> = (0..6)
        .map(|i| {
            (0..3)
                .map(|r| synthetic_delta(&global, 80 + 10 * i + r, 0.01))
                .collect()
        })
        .collect();
    let sent = drive_agents(&mut conns, &deltas, 3).await;
    finish(&running, 60).await;

    let pool: BTreeSet<usize> = (0..6).collect();
    let expect_size = |connected: usize| 2usize.max((0.5 * connected as f64).ceil() as usize);
    assert_eq!(sent.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(sent[&1], BTreeSet::from([0, 1]), "round 1: both connected");
    assert_eq!(sent[&1].len(), expect_size(2));
    for r in [2, 3] {
        assert_eq!(sent[&r].len(), expect_size(6), "round {r}: {:?}", sent[&r]);
        assert!(sent[&r].is_subset(&pool));
        // The seeded selection the coordinator documents, over the sorted connected ids.
        let connected: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let want: BTreeSet<usize> =
            fedmicse_coordinator::rounds::select(&connected, 0.5, 2, seed, r)
                .iter()
                .map(|id| ids.iter().position(|x| x == id).unwrap())
                .collect();
        assert_eq!(sent[&r], want, "round {r}");
    }
    assert_ne!(sent[&2], sent[&3], "selections vary between rounds");
    let history = running.history();
    assert_eq!(
        history.iter().map(|h| h.round).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "every round committed"
    );
    assert_eq!(
        history[1..].iter().map(|h| h.clients).collect::<Vec<_>>(),
        [2, 3, 3]
    );
    assert_eq!(running.global().round, 3);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_newest_checkpoints_are_kept() {
    let fed = federation(&["a"]);
    let mut config = fed.config(&["a"]);
    config.federation.rounds = 4;
    config.federation.keep_checkpoints = 2;
    let running = start(config).await;
    let global = running.global().tensors.clone();
    let deltas = vec![
        (0..4)
            .map(|r| synthetic_delta(&global, 90 + r, 0.01))
            .collect(),
    ];
    let mut conns = vec![connect(running.addr, &fed.certs, "a")];
    let sent = drive_agents(&mut conns, &deltas, 4).await;
    assert_eq!(sent.len(), 4);
    finish(&running, 60).await;
    let got = running.global();
    assert_eq!(got.round, 4);

    let checkpoints = fed.state().join("checkpoints");
    let mut names: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("round-"))
        .collect();
    names.sort();
    assert_eq!(names, ["round-000003", "round-000004"]);
    assert_eq!(running.checkpoint_dir(4), checkpoints.join("round-000004"));
    running.shutdown().await;

    // The newest loads, as an encoder and as the store's last commit.
    let newest = checkpoints.join("round-000004");
    let on_disk =
        fedmicse_encoder::weights::read_checkpoint(&newest.join("model.safetensors")).unwrap();
    assert!(!on_disk.is_empty());
    for (name, t) in &on_disk {
        assert_eq!(t, &got.tensors[name], "{name} on disk");
    }
    fedmicse_encoder::Encoder::load(&newest, &fedmicse_encoder::device::cpu()).unwrap();
    let store = fedmicse_coordinator::Store::open(&fed.state(), 2).unwrap();
    let (model, history, _) = store.load().unwrap().unwrap();
    assert_eq!(model.round, 4);
    assert_eq!(history.len(), 5);
    for (name, t) in &got.tensors {
        assert_eq!(&model.tensors[name], t, "{name} loaded");
    }
}

/// A trainer that needs no model: every value moves by +0.25, on every tensor it is given
/// (the agent, not the trainer, decides what is sent). It remembers what it was asked.
struct Shift {
    calls: std::sync::Mutex<Vec<(usize, Vec<String>)>>,
}

impl fedmicse_runtime::LocalTrainer for Shift {
    fn train(
        &self,
        start: fedmicse_runtime::ModelParts<'_>,
        shard: &[String],
        task: &fedmicse_federation::TaskConfig,
        _seed: u64,
    ) -> Result<(TensorMap, fedmicse_runtime::TrainReport), fedmicse_runtime::RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push((shard.len(), task.trainable.clone()));
        assert!(start.files.iter().any(|(n, _)| n == "config.json"));
        let report = fedmicse_runtime::TrainReport {
            steps: 3,
            mean_loss: 1.5,
            ..Default::default()
        };
        Ok((scaled_plus(start.tensors, 0.25), report))
    }
}

fn scaled_plus(map: &TensorMap, add: f32) -> TensorMap {
    map.iter()
        .map(|(n, t)| {
            let data = t.data.iter().map(|x| x + add).collect();
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

/// The agent's own logic over the real stack, with a fake trainer: it sends exactly
/// trained − global for the task's trainable tensors and nothing else, and the committed
/// model is the global one moved by that delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_sends_trained_minus_global_for_the_trainable_tensors_only() {
    let ids = ["a"];
    let fed = federation(&ids);
    let mut config = fed.config(&ids);
    config.task.trainable = vec!["encoder.layer.1.".into()];
    config.updates = UpdateRules::none();
    let running = start(config).await;
    let global = running.global().tensors.clone();
    let trainer = Arc::new(Shift {
        calls: Default::default(),
    });
    let agent_config = agent_config(running.addr.port(), &fed.certs, "a");
    let shard: Vec<String> = (0..5).map(|i| format!("sentence {i}")).collect();
    let agent = fedmicse_agent::Agent::new(&agent_config, shard, trainer.clone()).unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let report = tokio::spawn(agent.run(stop_rx));
    finish(&running, 60).await;
    let report = report.await.unwrap().unwrap();
    assert_eq!(report.rounds_trained, vec![1]);
    assert_eq!(
        *trainer.calls.lock().unwrap(),
        vec![(5, vec!["encoder.layer.1.".to_string()])]
    );
    let committed = &running.global().tensors;
    let mut moved = 0;
    for (name, w) in &global {
        let trainable = name.starts_with("encoder.layer.1.");
        let want = if trainable {
            scaled_plus(&TensorMap::from([(name.clone(), w.clone())]), 0.25)[name].clone()
        } else {
            w.clone()
        };
        let got = &committed[name];
        assert!(
            max_abs_diff(&got.data, &want.data) <= 1e-6,
            "{name} (trainable: {trainable})"
        );
        moved += trainable as usize;
    }
    assert!(moved >= 4, "only {moved} trainable tensors");
}
