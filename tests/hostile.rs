//! Attacks on the federation, performed over the real stack by crafted clients (issue 14):
//! a hostile agent's update, a stalled upload and download, strangers holding connections,
//! a path in a plaintext client id, two parallel uploads from one agent, revocation during a
//! round and across a restart, robust rules configured where they cannot work. Each test
//! asserts what the attacker gets and that honest work goes on.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fed::*;
use common::*;
use fedmicse_encoder::{HostTensor, TensorMap};
use fedmicse_federation::UpdateRules;
use fedmicse_wire::client::{Connection, Target};
use fedmicse_wire::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// A delta of `value` everywhere, shaped like `global`.
fn constant_delta(global: &TensorMap, value: f32) -> TensorMap {
    global
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                HostTensor::new(t.shape.clone(), vec![value; t.data.len()]),
            )
        })
        .collect()
}

/// Whether the peer closes `s` within `limit` (EOF or an error on read).
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Registers every agent, then waits until each is selected; returns the round.
async fn select_all(conns: &mut [&mut Connection]) -> u64 {
    for c in conns.iter_mut() {
        c.join(100).await.unwrap();
    }
    let mut round = 0;
    for c in conns.iter_mut() {
        round = wait_selected(c).await;
    }
    round
}

/// Runs one honest round with whichever agents are selected (synthetic deltas), so that
/// afterwards every agent is registered and the next round selects them all.
async fn honest_round(conns: &mut [Connection]) {
    for c in conns.iter_mut() {
        c.join(100).await.unwrap();
    }
    let mut done = vec![false; conns.len()];
    for _ in 0..600 {
        let mut history = 0;
        for (i, c) in conns.iter_mut().enumerate() {
            let r = c.join(100).await.unwrap();
            if r.round == 1 && r.selected && !done[i] {
                let g = c.pull(1).await.unwrap().tensors;
                let d = synthetic_delta(&g, 50 + i as u64, 0.01);
                c.submit(1, 10, metrics(), Arc::new(d)).await.unwrap();
                done[i] = true;
            }
            history = c.status().await.unwrap().history.len();
        }
        if history >= 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the honest round did not commit");
}

async fn wait_done(running: &fedmicse_coordinator::Running, secs: u64) {
    tokio::time::timeout(Duration::from_secs(secs), running.wait_done())
        .await
        .expect("the federation finished in time");
}

/// Waits (30 s at most) for the federation to finish and checks that it committed the
/// FedAvg of `updates` (sample count, delta) applied to `global`.
async fn assert_commits_fedavg(
    running: &fedmicse_coordinator::Running,
    global: &TensorMap,
    updates: &[(u64, &TensorMap)],
) {
    wait_done(running, 30).await;
    assert_close(&running.global().tensors, &fedavg(global, updates));
}

/// Scenario 1, over MiniLM so the served model's STS-B dev means something: one agent of
/// three claims 10,000,000 samples and sends 3e38 everywhere.
async fn takeover(rules: UpdateRules) -> (Option<f64>, Option<f64>, TensorMap, Vec<Vec<f32>>) {
    let dir = tempfile::tempdir().unwrap();
    let model = minilm();
    let certs = dir.path().join("certs");
    let ids = ["a", "b", "mallory"];
    certs_for(&certs, &ids);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &ids);
    config.updates = rules;
    config.eval.dev_file = Some(root().join("data/sts/stsb/dev.tsv"));
    config.eval.max_pairs = 300;
    // Honest small steps only: the trainable set is the last layer and the head.
    config.task.trainable = vec!["encoder.layer.5.".into(), "mlp.".into()];
    let running = start(config).await;
    let before = running.history()[0].stsb_dev;
    let mut conns = connect_all(running.addr, &certs, &ids);
    let round = select_all(&mut conns.iter_mut().collect::<Vec<_>>()).await;
    // The attacker declares the same lie at Join.
    conns[2].join(10_000_000).await.unwrap();
    let global = conns[0].pull(round).await.unwrap().tensors;
    let names: Vec<String> = global
        .keys()
        .filter(|n| n.starts_with("encoder.layer.5.") || n.starts_with("mlp."))
        .cloned()
        .collect();
    let only =
        |m: TensorMap| -> TensorMap { m.into_iter().filter(|(n, _)| names.contains(n)).collect() };
    let start_tensors = only(global.clone());
    for (i, c) in conns.iter_mut().enumerate() {
        let (n, delta) = if i == 2 {
            (10_000_000, constant_delta(&start_tensors, 3e38))
        } else {
            (100, synthetic_delta(&start_tensors, i as u64 + 1, 1e-4))
        };
        let r = c
            .submit(round, n, metrics(), Arc::new(delta))
            .await
            .unwrap();
        assert!(r.accepted);
    }
    wait_done(&running, 300).await;
    let after = running.history().last().unwrap().stsb_dev;
    let served = conns[0]
        .embed(
            vec!["A man is playing a guitar.".into(), "Stocks fell.".into()],
            pb::Pooling::Cls,
            true,
        )
        .await
        .unwrap();
    assert_eq!(served.model_round, 1);
    let vectors = served.embeddings.into_iter().map(|e| e.values).collect();
    let tensors = only(running.global().tensors.clone());
    running.shutdown().await;
    (before, after, tensors, vectors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_agent_cannot_take_over_the_global_model() {
    let (before, after, tensors, vectors) = takeover(UpdateRules::default()).await;
    let (before, after) = (before.unwrap(), after.unwrap());
    eprintln!("STS-B dev (300 pairs): {before:.2} -> {after:.2} with the default defences");
    assert!(after >= before - 0.5, "dev fell from {before} to {after}");
    let largest = tensors
        .values()
        .flat_map(|t| t.data.iter())
        .fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        largest.is_finite() && largest < 100.0,
        "largest weight {largest}"
    );
    assert!(vectors.iter().flatten().all(|x| x.is_finite()));

    // The same attack without the defences is what they prevent (so this test can fail):
    // the attacker's weights are the model now, and the served embeddings are garbage.
    let (_, after_none, tensors, vectors) = takeover(UpdateRules::none()).await;
    let largest = tensors
        .values()
        .flat_map(|t| t.data.iter())
        .fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("without defences: dev {after_none:?}, largest weight {largest:e}");
    assert!(largest > 1e37, "the undefended attack should succeed");
    assert!(
        vectors.iter().flatten().any(|x| !x.is_finite())
            || after_none.is_none_or(|d| d < before - 5.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_upload_or_download_does_not_block_honest_agents() {
    let dir = tempfile::tempdir().unwrap();
    // Large enough (16 MB) that a download cannot fit in the flow-control windows.
    let model = tiny_model(&dir.path().join("model"), 128, 2, 2, 128);
    let certs = dir.path().join("certs");
    let ids = ["a", "b", "stall"];
    certs_for(&certs, &ids);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &ids);
    config.federation.min_clients = 2;
    // One permit each, so a single staller would block everyone without the timeouts.
    config.federation.max_concurrent_uploads = 1;
    config.federation.max_concurrent_downloads = 1;
    config.server.stream_idle_secs = 2;
    config.federation.rounds = 2;
    let running = start(config).await;
    let mut conns = connect_all(running.addr, &certs, &ids);
    // Round 1 registers everyone; round 2, which selects all three, is the attack.
    honest_round(&mut conns).await;
    let round = select_all(&mut conns.iter_mut().collect::<Vec<_>>()).await;
    assert_eq!(round, 2);
    // A reader that never reads holds the only download permit...
    let mut staller = raw_client(running.addr, &certs, "stall");
    let held_download = staller
        .pull_model(pb::PullRequest { round })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...until the idle timeout: an honest pull completes within it.
    let t = Instant::now();
    let global = conns[0].pull(round).await.unwrap().tensors;
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "honest pull waited {waited:?}"
    );
    drop(held_download);

    // An upload that sends its header and stops holds the only upload permit...
    let d_stall = synthetic_delta(&global, 9, 0.01);
    let stalled = held_upload(
        running.addr,
        &certs,
        "stall",
        update_header(round, 10, &d_stall),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let da = synthetic_delta(&global, 1, 0.01);
    let db = synthetic_delta(&global, 2, 0.01);
    let t = Instant::now();
    conns[0]
        .submit(round, 10, metrics(), Arc::new(da.clone()))
        .await
        .unwrap();
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "honest upload waited {waited:?}"
    );
    let err = stalled.finish().await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(err.message().contains("(idle)"), "{}", err.message());
    // ...and the staller is out of the round, so it commits as soon as b answers instead
    // of waiting for the deadline (120 s).
    conns[1]
        .submit(round, 10, metrics(), Arc::new(db.clone()))
        .await
        .unwrap();
    assert_commits_fedavg(&running, &global, &[(10, &da), (10, &db)]).await;
    assert_eq!(running.history().last().unwrap().clients, 2);
    assert_eq!(running.refusals().get("idle"), Some(&1));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_cannot_hold_connections() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a"]);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &["a"]);
    config.server.tls_handshake_timeout_secs = 1;
    config.server.max_connections = 4;
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    config.http.header_timeout_secs = 1;
    let running = start(config).await;
    // A TCP connection that never starts TLS is closed by the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(4)).await,
        "silent TCP stayed open"
    );
    // A half-sent HTTP header on the metrics port is closed by the header deadline.
    let http = running.http_addr.unwrap();
    let mut half = tokio::net::TcpStream::connect(http).await.unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut half, Duration::from_secs(4)).await,
        "half header stayed open"
    );
    // A flood beyond max_connections is closed at once; the first four wait for TLS...
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(tokio::net::TcpStream::connect(running.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_millis(500)).await,
        "the cap was not enforced"
    );
    // ...and time out, after which an honest agent is served.
    for s in flood.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(4)).await);
    }
    let mut a = connect(running.addr, &certs, "a");
    assert_eq!(a.join(1).await.unwrap().client_id, "a");
    let metrics = reqwest_get(http, "/metrics").await;
    assert!(
        metrics.contains("fedmicse_connections_closed{reason=\"grpc_over_limit\"} 1"),
        "{metrics}"
    );
    running.shutdown().await;
}

