//! Choosing the next token from logits. The order of the filters follows llama.cpp's default
//! sampler chain (`common/sampling.cpp`): repetition penalty, top-k, top-p, min-p, then
//! temperature and a draw; temperature 0 is greedy.

use lever_model::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off. Divides positive logits, multiplies negative ones (CTRL paper, llama.cpp).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }

    /// What to sample `model` with when the user says nothing: the settings its authors
    /// publish (unnamed ones off, temperature 1 as transformers' `GenerationConfig`), else
    /// llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05;
    /// `common/common.h`). Greedy decoding with no repetition penalty makes small models loop,
    /// so greedy is for explicit requests (and exact comparisons with llama.cpp).
    pub fn for_model(g: &lever_model::GenerationConfig) -> Self {
        if g.is_empty() {
            return Self {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                ..Self::greedy()
            };
        }
        Self {
            temperature: g.temperature.unwrap_or(1.0),
            top_k: g.top_k.unwrap_or(0),
            top_p: g.top_p.unwrap_or(1.0),
            min_p: g.min_p.unwrap_or(0.0),
            repeat_penalty: g.repeat_penalty.unwrap_or(1.0),
            ..Self::greedy()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// `logits`: one score per vocabulary entry; `history`: tokens so far (prompt included).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut penalized = Vec::new();
        if p.repeat_penalty != 1.0 {
            penalized = logits.to_vec();
            let logits = &mut penalized;
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        let logits: &[f32] = if p.repeat_penalty != 1.0 {
            &penalized
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Nothing cut: draw from the whole vocabulary in token order (the same
            // distribution as walking it best first, without ranking it).
            return self.draw_all(logits, p.temperature);
        }
        // Candidates best first, sorted only as far as the filters and the draw look (a
        // vocabulary of 49k sorted in full costs milliseconds per token; the draw rarely goes
        // past the first few).
        let mut cand = Ranked::new(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l))
                .collect(),
        );
        if cand.len() == 0 {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let (max, sum) = cand.normalizer(1.0);
            let mut cum = 0.0;
            let mut keep = cand.len();
            for i in 0..cand.len() {
                cum += (cand.get(i).1 - max).exp() / sum;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // Keep tokens whose probability is at least min_p times the best one's.
            let floor = cand.get(0).1 + p.min_p.ln();
            let keep = cand.count_at_least(floor);
            cand.truncate(keep.max(1));
        }
        let (max, sum) = cand.normalizer(p.temperature);
        let r = self.rng.uniform();
        let mut cum = 0.0;
        for i in 0..cand.len() {
            let (id, l) = cand.get(i);
            cum += ((l - max) / p.temperature).exp() / sum;
            if r < cum {
                return id;
            }
        }
        cand.get(cand.len() - 1).0
    }
}

impl Sampler {
    /// A draw from softmax(logits / temperature) over the whole vocabulary, in token order:
    /// the weights and their sums by blocks in one vectorized pass (`Weights`), then the draw
    /// finds its block from the block sums and walks only that block.
    fn draw_all(&mut self, logits: &[f32], temperature: f32) -> u32 {
        let w = Weights::new(logits, temperature);
        if w.total <= 0.0 {
            return argmax(logits);
        }
        w.find(self.rng.uniform() * w.total)
    }
}

/// Lanes of the vectorized passes: independent running maxima and sums, so the compiler can
/// keep one per SIMD lane (a single running float sum is a chain it must not reorder).
const LANES: usize = 16;
/// Weights per block sum.
const BLOCK: usize = 256;

/// e^((l − max) / temperature) for every logit (0 for non-finite ones) and their sums per
/// block of `BLOCK` tokens. The arithmetic is fixed (lane sums, then a fixed tree per block,
/// then the blocks in order), so the same logits give the same draw on every CPU.
struct Weights {
    w: Vec<f32>,
    blocks: Vec<f32>,
    total: f32,
}

// Runtime choice of vector width: the one unsafe corner of this crate.
#[allow(unsafe_code)]
impl Weights {
    fn new(logits: &[f32], temperature: f32) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (detected just above), all `new_avx512` asks.
            return unsafe { Self::new_avx512(logits, temperature) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (detected just above), all `new_avx2` asks.
            return unsafe { Self::new_avx2(logits, temperature) };
        }
        Self::compute(logits, temperature)
    }

    /// The same code compiled for wider registers; no fused multiply-adds are formed, so the
    /// results are bit for bit those of the portable build.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn new_avx512(logits: &[f32], temperature: f32) -> Self {
        Self::compute(logits, temperature)
    }

    /// As [`Self::new_avx512`], for AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn new_avx2(logits: &[f32], temperature: f32) -> Self {
        Self::compute(logits, temperature)
    }

    #[inline(always)]
    fn compute(logits: &[f32], temperature: f32) -> Self {
        let finite = |l: f32| if l.is_finite() { l } else { f32::NEG_INFINITY };
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        let mut chunks = logits.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &l) in lane_max.iter_mut().zip(c) {
                let l = finite(l);
                *m = if l > *m { l } else { *m };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lane_max)
            .fold(f32::NEG_INFINITY, |m, &l| {
                let l = finite(l);
                if l > m { l } else { m }
            });
        let n = logits.len();
        let mut w = vec![0f32; n.div_ceil(LANES) * LANES];
        let mut blocks = Vec::with_capacity(n.div_ceil(BLOCK));
        if max == f32::NEG_INFINITY {
            return Weights {
                w,
                blocks,
                total: 0.0,
            };
        }
        let inv = 1.0 / temperature;
        for (b, out) in w.chunks_mut(BLOCK).enumerate() {
            let mut acc = [0f32; LANES];
            for (i, o) in out.chunks_exact_mut(LANES).enumerate() {
                let at = b * BLOCK + i * LANES;
                let mut l = [f32::NEG_INFINITY; LANES];
                let have = n.saturating_sub(at).min(LANES);
                l[..have].copy_from_slice(&logits[at..at + have]);
                for ((o, a), &l) in o.iter_mut().zip(&mut acc).zip(&l) {
                    let e = exp_approx((l - max) * inv);
                    *o = if l.is_finite() { e } else { 0.0 };
                    *a += *o;
                }
            }
            // A fixed pairwise tree over the lanes.
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for j in 0..width {
                    acc[j] += acc[j + width];
                }
            }
            blocks.push(acc[0]);
        }
        let total = blocks.iter().sum();
        Weights { w, blocks, total }
    }

    /// The token where the running sum of weights (blocks in order, tokens in order within
    /// the block) first exceeds `target`; rounding at the very end gives the last token with
    /// weight.
    fn find(&self, target: f32) -> u32 {
        let mut cum = 0f32;
        for (b, &s) in self.blocks.iter().enumerate() {
            if target < cum + s {
                let mut c = cum;
                let mut last = None;
                for (i, &x) in self.w[b * BLOCK..].iter().take(BLOCK).enumerate() {
                    if x > 0.0 {
                        c += x;
                        last = Some(b * BLOCK + i);
                        if target < c {
                            return (b * BLOCK + i) as u32;
                        }
                    }
                }
                if let Some(i) = last {
                    return i as u32;
                }
            }
            cum += s;
        }
        self.w.iter().rposition(|&x| x > 0.0).unwrap_or(0) as u32
    }
}

