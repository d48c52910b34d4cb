//! Drafts for speculative decoding, by prompt lookup: an answer mostly copies what the prompt already holds — table
//! and column names from the schema, values from the question, aliases and clauses from its own earlier text. The
//! last few tokens decoded are looked up earlier in the sequence (the prompt and the answer so far) and the tokens
//! that followed them there are proposed as the next ones. The model then checks the whole draft in one multi-row
//! pass ([`crate::engine::model::Transformer::step_many`]); a drafted token is kept only when it is exactly the token
//! decoding would have chosen at that position, so the output is the same token for token as without drafts — only
//! the number of passes over the weights changes.
//!
//! A second source is the engine's own past: SQL answers repeat their phrasing from one question to the next
//! (`count(*) FROM`, `GROUP BY … ORDER BY count(*) DESC LIMIT 1`, a schema's join columns), and the prompt of a new
//! question holds none of that. [`History`] counts, for every run of up to [`HISTORY_NGRAM`] tokens the engine has
//! decoded, which token followed it; a draft follows the most frequent continuations while they are likely enough
//! to pay for their rows (offline on 285 recorded answers of the default model: 1.13 → 1.7 tokens a pass, see
//! context.md, 2026-12-07).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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
    /// Draft from the engine's [`History`] first (adaptive drafts only); off, drafts come from the prompt and the
    /// answer alone (for measuring what the history adds).
    #[serde(default = "yes")]
    pub history: bool,
}

fn yes() -> bool {
    true
}

/// The longest run of recent tokens looked up.
pub const MAX_NGRAM: usize = 4;

impl Default for DraftPolicy {
    /// Chosen by `scripts/bench-speculative` (reports/speculative.md): see context.md.
    fn default() -> Self {
        DraftPolicy { tokens: 8, min_ngram: 1, adapt: true, history: true }
    }
}

impl DraftPolicy {
    pub const OFF: DraftPolicy = DraftPolicy { tokens: 0, min_ngram: 2, adapt: true, history: true };
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

/// Where a draft was found: in the answer decoded so far (an answer repeats its own aliases and column lists), in
/// the prompt (schema, question, examples) or in the engine's [`History`]; and how long the matching run was (for
/// the history, the run its first token followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub in_answer: bool,
    pub ngram: usize,
    pub from_history: bool,
}

impl Source {
    fn bucket(self) -> usize {
        let kind = if self.from_history { 2 } else { usize::from(self.in_answer) };
        kind * (MAX_NGRAM + 1) + self.ngram.min(MAX_NGRAM)
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
            return Some((draft(start, n), Source { in_answer: true, ngram: n, from_history: false }));
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
            return Some((draft(start, n), Source { in_answer: false, ngram: n, from_history: false }));
        }
    }
    None
}

const BUCKETS: usize = 3 * (MAX_NGRAM + 1);

/// The longest run of tokens [`History`] keys on.
pub const HISTORY_NGRAM: usize = 4;
/// The most runs [`History`] holds; past it every count is halved and those that reach zero are forgotten (so a
/// run seen once is dropped first, and the engine's recent habits outweigh its old ones). A few MB at most
/// (about 100 bytes a run).
const HISTORY_RUNS: usize = 1 << 16;

/// A run of 1..=[`HISTORY_NGRAM`] tokens: its length and the tokens, zero-padded.
type Run = (u8, [u32; HISTORY_NGRAM]);

/// What the engine has decoded before, as counts: for every run of up to [`HISTORY_NGRAM`] tokens, which tokens
/// followed it and how often. It is learned from every token decoding chooses (the prompt's last tokens count as
/// context for the answer's first ones, so "the answer begins" is a run too) and never from drafts. It holds token
/// ids only and never changes an answer, only how many passes one takes.
#[derive(Debug, Clone, Default)]
pub struct History {
    next: HashMap<Run, Vec<(u32, u32)>>,
}

/// The run of the `n` tokens before position `end` of `prompt` followed by `answer`, if the sequence is that long.
fn run_before(prompt: &[u32], answer: &[u32], end: usize, n: usize) -> Option<Run> {
    if n == 0 || n > HISTORY_NGRAM || end < n || end > prompt.len() + answer.len() {
        return None;
    }
    let mut key = [0u32; HISTORY_NGRAM];
    for (j, k) in (end - n..end).enumerate() {
        key[j] = if k < prompt.len() { prompt[k] } else { answer[k - prompt.len()] };
    }
    Some((n as u8, key))
}

