//! `fedmicse plot rounds`, `fedmicse plot compare` and `fedmicse plot embeddings`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use fedmicse_coordinator::RoundRecord;
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling, parse_device};
use fedmicse_plot::{Panel, Series, line_panels};

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
    /// The global model's STS dev per round for several runs, one line each (e.g. one attack
    /// without defences, with the default defences and with median aggregation).
    Compare {
        /// A run: LABEL=FILE, FILE a simulation's rounds.json or a coordinator's
        /// rounds.jsonl. Repeat for each line.
        #[arg(long = "run", value_name = "LABEL=FILE", required = true, value_parser = parse_run)]
        runs: Vec<(String, PathBuf)>,
        #[arg(long, value_name = "PNG", default_value = "compare.png")]
        out: PathBuf,
        #[arg(long, default_value = "Global model: STS dev Spearman ×100 per round")]
        title: String,
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
            let records = crate::simulate::read_rounds(&log)?;
            crate::simulate::plot_rounds(&out, &records)?;
            eprintln!("wrote {} ({} rounds)", out.display(), records.len());
        }
        PlotCmd::Compare { runs, out, title } => {
            let runs = runs
                .into_iter()
                .map(|(label, path)| Ok((label, crate::simulate::read_rounds(&path)?)))
                .collect::<Result<Vec<_>>>()?;
            plot_compare(&out, &title, &runs)?;
            eprintln!("wrote {} ({} runs)", out.display(), runs.len());
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

fn parse_run(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((label, file)) if !label.is_empty() && !file.is_empty() => {
            Ok((label.to_string(), PathBuf::from(file)))
        }
        _ => Err(format!("{s:?}: expected LABEL=FILE")),
    }
}

/// One panel: STS dev of the global model per round, one line per run.
pub fn plot_compare(out: &Path, title: &str, runs: &[(String, Vec<RoundRecord>)]) -> Result<()> {
    if runs.is_empty() {
        bail!("no runs to compare");
    }
    let series = runs
        .iter()
        .map(|(label, records)| {
            Series::marked(
                label.clone(),
                records
                    .iter()
                    .filter_map(|r| r.stsb_dev.map(|v| (r.round as f64, v)))
                    .collect(),
            )
        })
        .collect();
    let panel = Panel {
        title: "STS dev Spearman ×100 of the global model".into(),
        x_label: "round".into(),
        y_label: "Spearman".into(),
        series,
        y_from_zero: false,
    };
    line_panels(out, title, &[panel], 900).map_err(anyhow::Error::msg)
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

    fn record(round: u64, dev: Option<f64>) -> RoundRecord {
        RoundRecord {
            round,
            clients: 3,
            mean_loss: None,
            stsb_dev: dev,
            bytes_up: 0,
            bytes_down: 0,
            seconds: 0.0,
            refused: Default::default(),
            bounded: 0,
            step_ratio: None,
            digest: None,
        }
    }

    #[test]
    fn compare_draws_one_line_per_run() {
        let dir = std::env::temp_dir().join(format!("fedmicse-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A run as `simulate` writes it (an object) and one as a bare array.
        let a = dir.join("a.json");
        let recs: Vec<RoundRecord> = (0..4).map(|r| record(r, Some(80.0 + r as f64))).collect();
        std::fs::write(
            &a,
            serde_json::to_string(&serde_json::json!({"attack": "scale", "rounds": recs})).unwrap(),
        )
        .unwrap();
        let b = dir.join("b.json");
        let recs: Vec<RoundRecord> = (0..4)
            .map(|r| record(r, (r != 2).then(|| 80.0 - 20.0 * r as f64)))
            .collect();
        std::fs::write(&b, serde_json::to_string(&recs).unwrap()).unwrap();
        let runs = vec![
            (
                "default".to_string(),
                crate::simulate::read_rounds(&a).unwrap(),
            ),
            (
                "none".to_string(),
                crate::simulate::read_rounds(&b).unwrap(),
            ),
        ];
        assert_eq!(runs[0].1.len(), 4);
        assert_eq!(runs[1].1[2].stsb_dev, None);
        let out = dir.join("compare.png");
        plot_compare(&out, "scale attack", &runs).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (900, 380));
        let px = &buf[..info.buffer_size()];
        let step = info.color_type.samples();
        let colours: std::collections::HashSet<&[u8]> = px.chunks(step).collect();
        assert!(colours.len() > 20, "{} colours", colours.len());
        let white = px
            .chunks(step)
            .filter(|p| p.iter().all(|&v| v == 255))
            .count();
        let total = px.len() / step;
        assert!(
            white < total * 99 / 100,
            "nearly blank: {white}/{total} white"
        );
        // Both line colours of the plot crate's palette are there.
        let has = |rgb: [u8; 3]| px.chunks(step).any(|p| p[..3] == rgb);
        assert!(has([31, 119, 180]) && has([214, 39, 40]));
        assert!(parse_run("x").is_err());
        assert_eq!(
            parse_run("a=b.json").unwrap(),
            ("a".into(), PathBuf::from("b.json"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
