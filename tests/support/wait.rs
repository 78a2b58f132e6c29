//! Waiting with deadlines: a broken node fails a test, it never hangs it.

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `f` every `every` until it returns `Some`, for at most `limit`.
fn poll<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Poll `f` every 25 ms until it returns `Some`, failing the test after `secs`.
#[track_caller]
pub fn wait_for<T>(secs: u64, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(secs, Duration::from_millis(25), what, f)
}

/// [`wait_for`], polling every `every` (for checks that run a process).
#[track_caller]
pub fn wait_for_every<T>(
    secs: u64,
    every: Duration,
    what: &str,
    f: impl FnMut() -> Option<T>,
) -> T {
    poll(Duration::from_secs(secs), every, f)
        .unwrap_or_else(|| panic!("timed out after {secs} s waiting for {what}"))
}

/// Poll `cond` every 5 ms (tight, for catching a process mid-way) for at
/// most `limit`; whether it became true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll(limit, Duration::from_millis(5), || cond().then_some(())).is_some()
}

/// Await `f`, failing the test after `secs`.
pub async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s waiting for {what}"),
    }
}
