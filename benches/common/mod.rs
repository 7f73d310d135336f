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

/// Length of the keys [`key`] makes.
pub const KEY_LEN: usize = 25;

/// The key of record `i`: the bytes of
/// `format!("{:016x}-{:08x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i)`,
/// built without allocating (`i < 2^32`).
pub fn key(i: u64) -> [u8; KEY_LEN] {
    fn hex(out: &mut [u8], mut v: u64) {
        for b in out.iter_mut().rev() {
            *b = b"0123456789abcdef"[(v & 15) as usize];
            v >>= 4;
        }
    }
    assert!(i < 1 << 32, "key index {i} too large");
    let mut out = [0u8; KEY_LEN];
    hex(&mut out[..16], i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    out[16] = b'-';
    hex(&mut out[17..], i);
    out
}

/// Checks that [`key`] makes the bytes its docs promise.
pub fn check_key() {
    assert_eq!(
        &key(0x1234_5678)[..],
        format!(
            "{:016x}-{:08x}",
            0x1234_5678u64.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            0x1234_5678
        )
        .as_bytes()
    );
}
