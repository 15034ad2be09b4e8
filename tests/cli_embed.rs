//! `fedmicse embed` and `fedmicse similarity` end to end on the real checkpoint.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling};

fn fedmicse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedmicse"))
}

fn run_with_stdin(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = fedmicse()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn embed_jsonl_from_stdin_matches_library() {
    let model = minilm();
    let model_s = model.to_str().unwrap();
    let input = "A man is playing a guitar.\n\nA woman slices an onion.\r\nCafé Zürich\n";
    let out = run_with_stdin(
        &[
            "embed",
            "--model",
            model_s,
            "--pooling",
            "mean",
            "--normalize",
            "--max-len",
            "32",
            "--batch-size",
            "2",
        ],
        input.as_bytes(),
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Vec<f32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        4,
        "one vector per input line, the empty one included"
    );
    let enc = Encoder::load(&model, &fedmicse_encoder::device::cpu()).unwrap();
    let want = enc
        .embed(
            &[
                "A man is playing a guitar.",
                "",
                "A woman slices an onion.",
                "Café Zürich",
            ],
            &EmbedOptions {
                pooling: Pooling::Mean,
                normalize: true,
                max_len: Some(32),
                batch_size: 64,
            },
        )
        .unwrap();
    for (g, w) in lines.iter().zip(&want) {
        assert_eq!(g.len(), 384);
        assert!(max_abs_diff(g, w) < 1e-6);
    }
}

#[test]
fn embed_npy_to_file() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    let output = dir.path().join("out.npy");
    std::fs::write(&input, "first sentence\nsecond one\nthird\n").unwrap();
    run_ok(
        fedmicse()
            .args([
                "embed",
                "--model",
                model.to_str().unwrap(),
                "--format",
                "npy",
            ])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output),
    );
    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'shape': (3, 384)"), "{header}");
    let data: Vec<f32> = bytes[10 + hlen..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let enc = Encoder::load(&model, &fedmicse_encoder::device::cpu()).unwrap();
    let want = enc
        .embed(
            &["first sentence", "second one", "third"],
            &EmbedOptions::default(),
        )
        .unwrap();
    assert!(max_abs_diff(&data, &want.concat()) < 1e-6);
}

#[test]
fn similarity_ranks_paraphrases_higher() {
    let out = run_ok(
        fedmicse()
            .args([
                "similarity",
                "--model",
                minilm().to_str().unwrap(),
                "--pooling",
                "mean",
                "--format",
                "json",
            ])
            .args([
                "A man is playing a guitar.",
                "Someone plays the guitar.",
                "The stock market fell today.",
            ]),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["similarity"];
    let at = |i: usize, j: usize| m[i][j].as_f64().unwrap();
    assert!((at(0, 0) - 1.0).abs() < 1e-5);
    assert!((at(0, 1) - at(1, 0)).abs() < 1e-6, "symmetric");
    assert!(
        at(0, 1) > at(0, 2) + 0.3,
        "paraphrase {} vs unrelated {}",
        at(0, 1),
        at(0, 2)
    );

    let text = fedmicse()
        .args([
            "similarity",
            "--model",
            minilm().to_str().unwrap(),
            "one",
            "two",
        ])
        .output()
        .unwrap();
    assert!(text.status.success());
    assert!(String::from_utf8(text.stdout).unwrap().contains("[1] two"));
}

#[test]
fn bad_input_fails_cleanly() {
    let model = minilm();
    let m = model.to_str().unwrap();
    let out = run_with_stdin(&["embed", "--model", m], b"fine line\n\xff\xfe broken\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid UTF-8") && err.contains("line 2"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = fedmicse()
        .args(["embed", "--model", m, "--input", "/nonexistent/file.txt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/file.txt") && !err.contains("panicked"),
        "{err}"
    );

    let out = fedmicse()
        .args(["embed", "--model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model directory not found"));

    let out = run_with_stdin(&["embed", "--model", m, "--device", "cuda"], b"x\n");
    if !fedmicse_encoder::device::CUDA_COMPILED {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("without CUDA"));
    }

    let out = run_with_stdin(&["embed", "--model", m, "--pooling", "max"], b"x\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown pooling"));
}
