//! Secure aggregation over the real mTLS stack, tested as an attacker would look at it:
//! the coordinator commits the mean of the agents' quantized updates, keeps and logs
//! nothing that resembles any single one, survives an agent vanishing mid-protocol, and
//! abandons (model untouched) a round that lost too many agents to unmask the sum.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::fed::*;
use fedmicse_coordinator::{CoordinatorConfig, Running};
use fedmicse_runtime::sts::pearson;
use fedmicse_secagg::agent;
use fedmicse_tensors::{ElementType, HostTensor, TensorMap};
use fedmicse_wire::client::Connection;
use fedmicse_wire::secure as convert;
use rand::{Rng, SeedableRng};

/// Everything this test binary logs, as the coordinator's operator would read it.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn uniform(like: &TensorMap, trainable: &str, seed: u64, half_width: f32) -> TensorMap {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    like.iter()
        .filter(|(n, _)| n.starts_with(trainable))
        .map(|(n, t)| {
            let data = t
                .data
                .iter()
                .map(|_| rng.random_range(-half_width..half_width))
                .collect();
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

fn combine(a: &TensorMap, b: &TensorMap, f: impl Fn(f32, f32) -> f32) -> TensorMap {
    a.iter()
        .map(|(n, t)| {
            let data = t
                .data
                .iter()
                .zip(&b[n].data)
                .map(|(x, y)| f(*x, *y))
                .collect();
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

/// A coordinator running secure rounds: `agents` allowlisted, `min` needed, steps after
/// the first waiting `step_secs`. Agents clip at lr × local steps = 1e-3 in round 1.
fn secure_config(fed: &Fed, agents: &[&str], min: usize, dtype: ElementType) -> CoordinatorConfig {
    let mut c = fed.config(agents);
    c.federation.min_clients = min;
    c.task.update_dtype = dtype;
    c.task.lr = 1e-3;
    c.task.trainable = vec![TRAINABLE.into()];
    c.secure_aggregation.enabled = true;
    c.secure_aggregation.step_timeout_secs = 3;
    c
}

const TRAINABLE: &str = "embeddings.";

/// Honest agents with known deltas and their own state directories; returns what each
/// sent (its delta minus the residual it kept: the quantized values it masked).
async fn run_honest(running: &Running, fed: &Fed, deltas: &[(&str, TensorMap)]) -> Vec<TensorMap> {
    let mut tasks = Vec::new();
    let mut states = Vec::new();
    for (id, delta) in deltas {
        let state = fed.dir.path().join(format!("agent-{id}"));
        let mut c = agent_config(running.addr.port(), &fed.certs, id);
        c.state_dir = Some(state.clone());
        let shard: Vec<String> = (0..4).map(|i| format!("sentence {i}")).collect();
        let agent =
            fedmicse_agent::Agent::new(&c, shard, Arc::new(AddDelta(delta.clone()))).unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        tasks.push((tokio::spawn(agent.run(rx)), stop));
        states.push(state);
    }
    tokio::time::timeout(Duration::from_secs(60), running.wait_done())
        .await
        .expect("the secure round committed");
    for (task, stop) in tasks {
        let _ = stop.send(true);
        let report = task.await.unwrap().unwrap();
        assert_eq!(report.rounds_trained, vec![1]);
    }
    deltas
        .iter()
        .zip(states)
        .map(|((_, delta), state)| sent_values(delta, &state))
        .collect()
}

/// What an agent masked: its delta minus the residual it carries (both from its side).
fn sent_values(delta: &TensorMap, state: &Path) -> TensorMap {
    let file = state.join("residual.safetensors");
    let residual = if file.exists() {
        fedmicse_tensors::safetensors::read(&file).unwrap()
    } else {
        TensorMap::new()
    };
    delta
        .iter()
        .map(|(n, t)| {
            let data = match residual.get(n) {
                Some(r) => t.data.iter().zip(&r.data).map(|(d, r)| d - r).collect(),
                None => t.data.clone(),
            };
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

fn flat(map: &TensorMap) -> Vec<f64> {
    map.values()
        .flat_map(|t| t.data.iter().map(|&v| v as f64))
        .collect()
}

fn model_change(running: &Running, start: &TensorMap) -> TensorMap {
    let now = &running.global().tensors;
    start
        .iter()
        .filter(|(n, _)| n.starts_with(TRAINABLE))
        .map(|(n, t)| {
            let data = t
                .data
                .iter()
                .zip(&now[n].data)
                .map(|(a, b)| b - a)
                .collect();
            (n.clone(), HostTensor::new(t.shape.clone(), data))
        })
        .collect()
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Three agents whose deltas sum to zero: what the coordinator may learn (their mean) is
/// then unrelated to each of them, so anything stored or logged that resembles one of
/// them is a leak. Updates travel as 16-bit integers (f32 under secure aggregation), so
/// the revealed mean is zero up to rounding noise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_stores_and_logs_nothing_that_resembles_an_update() {
    let logs = logs();
    let ids = ["a", "b", "c"];
    let fed = federation(&ids);
    let running = start(secure_config(&fed, &ids, 3, ElementType::F32)).await;
    let start_model = running.global().tensors.clone();
    let a = uniform(&start_model, TRAINABLE, 1, 3e-4);
    let b = uniform(&start_model, TRAINABLE, 2, 3e-4);
    let c = combine(&a, &b, |x, y| -(x + y));
    let sent = run_honest(&running, &fed, &[("a", a), ("b", b), ("c", c)]).await;
    let record = running.history().last().unwrap().clone();
    assert_eq!((record.round, record.clients), (1, 3));
    // The committed step is the mean of what the agents masked.
    let mean = combine(
        &combine(&sent[0], &sent[1], |x, y| x + y),
        &sent[2],
        |x, y| (x + y) / 3.0,
    );
    // To f32 rounding of weights near 1 (LayerNorm): 2 ulps.
    assert_tensors_within(&model_change(&running, &start_model), &mean, 2.5e-7);
    running.shutdown().await;

    // Every tensor of every file the coordinator keeps, against every agent's update.
    let mut files = Vec::new();
    all_files(&fed.state(), &mut files);
    let mut compared = 0;
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
    {
        let stored = fedmicse_tensors::safetensors::read(file).unwrap();
        let stored: TensorMap = stored
            .into_iter()
            .filter(|(n, _)| sent[0].contains_key(n))
            .collect();
        if stored.len() != sent[0].len() {
            continue;
        }
        for (i, s) in sent.iter().enumerate() {
            let r = pearson(&flat(&stored), &flat(s));
            assert!(
                r.abs() < 0.01,
                "{}: r = {r} with agent {i}'s update",
                file.display()
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 6,
        "only {compared} comparisons: the checkpoints were not found"
    );
    // No stored update files, and logs that could not hold one (a 2M-value update is
    // megabytes; every log line is short).
    assert!(
        files
            .iter()
            .all(|f| !f.to_string_lossy().contains("updates/")),
        "{files:?}"
    );
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("secure sum revealed"),
        "the session logged nothing"
    );
    assert!(
        text.lines().all(|l| l.len() < 2000),
        "a log line of {} bytes",
        text.lines().map(str::len).max().unwrap_or(0)
    );
}

/// A crafted agent that takes part until `stop_after` protocol steps, then vanishes.
async fn partial_agent(mut conn: Connection, stop_after: usize) -> Result<(), tonic::Status> {
    let resp = loop {
        let r = conn.join(4).await?;
        if r.selected && r.secure.is_some() {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let p = resp.secure.unwrap();
    let config = convert::round_config(resp.round, &p).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::from_rng(&mut rand::rng());
    let (adv, keys) = agent::advertise(config, p.agent_index, &mut rng).unwrap();
    let dir = conn
        .advertise_keys(convert::keys_to_pb(resp.round, &keys))
        .await?;
    let dir: Vec<_> = dir
        .keys
        .iter()
        .map(|k| convert::keys_from_pb(k).unwrap())
        .collect();
    let (_, shares) = adv.share_keys(&dir, &mut rng).unwrap();
    if stop_after == 1 {
        // Its shares are out; it never masks. (It stops joining too.)
        let _ = conn
            .share_keys(convert::shares_to_pb(
                resp.round,
                p.agent_index,
                &shares.shares,
            ))
            .await?;
        return Ok(());
    }
    unreachable!("only dropping after the shares is crafted here")
}

/// Four agents selected, one vanishes after handing out its key shares: the round commits
/// the mean of the three others exactly (its pairwise masks are rebuilt and removed), with
/// int8 updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_vanishing_after_sharing_keys_leaves_the_mean_of_the_others() {
    logs();
    let ids = ["a", "b", "c", "d"];
    let fed = federation(&ids);
    // All four must be in before the round opens (so all four are selected); the sum
    // then needs the threshold, 3 of them.
    let running = start(secure_config(&fed, &ids, 4, ElementType::Int8)).await;
    let start_model = running.global().tensors.clone();
    let vanishing = tokio::spawn(partial_agent(connect(running.addr, &fed.certs, "d"), 1));
    let deltas: Vec<(&str, TensorMap)> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, uniform(&start_model, TRAINABLE, 10 + i as u64, 5e-4)))
        .collect();
    let sent = run_honest(&running, &fed, &deltas).await;
    vanishing.await.unwrap().unwrap();
    let record = running.history().last().unwrap().clone();
    assert_eq!(record.clients, 3, "the vanished agent is not in the sum");
    let sum = combine(&sent[0], &sent[1], |x, y| x + y);
    let mean = combine(&sum, &sent[2], |x, y| (x + y) / 3.0);
    // int8 steps are 1e-3/127 ≈ 8e-6: this is the mean of what was masked, to the f32
    // rounding of weights near 1 (2 ulps).
    assert_tensors_within(&model_change(&running, &start_model), &mean, 2.5e-7);
    running.shutdown().await;
}

/// Four agents selected (threshold 3), two vanish after sharing keys: the two survivors
/// are too few to unmask anything; the round is abandoned, they are told so, and the
/// model is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_few_survivors_abandon_the_round_and_the_model_stays() {
    logs();
    let ids = ["a", "b", "c", "d"];
    let fed = federation(&ids);
    let mut config = secure_config(&fed, &ids, 4, ElementType::Int8);
    config.federation.agent_timeout_secs = 2;
    let running = start(config).await;
    let digest = running.global().digest.clone();
    let quitters: Vec<_> = ["c", "d"]
        .iter()
        .map(|id| tokio::spawn(partial_agent(connect(running.addr, &fed.certs, id), 1)))
        .collect();
    let start_model = running.global().tensors.clone();
    let mut honest = Vec::new();
    for (i, id) in ["a", "b"].iter().enumerate() {
        let mut c = agent_config(running.addr.port(), &fed.certs, id);
        c.retry.initial_ms = 60_000;
        c.retry.max_ms = 60_000;
        let delta = uniform(&start_model, TRAINABLE, 20 + i as u64, 5e-4);
        let agent =
            fedmicse_agent::Agent::new(&c, vec!["s".into(); 4], Arc::new(AddDelta(delta))).unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        honest.push((tokio::spawn(agent.run(rx)), stop));
    }
    for q in quitters {
        q.await.unwrap().unwrap();
    }
    // The masked step times out (3 s) with 2 < 3 survivors: abandoned.
    let abandoned = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
            if text.contains("secure aggregation could not finish") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(abandoned.is_ok(), "the round was not abandoned");
    assert_eq!(running.global().digest, digest, "the model changed");
    assert_eq!(running.global().round, 0);
    assert_eq!(running.history().len(), 1, "only round 0 is committed");
    for (task, stop) in honest {
        let _ = stop.send(true);
        let report = task.await.unwrap().unwrap();
        assert!(report.rounds_trained.is_empty(), "{report:?}");
    }
    running.shutdown().await;
}

/// Moves the weights by a known delta, the first time only after `delay`.
struct SlowOnce(AddDelta, Mutex<Option<Duration>>);

impl fedmicse_runtime::LocalTrainer for SlowOnce {
    fn train(
        &self,
        start: fedmicse_runtime::ModelParts<'_>,
        shard: &[String],
        task: &fedmicse_federation::TaskConfig,
        seed: u64,
    ) -> Result<(TensorMap, fedmicse_runtime::TrainReport), fedmicse_runtime::RuntimeError> {
        if let Some(d) = self.1.lock().unwrap().take() {
            std::thread::sleep(d);
        }
        self.0.train(start, shard, task, seed)
    }
}

/// The coordinator stops while two agents wait in the key step for a slow third: the
/// restarted coordinator (same state, same address) reopens the round with a fresh
/// session, the agents resend what they trained, and the round commits their mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_restart_mid_protocol_reopens_the_round_cleanly() {
    logs();
    let ids = ["a", "b", "c"];
    let fed = federation(&ids);
    let config = secure_config(&fed, &ids, 3, ElementType::Int8);
    let running = start(config.clone()).await;
    let addr = running.addr;
    let start_model = running.global().tensors.clone();
    let mut agents = Vec::new();
    let mut deltas = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let delta = uniform(&start_model, TRAINABLE, 30 + i as u64, 5e-4);
        let slow = (*id == "c").then_some(Duration::from_secs(4));
        let trainer = SlowOnce(AddDelta(delta.clone()), Mutex::new(slow));
        let state = fed.dir.path().join(format!("agent-{id}"));
        let mut c = agent_config(addr.port(), &fed.certs, id);
        c.state_dir = Some(state.clone());
        c.retry.initial_ms = 100;
        c.retry.max_ms = 500;
        let agent = fedmicse_agent::Agent::new(&c, vec!["s".into(); 4], Arc::new(trainer)).unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        agents.push((tokio::spawn(agent.run(rx)), stop));
        deltas.push((delta, state));
    }
    // a and b train at once and wait for c's keys; stop the coordinator meanwhile.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(running.history().len() == 1, "nothing committed yet");
    running.shutdown().await;
    let c = tokio::task::spawn_blocking(move || {
        fedmicse_coordinator::Coordinator::new(config, fedmicse_encoder::BurnRuntime::shared())
    })
    .await
    .unwrap()
    .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let running = c.serve(listener).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), running.wait_done())
        .await
        .expect("the reopened round committed");
    for (task, stop) in agents {
        let _ = stop.send(true);
        assert_eq!(task.await.unwrap().unwrap().rounds_trained, vec![1]);
    }
    let record = running.history().last().unwrap().clone();
    assert_eq!((record.round, record.clients), (1, 3));
    let sent: Vec<TensorMap> = deltas.iter().map(|(d, s)| sent_values(d, s)).collect();
    let sum = combine(&sent[0], &sent[1], |x, y| x + y);
    let mean = combine(&sum, &sent[2], |x, y| (x + y) / 3.0);
    assert_tensors_within(&model_change(&running, &start_model), &mean, 2.5e-7);
    running.shutdown().await;
}
