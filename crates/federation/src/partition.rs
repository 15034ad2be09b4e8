//! Splitting a sentence set across simulated agents: IID, or non-IID by a Dirichlet
//! distribution over clusters (each cluster's sentences spread over agents with
//! proportions drawn from Dir(α); small α gives each agent few topics).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// How to split: `iid`, or `dirichlet:ALPHA` (label skew; smaller α, more skew). Written
/// the same way in configuration files and flags.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Partition {
    Iid,
    Dirichlet(f64),
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "iid" {
            return Ok(Partition::Iid);
        }
        if let Some(a) = s.strip_prefix("dirichlet:") {
            let alpha: f64 = a
                .parse()
                .map_err(|_| format!("{s:?}: {a:?} is not a number"))?;
            if !(alpha > 0.0 && alpha.is_finite()) {
                return Err(format!("{s:?}: alpha must be positive"));
            }
            return Ok(Partition::Dirichlet(alpha));
        }
        Err(format!("{s:?}: expected iid or dirichlet:ALPHA"))
    }
}

impl TryFrom<String> for Partition {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Partition> for String {
    fn from(p: Partition) -> String {
        p.to_string()
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partition::Iid => write!(f, "iid"),
            Partition::Dirichlet(a) => write!(f, "dirichlet:{a}"),
        }
    }
}

/// IID: a seeded shuffle dealt round-robin, so shard sizes differ by at most one.
pub fn iid(n: usize, clients: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut shards = vec![Vec::new(); clients];
    for (i, x) in idx.into_iter().enumerate() {
        shards[i % clients].push(x);
    }
    shards
}

/// Non-IID: items grouped by `labels` (cluster ids); each cluster split across clients in
/// proportions ~ Dir(α). Every client is guaranteed at least `min_per_client` items (taken
/// from the largest shards) so nobody trains on nothing.
pub fn dirichlet(
    labels: &[usize],
    clients: usize,
    alpha: f64,
    seed: u64,
    min_per_client: usize,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let k = labels.iter().copied().max().map_or(0, |m| m + 1);
    let gamma = Gamma::new(alpha, 1.0).expect("alpha > 0");
    let mut shards = vec![Vec::new(); clients];
    for c in 0..k {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        members.shuffle(&mut rng);
        let mut p: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = p.iter().sum();
        if total > 0.0 {
            p.iter_mut().for_each(|x| *x /= total);
        } else {
            p = vec![1.0 / clients as f64; clients];
        }
        // Cumulative cut points.
        let mut start = 0;
        let mut acc = 0.0;
        for (j, pj) in p.iter().enumerate() {
            acc += pj;
            let end = if j + 1 == clients {
                members.len()
            } else {
                ((acc * members.len() as f64).round() as usize).min(members.len())
            };
            shards[j].extend_from_slice(&members[start..end.max(start)]);
            start = end.max(start);
        }
    }
    // Top up small shards from the largest ones.
    loop {
        let (small, _) = shards
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.len())
            .map(|(i, s)| (i, s.len()))
            .unwrap_or((0, 0));
        if shards[small].len() >= min_per_client {
            break;
        }
        let large = (0..clients).max_by_key(|&i| shards[i].len()).unwrap_or(0);
        if shards[large].len() <= min_per_client {
            break;
        }
        let x = shards[large].pop().expect("non-empty");
        shards[small].push(x);
    }
    shards.iter_mut().for_each(|s| s.sort_unstable());
    shards
}