/// e^x for x ≤ 0, within 2e-7 relative of `f32::exp` above −87 (below, e^−87): 2^n · e^r with
/// n = round(x / ln 2) and e^r by its degree-6 Taylor polynomial, |r| ≤ ln 2 / 2. Plain
/// arithmetic, so a loop over the vocabulary vectorizes (libm's expf does not).
fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Candidates (token, logit) of which the first `sorted` are in order — logit descending, then
/// token ascending, as a stable sort of the vocabulary gives — and the rest are all worse.
struct Ranked {
    cand: Vec<(u32, f32)>,
    sorted: usize,
}

/// Candidates sorted up front: the draw at temperature ≤ 1 almost always ends inside them.
const FIRST: usize = 64;

fn order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

impl Ranked {
    fn new(mut cand: Vec<(u32, f32)>) -> Self {
        if cand.len() > FIRST {
            cand.select_nth_unstable_by(FIRST - 1, order);
            cand[..FIRST].sort_unstable_by(order);
            Ranked {
                cand,
                sorted: FIRST,
            }
        } else {
            cand.sort_unstable_by(order);
            let sorted = cand.len();
            Ranked { cand, sorted }
        }
    }

    fn len(&self) -> usize {
        self.cand.len()
    }

    /// The i-th best candidate.
    fn get(&mut self, i: usize) -> (u32, f32) {
        if i >= self.sorted {
            self.cand[self.sorted..].sort_unstable_by(order);
            self.sorted = self.cand.len();
        }
        self.cand[i]
    }

    /// Keep the best n.
    fn truncate(&mut self, n: usize) {
        if n < self.len() {
            if n > self.sorted {
                let rest = &mut self.cand[self.sorted..];
                rest.select_nth_unstable_by(n - self.sorted - 1, order);
            }
            self.cand.truncate(n);
            self.sorted = self.sorted.min(n);
        }
    }

    /// How many have a logit of at least `floor`.
    fn count_at_least(&self, floor: f32) -> usize {
        self.cand.iter().filter(|(_, l)| *l >= floor).count()
    }

