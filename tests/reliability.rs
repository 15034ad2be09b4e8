//! Faults without loss: real `fedmicse` processes killed with SIGKILL, paused with SIGSTOP,
//! a coordinator whose disk fills up, and configurations that could never run a round.
//! Each test asserts what is lost (nothing) and that the federation finishes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fed::*;
use fedmicse_coordinator::CoordinatorConfig;
use fedmicse_wire::client::Connection;
use fedmicse_wire::pb;
use tonic::Code;

/// A `fedmicse` process logging JSON lines to `log`.
fn spawn(args: &[&str], config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fedmicse"))
        .args(["--log-format", "json"])
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The JSON log lines of a process whose message is `message` (and whose `round` field is
/// `round`, when given).
fn logged(log: &Path, message: &str, round: Option<u64>) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .filter(|v| round.is_none_or(|r| v["round"] == r))
        .count()
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last lines of every process log in `dir` (printed when a test fails).
fn dump_logs(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== {} (last 20 lines)", p.display());
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Dumps the process logs of a federation test if it panics.
struct LogsOnPanic(PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(&self.0);
        }
    }
}

/// Waits for a process to exit (up to `limit`); kills it and fails if it does not.
async fn exit_status(mut child: Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// A silo's sentences: distinct, varied enough for the tokenizer.
fn write_shard(path: &Path, silo: &str, n: usize) {
    let nouns = [
        "river", "market", "engine", "garden", "letter", "planet", "window",
    ];
    let verbs = [
        "follows",
        "repairs",
        "describes",
        "crosses",
        "paints",
        "opens",
    ];
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{silo} note {i}: the {} {} the {} near the {}.\n",
                nouns[i % 7],
                verbs[i % 6],
                nouns[(i / 7) % 7],
                nouns[(i / 3) % 7]
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// A federation of real processes on 127.0.0.1: config files, shards and certificates.
struct Fed {
    dir: PathBuf,
    certs: PathBuf,
    port: u16,
    config: CoordinatorConfig,
}

impl Fed {
    fn new(dir: &Path, ids: &[&str], steps: u32) -> Fed {
        let model = tiny_model(&dir.join("model"), 32, 2, 2, 64);
        let certs = dir.join("certs");
        certs_for(&certs, &[ids, &["operator"]].concat());
        let port = free_port();
        let mut config = coordinator_config(&model, &dir.join("state"), &certs, ids);
        config.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
        config.federation.operators = vec!["operator".into()];
        config.federation.poll_ms = 100;
        config.federation.agent_timeout_secs = 2;
        config.task.steps = steps;
        config.task.batch_size = 8;
        config.task.max_len = 16;
        config.task.ami_samples = 20;
        for id in ids {
            write_shard(&dir.join(format!("{id}.txt")), id, 48);
            let mut agent = agent_config(port, &certs, id);
            agent.data.file = dir.join(format!("{id}.txt"));
            agent.retry = fedmicse_agent::config::RetryConfig {
                initial_ms: 100,
                max_ms: 1000,
            };
            std::fs::write(
                dir.join(format!("{id}.toml")),
                toml::to_string(&agent).unwrap(),
            )
            .unwrap();
        }
        Fed {
            dir: dir.to_path_buf(),
            certs,
            port,
            config,
        }
    }

    fn coordinator(&self, log: &str) -> Child {
        let path = self.dir.join("coordinator.toml");
        write_config(&path, &self.config);
        spawn(
            &["coordinator", "--exit-when-done"],
            &path,
            &self.dir.join(log),
        )
    }

    fn agent(&self, id: &str) -> Child {
        spawn(
            &["agent"],
            &self.dir.join(format!("{id}.toml")),
            &self.log(id),
        )
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn operator(&self) -> Connection {
        connect(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            &self.certs,
            "operator",
        )
    }

    fn rounds(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("state/rounds.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Every round 0..=n logged exactly once, in order.
fn assert_rounds_once_in_order(rounds: &[serde_json::Value], n: u64) {
    let got: Vec<u64> = rounds
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (0..=n).collect::<Vec<_>>(), "rounds.jsonl");
}

/// The coordinator is killed (SIGKILL) while both agents train round 1 and restarted at
/// once. The agents keep going, the restarted coordinator waits for them, and their round-1
/// updates count: nobody trains round 1 twice, nobody exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_survive_a_coordinator_restart_and_their_updates_count() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ["a", "b"];
    let mut fed = Fed::new(dir.path(), &ids, 150);
    let _logs = LogsOnPanic(dir.path().to_path_buf());
    fed.config.federation.rounds = 2;
    let mut coordinator = fed.coordinator("coordinator-1.log");
    let agents: Vec<Child> = ids.iter().map(|id| fed.agent(id)).collect();
    // Both pulled round 1's model: they are training now.
    wait_for(
        "both agents training round 1",
        Duration::from_secs(60),
        || {
            ids.iter()
                .all(|id| logged(&fed.log(id), "pulled the global model", Some(1)) == 1)
        },
    )
    .await;
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let still_training = ids
        .iter()
        .filter(|id| logged(&fed.log(id), "trained locally", Some(1)) == 0)
        .count();
    let coordinator = fed.coordinator("coordinator-2.log");
    let restarted = Instant::now();
    wait_for("round 1 committed", Duration::from_secs(120), || {
        std::fs::read_to_string(dir.path().join("state/rounds.jsonl"))
            .is_ok_and(|t| t.lines().count() >= 2)
    })
    .await;
    eprintln!(
        "round 1 committed {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );

    let status = exit_status(coordinator, Duration::from_secs(120), "coordinator").await;
    assert!(status.success(), "coordinator: {status}");
    for (id, agent) in ids.iter().zip(agents) {
        let status = exit_status(agent, Duration::from_secs(30), id).await;
        assert!(status.success(), "agent {id} exited with {status}");
        // Round 1 was trained once and its update delivered; round 2 as usual.
        assert_eq!(logged(&fed.log(id), "trained locally", Some(1)), 1, "{id}");
        assert_eq!(logged(&fed.log(id), "update sent", Some(1)), 1, "{id}");
        assert_eq!(logged(&fed.log(id), "update sent", Some(2)), 1, "{id}");
    }
    let rounds = fed.rounds();
    assert_rounds_once_in_order(&rounds, 2);
    assert_eq!(rounds[1]["clients"], 2, "both round-1 updates counted");
    assert_eq!(rounds[2]["clients"], 2);
    eprintln!("agents still training when the coordinator died: {still_training} of 2");
}

/// One agent is paused (SIGSTOP) after it was selected. Within a few poll intervals the
/// coordinator stops waiting for it and the round closes with the others; resumed, the
/// agent carries on and takes part in a later round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_is_dropped_quickly_and_rejoins_later() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ["a", "b", "c"];
    let mut fed = Fed::new(dir.path(), &ids, 40);
    let _logs = LogsOnPanic(dir.path().to_path_buf());
    fed.config.federation.rounds = 5;
    fed.config.federation.min_clients = 2;
    fed.config.federation.round_deadline_secs = 120;
    let coordinator = fed.coordinator("coordinator.log");
    let mut agents: Vec<Child> = ids.iter().map(|id| fed.agent(id)).collect();
    // c is paused once it has pulled a model: its round cannot be answered by it.
    wait_for("c pulling a model", Duration::from_secs(60), || {
        logged(&fed.log("c"), "pulled the global model", None) >= 1
    })
    .await;
    signal(&agents[2], "-STOP");
    let paused = Instant::now();
    let mut op = fed.operator();
    // The round c was selected for closes without it, long before its deadline.
    let round_c = {
        let text = std::fs::read_to_string(fed.log("c")).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "pulled the global model")
            .unwrap()["round"]
            .as_u64()
            .unwrap()
    };
    loop {
        let s = op.status().await.unwrap();
        if s.history.len() as u64 > round_c {
            break;
        }
        assert!(
            paused.elapsed() < Duration::from_secs(30),
            "round {round_c} still waits for the paused agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = paused.elapsed();
    eprintln!(
        "round {round_c} closed {:.1} s after its agent c was paused",
        closed_after.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(&agents[2], "-CONT");

    let status = exit_status(coordinator, Duration::from_secs(120), "coordinator").await;
    assert!(status.success());
    for (id, agent) in ids.iter().zip(agents.drain(..)) {
        let status = exit_status(agent, Duration::from_secs(30), id).await;
        assert!(status.success(), "agent {id} exited with {status}");
    }
    let rounds = fed.rounds();
    assert_rounds_once_in_order(&rounds, 5);
    assert_eq!(
        rounds[round_c as usize]["clients"], 2,
        "closed with a and b"
    );
    // The agent timeout is 2 s: the round closed within a few seconds, not at its deadline.
    assert!(
        closed_after < Duration::from_secs(15),
        "closed {closed_after:?} after the pause"
    );
    // c came back and delivered an update for a later round.
    let later = (round_c + 1..=5).any(|r| logged(&fed.log("c"), "update sent", Some(r)) == 1);
    assert!(later, "c took part again after the pause");
}

/// Configurations that could never run a round: the process exits non-zero at once, and
/// the message names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_that_cannot_work_exit_at_once_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let fed = Fed::new(dir.path(), &["a", "b"], 1);
    let cases: [(&str, fn(&mut CoordinatorConfig)); 4] = [
        ("federation.min_clients", |c| c.federation.min_clients = 3),
        ("federation.round_deadline_secs", |c| {
            c.federation.poll_ms = 5000;
            c.federation.round_deadline_secs = 5;
        }),
        ("federation.agent_timeout_secs", |c| {
            c.federation.poll_ms = 1000;
            c.federation.agent_timeout_secs = 2;
        }),
        ("federation.poll_ms", |c| c.federation.poll_ms = 0),
    ];
    for (field, break_it) in cases {
        let mut config = fed.config.clone();
        break_it(&mut config);
        let path = dir.path().join("bad.toml");
        write_config(&path, &config);
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_fedmicse"))
            .args(["coordinator", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{field}: started anyway");
        assert!(stderr.contains(field), "{field}: {stderr}");
        assert!(took < Duration::from_secs(1), "{field}: took {took:?}");
    }
}

/// A selected agent that goes silent is dropped within the agent timeout (not the round
/// deadline), and an update that finishes streaming after the deadline is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_agents_are_dropped_and_the_deadline_is_exact() {
    let common::fed::Fed { dir, model, certs } = fed_dir(32, 64);
    certs_for(&certs, &["a", "b"]);
    let mut config = coordinator_config(&model, &dir.path().join("state"), &certs, &["a", "b"]);
    config.federation.min_clients = 2;
    config.federation.agent_timeout_secs = 1;
    config.federation.round_deadline_secs = 4;
    let running = start(config).await;
    let (round, mut a, _b) = two_selected(running.addr, &certs).await;
    let opened = Instant::now();
    assert_eq!(a.status().await.unwrap().selected, 2);
    // a keeps its heartbeat, b is silent: b leaves the round within about a second.
    loop {
        a.join(100).await.unwrap();
        if a.status().await.unwrap().selected == 1 {
            break;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(3),
            "the silent agent is still selected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // a keeps its heartbeat (as a real agent does while it trains), starts its upload
    // before the deadline and finishes it after: refused.
    let mut hb = a.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            let _ = hb.join(100).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let global = a.pull(round).await.unwrap().tensors;
    let delta = synthetic_delta(&global, 1, 0.01);
    let deadline_ms = a.join(100).await.unwrap().deadline_unix_ms;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        deadline_ms > now_ms + 300,
        "too close to the deadline already"
    );
    tokio::time::sleep(Duration::from_millis(deadline_ms - now_ms - 300)).await;
    let header = pb::UpdateHeader {
        round,
        num_samples: 10,
        tensor_count: delta.len() as u32,
        total_bytes: fedmicse_wire::tensors::total_bytes(&delta),
        digest: fedmicse_wire::tensors::digest(&delta),
        metrics: Some(metrics()),
    };
    let mut held = held_upload(running.addr, &certs, "a", header);
    held.send(&delta, 0, 1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    held.send(&delta, 1, usize::MAX).await;
    let err = held.finish().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("(late)") || err.message().contains("(no_round)"),
        "{}",
        err.message()
    );
    heartbeat.abort();
    // Nothing was committed: the round is retried.
    assert_eq!(running.history().len(), 1);
    running.shutdown().await;
}

/// Mounts a tmpfs of `bytes` at `dir`; None where this machine does not allow it (not
/// root, no mount namespace), and the test that needs it says so and passes.
fn small_disk(dir: &Path, bytes: u64) -> Option<SmallDisk> {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| SmallDisk(dir.to_path_buf()))
}

struct SmallDisk(PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` up to `leave` free bytes with a ballast file.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("ballast");
    let free = free_bytes(dir);
    let size = free.saturating_sub(leave);
    let f = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    let block = vec![0u8; 64 << 10];
    let mut written = 0u64;
    while written + block.len() as u64 <= size {
        if w.write_all(&block).is_err() {
            break;
        }
        written += block.len() as u64;
    }
    let _ = w.flush();
    path
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn dir_bytes(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

async fn metric(http: std::net::SocketAddr, name: &'static str) -> f64 {
    let body = tokio::task::spawn_blocking(move || {
        ureq::get(format!("http://{http}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The coordinator's disk fills up: an update it cannot store is refused as the
/// coordinator's own trouble (UNAVAILABLE, nothing left behind), a commit that fails backs
/// off instead of spinning, and once space is freed the round commits with every update
/// that was accepted — nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_costs_no_update_and_no_hot_loop() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"), 32, 2, 2, 64);
    let state = dir.path().join("state");
    let Some(_disk) = small_disk(&state, 64 << 20) else {
        eprintln!("SKIPPED: cannot mount a size-limited tmpfs here (needs root)");
        return;
    };
    let certs = dir.path().join("certs");
    certs_for(&certs, &["a", "b"]);
    let mut config = coordinator_config(&model, &state, &certs, &["a", "b"]);
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    let running = start(config).await;
    let http = running.http_addr.unwrap();
    let (round, mut a, mut b) = two_selected(running.addr, &certs).await;
    let global = a.pull(round).await.unwrap().tensors;
    let (da, db) = (
        synthetic_delta(&global, 1, 0.01),
        synthetic_delta(&global, 2, 0.01),
    );
    let checkpoint = dir_bytes(&running.checkpoint_dir(0));

    // 1. No room for an update: refused as UNAVAILABLE, and no partial file stays behind.
    let ballast = fill(&state, 64 << 10);
    let err = a
        .submit(round, 10, metrics(), Arc::new(da.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("(storage)"), "{}", err.message());
    let leftovers: Vec<PathBuf> = walk(&state)
        .into_iter()
        .filter(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".partial") || n.ends_with(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // 2. Room for the updates but not for the checkpoint: the commit fails and backs off.
    std::fs::remove_file(&ballast).unwrap();
    a.submit(round, 10, metrics(), Arc::new(da.clone()))
        .await
        .unwrap();
    let update = dir_bytes(&state.join(format!("pending/round-{round:06}")));
    let ballast = fill(&state, update + checkpoint / 2);
    b.submit(round, 20, metrics(), Arc::new(db.clone()))
        .await
        .unwrap();
    let t = Instant::now();
    while metric(http, "fedmicse_commit_failures_total").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the commit never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failures = metric(http, "fedmicse_commit_failures_total").await;
    let window = t.elapsed().as_secs_f64();
    // Backoff 1, 2, 4 s: at most three more attempts in ~6 s (a hot loop made ~36).
    assert!(
        (2.0..=4.0).contains(&failures),
        "{failures} failed commits in {window:.1} s"
    );
    assert_eq!(
        running.history().len(),
        1,
        "nothing committed on a full disk"
    );
    let leftovers: Vec<PathBuf> = walk(&state)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let partial = running.checkpoint_dir(1).with_extension("partial");
    assert!(!partial.exists(), "{} left behind", partial.display());

    // 3. Space is back: the round commits at the next attempt with both updates.
    std::fs::remove_file(&ballast).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running.wait_done())
        .await
        .expect("committed once space was back");
    let history = running.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].clients, 2);
    let want = fedavg(&global, &[(10, &da), (20, &db)]);
    for (name, w) in &want {
        let got = &running.global().tensors[name];
        let diff = got
            .data
            .iter()
            .zip(&w.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    running.shutdown().await;
}
