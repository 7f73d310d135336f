//! Helpers shared by the criterion benches.

use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Runs `work(thread)` on `threads` threads started together (on this
/// thread when `threads` is 1); returns the wall time from the first
/// thread's start to the last one's end. Thread start-up is not timed:
/// every thread waits until all are started, then times its own run.
pub fn timed_threads(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    if threads == 1 {
        let start = Instant::now();
        work(0);
        return start.elapsed();
    }
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    work(t);
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> = handles
            .into_iter()
            .map(|handle| handle.join().expect("bench thread panicked"))
            .collect();
        let first = spans.iter().map(|span| span.0).min();
        let last = spans.iter().map(|span| span.1).max();
        last.zip(first)
            .map_or(Duration::ZERO, |(last, first)| last - first)
    })
}
