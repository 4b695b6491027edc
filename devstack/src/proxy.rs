//! A TCP proxy a test can freeze (stop forwarding while keeping connections
//! open, as a network partition does) and heal (close what it held, accept
//! again) — to cut a process off from Postgres without touching either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy the test can freeze (stop forwarding, keep connections open,
/// as a network partition does) and then cut (close what it holds).
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (f, cs) = (frozen.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if f.load(Ordering::Relaxed) {
                    continue; // dropped: a partition refuses new connections too
                }
                let f = f.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let a = tokio::spawn(pump(cr, sw, f.clone()));
                    let b = tokio::spawn(pump(sr, cw, f));
                    let _ = tokio::join!(a, b);
                });
                cs.lock().unwrap_or_else(|p| p.into_inner()).push(task);
            }
        });
        Ok(Proxy {
            addr,
            frozen,
            conns,
        })
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }

    /// Ends the partition: closes every connection it held, accepts again.
    pub fn heal(&self) {
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            c.abort();
        }
        self.frozen.store(false, Ordering::Relaxed);
    }
}

/// Copies until EOF; while frozen, reads nothing (the peer's data waits in
/// its socket buffers, as on a dead link).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
