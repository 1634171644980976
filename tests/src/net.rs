//! Loopback networking helpers: free ports and a TCP relay that a test can blackhole.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Forwards loopback TCP connections to `target`. While blackholed it keeps connections open but
/// silently drops every byte in both directions, as a dead network path would.
pub struct Relay {
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    pumps: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        let pumps: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let ps = pumps.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let a = tokio::spawn(pump(ri, wo, bh.clone()));
                let b = tokio::spawn(pump(ro, wi, bh.clone()));
                let mut ps = ps.lock().unwrap();
                ps.retain(|h| !h.is_finished());
                ps.push(a.abort_handle());
                ps.push(b.abort_handle());
            }
        });
        Relay {
            addr,
            blackhole,
            task,
            pumps,
        }
    }

    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// Cut every connection now (both sockets dropped mid-stream); returns how many were open.
    pub fn cut(&self) -> usize {
        let mut ps = self.pumps.lock().unwrap();
        let open = ps.iter().filter(|h| !h.is_finished()).count() / 2;
        for h in ps.drain(..) {
            h.abort();
        }
        open
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if blackhole.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
