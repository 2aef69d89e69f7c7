//! The one accept loop of the supervisor's HTTP/1.1 listeners (`/metrics`, the API): at most
//! `connections` at once (a slot first, then the connection: beyond the cap, clients wait in
//! the kernel's listen queue, costing the supervisor no descriptor), one task per connection,
//! a header-read timeout, and optionally a cap on hyper's header buffer.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use tokio::net::TcpListener;

/// A listener's caps, and its name in the log.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    pub name: &'static str,
    pub connections: usize,
    pub header_timeout: Duration,
    /// hyper's read buffer, which bounds the request line and headers (at least 8 KiB).
    pub max_buf: Option<usize>,
}

/// Serves `service` on `listener` until the runtime stops.
pub(super) async fn serve<S, B>(listener: TcpListener, caps: Caps, service: S)
where
    S: hyper::service::Service<hyper::Request<Incoming>, Response = hyper::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(caps.connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("{}: accept failed: {e}", caps.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(caps.header_timeout);
            if let Some(max) = caps.max_buf {
                builder.max_buf_size(max);
            }
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("{}: connection ended: {e}", caps.name);
            }
            drop(slot);
        });
    }
}
