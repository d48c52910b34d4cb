//! Drafts for speculative decoding, by prompt lookup: an answer mostly copies what the prompt already holds — table
//! and column names from the schema, values from the question, aliases and clauses from its own earlier text. The
//! last few tokens decoded are looked up earlier in the sequence (the prompt and the answer so far) and the tokens
//! that followed them there are proposed as the next ones. The model then checks the whole draft in one multi-row
//! pass ([`crate::engine::model::Transformer::step_many`]); a drafted token is kept only when it is exactly the token
//! decoding would have chosen at that position, so the output is the same token for token as without drafts — only
//! the number of passes over the weights changes.

use serde::{Deserialize, Serialize};

/// How drafts are made. `tokens = 0` turns speculation off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftPolicy {
    /// The most tokens proposed after the token just chosen (each one costs a row of the verifying pass).
    pub tokens: usize,
    /// The shortest run of tokens that must match earlier in the sequence before what followed it is proposed
    /// (longer runs are tried first, up to [`MAX_NGRAM`]).
    pub min_ngram: usize,
    /// Cut drafts to what pays on this machine ([`Drafter`]); off, every draft runs to `tokens` (for measuring
    /// how often lookups are right).
    #[serde(default = "yes")]
    pub adapt: bool,
}

fn yes() -> bool {
    true
}

/// The longest run of recent tokens looked up.
pub const MAX_NGRAM: usize = 4;

impl Default for DraftPolicy {
    /// Chosen by `scripts/bench-speculative` (reports/speculative.md): see context.md.
    fn default() -> Self {
        DraftPolicy { tokens: 8, min_ngram: 1, adapt: true }
    }
}

impl DraftPolicy {
    pub const OFF: DraftPolicy = DraftPolicy { tokens: 0, min_ngram: 2, adapt: true };
}

/// What speculation did for one request: tokens proposed, how many of them decoding kept, and the passes over the
/// weights that carried a draft.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftStats {
    pub proposed: usize,
    pub accepted: usize,
    pub passes: usize,
}

impl DraftStats {
    pub fn add(&mut self, o: DraftStats) {
        self.proposed += o.proposed;
        self.accepted += o.accepted;
        self.passes += o.passes;
    }
}

/// Where a draft was found: in the answer decoded so far (an answer repeats its own aliases and column lists) or in
/// the prompt (schema, question, examples); and how long the matching run was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub in_answer: bool,
    pub ngram: usize,
}

impl Source {
    fn bucket(self) -> usize {
        usize::from(self.in_answer) * (MAX_NGRAM + 1) + self.ngram.min(MAX_NGRAM)
    }
}

/// Up to `policy.tokens` (and at most `room`) tokens that followed an earlier occurrence of the sequence's last `n`
/// tokens, for the longest `n` from [`MAX_NGRAM`] down to `policy.min_ngram` that occurs earlier; `None` when none
/// does. The sequence is `prompt` followed by `answer` (not copied). An occurrence in the answer is preferred (the
/// latest); in the prompt, the token that most often followed the run is taken (the latest occurrence on a tie),
/// and the draft continues from the latest occurrence it followed.
pub fn lookup(prompt: &[u32], answer: &[u32], policy: DraftPolicy, room: usize) -> Option<(Vec<u32>, Source)> {
    let want = policy.tokens.min(room);
    let len = prompt.len() + answer.len();
    if want == 0 || policy.min_ngram == 0 {
        return None;
    }
    let at = |i: usize| if i < prompt.len() { prompt[i] } else { answer[i - prompt.len()] };
    let draft = |start: usize, n: usize| -> Vec<u32> { (start + n..(start + n + want).min(len)).map(at).collect() };
    for n in (policy.min_ngram..=MAX_NGRAM.max(policy.min_ngram)).rev() {
        if len <= n {
            continue;
        }
        let tail = len - n;
        let matches = |start: usize| (0..n).all(|j| at(start + j) == at(tail + j));
        // In the answer, latest first (a match must have a token after it, so it starts before `tail`).
        if let Some(start) = (prompt.len()..tail).rev().find(|&s| matches(s)) {
            return Some((draft(start, n), Source { in_answer: true, ngram: n }));
        }
        // In the prompt: vote on the next token.
        let mut votes: Vec<(u32, usize, usize)> = Vec::new(); // (next token, count, latest start)
        for start in (0..prompt.len().min(tail)).filter(|&s| matches(s)) {
            let next = at(start + n);
            match votes.iter_mut().find(|v| v.0 == next) {
                Some(v) => {
                    v.1 += 1;
                    v.2 = start;
                }
                None => votes.push((next, 1, start)),
            }
        }
        if let Some(&(_, _, start)) = votes.iter().max_by_key(|v| (v.1, v.2)) {
            return Some((draft(start, n), Source { in_answer: false, ngram: n }));
        }
    }
    None
}

const BUCKETS: usize = 2 * (MAX_NGRAM + 1);

