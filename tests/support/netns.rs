//! Two network namespaces joined by a real IP link whose delay, loss, rate
//! and partitions a test sets and changes while nodes talk over it.
//!
//! Each side of the link is a TUN device moved into its own namespace
//! (`ip netns add`, uniquely named per process and link). The packets the
//! kernel in one namespace sends out of its TUN device are read here and
//! written into the other namespace's TUN device after the configured
//! one-way delay, or dropped at random with the configured probability, or
//! all dropped while the link is cut. The endpoints are real kernels running
//! real TCP: retransmits, RTO backoff, congestion control and HTTP/2
//! keepalives all see a real lossy, delayed path. Rate limits are the
//! kernel's own `tbf` qdisc on each TUN device.
//!
//! Why not `tc netem`: the machines these tests run on (Firecracker VMs) have
//! no `sch_netem` and cannot load modules (`tc qdisc add ... netem` answers
//! "Specified qdisc kind is unknown"), while TUN and `tbf` are built in. If
//! TUN or namespaces are unavailable, [`Link::new`] panics saying so: a test
//! that needs a real network never passes without one.
//!
//! Dropping a [`Link`] stops the forwarder, kills whatever still runs in its
//! namespaces and deletes them, also when the test failed; namespaces left by
//! a killed test process are removed by the next [`Link::new`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use super::process::{clean_env, BIN};

/// The address of side A inside its namespace (the peer is [`ADDR_B`]).
pub const ADDR_A: &str = "10.99.0.1";
/// The address of side B inside its namespace.
pub const ADDR_B: &str = "10.99.0.2";

/// `_IOW('T', 202, int)`: attach an fd to a (new) TUN device.
const TUNSETIFF: u64 = 0x4004_54ca;
const PREFIX: &str = "bsnet-";

/// What the forwarder does to each packet, in both directions; changed live.
#[derive(Default)]
struct Shape {
    delay_us: AtomicU64,
    /// Loss probability in parts per million.
    loss_ppm: AtomicU32,
    cut: AtomicBool,
    stop: AtomicBool,
    passed: AtomicU64,
    dropped: AtomicU64,
}

/// A link between two namespaces, A and B.
pub struct Link {
    pub a: String,
    pub b: String,
    devs: [String; 2],
    shape: Arc<Shape>,
    threads: Vec<JoinHandle<()>>,
}

