//! The record fuzzer's property (`fuzz/fuzz_targets/check.rs`) as a plain test, so that it runs
//! on stable in CI: every input of the seed corpus, then mutations of them and random inputs
//! from a fixed-seed PRNG (deterministic, a few seconds at most). `cargo +nightly fuzz run
//! record` explores much further with coverage guidance.

#[path = "../fuzz/fuzz_targets/check.rs"]
mod check;

use std::path::Path;

/// xorshift64*: small, deterministic, good enough to shake a parser.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const ALPHABET: &[u8] = b"v=1id=namepfsha256:https://[]:0123456789abcdef-.\n\x00\xff\xc3\xa9 ";

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(input.len() + 1);
                input.insert(i, ALPHABET[rng.below(ALPHABET.len())]);
            }
            2 if !input.is_empty() => {
                let i = rng.below(input.len());
                input.remove(i);
            }
            3 if !input.is_empty() => {
                // Duplicate a slice (repeated keys, long values).
                let a = rng.below(input.len());
                let b = (a + rng.below(64)).min(input.len());
                let slice = input[a..b].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, slice);
            }
            _ => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
        }
    }
}

#[test]
fn record_decoder_property_holds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/record");
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    corpus.sort();
    assert!(corpus.len() >= 5, "the seed corpus is missing");
    let decoded = corpus
        .iter()
        .filter(|c| liqo_discovery::DiscoveryRecord::from_txt(check::entries(c).iter()).is_ok())
        .count();
    assert!(decoded >= 3, "the corpus must hold valid records too");
    for input in &corpus {
        check::check(input);
    }
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut valid = 0;
    for round in 0..40_000 {
        let mut input = if round % 4 == 3 {
            // Random bytes.
            (0..rng.below(600)).map(|_| rng.next() as u8).collect()
        } else {
            corpus[rng.below(corpus.len())].clone()
        };
        mutate(&mut rng, &mut input);
        if liqo_discovery::DiscoveryRecord::from_txt(check::entries(&input).iter()).is_ok() {
            valid += 1;
        }
        check::check(&input);
    }
    // Enough mutants still decode for the round-trip half of the property to be exercised.
    eprintln!("{valid} of 40000 mutated inputs decoded");
    assert!(valid > 1_000, "only {valid} mutated inputs decoded");
}
