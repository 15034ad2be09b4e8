//! `fedmicse plot rounds`, `fedmicse plot compare` and `fedmicse plot embeddings`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling, parse_device};
use fedmicse_plot::pca_2d;
use fedmicse_simulation::report::{plot_compare, plot_rounds, read_rounds};

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
            let records = read_rounds(&log)?;
            plot_rounds(&out, &records)?;
            eprintln!("wrote {} ({} rounds)", out.display(), records.len());
        }
        PlotCmd::Compare { runs, out, title } => {
            let runs = runs
                .into_iter()
                .map(|(label, path)| Ok((label, read_rounds(&path)?)))
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
            let (labels, sentences) = read_labelled(&input, &label_column, &text_column)?;
            let enc = Encoder::load(&model, &parse_device(&device)?)?;
            let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
            let opts = EmbedOptions {
                pooling,
                normalize: true,
                max_len: Some(128),
                batch_size: 64,
            };
            let vectors = enc.embed(&refs, &opts)?;
            let name = model
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned());
            let (points, classes) = scatter_pca(
                &out,
                &format!("{name} — PCA of {pooling} embeddings"),
                &vectors,
                &labels,
            )?;
            eprintln!(
                "wrote {} ({} sentences, {} labels)",
                out.display(),
                points,
                classes
            );
        }
    }
    Ok(())
}

/// The label and text columns of a TSV whose header names the columns (at least 3 rows).
fn read_labelled(input: &Path, label: &str, text: &str) -> Result<(Vec<String>, Vec<String>)> {
    let body =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut lines = body.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
    let col = |name: &str| {
        header.iter().position(|h| h.trim() == name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no column {name:?} in the header {header:?}",
                input.display()
            )
        })
    };
    let (lc, tc) = (col(label)?, col(text)?);
    let (mut labels, mut sentences) = (Vec::new(), Vec::new());
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
    Ok((labels, sentences))
}

/// A scatter plot of the vectors' top two principal components, one colour per label;
/// returns the number of points and of labels.
fn scatter_pca(
    out: &Path,
    title: &str,
    vectors: &[Vec<f32>],
    labels: &[String],
) -> Result<(usize, usize)> {
    let (xy, explained) = pca_2d(vectors);
    let mut classes: Vec<String> = labels.to_vec();
    classes.sort();
    classes.dedup();
    let points: Vec<(f64, f64, usize)> = xy
        .iter()
        .zip(labels)
        .map(|(&(x, y), l)| (x, y, classes.binary_search(l).expect("known label")))
        .collect();
    let title = format!("{title} ({:.0}% of variance)", explained * 100.0);
    fedmicse_plot::scatter(out, &title, ("PC 1", "PC 2"), &points, &classes)?;
    Ok((points.len(), classes.len()))
}

fn parse_run(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((label, file)) if !label.is_empty() && !file.is_empty() => {
            Ok((label.to_string(), PathBuf::from(file)))
        }
        _ => Err(format!("{s:?}: expected LABEL=FILE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_parse() {
        assert!(parse_run("x").is_err());
        assert!(parse_run("=b.json").is_err());
        assert_eq!(
            parse_run("a=b.json").unwrap(),
            ("a".into(), PathBuf::from("b.json"))
        );
    }

    #[test]
    fn labelled_tsv_reads_by_column_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tsv");
        std::fs::write(
            &p,
            "sentence\tlabel\na cat\tpets\n\na dog\tpets\nrain\tweather\n",
        )
        .unwrap();
        let (labels, sentences) = read_labelled(&p, "label", "sentence").unwrap();
        assert_eq!(labels, ["pets", "pets", "weather"]);
        assert_eq!(sentences, ["a cat", "a dog", "rain"]);
        let e = read_labelled(&p, "topic", "sentence")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no column \"topic\""), "{e}");
        std::fs::write(&p, "label\tsentence\nx\n").unwrap();
        let e = read_labelled(&p, "label", "sentence")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2: missing columns"), "{e}");
        std::fs::write(&p, "label\tsentence\nx\ty\n").unwrap();
        assert!(read_labelled(&p, "label", "sentence").is_err());
    }
}
