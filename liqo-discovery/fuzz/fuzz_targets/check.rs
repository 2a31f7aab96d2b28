//! The property the record fuzzer checks, shared by the libFuzzer target (`cargo fuzz run
//! record`) and the plain test that runs the same check on every stable toolchain
//! (`liqo-discovery/tests/record_fuzz.rs`).
//!
//! Input layout: the first byte picks how the rest is cut into TXT entries — even: DNS wire
//! format (a length byte, then that many bytes; what a resolver hands over), odd: split on
//! `\n` (entries of any length, to reach the size limits).
//!
//! Property: decoding never panics; a record that decodes re-encodes to entries that decode to
//! the same record, and respects the documented bounds.

use liqo_discovery::record::{DiscoveryRecord, MAX_NAME_BYTES, validate_endpoint};

/// Cuts `data` into TXT entries as described above.
pub fn entries(data: &[u8]) -> Vec<&[u8]> {
    let Some((&mode, rest)) = data.split_first() else {
        return vec![];
    };
    if mode % 2 == 1 {
        return rest.split(|b| *b == b'\n').collect();
    }
    let mut out = vec![];
    let mut rest = rest;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        out.push(&tail[..len]);
        rest = &tail[len..];
    }
    out
}

/// Runs the property on one input; panics (a finding) if it does not hold.
pub fn check(data: &[u8]) {
    let entries = entries(data);
    let Ok(record) = DiscoveryRecord::from_txt(entries.iter()) else {
        return;
    };
    assert!(record.cluster_name.len() <= MAX_NAME_BYTES, "{record:?}");
    assert!(
        validate_endpoint(&record.peering_endpoint).is_ok(),
        "{record:?}"
    );
    let again = DiscoveryRecord::from_txt(record.to_txt())
        .unwrap_or_else(|e| panic!("re-encoding {record:?} does not decode: {e}"));
    assert_eq!(again, record);
}
