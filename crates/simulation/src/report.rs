//! Reporting round records, wherever they come from (a simulation, a coordinator's
//! `rounds.jsonl`, a coordinator's status): the table printed round by round, `rounds.json`,
//! and the round plots.
//!
//! The STS dev Spearman ×100 of the global model is called `stsb_dev` here, as in
//! [`RoundRecord`], `rounds.json`, `rounds.jsonl` and the table's header.

use std::path::Path;

use anyhow::{Context, Result, bail};
use fedmicse_agent::attack::Attack;
use fedmicse_coordinator::RoundRecord;
use fedmicse_federation::UpdateRules;
use fedmicse_federation::robust::Strategy;
use fedmicse_plot::{Panel, Series, line_panels};
use fedmicse_wire::pb;
use serde::Serialize;

use crate::config::Defences;
use crate::run::{Outcome, Plan};

/// One line of the round table (and of `fedmicse status --json`'s history).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub round: u64,
    pub clients: u32,
    pub mean_loss: Option<f64>,
    pub stsb_dev: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
}

impl From<&RoundRecord> for Row {
    fn from(r: &RoundRecord) -> Self {
        Row {
            round: r.round,
            clients: r.clients,
            mean_loss: r.mean_loss,
            stsb_dev: r.stsb_dev,
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            seconds: r.seconds,
        }
    }
}

impl From<&pb::RoundSummary> for Row {
    /// The wire says "not measured" with NaN.
    fn from(h: &pb::RoundSummary) -> Self {
        let measured = |v: f64| (!v.is_nan()).then_some(v);
        Row {
            round: h.round,
            clients: h.clients,
            mean_loss: measured(h.mean_loss),
            stsb_dev: measured(h.dev_spearman),
            bytes_up: h.bytes_up,
            bytes_down: h.bytes_down,
            seconds: h.seconds,
        }
    }
}

/// The table's header line.
pub fn table_header() -> String {
    format!(
        "{:>5} {:>7} {:>10} {:>9} {:>10} {:>10} {:>8}",
        "round", "clients", "mean_loss", "stsb_dev", "bytes_up", "bytes_down", "seconds"
    )
}

impl std::fmt::Display for Row {
    /// The row under [`table_header`]: "-" for what was not measured, traffic in K/M/G.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
        write!(
            f,
            "{:>5} {:>7} {:>10} {:>9} {:>10} {:>10} {:>8.1}",
            self.round,
            self.clients,
            opt(self.mean_loss, 4),
            opt(self.stsb_dev, 2),
            human(self.bytes_up),
            human(self.bytes_down),
            self.seconds
        )
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}K", b as f64 / 1024.0),
        b => format!("{b}"),
    }
}

/// What `rounds.json` holds: the setting of the run and every committed round, each
/// [`RoundRecord`] whole (refusals by check, bounded updates, step ratio and digest too).
#[derive(Debug, Serialize)]
pub struct RunLog<'a> {
    pub clients: usize,
    /// Ids of the hostile agents (empty without --byzantine).
    pub byzantine: &'a [String],
    pub attack: Option<Attack>,
    pub defences: Defences,
    /// `fedavg`, `median` or `trimmed_mean`.
    pub aggregation: Strategy,
    pub updates: &'a UpdateRules,
    pub rounds: &'a [RoundRecord],
}

impl<'a> RunLog<'a> {
    pub fn new(plan: &'a Plan, rounds: &'a [RoundRecord]) -> Self {
        RunLog {
            clients: plan.config.clients,
            byzantine: &plan.hostile,
            attack: plan.attack,
            defences: plan.defences,
            aggregation: plan.config.aggregation.strategy,
            updates: &plan.config.updates,
            rounds,
        }
    }
}

/// Writes `rounds.json`, `rounds.png` and the final model `global/` under the output folder.
pub fn write_outputs(plan: &Plan, outcome: &Outcome) -> Result<()> {
    let out = &plan.config.output;
    let json = serde_json::to_string_pretty(&RunLog::new(plan, &outcome.history))?;
    std::fs::write(out.join("rounds.json"), json)?;
    plot_rounds(&out.join("rounds.png"), &outcome.history)?;
    let global = out.join("global");
    if global.exists() {
        std::fs::remove_dir_all(&global)?;
    }
    copy_dir(&outcome.last_checkpoint, &global)
        .with_context(|| format!("copying the final model to {}", global.display()))?;
    Ok(())
}

/// Copies a checkpoint directory (files and the sentence-transformers `1_Pooling/`).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Reads a `rounds.json` written by `simulate` (an object with `rounds`, or the bare array
/// of older versions) or a coordinator's `rounds.jsonl`.
pub fn read_rounds(path: &Path) -> Result<Vec<RoundRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let whole: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let records: Vec<RoundRecord> = match whole {
        Some(v @ serde_json::Value::Array(_)) => {
            serde_json::from_value(v).with_context(|| format!("{}", path.display()))?
        }
        Some(serde_json::Value::Object(mut o)) if o.get("rounds").is_some_and(|r| r.is_array()) => {
            serde_json::from_value(o.remove("rounds").expect("rounds"))
                .with_context(|| format!("{}", path.display()))?
        }
        _ => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
            })
            .collect::<Result<_>>()?,
    };
    if records.is_empty() {
        bail!("{}: no rounds", path.display());
    }
    Ok(records)
}

/// (round, value) for the rounds where `f` has a value.
fn per_round(history: &[RoundRecord], f: impl Fn(&RoundRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    history
        .iter()
        .filter_map(|r| f(r).map(|v| (r.round as f64, v)))
        .collect()
}

fn panel(title: &str, y_label: &str, series: Vec<Series>, y_from_zero: bool) -> Panel {
    Panel {
        title: title.into(),
        x_label: "round".into(),
        y_label: y_label.into(),
        series,
        y_from_zero,
    }
}

/// STS dev, mean local loss and traffic per round.
pub fn plot_rounds(path: &Path, history: &[RoundRecord]) -> Result<()> {
    let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
    let traffic = |label: &str, f: fn(&RoundRecord) -> u64| {
        Series::marked(
            label,
            per_round(history, |r| (r.round > 0).then(|| mb(f(r)))),
        )
    };
    let panels = vec![
        panel(
            "Global model: STS dev Spearman ×100",
            "Spearman",
            vec![Series::marked("dev", per_round(history, |r| r.stsb_dev))],
            false,
        ),
        panel(
            "Mean local training loss",
            "loss",
            vec![Series::marked("loss", per_round(history, |r| r.mean_loss))],
            false,
        ),
        panel(
            "Traffic per round",
            "MiB",
            vec![
                traffic("up (deltas)", |r| r.bytes_up),
                traffic("down (models)", |r| r.bytes_down),
            ],
            true,
        ),
    ];
    line_panels(path, "fedmicse federation", &panels, 900).map_err(anyhow::Error::msg)
}

/// One panel: STS dev of the global model per round, one line per run.
pub fn plot_compare(out: &Path, title: &str, runs: &[(String, Vec<RoundRecord>)]) -> Result<()> {
    if runs.is_empty() {
        bail!("no runs to compare");
    }
    let series = runs
        .iter()
        .map(|(label, records)| Series::marked(label.clone(), per_round(records, |r| r.stsb_dev)))
        .collect();
    let p = panel(
        "STS dev Spearman ×100 of the global model",
        "Spearman",
        series,
        false,
    );
    line_panels(out, title, &[p], 900).map_err(anyhow::Error::msg)
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
