//! The miCSE objective (Klein & Nabi, ACL 2023) as pure, differentiable tensor functions:
//! InfoNCE between two dropout views plus the attention mutual-information term (AMI).
//! The exact definition is in DESIGN.md §4; it follows the authors' `cl_forward`.

use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;

/// InfoNCE over cosine similarities: `S[i, j] = cos(z1_i, z2_j) / temp`,
/// `mean_i(logsumexp_j S[i, j] − S[i, i])`, with norms floored at 1e-8 as torch's
/// `cosine_similarity`. Returns a scalar `[1]`.
pub fn info_nce(z1: Tensor<2>, z2: Tensor<2>, temperature: f64) -> Tensor<1> {
    let unit = |z: Tensor<2>| {
        let norm = z.clone().square().sum_dim(1).sqrt().clamp_min(1e-8);
        z / norm
    };
    let (u1, u2) = (unit(z1), unit(z2));
    let positives = (u1.clone() * u2.clone()).sum_dim(1).div_scalar(temperature); // [B, 1]
    let s = u1.matmul(u2.transpose()).div_scalar(temperature); // [B, B]
    // The row maximum is a constant shift (its gradient cancels), so detach it.
    let m = s.clone().max_dim(1).detach();
    let lse = (s - m.clone()).exp().sum_dim(1).log() + m;
    (lse - positives).mean()
}

/// Rearranges the selected layers' attention maps into AMI rows: row `(b·H + h)·2 + m`,
/// column `(j·T + t)·T + s`, value `att[2j + m][b, h, t, s]` — every other selected layer
/// of one head of one sentence (the paper's `(b v) (j m) h t s -> (b h m) v (j t s)`).
/// `layers` are `[B, H, T, T]` each, an even number of them. Returns `[B·H·2, (L/2)·T·T]`.
pub fn attention_rows(layers: &[Tensor<4>]) -> Tensor<2> {
    assert!(
        !layers.is_empty() && layers.len() % 2 == 0,
        "AMI needs an even number of layers, got {}",
        layers.len()
    );
    let [b, h, t, _] = layers[0].dims();
    let l = layers.len();
    let stacked = Tensor::stack::<5>(layers.to_vec(), 1); // [B, L, H, T, T]
    stacked
        .reshape([b, l / 2, 2, h, t * t]) // L index = 2j + m
        .permute([0, 3, 2, 1, 4]) // [B, H, m, j, T·T]
        .reshape([b * h * 2, (l / 2) * t * t])
}

/// Which entries AMI reads: rows used, `samples` column indices per used row, and the
/// constant scale. Made by [`plan_samples`], or by hand in tests.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePlan {
    /// Used rows, ascending.
    pub rows: Vec<usize>,
    /// Samples per used row (K).
    pub samples: usize,
    /// `rows.len() × samples` column indices, row-major; distinct within a row.
    pub columns: Vec<usize>,
    /// `(valid entries of used rows / (rows · columns))² + 1e-6`.
    pub scale: f64,
    /// No row reached the target count, so every row is used with the smallest count.
    pub fallback: bool,
}

/// Entries > 0 in both views, per row, as a host bitmap (`n_rows × n_cols`).
pub struct ValidMask {
    pub n_rows: usize,
    pub n_cols: usize,
    pub bits: Vec<bool>,
}

impl ValidMask {
    pub fn new(x: &Tensor<2>, y: &Tensor<2>) -> Self {
        let [n_rows, n_cols] = x.dims();
        let valid = x
            .clone()
            .greater_elem(0.0)
            .bool_and(y.clone().greater_elem(0.0));
        let bits: Vec<bool> = valid
            .into_data()
            .try_into_vec::<bool>()
            .expect("bool tensor reads back as bool");
        ValidMask {
            n_rows,
            n_cols,
            bits,
        }
    }

    pub fn count(&self, row: usize) -> usize {
        self.row(row).iter().filter(|&&v| v).count()
    }

    pub fn row(&self, row: usize) -> &[bool] {
        &self.bits[row * self.n_cols..(row + 1) * self.n_cols]
    }
}

/// Chooses rows and samples (DESIGN.md §4, steps 3–4): rows with at least `target` valid
/// entries, `target` distinct valid positions drawn uniformly in each. When no row has
/// `target`, every row is used with K = the smallest count; `None` when that is 0.
pub fn plan_samples(mask: &ValidMask, target: usize, rng: &mut impl Rng) -> Option<SamplePlan> {
    let counts: Vec<usize> = (0..mask.n_rows).map(|r| mask.count(r)).collect();
    let mut rows: Vec<usize> = (0..mask.n_rows).filter(|&r| counts[r] >= target).collect();
    let (samples, fallback) = if rows.is_empty() {
        rows = (0..mask.n_rows).collect();
        (counts.iter().copied().min().unwrap_or(0).min(target), true)
    } else {
        (target, false)
    };
    if samples == 0 {
        return None;
    }
    let mut columns = Vec::with_capacity(rows.len() * samples);
    let mut valid_cols = Vec::with_capacity(mask.n_cols);
    for &r in &rows {
        valid_cols.clear();
        valid_cols.extend(
            mask.row(r)
                .iter()
                .enumerate()
                .filter_map(|(c, &v)| v.then_some(c)),
        );
        // Partial Fisher–Yates: a uniform draw without replacement.
        for i in 0..samples {
            let j = rng.random_range(i..valid_cols.len());
            valid_cols.swap(i, j);
        }
        let mut chosen = valid_cols[..samples].to_vec();
        chosen.sort_unstable();
        columns.extend(chosen);
    }
    let valid_used: usize = rows.iter().map(|&r| counts[r]).sum();
    let density = valid_used as f64 / (rows.len() * mask.n_cols) as f64;
    Some(SamplePlan {
        scale: density * density + 1e-6,
        rows,
        samples,
        columns,
        fallback,
    })
}

