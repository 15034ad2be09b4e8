//! `fedmicse embed` and `fedmicse similarity`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling, cosine, parse_device};
use indicatif::{ProgressBar, ProgressStyle};

/// Options shared by every command that encodes sentences.
#[derive(Args, Debug, Clone)]
pub struct EncodeArgs {
    /// HuggingFace BERT model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Sentence vector: [CLS] hidden state (miCSE), masked mean, or BERT's pooler.
    #[arg(long, default_value = "cls", value_parser = parse_pooling)]
    pub pooling: Pooling,
    /// L2-normalise the vectors.
    #[arg(long)]
    pub normalize: bool,
    /// Maximum tokens per sentence, [CLS] and [SEP] included [default: the model's maximum
    /// positions, i.e. no truncation of ordinary sentences].
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
    /// Sentences per forward pass (sorted by length inside, returned in input order).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub batch_size: usize,
    /// Compute device: cpu, or cuda / cuda:N when built with the `cuda` feature.
    #[arg(long, default_value = "cpu", value_name = "D")]
    pub device: String,
}

fn parse_pooling(s: &str) -> std::result::Result<Pooling, String> {
    s.parse()
}

impl EncodeArgs {
    pub fn options(&self) -> EmbedOptions {
        EmbedOptions {
            pooling: self.pooling,
            normalize: self.normalize,
            max_len: self.max_len,
            batch_size: self.batch_size,
        }
    }

    pub fn load(&self) -> Result<Encoder> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if let Some(m) = self.max_len
            && m < 3
        {
            bail!("--max-len {m} is too small: [CLS] and [SEP] take two tokens");
        }
        let device = parse_device(&self.device)?;
        let encoder = Encoder::load(&self.model, &device)
            .with_context(|| format!("loading model {}", self.model.display()))?;
        Ok(encoder)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EmbedFormat {
    /// One JSON array of floats per line, in input order.
    Jsonl,
    /// A NumPy .npy file of shape [sentences, hidden], float32.
    Npy,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub encode: EncodeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EmbedFormat::Jsonl)]
    pub format: EmbedFormat,
    /// Input file with one sentence per line [default: stdin]. Empty lines are embedded as
    /// the empty string.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Output file [default: stdout].
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MatrixFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct SimilarityArgs {
    #[command(flatten)]
    pub encode: EncodeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = MatrixFormat::Text)]
    pub format: MatrixFormat,
    /// The sentences to compare (at least two).
    #[arg(required = true, num_args = 2.., value_name = "SENTENCE")]
    pub sentences: Vec<String>,
}

/// Splits text into lines: `\n` or `\r\n` separated, a final newline does not start a line.
pub fn split_lines(text: &str) -> Vec<&str> {
    if text.is_empty() {
        return Vec::new();
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    body.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect()
}

/// Reads all of a file (or stdin) as UTF-8, naming the place of the first bad byte.
pub fn read_text(path: Option<&PathBuf>) -> Result<String> {
    let mut bytes = Vec::new();
    match path {
        Some(p) => {
            bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        }
        None => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading stdin")?;
        }
    }
    let name = path.map_or("stdin".to_string(), |p| p.display().to_string());
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("{name}: invalid UTF-8 at byte {at} (line {line})")
    })
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub fn run_embed(args: EmbedArgs) -> Result<()> {
    let text = read_text(args.input.as_ref())?;
    let lines = split_lines(&text);
    let encoder = args.encode.load()?;
    let pb = progress_bar(lines.len() as u64, "embedding");
    let started = std::time::Instant::now();
    let vectors =
        encoder.embed_with_progress(&lines, &args.encode.options(), |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    tracing::info!(
        sentences = lines.len(),
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "embedded"
    );
    let dim = encoder.config.hidden_size;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match args.format {
        EmbedFormat::Jsonl => {
            for v in &vectors {
                serde_json::to_writer(&mut out, v)?;
                out.write_all(b"\n")?;
            }
        }
        EmbedFormat::Npy => write_npy(&mut out, &vectors, dim)?,
    }
    out.flush()?;
    Ok(())
}

/// NumPy format version 1.0: magic, header dict padded to a multiple of 64, f32 LE data.
pub fn write_npy(out: &mut dyn Write, rows: &[Vec<f32>], dim: usize) -> Result<()> {
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        rows.len(),
        dim
    );
    let unpadded = 10 + header.len() + 1;
    let pad = unpadded.div_ceil(64) * 64 - unpadded;
    let header = format!("{header}{}\n", " ".repeat(pad));
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for row in rows {
        for x in row {
            out.write_all(&x.to_le_bytes())?;
        }
    }
    Ok(())
}

pub fn run_similarity(args: SimilarityArgs) -> Result<()> {
    let encoder = args.encode.load()?;
    let sentences: Vec<&str> = args.sentences.iter().map(String::as_str).collect();
    let vectors = encoder.embed(&sentences, &args.encode.options())?;
    let n = vectors.len();
    let matrix: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..n).map(|j| cosine(&vectors[i], &vectors[j])).collect())
        .collect();
    match args.format {
        MatrixFormat::Json => {
            let v = serde_json::json!({"sentences": sentences, "similarity": matrix});
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        MatrixFormat::Text => {
            for (i, s) in sentences.iter().enumerate() {
                println!("[{i}] {s}");
            }
            print!("\n    ");
            for j in 0..n {
                print!("{:>8}", format!("[{j}]"));
            }
            println!();
            for (i, row) in matrix.iter().enumerate() {
                print!("{:<4}", format!("[{i}]"));
                for v in row {
                    print!("{v:>8.4}");
                }
                println!();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(split_lines(""), Vec::<&str>::new());
        assert_eq!(split_lines("a\n"), vec!["a"]);
        assert_eq!(split_lines("a\r\n\nb"), vec!["a", "", "b"]);
        assert_eq!(split_lines("\n"), vec![""]);
    }

    #[test]
    fn npy_header_is_aligned() {
        let mut buf = Vec::new();
        write_npy(&mut buf, &[vec![1.0, 2.0]], 2).unwrap();
        let hlen = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(buf.len(), 10 + hlen + 8);
        assert_eq!(buf[10 + hlen - 1], b'\n');
    }
}
