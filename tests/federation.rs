//! Federation end to end over real sockets on 127.0.0.1 with mutual TLS.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::fed::*;
use common::*;
use fedmicse_encoder::TensorMap;
use fedmicse_wire::client::{Connection, Target};
use fedmicse_wire::{TlsFiles, pb};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_round_with_three_agents_is_exactly_fedavg_and_inference_serves_it() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    let ids = ["silo-a", "silo-b", "silo-c"];
    certs_for(&certs, &ids);
    let state = dir.path().join("state");
    let running = start(coordinator_config(&model, &state, &certs, &ids)).await;
    let addr = running.addr;
    let start_model = running.global();

    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let certs = certs.clone();
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(addr, &certs, &id);
            let round = wait_selected(&mut conn).await;
            let pulled = conn.pull(round).await.unwrap();
            let delta = synthetic_delta(&pulled.tensors, i as u64 + 1, 0.01);
            let n = 10 * (i as u64 + 1);
            let r = conn
                .submit(round, n, metrics(), Arc::new(delta.clone()))
                .await
                .unwrap();
            assert!(r.accepted);
            // A retry of the same update is accepted and ignored.
            let again = conn
                .submit(round, n, metrics(), Arc::new(delta.clone()))
                .await
                .unwrap();
            assert!(
                again.message.contains("already received"),
                "{}",
                again.message
            );
            (pulled.tensors, n, delta)
        }));
    }
    let mut updates = Vec::new();
    for t in tasks {
        let (pulled, n, delta) = t.await.unwrap();
        assert_eq!(
            pulled, start_model.tensors,
            "agents pulled the global model"
        );
        updates.push((n, delta));
    }
    tokio::time::timeout(std::time::Duration::from_secs(60), running.wait_done())
        .await
        .unwrap();

    let refs: Vec<(u64, &TensorMap)> = updates.iter().map(|(n, d)| (*n, d)).collect();
    let want = fedavg(&start_model.tensors, &refs);
    let got = running.global();
    assert_eq!(got.round, 1);
    for (name, w) in &want {
        let g = &got.tensors[name];
        let diff = max_abs_diff(&g.data, &w.data);
        assert!(diff <= 1e-7, "{name}: {diff}");
    }
    let history = running.history();
    assert_eq!(history.last().unwrap().clients, 3);
    assert!(history.last().unwrap().bytes_up > 0 && history.last().unwrap().bytes_down > 0);

    // The committed checkpoint is a HuggingFace directory holding the same weights.
    let ckpt = running.checkpoint_dir(1);
    let on_disk =
        fedmicse_encoder::weights::read_checkpoint(&ckpt.join("model.safetensors")).unwrap();
    for (name, t) in &on_disk {
        assert_eq!(t, &got.tensors[name], "{name} on disk");
    }

    // Inference answers from round 1, with the vectors `fedmicse embed` gives on that checkpoint.
    let mut conn = connect(addr, &certs, "silo-a");
    let sentences = vec![
        "A man plays a guitar.".to_string(),
        "".to_string(),
        "Zürich at night".to_string(),
    ];
    let resp = conn
        .embed(sentences.clone(), pb::Pooling::Mean, true)
        .await
        .unwrap();
    assert_eq!(resp.model_round, 1);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let cli = cli_embed(
        &ckpt,
        &["--pooling", "mean", "--normalize", "--max-len", "128"],
        &refs,
    );
    assert_eq!(cli.len(), 3);
    for (a, b) in resp.embeddings.iter().zip(&cli) {
        assert!(max_abs_diff(&a.values, b) < 1e-6);
    }
    let sim = conn
        .similarity(
            sentences[0].clone(),
            vec![sentences[0].clone(), sentences[2].clone()],
            pb::Pooling::Cls,
        )
        .await
        .unwrap();
    assert!((sim.scores[0] - 1.0).abs() < 1e-5);
    // Oversized requests are refused with a clear status.
    let many = vec!["x".to_string(); 1000];
    let err = conn.embed(many, pb::Pooling::Cls, false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("limit"), "{}", err.message());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_cannot_join() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["silo-a", "mallory"]);
    // Another federation's CA, with an agent named like an allowed one.
    let other = dir.path().join("other");
    certs_for(&other, &["silo-a"]);
    let state = dir.path().join("state");
    let mut config = coordinator_config(&model, &state, &certs, &["silo-a"]);
    config.federation.min_clients = 1;
    let running = start(config).await;
    let url = format!("https://127.0.0.1:{}", running.addr.port());

    // No client certificate at all: the handshake fails at the first call.
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(certs.join("ca.pem")).unwrap());
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    let mut bare = pb::federation_client::FederationClient::new(channel);
    let err = bare.join(pb::JoinRequest::default()).await.unwrap_err();
    // Refused by the TLS layer: the call fails with a transport error underneath (a closed
    // or reset connection, whose code varies with timing), never with a status from the
    // coordinator's handlers (which would mean the handshake passed).
    let transport = |err: &tonic::Status| {
        use tonic::Code::*;
        !matches!(err.code(), Ok | PermissionDenied | Unauthenticated)
            && std::error::Error::source(err).is_some()
    };
    assert!(transport(&err), "no certificate: {err:?}");

    // A certificate from another CA.
    let mut foreign = Connection::new(&Target {
        url: url.clone(),
        tls: Some(TlsFiles {
            ca: certs.join("ca.pem"),
            cert: other.join("silo-a.pem"),
            key: other.join("silo-a.key"),
        }),
        domain: "localhost".into(),
        plaintext_client_id: None,
    })
    .unwrap();
    let err = foreign.join(1).await.unwrap_err();
    assert!(transport(&err), "foreign CA: {err:?}");

    // A valid certificate that is not on the allowlist.
    let mut mallory = connect(running.addr, &certs, "mallory");
    let err = mallory.join(1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("allowlist"));
    let err = mallory
        .submit(1, 5, metrics(), Arc::new(TensorMap::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Plaintext to a TLS coordinator.
    let mut plain = Connection::new(&Target {
        url: format!("http://127.0.0.1:{}", running.addr.port()),
        tls: None,
        domain: "localhost".into(),
        plaintext_client_id: Some("silo-a".into()),
    })
    .unwrap();
    let err = plain.join(1).await.unwrap_err();
    assert!(transport(&err), "plaintext: {err:?}");

    // Nothing of theirs entered: nobody is registered, no round opened, nothing refused as
    // an update; the allowed agent alone makes the round, which is its delta.
    let mut good = connect(running.addr, &certs, "silo-a");
    let status = good.status().await.unwrap();
    assert_eq!(status.connected, 0, "no stranger registered");
    assert_eq!(status.phase, pb::Phase::Waiting as i32);
    assert_eq!(status.round, 0);
    let round = wait_selected(&mut good).await;
    let pulled = good.pull(round).await.unwrap();
    let delta = synthetic_delta(&pulled.tensors, 9, 0.01);
    good.submit(round, 3, metrics(), Arc::new(delta.clone()))
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), running.wait_done())
        .await
        .unwrap();
    let want = fedavg(&pulled.tensors, &[(3, &delta)]);
    let got = running.global();
    for (name, w) in &want {
        assert!(max_abs_diff(&got.tensors[name].data, &w.data) <= 1e-7);
    }
    assert_eq!(running.history().last().unwrap().clients, 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100_megabyte_update_streams_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // hidden 1024 with a 30522-word vocabulary: 125 MB of word embeddings alone.
    let model = tiny_model(&dir.path().join("model"), 1024, 1, 16, 64);
    let certs = dir.path().join("certs");
    certs_for(&certs, &["big"]);
    let running = start(coordinator_config(
        &model,
        &dir.path().join("state"),
        &certs,
        &["big"],
    ))
    .await;
    let mut conn = connect(running.addr, &certs, "big");
    let round = wait_selected(&mut conn).await;
    let pulled = conn.pull(round).await.unwrap();
    let delta = synthetic_delta(&pulled.tensors, 5, 0.001);
    let bytes = fedmicse_wire::tensors::total_bytes(&delta);
    assert!(bytes > 100 << 20, "{bytes} bytes");
    // The gRPC message limit stays far below the update's size.
    assert!(fedmicse_wire::MAX_MESSAGE_BYTES < (bytes as usize) / 10);
    let r = conn
        .submit(round, 7, metrics(), Arc::new(delta.clone()))
        .await
        .unwrap();
    assert!(r.accepted);
    tokio::time::timeout(std::time::Duration::from_secs(120), running.wait_done())
        .await
        .unwrap();
    let got = running.global();
    let name = "embeddings.word_embeddings.weight";
    let want: Vec<f32> = pulled.tensors[name]
        .data
        .iter()
        .zip(&delta[name].data)
        .map(|(w, d)| (*w as f64 + *d as f64) as f32)
        .collect();
    assert!(max_abs_diff(&got.tensors[name].data, &want) <= 1e-7);
    assert_eq!(running.history().last().unwrap().bytes_up, bytes);
    running.shutdown().await;
}