/// Drafts sized to pay on this machine: a drafted token costs a row of the verifying pass (`extra` ms, measured)
/// and saves a whole pass (`single` ms, measured) only if it and every draft token before it are kept. The share
/// kept is learned per [`Source`]. The j-th token is drafted only while `p^j > extra / single` (`p` the learned
/// share): on a machine whose memory is slow next to its arithmetic (a pass costs the weights' read; a row costs
/// little) drafts run long; where rows are dear they are short or absent. Drafts never change the output, only
/// the passes.
#[derive(Debug, Clone)]
pub struct Drafter {
    /// Milliseconds of a one-row pass, and of each row beyond the first (moving averages; `None` until seen).
    single_ms: Option<f64>,
    extra_ms: Option<f64>,
    /// Per source: draft tokens decided (kept, or the first one not kept) and kept, decaying.
    tried: [f64; BUCKETS],
    kept: [f64; BUCKETS],
}

/// Until measured: a row costs this share of a pass (a middle between the machines measured: ~0.4 on a 2-core
/// EPYC at 40 GB/s, ~0.1 on a Xeon at 11 GB/s).
const PRIOR_ROW_SHARE: f64 = 0.3;
/// Prior share of draft tokens kept, worth this many observations.
const PRIOR_KEPT: f64 = 0.5;
const PRIOR_WEIGHT: f64 = 4.0;
/// Weight of the past in the moving averages.
const DECAY: f64 = 0.98;

impl Default for Drafter {
    fn default() -> Self {
        Drafter { single_ms: None, extra_ms: None, tried: [0.0; BUCKETS], kept: [0.0; BUCKETS] }
    }
}

impl Drafter {
    /// The share of this source's draft tokens that decoding kept (with the prior).
    pub fn kept_share(&self, s: Source) -> f64 {
        let b = s.bucket();
        (self.kept[b] + PRIOR_KEPT * PRIOR_WEIGHT) / (self.tried[b] + PRIOR_WEIGHT)
    }

    /// What a row beyond the first costs, as a share of a one-row pass.
    pub fn row_share(&self) -> f64 {
        match (self.single_ms, self.extra_ms) {
            (Some(s), Some(e)) if s > 0.0 => (e / s).clamp(0.0, 1.0),
            _ => PRIOR_ROW_SHARE,
        }
    }

    /// The draft for the sequence `prompt` + `answer`: [`lookup`], cut to the tokens worth their row.
    pub fn propose(
        &self,
        prompt: &[u32],
        answer: &[u32],
        policy: DraftPolicy,
        room: usize,
    ) -> Option<(Vec<u32>, Source)> {
        let (mut d, src) = lookup(prompt, answer, policy, room)?;
        if !policy.adapt {
            return Some((d, src));
        }
        let (p, r) = (self.kept_share(src), self.row_share());
        let mut reach = 1.0;
        let mut keep = 0;
        while keep < d.len() {
            reach *= p;
            if reach <= r {
                break;
            }
            keep += 1;
        }
        d.truncate(keep);
        (!d.is_empty()).then_some((d, src))
    }

    /// Of a draft from `src`, `tried` tokens were compared with what decoding chose and the first `kept` matched
    /// (`tried = kept + 1` when one did not; `tried = kept` when the draft ran out or the answer ended).
    pub fn record_outcome(&mut self, src: Source, tried: usize, kept: usize) {
        let b = src.bucket();
        self.tried[b] = self.tried[b] * DECAY + tried as f64;
        self.kept[b] = self.kept[b] * DECAY + kept.min(tried) as f64;
    }

