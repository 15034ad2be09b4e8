//! `fedmicse train` and `fedmicse eval`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling, parse_device};
use fedmicse_federation::{TaskConfig, task};
use fedmicse_training::data::{read_sentences, sample};
use fedmicse_training::run::{self, Budget, DevSet, Observer};
use fedmicse_training::sts;
use fedmicse_training::{Fit, MlpHead, StepMetrics, TrainConfig, paper_lambda, train_config};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Objective {
    /// InfoNCE + attention mutual information (the paper's method).
    Micse,
    /// InfoNCE only (λ = 0): the SimCSE ablation.
    Simcse,
}

/// Training hyper-parameters shared by `train` and the federation's task defaults.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Objective.
    #[arg(long, value_enum, default_value_t = Objective::Micse)]
    pub objective: Objective,
    /// Train for this many epochs over the (sampled) sentences [default: 1].
    #[arg(long, conflicts_with = "steps", value_name = "E")]
    pub epochs: Option<usize>,
    /// Train for exactly this many steps instead of epochs.
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// Sentences per step (each encoded twice, so 2× this many rows).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Maximum tokens per training sentence.
    #[arg(long, default_value_t = 32)]
    pub max_len: usize,
    /// Peak learning rate (AdamW; the paper's low-shot runs use 1e-5, SimCSE 3e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// InfoNCE temperature τ.
    #[arg(long, default_value_t = 0.05)]
    pub temperature: f64,
    /// AMI weight λ [default: by data size as in the paper: 1e-3 up to 1,000 sentences,
    /// 1e-4 up to 10,000, 5e-4 beyond].
    #[arg(long = "lambda", value_name = "F")]
    pub lambda: Option<f64>,
    /// Layers whose attention maps AMI aligns, A..B (B exclusive, an even count)
    /// [default: 7..11 for 12 layers, 2..6 for 6 layers].
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub ami_layers: Option<std::ops::Range<usize>>,
    /// Valid attention entries sampled per row for AMI (K).
    #[arg(long, default_value_t = 150)]
    pub ami_samples: usize,
    /// AdamW weight decay (HF Trainer's default is 0).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Linear warm-up steps before the linear decay.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed for sampling, shuffling, dropout and AMI positions (deterministic on CPU).
    #[arg(long, default_value_t = 48)]
    pub seed: u64,
}

pub fn parse_range(s: &str) -> std::result::Result<std::ops::Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?}: expected A..B, e.g. 2..6"))?;
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {a:?} is not a number"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {b:?} is not a number"))?;
    if a >= b {
        return Err(format!("{s:?}: the range is empty"));
    }
    Ok(a..b)
}

impl TrainArgs {
    /// The flags as a task (λ by the paper's rule for `sentences` unless given), mapped as
    /// any task is ([`train_config`], the hyper-parameters as given), plus the warm-up only
    /// `train` has. `run::run` sets the total steps from [`TrainArgs::budget`].
    pub fn config(&self, num_layers: usize, sentences: usize) -> TrainConfig {
        let sat = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let task = TaskConfig {
            objective: match self.objective {
                Objective::Micse => task::Objective::Micse,
                Objective::Simcse => task::Objective::Simcse,
            },
            epochs: sat(self.epochs.unwrap_or(1)),
            steps: sat(self.steps.unwrap_or(0)),
            batch_size: sat(self.batch_size),
            max_len: sat(self.max_len),
            lr: self.lr,
            temperature: self.temperature,
            lambda: self.lambda.unwrap_or_else(|| paper_lambda(sentences)),
            ami_layers: self
                .ami_layers
                .as_ref()
                .map_or_else(Vec::new, |r| vec![sat(r.start), sat(r.end)]),
            ami_samples: sat(self.ami_samples),
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            ..TaskConfig::default()
        };
        let mut config = train_config(&task, num_layers, sentences, self.seed, Fit::AsGiven);
        config.warmup_steps = self.warmup_steps;
        config
    }

    pub fn budget(&self) -> Budget {
        match (self.steps, self.epochs) {
            (Some(s), _) => Budget::Steps(s),
            (None, e) => Budget::Epochs(e.unwrap_or(1)),
        }
    }
}

#[derive(Args, Debug)]
pub struct TrainCmd {
    /// Starting checkpoint (HuggingFace BERT directory).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Training sentences, one per line (empty lines and duplicates are dropped).
    #[arg(long, value_name = "FILE")]
    pub train_file: PathBuf,
    /// Output directory: best/ and last/ checkpoints, metrics.jsonl, training.png, summary.json.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Draw a low-shot split of N sentences (reproducible with --seed; the paper uses 64,
    /// 100, 500, 1000, 5000, 10000 with seeds 48-52).
    #[arg(long, value_name = "N")]
    pub sample: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
    /// STS dev file (score<TAB>s1<TAB>s2) for checkpoint selection, e.g. data/sts/stsb/dev.tsv.
    #[arg(long, value_name = "TSV")]
    pub eval_file: Option<PathBuf>,
    /// Evaluate on the dev file every N steps (and at the start and the end).
    #[arg(long, default_value_t = 125, value_name = "N")]
    pub eval_every: usize,
    /// Compute device: cpu, or cuda / cuda:N when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Progress bar with loss, AMI, sentences/s and ETA.
pub struct Progress {
    pb: ProgressBar,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            pb: ProgressBar::hidden(),
        }
    }
}

