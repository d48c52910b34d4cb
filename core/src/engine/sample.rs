//! Choosing the next token: greedy (argmax) for the first candidate, seeded top-k sampling at a temperature for
//! the others (see [`crate::engine::backend::Sampling`]).

use crate::engine::fastmath;

/// SplitMix64: a small, fast, well-mixed generator; one per sampled candidate, seeded from the prompt, so the same
/// request draws the same candidates on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed that depends only on the prompt's tokens (FNV-1a over their ids).
pub fn prompt_seed(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &t| {
        t.to_le_bytes().iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
    })
}

/// Index of the largest logit; the first one on a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The probability `softmax(logits)[token]` (temperature 1): how sure the model was of the token chosen, whatever
/// chose it. The largest logit is subtracted, so no logit overflows; the denominator is [`fastmath::sum_exp`]
/// (vectorized; it runs once per generated token over the whole vocabulary).
pub fn token_prob(logits: &[f32], token: u32) -> f32 {
    let Some(&chosen) = logits.get(token as usize) else { return 0.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (f64::from(fastmath::exp(chosen - max)) / fastmath::sum_exp(logits, max)) as f32
}

/// Draw a token from the `top_k` most likely ones, with probabilities `softmax(logit / temperature)` among them.
/// `temperature <= 0` or `top_k <= 1` is greedy. `scratch` is reused between calls.
pub fn sample_top_k(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng, scratch: &mut Vec<f32>) -> u32 {
    if temperature <= 0.0 || top_k <= 1 || logits.is_empty() {
        return argmax(logits);
    }
    let k = top_k.min(logits.len());
    scratch.clear();
    scratch.extend_from_slice(logits);
    let cut = logits.len() - k;
    let threshold = *scratch.select_nth_unstable_by(cut, |a, b| a.total_cmp(b)).1;
    let max = logits[argmax(logits) as usize];
    // In index order, so ties at the threshold are taken in a fixed order.
    let kept: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= threshold)
        .take(k)
        .map(|(i, &l)| (i as u32, (((l - max) / temperature) as f64).exp()))
        .collect();
    let total: f64 = kept.iter().map(|(_, w)| w).sum();
    let mut u = rng.next_f64() * total;
    for &(i, w) in &kept {
        if u < w {
            return i;
        }
        u -= w;
    }
    kept.last().map_or(0, |(i, _)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prob_is_the_softmax_of_the_chosen_logit() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for t in 0..3u32 {
            let want = (f64::from(logits[t as usize]).exp() / z) as f32;
            assert!((token_prob(&logits, t) - want).abs() < 1e-6);
        }
        // Large logits do not overflow; equal logits share the mass; a token past the vocabulary has none.
        assert!((token_prob(&[1000.0, 1000.0], 1) - 0.5).abs() < 1e-6);
        assert_eq!(token_prob(&[0.0], 3), 0.0);
    }

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_stays_in_the_top_k_and_follows_the_temperature() {
        let logits = [0.0f32, 5.0, 4.0, -3.0, 4.5, 1.0];
        let mut scratch = Vec::new();
        let draw = |seed: u64, t: f32, k: usize, scratch: &mut Vec<f32>| {
            let mut rng = Rng::new(seed, 1);
            (0..2000).map(|_| sample_top_k(&logits, t, k, &mut rng, scratch)).collect::<Vec<u32>>()
        };
        let a = draw(7, 0.7, 3, &mut scratch);
        assert_eq!(a, draw(7, 0.7, 3, &mut scratch), "same seed, same draws");
        assert_ne!(a, draw(8, 0.7, 3, &mut scratch), "another seed, other draws");
        assert!(a.iter().all(|t| [1, 2, 4].contains(t)), "only the top 3 tokens");
        let share = |v: &[u32], t: u32| v.iter().filter(|&&x| x == t).count() as f64 / v.len() as f64;
        // softmax([5, 4.5, 4] / 0.7) = 0.52, 0.26, 0.13+… → the top token most often, all three drawn.
        assert!(share(&a, 1) > 0.45 && share(&a, 1) < 0.65, "{}", share(&a, 1));
        assert!(share(&a, 2) > 0.05);
        // A low temperature concentrates on the top token; zero is greedy.
        assert!(share(&draw(7, 0.05, 3, &mut scratch), 1) > 0.99);
        assert!(draw(7, 0.0, 3, &mut scratch).iter().all(|&t| t == 1));
    }

    #[test]
    fn prompt_seeds_differ_by_prompt_and_streams_by_candidate() {
        assert_eq!(prompt_seed(&[1, 2, 3]), prompt_seed(&[1, 2, 3]));
        assert_ne!(prompt_seed(&[1, 2, 3]), prompt_seed(&[1, 2, 4]));
        assert_ne!(Rng::new(5, 1).next_u64(), Rng::new(5, 2).next_u64());
    }
}