impl History {
    /// Decoding chose `token` after `prompt` followed by `answer`.
    pub fn learn(&mut self, prompt: &[u32], answer: &[u32], token: u32) {
        let end = prompt.len() + answer.len();
        for n in 1..=HISTORY_NGRAM {
            let Some(run) = run_before(prompt, answer, end, n) else { break };
            let next = self.next.entry(run).or_default();
            match next.iter_mut().find(|(t, _)| *t == token) {
                Some((_, c)) => *c = c.saturating_add(1),
                None => next.push((token, 1)),
            }
        }
        if self.next.len() > HISTORY_RUNS {
            self.age();
        }
    }

    fn age(&mut self) {
        self.next.retain(|_, next| {
            next.retain_mut(|(_, c)| {
                *c /= 2;
                *c > 0
            });
            !next.is_empty()
        });
    }

    /// How many runs are held.
    pub fn len(&self) -> usize {
        self.next.len()
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    /// The token most often seen after the longest run ending the sequence that has been seen at all, with the
    /// share of times it came: `count / (times the run was seen + 1)` (one unseen continuation assumed, so a run
    /// seen once predicts with 1/2, not certainty); and the run's length.
    pub fn predict(&self, prompt: &[u32], answer: &[u32]) -> Option<(u32, f64, usize)> {
        let end = prompt.len() + answer.len();
        (1..=HISTORY_NGRAM).rev().find_map(|n| {
            let next = self.next.get(&run_before(prompt, answer, end, n)?)?;
            let seen: u64 = next.iter().map(|&(_, c)| u64::from(c)).sum();
            // The most frequent; on a tie the one first seen.
            let &(t, c) = next.iter().rev().max_by_key(|&&(_, c)| c)?;
            Some((t, f64::from(c) / (seen + 1) as f64, n))
        })
    }

    /// A draft of up to `want` tokens after `prompt` + `answer`, each the most frequent continuation of the
    /// sequence so far (drafted tokens included), taken while the chance that it and every one before it are
    /// right stays above `row_share` (the cost of its row as a share of a pass: below it the row costs more than
    /// it is expected to save).
    pub fn draft(&self, prompt: &[u32], answer: &[u32], want: usize, row_share: f64) -> Option<(Vec<u32>, Source)> {
        let mut seq = answer.to_vec();
        let mut reach = 1.0;
        let mut first = None;
        while seq.len() - answer.len() < want {
            let Some((t, p, n)) = self.predict(prompt, &seq) else { break };
            reach *= p;
            if reach <= row_share {
                break;
            }
            first.get_or_insert(n);
            seq.push(t);
        }
        let n = first?;
        Some((seq.split_off(answer.len()), Source { in_answer: false, ngram: n, from_history: true }))
    }
}

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
    /// What the engine decoded before ([`DraftPolicy::history`]).
    pub history: History,
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
        Drafter {
            single_ms: None,
            extra_ms: None,
            tried: [0.0; BUCKETS],
            kept: [0.0; BUCKETS],
            history: History::default(),
        }
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

