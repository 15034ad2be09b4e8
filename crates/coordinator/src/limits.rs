//! Per-call limits of the gRPC server: unary calls get a deadline (request included, so a
//! client that sends headers and never the body is cut off); the streaming calls are bounded
//! by their per-chunk idle timeouts instead (a 100 MB upload over a slow link is legitimate).
//! At most one upload and one download per client id are in flight.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// A tower layer that applies [`CallTimeout`].
#[derive(Clone)]
pub struct CallTimeoutLayer {
    pub unary: Duration,
}

impl<S> tower_layer::Layer<S> for CallTimeoutLayer {
    type Service = CallTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallTimeout {
            inner,
            unary: self.unary,
        }
    }
}

#[derive(Clone)]
pub struct CallTimeout<S> {
    inner: S,
    unary: Duration,
}

/// Streaming methods, bounded by their chunk idle timeouts rather than a call deadline.
fn is_streaming(path: &str) -> bool {
    // Secure-aggregation steps wait for the other agents; each bounds its own wait.
    path.ends_with("/SubmitUpdate")
        || path.ends_with("/PullModel")
        || path.starts_with("/fedmicse.v1.SecureAggregation/")
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for CallTimeout<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let streaming = is_streaming(req.uri().path());
        let limit = self.unary;
        let fut = self.inner.call(req);
        Box::pin(async move {
            if streaming {
                return fut.await;
            }
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call took longer than {} s (server.call_timeout_secs)",
                    limit.as_secs()
                ))
                .into_http()),
            }
        })
    }
}

/// Client ids with a call of one kind in flight.
#[derive(Default, Clone)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

/// Holds a client's slot until dropped.
pub struct Slot {
    set: InFlight,
    id: String,
}

impl InFlight {
    /// Reserves `id`'s slot, or `None` when it already has one.
    pub fn reserve(&self, id: &str) -> Option<Slot> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.insert(id.to_string()).then(|| Slot {
            set: self.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.set.0.lock().unwrap_or_else(|p| p.into_inner());
        s.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_client() {
        let f = InFlight::default();
        let a = f.reserve("a").unwrap();
        assert!(f.reserve("a").is_none());
        let _b = f.reserve("b").unwrap();
        drop(a);
        assert!(f.reserve("a").is_some());
    }
}
