//! Connections: accept, serve HTTP/1.1 with hyper, and stop within a deadline.
//!
//! axum's own `serve` has no read timeouts, so a client that opens a connection and sends
//! half a request holds it (and, at shutdown, the whole server) forever. Here each
//! connection is driven by hyper's HTTP/1 connection builder with a header read timeout
//! (`Limits::header_timeout`: the request line and headers must arrive within it, and an
//! idle keep-alive connection is closed after it); the body has its own timeout in the
//! routes' `read_body`. On shutdown the listener closes, every connection is asked to finish
//! its request in flight and close, and whatever is still open at `Limits::shutdown_timeout`
//! is dropped (the engine then cancels its generations). The connection loop follows the
//! pattern of hyper-util's graceful-shutdown example and axum's `serve` (read, not copied).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What `serve_connections` did at the end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open at the shutdown deadline, closed without their answers.
    pub cut: usize,
}

pub(crate) async fn serve_connections(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Stopped {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors and the like: wait instead of spinning.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let builder = builder.clone();
                let svc = TowerToHyperService::new(app.clone());
                let mut stop = stop_rx.clone();
                conns.spawn(async move {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    // Finish the request in flight (a stream runs to its end), then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drain = async { while conns.join_next().await.is_some() {} };
    match tokio::time::timeout(shutdown_timeout, drain).await {
        Ok(()) => Stopped::default(),
        Err(_) => {
            let cut = conns.len();
            conns.shutdown().await;
            Stopped { cut }
        }
    }
}
