//! The fuzz smoke on stable: every target's body (the same code libFuzzer runs) over its seed
//! corpus, over every input kept in `fuzz/artifacts/<target>/` (crashes found and fixed:
//! regressions), and over deterministic mutations of them. A panic in a body fails the test,
//! naming the target and the input (hex).

use std::path::{Path, PathBuf};

use tether_fuzz::{Body, Outcome};

/// Mutations per target. The slowest body (enroll_request, a redb transaction and sometimes a
/// signature per input) takes about a millisecond in a debug build.
const MUTATIONS: usize = 3000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = rd
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("readable corpus file");
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// xorshift64*: a fixed sequence, the same on every machine.
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

/// One of libFuzzer's simpler mutations of `input`, splicing from `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.truncate(i);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(v.len() - i);
                v.drain(i..i + n);
            }
            5 => {
                // Splice: a prefix of this input, a suffix of the other.
                let i = rng.below(v.len() + 1);
                let j = rng.below(other.len() + 1);
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            6 if !v.is_empty() => {
                // An interesting value (lengths, varint edges) over a byte.
                const EDGES: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x10, 0x05, 0x40];
                let i = rng.below(v.len());
                v[i] = EDGES[rng.below(EDGES.len())];
            }
            _ if v.len() >= 2 => {
                // Duplicate a range.
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                let part = v[i..i + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, part);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

fn run(target: &str, body: Body, input: &[u8], what: &str) -> Outcome {
    match std::panic::catch_unwind(|| body(input)) {
        Ok(o) => o,
        Err(_) => {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("fuzz target {target} panicked on {what}: {hex}");
        }
    }
}

#[test]
fn every_target_survives_its_corpus_artifacts_and_mutations() {
    let dir = fuzz_dir();
    let mut ran = Vec::new();
    for (seed, (target, body)) in tether_fuzz::TARGETS.iter().enumerate() {
        let corpus = files(&dir.join("corpus").join(target));
        assert!(
            corpus.len() >= 2,
            "fuzz/corpus/{target} holds {} seeds: run `cargo run -p tether-fuzz --example gen_corpus`",
            corpus.len()
        );
        let artifacts = files(&dir.join("artifacts").join(target));
        let mut accepted = 0;
        for (path, bytes) in corpus.iter().chain(&artifacts) {
            if run(target, *body, bytes, &path.display().to_string()) == Outcome::Accepted {
                accepted += 1;
            }
        }
        // Seeds that all bounce off the first check would leave the deep end unexercised.
        assert!(
            accepted > 0 && accepted < corpus.len() + artifacts.len(),
            "{target}: {accepted} of its seeds accepted; the corpus needs valid and invalid ones"
        );
        let mut rng = Rng(0x7e7e_u64 ^ ((seed as u64 + 1) << 32));
        let inputs: Vec<&[u8]> = corpus
            .iter()
            .chain(&artifacts)
            .map(|(_, b)| b.as_slice())
            .collect();
        let mut mutants_accepted = 0;
        for i in 0..MUTATIONS {
            let a = inputs[rng.below(inputs.len())];
            let b = inputs[rng.below(inputs.len())];
            let m = mutate(&mut rng, a, b);
            if run(target, *body, &m, &format!("mutation {i}")) == Outcome::Accepted {
                mutants_accepted += 1;
            }
        }
        ran.push((
            *target,
            corpus.len(),
            artifacts.len(),
            accepted,
            mutants_accepted,
        ));
    }
    assert_eq!(ran.len(), tether_fuzz::TARGETS.len());
    eprintln!(
        "fuzz smoke (target, seeds, artifacts, seeds accepted, mutants accepted of {MUTATIONS}): {ran:#?}"
    );
}
