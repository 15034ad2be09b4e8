//! `fedmicse bench`: inference and training throughput, peak memory, CUDA start-up.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use fedmicse_encoder::{
    BertConfig, BertModel, EmbedOptions, Encoder, Pooling, TextTokenizer, parse_device,
};
use fedmicse_training::sts::read_tsv;
use fedmicse_training::{TrainConfig, Trainer};
use serde::Serialize;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// A tiny BERT (2 layers, hidden 64) for fast experiments with the real vocabulary.
    Tiny,
    /// bert-base-uncased shapes (12 layers, hidden 768), random weights.
    BertBase,
    /// all-MiniLM-L6-v2 shapes (6 layers, hidden 384), random weights.
    Minilm,
}

#[derive(Args, Debug)]
pub struct BenchCmd {
    /// Benchmark this checkpoint...
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// ...or a randomly initialised model of these shapes (tokenizer from --tokenizer).
    #[arg(long, value_enum)]
    pub config: Option<Preset>,
    /// Directory with the tokenizer for --config.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub tokenizer: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// STS TSV whose sentences are embedded (the STS-B test set by default).
    #[arg(long, default_value = "data/sts/stsb/test.tsv")]
    pub sentences: PathBuf,
    /// Training sentences (one per line; the bundled Wikipedia sentences fill max_len 32).
    #[arg(long, default_value = "data/wiki/wiki_sentences.txt")]
    pub train_sentences: PathBuf,
    /// Sentences per inference measurement.
    #[arg(long, default_value_t = 1024)]
    pub inference_sentences: usize,
    /// Timed repetitions (the median is reported) after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Training steps per repetition.
    #[arg(long, default_value_t = 3)]
    pub train_steps: usize,
    /// Sentences per training batch (and per inference batch unless --inference-batch-size).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Sentences per inference batch (default: --batch-size; GPUs want more, e.g. 256).
    #[arg(long, value_name = "N")]
    pub inference_batch_size: Option<usize>,
    /// Skip the training measurements.
    #[arg(long)]
    pub no_train: bool,
    /// Write the results as JSON too.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
struct Row {
    name: String,
    value: f64,
    unit: String,
    peak_rss_mib: Option<f64>,
}

/// Resets the kernel's peak-RSS counter (Linux), so each section reports its own peak.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run_bench(cmd: BenchCmd) -> Result<()> {
    let infer_batch = cmd.inference_batch_size.unwrap_or(cmd.batch_size);
    if cmd.repeats == 0 || cmd.batch_size < 2 || infer_batch == 0 {
        bail!("--repeats must be ≥ 1, --batch-size ≥ 2 and --inference-batch-size ≥ 1");
    }
    let device = parse_device(&cmd.device)?;
    let cold = Instant::now();
    // `--model DIR`, or a random model of `--config PRESET` with the `--tokenizer`'s vocabulary.
    let encoder = match (&cmd.model, cmd.config) {
        (Some(dir), _) => {
            Encoder::load(dir, &device).with_context(|| format!("loading {}", dir.display()))?
        }
        (None, Some(preset)) => {
            let config = preset.config();
            let tokenizer = TextTokenizer::from_dir(&cmd.tokenizer)
                .with_context(|| format!("tokenizer from {}", cmd.tokenizer.display()))?;
            Encoder::from_parts(
                BertModel::random(&config, true, &device),
                tokenizer,
                config,
                &device,
            )
        }
        (None, None) => bail!("give --model DIR or --config bert-base|minilm"),
    };
    let sentences = distinct_sentences(&cmd.sentences)?;
    let n = cmd.inference_sentences.min(sentences.len());
    let refs: Vec<&str> = sentences[..n].iter().map(String::as_str).collect();
    eprintln!(
        "bench: {} layers, hidden {}, device {}, {} sentences, batch {} (inference {})",
        encoder.config.num_hidden_layers,
        encoder.config.hidden_size,
        cmd.device,
        n,
        cmd.batch_size,
        infer_batch
    );
    let mut rows = Vec::new();

