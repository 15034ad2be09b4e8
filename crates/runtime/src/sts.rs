//! SentEval-style STS evaluation: Spearman ×100 between cosine similarity and gold scores.

use std::path::{Path, PathBuf};

use crate::{EmbedOptions, Embedder, RuntimeError};

type Result<T> = std::result::Result<T, RuntimeError>;

/// One scored sentence pair.
#[derive(Debug, Clone, PartialEq)]
pub struct StsPair {
    pub score: f64,
    pub s1: String,
    pub s2: String,
}

/// Reads `score<TAB>sentence1<TAB>sentence2` with a header line.
pub fn read_tsv(path: &Path) -> Result<Vec<StsPair>> {
    let text = std::fs::read_to_string(path).map_err(RuntimeError::io(path))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| {
            RuntimeError::Data(format!(
                "{}:{}: {what}; expected score<TAB>sentence1<TAB>sentence2",
                path.display(),
                i + 1
            ))
        };
        let mut cols = line.split('\t');
        let (Some(score), Some(s1), Some(s2)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(bad("fewer than 3 columns"));
        };
        let score: f64 = score
            .trim()
            .parse()
            .map_err(|_| bad(&format!("score {score:?} is not a number")))?;
        pairs.push(StsPair {
            score,
            s1: s1.to_string(),
            s2: s2.to_string(),
        });
    }
    if pairs.is_empty() {
        return Err(RuntimeError::Data(format!("{}: no pairs", path.display())));
    }
    Ok(pairs)
}

/// A task given as a TSV file or a directory of them; a directory is the "all" setting:
/// its `.tsv` files (sorted by name) concatenated, one Spearman over everything.
pub fn read_task(path: &Path) -> Result<Vec<StsPair>> {
    if !path.is_dir() {
        return read_tsv(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(RuntimeError::io(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tsv"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RuntimeError::Data(format!(
            "{}: no .tsv files",
            path.display()
        )));
    }
    let mut all = Vec::new();
    for f in files {
        all.extend(read_tsv(&f)?);
    }
    Ok(all)
}

/// Ranks starting at 1, ties sharing their average rank.
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    ranks
}

pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma).powi(2);
        vb += (y - mb).powi(2);
    }
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va.sqrt() * vb.sqrt())
}

/// Spearman's ρ (Pearson of average ranks, as scipy's `spearmanr`).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        (dot / (na * nb)) as f32
    }
}

/// Spearman ×100 of the embedder's cosine similarities against the gold scores. Each
/// distinct sentence is embedded once.
pub fn evaluate(encoder: &dyn Embedder, pairs: &[StsPair], opts: &EmbedOptions) -> Result<f64> {
    let mut index = std::collections::HashMap::new();
    let mut unique: Vec<&str> = Vec::new();
    for p in pairs {
        for s in [&p.s1, &p.s2] {
            index.entry(s.as_str()).or_insert_with(|| {
                unique.push(s.as_str());
                unique.len() - 1
            });
        }
    }
    let vectors = encoder.embed(&unique, opts)?;
    let predicted: Vec<f64> = pairs
        .iter()
        .map(|p| {
            cosine(
                &vectors[index[p.s1.as_str()]],
                &vectors[index[p.s2.as_str()]],
            ) as f64
        })
        .collect();
    let gold: Vec<f64> = pairs.iter().map(|p| p.score).collect();
    Ok(spearman(&predicted, &gold) * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
    }

    #[test]
    fn spearman_known_values() {
        // Monotone → 1, reversed → −1, scipy example with ties.
        assert!((spearman(&[1., 2., 3.], &[10., 20., 30.]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1., 2., 3.], &[3., 2., 1.]) + 1.0).abs() < 1e-12);
        // scipy.stats.spearmanr([1,2,3,4,5],[5,6,7,8,7]) = 0.8207826816681233
        let r = spearman(&[1., 2., 3., 4., 5.], &[5., 6., 7., 8., 7.]);
        assert!((r - 0.8207826816681233).abs() < 1e-12, "{r}");
    }
}