    /// The draft for the sequence `prompt` + `answer`: from the [`History`] when it knows a likely enough
    /// continuation (adaptive drafts with [`DraftPolicy::history`]), else [`lookup`] cut to the tokens worth their
    /// row.
    pub fn propose(
        &self,
        prompt: &[u32],
        answer: &[u32],
        policy: DraftPolicy,
        room: usize,
    ) -> Option<(Vec<u32>, Source)> {
        if policy.adapt && policy.history && policy.tokens > 0 {
            if let Some(d) = self.history.draft(prompt, answer, policy.tokens.min(room), self.row_share()) {
                return Some(d);
            }
        }
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

    const P: DraftPolicy = DraftPolicy { tokens: 3, min_ngram: 2, adapt: true, history: true };

    fn toks(d: Option<(Vec<u32>, Source)>) -> Vec<u32> {
        d.map(|d| d.0).unwrap_or_default()
    }

    #[test]
    fn in_the_prompt_the_most_frequent_continuation_wins_then_the_latest() {
        // "7 8" is followed by 1 twice and by 5 once (the latest): 1 wins, continued from its latest occurrence.
        let prompt = [7, 8, 1, 2, 7, 8, 1, 3, 6, 7, 8, 5, 6, 9, 4];
        assert_eq!(
            lookup(&prompt, &[7, 8], P, 10),
            Some((vec![1, 3, 6], Source { in_answer: false, ngram: 2, from_history: false }))
        );
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
        assert_eq!(
            lookup(&prompt, &[1, 7, 8], P, 10),
            Some((vec![2, 2, 0], Source { in_answer: false, ngram: 3, from_history: false }))
        );
    }

    #[test]
    fn the_answer_is_searched_first_and_a_draft_stops_at_the_sequence_end() {
        // The answer repeats itself: "4 5 6 4 5" → after the earlier "4 5" came 6, 4, 5, though the prompt has
        // "4 5" followed by 7 (the draft may run into the tail, never past the end).
        let d = lookup(&[4, 5, 7, 9], &[4, 5, 6, 4, 5], P, 10);
        assert_eq!(d, Some((vec![6, 4, 5], Source { in_answer: true, ngram: 2, from_history: false })));
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
        let long = DraftPolicy { tokens: 6, min_ngram: 2, adapt: true, history: true };
        let src = Source { in_answer: false, ngram: 2, from_history: false };
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

    #[test]
    fn history_learns_what_followed_and_drafts_what_pays() {
        let mut h = History::default();
        assert_eq!(h.predict(&[1], &[2]), None);
        // "SELECT count ( * ) FROM" decoded twice after the prompt's end marker 9.
        let answer = [10, 11, 12, 13, 14, 15];
        for _ in 0..2 {
            for j in 0..answer.len() {
                h.learn(&[5, 9], &answer[..j], answer[j]);
            }
        }
        // The prompt's tail is context for the answer's first token.
        assert_eq!(h.predict(&[7, 9], &[]), Some((10, 2.0 / 3.0, 1)));
        // The longest run seen wins: after 11 12 comes 13, seen twice (2 of 2 + 1).
        assert_eq!(h.predict(&[], &[11, 12]), Some((13, 2.0 / 3.0, 2)));
        // A third answer goes another way after 12: still 13 most often, with less confidence.
        h.learn(&[], &[10, 11, 12], 20);
        assert_eq!(h.predict(&[9], &[10, 11, 12]).map(|p| (p.0, p.2)), Some((13, 4)));
        assert_eq!(h.predict(&[], &[12]), Some((13, 2.0 / 4.0, 1)));
        // Drafts chain the continuations while the chance all are right stays above the row's share of a pass.
        let src = Source { in_answer: false, ngram: 1, from_history: true };
        let d = h.draft(&[], &[13], 8, 0.1);
        assert_eq!(d, Some((vec![14, 15], src)), "nothing was seen after 15");
        assert_eq!(h.draft(&[], &[13], 1, 0.1).unwrap().0, vec![14], "at most `want`");
        // (2/3)·(2/3) = 0.44: dear rows (0.5) take one token; rows dearer than 2/3 none.
        assert_eq!(h.draft(&[], &[13], 8, 0.5).unwrap().0, vec![14]);
        assert_eq!(h.draft(&[], &[13], 8, 0.7), None);
        assert_eq!(h.draft(&[], &[99], 8, 0.0), None, "never seen");
        assert_eq!(h.draft(&[], &[13], 0, 0.0), None);
        // The drafter asks the history first when the policy allows it, else looks up the prompt.
        let drafter = Drafter { history: h.clone(), ..Drafter::default() };
        let pol = DraftPolicy { tokens: 4, min_ngram: 1, adapt: true, history: true };
        let prompt = [13, 30, 31];
        assert_eq!(drafter.propose(&prompt, &[13], pol, 10).map(|d| d.1.from_history), Some(true));
        let no_history = DraftPolicy { history: false, ..pol };
        assert_eq!(toks(drafter.propose(&prompt, &[13], no_history, 10)), vec![30]);
        let fixed = DraftPolicy { adapt: false, ..pol };
        assert_eq!(toks(drafter.propose(&prompt, &[13], fixed, 10)), vec![30, 31, 13], "to the sequence's end");
    }

    #[test]
    fn history_stays_bounded_and_forgets_rare_runs_first() {
        let mut h = History::default();
        // A habit seen often, then many runs seen once.
        for _ in 0..8 {
            h.learn(&[], &[1, 2], 3);
        }
        let mut t = 100u32;
        let mut most = 0;
        loop {
            let before = h.len();
            h.learn(&[], &[t, t + 1], t + 2);
            t += 3;
            most = most.max(h.len());
            if h.len() < before {
                break;
            }
        }
        // Aged as soon as a token's runs took it past the bound, and not before.
        assert!(most <= HISTORY_RUNS && most + HISTORY_NGRAM > HISTORY_RUNS, "aged at the bound: {most}");
        assert_eq!(h.len(), 2, "what was seen once is gone: {}", h.len());
        assert_eq!(h.predict(&[], &[1, 2]).map(|p| (p.0, p.2)), Some((3, 2)), "the habit is kept, halved");
        assert_eq!(h.predict(&[], &[100, 101]), None, "runs seen once are forgotten");
    }
}
