//! Caps on open connections, so that nobody can use up the coordinator's file descriptors
//! with connections that say nothing. Handshakes are already timed out (TLS: 10 s, in
//! `service::serve`) and dead peers are dropped by HTTP/2 keep-alive, but a client that
//! completes the handshake and then idles — or answers pings and never sends a request —
//! holds its connection for as long as it likes. So every accepted TCP connection takes a
//! slot: at most [`DEFAULT_MAX_CONNECTIONS`] in all and [`DEFAULT_MAX_CONNECTIONS_PER_IP`]
//! from one IP address (both settings); a connection over either cap is closed at once,
//! and the refusals are logged (at most once per 10 s, with a count). Users and agents on
//! other addresses keep being served whatever one address does.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

pub const DEFAULT_MAX_CONNECTIONS: u32 = 8192;
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 1024;

/// How often refused connections are logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The open connections, counted in all and by client address.
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Refused since the last warning.
    refused: u64,
    last_warning: Option<Instant>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for a connection from `ip`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut state = self.state();
        let from_ip = state.per_ip.get(&ip).copied().unwrap_or(0);
        let refusal = if state.total >= self.max_total {
            Some(Refusal::Total)
        } else if from_ip >= self.max_per_ip {
            Some(Refusal::PerIp)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            state.refused += 1;
            let due = state
                .last_warning
                .is_none_or(|at| at.elapsed() >= WARN_EVERY);
            if due {
                warn!(
                    client = %ip,
                    refused = state.refused,
                    open = state.total,
                    open_from_client = from_ip,
                    max_connections = self.max_total,
                    max_connections_per_ip = self.max_per_ip,
                    "Connections refused: {}.",
                    match refusal {
                        Refusal::Total => "the coordinator has max_connections open",
                        Refusal::PerIp => "this address has max_connections_per_ip open",
                    }
                );
                state.refused = 0;
                state.last_warning = Some(Instant::now());
            }
            return Err(refusal);
        }
        state.total += 1;
        *state.per_ip.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }

    /// Open connections: in all, and from `ip`.
    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> (usize, usize) {
        let state = self.state();
        (state.total, state.per_ip.get(&ip).copied().unwrap_or(0))
    }
}

/// One connection's place under the caps, given back when the connection is dropped.
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.limits.state();
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                state.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A TCP connection holding its [`Slot`].
pub struct Admitted {
    stream: TcpStream,
    _slot: Slot,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// `incoming` with every connection over a cap closed (dropped) at once instead of served.
pub fn limit(
    incoming: impl Stream<Item = io::Result<TcpStream>>,
    limits: Arc<ConnectionLimits>,
) -> impl Stream<Item = io::Result<Admitted>> {
    incoming.filter_map(move |accepted| match accepted {
        Ok(stream) => {
            let ip = stream.peer_addr().ok()?.ip();
            let slot = limits.admit(ip).ok()?;
            Some(Ok(Admitted {
                stream,
                _slot: slot,
            }))
        }
        Err(error) => Some(Err(error)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_in_all_and_per_address_and_given_back_on_drop() {
        let limits = ConnectionLimits::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "10.9.9.9".parse().unwrap());
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(Refusal::PerIp));
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).err(), Some(Refusal::Total));
        assert_eq!(limits.open(a), (3, 2));
        drop(first);
        assert_eq!(limits.open(a), (2, 1));
        let _again = limits.admit(a).unwrap();
    }
}
