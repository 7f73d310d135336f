//! Operation sequences with power losses, torn tails and injected I/O
//! faults, checked against the reference model of
//! `tests/common/crash_model.rs` (DESIGN.md invariants 1 to 4). The input
//! bytes are decoded by `crash_model::decode`; any broken invariant panics
//! with the failing operation and the case.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/crash_model.rs"]
mod crash_model;

fuzz_target!(|data: &[u8]| {
    crash_model::run_bytes(data);
});
