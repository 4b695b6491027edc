//! Serving HTTP the same way in every service: the server task with a
//! graceful stop, and `/metrics` in the Prometheus text format.

use std::net::SocketAddr;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The content type of the Prometheus text exposition (format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of `registry` in the Prometheus text exposition.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The `/metrics` answer for `registry`.
pub fn metrics_response(registry: &Registry) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        encode(registry),
    )
        .into_response()
}

/// Binds `addr` and serves `app` there in a task until `stop` is cancelled,
/// then lets requests in flight finish. Returns the bound address (the port
/// chosen for `:0`). Only binding can fail here; a later server error is
/// logged, not returned: the service's work goes on without its endpoints.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn serves_metrics_until_stopped() {
        let mut registry = Registry::default();
        let hits = Counter::<u64>::default();
        registry.register("hits", "Hits", hits.clone());
        hits.inc();
        let text = encode(&registry);
        assert!(text.contains("hits_total 1"), "{text}");
        let registry = std::sync::Arc::new(registry);
        let app = Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { metrics_response(&registry) }
            }),
        );
        let stop = CancellationToken::new();
        let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), app, stop.clone())
            .await
            .unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(METRICS_CONTENT_TYPE), "{reply}");
        assert!(reply.contains("hits_total 1"), "{reply}");
        stop.cancel();
        server.await.unwrap();
    }
}
