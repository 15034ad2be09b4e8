//! Tests of the store: commits, loading, digests, recovery and pruning.

use super::*;

fn model(round: u64) -> GlobalModel {
    let v = round as f32;
    let tensors = TensorMap::from([
        (
            "embeddings.word_embeddings.weight".to_string(),
            HostTensor::new(vec![4, 3], (0..12).map(|i| i as f32 * 0.5 + v).collect()),
        ),
        (
            "mlp.dense.bias".to_string(),
            HostTensor::new(vec![3], vec![v; 3]),
        ),
    ]);
    GlobalModel::new(round, tensors, Vec::new())
}

fn server(round: u64) -> ServerState {
    ServerState {
        m: TensorMap::from([(
            "mlp.dense.bias".to_string(),
            HostTensor::new(vec![3], vec![round as f32 + 0.25; 3]),
        )]),
        v: TensorMap::new(),
    }
}

fn record(round: u64) -> RoundRecord {
    RoundRecord {
        round,
        clients: 2,
        mean_loss: Some(1.0 / (round + 1) as f64),
        bytes_up: 10,
        bytes_down: 20,
        seconds: 1.0,
        ..Default::default()
    }
}

/// Rounds 0..=`newest` committed the way the coordinator commits them (its history
/// keeps the records it built, without digests).
fn committed(dir: &Path, newest: u64, keep: usize) -> (Store, Vec<GlobalModel>) {
    let store = Store::open(dir, keep).unwrap();
    let mut history = Vec::new();
    let mut models = Vec::new();
    for r in 0..=newest {
        let m = model(r);
        let rec = record(r);
        let logged = store.commit(&m, &server(r), &rec, &history).unwrap();
        assert_eq!(logged.digest, Some(hex::encode(&m.digest)));
        history.push(rec);
        models.push(m);
    }
    (store, models)
}

fn state_round(dir: &Path) -> u64 {
    let c: Committed =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    c.round
}

fn log_rounds(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<RoundRecord>(l).unwrap().round)
        .collect()
}

fn load_err(store: &Store) -> String {
    match store.load() {
        Ok(Some((m, ..))) => panic!("loaded round {} but should not", m.round),
        Ok(None) => panic!("loaded nothing (a silent fresh start) but should fail"),
        Err(e @ StoreError::Damaged(_)) => e.to_string(),
        Err(e) => panic!("not reported as damaged state: {e}"),
    }
}

fn truncate(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len / 2).unwrap();
}

/// Alters tensor data and leaves the file a valid safetensors file.
fn flip_data(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    bytes[n - 4] ^= 0x5a;
    std::fs::write(path, &bytes).unwrap();
    fedmicse_tensors::safetensors::read(path).expect("still parseable");
}

/// Round 3 is damaged by `damage`: loading names it corrupted and the way back; recovery
/// rolls back to round 2, which then loads as committed.
fn rolls_back_to_round_2(damage: fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let (store, models) = committed(dir.path(), 3, 5);
    damage(&store.checkpoint_dir(3).join("model.safetensors"));
    // Updates accepted for round 4 were trained from the damaged round 3.
    let stale = dir.path().join("pending/round-000004");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("a.safetensors"), b"update").unwrap();

    let err = load_err(&store);
    assert!(err.contains("round 3 is corrupted"), "{err}");
    assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
    assert!(err.contains(RECOVER_COMMAND), "{err}");

    let report = store.recover().unwrap();
    assert!(report.changed());
    assert_eq!(report.round, Some(2));
    assert_eq!(report.previous, Some(3));
    assert_eq!(report.dropped_rounds, vec![3]);
    let aside = dir.path().join("checkpoints/round-000003.corrupted");
    assert_eq!(
        report.moved_checkpoints,
        vec![(store.checkpoint_dir(3), aside.clone())]
    );
    assert_eq!(
        report.moved_updates,
        vec![(stale.clone(), dir.path().join("pending/round-000004.stale"))]
    );
    let text = report.to_string();
    assert!(
        text.contains(
            "rolled back from round 3 to round 2; rounds 3 dropped from the log; \
             checkpoints/round-000003 moved to round-000003.corrupted"
        ),
        "{text}"
    );
    assert!(aside.is_dir(), "nothing deleted");
    assert!(!stale.exists());
    assert_eq!(state_round(dir.path()), 2);
    assert_eq!(log_rounds(dir.path()), vec![0, 1, 2]);

    let (got, history, server_state) = store.load().unwrap().unwrap();
    assert_eq!(got.round, 2);
    assert_eq!(got.tensors, models[2].tensors);
    assert_eq!(got.digest, models[2].digest);
    assert_eq!(server_state, server(2));
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].digest, Some(hex::encode(&models[2].digest)));

    // Healthy now: a second recovery changes nothing.
    let again = store.recover().unwrap();
    assert!(!again.changed(), "{again}");
    assert_eq!(again.round, Some(2));
}

