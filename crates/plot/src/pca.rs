//! Principal component analysis for 2-D pictures of embeddings.

/// Projects rows on the top two principal components (power iteration with deflation on the
/// covariance). Returns the 2-D points and the share of variance they explain.
///
/// Needs at least one row; all rows have the same length.
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
    let mut cov = covariance(&centered, d);
    let total: f64 = (0..d).map(|i| cov[i][i]).sum();
    let mut components = Vec::new();
    let mut explained = 0.0;
    for k in 0..2 {
        let (lambda, v) = top_eigenvector(&cov, k);
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

/// Σ rᵀr over centred rows (unnormalised: only ratios are used).
fn covariance(centered: &[Vec<f64>], d: usize) -> Vec<Vec<f64>> {
    let mut cov = vec![vec![0f64; d]; d];
    for r in centered {
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
    cov
}

/// The largest eigenvalue and its unit eigenvector by 300 power iterations from a fixed
/// start (`k` varies the start between components).
fn top_eigenvector(cov: &[Vec<f64>], k: usize) -> (f64, Vec<f64>) {
    let d = cov.len();
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
    (lambda, v)
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

    #[test]
    fn second_component_is_orthogonal_and_smaller() {
        // A flat ellipse in 3-D: spread 10 along x, 2 along y, nothing along z.
        let rows: Vec<Vec<f32>> = (0..36)
            .map(|i| {
                let t = i as f32 * std::f32::consts::TAU / 36.0;
                vec![10.0 * t.cos(), 2.0 * t.sin(), 0.0]
            })
            .collect();
        let (pts, explained) = pca_2d(&rows);
        assert!((explained - 1.0).abs() < 1e-6, "{explained}");
        let spread = |f: fn(&(f64, f64)) -> f64| {
            let v: Vec<f64> = pts.iter().map(f).collect();
            v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min)
        };
        assert!((spread(|p| p.0) - 20.0).abs() < 1e-3, "{}", spread(|p| p.0));
        assert!((spread(|p| p.1) - 4.0).abs() < 0.1, "{}", spread(|p| p.1));
        // Centred: the projections average to zero.
        let mean_x = pts.iter().map(|p| p.0).sum::<f64>() / pts.len() as f64;
        assert!(mean_x.abs() < 1e-6);
        // Identical rows have no variance to explain.
        let (pts, explained) = pca_2d(&[vec![1.0, 2.0], vec![1.0, 2.0]]);
        assert_eq!(explained, 0.0);
        assert!(pts.iter().all(|p| p.0 == 0.0 && p.1 == 0.0));
    }
}
