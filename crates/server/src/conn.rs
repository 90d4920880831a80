//! Connections: the accept loop, admission and deadlines. Every connection is HTTP/1.1 (as
//! vLLM's uvicorn serves), over plain TCP or TLS, and each is bounded:
//!
//! - **Admission never waits**: the loop accepts every connection at once and closes, right
//!   away, one over a cap (all connections, or one peer address's; TLS handshakes in
//!   progress, all or one peer's). So a host that holds sockets open fills only its own
//!   share; nobody else waits behind it in the kernel's backlog.
//! - **Deadlines**: a TLS handshake must finish within `--tls-handshake-timeout`; a request
//!   head must arrive within `--header-read-timeout`, which also closes a keep-alive
//!   connection idle that long between requests (hyper starts the timer whenever it waits
//!   for a head).
//! - **Shutdown**: on the signal the loop stops accepting and every connection finishes its
//!   request in flight, then closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls;
use tower::{Service, ServiceExt};

/// How many connections and handshakes are admitted, and how long they may take.
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub(crate) struct ConnLimits {
    /// Seconds a TLS handshake may take; then the connection is closed.
    #[arg(long = "tls-handshake-timeout", value_parser = seconds, default_value = "5")]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection past this is closed at once.
    #[arg(long = "max-handshakes", default_value_t = 1024)]
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one peer address.
    #[arg(long = "max-handshakes-per-ip", default_value_t = 32)]
    pub max_handshakes_per_ip: usize,
    /// Open connections at once; a connection past this is closed at once.
    #[arg(long = "max-connections", default_value_t = 8192)]
    pub max_connections: usize,
    /// Open connections at once from one peer address (a proxy in front of the server is
    /// one address: raise it there).
    #[arg(long = "max-connections-per-ip", default_value_t = 1024)]
    pub max_connections_per_ip: usize,
    /// Seconds a connection may take to send a request's head (headers dribbled slowly), or
    /// stay idle between keep-alive requests; then it is closed (uvicorn's keep-alive timeout).
    #[arg(long = "header-read-timeout", alias = "timeout-keep-alive", value_parser = seconds, default_value = "10")]
    pub header_read_timeout: Duration,
}

/// A non-negative, finite number of seconds.
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}': seconds must be non-negative and finite"))
}

/// What a ticket counts.
#[derive(Clone, Copy)]
enum Slot {
    Connection,
    Handshake,
}

/// Open connections and handshakes in progress, in all and per peer address.
struct Admission {
    limits: ConnLimits,
    /// Per address: (connections, handshakes).
    per_ip: Mutex<HashMap<IpAddr, (usize, usize)>>,
    connections: AtomicUsize,
    handshakes: AtomicUsize,
}

/// One admitted connection or handshake; dropping it gives the slot back.
struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    slot: Slot,
}

impl Admission {
    /// A slot for `ip`, or `None` when it or everyone is at the cap.
    fn admit(self: &Arc<Self>, ip: IpAddr, slot: Slot) -> Option<Ticket> {
        let (total, cap, cap_per_ip) = match slot {
            Slot::Connection => (&self.connections, self.limits.max_connections, self.limits.max_connections_per_ip),
            Slot::Handshake => (&self.handshakes, self.limits.max_handshakes, self.limits.max_handshakes_per_ip),
        };
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let counts = per_ip.entry(ip).or_default();
        let mine = match slot {
            Slot::Connection => &mut counts.0,
            Slot::Handshake => &mut counts.1,
        };
        if *mine >= cap_per_ip || total.load(Ordering::Relaxed) >= cap {
            if *counts == (0, 0) {
                per_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        total.fetch_add(1, Ordering::Relaxed);
        Some(Ticket { admission: self.clone(), ip, slot })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        let mut per_ip = a.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counts) = per_ip.get_mut(&self.ip) {
            match self.slot {
                Slot::Connection => counts.0 = counts.0.saturating_sub(1),
                Slot::Handshake => counts.1 = counts.1.saturating_sub(1),
            }
            if *counts == (0, 0) {
                per_ip.remove(&self.ip);
            }
        }
        match self.slot {
            Slot::Connection => a.connections.fetch_sub(1, Ordering::Relaxed),
            Slot::Handshake => a.handshakes.fetch_sub(1, Ordering::Relaxed),
        };
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` resolves, then lets
/// every connection finish its request in flight; returns once all are closed.
pub(crate) async fn serve<S>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: S,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send,
) where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let admission =
        Arc::new(Admission { limits, per_ip: Mutex::default(), connections: 0.into(), handshakes: 0.into() });
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Set when shutting down; each connection task holds a receiver, so the sender's
    // `closed()` resolves once every connection has finished.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(ticket) = admission.admit(addr.ip(), Slot::Connection) else {
            tracing::debug!(%addr, "connection refused: at the connection cap");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, stop, admission, acceptor) = (app.clone(), stop_rx.clone(), admission.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            match acceptor {
                None => serve_connection(stream, app, limits, stop).await,
                Some(acceptor) => {
                    let Some(handshake) = admission.admit(addr.ip(), Slot::Handshake) else {
                        tracing::debug!(%addr, "connection refused: at the TLS handshake cap");
                        return;
                    };
                    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%addr, "TLS handshake timed out"),
                    };
                    drop(handshake);
                    serve_connection(tls, app, limits, stop).await
                }
            }
        });
    }
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// One HTTP/1.1 connection, until it closes (or, after `stop`, its request in flight ends).
async fn serve_connection<I, S>(io: I, app: S, limits: ConnLimits, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let service =
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| app.clone().oneshot(req.map(Body::new)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return log_end(r),
        _ = stop.wait_for(|&s| s) => {}
    }
    conn.as_mut().graceful_shutdown();
    log_end(conn.await);
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection closed with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            handshake_timeout: Duration::from_secs(1),
            max_handshakes: 4,
            max_handshakes_per_ip: 2,
            max_connections: 3,
            max_connections_per_ip: 2,
            header_read_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn admission_caps_each_peer_and_everyone_and_gives_slots_back() {
        let a = Arc::new(Admission {
            limits: limits(),
            per_ip: Mutex::default(),
            connections: 0.into(),
            handshakes: 0.into(),
        });
        let (x, y, z): (IpAddr, IpAddr, IpAddr) =
            ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap(), "127.0.0.4".parse().unwrap());
        let x1 = a.admit(x, Slot::Connection).unwrap();
        let _x2 = a.admit(x, Slot::Connection).unwrap();
        assert!(a.admit(x, Slot::Connection).is_none(), "x is at its own cap");
        let _y1 = a.admit(y, Slot::Connection).unwrap();
        assert!(a.admit(z, Slot::Connection).is_none(), "everyone is at the cap");
        // Handshakes are counted apart.
        let _h = a.admit(z, Slot::Handshake).unwrap();
        drop(x1);
        assert!(a.admit(z, Slot::Connection).is_some(), "a slot came back");
        assert!(a.per_ip.lock().unwrap().get(&z).is_some_and(|c| c.1 == 1));
        drop(_h);
        assert!(a.per_ip.lock().unwrap().get(&z).is_none(), "an address with nothing open is forgotten");
    }
}
