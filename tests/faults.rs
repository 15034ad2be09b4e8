//! Federation under faults and attack: bad updates refused one by one, vanished agents,
//! a coordinator killed with SIGKILL during aggregation, revoked and expired certificates,
//! many agents and concurrent inference during a model swap, garbage on the socket.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fed::*;
use fedmicse_encoder::TensorMap;
use fedmicse_wire::ElementType;
use fedmicse_wire::client::Connection;
use fedmicse_wire::pb::{self, UpdateHeader};
use tonic::Code;

async fn refused(
    conn: &mut Connection,
    header: UpdateHeader,
    delta: TensorMap,
    dtype: ElementType,
) -> tonic::Status {
    conn.submit_raw(header, Arc::new(delta), dtype)
        .await
        .expect_err("should be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_kind_of_bad_update_is_refused_with_its_own_status() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a", "b", "late"]);
    let mut config = coordinator_config(
        &model,
        &dir.path().join("state"),
        &certs,
        &["a", "b", "late"],
    );
    config.federation.min_clients = 2;
    config.updates.max_norm = Some(5.0);
    config.updates.max_samples = 100;
    let running = start(config).await;
    let (round, mut a, mut b) = two_selected(running.addr, &certs).await;
    let global = a.pull(round).await.unwrap().tensors;
    let good = synthetic_delta(&global, 1, 0.01);
    let f32 = ElementType::F32;

    let mut seen = std::collections::BTreeMap::new();
    let mut expect = |st: tonic::Status, code: Code, kind: &str| {
        assert_eq!(st.code(), code, "{kind}: {}", st.message());
        assert!(
            st.message().contains(&format!("({kind})")),
            "{kind}: {}",
            st.message()
        );
        *seen.entry(kind.to_string()).or_insert(0) += 1;
    };
    // Wrong round.
    expect(
        refused(
            &mut a,
            update_header(round + 1, 10, &good),
            good.clone(),
            f32,
        )
        .await,
        Code::FailedPrecondition,
        "wrong_round",
    );
    // Sample counts out of range.
    expect(
        refused(&mut a, update_header(round, 0, &good), good.clone(), f32).await,
        Code::InvalidArgument,
        "samples",
    );
    expect(
        refused(&mut a, update_header(round, 101, &good), good.clone(), f32).await,
        Code::InvalidArgument,
        "samples",
    );
    // A tensor missing.
    let mut missing = good.clone();
    missing.remove("pooler.dense.bias");
    expect(
        refused(&mut a, update_header(round, 10, &missing), missing, f32).await,
        Code::InvalidArgument,
        "names",
    );
    // A tensor with another shape (same size).
    let mut reshaped = good.clone();
    let t = reshaped
        .get_mut("encoder.layer.0.intermediate.dense.weight")
        .unwrap();
    t.shape.reverse();
    expect(
        refused(&mut a, update_header(round, 10, &reshaped), reshaped, f32).await,
        Code::InvalidArgument,
        "shape",
    );
    // NaN and infinity.
    let mut nan = good.clone();
    nan.get_mut("mlp.dense.bias").unwrap().data[3] = f32::NAN;
    expect(
        refused(&mut a, update_header(round, 10, &nan), nan, f32).await,
        Code::InvalidArgument,
        "non_finite",
    );
    let mut inf = good.clone();
    inf.get_mut("embeddings.LayerNorm.weight").unwrap().data[0] = f32::INFINITY;
    expect(
        refused(&mut a, update_header(round, 10, &inf), inf, f32).await,
        Code::InvalidArgument,
        "non_finite",
    );
    // Norm above the bound.
    let big = synthetic_delta(&global, 2, 10.0);
    expect(
        refused(&mut a, update_header(round, 10, &big), big, f32).await,
        Code::InvalidArgument,
        "norm",
    );
    // Digest that does not match the data.
    let mut h = update_header(round, 10, &good);
    h.digest[0] ^= 0xff;
    expect(
        refused(&mut a, h, good.clone(), f32).await,
        Code::DataLoss,
        "digest",
    );
    // Half precision when the task asks for f32.
    let h = UpdateHeader {
        total_bytes: fedmicse_wire::tensors::total_bytes_as(&good, ElementType::F16),
        digest: fedmicse_wire::tensors::digest_as(&good, ElementType::F16),
        ..update_header(round, 10, &good)
    };
    expect(
        refused(&mut a, h, good.clone(), ElementType::F16).await,
        Code::InvalidArgument,
        "dtype",
    );
    // Not selected (joined after the round opened): a's refused updates did not give its
    // slot away.
    let mut late = connect(running.addr, &certs, "late");
    late.join(5).await.unwrap();
    expect(
        refused(
            &mut late,
            update_header(round, 10, &good),
            good.clone(),
            f32,
        )
        .await,
        Code::FailedPrecondition,
        "not_selected",
    );

    // The valid updates (a's corrected one is still taken); then a different second update
    // from a is refused as a duplicate.
    let good_b = synthetic_delta(&global, 3, 0.01);
    assert!(
        a.submit(round, 10, metrics(), Arc::new(good.clone()))
            .await
            .unwrap()
            .accepted
    );
    let other = synthetic_delta(&global, 4, 0.01);
    expect(
        refused(&mut a, update_header(round, 10, &other), other, f32).await,
        Code::AlreadyExists,
        "duplicate",
    );
    assert!(
        b.submit(round, 20, metrics(), Arc::new(good_b.clone()))
            .await
            .unwrap()
            .accepted
    );
    tokio::time::timeout(Duration::from_secs(60), running.wait_done())
        .await
        .unwrap();

    assert_close(
        &running.global().tensors,
        &fedavg(&global, &[(10, &good), (20, &good_b)]),
    );
    assert_eq!(running.history().last().unwrap().clients, 2);
    let kinds: Vec<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "digest",
            "dtype",
            "duplicate",
            "names",
            "non_finite",
            "norm",
            "not_selected",
            "samples",
            "shape",
            "wrong_round"
        ]
    );
    let counted = running.refusals();
    for (k, n) in &seen {
        assert_eq!(counted.get(k), Some(n), "{k} counted");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vanished_agents_do_not_block_and_too_few_answers_retry_the_round() {
    let Fed { dir, model, certs } = fed_dir(64, 64);
    let ids = ["a", "b", "c"];
    certs_for(&certs, &ids);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &ids);
    config.federation.min_clients = 2;
    config.federation.round_deadline_secs = 3;
    let running = start(config).await;
    let mut conns = connect_all(running.addr, &certs, &ids);
    for c in conns.iter_mut() {
        c.join(100).await.unwrap(); // registered before the round opens
    }
    let mut round = 0;
    for c in conns.iter_mut() {
        round = wait_selected(c).await;
    }
    let global = conns[0].pull(round).await.unwrap().tensors;
    let da = synthetic_delta(&global, 11, 0.01);
    // Only a answers before the deadline: too few, the round is retried, nothing changes.
    conns[0]
        .submit(round, 5, metrics(), Arc::new(da.clone()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(running.global().round, 0, "global model untouched");
    assert_eq!(running.history().len(), 1);
    // The retried round: a's update still counts; c starts an upload and vanishes mid-stream;
    // b answers. The round commits at the deadline with a and b.
    let mut c = conns.pop().unwrap();
    assert_eq!(
        wait_selected(&mut c).await,
        round,
        "the same round, retried"
    );
    let big = synthetic_delta(&global, 12, 0.01);
    let mut upload = held_upload(running.addr, &certs, "c", update_header(round, 7, &big));
    upload.send(&big, 0, 2).await; // the header and the first two chunks, then nothing
    // Wait until the coordinator holds c's upload: a second upload from c is then refused as
    // busy (a probe for another round, so one that does get through changes nothing).
    let probe = TensorMap::new();
    let mut in_flight = false;
    for _ in 0..200 {
        let st = c
            .submit_raw(
                update_header(round + 1, 7, &probe),
                Arc::new(probe.clone()),
                ElementType::F32,
            )
            .await
            .expect_err("a probe is never accepted");
        if st.code() == Code::ResourceExhausted {
            assert!(st.message().contains("(busy)"), "{}", st.message());
            in_flight = true;
            break;
        }
        assert_eq!(st.code(), Code::FailedPrecondition, "{}", st.message());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight, "c's upload never reached the coordinator");
    upload.abort().await; // c vanishes mid-stream
    let mut b = conns.pop().unwrap();
    wait_selected(&mut b).await;
    let db = synthetic_delta(&global, 13, 0.01);
    b.submit(round, 10, metrics(), Arc::new(db.clone()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), running.wait_done())
        .await
        .unwrap();
    assert_close(
        &running.global().tensors,
        &fedavg(&global, &[(5, &da), (10, &db)]),
    );
    assert_eq!(running.history().last().unwrap().clients, 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_and_expired_certificates_cannot_join() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a", "b"]);
    let now = time::OffsetDateTime::now_utc();
    fedmicse_wire::certs::issue_valid(
        &certs,
        "old",
        &certs,
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    let list = dir.path().join("revoked.txt");
    std::fs::write(&list, "# revoked certificates\n").unwrap();
    let mut config = coordinator_config(
        &model,
        &dir.path().join("state"),
        &certs,
        &["a", "b", "old"],
    );
    config.tls.as_mut().unwrap().revocation_list = Some(list.clone());
    let running = start(config).await;

    // Our own client refuses to present an expired certificate; build a raw one that does,
    // to see the coordinator refuse it.
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(certs.join("ca.pem")).unwrap());
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(certs.join("old.pem")).unwrap(),
        std::fs::read(certs.join("old.key")).unwrap(),
    );
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity)
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://127.0.0.1:{}",
        running.addr.port()
    ))
    .unwrap()
    .tls_config(tls)
    .unwrap()
    .connect_lazy();
    let mut old = pb::federation_client::FederationClient::new(channel);
    assert!(
        old.join(pb::JoinRequest::default()).await.is_err(),
        "an expired certificate fails the handshake"
    );
    let err = match fedmicse_wire::client::Connection::new(&fedmicse_wire::client::Target {
        url: format!("https://127.0.0.1:{}", running.addr.port()),
        tls: Some(fedmicse_wire::TlsFiles::in_dir(&certs, "old")),
        domain: "localhost".into(),
        plaintext_client_id: None,
    }) {
        Ok(_) => panic!("an expired certificate was accepted by the client"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not valid now"), "{err}");

    let mut b = connect(running.addr, &certs, "b");
    b.join(1).await.unwrap();
    // Revoke b's certificate by serial while the coordinator runs; a by id.
    fedmicse_wire::certs::revoke(&list, None, Some(&certs.join("b.pem"))).unwrap();
    fedmicse_wire::certs::revoke(&list, Some("a"), None).unwrap();
    let mut a = connect(running.addr, &certs, "a");
    let mut refused_both = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (rb, ra) = (b.join(1).await, a.join(1).await);
        if let (Err(eb), Err(ea)) = (rb, ra) {
            assert_eq!(eb.code(), Code::PermissionDenied);
            assert!(eb.message().contains("revoked") && ea.message().contains("revoked"));
            refused_both = true;
            break;
        }
    }
    assert!(refused_both, "revocation took effect without a restart");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_agents_and_two_hundred_embeds_during_a_model_swap() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    let ids: Vec<String> = (0..50).map(|i| format!("agent-{i:02}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    certs_for(&certs, &id_refs);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &id_refs);
    config.federation.min_clients = 50;
    config.inference.max_concurrent = 4;
    let running = Arc::new(start(config).await);
    let addr = running.addr;
    let barrier = Arc::new(tokio::sync::Barrier::new(51));
    let mut agents = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (certs, id, barrier) = (certs.clone(), id.clone(), barrier.clone());
        agents.push(tokio::spawn(async move {
            let mut c = connect(addr, &certs, &id);
            let round = wait_selected(&mut c).await;
            let g = c.pull(round).await.unwrap().tensors;
            let d = synthetic_delta(&g, i as u64, 0.001);
            barrier.wait().await;
            c.submit(round, 1 + i as u64 % 5, metrics(), Arc::new(d.clone()))
                .await
                .unwrap();
            (1 + i as u64 % 5, d, g)
        }));
    }
    barrier.wait().await;
    // 200 embedding requests racing the commit of the round (the model swap).
    let mut embeds = Vec::new();
    for i in 0..200 {
        let certs = certs.clone();
        embeds.push(tokio::spawn(async move {
            let mut c = connect(addr, &certs, "agent-00");
            c.embed(
                vec![format!("sentence number {i}"), String::new()],
                pb::Pooling::Cls,
                true,
            )
            .await
        }));
    }
    let mut updates = Vec::new();
    let mut global = None;
    for a in agents {
        let (n, d, g) = a.await.unwrap();
        updates.push((n, d));
        global = Some(g);
    }
    let mut rounds_seen = std::collections::BTreeSet::new();
    for e in embeds {
        let r = e.await.unwrap().expect("every embed request succeeds");
        assert_eq!(r.embeddings.len(), 2);
        rounds_seen.insert(r.model_round);
    }
    tokio::time::timeout(Duration::from_secs(120), running.wait_done())
        .await
        .unwrap();
    let refs: Vec<(u64, &TensorMap)> = updates.iter().map(|(n, d)| (*n, d)).collect();
    assert_close(&running.global().tensors, &fedavg(&global.unwrap(), &refs));
    let history = running.history();
    assert_eq!(history.last().unwrap().clients, 50);
    // Every embed was answered by a committed model (the start or round 1, depending on how
    // it raced the swap), never by anything half-built.
    let committed: std::collections::BTreeSet<u64> = history.iter().map(|h| h.round).collect();
    assert_eq!(committed, [0, 1].into());
    assert!(!rounds_seen.is_empty());
    assert!(
        rounds_seen.is_subset(&committed),
        "embed requests answered by rounds {rounds_seen:?}, committed {committed:?}"
    );
    // After the swap, embeds come from round 1.
    let mut after = connect(addr, &certs, "agent-00");
    let r = after
        .embed(vec!["sentence number 0".into()], pb::Pooling::Cls, true)
        .await
        .unwrap();
    assert_eq!(r.model_round, 1);
    Arc::try_unwrap(running).ok().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_does_not_hurt_the_coordinator() {
    use tokio::io::AsyncWriteExt;
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a"]);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &["a"]);
    config.federation.rounds = 5;
    let running = start(config).await;
    let mut seed = 7u64;
    for i in 0..50 {
        let mut s = tokio::net::TcpStream::connect(running.addr).await.unwrap();
        let len = 1 + (i * 977) % 5000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 56) as u8
            })
            .collect();
        let _ = s.write_all(&bytes).await;
    }
    let mut a = connect(running.addr, &certs, "a");
    assert_eq!(a.join(1).await.unwrap().client_id, "a");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_aggregation_then_restart_loses_nothing() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    let ids = ["a", "b"];
    certs_for(&certs, &ids);
    let base = |state: &str| {
        let mut c = coordinator_config(&model, &dir.path().join(state), &certs, &ids);
        c.federation.rounds = 2;
        // A stateful server optimizer, so its persisted moments matter.
        c.aggregation.server_optimizer = fedmicse_federation::ServerOptimizer::Fedadam;
        c.federation.server_lr = 0.01;
        c
    };

    // The reference: an uninterrupted run with the same updates.
    let reference = start(base("reference")).await;
    let g0 = reference.global().tensors.clone();
    let deltas: Vec<Vec<TensorMap>> = (0..2)
        .map(|i| {
            (0..2)
                .map(|r| synthetic_delta(&g0, 100 + 10 * i + r, 0.01))
                .collect()
        })
        .collect();
    let mut conns: Vec<Connection> = ids
        .iter()
        .map(|id| connect(reference.addr, &certs, id))
        .collect();
    drive_agents(&mut conns, &deltas, 2).await;
    tokio::time::timeout(Duration::from_secs(60), reference.wait_done())
        .await
        .unwrap();
    let want = reference.global();
    reference.shutdown().await;

    // The same federation in a `fedmicse coordinator` process, killed during round 1's
    // aggregation.
    let port = free_port();
    let mut config = base("state");
    config.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg_path = dir.path().join("coordinator.toml");
    write_config(&cfg_path, &config);
    let spawn = |delay: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fedmicse"));
        cmd.args([
            "coordinator",
            "--exit-when-done",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&cfg_path);
        if delay {
            cmd.env("FEDMICSE_AGGREGATION_DELAY_MS", "60000");
        }
        cmd.stderr(std::process::Stdio::null()).spawn().unwrap()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = spawn(true);
    let mut conns: Vec<Connection> = ids.iter().map(|id| connect(addr, &certs, id)).collect();
    // Register both agents (the process needs a moment to start), then take round 1.
    for c in conns.iter_mut() {
        for _ in 0..600 {
            if c.join(100).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut round = 0;
        for _ in 0..600 {
            if let Ok(r) = c.join(100).await
                && r.selected
            {
                round = r.round;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(round, 1);
        c.submit(
            1,
            10 * (i as u64 + 1),
            metrics(),
            Arc::new(deltas[i][0].clone()),
        )
        .await
        .unwrap();
    }
    let mut probe = connect(addr, &certs, "a");
    wait_phase(&mut probe, pb::Phase::Aggregating, 1).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // On disk: the last commit is round 0 and both accepted updates are kept.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["round"], 0);
    let pending: Vec<_> = std::fs::read_dir(dir.path().join("state/pending/round-000001"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert_eq!(pending.len(), 2);

    // Restart: it resumes at round 1 with both updates counted, then finishes round 2.
    // The agents reconnect; round 1 closes with the two recovered updates (they are not
    // asked to resubmit), and round 2 runs as usual.
    let mut child = spawn(false);
    let mut conns: Vec<Connection> = ids.iter().map(|id| connect(addr, &certs, id)).collect();
    let mut probe = connect(addr, &certs, "a");
    for c in conns.iter_mut() {
        for _ in 0..600 {
            match c.join(100).await {
                Ok(r) => {
                    assert!(
                        !(r.round == 1 && r.selected),
                        "asked to resubmit a stored update"
                    );
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    wait_phase(&mut probe, pb::Phase::Training, 2).await;
    let status = probe.status().await.unwrap();
    assert_eq!(
        status.history.len(),
        2,
        "round 1 committed from the recovered updates"
    );
    assert_eq!(status.history[1].clients, 2);
    drive_agents(&mut conns, &deltas, 2).await;
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());

    // Same result as the uninterrupted run, server optimizer state included.
    let store = fedmicse_coordinator::Store::open(&dir.path().join("state"), 10).unwrap();
    let (got, history, server) = store.load().unwrap().unwrap();
    assert_eq!(got.round, 2);
    assert_eq!(history.len(), 3);
    for (name, w) in &want.tensors {
        assert_eq!(&got.tensors[name], w, "{name}");
    }
    let ref_store = fedmicse_coordinator::Store::open(&dir.path().join("reference"), 10).unwrap();
    let (_, _, ref_server) = ref_store.load().unwrap().unwrap();
    assert_eq!(server, ref_server);
    assert!(!server.m.is_empty());
}