    if !fedmicse_encoder::device::is_host(&device) {
        // Time to the first finished training step from process start (kernels compiled and
        // autotuned on first use; cached across runs when the cache is warm).
        let mut c = TrainConfig::paper(encoder.model.num_layers(), 1e-3);
        c.batch_size = cmd.batch_size;
        let mut t = Trainer::new(&encoder, None, c)?;
        let batch: Vec<&str> = refs.iter().cycle().take(cmd.batch_size).copied().collect();
        t.step(&batch)?;
        rows.push(Row {
            name: "first training step from start".into(),
            value: cold.elapsed().as_secs_f64(),
            unit: "s".into(),
            peak_rss_mib: None,
        });
    }

    if device != fedmicse_encoder::device::cpu() {
        rows.extend(device_check(&encoder, &refs, cmd.batch_size)?);
    }
    rows.extend(inference_rows(&encoder, &refs, infer_batch, cmd.repeats)?);
    if !cmd.no_train {
        rows.extend(training_rows(&encoder, &cmd)?);
    }
    print_rows(&rows);
    if let Some(path) = &cmd.json {
        let v = serde_json::json!({
            "device": cmd.device,
            "layers": encoder.config.num_hidden_layers,
            "hidden": encoder.config.hidden_size,
            "batch_size": cmd.batch_size,
            "inference_batch_size": infer_batch,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// The sentences of an STS file, each once, in order of appearance.
fn distinct_sentences(path: &Path) -> Result<Vec<String>> {
    let pairs = read_tsv(path)?;
    let mut sentences: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in &pairs {
        for s in [&p.s1, &p.s2] {
            if seen.insert(s.clone()) {
                sentences.push(s.clone());
            }
        }
    }
    Ok(sentences)
}

/// Inference throughput at max lengths 32 and 128 (median of `repeats` after a warm-up).
fn inference_rows(
    encoder: &Encoder,
    refs: &[&str],
    infer_batch: usize,
    repeats: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for max_len in [32, 128] {
        let opts = EmbedOptions {
            pooling: Pooling::Cls,
            normalize: false,
            max_len: Some(max_len),
            batch_size: infer_batch,
        };
        encoder.embed(refs, &opts)?; // warm-up: every batch shape compiled and tuned
        reset_peak();
        let mut rates = Vec::new();
        for _ in 0..repeats {
            let t = Instant::now();
            encoder.embed(refs, &opts)?;
            rates.push(refs.len() as f64 / t.elapsed().as_secs_f64());
        }
        rows.push(Row {
            name: format!("inference, batch {infer_batch}, max_len {max_len}"),
            value: median(rates),
            unit: "sentences/s".into(),
            peak_rss_mib: peak_rss_mib(),
        });
    }
    Ok(rows)
}

/// miCSE and SimCSE training throughput and step time on `--train-sentences`.
fn training_rows(encoder: &Encoder, cmd: &BenchCmd) -> Result<Vec<Row>> {
    let train = fedmicse_training::data::read_sentences(&cmd.train_sentences)?;
    let train_refs: Vec<&str> = train.iter().map(String::as_str).collect();
    let tn = train_refs.len();
    if tn < cmd.batch_size {
        bail!(
            "{}: fewer sentences than a batch",
            cmd.train_sentences.display()
        );
    }
    let mut rows = Vec::new();
    for (name, lambda) in [("miCSE", 1e-3), ("SimCSE", 0.0)] {
        let mut c = TrainConfig::paper(encoder.model.num_layers(), lambda);
        c.batch_size = cmd.batch_size;
        c.total_steps = 1_000_000;
        let mut trainer = Trainer::new(encoder, None, c)?;
        let batch = |i: usize| -> Vec<&str> {
            (0..cmd.batch_size)
                .map(|j| train_refs[(i * cmd.batch_size + j) % tn])
                .collect()
        };
        trainer.step(&batch(0))?; // warm-up
        reset_peak();
        let mut rates = Vec::new();
        let mut k = 1;
        for _ in 0..cmd.repeats {
            let t = Instant::now();
            for _ in 0..cmd.train_steps {
                trainer.step(&batch(k))?;
                k += 1;
            }
            rates.push((cmd.train_steps * cmd.batch_size) as f64 / t.elapsed().as_secs_f64());
        }
        let rate = median(rates);
        rows.push(Row {
            name: format!("{name} training step, max_len 32"),
            value: rate,
            unit: "sentences/s".into(),
            peak_rss_mib: peak_rss_mib(),
        });
        rows.push(Row {
            name: format!("{name} training step time"),
            value: cmd.batch_size as f64 / rate,
            unit: "s/step".into(),
            peak_rss_mib: None,
        });
    }
    Ok(rows)
}

/// The rows as a Markdown table.
fn print_rows(rows: &[Row]) {
    println!("| measurement | value | unit | peak RSS (MiB) |");
    println!("|---|---:|---|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.name,
            if r.value != 0.0 && r.value.abs() < 0.01 {
                format!("{:.2e}", r.value)
            } else {
                format!("{:.2}", r.value)
            },
            r.unit,
            r.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0}"))
        );
    }
}

/// On any device but the default CPU one (a GPU, or `flex`), the same work on the CPU: embeddings (max length 128,
/// padded into the device's length buckets there) and one miCSE step without dropout (same
/// weights, head and AMI samples), so a fast run is also shown to be a right one. GPUs run
/// f32 matmuls on TF32 tensor cores, so expect relative differences near 1e-3, not 1e-6.
fn device_check(encoder: &Encoder, sentences: &[&str], batch: usize) -> Result<Vec<Row>> {
    let cpu = fedmicse_encoder::device::cpu();
    let reference = encoder.to_device(&cpu);
    let n = sentences.len().min(256);
    let opts = EmbedOptions {
        pooling: Pooling::Cls,
        normalize: false,
        max_len: Some(128),
        batch_size: 64,
    };
    let (ours, want) = (
        encoder.embed(&sentences[..n], &opts)?,
        reference.embed(&sentences[..n], &opts)?,
    );
    let (ours, want) = (ours.concat(), want.concat());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let step = |enc: &Encoder| -> Result<fedmicse_training::StepMetrics> {
        let mut model = enc.model.clone();
        model.dims.hidden_dropout = 0.0;
        model.dims.attention_dropout = 0.0;
        let mut c = TrainConfig::paper(model.num_layers(), 1e-3);
        c.batch_size = batch.min(n);
        let mut trainer = Trainer::new(&enc.with_model(model), None, c)?;
        Ok(trainer.step(&sentences[..batch.min(n)])?)
    };
    let (ours_step, want_step) = (step(encoder)?, step(&reference)?);
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let rows = vec![
        (
            "embeddings vs CPU, max abs Δ / max abs value",
            (diff / scale) as f64,
        ),
        (
            "miCSE loss vs CPU, relative Δ",
            rel(ours_step.loss, want_step.loss),
        ),
        (
            "gradient norm vs CPU, relative Δ",
            rel(ours_step.grad_norm, want_step.grad_norm),
        ),
    ];
    for (name, value) in &rows {
        if !value.is_finite() || *value > 1e-2 {
            tracing::warn!(
                check = name,
                value,
                "the device disagrees with the CPU reference"
            );
        }
    }
    Ok(rows
        .into_iter()
        .map(|(name, value)| Row {
            name: name.into(),
            value,
            unit: "ratio".into(),
            peak_rss_mib: None,
        })
        .collect())
}

impl Preset {
    pub fn config(self) -> BertConfig {
        match self {
            Preset::Tiny => BertConfig::new(30522, 64, 2, 4, 128),
            Preset::BertBase => BertConfig::bert_base(),
            Preset::Minilm => BertConfig::minilm_l6(),
        }
    }
}

#[derive(Args, Debug)]
pub struct InitModelCmd {
    /// Output directory (a HuggingFace BERT directory).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Shapes to use.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub preset: Preset,
    /// Directory with the tokenizer (tokenizer.json or vocab.txt) to copy; its vocabulary
    /// size must match the preset's (30522).
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub tokenizer: PathBuf,
    #[arg(long, default_value_t = 48)]
    pub seed: u64,
}

/// `fedmicse init-model`: a randomly initialised BERT checkpoint, for experiments and
/// benchmarks of the federation machinery.
pub fn run_init_model(cmd: InitModelCmd) -> Result<()> {
    let device = fedmicse_encoder::device::cpu();
    device.seed(cmd.seed);
    let config = cmd.preset.config();
    let tokenizer = TextTokenizer::from_dir(&cmd.tokenizer)
        .with_context(|| format!("tokenizer from {}", cmd.tokenizer.display()))?;
    let model = BertModel::random(&config, true, &device);
    Encoder::from_parts(model, tokenizer, config, &device).save(&cmd.out)?;
    eprintln!(
        "wrote a random {:?} BERT to {}",
        cmd.preset,
        cmd.out.display()
    );
    Ok(())
}
