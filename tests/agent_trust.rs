//! Agents verify what they receive: a hostile coordinator (a hand-written `Federation`
//! server with the federation's own certificate, over real mutual TLS) that sends an
//! unknown task, an oversized model, or a model other than the one announced at Join,
//! never gets an agent to train and submit. A positive control shows the same server,
//! behaving honestly, does get an update.

mod common;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fed::{certs_for, tiny_model};
use fedmicse_agent::{Agent, AgentConfig};
use fedmicse_coordinator::GlobalModel;
use fedmicse_encoder::{Encoder, TensorMap};
use fedmicse_federation::TaskConfig;
use fedmicse_wire::pb::federation_server::{Federation, FederationServer};
use fedmicse_wire::pb::{
    self, JoinRequest, JoinResponse, ModelChunk, ModelFile, ModelHeader, PullRequest,
    StatusRequest, StatusResponse, SubmitResponse, TensorChunk, UpdateChunk, model_chunk,
};
use fedmicse_wire::{TlsFiles, chunk_tensors};
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::{Request, Response, Status, Streaming};

/// The round the hostile coordinator claims is open (its model should be round 0).
const OPEN_ROUND: u64 = 1;

/// What the hostile coordinator answers, and what it saw.
struct Script {
    join: JoinResponse,
    header: ModelHeader,
    chunks: Vec<TensorChunk>,
    joins: AtomicUsize,
    pulls: AtomicUsize,
    submits: AtomicUsize,
}

#[derive(Clone)]
struct Hostile(Arc<Script>);