/// A plain HTTP/1.1 GET (no client library needed for one request).
async fn reqwest_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_client_ids_never_become_paths() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), 32, 2, 2, 64);
    let state = dir.path().join("deep/state");
    let mut config = coordinator_config(&model, &state, &dir.path().join("unused"), &[]);
    config.tls = None;
    config.server.allow_plaintext = true;
    config.federation.min_clients = 1;
    let running = start(config).await;
    let plain = |id: &str| {
        Connection::new(&Target {
            url: format!("http://127.0.0.1:{}", running.addr.port()),
            tls: None,
            domain: "localhost".into(),
            plaintext_client_id: Some(id.into()),
        })
        .unwrap()
    };
    for evil in ["../../../escaped", "..", "a/b", "x\\y", ".hidden"] {
        let err = plain(evil).join(100).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "{evil}: {}",
            err.message()
        );
    }
    // The upload path checks the same rule before reading anything.
    let mut evil = plain("../../../escaped");
    let g = running.global().tensors.clone();
    let d = synthetic_delta(&g, 3, 0.01);
    let err = evil
        .submit(1, 10, metrics(), Arc::new(d))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // An honest plaintext agent runs a round end to end.
    let mut ok = plain("lab-agent");
    let round = wait_selected(&mut ok).await;
    let global = ok.pull(round).await.unwrap().tensors;
    let d = synthetic_delta(&global, 4, 0.01);
    ok.submit(round, 10, metrics(), Arc::new(d.clone()))
        .await
        .unwrap();
    assert_commits_fedavg(&running, &global, &[(10, &d)]).await;
    running.shutdown().await;
    // Nothing was written outside the state folder.
    fn walk(p: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir.path(), &mut files);
    for f in &files {
        assert!(
            f.starts_with(&state) || f.starts_with(dir.path().join("model")),
            "written outside state_dir: {}",
            f.display()
        );
        assert!(!f.to_string_lossy().contains("escaped"), "{}", f.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_parallel_uploads_from_one_agent_cannot_overwrite_each_other() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    let ids = ["a", "b"];
    certs_for(&certs, &ids);
    let state = dir.path().join("state");
    let running = start(coordinator_config(&model, &state, &certs, &ids)).await;
    let mut conns = connect_all(running.addr, &certs, &ids);
    let round = select_all(&mut conns.iter_mut().collect::<Vec<_>>()).await;
    let global = conns[0].pull(round).await.unwrap().tensors;
    let first = synthetic_delta(&global, 1, 0.01);
    let second = synthetic_delta(&global, 2, 0.01);
    // The first upload is half sent when the second starts.
    let mut held = held_upload(running.addr, &certs, "a", update_header(round, 10, &first));
    held.send(&first, 0, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = conns[0]
        .submit(round, 10, metrics(), Arc::new(second.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("(busy)"), "{}", err.message());
    held.send(&first, 2, usize::MAX).await;
    assert!(held.finish().await.unwrap().accepted);
    // After the first is in, a different second update is a refused duplicate.
    let err = conns[0]
        .submit(round, 10, metrics(), Arc::new(second))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // The spooled file is the accepted update's, and only that.
    let spool: Vec<_> = std::fs::read_dir(state.join(format!("pending/round-{round:06}")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut spool = spool;
    spool.sort();
    // (selected.json records the round's selection for a restart.)
    assert_eq!(spool, ["a.safetensors", "selected.json"]);
    let db = synthetic_delta(&global, 3, 0.01);
    conns[1]
        .submit(round, 10, metrics(), Arc::new(db.clone()))
        .await
        .unwrap();
    assert_commits_fedavg(&running, &global, &[(10, &first), (10, &db)]).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_reaches_selection_uploads_in_flight_and_recovered_updates() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    let ids = ["a", "b", "c", "d"];
    certs_for(&certs, &ids);
    let list = dir.path().join("revoked.txt");
    std::fs::write(&list, "").unwrap();
    let state = dir.path().join("state");
    let config = {
        let mut c = coordinator_config(&model, &state, &certs, &ids);
        c.tls.as_mut().unwrap().revocation_list = Some(list.clone());
        c.federation.min_clients = 3;
        c.federation.rounds = 1;
        c
    };
    let running = start(config.clone()).await;
    let mut conns = connect_all(running.addr, &certs, &ids);
    // d registers, then is revoked before the round opens: it is not selected although
    // it joined within agent_timeout_secs.
    conns[3].join(100).await.unwrap();
    fedmicse_wire::certs::revoke(&list, Some("d"), None).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let round = select_all(&mut conns[..3].iter_mut().collect::<Vec<_>>()).await;
    let mut probe = connect(running.addr, &certs, "a");
    assert_eq!(probe.status().await.unwrap().selected, 3, "d was selected");
    let global = conns[0].pull(round).await.unwrap().tensors;
    let (da, db, dc) = (
        synthetic_delta(&global, 1, 0.01),
        synthetic_delta(&global, 2, 0.01),
        synthetic_delta(&global, 3, 0.01),
    );
    // c's update arrives and is stored; the coordinator stops before the round closes.
    conns[2]
        .submit(round, 10, metrics(), Arc::new(dc))
        .await
        .unwrap();
    // b's upload is in flight when b is revoked: it is refused at the end.
    let mut held = held_upload(running.addr, &certs, "b", update_header(round, 10, &db));
    held.send(&db, 0, 1).await;
    fedmicse_wire::certs::revoke(&list, None, Some(&certs.join("b.pem"))).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    held.send(&db, 1, usize::MAX).await;
    let err = held.finish().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    running.shutdown().await;
    assert_eq!(
        std::fs::read_dir(state.join(format!("pending/round-{round:06}")))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .count(),
        1,
        "only c's update is stored"
    );

    // c is revoked while the coordinator is down, b and d are reinstated; after the restart
    // c's stored update does not count, and the round commits from a, b and d.
    std::fs::write(&list, "c\n").unwrap();
    let running = start(config).await;
    let mut conns = connect_all(running.addr, &certs, &ids);
    let err = conns[2].join(100).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut others = conns
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, c)| c)
        .collect::<Vec<_>>();
    let round2 = select_all(&mut others).await;
    assert_eq!(round2, round, "the interrupted round reopens");
    drop(others);
    let mut d = conns.pop().unwrap();
    let dd = synthetic_delta(&global, 4, 0.01);
    conns[0]
        .submit(round, 10, metrics(), Arc::new(da.clone()))
        .await
        .unwrap();
    conns[1]
        .submit(round, 10, metrics(), Arc::new(db.clone()))
        .await
        .unwrap();
    d.submit(round, 10, metrics(), Arc::new(dd.clone()))
        .await
        .unwrap();
    assert_commits_fedavg(&running, &global, &[(10, &da), (10, &db), (10, &dd)]).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn robust_rules_refuse_federations_too_small_to_outvote_anyone() {
    use fedmicse_federation::Strategy;
    let Fed { dir, model, certs } = fed_dir(32, 64);
    let ids = ["a", "b", "c"];
    certs_for(&certs, &ids);
    let base = coordinator_config(&model, &dir.path().join("state"), &certs, &ids);
    let mut median2 = base.clone();
    median2.aggregation.strategy = Strategy::Median;
    median2.federation.min_clients = 2;
    let e = median2.validate().unwrap_err();
    assert!(e.contains("median") && e.contains("at least 3"), "{e}");
    let mut trimmed = base.clone();
    trimmed.aggregation.strategy = Strategy::TrimmedMean;
    trimmed.aggregation.trim_fraction = 0.1;
    let e = trimmed.validate().unwrap_err();
    assert!(
        e.contains("trims nothing") && e.contains("at least 10"),
        "{e}"
    );
    // The coordinator binary says so and exits non-zero.
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, toml::to_string(&median2).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedmicse"))
        .args(["coordinator", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("median"));

    // Where it can work, the median of three outvotes one hostile update.
    let mut median = base;
    median.aggregation.strategy = Strategy::Median;
    median.updates = UpdateRules::none();
    let running = start(median).await;
    let mut conns = connect_all(running.addr, &certs, &ids);
    let round = select_all(&mut conns.iter_mut().collect::<Vec<_>>()).await;
    let global = conns[0].pull(round).await.unwrap().tensors;
    let honest = constant_delta(&global, 0.001);
    let honest2 = constant_delta(&global, 0.002);
    let hostile = constant_delta(&global, 3e38);
    conns[0]
        .submit(round, 10, metrics(), Arc::new(honest.clone()))
        .await
        .unwrap();
    conns[1]
        .submit(round, 10, metrics(), Arc::new(honest2.clone()))
        .await
        .unwrap();
    conns[2]
        .submit(round, 10, metrics(), Arc::new(hostile))
        .await
        .unwrap();
    assert_commits_fedavg(&running, &global, &[(1, &honest2)]).await;
    running.shutdown().await;
}
