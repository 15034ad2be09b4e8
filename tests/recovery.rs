//! A damaged coordinator state stops the `fedmicse coordinator` process with an error that
//! names the corruption and the way back, and `--recover` rolls it back to the newest
//! intact checkpoint, after which the coordinator starts normally.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fed::*;
use fedmicse_coordinator::store::seeded_head;
use fedmicse_coordinator::{GlobalModel, RoundRecord, Store};
use fedmicse_encoder::Encoder;
use fedmicse_federation::ServerState;

fn record(round: u64) -> RoundRecord {
    RoundRecord {
        round,
        clients: u32::from(round > 0),
        ..Default::default()
    }
}

/// Rounds 0..=`newest` of `model` committed as the coordinator commits them, each a little
/// different.
fn commit_rounds(model: &Path, state: &Path, newest: u64) -> Vec<GlobalModel> {
    let template = Encoder::load(model, &fedmicse_encoder::device::cpu()).unwrap();
    let mut tensors = template.tensors().unwrap();
    tensors.extend(seeded_head(template.config.hidden_size, 1));
    let files = template.files().unwrap();
    let store = Store::open(state, 5).unwrap();
    let mut history = Vec::new();
    let mut models = Vec::new();
    for r in 0..=newest {
        let mut t = tensors.clone();
        for w in t.values_mut() {
            w.data.iter_mut().for_each(|x| *x += 1e-3 * r as f32);
        }
        let m = GlobalModel::new(r, t, files.clone());
        store
            .commit(&m, &ServerState::default(), &record(r), &history)
            .unwrap();
        history.push(record(r));
        models.push(m);
    }
    models
}

/// Runs `fedmicse coordinator` to its exit (killed after 20 s).
fn coordinator(config: &Path, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedmicse"))
        .arg("coordinator")
        .args(extra)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the coordinator did not exit within 20 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn state_round(state: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap();
    v["round"].as_u64().unwrap()
}

#[test]
fn corrupted_checkpoint_stops_the_coordinator_and_recover_rolls_back() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a"]);
    let state = dir.path().join("state");
    let models = commit_rounds(&model, &state, 2);

    let mut config = coordinator_config(&model, &state, &certs, &["a"]);
    // Round 1 finishes the federation, so after rolling back to it the process is done and
    // exits on its own (--exit-when-done).
    config.federation.rounds = 1;
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(&cfg, toml::to_string(&config).unwrap()).unwrap();

    // Round 2's weights are cut short on disk.
    let weights = state.join("checkpoints/round-000002/model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();

    // It refuses to start, and says why and what to do: never a silent fresh start.
    let out = coordinator(&cfg, &["--exit-when-done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("corrupted"), "{stderr}");
    assert!(
        stderr.contains("newest intact checkpoint is round 1"),
        "{stderr}"
    );
    assert!(stderr.contains("--recover"), "{stderr}");
    assert_eq!(state_round(&state), 2, "a refused start changes nothing");

    // --recover rolls back to round 1, then the coordinator starts (and, done, exits).
    let out = coordinator(&cfg, &["--recover", "--exit-when-done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("state recovered")
            && stderr.contains("rolled back from round 2 to round 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("checkpoints/round-000002 moved to round-000002.corrupted"),
        "{stderr}"
    );
    assert_eq!(state_round(&state), 1);
    assert!(state.join("checkpoints/round-000002.corrupted").is_dir());
    let log = std::fs::read_to_string(state.join("rounds.jsonl")).unwrap();
    let rounds: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<RoundRecord>(l).unwrap().round)
        .collect();
    assert_eq!(rounds, [0, 1]);
    let (got, history, _) = Store::open(&state, 5).unwrap().load().unwrap().unwrap();
    assert_eq!(got.round, 1);
    assert_eq!(got.tensors, models[1].tensors);
    assert_eq!(history.len(), 2);

    // On a healthy state --recover changes nothing and says so.
    let out = coordinator(&cfg, &["--recover", "--exit-when-done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing to recover"), "{stderr}");
    assert_eq!(state_round(&state), 1);
}

#[test]
fn missing_state_json_stops_the_coordinator_instead_of_starting_over() {
    let Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a"]);
    let state = dir.path().join("state");
    let models = commit_rounds(&model, &state, 2);
    std::fs::remove_file(state.join("state.json")).unwrap();

    let mut config = coordinator_config(&model, &state, &certs, &["a"]);
    config.federation.rounds = 2;
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(&cfg, toml::to_string(&config).unwrap()).unwrap();

    let out = coordinator(&cfg, &["--exit-when-done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("state.json is missing but checkpoints exist (newest intact: round 2)"),
        "{stderr}"
    );
    assert!(stderr.contains("--recover"), "{stderr}");
    assert!(!state.join("state.json").exists());
    // The round log was not rewritten to a fresh round 0.
    let log = std::fs::read_to_string(state.join("rounds.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);

    let out = coordinator(&cfg, &["--recover", "--exit-when-done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("rebuilt state.json at round 2"), "{stderr}");
    assert_eq!(state_round(&state), 2);
    let (got, _, _) = Store::open(&state, 5).unwrap().load().unwrap().unwrap();
    assert_eq!(got.tensors, models[2].tensors);
}
