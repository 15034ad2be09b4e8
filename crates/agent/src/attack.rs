//! Hostile agents for attack simulations (`fedmicse simulate --byzantine K --attack NAME`).
//!
//! A hostile agent joins and trains exactly like an honest one; only what it sends differs.
//! Right before submitting, [`before_submit`] transforms the honest delta and sample count
//! (or, for [`Attack::Stall`], takes the upload over). The transforms are deterministic, so
//! a resent update is identical to the first one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use fedmicse_tensors::TensorMap;
use fedmicse_wire::client::Target;
use fedmicse_wire::pb::{self, LocalMetrics, UpdateChunk, UpdateHeader, update_chunk};
use fedmicse_wire::tensors::{digest_as, total_bytes_as};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::Status;

/// The sample count a [`Attack::SampleInflation`] agent claims, at Join and in its update.
pub const INFLATED_SAMPLES: u64 = 10_000_000;

/// How a hostile agent corrupts its update. Every attack trains honestly first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Sends the honest delta multiplied by 1000 (a model-replacement / boosting attack).
    Scale,
    /// Sends the honest delta multiplied by −10 (pushes the model against the honest
    /// direction, harder than the honest agents pull it).
    SignFlip,
    /// Sends the honest delta with the first value of every tensor set to NaN.
    Nan,
    /// Claims 10,000,000 samples, both as its shard size at Join and in the update, and
    /// sends the sign-flipped delta ×(−10), so that the aggregation weight is what matters.
    SampleInflation,
    /// Replaces the delta by Gaussian noise (ChaCha8 seeded by the round) whose L2 norm is
    /// 100 times the honest delta's.
    Noise,
    /// Sends the update header and then nothing, holding the upload open until the
    /// coordinator closes it (its stream idle timeout) or the process stops.
    Stall,
}

impl Attack {
    pub const ALL: [Attack; 6] = [
        Attack::Scale,
        Attack::SignFlip,
        Attack::Nan,
        Attack::SampleInflation,
        Attack::Noise,
        Attack::Stall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::Scale => "scale",
            Attack::SignFlip => "sign-flip",
            Attack::Nan => "nan",
            Attack::SampleInflation => "sample-inflation",
            Attack::Noise => "noise",
            Attack::Stall => "stall",
        }
    }

    /// The shard size declared at Join: the truth, except for sample inflation.
    pub fn join_shard_size(self, honest: u64) -> u64 {
        match self {
            Attack::SampleInflation => INFLATED_SAMPLES,
            _ => honest,
        }
    }

    /// The corrupted `(delta, num_samples)` for a hostile update. `seed` drives the noise.
    /// [`Attack::Stall`] returns the honest values (its harm is in how it submits).
    pub fn transform(self, delta: &TensorMap, num_samples: u64, seed: u64) -> (TensorMap, u64) {
        match self {
            Attack::Scale => (scaled(delta, 1000.0), num_samples),
            Attack::SignFlip => (scaled(delta, -10.0), num_samples),
            Attack::Nan => {
                let mut d = delta.clone();
                for t in d.values_mut() {
                    if let Some(x) = t.data.first_mut() {
                        *x = f32::NAN;
                    }
                }
                (d, num_samples)
            }
            Attack::SampleInflation => (scaled(delta, -10.0), INFLATED_SAMPLES),
            Attack::Noise => {
                let target = 100.0 * l2_norm(delta);
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut d = delta.clone();
                for t in d.values_mut() {
                    for x in t.data.iter_mut() {
                        *x = rng.sample::<f32, _>(rand_distr::StandardNormal);
                    }
                }
                let n = l2_norm(&d);
                let k = if n > 0.0 { (target / n) as f32 } else { 0.0 };
                for t in d.values_mut() {
                    t.data.iter_mut().for_each(|x| *x *= k);
                }
                (d, num_samples)
            }
            Attack::Stall => (delta.clone(), num_samples),
        }
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Attack {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Attack::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
                format!("unknown attack {s:?}: one of {}", names.join(", "))
            })
    }
}

