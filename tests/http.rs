//! Operating a federation: Prometheus metrics, the HTTP embeddings API, `fedmicse status`
//! and the plots.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::fed::*;
use common::*;
use fedmicse_agent::Agent;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
        Err(ureq::Error::StatusCode(c)) => (c, String::new()),
        Err(e) => panic!("{url}: {e}"),
    }
}

fn post(url: &str, body: &str) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

fn vectors(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| f32s(r)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_http_api_status_and_agent_metrics() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["real", "fake"]);
    let dev = dir.path().join("dev.tsv");
    write_stsb_dev(&dev, 30);
    let mut config =
        coordinator_config(&model, &dir.path().join("state"), &certs, &["real", "fake"]);
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    config.http.embeddings_api = true;
    config.eval.dev_file = Some(dev);
    config.task.batch_size = 8;
    config.task.max_len = 16;
    config.task.ami_samples = 20;
    let running = start(config).await;
    let http = format!("http://{}", running.http_addr.unwrap());

    // A real agent (trains locally) with its own metrics endpoint, and a scripted one.
    let agent_port = free_port();
    let shard: Vec<String> =
        fedmicse_training::data::read_sentences(&root().join("data/wiki/wiki_sentences.txt"))
            .unwrap()[..24]
            .to_vec();
    let mut cfg = agent_config(running.addr.port(), &certs, "real");
    cfg.http.listen = Some(format!("127.0.0.1:{agent_port}").parse().unwrap());
    let agent = Agent::new(
        &cfg,
        shard,
        std::sync::Arc::new(fedmicse_training::BurnTrainer::new(Default::default()).unwrap()),
    )
    .unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let real = tokio::spawn(agent.run(stop_rx));
    let mut fake = connect(running.addr, &certs, "fake");
    let round = wait_selected(&mut fake).await;
    let g = fake.pull(round).await.unwrap().tensors;
    // One refused update (wrong round) so the refusal series has a value.
    assert!(
        fake.submit(
            round + 5,
            3,
            metrics(),
            Arc::new(synthetic_delta(&g, 1, 0.01))
        )
        .await
        .is_err()
    );
    fake.submit(round, 3, metrics(), Arc::new(synthetic_delta(&g, 2, 0.01)))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), running.wait_done())
        .await
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), real)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_trained, vec![1]);

    let (code, m) = tokio::task::spawn_blocking({
        let http = http.clone();
        move || get(&format!("{http}/metrics"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    for series in [
        "fedmicse_round ",
        "fedmicse_rounds_total ",
        "fedmicse_phase{phase=\"done\"} 1",
        "fedmicse_agents_connected ",
        "fedmicse_agents_selected ",
        "fedmicse_agents_answered ",
        "fedmicse_updates_refused_total{reason=\"wrong_round\"} 1",
        "fedmicse_bytes_received_total ",
        "fedmicse_bytes_sent_total ",
        "fedmicse_aggregation_seconds_count 1",
        "fedmicse_global_dev_spearman ",
    ] {
        assert!(m.contains(series), "{series} missing in\n{m}");
    }
    let agent_metrics =
        tokio::task::spawn_blocking(move || get(&format!("http://127.0.0.1:{agent_port}/metrics")))
            .await
            .unwrap()
            .1;
    for series in [
        "fedmicse_agent_local_steps_total 3",
        "fedmicse_agent_loss ",
        "fedmicse_agent_sentences_per_second ",
        "fedmicse_agent_rounds_total 1",
    ] {
        assert!(
            agent_metrics.contains(series),
            "{series} missing in\n{agent_metrics}"
        );
    }

    // HTTP API against `fedmicse embed` on the round's checkpoint.
    let ckpt = running.checkpoint_dir(1);
    let sentences = ["A man plays a guitar.", "", "Zürich at night"];
    let cli = cli_embed(&ckpt, &["--normalize", "--max-len", "128"], &sentences);
    let http2 = http.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let http = http2;
        assert_eq!(get(&format!("{http}/health")).0, 200);
        assert_eq!(get(&format!("{http}/ready")).0, 200);
        let (code, v) = post(
            &format!("{http}/embed"),
            &serde_json::json!({"inputs": sentences, "normalize": true}).to_string(),
        );
        assert_eq!(code, 200, "{v}");
        let got = vectors(&v);
        assert_eq!(got.len(), 3);
        for (g, c) in got.iter().zip(&cli) {
            assert!(max_abs_diff(g, c) < 1e-6);
        }
        // OpenAI-compatible: a list and a single string.
        let (code, v) = post(
            &format!("{http}/v1/embeddings"),
            r#"{"input": ["A man plays a guitar.", "Zürich at night"], "model": "fedmicse-minilm"}"#,
        );
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "fedmicse-minilm");
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["index"], 1);
        assert!(max_abs_diff(&f32s(&v["data"][1]["embedding"]), &cli[2]) < 1e-6);
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        let (code, v) = post(
            &format!("{http}/v1/embeddings"),
            r#"{"input": "A man plays a guitar."}"#,
        );
        assert_eq!(code, 200, "{v}");
        assert!(max_abs_diff(&f32s(&v["data"][0]["embedding"]), &cli[0]) < 1e-6);
        let (code, v) = post(
            &format!("{http}/similarity"),
            r#"{"inputs": {"source_sentence": "A man plays a guitar.", "sentences": ["A man plays a guitar.", "Zürich at night"]}}"#,
        );
        assert_eq!(code, 200, "{v}");
        assert!((v[0].as_f64().unwrap() - 1.0).abs() < 1e-5);
        // Malformed JSON, wrong shapes, too many inputs.
        let (code, v) = post(&format!("{http}/embed"), r#"{"inputs": ["unterminated"#);
        assert_eq!(code, 400);
        assert!(
            v["error"].as_str().unwrap().contains("malformed JSON"),
            "{v}"
        );
        let (code, v) = post(&format!("{http}/v1/embeddings"), r#"{"input": 42}"#);
        assert_eq!(code, 400);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("malformed JSON"),
            "{v}"
        );
        let many: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
        let (code, _) = post(
            &format!("{http}/embed"),
            &serde_json::json!({"inputs": many}).to_string(),
        );
        assert_eq!(code, 413);
        let (code, _) = post(
            &format!("{http}/embed"),
            r#"{"inputs": "x", "pooling": "max"}"#,
        );
        assert_eq!(code, 400);
        let m = get(&format!("{http}/metrics")).1;
        assert!(
            m.contains("fedmicse_inference_requests_total{endpoint=\"http_embed\",status=\"ok\"}"),
            "{m}"
        );
        assert!(
            m.contains("fedmicse_inference_latency_seconds_count"),
            "{m}"
        );
    });
    checks.await.unwrap();

    // `fedmicse status` reads the same state over gRPC.
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_fedmicse"))
            .args([
                "status",
                "--json",
                "--server-name",
                "localhost",
                "--coordinator",
            ])
            .arg(format!("https://127.0.0.1:{}", running.addr.port()))
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("fake.pem"))
            .arg("--key")
            .arg(certs.join("fake.key")),
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["phase"], "PHASE_DONE");
    assert_eq!(s["history"].as_array().unwrap().len(), 2);
    assert_eq!(s["history"][1]["clients"], 2);

    // `fedmicse plot rounds` from the coordinator's round log.
    let png = dir.path().join("rounds.png");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_fedmicse"))
            .args(["plot", "rounds", "--log"])
            .arg(dir.path().join("state/rounds.jsonl"))
            .arg("--out")
            .arg(&png),
    );
    // Three panels (dev Spearman, loss, traffic): 900 × (60 + 3 × 320).
    assert_chart_png(&png, 900, 1020);
    running.shutdown().await;
}