type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for Hostile {
    async fn join(&self, _req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.0.joins.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(self.0.join.clone()))
    }

    type PullModelStream = ModelStream;

    async fn pull_model(
        &self,
        _req: Request<PullRequest>,
    ) -> Result<Response<ModelStream>, Status> {
        self.0.pulls.fetch_add(1, Ordering::SeqCst);
        let mut msgs = vec![Ok(ModelChunk {
            part: Some(model_chunk::Part::Header(self.0.header.clone())),
        })];
        msgs.extend(self.0.chunks.iter().map(|c| {
            Ok(ModelChunk {
                part: Some(model_chunk::Part::Tensor(c.clone())),
            })
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<SubmitResponse>, Status> {
        self.0.submits.fetch_add(1, Ordering::SeqCst);
        let mut stream = req.into_inner();
        while stream.message().await?.is_some() {}
        Ok(Response::new(SubmitResponse {
            accepted: true,
            round: OPEN_ROUND,
            message: "thanks".into(),
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse::default()))
    }
}

/// Certificates for the coordinator and agent "a", and the model an honest coordinator
/// would send for round [`OPEN_ROUND`] (the global model of round 0).
struct Setup {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    global: GlobalModel,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(&dir.path().join("model"), 32, 2, 2, 64);
    let certs = dir.path().join("certs");
    certs_for(&certs, &["a"]);
    let device = fedmicse_encoder::device::cpu();
    let encoder = Encoder::load(&model_dir, &device).unwrap();
    let mut tensors = encoder.tensors().unwrap();
    tensors.extend(fedmicse_coordinator::store::seeded_head(32, 1));
    let files = encoder.files().unwrap();
    Setup {
        _dir: dir,
        certs,
        global: GlobalModel::new(0, tensors, files),
    }
}

/// A small, quick task: one step of batch 2.
fn task() -> pb::Task {
    pb::Task::from(&TaskConfig {
        steps: 1,
        batch_size: 2,
        max_len: 16,
        ami_samples: 8,
        ..Default::default()
    })
}

/// The honest script: a selected Join for [`OPEN_ROUND`] announcing `global`'s digest, and
/// `global` (round 0) streamed as it is.
fn honest(global: &GlobalModel) -> Script {
    Script {
        join: JoinResponse {
            client_id: "a".into(),
            phase: pb::Phase::Training as i32,
            round: OPEN_ROUND,
            selected: true,
            task: Some(task()),
            poll_after_ms: 50,
            model_digest: global.digest.clone(),
            rounds_total: 1,
            ..Default::default()
        },
        header: header_of(global.round, &global.tensors, &global.files),
        chunks: chunk_tensors(&global.tensors).collect(),
        joins: AtomicUsize::new(0),
        pulls: AtomicUsize::new(0),
        submits: AtomicUsize::new(0),
    }
}

fn header_of(round: u64, tensors: &TensorMap, files: &[(String, Vec<u8>)]) -> ModelHeader {
    ModelHeader {
        round,
        tensor_count: tensors.len() as u32,
        total_bytes: fedmicse_wire::tensors::total_bytes(tensors),
        digest: fedmicse_wire::digest(tensors),
        files: files
            .iter()
            .map(|(name, content)| ModelFile {
                name: name.clone(),
                content: content.clone(),
            })
            .collect(),
    }
}

/// Agent `a` of the coordinator at `port`, retrying fast.
fn agent_config(certs: &Path, port: u16) -> AgentConfig {
    AgentConfig {
        retry: fedmicse_agent::config::RetryConfig {
            initial_ms: 50,
            max_ms: 200,
        },
        ..common::fed::agent_config(port, certs, "a")
    }
}

/// What happened while a real agent talked to the hostile coordinator.
#[derive(Debug)]
struct Outcome {
    joins: usize,
    pulls: usize,
    submits: usize,
    failures: u64,
    steps: u64,
    rounds_trained: Vec<u64>,
}

/// Serves `script` over mutual TLS, runs a real agent against it until `done` holds (or
/// 60 s pass), stops both, and reports.
async fn run_against(
    certs: &Path,
    script: Script,
    limits: Option<fedmicse_agent::config::LimitsConfig>,
    done: impl Fn(&Script, u64) -> bool,
) -> Outcome {
    let script = Arc::new(script);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = TlsFiles::in_dir(certs, "coordinator")
        .server_config()
        .unwrap();
    let (stop_server, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = FederationServer::new(Hostile(script.clone()))
        .max_decoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let mut config = agent_config(certs, port);
    if let Some(l) = limits {
        config.limits = l;
    }
    let shard: Vec<String> = [
        "A man is playing a guitar.",
        "The cat sleeps on the warm windowsill.",
        "Stock markets fell sharply on Monday.",
        "She planted tomatoes in the garden.",
    ]
    .map(String::from)
    .to_vec();
    let agent = Agent::new(
        &config,
        shard,
        std::sync::Arc::new(fedmicse_training::BurnTrainer::new(Default::default()).unwrap()),
    )
    .unwrap();
    let metrics = agent.metrics.clone();
    let (stop_tx, stop_agent) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(agent.run(stop_agent));

    let started = Instant::now();
    while !done(&script, metrics.failures.get()) && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the agent did not stop")
        .unwrap()
        .expect("the agent gave up instead of polling on");
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Outcome {
        joins: script.joins.load(Ordering::SeqCst),
        pulls: script.pulls.load(Ordering::SeqCst),
        submits: script.submits.load(Ordering::SeqCst),
        failures: metrics.failures.get(),
        steps: metrics.steps.get(),
        rounds_trained: report.rounds_trained,
    }
}

/// Refused, counted as failures, retried (polling goes on), never trained, never sent.
fn assert_refused(o: &Outcome, pulled: bool) {
    assert_eq!(o.submits, 0, "the agent submitted: {o:?}");
    assert!(o.rounds_trained.is_empty() && o.steps == 0, "{o:?}");
    assert!(
        o.failures >= 2 && o.joins >= 2,
        "no refusal and retry: {o:?}"
    );
    if pulled {
        assert!(o.pulls >= 2, "{o:?}");
    } else {
        assert_eq!(o.pulls, 0, "a refused task must not even pull: {o:?}");
    }
}

/// The agent refused twice (and so retried after the first).
fn refused_twice(_: &Script, failures: u64) -> bool {
    failures >= 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn positive_control_an_honest_answer_gets_an_update() {
    let s = setup();
    let o = run_against(&s.certs, honest(&s.global), None, |sc, _| {
        sc.submits.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(o.submits >= 1, "the honest control got no update: {o:?}");
    assert_eq!(o.rounds_trained.first(), Some(&OPEN_ROUND), "{o:?}");
    assert!(o.steps >= 1, "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_update_dtype_is_refused() {
    let s = setup();
    let mut script = honest(&s.global);
    script.join.task.as_mut().unwrap().update_dtype = 9;
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_objective_is_refused() {
    let s = setup();
    let mut script = honest(&s.global);
    script.join.task.as_mut().unwrap().objective = "infonce".into();
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, false);

    let mut script = honest(&s.global);
    script.join.task.as_mut().unwrap().objective = String::new();
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_task_is_refused() {
    let s = setup();
    let mut script = honest(&s.global);
    script.join.task.as_mut().unwrap().steps = 2_000_000_000;
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_beyond_the_agents_limits_is_refused() {
    let s = setup();
    // A header declaring more than the default 8 GiB.
    let mut script = honest(&s.global);
    script.header.total_bytes = (8 << 30) + 1;
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, true);

    // An honest header beyond this agent's own `[limits]`.
    let small = fedmicse_agent::config::LimitsConfig {
        max_total_bytes: 1000,
        ..Default::default()
    };
    let o = run_against(&s.certs, honest(&s.global), Some(small), refused_twice).await;
    assert_refused(&o, true);

    // Too many files in the header.
    let mut script = honest(&s.global);
    script.header.files = (0..33)
        .map(|i| ModelFile {
            name: format!("f{i}"),
            content: vec![b'x'; 10],
        })
        .collect();
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_other_than_the_announced_one_is_refused() {
    let s = setup();
    // A different, self-consistent model (its header's digest matches its tensors), not
    // the one whose digest the Join answer announced.
    let mut other = s.global.tensors.clone();
    let t = other.get_mut("mlp.dense.bias").unwrap();
    t.data[0] += 1.0;
    let mut script = honest(&s.global);
    script.header = header_of(0, &other, &s.global.files);
    script.chunks = chunk_tensors(&other).collect();
    assert_ne!(script.header.digest, script.join.model_digest);
    let o = run_against(&s.certs, script, None, refused_twice).await;
    assert_refused(&o, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_of_the_wrong_round_is_refused() {
    let s = setup();
    // The right digest, but claimed to be the model of another round than OPEN_ROUND - 1.
    for round in [OPEN_ROUND, OPEN_ROUND + 4, u64::MAX] {
        let mut script = honest(&s.global);
        script.header.round = round;
        let o = run_against(&s.certs, script, None, refused_twice).await;
        assert_refused(&o, true);
    }
}
