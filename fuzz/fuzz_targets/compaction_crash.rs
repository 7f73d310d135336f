//! Compaction under power loss: operation sequences (as for `ops_crash`)
//! with a full compaction after every third operation, and a power loss
//! (clean, torn or garbled tail) just before one of the compaction's storage
//! calls, or an I/O fault in one of them. Checked against the reference
//! model of `tests/common/crash_model.rs`: no live record lost, nothing
//! dead resurrected, replays exact.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/crash_model.rs"]
mod crash_model;

fuzz_target!(|data: &[u8]| {
    let case = crash_model::decode_compaction(data);
    if let Err(e) = crash_model::run_case(&case) {
        panic!("compaction crash: {e}\ncase: {case:#?}");
    }
});
