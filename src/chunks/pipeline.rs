//! A bounded, ordered parallel map for the chunk data path.
//!
//! put, get and verify each do per-chunk CPU work (SHA-256, AES-GCM) that is
//! independent between chunks, between steps that must stay in order (reading
//! the input, writing the output, recording ids). [`ordered`] runs the
//! per-chunk work on a few threads and hands the results back in input order,
//! with at most `depth` chunks in flight, so memory stays at a few chunks
//! whatever the item's size while every core works.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;

use crate::error::Result;

/// Worker threads and chunks in flight for the data path over `store`: one
/// worker per core (the calling thread does the ordered I/O besides), or as
/// many as the store wants reads in flight if that is more (a remote object
/// store, where a worker mostly waits on a round trip); and two chunks per
/// worker so none waits on the reorder buffer.
pub(crate) fn shape(store: &super::Chunks) -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cores.clamp(1, 8).max(store.read_ahead());
    (workers, 2 * workers)
}

/// Apply `work` to every item of `input` on `workers` threads and pass the
/// results to `sink` in input order. `input` and `sink` run on the calling
/// thread. At most `depth` items are between `input` and `sink` at any time.
/// The first error from `input` or `sink` stops the run (work in progress is
/// finished and dropped) and is returned; a panic in `work` is re-raised here.
pub(crate) fn ordered<T, R, I, W, S>(
    input: I,
    workers: usize,
    depth: usize,
    work: W,
    mut sink: S,
) -> Result<()>
where
    T: Send,
    R: Send,
    I: IntoIterator<Item = Result<T>>,
    W: Fn(T) -> R + Sync,
    S: FnMut(R) -> Result<()>,
{
    let depth = depth.max(1);
    let mut input = input.into_iter();
    let (job_tx, job_rx) = sync_channel::<(u64, T)>(depth);
    let (res_tx, res_rx) = sync_channel::<(u64, std::thread::Result<R>)>(depth);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|s| {
        // Owned by this closure, so returning (an error included) closes
        // both channels and every worker ends before the scope does.
        let (job_tx, res_rx) = (job_tx, res_rx);
        for _ in 0..workers.max(1) {
            let (res_tx, job_rx, work) = (res_tx.clone(), &job_rx, &work);
            s.spawn(move || loop {
                let job = job_rx.lock().expect("job queue lock").recv();
                let Ok((i, t)) = job else { return };
                let r = catch_unwind(AssertUnwindSafe(|| work(t)));
                if res_tx.send((i, r)).is_err() {
                    return;
                }
            });
        }
        drop(res_tx);
        let (mut next_in, mut next_out) = (0u64, 0u64);
        let mut exhausted = false;
        let mut ready = BTreeMap::new();
        loop {
            while !exhausted && next_in - next_out < depth as u64 {
                match input.next() {
                    Some(t) => {
                        job_tx
                            .send((next_in, t?))
                            .expect("workers outlive the queue");
                        next_in += 1;
                    }
                    None => exhausted = true,
                }
            }
            if next_out == next_in {
                return Ok(());
            }
            let (i, r) = res_rx.recv().expect("a worker answers every job");
            ready.insert(i, r);
            while let Some(r) = ready.remove(&next_out) {
                next_out += 1;
                match r {
                    Ok(r) => sink(r)?,
                    Err(panic) => resume_unwind(panic),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn results_come_back_in_order_with_bounded_flight() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let live = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let mut got = Vec::new();
        let input = (0..200u64).map(|i| {
            let n = live.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            Ok(i)
        });
        ordered(
            input,
            3,
            4,
            |i| {
                // Later items finish first, so the reorder buffer is used.
                std::thread::sleep(std::time::Duration::from_micros((200 - i) % 7 * 50));
                i * 2
            },
            |r| {
                live.fetch_sub(1, Ordering::SeqCst);
                got.push(r);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, (0..200u64).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 4, "{peak:?} in flight");
    }

    #[test]
    fn the_first_error_stops_the_run() {
        let mut seen = 0;
        let e = ordered(
            (0..100u64).map(Ok),
            2,
            4,
            |i| i,
            |i| {
                seen += 1;
                if i == 10 {
                    return Err(Error::integrity("ten"));
                }
                Ok(())
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("ten"));
        assert_eq!(seen, 11);
        let e = ordered(
            (0..100u64).map(|i| {
                if i == 5 {
                    Err(Error::invalid("five"))
                } else {
                    Ok(i)
                }
            }),
            2,
            4,
            |i| i,
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("five"));
    }

    #[test]
    #[should_panic(expected = "boom")]
    fn a_panicking_worker_panics_the_caller() {
        let _ = ordered(
            (0..10u64).map(Ok),
            2,
            2,
            |i| assert!(i != 3, "boom"),
            |_| Ok(()),
        );
    }
}
