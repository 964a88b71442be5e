//! lever's one seeded random number generator: SplitMix64 (Steele, Lea & Flood, "Fast
//! splittable pseudorandom number generators", OOPSLA 2014; Vigna's `splitmix64.c`). Small,
//! stable across platforms and dependency versions, so seeded weights, tests, shuffles, HNSW
//! levels and runs stay reproducible.

/// SplitMix64; the state is the last value of its Weyl sequence (save and restore it as is).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller), in f32.
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(f32::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }

    /// Uniform in (0, 1], 53 bits: never 0, so its logarithm is finite.
    pub fn uniform_nonzero_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// A uniform index in `0..n` (`n > 0`), by modulo: the bias is below n / 2^64.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher–Yates from the end, so a seed gives the same order everywhere lever shuffles
    /// (fine-tuning splits, task splits, epochs).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// `k` distinct indices of `0..n` (all of them when `k >= n`), in the order drawn: a
    /// partial Fisher–Yates from the front.
    pub fn choose(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }

    /// Standard normal (Box–Muller), in f64.
    pub fn normal_f64(&mut self) -> f64 {
        let (u, v) = (self.uniform_nonzero_f64(), self.uniform_nonzero_f64());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference sequence (`splitmix64.c` seeded with 0): every seeded result in lever,
    /// saved HNSW graphs included, depends on it not changing.
    #[test]
    fn matches_the_reference_sequence() {
        let mut r = SplitMix64(0);
        let got = [r.next_u64(), r.next_u64(), r.next_u64()];
        assert_eq!(
            got,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F
            ]
        );
        let mut r = SplitMix64(7);
        let u = r.uniform_nonzero_f64();
        assert!(u > 0.0 && u <= 1.0);
    }

    #[test]
    fn shuffles_are_permutations_and_follow_the_seed() {
        let mut v: Vec<u32> = (0..50).collect();
        SplitMix64(1).shuffle(&mut v);
        let mut again: Vec<u32> = (0..50).collect();
        SplitMix64(1).shuffle(&mut again);
        assert_eq!(v, again);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());

        let picked = SplitMix64(2).choose(5, 20);
        assert_eq!(picked.len(), 5);
        let mut distinct = picked.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 5);
        assert!(picked.iter().all(|&i| i < 20));
        assert_eq!(SplitMix64(2).choose(30, 3).len(), 3);
    }
}