/// The L2 norm over every value of a tensor map.
pub fn l2_norm(t: &TensorMap) -> f64 {
    t.values()
        .flat_map(|t| t.data.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

fn scaled(delta: &TensorMap, k: f32) -> TensorMap {
    let mut d = delta.clone();
    for t in d.values_mut() {
        t.data.iter_mut().for_each(|x| *x *= k);
    }
    d
}

/// The agent's hook right before an update is submitted. Honest agents (`attack` `None`)
/// get `(num_samples, delta)` back unchanged. Transforming attacks return the corrupted
/// pair, which the agent then submits as usual. [`Attack::Stall`] submits itself: it sends
/// the header over its own connection and holds the stream open, returning the status the
/// coordinator closes it with.
#[allow(clippy::too_many_arguments)]
pub async fn before_submit(
    attack: Option<Attack>,
    target: &Target,
    round: u64,
    num_samples: u64,
    metrics: LocalMetrics,
    delta: &Arc<TensorMap>,
    dtype: fedmicse_wire::ElementType,
) -> Result<(u64, Arc<TensorMap>), Status> {
    let Some(attack) = attack else {
        return Ok((num_samples, delta.clone()));
    };
    if attack == Attack::Stall {
        let header = UpdateHeader {
            round,
            num_samples,
            tensor_count: delta.len() as u32,
            total_bytes: total_bytes_as(delta, dtype),
            digest: digest_as(delta, dtype),
            metrics: Some(metrics),
        };
        tracing::warn!(round, attack = %attack, "hostile: sending the update header and stalling");
        return Err(stall(target, header).await);
    }
    let seed = 0x5eed_a77a_c4u64 ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (d, n) = attack.transform(delta, num_samples, seed);
    tracing::warn!(round, attack = %attack, honest_norm = l2_norm(delta), sent_norm = l2_norm(&d), num_samples = n, "hostile: corrupted the update");
    Ok((n, Arc::new(d)))
}

/// Opens an upload over a fresh connection, sends `header` and nothing more, and waits
/// for the coordinator to end the call. Returns the status it ended with.
async fn stall(target: &Target, header: UpdateHeader) -> Status {
    use tonic::transport::Endpoint;
    let mut endpoint = match Endpoint::from_shared(target.url.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(10)),
        Err(e) => return Status::invalid_argument(e.to_string()),
    };
    if let Some(tls) = &target.tls {
        let cfg = match tls.client_config(&target.domain) {
            Ok(c) => c,
            Err(e) => return Status::unavailable(e.to_string()),
        };
        endpoint = match endpoint.tls_config(cfg) {
            Ok(e) => e,
            Err(e) => return Status::unavailable(e.to_string()),
        };
    }
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Status::unavailable(e.to_string()),
    };
    let id: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = target
        .plaintext_client_id
        .as_ref()
        .and_then(|s| s.parse().ok());
    let mut client = pb::federation_client::FederationClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            if let Some(v) = &id {
                req.metadata_mut().insert("x-fedmicse-client-id", v.clone());
            }
            Ok(req)
        },
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<UpdateChunk>(1);
    let head = UpdateChunk {
        part: Some(update_chunk::Part::Header(header)),
    };
    if tx.send(head).await.is_err() {
        return Status::internal("upload channel closed");
    }
    let started = std::time::Instant::now();
    // `tx` stays alive across the call: the stream never ends from our side.
    let result = client
        .submit_update(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    drop(tx);
    let held = started.elapsed().as_secs_f64();
    match result {
        Ok(r) => {
            let r = r.into_inner();
            tracing::warn!(held_s = held, reply = %r.message, "hostile: stalled upload answered");
            Status::aborted(format!(
                "stalled upload answered after {held:.0} s: {}",
                r.message
            ))
        }
        Err(s) => {
            tracing::warn!(held_s = held, code = ?s.code(), reason = %s.message(), "hostile: stalled upload closed by the coordinator");
            // Not a permanent error for the agent loop: it retries while the round is open.
            Status::aborted(format!(
                "stalled upload closed after {held:.0} s: {}",
                s.message()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmicse_tensors::HostTensor;

    fn delta() -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "a".into(),
            HostTensor::new(vec![2, 3], vec![0.1, -0.2, 0.3, 0.0, 0.5, -0.6]),
        );
        m.insert(
            "b".into(),
            HostTensor::new(
                vec![400],
                (0..400).map(|i| (i as f32 - 200.0) * 1e-3).collect(),
            ),
        );
        m
    }

    fn each(a: &TensorMap, b: &TensorMap, f: impl Fn(f32, f32)) {
        assert_eq!(a.len(), b.len());
        for (n, t) in a {
            assert_eq!(t.shape, b[n].shape);
            t.data.iter().zip(&b[n].data).for_each(|(&x, &y)| f(x, y));
        }
    }

    #[test]
    fn names_round_trip() {
        for a in Attack::ALL {
            assert_eq!(a.to_string().parse::<Attack>().unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{a}\""));
        }
        assert_eq!("sign-flip".parse::<Attack>(), Ok(Attack::SignFlip));
        assert!(
            "signflip"
                .parse::<Attack>()
                .unwrap_err()
                .contains("sample-inflation")
        );
    }

    #[test]
    fn scale_multiplies_by_1000() {
        let d = delta();
        let (s, n) = Attack::Scale.transform(&d, 7, 1);
        assert_eq!(n, 7);
        each(&d, &s, |x, y| {
            assert!((y - 1000.0 * x).abs() <= 1e-4 * (1.0 + y.abs()))
        });
    }

    #[test]
    fn sign_flip_negates_times_ten() {
        let d = delta();
        let (s, n) = Attack::SignFlip.transform(&d, 7, 1);
        assert_eq!(n, 7);
        each(&d, &s, |x, y| assert!((y + 10.0 * x).abs() <= 1e-6));
    }

    #[test]
    fn nan_poisons_every_tensor() {
        let d = delta();
        let (s, n) = Attack::Nan.transform(&d, 7, 1);
        assert_eq!(n, 7);
        for t in s.values() {
            assert!(t.data.iter().any(|x| x.is_nan()));
            assert!(t.data[1..].iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn sample_inflation_claims_ten_million_and_flips() {
        let d = delta();
        let (s, n) = Attack::SampleInflation.transform(&d, 7, 1);
        assert_eq!(n, INFLATED_SAMPLES);
        each(&d, &s, |x, y| assert!((y + 10.0 * x).abs() <= 1e-6));
        assert_eq!(Attack::SampleInflation.join_shard_size(7), 10_000_000);
        assert_eq!(Attack::Scale.join_shard_size(7), 7);
    }

    #[test]
    fn noise_has_a_hundred_times_the_norm_and_is_seeded() {
        let d = delta();
        let (s, n) = Attack::Noise.transform(&d, 7, 42);
        assert_eq!(n, 7);
        let ratio = l2_norm(&s) / l2_norm(&d);
        assert!((ratio - 100.0).abs() < 10.0, "{ratio}");
        // Noise, not a rescaled delta: nearly uncorrelated with it.
        let dot: f64 = d
            .iter()
            .flat_map(|(k, t)| t.data.iter().zip(&s[k].data))
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum();
        assert!(dot.abs() / (l2_norm(&s) * l2_norm(&d)) < 0.5);
        assert_eq!(Attack::Noise.transform(&d, 7, 42).0, s);
        assert_ne!(Attack::Noise.transform(&d, 7, 43).0, s);
    }

    #[test]
    fn stall_leaves_the_update_alone() {
        let d = delta();
        assert_eq!(Attack::Stall.transform(&d, 7, 1), (d, 7));
    }

    #[tokio::test]
    async fn honest_agents_pass_through() {
        let d = Arc::new(delta());
        let target = Target {
            url: "http://127.0.0.1:1".into(),
            tls: None,
            domain: "localhost".into(),
            plaintext_client_id: None,
        };
        let (n, out) = before_submit(
            None,
            &target,
            1,
            7,
            LocalMetrics::default(),
            &d,
            fedmicse_wire::ElementType::F32,
        )
        .await
        .unwrap();
        assert_eq!(n, 7);
        assert!(Arc::ptr_eq(&out, &d));
    }
}