#[test]
fn plot_embeddings_draws_a_labelled_projection() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("topics.tsv");
    let mut text = String::from("label\tsentence\n");
    let topics = [
        (
            "sports",
            [
                "The striker scored twice in the final.",
                "The team won the championship game.",
                "She ran the marathon in record time.",
                "The goalkeeper saved a penalty.",
            ],
        ),
        (
            "food",
            [
                "The soup needs more salt.",
                "He baked fresh bread this morning.",
                "We ordered pizza with mushrooms.",
                "The chef grilled the salmon.",
            ],
        ),
        (
            "computers",
            [
                "The laptop battery drains quickly.",
                "Install the latest security update.",
                "The server crashed under heavy load.",
                "She wrote the program in Rust.",
            ],
        ),
    ];
    for (label, sentences) in topics {
        for s in sentences {
            text.push_str(&format!("{label}\t{s}\n"));
        }
    }
    std::fs::write(&tsv, text).unwrap();
    let png = dir.path().join("emb.png");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_fedmicse"))
            .args(["plot", "embeddings", "--pooling", "mean", "--model"])
            .arg(minilm())
            .arg("--input")
            .arg(&tsv)
            .arg("--out")
            .arg(&png),
    );
    // The scatter plot is 900 × 760; its legend shows the first class's colour.
    assert_chart_png(&png, 900, 760);
    let err = Command::new(env!("CARGO_BIN_EXE_fedmicse"))
        .args(["plot", "embeddings", "--label-column", "topic", "--model"])
        .arg(minilm())
        .arg("--input")
        .arg(&tsv)
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no column \"topic\""));
}