/// AMI for planned samples (DESIGN.md §4, steps 4–6): per used row, Pearson correlation ρ of
/// the log attention of the two views at the sampled entries, `I = −½ log(1 − ρ²)`;
/// `AMI = −mean(I) · scale`. Returns a scalar `[1]`.
pub fn ami_from_plan(x: Tensor<2>, y: Tensor<2>, plan: &SamplePlan) -> Tensor<1> {
    let [_, n_cols] = x.dims();
    let device = x.device();
    let flat: Vec<i64> = plan
        .rows
        .iter()
        .enumerate()
        .flat_map(|(i, &r)| {
            plan.columns[i * plan.samples..(i + 1) * plan.samples]
                .iter()
                .map(move |&c| (r * n_cols + c) as i64)
        })
        .collect();
    let n = flat.len();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(flat, [n]), &device);
    let shape = [plan.rows.len(), plan.samples];
    let pick = |t: Tensor<2>| {
        let [r, c] = t.dims();
        t.reshape([r * c])
            .select(0, idx.clone())
            .reshape(shape)
            .log()
    };
    let (xs, ys) = (pick(x), pick(y));
    let xc = xs.clone() - xs.mean_dim(1);
    let yc = ys.clone() - ys.mean_dim(1);
    let norm = |t: Tensor<2>| t.square().sum_dim(1).sqrt().clamp_min(1e-6);
    let rho = (xc.clone() * yc.clone()).sum_dim(1) / (norm(xc) * norm(yc)); // [R, 1]
    let mi = (rho.square().neg() + 1.0).log().mul_scalar(-0.5);
    mi.mean().mul_scalar(-plan.scale)
}

/// Hyper-parameters of the objective.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveConfig {
    pub temperature: f64,
    /// Weight of InfoNCE (α, 1 in the paper).
    pub alpha: f64,
    /// Weight of AMI (λ); 0 gives SimCSE.
    pub lambda: f64,
    /// K, valid entries sampled per row (150 in the paper).
    pub target_samples: usize,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            temperature: 0.05,
            alpha: 1.0,
            lambda: 1e-3,
            target_samples: 150,
        }
    }
}

/// What happened to the AMI term in a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AmiStatus {
    /// Computed on rows with K samples each.
    Ok,
    /// No row had K valid entries: all rows with the smallest count.
    Fallback,
    /// Some row had no valid entry at all: AMI = 0 for this step.
    ZeroSamples,
    /// AMI came out NaN or infinite: left out of the loss for this step (the paper's code
    /// substitutes the constant 100 instead).
    NonFinite,
    /// λ = 0 (SimCSE): not computed.
    Off,
}

pub struct LossParts {
    /// `α·InfoNCE + λ·AMI`, the scalar to differentiate.
    pub loss: Tensor<1>,
    pub info_nce: Tensor<1>,
    /// `None` when the term was not part of the loss.
    pub ami: Option<Tensor<1>>,
    pub status: AmiStatus,
}

/// The miCSE loss from pooled views and the selected layers' attention maps of each view.
/// `plan` overrides sampling (tests); otherwise samples are drawn with `rng`.
pub fn micse_loss(
    z1: Tensor<2>,
    z2: Tensor<2>,
    att1: &[Tensor<4>],
    att2: &[Tensor<4>],
    config: &ObjectiveConfig,
    plan: Option<&SamplePlan>,
    rng: &mut impl Rng,
) -> LossParts {
    let info_nce = info_nce(z1, z2, config.temperature);
    let base = info_nce.clone().mul_scalar(config.alpha);
    if config.lambda == 0.0 || att1.is_empty() {
        return LossParts {
            loss: base,
            info_nce,
            ami: None,
            status: AmiStatus::Off,
        };
    }
    let x = attention_rows(att1);
    let y = attention_rows(att2);
    let drawn;
    let plan = match plan {
        Some(p) => p,
        None => match plan_samples(&ValidMask::new(&x, &y), config.target_samples, rng) {
            Some(p) => {
                drawn = p;
                &drawn
            }
            None => {
                return LossParts {
                    loss: base,
                    info_nce,
                    ami: None,
                    status: AmiStatus::ZeroSamples,
                };
            }
        },
    };
    let ami = ami_from_plan(x, y, plan);
    let value: f32 = ami.clone().into_scalar();
    if !value.is_finite() {
        return LossParts {
            loss: base,
            info_nce,
            ami: None,
            status: AmiStatus::NonFinite,
        };
    }
    LossParts {
        loss: base + ami.clone().mul_scalar(config.lambda),
        info_nce,
        ami: Some(ami),
        status: if plan.fallback {
            AmiStatus::Fallback
        } else {
            AmiStatus::Ok
        },
    }
}
