//! Serving: the gRPC server (federation and inference, mutual TLS unless plaintext is
//! allowed), the optional HTTP server (/health, /ready, /metrics, embeddings) and the
//! round driver, all stopped by one signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmicse_wire::listen::{ConnLimits, limited_incoming, serve_http};
use fedmicse_wire::pb::federation_server::FederationServer;
use fedmicse_wire::pb::inference_server::InferenceServer;
use fedmicse_wire::pb::secure_aggregation_server::SecureAggregationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::drive::drive;
use crate::error::Error;
use crate::{Coordinator, Running, Shared, http, inference, limits, service};

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

impl Coordinator {
    /// Serves on `listener` until [`Running::shutdown`].
    pub async fn serve(self, listener: TcpListener) -> Result<Running, Error> {
        let shared = self.shared;
        let addr = listener.local_addr().map_err(Error::Listen)?;
        let (stop, _) = watch::channel(false);
        let server = serve_grpc(&shared, listener, stop.subscribe())?;
        let http_addr = match shared.config.http.listen {
            Some(listen) => Some(serve_metrics(&shared, listen, stop.subscribe()).await?),
            None => None,
        };
        let driver_shared = shared.clone();
        let mut stop_driver = stop.subscribe();
        let driver = tokio::spawn(async move {
            tokio::select! {
                _ = drive(driver_shared) => {}
                _ = stop_driver.wait_for(|s| *s) => {}
            }
        });
        tracing::info!(%addr, tls = shared.config.tls.is_some(), "coordinator listening");
        Ok(Running {
            addr,
            http_addr,
            shared,
            stop,
            server,
            driver,
        })
    }
}

fn server_builder(shared: &Shared) -> Result<tonic::transport::Server, Error> {
    let srv = &shared.config.server;
    let builder = tonic::transport::Server::builder()
        // Long local training leaves connections idle: keep them alive (the pings also
        // keep honest connections clear of the idle timeout).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(64));
    let Some(tls) = &shared.config.tls else {
        tracing::warn!(
            "serving PLAINTEXT without client certificates (server.allow_plaintext): local experiments only"
        );
        return Ok(builder);
    };
    let files = fedmicse_wire::TlsFiles {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    };
    let handshake = Duration::from_secs(srv.tls_handshake_timeout_secs);
    let config = files
        .server_config()
        .map_err(|e| Error::Tls(e.to_string()))?
        .timeout(handshake);
    builder
        .tls_config(config)
        .map_err(|e| Error::Tls(format!("TLS: {e}")))
}

fn serve_grpc(
    shared: &Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> Result<ServerTask, Error> {
    let srv = &shared.config.server;
    let federation = FederationServer::new(service::FederationService::new(shared.clone()))
        .max_decoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES);
    let inference = InferenceServer::new(inference::InferenceService::new(shared.clone()))
        .max_decoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 << 20);
    let secure = SecureAggregationServer::new(
        crate::secure_service::SecureAggregationService::new(shared.clone()),
    )
    .max_decoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(fedmicse_wire::MAX_MESSAGE_BYTES);
    let limits = ConnLimits {
        max_connections: srv.max_connections,
        idle: Duration::from_secs(srv.connection_idle_secs),
    };
    let incoming = limited_incoming(listener, limits, shared.grpc_conns.clone());
    let router = server_builder(shared)?
        .layer(limits::CallTimeoutLayer {
            unary: Duration::from_secs(srv.call_timeout_secs),
        })
        .add_service(federation)
        .add_service(inference)
        .add_service(secure);
    Ok(tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }))
}

async fn serve_metrics(
    shared: &Arc<Shared>,
    listen: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, Error> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::HttpListen(listen, e))?;
    let a = l.local_addr().map_err(Error::Listen)?;
    let app = http::router(shared.clone());
    let h = &shared.config.http;
    let limits = ConnLimits {
        max_connections: h.max_connections,
        idle: Duration::from_secs(h.idle_secs),
    };
    tokio::spawn(serve_http(
        l,
        app,
        limits,
        Duration::from_secs(h.header_timeout_secs),
        shared.http_conns.clone(),
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ));
    tracing::info!(addr = %a, embeddings_api = h.embeddings_api, "HTTP listening (/health, /ready, /metrics)");
    Ok(a)
}