impl Observer for Progress {
    fn start(&mut self, total: usize) {
        self.pb = ProgressBar::new(total as u64);
        self.pb.set_style(
            ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps {msg} (eta {eta})")
                .expect("template")
                .progress_chars("=> "),
        );
    }
    fn step(&mut self, m: &StepMetrics) {
        let ami = m.ami.map_or("-".to_string(), |a| format!("{a:.4}"));
        self.pb.set_message(format!(
            "loss {:.4} ami {ami} {:.1} sent/s",
            m.loss,
            m.sentences as f64 / m.seconds
        ));
        self.pb.inc(1);
    }
    fn eval(&mut self, step: usize, spearman: f64, best: bool) {
        self.pb.println(format!(
            "step {step}: dev Spearman {spearman:.2}{}",
            if best { " (best)" } else { "" }
        ));
    }
    fn finish(&mut self) {
        self.pb.finish_and_clear();
    }
}

pub fn run_train(args: TrainCmd) -> Result<()> {
    let device = parse_device(&args.device)?;
    let encoder = Encoder::load(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let mut sentences = read_sentences(&args.train_file)?;
    if let Some(n) = args.sample {
        if n < 2 {
            bail!("--sample {n}: at least 2 sentences are needed");
        }
        sentences = sample(&sentences, n, args.train.seed);
    }
    let config = args
        .train
        .config(encoder.model.num_layers(), sentences.len());
    let dev = match &args.eval_file {
        Some(p) => Some(DevSet::load(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let head = MlpHead::load(&args.model, encoder.config.hidden_size, &device)?;
    tracing::info!(
        sentences = sentences.len(),
        objective = ?args.train.objective,
        lambda = config.objective.lambda,
        ami_layers = ?config.ami_layers,
        batch_size = config.batch_size,
        lr = config.lr,
        "training"
    );
    let run_config = run::RunConfig {
        train: config,
        budget: args.train.budget(),
        dev,
        eval_every: args.eval_every,
        output: args.output.clone(),
    };
    let summary = run::run(&encoder, head, &sentences, run_config, &mut Progress::new())?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!(
        "wrote {}/{{last,{}metrics.jsonl,training.png,summary.json}}",
        args.output.display(),
        if args.eval_file.is_some() {
            "best,"
        } else {
            ""
        }
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalCmd {
    /// Model to evaluate (HuggingFace BERT directory).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A task as NAME=PATH, PATH a TSV file or a directory of TSV files ("all" setting:
    /// concatenated, one Spearman). Repeat for several tasks, e.g.
    /// --task STS-B=data/sts/stsb/test.tsv --task SICK-R=data/sts/sickr/test.tsv
    #[arg(long = "task", required = true, value_name = "NAME=PATH", value_parser = parse_task)]
    pub tasks: Vec<(String, PathBuf)>,
    /// Sentence vector: [CLS] (miCSE) or masked mean.
    #[arg(long, default_value = "cls", value_parser = parse_eval_pooling)]
    pub pooling: Pooling,
    /// Maximum tokens per sentence [default: the model's maximum positions: SentEval
    /// encodes STS sentences whole].
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Also write the results as JSON: {"tasks": {NAME: {"spearman", "pairs"}}, "average"}.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn parse_task(s: &str) -> std::result::Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("{s:?}: expected NAME=PATH"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

fn parse_eval_pooling(s: &str) -> std::result::Result<Pooling, String> {
    match s.parse()? {
        Pooling::Pooler => Err("eval pools with cls or mean".into()),
        p => Ok(p),
    }
}

pub fn run_eval(args: EvalCmd) -> Result<()> {
    let device = parse_device(&args.device)?;
    let encoder = Encoder::load(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let opts = EmbedOptions {
        pooling: args.pooling,
        normalize: false,
        max_len: args.max_len,
        batch_size: args.batch_size,
    };
    let mut results = Vec::new();
    for (name, path) in &args.tasks {
        let pairs = sts::read_task(path).with_context(|| format!("task {name}"))?;
        let started = std::time::Instant::now();
        let score = sts::evaluate(&encoder, &pairs, &opts)?;
        tracing::info!(
            task = %name,
            pairs = pairs.len(),
            spearman = format!("{score:.2}"),
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "evaluated"
        );
        results.push((name.clone(), score, pairs.len()));
    }
    let average = results.iter().map(|r| r.1).sum::<f64>() / results.len() as f64;
    // A table like the paper's: one column per task, then the average.
    let width = results.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let header: Vec<String> = results
        .iter()
        .map(|r| format!("{:>width$}", r.0))
        .chain([format!("{:>width$}", "Avg.")])
        .collect();
    let values: Vec<String> = results
        .iter()
        .map(|r| format!("{:>width$.2}", r.1))
        .chain([format!("{average:>width$.2}")])
        .collect();
    println!("| {} |", header.join(" | "));
    println!(
        "|{}|",
        vec![format!("{}:", "-".repeat(width + 1)); header.len()].join("|")
    );
    println!("| {} |", values.join(" | "));
    if let Some(path) = &args.json {
        let tasks: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(n, s, p)| (n.clone(), serde_json::json!({"spearman": s, "pairs": p})))
            .collect();
        let v = serde_json::json!({"tasks": tasks, "average": average});
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_tasks_parse() {
        assert_eq!(parse_range("2..6").unwrap(), 2..6);
        assert!(parse_range("6..2").is_err());
        assert!(parse_range("x").is_err());
        assert_eq!(parse_task("STS-B=a/b.tsv").unwrap().0, "STS-B");
        assert!(parse_task("nopath").is_err());
    }
}
