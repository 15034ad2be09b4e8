//! The SecureAggregation gRPC service: identifies the caller, turns protobuf into the
//! protocol's messages and hands them to the session ([`crate::secure`]). Nothing an
//! agent sends here is logged or written to disk: masked inputs go straight into the
//! running sum.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmicse_wire::pb::{
    self, MaskedChunk, SecureDirectory, SecureDone, SecureKeys, SecureShares, UnmaskShares,
    secure_aggregation_server::SecureAggregation,
};
use fedmicse_wire::secure::{self as convert, MaskedAssembler};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::rounds::Phase;
use crate::service::{Role, identify};

pub struct SecureAggregationService {
    shared: Arc<Shared>,
}

impl SecureAggregationService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        SecureAggregationService { shared }
    }

    /// The caller's id, once the coordinator runs secure rounds.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        if !self.shared.secure.config.enabled {
            return Err(Status::failed_precondition(
                "this coordinator does not run secure aggregation",
            ));
        }
        Ok(identify(&self.shared, req, Role::Agent)?.id)
    }

    /// How long a step after the first may keep a caller waiting.
    fn step_until(&self) -> Instant {
        let step = Duration::from_secs(self.shared.secure.config.step_timeout_secs);
        Instant::now() + step + Duration::from_secs(5)
    }

    /// Until when the key step may wait: the open round's deadline.
    fn round_until(&self, round: u64) -> Result<Instant, Status> {
        match &self.shared.lock().phase {
            Phase::Training(open) if open.round == round => Ok(open.deadline),
            _ => Err(Status::failed_precondition(format!(
                "round {round} is not open"
            ))),
        }
    }
}

#[tonic::async_trait]
impl SecureAggregation for SecureAggregationService {
    async fn advertise_keys(
        &self,
        req: Request<SecureKeys>,
    ) -> Result<Response<SecureDirectory>, Status> {
        let id = self.caller(&req)?;
        let msg = req.into_inner();
        let keys = convert::keys_from_pb(&msg).map_err(Status::invalid_argument)?;
        let until = self.round_until(msg.round)?;
        self.shared.wake.notify_one();
        let dir = self
            .shared
            .secure
            .advertise(msg.round, &id, keys, until)
            .await?;
        Ok(Response::new(SecureDirectory {
            keys: dir
                .iter()
                .map(|k| convert::keys_to_pb(msg.round, k))
                .collect(),
        }))
    }

    async fn share_keys(
        &self,
        req: Request<SecureShares>,
    ) -> Result<Response<SecureShares>, Status> {
        let id = self.caller(&req)?;
        let msg = req.into_inner();
        let shares = convert::shares_from_pb(&msg);
        self.shared.wake.notify_one();
        let inbox = self
            .shared
            .secure
            .share(msg.round, &id, shares, self.step_until())
            .await?;
        Ok(Response::new(convert::shares_to_pb(
            msg.round, msg.agent, &inbox,
        )))
    }

    async fn submit_masked(
        &self,
        req: Request<Streaming<MaskedChunk>>,
    ) -> Result<Response<pb::UnmaskRequest>, Status> {
        let id = self.caller(&req)?;
        let mut stream = req.into_inner();
        let until = self.step_until();
        let first = tokio::time::timeout_at(until.into(), stream.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no masked input"))?
            .ok_or_else(|| Status::invalid_argument("an empty stream"))??;
        let expected = self
            .shared
            .secure
            .masked_bytes(first.round)
            .ok_or_else(|| Status::failed_precondition("no secure session for this round"))?;
        let mut assembler = MaskedAssembler::new(expected);
        assembler.push(first)?;
        loop {
            let next = tokio::time::timeout_at(until.into(), stream.next())
                .await
                .map_err(|_| Status::deadline_exceeded("the masked input stalled"))?;
            match next {
                Some(chunk) => assembler.push(chunk?)?,
                None => break,
            }
        }
        let (round, input) = assembler.finish()?;
        self.shared.wake.notify_one();
        let request = self.shared.secure.masked(round, &id, input, until).await?;
        Ok(Response::new(convert::unmask_request_to_pb(&request)))
    }

    async fn unmask(&self, req: Request<UnmaskShares>) -> Result<Response<SecureDone>, Status> {
        let id = self.caller(&req)?;
        let msg = req.into_inner();
        let shares = convert::unmask_from_pb(&msg).map_err(Status::invalid_argument)?;
        self.shared.secure.unmask(msg.round, &id, shares)?;
        self.shared.wake.notify_one();
        Ok(Response::new(SecureDone::default()))
    }
}
