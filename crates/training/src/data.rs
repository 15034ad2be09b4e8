//! Sentence shards: reading, cleaning, low-shot sampling, batching.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use fedmicse_runtime::RuntimeError;

use crate::error::{Result, TrainError};

/// Reads one sentence per line (UTF-8). Lines are trimmed; empty lines and exact duplicates
/// are dropped (the first occurrence is kept, order preserved).
pub fn read_sentences(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(RuntimeError::io(path))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        TrainError::Data(format!(
            "{}: invalid UTF-8 at byte {at} (line {line})",
            path.display()
        ))
    })?;
    Ok(clean(text.lines()))
}

/// Trims, drops empty lines and duplicates, keeps first-occurrence order.
pub fn clean<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    lines
        .into_iter()
        .map(str::trim)
        .filter(|l| !l.is_empty() && seen.insert(l.to_string()))
        .map(str::to_string)
        .collect()
}

/// A reproducible low-shot split: `n` sentences drawn without replacement with `seed`
/// (all of them, in file order, when `n` is at least the file's size).
pub fn sample(sentences: &[String], n: usize, seed: u64) -> Vec<String> {
    if n >= sentences.len() {
        return sentences.to_vec();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..sentences.len()).collect();
    idx.partial_shuffle(&mut rng, n);
    let mut chosen = idx[..n].to_vec();
    chosen.sort_unstable(); // file order: the split is a set, not a sequence
    chosen.into_iter().map(|i| sentences[i].clone()).collect()
}

/// Batches of one epoch: shuffled with the epoch's seed, the last incomplete batch dropped
/// (as SimCSE's trainer does) unless the shard is smaller than one batch, in which case the
/// whole shard is one batch.
pub fn epoch_batches(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    if n <= batch_size {
        return vec![idx];
    }
    idx.chunks_exact(batch_size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// Batches per epoch for a shard of `n` sentences.
pub fn batches_per_epoch(n: usize, batch_size: usize) -> usize {
    if n <= batch_size { 1 } else { n / batch_size }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_drops_empty_and_duplicates() {
        let got = clean(["a", "", "  b ", "a", "c", "b"]);
        assert_eq!(got, vec!["a", "b", "c"]);
    }

    #[test]
    fn sampling_is_reproducible_and_distinct() {
        let s: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let a = sample(&s, 10, 48);
        assert_eq!(a, sample(&s, 10, 48));
        assert_ne!(a, sample(&s, 10, 49));
        assert_eq!(a.len(), 10);
        let distinct: std::collections::HashSet<&String> = a.iter().collect();
        assert_eq!(distinct.len(), 10, "drawn without replacement: {a:?}");
        // Drawn from the sentences, kept in file order.
        let pos: Vec<usize> = a
            .iter()
            .map(|x| s.iter().position(|y| y == x).expect("from the source"))
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "file order: {pos:?}");
        assert_eq!(sample(&s, 1000, 1), s);
    }

    #[test]
    fn batches_cover_the_shard() {
        let b = epoch_batches(10, 4, 1, 0);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|x| x.len() == 4));
        // No index twice, all in range (the 2 left over are dropped).
        let mut seen: Vec<usize> = b.concat();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 8);
        assert!(seen.iter().all(|&i| i < 10));
        // Divisible: one epoch is a permutation of the shard.
        let mut all: Vec<usize> = epoch_batches(12, 4, 1, 0).concat();
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
        // Smaller than a batch: the whole shard is one batch.
        let small = epoch_batches(3, 64, 1, 0);
        assert_eq!(small.len(), 1);
        let mut one = small[0].clone();
        one.sort_unstable();
        assert_eq!(one, vec![0, 1, 2]);
        assert_eq!(epoch_batches(100, 10, 1, 0), epoch_batches(100, 10, 1, 0));
        assert_ne!(epoch_batches(100, 10, 1, 0), epoch_batches(100, 10, 1, 1));
    }
}