/// Run `ip <args>` (iproute2) and insist it succeeds.
#[track_caller]
pub fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip` (apt-get install iproute2): {e}"));
    assert!(
        o.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Delete namespaces of ours whose test process is gone (killed mid-test).
fn remove_stale() {
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A TUN device named `name` in this (the host's) namespace, packets without
/// the extra protocol header.
fn open_tun(name: &str) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| {
            panic!("/dev/net/tun cannot be opened ({e}): the network tests need TUN devices")
        });
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which `ifr` is.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

/// Whether `f` has a packet to read within 100 ms.
fn readable(f: &File) -> bool {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

/// One direction: read packets from `from`, drop or delay them, write them to `to`.
fn forward(from: File, to: File, shape: Arc<Shape>) -> [JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let s = shape.clone();
    let mut from = from;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut rng = rand::thread_rng();
        while !s.stop.load(Ordering::Relaxed) {
            if !readable(&from) {
                continue;
            }
            let Ok(n) = from.read(&mut buf) else { continue };
            let lost = rng.gen_range(0..1_000_000) < s.loss_ppm.load(Ordering::Relaxed);
            if s.cut.load(Ordering::Relaxed) || lost {
                s.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let due = Instant::now() + Duration::from_micros(s.delay_us.load(Ordering::Relaxed));
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    let mut to = to;
    let writer = std::thread::spawn(move || {
        while !shape.stop.load(Ordering::Relaxed) {
            let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // A packet cut off while it was in flight is lost with the link.
            if shape.cut.load(Ordering::Relaxed) {
                shape.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if to.write_all(&pkt).is_ok() {
                shape.passed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    [reader, writer]
}

impl Link {
    /// Two fresh namespaces, A ([`ADDR_A`]) and B ([`ADDR_B`]), joined by a
    /// link that delays each packet by `one_way` and drops `loss` of them
    /// (a fraction, e.g. 0.02), in each direction.
    pub fn new(one_way: Duration, loss: f64) -> Link {
        static CLEAN: Once = Once::new();
        static N: AtomicU32 = AtomicU32::new(0);
        CLEAN.call_once(remove_stale);
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let a = format!("{PREFIX}{pid}-{n}a");
        let b = format!("{PREFIX}{pid}-{n}b");
        let devs = [format!("bst{pid}x{n}a"), format!("bst{pid}x{n}b")];
        assert!(devs[0].len() <= 15, "device name {} too long", devs[0]);
        let shape = Arc::new(Shape::default());
        // From here on, Drop cleans up whatever was made.
        let mut link = Link {
            a: a.clone(),
            b: b.clone(),
            devs: devs.clone(),
            shape: shape.clone(),
            threads: Vec::new(),
        };
        link.set(one_way, loss);
        for ns in [&a, &b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let ta = open_tun(&devs[0]);
        let tb = open_tun(&devs[1]);
        for (dev, ns, me, peer) in [
            (&devs[0], &a, ADDR_A, ADDR_B),
            (&devs[1], &b, ADDR_B, ADDR_A),
        ] {
            ip(&["link", "set", dev, "netns", ns]);
            ip(&["-n", ns, "addr", "add", me, "peer", peer, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        let (ta2, tb2) = (ta.try_clone().unwrap(), tb.try_clone().unwrap());
        link.threads.extend(forward(ta, tb2, shape.clone()));
        link.threads.extend(forward(tb, ta2, shape));
        link
    }

    /// Change the one-way delay and the loss fraction (both directions).
    pub fn set(&self, one_way: Duration, loss: f64) {
        let s = &self.shape;
        s.delay_us
            .store(one_way.as_micros() as u64, Ordering::Relaxed);
        s.loss_ppm
            .store((loss * 1_000_000.0) as u32, Ordering::Relaxed);
    }

    /// Cut the link (every packet dropped, none in flight delivered) or heal it.
    pub fn cut(&self, cut: bool) {
        self.shape.cut.store(cut, Ordering::Relaxed);
    }

    /// Limit each direction to `rate` (tc's syntax, e.g. "1mbit") with the
    /// kernel's token bucket filter, queueing at most 400 ms; `None` lifts it.
    pub fn rate(&self, rate: Option<&str>) {
        for (ns, dev) in [(&self.a, &self.devs[0]), (&self.b, &self.devs[1])] {
            let mut args = vec!["netns", "exec", ns, "tc", "qdisc"];
            match rate {
                Some(r) => args.extend([
                    "replace", "dev", dev, "root", "tbf", "rate", r, "burst", "32kbit", "latency",
                    "400ms",
                ]),
                None => args.extend(["del", "dev", dev, "root"]),
            }
            ip(&args);
        }
    }

    /// Packets (delivered, dropped) so far, both directions.
    pub fn packets(&self) -> (u64, u64) {
        (
            self.shape.passed.load(Ordering::Relaxed),
            self.shape.dropped.load(Ordering::Relaxed),
        )
    }

    /// The time a TCP connect from B to `ADDR_A:port` takes (one round
    /// trip): the shaping is really on the path. Run on a thread moved into
    /// namespace B (setns(2) changes only the calling thread's namespace).
    pub fn connect_time(&self, port: u16) -> Duration {
        let ns = File::open(Path::new("/run/netns").join(&self.b)).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns(2) with an open namespace fd, on this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let t = Instant::now();
            std::net::TcpStream::connect((ADDR_A, port)).expect("connecting across the link");
            t.elapsed()
        })
        .join()
        .unwrap()
    }

    /// `bitsync --data-dir <dir>` run inside namespace `ns` (a clean
    /// environment, as [`super::process::bitsync`]).
    pub fn bitsync(ns: &str, dir: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, BIN])
            .arg("--data-dir")
            .arg(dir);
        clean_env(&mut c, dir.parent().unwrap_or(dir));
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shape.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.a, &self.b] {
            // Whatever a failed test left running in our namespace (processes we started).
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a pid inside a namespace this process made.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
