//! Loopback networking: free ports, and a TCP proxy of our own that counts
//! the bytes each way and can cap the rate toward the client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running proxy; its threads live as long as the process.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Bytes sent toward the client (server to client).
    pub down: Arc<AtomicU64>,
    /// Bytes sent toward the server.
    pub up: Arc<AtomicU64>,
    /// While set, the proxy is a dead link: open connections are closed and
    /// new ones are closed at once (the server behind it looks down).
    pub cut: Arc<AtomicBool>,
}

impl Proxy {
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

/// Forward connections to `target`; with `down_rate` (bytes/s), pace what
/// flows back to the client.
pub fn proxy(target: SocketAddr, down_rate: Option<u64>) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let down = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let (d, u, k) = (down.clone(), up.clone(), cut.clone());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            if k.load(Ordering::SeqCst) {
                continue; // dropped: closed at once
            }
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (d, u, k1, k2) = (d.clone(), u.clone(), k.clone(), k.clone());
            std::thread::spawn(move || pump(client, server, None, u, k1));
            std::thread::spawn(move || pump(s2, c2, down_rate, d, k2));
        }
    });
    Proxy {
        addr,
        down,
        up,
        cut,
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    rate: Option<u64>,
    count: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
) {
    // Woken now and then to notice a cut on an idle connection.
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    // Small reads when pacing, so the rate holds at a fine grain.
    let mut buf = vec![0u8; if rate.is_some() { 16 } else { 64 } * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        if cut.load(Ordering::SeqCst) {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(total as f64 / r as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
