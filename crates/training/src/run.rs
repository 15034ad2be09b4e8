//! A whole training run on a sentence file: epochs or steps, periodic STS dev evaluation,
//! best and last checkpoints, a JSONL metrics log and a PNG plot.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedmicse_encoder::{EmbedOptions, Encoder, Pooling};
use fedmicse_plot::{Panel, Series, line_panels};
use fedmicse_runtime::RuntimeError;
use serde::Serialize;

use crate::data::{batches_per_epoch, epoch_batches};
use crate::error::{Result, TrainError};
use crate::objective::AmiStatus;
use crate::sts::{self, StsPair};
use crate::trainer::{MlpHead, StepMetrics, TrainConfig, Trainer};

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Epochs(usize),
    Steps(usize),
}

impl Budget {
    pub fn total_steps(self, sentences: usize, batch_size: usize) -> usize {
        match self {
            Budget::Epochs(e) => e * batches_per_epoch(sentences, batch_size),
            Budget::Steps(s) => s,
        }
    }
}

/// A development set for checkpoint selection.
#[derive(Debug, Clone)]
pub struct DevSet {
    pub name: String,
    pub pairs: Vec<StsPair>,
    pub max_len: Option<usize>,
}

impl DevSet {
    pub fn load(path: &Path) -> Result<Self> {
        Ok(DevSet {
            name: path.display().to_string(),
            pairs: sts::read_task(path)?,
            max_len: None,
        })
    }

    /// Spearman ×100 with [CLS] pooling (the miCSE embedding).
    pub fn score(&self, encoder: &Encoder) -> Result<f64> {
        let opts = EmbedOptions {
            pooling: Pooling::Cls,
            max_len: self.max_len,
            ..Default::default()
        };
        Ok(sts::evaluate(encoder, &self.pairs, &opts)?)
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub train: TrainConfig,
    pub budget: Budget,
    pub dev: Option<DevSet>,
    /// Evaluate every this many steps (and at the start and the end).
    pub eval_every: usize,
    pub output: PathBuf,
}

/// Callbacks for progress display.
pub trait Observer {
    fn start(&mut self, _total_steps: usize) {}
    fn step(&mut self, _metrics: &StepMetrics) {}
    fn eval(&mut self, _step: usize, _spearman: f64, _best: bool) {}
    fn finish(&mut self) {}
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    pub sentences: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub initial_dev: Option<f64>,
    pub best_dev: Option<f64>,
    pub best_step: Option<usize>,
    pub final_dev: Option<f64>,
    pub ami_skipped_steps: usize,
    pub seconds: f64,
    pub sentences_per_second: f64,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record<'a> {
    Step {
        step: usize,
        epoch: usize,
        loss: f64,
        info_nce: f64,
        ami: Option<f64>,
        ami_status: &'a str,
        lr: f64,
        grad_norm: f64,
        sentences_per_second: f64,
    },
    Eval {
        step: usize,
        /// Spearman ×100 on the dev set; `dev_spearman` in metrics.jsonl.
        #[serde(rename = "dev_spearman")]
        stsb_dev: f64,
        best: bool,
    },
}

pub fn status_name(s: AmiStatus) -> &'static str {
    match s {
        AmiStatus::Ok => "ok",
        AmiStatus::Fallback => "fallback",
        AmiStatus::ZeroSamples => "zero_samples",
        AmiStatus::NonFinite => "non_finite",
        AmiStatus::Off => "off",
    }
}

/// Saves encoder and head as a HuggingFace directory plus `training_head.safetensors`.
pub fn save_checkpoint(encoder: &Encoder, head: &MlpHead, dir: &Path) -> Result<()> {
    encoder.save(dir)?;
    head.save(dir)
}

