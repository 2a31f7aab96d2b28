//! libFuzzer target for the discovery record decoder: `cargo +nightly fuzz run record`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "check.rs"]
mod check;

fuzz_target!(|data: &[u8]| check::check(data));