#[test]
fn truncated_checkpoint_is_corrupted_and_recovers_to_the_previous_round() {
    rolls_back_to_round_2(truncate);
}

#[test]
fn altered_checkpoint_is_corrupted_and_recovers_to_the_previous_round() {
    rolls_back_to_round_2(flip_data);
}

#[test]
fn missing_checkpoint_file_is_corrupted() {
    rolls_back_to_round_2(|model| std::fs::remove_file(model).unwrap());
}

#[test]
fn missing_checkpoint_directory_is_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, models) = committed(dir.path(), 3, 5);
    std::fs::remove_dir_all(store.checkpoint_dir(3)).unwrap();
    let err = load_err(&store);
    assert!(err.contains("checkpoint directory missing"), "{err}");
    assert!(err.contains("round 3 is corrupted"), "{err}");
    assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
    let report = store.recover().unwrap();
    assert_eq!(report.round, Some(2));
    assert!(report.moved_checkpoints.is_empty());
    assert_eq!(store.load().unwrap().unwrap().0.tensors, models[2].tensors);
}

#[test]
fn every_logged_round_carries_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (_, models) = committed(dir.path(), 3, 5);
    let text = std::fs::read_to_string(dir.path().join("rounds.jsonl")).unwrap();
    let logged: Vec<RoundRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 4);
    for (r, m) in logged.iter().zip(&models) {
        assert_eq!(r.digest, Some(hex::encode(&m.digest)), "round {}", r.round);
    }
    // Records without a digest (logs of older versions) still parse, and are written
    // without the field.
    let json = serde_json::to_string(&record(1)).unwrap();
    assert!(!json.contains("digest"), "{json}");
    let parsed: RoundRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, record(1));
}

#[test]
fn an_older_checkpoint_that_differs_from_its_logged_digest_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (store, models) = committed(dir.path(), 3, 5);
    truncate(&store.checkpoint_dir(3).join("model.safetensors"));
    flip_data(&store.checkpoint_dir(2).join("model.safetensors"));
    let err = load_err(&store);
    assert!(err.contains("newest intact checkpoint is round 1"), "{err}");
    let report = store.recover().unwrap();
    assert_eq!(report.round, Some(1));
    assert_eq!(report.dropped_rounds, vec![2, 3]);
    assert_eq!(report.moved_checkpoints.len(), 2);
    assert!(
        dir.path()
            .join("checkpoints/round-000002.corrupted")
            .is_dir()
    );
    let (got, history, _) = store.load().unwrap().unwrap();
    assert_eq!(got.tensors, models[1].tensors);
    assert_eq!(history.len(), 2);
}

#[test]
fn rounds_logged_without_a_digest_only_need_to_load() {
    let dir = tempfile::tempdir().unwrap();
    let (store, models) = committed(dir.path(), 3, 5);
    // A log as written before digests were recorded.
    let log = dir.path().join("rounds.jsonl");
    let text: String = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let mut r: RoundRecord = serde_json::from_str(l).unwrap();
            r.digest = None;
            serde_json::to_string(&r).unwrap() + "\n"
        })
        .collect();
    std::fs::write(&log, text).unwrap();
    flip_data(&store.checkpoint_dir(3).join("model.safetensors"));
    let err = load_err(&store);
    assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
    assert_eq!(store.recover().unwrap().round, Some(2));
    assert_eq!(store.load().unwrap().unwrap().0.tensors, models[2].tensors);
}