/// K-means (k-means++ seeding, Lloyd iterations) on row vectors; returns a cluster per row.
pub fn kmeans(points: &[Vec<f32>], k: usize, seed: u64, iterations: usize) -> Vec<usize> {
    let n = points.len();
    if n == 0 || k == 0 {
        return vec![0; n];
    }
    let k = k.min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dist = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
    };
    let mut centers: Vec<Vec<f32>> = vec![points[rand::Rng::random_range(&mut rng, 0..n)].clone()];
    while centers.len() < k {
        let d: Vec<f64> = points
            .iter()
            .map(|p| {
                centers
                    .iter()
                    .map(|c| dist(p, c))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let total: f64 = d.iter().sum();
        let mut r = rand::Rng::random_range(&mut rng, 0.0..total.max(f64::MIN_POSITIVE));
        let mut pick = n - 1;
        for (i, di) in d.iter().enumerate() {
            if r < *di {
                pick = i;
                break;
            }
            r -= di;
        }
        centers.push(points[pick].clone());
    }
    let mut labels = vec![0; n];
    for _ in 0..iterations {
        let mut changed = false;
        for (i, p) in points.iter().enumerate() {
            let best = (0..k)
                .min_by(|&a, &b| dist(p, &centers[a]).total_cmp(&dist(p, &centers[b])))
                .unwrap_or(0);
            if labels[i] != best {
                labels[i] = best;
                changed = true;
            }
        }
        let dim = points[0].len();
        let mut sums = vec![vec![0f64; dim]; k];
        let mut counts = vec![0usize; k];
        for (p, &l) in points.iter().zip(&labels) {
            counts[l] += 1;
            for (s, &x) in sums[l].iter_mut().zip(p) {
                *s += x as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                centers[c] = sums[c]
                    .iter()
                    .map(|s| (s / counts[c] as f64) as f32)
                    .collect();
            }
        }
        if !changed {
            break;
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iid_covers_everything_evenly() {
        let s = iid(10, 3, 1);
        let mut all: Vec<usize> = s.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(s.iter().all(|x| x.len() == 3 || x.len() == 4));
        assert_eq!(s.len(), 3);
        // Reproducible for a seed, different for another (and not the identity deal).
        let big = iid(100, 4, 1);
        assert_eq!(big, iid(100, 4, 1));
        assert_ne!(big, iid(100, 4, 2));
        let unshuffled: Vec<Vec<usize>> = (0..4).map(|c| (c..100).step_by(4).collect()).collect();
        assert_ne!(big, unshuffled, "the items are shuffled before dealing");
    }

    #[test]
    fn dirichlet_is_skewed_for_small_alpha_and_complete() {
        let labels: Vec<usize> = (0..400).map(|i| i % 4).collect();
        let s = dirichlet(&labels, 4, 0.1, 7, 5);
        let mut all: Vec<usize> = s.concat();
        all.sort();
        assert_eq!(all, (0..400).collect::<Vec<_>>());
        assert!(s.iter().all(|x| x.len() >= 5));
        // With α = 0.1 most clients are dominated by one cluster.
        let dominated = s
            .iter()
            .filter(|shard| {
                let mut c = [0usize; 4];
                shard.iter().for_each(|&i| c[labels[i]] += 1);
                *c.iter().max().unwrap() as f64 > 0.6 * shard.len() as f64
            })
            .count();
        assert!(dominated >= 3, "{dominated}");
        // Reproducible for a seed, different for another.
        assert_eq!(s, dirichlet(&labels, 4, 0.1, 7, 5));
        assert_ne!(s, dirichlet(&labels, 4, 0.1, 8, 5));
        assert!("dirichlet:0.5".parse::<Partition>().is_ok());
        assert!("dirichlet:-1".parse::<Partition>().is_err());
    }

    #[test]
    fn kmeans_separates_blobs() {
        let pts: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                if i < 20 {
                    vec![0.0 + i as f32 * 0.01, 0.0]
                } else {
                    vec![10.0, 10.0 + i as f32 * 0.01]
                }
            })
            .collect();
        let l = kmeans(&pts, 2, 3, 20);
        assert!(l[..20].iter().all(|&x| x == l[0]));
        assert!(l[20..].iter().all(|&x| x == l[20]));
        assert_ne!(l[0], l[20]);
    }
}