    /// The best logit and Σ exp((l − best) / temperature) over every candidate.
    fn normalizer(&self, temperature: f32) -> (f32, f32) {
        let max = self.cand[0].1;
        let sum = self
            .cand
            .iter()
            .map(|(_, l)| ((l - max) / temperature).exp())
            .sum();
        (max, sum)
    }
}

/// Index of the largest logit (the first one on ties, like llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(|p| {
            p.top_k = 1;
            p.temperature = 5.0;
        }));
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.9, 0.8], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut s = Sampler::new(params(|p| p.top_p = 0.8));
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits, &[]) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [0.0f32, -0.1, -5.0];
        let mut s = Sampler::new(params(|p| p.min_p = 0.1));
        for _ in 0..500 {
            assert_ne!(s.sample(&logits, &[]), 2);
        }
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let logits = [2.0f32, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[0]), 1, "2.0/1.5 < 1.9");
    }

    #[test]
    fn same_seed_same_draws_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = seed));
            (0..40).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    /// Past the candidates sorted up front: flat logits over 1000 tokens reach all of them;
    /// top-k keeps the first k on ties (token order, as a stable sort), top-p the nucleus.
    #[test]
    fn large_vocabularies_draw_past_the_first_candidates() {
        let flat = vec![0.5f32; 1000];
        let mut s = Sampler::new(params(|p| p.seed = 3));
        let mut seen = vec![0usize; 1000];
        for _ in 0..20_000 {
            seen[s.sample(&flat, &[]) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 0), "every token drawn");
        let mut s = Sampler::new(params(|p| p.top_k = 100));
        for _ in 0..2000 {
            assert!(s.sample(&flat, &[]) < 100);
        }
        // Two clear tokens over a long tail: top-p 0.5 keeps the larger one only.
        let mut tail = vec![-20f32; 5000];
        tail[4321] = 10.0;
        tail[17] = 9.0;
        let mut s = Sampler::new(params(|p| p.top_p = 0.5));
        for _ in 0..200 {
            assert_eq!(s.sample(&tail, &[]), 4321);
        }
        let mut s = Sampler::new(params(|p| p.seed = 9));
        let picks: Vec<u32> = (0..2000).map(|_| s.sample(&tail, &[])).collect();
        assert!(
            picks
                .iter()
                .all(|&t| t == 4321 || t == 17 || tail[t as usize] == -20.0)
        );
        let seventeen = picks.iter().filter(|&&t| t == 17).count() as f64 / 2000.0;
        assert!((seventeen - 0.269).abs() < 0.04, "{seventeen}");
    }

    #[test]
    fn fast_exp_is_within_rounding_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_approx(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp_approx(0.0), 1.0);
    }

    /// The blocked draw lands where the exact (f64) cumulative distribution says, over a
    /// vocabulary that is not a whole number of blocks and holds masked (-inf, NaN) logits;
    /// the wide-register build gives the portable build's weights bit for bit.
    #[test]
    fn blocked_draw_follows_the_cumulative_distribution() {
        let n = 49_152 + 7;
        let mut logits: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618).sin() * 6.0) + (i % 97) as f32 * 0.02)
            .collect();
        logits[5] = f32::NEG_INFINITY;
        logits[n - 1] = f32::NAN;
        logits[1234] = 14.0;
        let t = 0.8f32;
        let w = Weights::new(&logits, t);
        let portable = Weights::compute(&logits, t);
        assert_eq!(w.w, portable.w);
        assert_eq!(w.total.to_bits(), portable.total.to_bits());
        let max = logits
            .iter()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
        let exact: Vec<f64> = logits
            .iter()
            .map(|&l| {
                if l.is_finite() {
                    ((l as f64 - max) / t as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let sum: f64 = exact.iter().sum();
        assert!(
            (w.total as f64 - sum).abs() / sum < 1e-5,
            "{} vs {sum}",
            w.total
        );
        let mut cdf = Vec::with_capacity(n);
        let mut c = 0.0;
        for e in &exact {
            c += e / sum;
            cdf.push(c);
        }
        for k in 0..2000 {
            let u = (k as f64 + 0.5) / 2000.0;
            let i = w.find((u * w.total as f64) as f32) as usize;
            assert!(exact[i] > 0.0, "drew masked token {i}");
            let below = if i == 0 { 0.0 } else { cdf[i - 1] };
            assert!(
                below - 1e-5 <= u && u <= cdf[i] + 1e-5,
                "u {u}: token {i} spans {below}..{}",
                cdf[i]
            );
        }
    }

    #[test]
    fn draws_follow_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let logits = [3f32.ln(), 0.0];
        let mut s = Sampler::new(params(|p| p.seed = 1));
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits, &[]) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.25).abs() < 0.015, "{frac}");
    }
}
