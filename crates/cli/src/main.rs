//! `fedmicse`: federated low-shot training of sentence encoders with miCSE.

mod agent;
mod bench;
mod certs;
mod coordinator;
mod embed;
mod logging;
mod plot;
mod runtime;
mod simulate;
mod status;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fedmicse",
    version,
    about = "Federated low-shot training of BERT sentence encoders with miCSE",
    long_about = "Federated low-shot training of BERT sentence encoders with the miCSE objective \
(contrastive InfoNCE + attention mutual information). Organisations keep their text in their own \
silos: agents train locally and send weight deltas over mutual-TLS gRPC to a coordinator that \
averages them and serves embeddings from the shared encoder.\n\n\
Models are HuggingFace BERT directories (config.json, model.safetensors or pytorch_model.bin, \
tokenizer.json or vocab.txt). `deploy/fetch-model` places the default all-MiniLM-L6-v2 under models/."
)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed sentences (one per input line) and write the vectors as JSON lines or .npy.
    Embed(embed::EmbedArgs),
    /// Print the cosine similarity matrix of the given sentences.
    Similarity(embed::SimilarityArgs),
    /// Train an encoder with miCSE (or SimCSE) on a sentence file, locally.
    Train(train::TrainCmd),
    /// Evaluate on STS tasks: Spearman ×100 of cosine similarity vs gold scores.
    Eval(train::EvalCmd),
    /// Run the coordinator daemon: rounds, FedAvg, checkpoints, evaluation, inference.
    Coordinator(coordinator::CoordinatorCmd),
    /// Run a client agent beside a data silo: pull, train locally, send deltas.
    Agent(agent::AgentCmd),
    /// Simulate a federation on one machine: coordinator and N agents over real mTLS gRPC.
    Simulate(simulate::SimulateCmd),
    /// Create the federation's CA and certificates.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Print a coordinator's state.
    Status(status::StatusCmd),
    /// Measure inference and training throughput and peak memory.
    Bench(bench::BenchCmd),
    /// Write a randomly initialised BERT checkpoint (for experiments and benchmarks).
    InitModel(bench::InitModelCmd),
    /// Draw PNG plots: federation rounds, or a 2-D projection of embeddings.
    #[command(subcommand)]
    Plot(plot::PlotCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    if matches!(
        cli.command,
        Command::Embed(_)
            | Command::Similarity(_)
            | Command::Train(_)
            | Command::Eval(_)
            | Command::Agent(_)
            | Command::Simulate(_)
            | Command::Bench(_)
    ) {
        reuse_freed_memory();
    }
    let result = match cli.command {
        Command::Embed(args) => embed::run_embed(args),
        Command::Similarity(args) => embed::run_similarity(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Coordinator(args) => {
            limit_malloc_arenas();
            coordinator::run_coordinator(args)
        }
        Command::Agent(args) => agent::run_agent(args),
        Command::Simulate(args) => {
            limit_malloc_arenas();
            simulate::run_simulate(args)
        }
        Command::Certs(args) => certs::run_certs(args),
        Command::Status(args) => status::run_status(args),
        Command::Bench(args) => bench::run_bench(args),
        Command::InitModel(args) => bench::run_init_model(args),
        Command::Plot(args) => plot::run_plot(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// For the coordinator: glibc gives threads that allocate concurrently their own malloc
/// arenas and keeps freed memory in each, so concurrent uploads grew the coordinator by
/// ~9 MiB per agent (`bench/federation 32`: 417 MiB peak; 269 MiB with two arenas).
/// `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator tuning parameter; called before the
        // runtime's threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// For the commands that run the model on the CPU: a step allocates and frees activations
/// and gradients of up to tens of MiB over and over. By default glibc serves such blocks
/// from fresh `mmap` pages and trims freed heap back to the system, so every reuse faults its
/// pages in again (1.8 M minor faults in a default `fedmicse bench`). Blocks up to 32 MiB
/// from the heap, and no trimming: 0.34 M faults, training steps and inference ~5 % faster,
/// peak RSS +3 % (BENCHMARKS.md). glibc's own settings in the environment still win.
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |name: &str| std::env::var_os(name).is_some();
        if !(set("GLIBC_TUNABLES")
            || set("MALLOC_MMAP_THRESHOLD_")
            || set("MALLOC_TRIM_THRESHOLD_"))
        {
            // SAFETY: mallopt only sets allocator tuning parameters; called before the
            // program's threads start.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn root() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Leaf keys of a TOML value, as `section.key`.
    fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_table() {
                    keys(v, &name, out);
                } else {
                    out.push(name);
                }
            }
        }
    }

    /// Every field of a config struct is documented in its example file: serialising the
    /// parsed file back gives all fields (defaults included); each must appear in the file,
    /// set or commented out, in its section.
    fn check_documented(path: &Path, value: toml::Value) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut all = Vec::new();
        keys(&value, "", &mut all);
        for key in all {
            let (section, leaf) = match key.rsplit_once('.') {
                Some((s, l)) => (Some(s), l),
                None => (None, key.as_str()),
            };
            // The lines of the section: from its header line to the next header.
            let mut in_section = section.is_none();
            let mut body = String::new();
            for line in text.lines() {
                let t = line.trim();
                if t.starts_with('[') && t.ends_with(']') {
                    in_section = section.is_some_and(|s| t == format!("[{s}]"));
                    continue;
                }
                if in_section {
                    body.push_str(line);
                    body.push('\n');
                }
            }
            let documented = body.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{leaf} =")) || l.starts_with(&format!("{leaf}="))
            });
            assert!(
                documented,
                "{}: field {key} is not documented",
                path.display()
            );
        }
    }

    #[test]
    fn bundled_configs_parse_and_document_every_field() {
        let c = fedmicse_coordinator::CoordinatorConfig::from_file(
            &root().join("configs/coordinator.toml"),
        )
        .unwrap();
        check_documented(
            &root().join("configs/coordinator.toml"),
            toml::Value::try_from(&c).unwrap(),
        );
        let a = fedmicse_agent::AgentConfig::from_file(&root().join("configs/agent.toml")).unwrap();
        check_documented(
            &root().join("configs/agent.toml"),
            toml::Value::try_from(&a).unwrap(),
        );
        let s =
            fedmicse_simulation::SimulateConfig::from_file(&root().join("configs/simulate.toml"))
                .unwrap();
        let mut v = toml::Value::try_from(&s).unwrap();
        // The simulation's [updates] and [eval].max_pairs are advanced: defaults, not listed.
        if let toml::Value::Table(t) = &mut v {
            t.remove("updates");
            if let Some(toml::Value::Table(e)) = t.get_mut("eval") {
                e.remove("max_pairs");
            }
            if let Some(toml::Value::Table(f)) = t.get_mut("federation") {
                f.remove("min_clients");
            }
        }
        check_documented(&root().join("configs/simulate.toml"), v);
    }
}
