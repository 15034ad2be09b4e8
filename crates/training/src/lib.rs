//! miCSE training on a local shard, and SentEval-style STS evaluation.

pub mod objective;
