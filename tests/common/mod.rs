//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The all-MiniLM-L6-v2 checkpoint, fetched by `deploy/fetch-model` on first use.
pub fn minilm() -> PathBuf {
    let dir = root().join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        let status = Command::new(root().join("deploy/fetch-model"))
            .status()
            .expect("running deploy/fetch-model");
        assert!(status.success(), "deploy/fetch-model failed");
    }
    dir
}

/// A bundled fixture (copied from the reference outputs in shared/fixtures).
pub fn fixture(name: &str) -> serde_json::Value {
    let path = root().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Fixture floats were written as shortest f32 strings: parse, then round to f32.
pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// A nested list of rows flattened row-major.
pub fn rows_f32(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(f32s).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn sentences(v: &serde_json::Value) -> Vec<String> {
    v["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

pub mod fed;

/// Runs `cmd` to the end and returns its output, asserting that it succeeded (its stderr in
/// the message when not).
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes the header and the first `pairs` pairs of STS-B dev to `path`.
pub fn write_stsb_dev(path: &Path, pairs: usize) {
    let lines: Vec<String> = std::fs::read_to_string(root().join("data/sts/stsb/dev.tsv"))
        .unwrap()
        .lines()
        .take(pairs + 1)
        .map(String::from)
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// Runs `fedmicse embed ARGS --model MODEL` with `sentences` on stdin, one per line, and
/// returns the vectors it prints (JSON lines), asserting that it succeeded.
pub fn cli_embed(model: &Path, args: &[&str], sentences: &[&str]) -> Vec<Vec<f32>> {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedmicse"))
        .arg("embed")
        .args(args)
        .arg("--model")
        .arg(model)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sentences.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fedmicse embed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Decodes a chart PNG and checks it is `width`×`height` and really drawn on: many colours,
/// a fair share of non-white pixels below the title band, and the palette's first series
/// colour (31, 119, 180) among them.
pub fn assert_chart_png(path: &Path, width: u32, height: u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{}: not a PNG: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.width, info.height),
        (width, height),
        "{}: dimensions",
        path.display()
    );
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    let step = info.color_type.samples();
    assert!(step >= 3, "{}: {:?}", path.display(), info.color_type);
    let px = &buf[..info.buffer_size()];
    let colours: std::collections::HashSet<&[u8]> = px.chunks(step).collect();
    assert!(
        colours.len() > 2,
        "{}: {} colours",
        path.display(),
        colours.len()
    );
    // Below the 60-pixel title band and right of the y labels: where the data is drawn.
    let (w, h) = (width as usize, height as usize);
    let at = |x: usize, y: usize| &px[(y * w + x) * step..(y * w + x) * step + 3];
    let area: Vec<&[u8]> = (60..h)
        .flat_map(|y| (60..w).map(move |x| (x, y)))
        .map(|(x, y)| at(x, y))
        .collect();
    let inked = area.iter().filter(|p| p.iter().any(|&v| v != 255)).count();
    assert!(
        inked * 200 > area.len(),
        "{}: nearly blank plot area ({inked} of {} pixels drawn)",
        path.display(),
        area.len()
    );
    assert!(
        area.iter().any(|p| *p == [31u8, 119, 180]),
        "{}: no pixel in the first series colour",
        path.display()
    );
}
