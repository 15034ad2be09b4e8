//! Spreading a sentence file over the simulated agents: IID, or non-IID by topic (k-means
//! clusters of the starting model's sentence embeddings, each cluster spread with Dirichlet
//! proportions).

use std::path::Path;

use anyhow::{Result, bail};
use fedmicse_encoder::{EmbedOptions, Encoder, Pooling};
use fedmicse_federation::partition::{self, Partition};
use fedmicse_runtime::DeviceSpec;

/// The fewest sentences an agent can train on (one contrastive batch needs two).
pub const MIN_SHARD: usize = 2;

/// Sentence indices per client. `embed` is asked for one vector per sentence only for a
/// Dirichlet partition: k = n / 25 clusters (2 to 10), every client at least [`MIN_SHARD`].
pub fn shard_indices(
    n: usize,
    clients: usize,
    how: Partition,
    seed: u64,
    embed: impl FnOnce() -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<usize>>> {
    Ok(match how {
        Partition::Iid => partition::iid(n, clients, seed),
        Partition::Dirichlet(alpha) => {
            let vectors = embed()?;
            let k = (n / 25).clamp(2, 10);
            let labels = partition::kmeans(&vectors, k, seed, 50);
            partition::dirichlet(&labels, clients, alpha, seed, MIN_SHARD)
        }
    })
}

/// Splits `sentences` over `clients`, embedding them with the model at `model` (mean
/// pooling, 32 tokens) when the partition is by topic.
pub fn make_shards(
    sentences: &[String],
    clients: usize,
    how: Partition,
    seed: u64,
    model: &Path,
    device: DeviceSpec,
) -> Result<Vec<Vec<String>>> {
    let embed = || {
        let enc = Encoder::load(model, &fedmicse_encoder::device::device(device)?)?;
        let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
        let opts = EmbedOptions {
            pooling: Pooling::Mean,
            normalize: true,
            max_len: Some(32),
            batch_size: 64,
        };
        Ok(enc.embed(&refs, &opts)?)
    };
    let idx = shard_indices(sentences.len(), clients, how, seed, embed)?;
    let shards: Vec<Vec<String>> = idx
        .into_iter()
        .map(|s| s.into_iter().map(|i| sentences[i].clone()).collect())
        .collect();
    check_shards(&shards)?;
    Ok(shards)
}

/// Refuses shards too small to train on, naming the first such agent (1-based).
pub fn check_shards(shards: &[Vec<String>]) -> Result<()> {
    if let Some((i, s)) = shards.iter().enumerate().find(|(_, s)| s.len() < MIN_SHARD) {
        bail!(
            "agent {} would get {} sentence(s): use more sentences or fewer clients",
            i + 1,
            s.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index exactly once over all shards.
    fn assert_partition(shards: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn iid_never_embeds_and_splits_evenly() {
        let shards = shard_indices(10, 3, Partition::Iid, 48, || {
            panic!("IID does not need embeddings")
        })
        .unwrap();
        assert_eq!(shards.len(), 3);
        assert_partition(&shards, 10);
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&s| (3..=4).contains(&s)), "{sizes:?}");
    }

    /// Sentence i on one side (even) or the other (odd), slightly spread.
    fn two_topics(n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| vec![if i % 2 == 0 { 1.0 } else { -1.0 }, (i % 7) as f32 * 0.01])
            .collect()
    }

    #[test]
    fn dirichlet_follows_the_topics() {
        // Two well-separated topics of 50 sentences each; with a small α most clients
        // hold mostly one topic, yet all sentences are placed and nobody gets fewer than 2.
        let n = 100;
        let shards =
            shard_indices(n, 4, Partition::Dirichlet(0.1), 7, || Ok(two_topics(n))).unwrap();
        assert_eq!(shards.len(), 4);
        assert_partition(&shards, n);
        assert!(shards.iter().all(|s| s.len() >= MIN_SHARD));
        let purity = |s: &Vec<usize>| {
            let even = s.iter().filter(|&&i| i % 2 == 0).count();
            even.max(s.len() - even) as f64 / s.len() as f64
        };
        let mean_purity = shards.iter().map(purity).sum::<f64>() / 4.0;
        assert!(
            mean_purity > 0.75,
            "topics are not concentrated: {mean_purity}"
        );
        // The same seed gives the same shards.
        let again = shard_indices(n, 4, Partition::Dirichlet(0.1), 7, || Ok(two_topics(n)));
        assert_eq!(again.unwrap(), shards);
    }

    #[test]
    fn embedding_errors_surface() {
        let e = shard_indices(10, 2, Partition::Dirichlet(1.0), 1, || {
            bail!("no model here")
        })
        .unwrap_err();
        assert!(e.to_string().contains("no model here"));
    }

    #[test]
    fn tiny_shards_are_refused() {
        let s = |n: usize| vec!["x".to_string(); n];
        assert!(check_shards(&[s(2), s(5)]).is_ok());
        let e = check_shards(&[s(3), s(1), s(0)]).unwrap_err().to_string();
        assert_eq!(
            e,
            "agent 2 would get 1 sentence(s): use more sentences or fewer clients"
        );
    }
}
