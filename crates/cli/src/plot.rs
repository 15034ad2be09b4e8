//! `fedmicse plot rounds` and `fedmicse plot embeddings`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use fedmicse_coordinator::RoundRecord;
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling, parse_device};

#[derive(Subcommand, Debug)]
pub enum PlotCmd {
    /// Per-round STS dev, mean local loss and traffic from a coordinator's round log
    /// (STATE_DIR/rounds.jsonl) or a simulation's rounds.json.
    Rounds {
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
        #[arg(long, value_name = "PNG", default_value = "rounds.png")]
        out: PathBuf,
    },
    /// A 2-D PCA projection of sentence embeddings, coloured by a label column: TSV with a
    /// header naming the columns, e.g. "label<TAB>sentence".
    Embeddings {
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        #[arg(long, value_name = "TSV")]
        input: PathBuf,
        #[arg(long, default_value = "label")]
        label_column: String,
        #[arg(long, default_value = "sentence")]
        text_column: String,
        #[arg(long, default_value = "cls", value_parser = |s: &str| s.parse::<Pooling>())]
        pooling: Pooling,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_name = "PNG", default_value = "embeddings.png")]
        out: PathBuf,
    },
}

pub fn run_plot(cmd: PlotCmd) -> Result<()> {
    match cmd {
        PlotCmd::Rounds { log, out } => {
            let text = std::fs::read_to_string(&log)
                .with_context(|| format!("reading {}", log.display()))?;
            let records: Vec<RoundRecord> = if text.trim_start().starts_with('[') {
                serde_json::from_str(&text).with_context(|| format!("{}", log.display()))?
            } else {
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .enumerate()
                    .map(|(i, l)| {
                        serde_json::from_str(l)
                            .with_context(|| format!("{}:{}", log.display(), i + 1))
                    })
                    .collect::<Result<_>>()?
            };
            if records.is_empty() {
                bail!("{}: no rounds", log.display());
            }
            crate::simulate::plot_rounds(&out, &records)?;
            eprintln!("wrote {} ({} rounds)", out.display(), records.len());
        }
        PlotCmd::Embeddings {
            model,
            input,
            label_column,
            text_column,
            pooling,
            device,
            out,
        } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
            let col = |name: &str| {
                header.iter().position(|h| h.trim() == name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: no column {name:?} in the header {header:?}",
                        input.display()
                    )
                })
            };
            let (lc, tc) = (col(&label_column)?, col(&text_column)?);
            let mut labels = Vec::new();
            let mut sentences = Vec::new();
            for (i, line) in lines.enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let cols: Vec<&str> = line.split('\t').collect();
                let (Some(l), Some(t)) = (cols.get(lc), cols.get(tc)) else {
                    bail!("{}:{}: missing columns", input.display(), i + 2);
                };
                labels.push(l.to_string());
                sentences.push(t.to_string());
            }
            if sentences.len() < 3 {
                bail!("{}: need at least 3 sentences", input.display());
            }
            let enc = Encoder::load(&model, &parse_device(&device)?)?;
            let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
            let opts = EmbedOptions {
                pooling,
                normalize: true,
                max_len: Some(128),
                batch_size: 64,
            };
            let vectors = enc.embed(&refs, &opts)?;
            let (xy, explained) = pca_2d(&vectors);
            let mut classes: Vec<String> = labels.clone();
            classes.sort();
            classes.dedup();
            let points: Vec<(f64, f64, usize)> = xy
                .iter()
                .zip(&labels)
                .map(|(&(x, y), l)| (x, y, classes.binary_search(l).expect("known label")))
                .collect();
            let title = format!(
                "{} — PCA of {} embeddings ({:.0}% of variance)",
                model
                    .file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
                pooling,
                explained * 100.0
            );
            fedmicse_plot::scatter(&out, &title, ("PC 1", "PC 2"), &points, &classes)?;
            eprintln!(
                "wrote {} ({} sentences, {} labels)",
                out.display(),
                points.len(),
                classes.len()
            );
        }
    }
    Ok(())
}

/// Projects rows on the top two principal components (power iteration with deflation on the
/// covariance). Returns the 2-D points and the share of variance they explain.
pub fn pca_2d(rows: &[Vec<f32>]) -> (Vec<(f64, f64)>, f64) {
    let n = rows.len();
    let d = rows[0].len();
    let mean: Vec<f64> = (0..d)
        .map(|j| rows.iter().map(|r| r[j] as f64).sum::<f64>() / n as f64)
        .collect();
    let centered: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(x, m)| *x as f64 - m).collect())
        .collect();
    let mut cov = vec![vec![0f64; d]; d];
    for r in &centered {
        for i in 0..d {
            if r[i] == 0.0 {
                continue;
            }
            for j in i..d {
                cov[i][j] += r[i] * r[j];
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            cov[i][j] = cov[j][i];
        }
    }
    let total: f64 = (0..d).map(|i| cov[i][i]).sum();
    let mut components = Vec::new();
    let mut explained = 0.0;
    for k in 0..2 {
        let mut v: Vec<f64> = (0..d)
            .map(|i| ((i * 7 + k * 13) % 11) as f64 + 1.0)
            .collect();
        let mut lambda = 0.0;
        for _ in 0..300 {
            let mut w: Vec<f64> = (0..d)
                .map(|i| cov[i].iter().zip(&v).map(|(a, b)| a * b).sum())
                .collect();
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            w.iter_mut().for_each(|x| *x /= norm);
            lambda = norm;
            v = w;
        }
        // Deflate: cov ← cov − λ v vᵀ.
        for i in 0..d {
            for j in 0..d {
                cov[i][j] -= lambda * v[i] * v[j];
            }
        }
        explained += lambda;
        components.push(v);
    }
    let points = centered
        .iter()
        .map(|r| {
            let p = |c: &Vec<f64>| r.iter().zip(c).map(|(a, b)| a * b).sum::<f64>();
            (p(&components[0]), p(&components[1]))
        })
        .collect();
    (points, if total > 0.0 { explained / total } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_finds_the_main_axis() {
        // Points along (1, 1, 0) with small noise on z: PC 1 separates the ends.
        let rows: Vec<Vec<f32>> = (0..20)
            .map(|i| vec![i as f32, i as f32, ((i * 37) % 5) as f32 * 0.01])
            .collect();
        let (pts, explained) = pca_2d(&rows);
        assert!(explained > 0.99);
        assert!((pts[0].0 - pts[19].0).abs() > 20.0);
        assert!(pts.iter().all(|p| p.1.abs() < 0.1));
    }
}
