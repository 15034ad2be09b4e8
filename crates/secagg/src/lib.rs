//! Secure aggregation for federated rounds: the coordinator learns the sum
//! of the agents' updates and nothing else about any single one.
//!
//! This is the SecAgg protocol of Bonawitz et al. (CCS 2017, semi-honest
//! variant) with the SecAgg+ sparse neighbour graph of Bell et al. (CCS 2020),
//! as sans-IO state machines: each step takes the messages a party received
//! and returns its next state and the message to send. Transport, timeouts
//! (who counts as dropped) and the round id are the caller's.
//!
//! # Order of calls
//!
//! Both sides share one [`RoundConfig`] (round id, ring width k, vector
//! length, threshold t, [`Neighbourhood`]). Agent ids must be unique per round.
//!
//! | step | agent                                       | coordinator                         |
//! |------|---------------------------------------------|-------------------------------------|
//! | 0    | [`agent::advertise`] → [`AdvertiseKeys`]     | [`ServerKeys::receive`] each, then [`ServerKeys::close`] → directory (U1), broadcast |
//! | 1    | [`AgentAdvertised::share_keys`]`(directory)` → [`ShareKeys`] | [`ServerShares::receive`] each, [`ServerShares::close`] → one inbox per agent of U2 |
//! | 2    | [`AgentShared::mask_input`]`(inbox, x)` → [`MaskedInput`] | [`ServerMasked::receive`] each, [`ServerMasked::close`] → [`UnmaskRequest`] to every survivor |
//! | 3    | [`AgentMasked::unmask`]`(request)` → [`UnmaskResponse`] | [`ServerUnmask::receive`] each, [`ServerUnmask::finish`] → [`Aggregate`] |
//!
//! Inputs are vectors in Z_2^k: pick k = [`ring_bits`]`(b, n)` for b-bit
//! values and n agents, then [`Quantizer::encode`] (clip, scale, stochastic
//! rounding) an f32 update, or [`ring::encode_signed`] integers directly;
//! [`Quantizer::decode_sum`] or [`Aggregate::signed`] reads the sum back.
//!
//! # Who learns what
//!
//! - An agent learns the public keys of U1 and its own neighbours' shares
//!   (encrypted to it, useless below t).
//! - The coordinator routes ciphertexts it cannot open, keeps a running sum
//!   of masked inputs (each is uniform in Z_2^k on its own), and at step 3
//!   learns self-mask seeds of survivors and s-keys of agents that dropped
//!   after step 1 — never both for one agent: an honest agent refuses a
//!   request naming an agent as both survivor and dropped, answers once, and
//!   t is a strict majority of every holder set, so two disjoint groups of t
//!   cannot be told different stories. Its output is Σ x_u over U3.
//! - If fewer than t agents (or holders of some secret) are left at any step,
//!   the step returns [`Error::Abandon`] and the round is given up.
//!
//! Agents that drop before step 1 are simply left out; those that drop after
//! step 1 but before step 2 are excluded from the sum (their pairwise masks
//! are rebuilt and removed); those that drop after step 2 are *included*
//! (their input arrived; their self-mask is rebuilt from others' shares).
//!
//! Not covered: the actively-malicious variant (signed consistency round over
//! U3), and agents that lie about their shares (a bad s-key share is detected
//! as [`Error::ReconstructedKeyMismatch`], a bad self-mask share is not).

pub mod agent;
mod config;
mod graph;
mod kdf;
pub mod keys;
mod messages;
mod quant;
pub mod ring;
mod server;
pub mod shamir;

pub use agent::{AgentAdvertised, AgentMasked, AgentShared};
pub use config::RoundConfig;
pub use graph::{Graph, Neighbourhood};
pub use messages::{
    AdvertiseKeys, EncryptedShare, MaskedInput, RevealedShare, ShareKeys, UnmaskRequest,
    UnmaskResponse, WireBytes, agent_download_bytes, agent_upload_bytes,
};
pub use quant::Quantizer;
pub use ring::ring_bits;
pub use server::{Aggregate, ServerKeys, ServerMasked, ServerShares, ServerUnmask};

/// An agent's id within a round.
pub type AgentId = u32;

/// The protocol step an [`Error::Abandon`] happened at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    Unmask,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("round abandoned at {stage:?}: {have} agents or shares left, {need} needed")]
    Abandon {
        stage: Stage,
        have: usize,
        need: usize,
    },
    #[error("refused: the coordinator asked for both secrets of agent {0}")]
    RefusedBothSecrets(AgentId),
    #[error("refused: only {have} survivors among this agent's holders, threshold {need}")]
    TooFewSurvivors { have: usize, need: usize },
    #[error("refused: this agent is not listed as a survivor")]
    NotSurvivor,
    #[error("refused: the request names agent {0}, which sent this agent no shares")]
    InconsistentRequest(AgentId),
    #[error("invalid threshold {t} for {n} holders")]
    InvalidThreshold { t: usize, n: usize },
    #[error("threshold {0} is below 2: a single share would reveal a secret")]
    ThresholdBelowTwo(usize),
    #[error("threshold {t} must be more than half of the {holders} holders of a secret")]
    ThresholdTooLow { t: usize, holders: usize },
    #[error("threshold {t} exceeds a holder set of {holders}")]
    ThresholdTooHigh { t: usize, holders: usize },
    #[error("too few shares: {have}, need {need}")]
    TooFewShares { have: usize, need: usize },
    #[error("share x-coordinate {0} is zero or out of the field")]
    InvalidShareX(u64),
    #[error("duplicate share x-coordinate {0}")]
    DuplicateShareX(u64),
    #[error("shares are corrupt or inconsistent")]
    CorruptShares,
    #[error("rebuilt s-key of agent {0} does not match its advertised public key")]
    ReconstructedKeyMismatch(AgentId),
    #[error("ring width {0} is not in 1..=32")]
    InvalidRingBits(u32),
    #[error("wrong length: expected {expected}, got {got}")]
    BadLength { expected: usize, got: usize },
    #[error("input has the wrong length or a value outside Z_2^k")]
    InputOutOfRange,
    #[error("public key is of low order")]
    WeakPublicKey,
    #[error("share encryption failed")]
    Encrypt,
    #[error("share from agent {from} does not decrypt (tampered or misaddressed)")]
    Decrypt { from: AgentId },
    #[error("share from {from} addressed to {to} reached the wrong agent")]
    Misrouted { from: AgentId, to: AgentId },
    #[error("share from {from} to {to}: not neighbours this round")]
    NotNeighbour { from: AgentId, to: AgentId },
    #[error("agent {0} is not expected at this step")]
    UnknownAgent(AgentId),
    #[error("agent {0} appears twice")]
    Duplicate(AgentId),
    #[error("agent {0} reuses a public key")]
    DuplicateKey(AgentId),
    #[error("agent {0} sent the wrong set of shares")]
    BadShareSet(AgentId),
    #[error("clip must be finite and positive")]
    InvalidClip,
    #[error("the key directory does not hold this agent's keys")]
    DirectoryMismatch,
}
