//! Guest data generators: what an admin "guest write" puts on a disk.

use serde::{Deserialize, Serialize};

use crate::ids::SplitMix64;

/// Kind of data written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Incompressible pseudo-random bytes.
    #[default]
    Random,
    /// Log-like ASCII text (compressible, non-zero).
    Text,
    /// Zero bytes (allocated, not a hole).
    Zero,
    /// Every byte equal to the seed's low byte.
    Byte,
}

const WORDS: &[&str] = &[
    "kernel",
    "systemd",
    "started",
    "session",
    "user",
    "backup",
    "disk",
    "write",
    "sector",
    "network",
    "link",
    "up",
    "eth0",
    "daemon",
    "cron",
    "job",
    "finished",
    "service",
    "nginx",
    "request",
    "GET",
    "/index.html",
    "200",
    "sshd",
    "accepted",
];

impl Pattern {
    /// Produces `length` bytes of this pattern, reproducible from `seed`.
    pub fn generate(self, seed: u64, length: usize) -> Vec<u8> {
        let mut out = vec![0u8; length];
        let mut rng = SplitMix64::new(seed);
        match self {
            Pattern::Random => rng.fill(&mut out),
            Pattern::Zero => {}
            Pattern::Byte => out.fill(seed as u8),
            Pattern::Text => {
                let mut text = Vec::with_capacity(length + 128);
                let mut line = 0u64;
                while text.len() < length {
                    line += 1;
                    let r = rng.next_u64();
                    text.extend_from_slice(
                        format!(
                            "2026-11-{:02} {:02}:{:02}:{:02} host{} ",
                            1 + r % 28,
                            (r >> 8) % 24,
                            (r >> 16) % 60,
                            (r >> 24) % 60,
                            (r >> 32) % 8
                        )
                        .as_bytes(),
                    );
                    for i in 0..(3 + (r >> 40) % 8) {
                        let w = WORDS[((r >> (i * 3)) as usize + line as usize) % WORDS.len()];
                        text.extend_from_slice(w.as_bytes());
                        text.push(b' ');
                    }
                    text.push(b'\n');
                }
                out.copy_from_slice(&text[..length]);
            }
        }
        out
    }
}