/// Trains `encoder` on `sentences` and writes `best/` (when a dev set is given), `last/`,
/// `metrics.jsonl`, `training.png` and `summary.json` under `config.output`.
pub fn run(
    encoder: &Encoder,
    head: Option<MlpHead>,
    sentences: &[String],
    mut config: RunConfig,
    observer: &mut dyn Observer,
) -> Result<RunSummary> {
    if sentences.len() < 2 {
        return Err(TrainError::Data(format!(
            "training needs at least 2 distinct sentences, got {}",
            sentences.len()
        )));
    }
    let out = &config.output;
    std::fs::create_dir_all(out).map_err(RuntimeError::io(out))?;
    let batch_size = config.train.batch_size.min(sentences.len());
    config.train.batch_size = batch_size;
    let total = config.budget.total_steps(sentences.len(), batch_size);
    if total == 0 {
        return Err(TrainError::Config("the run has 0 steps".into()));
    }
    config.train.total_steps = total;
    let mut session = Session {
        encoder,
        trainer: Trainer::new(encoder, head, config.train.clone())?,
        dev: config.dev.as_ref(),
        out,
        log: MetricsLog::create(out.join("metrics.jsonl"))?,
        steps: Vec::new(),
        evals: Vec::new(),
        best: None,
    };
    let started = std::time::Instant::now();
    observer.start(total);
    session.evaluate(observer)?;
    let mut epoch = 0;
    'outer: loop {
        for batch in epoch_batches(sentences.len(), batch_size, config.train.seed, epoch as u64) {
            if session.trainer.steps_done() >= total {
                break 'outer;
            }
            let refs: Vec<&str> = batch.iter().map(|&i| sentences[i].as_str()).collect();
            session.step(&refs, epoch, observer)?;
            let done = session.trainer.steps_done();
            if config.eval_every > 0 && done % config.eval_every == 0 && done < total {
                session.evaluate(observer)?;
            }
        }
        epoch += 1;
    }
    session.finish(sentences.len(), started, observer)
}

/// `metrics.jsonl`, flushed after every record.
struct MetricsLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsLog {
    fn create(path: PathBuf) -> Result<Self> {
        match std::fs::File::create(&path) {
            Ok(f) => Ok(MetricsLog {
                path,
                file: std::io::BufWriter::new(f),
            }),
            Err(source) => Err(RuntimeError::io(path)(source).into()),
        }
    }

    fn write(&mut self, r: &Record) -> Result<()> {
        serde_json::to_writer(&mut self.file, r).expect("serialisable");
        self.file
            .write_all(b"\n")
            .and_then(|_| self.file.flush())
            .map_err(RuntimeError::io(&self.path))?;
        Ok(())
    }
}

/// A run between its steps: the trainer, the log, and what was measured so far.
struct Session<'a> {
    encoder: &'a Encoder,
    trainer: Trainer,
    dev: Option<&'a DevSet>,
    out: &'a Path,
    log: MetricsLog,
    steps: Vec<StepMetrics>,
    /// (step, Spearman ×100 on the dev set) per evaluation.
    evals: Vec<(usize, f64)>,
    best: Option<(usize, f64)>,
}