#[test]
fn simulate_command_runs_a_small_federation() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = small_simulation(dir.path(), "partition = \"dirichlet:0.5\"\n");
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_fedmicse"))
            .args(["simulate", "--config"])
            .arg(&config)
            .args(["--rounds", "2"]),
    );
    let o = dir.path().join("out");
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("rounds.json")).unwrap()).unwrap();
    assert_eq!(log["byzantine"], serde_json::json!([]));
    assert!(log["attack"].is_null());
    assert_eq!(log["defences"], "default");
    let rounds = log["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "round 0 (start) and 2 rounds");
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i);
        for k in [
            "clients",
            "mean_loss",
            "stsb_dev",
            "bytes_up",
            "bytes_down",
            "seconds",
        ] {
            assert!(r.get(k).is_some(), "{k}");
        }
        assert!(r["stsb_dev"].as_f64().is_some());
    }
    assert_eq!(rounds[2]["clients"], 3);
    assert!(rounds[2]["mean_loss"].as_f64().unwrap().is_finite());
    assert!(rounds[2]["bytes_up"].as_u64().unwrap() > 0);
    // Three panels (dev Spearman, loss, traffic): 900 × (60 + 3 × 320).
    assert_chart_png(&o.join("rounds.png"), 900, 1020);
    let enc = fedmicse_encoder::Encoder::load(o.join("global"), &fedmicse_encoder::device::cpu())
        .unwrap();
    assert_eq!(enc.config.hidden_size, 32);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("stsb_dev"), "{stdout}");
}
