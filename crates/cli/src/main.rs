//! `fedmicse`: federated low-shot training of sentence encoders with miCSE.

mod embed;
mod logging;
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let result = match cli.command {
        Command::Embed(args) => embed::run_embed(args),
        Command::Similarity(args) => embed::run_similarity(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