impl Session<'_> {
    /// Scores the current model on the dev set (if any); saves `best/` when it improved.
    fn evaluate(&mut self, observer: &mut dyn Observer) -> Result<()> {
        let Some(dev) = self.dev else {
            return Ok(());
        };
        let step = self.trainer.steps_done();
        let current = self.trainer.encoder(self.encoder);
        let stsb_dev = dev.score(&current)?;
        let improved = self.best.is_none_or(|(_, b)| stsb_dev > b);
        if improved {
            self.best = Some((step, stsb_dev));
            save_checkpoint(&current, &self.trainer.head(), &self.out.join("best"))?;
        }
        self.evals.push((step, stsb_dev));
        observer.eval(step, stsb_dev, improved);
        tracing::info!(
            step,
            dev_spearman = format!("{stsb_dev:.2}"),
            best = improved,
            "evaluated"
        );
        self.log.write(&Record::Eval {
            step,
            stsb_dev,
            best: improved,
        })
    }

    fn step(&mut self, batch: &[&str], epoch: usize, observer: &mut dyn Observer) -> Result<()> {
        let m = self.trainer.step(batch)?;
        observer.step(&m);
        self.log.write(&Record::Step {
            step: m.step,
            epoch,
            loss: m.loss,
            info_nce: m.info_nce,
            ami: m.ami,
            ami_status: status_name(m.ami_status),
            lr: m.lr,
            grad_norm: m.grad_norm,
            sentences_per_second: m.sentences as f64 / m.seconds,
        })?;
        self.steps.push(m);
        Ok(())
    }

    /// The last evaluation (unless the last step was just evaluated), `last/`,
    /// `summary.json` and `training.png`.
    fn finish(
        mut self,
        sentences: usize,
        started: std::time::Instant,
        observer: &mut dyn Observer,
    ) -> Result<RunSummary> {
        if self
            .evals
            .last()
            .is_none_or(|(s, _)| *s != self.trainer.steps_done())
        {
            self.evaluate(observer)?;
        }
        let last = self.trainer.encoder(self.encoder);
        save_checkpoint(&last, &self.trainer.head(), &self.out.join("last"))?;
        observer.finish();
        let summary = self.summary(sentences, started.elapsed().as_secs_f64());
        let summary_path = self.out.join("summary.json");
        std::fs::write(
            &summary_path,
            serde_json::to_string_pretty(&summary).expect("json"),
        )
        .map_err(RuntimeError::io(summary_path))?;
        plot_training(&self.out.join("training.png"), &self.steps, &self.evals)?;
        Ok(summary)
    }

    fn summary(&self, sentences: usize, seconds: f64) -> RunSummary {
        let steps = &self.steps;
        let train_seconds: f64 = steps.iter().map(|m| m.seconds).sum();
        let trained: usize = steps.iter().map(|m| m.sentences).sum();
        RunSummary {
            steps: self.trainer.steps_done(),
            sentences,
            first_loss: steps.first().map(|m| m.loss),
            last_loss: steps.last().map(|m| m.loss),
            initial_dev: self.evals.first().map(|e| e.1),
            best_dev: self.best.map(|b| b.1),
            best_step: self.best.map(|b| b.0),
            final_dev: self.evals.last().map(|e| e.1),
            ami_skipped_steps: steps
                .iter()
                .filter(|m| matches!(m.ami_status, AmiStatus::NonFinite | AmiStatus::ZeroSamples))
                .count(),
            seconds,
            sentences_per_second: if train_seconds > 0.0 {
                trained as f64 / train_seconds
            } else {
                0.0
            },
        }
    }
}

/// Loss (and its parts) over steps, and dev Spearman at each evaluation.
pub fn plot_training(path: &Path, steps: &[StepMetrics], evals: &[(usize, f64)]) -> Result<()> {
    let xy = |f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        steps
            .iter()
            .filter_map(|m| f(m).map(|v| (m.step as f64, v)))
            .collect()
    };
    let mut panels = vec![Panel {
        title: "Training loss".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![
            Series::line("total", xy(&|m| Some(m.loss))),
            Series::line("InfoNCE", xy(&|m| Some(m.info_nce))),
        ],
        y_from_zero: false,
    }];
    let ami = xy(&|m| m.ami);
    if !ami.is_empty() {
        panels.push(Panel {
            title: "AMI term (before λ)".into(),
            x_label: "step".into(),
            y_label: "AMI".into(),
            series: vec![Series::line("AMI", ami)],
            y_from_zero: false,
        });
    }
    if !evals.is_empty() {
        panels.push(Panel {
            title: "STS dev Spearman ×100 ([CLS])".into(),
            x_label: "step".into(),
            y_label: "Spearman".into(),
            series: vec![Series::marked(
                "dev",
                evals.iter().map(|&(s, v)| (s as f64, v)).collect(),
            )],
            y_from_zero: false,
        });
    }
    line_panels(path, "fedmicse training", &panels, 900)
        .map_err(|e| TrainError::Plot(e.to_string()))
}