    /// A pass of `rows` rows took `ms` milliseconds.
    pub fn record_pass(&mut self, rows: usize, ms: f64) {
        let avg = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o * 0.9 + new * 0.1));
        if rows == 1 {
            self.single_ms = avg(self.single_ms, ms);
        } else if let Some(s) = self.single_ms {
            self.extra_ms = avg(self.extra_ms, ((ms - s) / (rows - 1) as f64).max(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: DraftPolicy = DraftPolicy { tokens: 3, min_ngram: 2, adapt: true };

    fn toks(d: Option<(Vec<u32>, Source)>) -> Vec<u32> {
        d.map(|d| d.0).unwrap_or_default()
    }

    #[test]
    fn in_the_prompt_the_most_frequent_continuation_wins_then_the_latest() {
        // "7 8" is followed by 1 twice and by 5 once (the latest): 1 wins, continued from its latest occurrence.
        let prompt = [7, 8, 1, 2, 7, 8, 1, 3, 6, 7, 8, 5, 6, 9, 4];
        assert_eq!(lookup(&prompt, &[7, 8], P, 10), Some((vec![1, 3, 6], Source { in_answer: false, ngram: 2 })));
        // A tie goes to the latest.
        let prompt = [7, 8, 1, 2, 7, 8, 5, 6, 9, 4];
        assert_eq!(toks(lookup(&prompt, &[7, 8], P, 10)), vec![5, 6, 9]);
        // The room left caps the draft, and so does the policy.
        assert_eq!(toks(lookup(&prompt, &[7, 8], P, 2)), vec![5, 6]);
        assert_eq!(toks(lookup(&prompt, &[7, 8], DraftPolicy { tokens: 1, ..P }, 10)), vec![5]);
    }

    #[test]
    fn longer_matches_win_over_nearer_shorter_ones() {
        // "1 7 8" occurs early (followed by 2); "7 8" alone occurs later (followed by 5). The answer ends "1 7 8".
        let prompt = [1, 7, 8, 2, 2, 0, 7, 8, 5, 5];
        assert_eq!(lookup(&prompt, &[1, 7, 8], P, 10), Some((vec![2, 2, 0], Source { in_answer: false, ngram: 3 })));
    }

    #[test]
    fn the_answer_is_searched_first_and_a_draft_stops_at_the_sequence_end() {
        // The answer repeats itself: "4 5 6 4 5" → after the earlier "4 5" came 6, 4, 5, though the prompt has
        // "4 5" followed by 7 (the draft may run into the tail, never past the end).
        let d = lookup(&[4, 5, 7, 9], &[4, 5, 6, 4, 5], P, 10);
        assert_eq!(d, Some((vec![6, 4, 5], Source { in_answer: true, ngram: 2 })));
        assert_eq!(toks(lookup(&[], &[4, 5, 4, 5], P, 10)), vec![4, 5]);
    }

    #[test]
    fn no_match_no_draft() {
        assert_eq!(lookup(&[1, 2, 3, 4], &[5, 6], P, 10), None);
        // Shorter than the shortest n-gram allowed: a single matching token is not enough.
        assert_eq!(lookup(&[1, 2, 3, 4], &[9, 3], P, 10), None);
        // With one-token matches allowed: what followed the "3" (which runs on into the answer).
        assert_eq!(toks(lookup(&[1, 2, 3, 4], &[9, 3], DraftPolicy { min_ngram: 1, ..P }, 10)), vec![4, 9, 3]);
        assert_eq!(lookup(&[1, 2, 1, 2], &[], DraftPolicy::OFF, 10), None);
        assert_eq!(lookup(&[1, 2, 1, 2], &[], P, 0), None);
        assert_eq!(lookup(&[], &[], P, 10), None);
    }

    #[test]
    fn drafts_are_as_long_as_they_pay_on_this_machine() {
        let prompt = [7, 8, 1, 2, 3, 4, 5, 6, 0, 0];
        let long = DraftPolicy { tokens: 6, min_ngram: 2, adapt: true };
        let src = Source { in_answer: false, ngram: 2 };
        // Rows nearly free next to a pass (slow memory): a source kept 90 % of the time drafts all six.
        let mut cheap = Drafter::default();
        cheap.record_pass(1, 100.0);
        cheap.record_pass(4, 130.0);
        assert!((cheap.row_share() - 0.1).abs() < 1e-9);
        for _ in 0..50 {
            cheap.record_outcome(src, 10, 9);
        }
        assert!(cheap.kept_share(src) > 0.85);
        assert_eq!(toks(cheap.propose(&prompt, &[7, 8], long, 10)), vec![1, 2, 3, 4, 5, 6]);
        // Rows dear (40 % of a pass): the same source drafts while 0.9^j > 0.4, i.e. eight — capped at six; a
        // source kept half the time drafts one; one rarely kept drafts nothing.
        let mut dear = cheap.clone();
        dear.record_pass(1, 26.0);
        for _ in 0..200 {
            dear.record_pass(1, 26.0);
            dear.record_pass(2, 36.4);
        }
        assert!((dear.row_share() - 0.4).abs() < 0.01, "{}", dear.row_share());
        assert_eq!(toks(dear.propose(&prompt, &[7, 8], long, 10)).len(), 6);
        let mut half = dear.clone();
        for _ in 0..200 {
            half.record_outcome(src, 2, 1);
        }
        assert!((half.kept_share(src) - 0.5).abs() < 0.05, "{}", half.kept_share(src));
        assert_eq!(toks(half.propose(&prompt, &[7, 8], long, 10)), vec![1]);
        let mut rarely = dear.clone();
        for _ in 0..200 {
            rarely.record_outcome(src, 1, 0);
        }
        assert_eq!(rarely.propose(&prompt, &[7, 8], long, 10), None);
        // Not adapting: the whole lookup, whatever the record.
        let fixed = DraftPolicy { adapt: false, ..long };
        assert_eq!(toks(rarely.propose(&prompt, &[7, 8], fixed, 10)), vec![1, 2, 3, 4, 5, 6]);
        // Another source keeps its own record (still the prior, half kept: one token).
        assert_eq!(toks(rarely.propose(&[0], &[7, 8, 1, 2, 7, 8], long, 10)), vec![1]);
    }
}
