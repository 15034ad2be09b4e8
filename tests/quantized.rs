//! Quantized updates over the real mTLS stack: int8 / int4 codes commit FedAvg of the
//! values sent in about a quarter / an eighth of f32's bytes, and an agent's error
//! feedback carries what rounding dropped into its next rounds (and across its restart).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fed::*;
use fedmicse_federation::UpdateRules;
use fedmicse_tensors::quantize::round_to_grid;
use fedmicse_tensors::{ElementType, HostTensor, TensorMap};
use rand::SeedableRng;

fn pattern(i: usize) -> f32 {
    ((i * 37 % 101) as f32 - 50.0) * 2e-5
}

/// Every value moves by `pattern(its index in its tensor)`: the true delta of every round.
fn pattern_delta(like: &TensorMap) -> AddDelta {
    AddDelta(
        like.iter()
            .map(|(n, t)| {
                let data = (0..t.data.len()).map(pattern).collect();
                (n.clone(), HostTensor::new(t.shape.clone(), data))
            })
            .collect(),
    )
}

async fn finish(running: &fedmicse_coordinator::Running, secs: u64) {
    tokio::time::timeout(Duration::from_secs(secs), running.wait_done())
        .await
        .expect("the federation finished in time");
}

fn on_grid(delta: &TensorMap, dtype: ElementType, seed: u64) -> TensorMap {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    delta
        .iter()
        .map(|(n, t)| {
            let data = round_to_grid(&t.data, dtype, &mut rng);
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

fn max_diff(a: &TensorMap, b: &TensorMap) -> f32 {
    a.iter()
        .map(|(n, t)| common::max_abs_diff(&t.data, &b[n].data))
        .fold(0.0, f32::max)
}

/// Two agents send `dtype` updates on the grid, as real agents do: the committed model is
/// FedAvg of exactly those values, and the round's bytes are the codes' bytes.
async fn integer_round(dtype: ElementType) {
    let mut k = 0;
    let (global, sent, got, record) = two_agent_round(dtype, 80, 0.05, |d| {
        k += 1;
        on_grid(&d, dtype, k)
    })
    .await;
    let sent: Vec<(u64, &TensorMap)> = sent.iter().map(|(n, s)| (*n, s)).collect();
    assert_tensors_within(&got, &fedavg(&global, &sent), 1e-6);
    let exact: Vec<TensorMap> = (0..2)
        .map(|i| synthetic_delta(&global, 80 + i, 0.05))
        .collect();
    let exact: Vec<(u64, &TensorMap)> =
        sent.iter().zip(&exact).map(|((n, _), e)| (*n, e)).collect();
    let off = max_diff(&got, &fedavg(&global, &exact));
    // A step is absmax/127 (int8) or /7 (int4) of 64-value blocks of |x| ≤ 0.05.
    let step = 0.05
        / if dtype == ElementType::Int8 {
            127.0
        } else {
            7.0
        };
    assert!(
        off > step * 0.01 && off < step,
        "{dtype}: off by {off}, step {step}"
    );

    let f32_bytes: u64 = exact
        .iter()
        .map(|(_, e)| fedmicse_wire::tensors::total_bytes(e))
        .sum();
    let ratio = record.bytes_up as f64 / f32_bytes as f64;
    let (lo, hi) = if dtype == ElementType::Int8 {
        (0.25, 0.27)
    } else {
        (0.125, 0.15)
    };
    assert!((lo..hi).contains(&ratio), "{dtype}: {ratio} of f32's bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn int8_updates_commit_fedavg_of_the_codes_in_a_quarter_of_the_bytes() {
    integer_round(ElementType::Int8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn int4_updates_commit_fedavg_of_the_codes_in_an_eighth_of_the_bytes() {
    integer_round(ElementType::Int4).await;
}

/// One agent, int4 updates, two federations of 2 rounds each on the same state directory
/// (the agent restarts in between, the second federation continues from the first's
/// model): what the coordinator applied plus the residual the agent carries equals the
/// sum of the agent's true deltas, and the residual is not zero (rounding did drop
/// something, and nothing of it was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_feedback_loses_nothing_over_rounds_and_restarts() {
    let fed = federation(&["a"]);
    let agent_state = fed.dir.path().join("agent-state");
    let trainable = "encoder.layer.1.";
    let mut start_model: Option<TensorMap> = None;
    let mut model = TensorMap::new();
    for part in 0..2 {
        let mut config = fed.config(&["a"]);
        config.federation.rounds = 2 * (part + 1);
        config.task.update_dtype = ElementType::Int4;
        config.task.trainable = vec![trainable.into()];
        config.updates = UpdateRules::none();
        let running = start(config).await;
        let model0 = start_model
            .get_or_insert_with(|| running.global().tensors.clone())
            .clone();
        let mut agent_config = agent_config(running.addr.port(), &fed.certs, "a");
        agent_config.state_dir = Some(agent_state.clone());
        let shard: Vec<String> = (0..4).map(|i| format!("sentence {i}")).collect();
        let agent =
            fedmicse_agent::Agent::new(&agent_config, shard, Arc::new(pattern_delta(&model0)))
                .unwrap();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let report = tokio::spawn(agent.run(stop_rx));
        finish(&running, 60).await;
        assert_eq!(report.await.unwrap().unwrap().rounds_trained.len(), 2);
        model = running.global().tensors.clone();
        running.shutdown().await;
    }
    let start_model = start_model.unwrap();
    let residual =
        fedmicse_tensors::safetensors::read(&agent_state.join("residual.safetensors")).unwrap();
    let mut carried = 0f32;
    for (name, w0) in start_model.iter().filter(|(n, _)| n.starts_with(trainable)) {
        let r = residual.get(name);
        for (i, (a, b)) in w0.data.iter().zip(&model[name].data).enumerate() {
            let left = r.map_or(0.0, |r| r.data[i]);
            let applied = b - a;
            let err = (applied + left - 4.0 * pattern(i)).abs();
            assert!(
                err < 2e-6,
                "{name}[{i}]: applied {applied} + residual {left} vs {}",
                4.0 * pattern(i)
            );
            carried = carried.max(left.abs());
        }
    }
    assert!(carried > 1e-6, "int4 rounding left no residual");
    // Tensors the task does not train are untouched.
    for (name, w0) in start_model
        .iter()
        .filter(|(n, _)| !n.starts_with(trainable))
    {
        assert_eq!(w0, &model[name], "{name}");
    }
}
