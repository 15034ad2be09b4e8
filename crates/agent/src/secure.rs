//! The agent's side of a secure round: quantize the update with the round's clips, then
//! the four steps of the SecAgg protocol with the coordinator. The coordinator only ever
//! receives the update masked (uniformly random on its own); it learns the sum of the
//! round's updates and nothing else.

use fedmicse_secagg::{Quantizer, agent, ring};
use fedmicse_tensors::TensorMap;
use fedmicse_wire::client::Connection;
use fedmicse_wire::pb;
use fedmicse_wire::secure as convert;
use rand::{Rng, SeedableRng};

use crate::RoundError;
use crate::feedback::residual_of;

/// Statistics are quantized over [0, STAT_RANGE] clips (the coordinator reads them so).
const STAT_RANGE: f64 = 8.0;

/// What a secure submission sent.
pub(crate) struct Sent {
    pub bytes: u64,
    /// What clipping and rounding dropped, for the next round.
    pub residual: TensorMap,
    /// Agents the coordinator's sum holds.
    pub summed: usize,
}

/// The update as values of the round's ring: every tensor clipped to its clip and
/// rounded stochastically to `value_bits`, in name order; then one statistic per tensor
/// (its largest |value| in clips, over [0, STAT_RANGE], stochastically rounded) from which
/// the coordinator sets the next round's clips. Also returns what clipping and rounding
/// dropped.
pub(crate) fn encode(
    want: &TensorMap,
    p: &pb::SecureRound,
    seed: u64,
) -> Result<(Vec<u32>, TensorMap), String> {
    if want.len() != p.clips.len() {
        return Err(format!(
            "{} clips for {} tensors",
            p.clips.len(),
            want.len()
        ));
    }
    let values: usize = want.values().map(|t| t.data.len()).sum();
    if (values + want.len()) as u64 != p.len {
        return Err(format!(
            "the round expects {} values; the update has {values}",
            p.len
        ));
    }
    if want.values().any(|t| t.data.iter().any(|v| !v.is_finite())) {
        return Err("the local update is not finite (NaN or infinity); not sent".into());
    }
    let k = p.ring_bits;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5ec_a66);
    let mut out = Vec::with_capacity(p.len as usize);
    let mut residual = TensorMap::new();
    let mut stats = Vec::with_capacity(want.len());
    let levels = ((1u64 << (p.value_bits - 1)) - 1) as f64;
    for ((name, t), &clip) in want.iter().zip(&p.clips) {
        let q = Quantizer::new(clip, p.value_bits).map_err(|e| format!("{name}: {e}"))?;
        let codes = q.encode(&t.data, k, &mut rng);
        let sent = q.decode_sum(&codes, k);
        residual.extend(residual_of(name, t, &sent));
        out.extend(codes);
        let largest = t.data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let scaled = (largest / clip as f64).min(STAT_RANGE) / STAT_RANGE * levels;
        let stat = scaled.floor() + (rng.random::<f64>() < scaled.fract()) as u8 as f64;
        stats.push(ring::encode_signed(stat as i64, k));
    }
    out.extend(stats);
    Ok((out, residual))
}

fn protocol(e: fedmicse_secagg::Error) -> RoundError {
    RoundError::Temporary(format!("secure aggregation: {e}"))
}

/// Runs the round's protocol for `want`; the coordinator answers each step once every
/// agent's message for it is in (or its time ran out).
pub(crate) async fn submit(
    conn: &mut Connection,
    round: u64,
    p: &pb::SecureRound,
    want: &TensorMap,
    seed: u64,
) -> Result<Sent, RoundError> {
    let config = convert::round_config(round, p).map_err(RoundError::UpdateRefused)?;
    let (values, residual) = encode(want, p, seed).map_err(RoundError::UpdateRefused)?;
    // Key material: from the OS, not from the round seed.
    let mut rng = rand_chacha::ChaCha20Rng::from_rng(&mut rand::rng());
    let (advertised, keys) = agent::advertise(config, p.agent_index, &mut rng).map_err(protocol)?;
    let mut bytes = 68;
    let dir = conn
        .advertise_keys(convert::keys_to_pb(round, &keys))
        .await?;
    let directory = dir
        .keys
        .iter()
        .map(convert::keys_from_pb)
        .collect::<Result<Vec<_>, _>>()
        .map_err(RoundError::Temporary)?;
    let (shared, shares) = advertised
        .share_keys(&directory, &mut rng)
        .map_err(protocol)?;
    bytes += shares
        .shares
        .iter()
        .map(|s| s.ciphertext.len() as u64 + 8)
        .sum::<u64>();
    let inbox = conn
        .share_keys(convert::shares_to_pb(round, p.agent_index, &shares.shares))
        .await?;
    let inbox = convert::shares_from_pb(&inbox).shares;
    let (masked, input) = shared.mask_input(&inbox, &values).map_err(protocol)?;
    bytes += input.packed.len() as u64;
    let request = conn.submit_masked(round, &input).await?;
    let request = convert::unmask_request_from_pb(&request);
    let summed = request.survivors.len();
    // The check that keeps a coordinator from unmasking one agent's update: it may not
    // ask for both secrets of anyone, nor leave fewer than the threshold.
    let reveal = masked.unmask(&request).map_err(|e| {
        tracing::error!(round, error = %e, "refusing the coordinator's unmask request");
        protocol(e)
    })?;
    let reveal = convert::unmask_to_pb(round, &reveal);
    bytes += 44 * (reveal.self_mask_shares.len() + reveal.key_shares.len()) as u64;
    conn.unmask(reveal).await?;
    Ok(Sent {
        bytes,
        residual,
        summed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmicse_tensors::HostTensor;

    fn params(len: u64, clips: Vec<f32>) -> pb::SecureRound {
        pb::SecureRound {
            ring_bits: 10,
            value_bits: 8,
            len,
            threshold: 2,
            clips,
            ..Default::default()
        }
    }

    #[test]
    fn clipped_and_rounded_values_plus_the_residual_are_the_update() {
        let data: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 1e-3).collect();
        let want = TensorMap::from([("w".into(), HostTensor::new(vec![300], data.clone()))]);
        let p = params(301, vec![0.1]);
        let (values, residual) = encode(&want, &p, 1).unwrap();
        let q = Quantizer::new(0.1, 8).unwrap();
        let sent = q.decode_sum(&values[..300], 10);
        for i in 0..300 {
            let back = sent[i] + residual["w"].data[i];
            assert!((back - data[i]).abs() < 1e-6, "{i}");
            assert!(sent[i].abs() <= 0.1 + 1e-6, "clipped");
        }
        // The statistic: the largest |value| is 0.15 = 1.5 clips, i.e. 1.5/8 of 127.
        let stat = ring::decode_signed(values[300], 10) as f64;
        assert!((stat - 1.5 / 8.0 * 127.0).abs() <= 1.0, "{stat}");
    }

    #[test]
    fn non_finite_or_misshaped_updates_are_not_sent() {
        let mut want = TensorMap::from([("w".into(), HostTensor::new(vec![2], vec![0.0, 1.0]))]);
        assert!(
            encode(&want, &params(4, vec![0.1]), 1)
                .unwrap_err()
                .contains("expects")
        );
        assert!(
            encode(&want, &params(3, vec![0.1, 0.2]), 1)
                .unwrap_err()
                .contains("clips")
        );
        want.get_mut("w").unwrap().data[0] = f32::NAN;
        assert!(
            encode(&want, &params(3, vec![0.1]), 1)
                .unwrap_err()
                .contains("not finite")
        );
    }
}
