//! Limits on accepted connections, for the coordinator's gRPC and HTTP listeners and the
//! agent's HTTP listener: at most `max_connections` open at once (more are closed at
//! accept, so a stranger cannot exhaust file descriptors or memory), and an idle timeout
//! that closes a connection from which nothing was read for `idle` (a TCP connection that
//! never starts TLS or HTTP, a peer that vanished without closing). HTTP/1 listeners also
//! get a deadline for a request's headers, so a half-sent header cannot hold a connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How many connections a listener keeps, and for how long a silent one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// A connection from which nothing was read for this long is closed.
    pub idle: Duration,
}

/// Counts of what a listener refused, for metrics.
#[derive(Debug, Default)]
pub struct ConnCounters {
    /// Connections closed at accept because `max_connections` were open.
    pub over_limit: AtomicU64,
    /// Connections closed by the idle timeout.
    pub idle_closed: Arc<AtomicU64>,
}

/// A connection holding its slot until dropped, closed when idle.
pub struct Limited<IO> {
    inner: IO,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    idle_closed: Arc<AtomicU64>,
    _permit: OwnedSemaphorePermit,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.idle_closed.fetch_add(1, Ordering::Relaxed);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing received for {} s", self.idle.as_secs()),
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Limited<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts from `listener` in a task of its own and yields limited connections; those over
/// the cap are closed at once. Ends when the receiving side is dropped.
pub fn limited_incoming(
    listener: TcpListener,
    limits: ConnLimits,
    counters: Arc<ConnCounters>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Limited<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let n = counters.over_limit.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%peer, max = limits.max_connections, refused_so_far = n, "connection limit reached: closing new connections");
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Limited {
                inner: stream,
                idle: limits.idle,
                deadline: Box::pin(tokio::time::sleep(limits.idle)),
                idle_closed: counters.idle_closed.clone(),
                _permit: permit,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves an axum router over HTTP/1 on `listener` with connection limits and a deadline
/// for each request's headers, until `shutdown` resolves (open connections then finish
/// their current request).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnLimits,
    header_timeout: Duration,
    counters: Arc<ConnCounters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use tokio_stream::StreamExt;
    let mut incoming = limited_incoming(listener, limits, counters);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = Box::pin(shutdown);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                _ => break,
            },
            _ = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout);
                b
            };
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let mut conn = std::pin::pin!(conn);
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection closed");
                    }
                }
                _ = stopped => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn http_closes_half_sent_headers_silent_peers_and_extra_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
        let counters = Arc::new(ConnCounters::default());
        let limits = ConnLimits {
            max_connections: 3,
            idle: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_http(
            listener,
            router,
            limits,
            Duration::from_secs(2),
            counters.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        // A half-sent header that keeps trickling (so never idle): closed by the header
        // deadline.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // A silent stranger: closed by the idle timeout.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let trickle = tokio::spawn(async move {
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if slow.write_all(b"X-A: b\r\n").await.is_err() {
                    break;
                }
            }
            slow
        });
        // One more is still served; a fourth while three are open is closed at once.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 256];
        let n = ok.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_secs(1)).await);
        assert_eq!(counters.over_limit.load(Ordering::Relaxed), 1);
        let mut slow = trickle.await.unwrap();
        assert!(
            closed_within(&mut slow, Duration::from_secs(3)).await,
            "slow header"
        );
        assert!(
            closed_within(&mut silent, Duration::from_secs(3)).await,
            "silent peer"
        );
        assert!(counters.idle_closed.load(Ordering::Relaxed) >= 1);
        // Slots are free again: a new connection is served.
        drop(ok);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = TcpStream::connect(addr).await.unwrap();
        again
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = again.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let _ = stop.send(());
    }
}
