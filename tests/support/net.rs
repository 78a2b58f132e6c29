//! Loopback networking: free ports, and a TCP proxy of our own that counts
//! the bytes each way and can cap the rate toward the client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// Forward connections to `target`; with `down_rate` (bytes/s), pace what
/// flows back to the client.
pub fn proxy(target: SocketAddr, down_rate: Option<u64>) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let down = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let (d, u) = (down.clone(), up.clone());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (d, u) = (d.clone(), u.clone());
            std::thread::spawn(move || pump(client, server, None, u));
            std::thread::spawn(move || pump(s2, c2, down_rate, d));
        }
    });
    Proxy { addr, down, up }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rate: Option<u64>, count: Arc<AtomicU64>) {
    // Small reads when pacing, so the rate holds at a fine grain.
    let mut buf = vec![0u8; if rate.is_some() { 16 } else { 64 } * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
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
