//! `fedmicse`: federated low-shot training of sentence encoders with miCSE.

mod bench;
mod embed;
mod fed;
mod logging;
mod simulate;
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
    Coordinator(fed::CoordinatorCmd),
    /// Run a client agent beside a data silo: pull, train locally, send deltas.
    Agent(fed::AgentCmd),
    /// Simulate a federation on one machine: coordinator and N agents over real mTLS gRPC.
    Simulate(simulate::SimulateCmd),
    /// Create the federation's CA and certificates.
    #[command(subcommand)]
    Certs(fed::CertsCmd),
    /// Print a coordinator's state.
    Status(fed::StatusCmd),
    /// Measure inference and training throughput and peak memory.
    Bench(bench::BenchCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let result = match cli.command {
        Command::Embed(args) => embed::run_embed(args),
        Command::Similarity(args) => embed::run_similarity(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Coordinator(args) => fed::run_coordinator(args),
        Command::Agent(args) => fed::run_agent(args),
        Command::Simulate(args) => simulate::run_simulate(args),
        Command::Certs(args) => fed::run_certs(args),
        Command::Status(args) => fed::run_status(args),
        Command::Bench(args) => bench::run_bench(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