#[test]
fn missing_state_json_beside_checkpoints_is_an_error_and_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, models) = committed(dir.path(), 3, 5);
    std::fs::remove_file(dir.path().join("state.json")).unwrap();
    let err = load_err(&store);
    assert!(
        err.contains("state.json is missing but checkpoints exist (newest intact: round 3)"),
        "{err}"
    );
    assert!(err.contains(RECOVER_COMMAND), "{err}");
    assert!(err.contains("to start over"), "{err}");

    let report = store.recover().unwrap();
    assert!(report.changed());
    assert_eq!(report.round, Some(3));
    assert_eq!(report.previous, None);
    assert!(report.dropped_rounds.is_empty());
    assert!(report.moved_checkpoints.is_empty());
    assert!(
        report.to_string().contains("rebuilt state.json at round 3"),
        "{report}"
    );
    let (got, history, server_state) = store.load().unwrap().unwrap();
    assert_eq!(got.round, 3);
    assert_eq!(got.tensors, models[3].tensors);
    assert_eq!(server_state, server(3));
    assert_eq!(history.len(), 4);
}

#[test]
fn missing_state_json_and_a_damaged_newest_checkpoint_rebuild_at_the_older_round() {
    let dir = tempfile::tempdir().unwrap();
    let (store, models) = committed(dir.path(), 3, 5);
    std::fs::remove_file(dir.path().join("state.json")).unwrap();
    truncate(&store.checkpoint_dir(3).join("model.safetensors"));
    let err = load_err(&store);
    assert!(err.contains("newest intact: round 2"), "{err}");
    let report = store.recover().unwrap();
    assert_eq!(report.round, Some(2));
    assert_eq!(report.dropped_rounds, vec![3]);
    assert!(
        dir.path()
            .join("checkpoints/round-000003.corrupted")
            .is_dir()
    );
    assert_eq!(store.load().unwrap().unwrap().0.tensors, models[2].tensors);
}

#[test]
fn unreadable_state_json_is_corrupted_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = committed(dir.path(), 2, 5);
    std::fs::write(dir.path().join("state.json"), b"{\"round\": 2, \"chec").unwrap();
    let err = load_err(&store);
    assert!(err.contains("state.json is corrupted"), "{err}");
    assert!(err.contains("newest intact checkpoint is round 2"), "{err}");
    assert_eq!(store.recover().unwrap().round, Some(2));
    assert_eq!(store.load().unwrap().unwrap().0.round, 2);
}

#[test]
fn nothing_intact_is_an_error_that_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = committed(dir.path(), 2, 5);
    for r in 0..=2 {
        truncate(&store.checkpoint_dir(r).join("model.safetensors"));
    }
    let err = load_err(&store);
    assert!(err.contains("corrupted"), "{err}");
    assert!(err.contains("no intact checkpoint is left"), "{err}");
    assert!(err.contains("start over"), "{err}");
    let err = store.recover().unwrap_err();
    assert!(matches!(err, StoreError::Damaged(_)));
    let err = err.to_string();
    assert!(err.contains("no older checkpoint is intact"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("start over"), "{err}");
    assert_eq!(state_round(dir.path()), 2);
    assert_eq!(log_rounds(dir.path()), vec![0, 1, 2]);
    assert!(store.checkpoint_dir(2).is_dir());

    // The same without state.json.
    std::fs::remove_file(dir.path().join("state.json")).unwrap();
    let err = load_err(&store);
    assert!(err.contains("none of the checkpoints"), "{err}");
    assert!(store.recover().is_err());
}

#[test]
fn an_empty_store_is_a_fresh_start_and_needs_no_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 5).unwrap();
    assert!(store.load().unwrap().is_none());
    let report = store.recover().unwrap();
    assert!(!report.changed());
    assert_eq!(report.round, None);
    // Unfinished or moved-aside checkpoint directories alone are not a commit.
    std::fs::create_dir_all(dir.path().join("checkpoints/round-000001.partial")).unwrap();
    std::fs::create_dir_all(dir.path().join("checkpoints/round-000002.corrupted")).unwrap();
    assert!(store.load().unwrap().is_none());
}

#[test]
fn prune_keeps_checkpoints_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = committed(dir.path(), 3, 2);
    flip_data(&store.checkpoint_dir(3).join("model.safetensors"));
    assert_eq!(store.recover().unwrap().round, Some(2));
    let (mut global, mut history, _) = store.load().unwrap().unwrap();
    for r in 3..=6 {
        global = GlobalModel::new(r, model(r).tensors, global.files.clone());
        let rec = record(r);
        store.commit(&global, &server(r), &rec, &history).unwrap();
        history.push(rec);
    }
    let mut left: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["round-000003.corrupted", "round-000005", "round-000006"]
    );
    assert_eq!(log_rounds(dir.path()), (0..=6).collect::<Vec<_>>());
    assert!(store.load().unwrap().is_some());
}
