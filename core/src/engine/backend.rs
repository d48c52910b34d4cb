//! The generation backend: what the extension's worker and the trainer's evaluator call.
//!
//! A backend turns (schema context, question) into model output and the SQL extracted from it. The candle runtime
//! ([`crate::engine::runtime::Runtime`]) is the one we ship; the trait keeps room for another engine behind the same calls.

use crate::engine::draft::{DraftPolicy, DraftStats};
use crate::error::CoreError;
use serde::{Deserialize, Serialize};

/// An earlier turn of a conversation: what the user said and the SQL the assistant answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub question: String,
    pub answer: String,
}

/// How many answers to decode for one request, and how the ones after the first are drawn.
///
/// The first candidate is always the greedy answer (what a request with one candidate gets). The others are
/// sampled from the model's distribution — the `top_k` most likely tokens, at `temperature` — with a generator
/// seeded from the prompt and `seed`, so the same request gives the same candidates every time. All candidates
/// continue the same prompt state and are decoded together, one pass over the weights per step.
///
/// `draft` is speculative decoding by prompt lookup ([`crate::engine::draft`]): it changes how many passes the
/// answer takes, never the answer.
///
/// `skip_greedy` leaves the greedy answer out: only the sampled candidates 1 … `candidates - 1` are decoded — the
/// same ones a request with the greedy answer gets — for asking for more candidates after the greedy answer,
/// decoded alone, was not good enough. It needs `candidates` ≥ 2.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub candidates: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub seed: u64,
    #[serde(default)]
    pub draft: DraftPolicy,
    #[serde(default)]
    pub skip_greedy: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            candidates: 1,
            temperature: 0.7,
            top_k: 40,
            seed: 0,
            draft: DraftPolicy::default(),
            skip_greedy: false,
        }
    }
}

impl Sampling {
    /// The candidates' indexes a request decodes (0 is the greedy one).
    pub fn rows(&self) -> std::ops::Range<usize> {
        usize::from(self.skip_greedy)..self.candidates.max(1)
    }
}

/// One question to answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The rendered schema context ([`crate::sql::schema::Catalog::render`]).
    pub schema_context: String,
    /// Earlier turns of the same conversation, oldest first (a follow-up question, or a repair: the answer that
    /// failed and, as the question, what was wrong with it).
    #[serde(default)]
    pub history: Vec<Exchange>,
    pub question: String,
    pub max_new_tokens: usize,
    #[serde(default)]
    pub sampling: Sampling,
    /// Also ask the model whether the schema can answer the question at all ([`Generation::p_unanswerable`]).
    #[serde(default)]
    pub judge: bool,
    /// With `judge`: the question against the schema's words and tables. An engine with a sentence encoder skips
    /// the judge when the question is close in meaning to a table ([`Generation::closeness`]); without one, or
    /// without this, `judge` is asked as it is.
    #[serde(default)]
    pub grounding: Option<Box<crate::sql::suggest::Grounding>>,
    /// An answer in words, not SQL (`copilot.explain(…, narrative => true)`): the assistant's turn is not opened
    /// with a SQL block, and decoding stops only at the end of the turn or `max_new_tokens`.
    #[serde(default)]
    pub prose: bool,
    /// Only score the `grounding`'s tables by meaning against its question ([`Generation::table_closeness`]), for
    /// choosing the tables of a large schema; nothing is generated. An engine without a sentence encoder answers
    /// with no scores.
    #[serde(default)]
    pub rank_tables: bool,
}

/// How an engine's status text says its sentence encoder loaded (after the encoder's path): questions are grounded,
/// and a large schema's tables chosen, by meaning too. For people; programs read `serve::Loaded::ranks_tables`.
pub const BY_MEANING: &str = "(grounding by meaning)";

impl GenerateRequest {
    /// The judge is not asked: the request's question came `closeness` (cosine) to a table, at least its
    /// grounding's `min_similarity`. The one rule every backend that grounds by meaning applies.
    pub fn close_to_a_table(&self, closeness: Option<f32>) -> bool {
        closeness.zip(self.grounding.as_ref()).is_some_and(|(c, g)| c >= g.min_similarity)
    }
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The model's end-of-turn / end-of-text token.
    Eos,
    /// A `;` ended the statement.
    StatementEnd,
    /// The code fence closed.
    Fence,
    /// `max_new_tokens` reached.
    Length,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::StatementEnd => "statement_end",
            StopReason::Fence => "fence",
            StopReason::Length => "length",
        }
    }
}

/// A sampled answer (see [`Sampling`]): what the model wrote and the SQL in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub text: String,
    pub sql: Option<String>,
    pub generated_tokens: usize,
    /// The lowest probability the model gave any token of this answer (its least sure step, at temperature 1),
    /// `None` where the backend cannot say (a remote engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
}

/// What a backend produced for one request: the greedy answer, and the sampled candidates when more than one was
/// asked for. (With [`Sampling::skip_greedy`] the first answer is the first sampled one.)
#[derive(Debug, Clone)]
pub struct Generation {
    /// What the model wrote, after the assistant primer.
    pub text: String,
    /// The first SQL statement in it, if any.
    pub sql: Option<String>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub stop: StopReason,
    /// Leading prompt tokens that form the schema prefix (prefilled separately; 0 = no split).
    pub prefix_tokens: usize,
    /// True when the prefix's state came from the prefix cache instead of being computed.
    pub prefix_cache_hit: bool,
    /// The first answer's [`Candidate::min_p`].
    pub min_p: Option<f32>,
    /// The sampled candidates after the greedy one (empty with one candidate).
    pub samples: Vec<Candidate>,
    /// Rows decoded in all (every candidate's tokens), for throughput accounting.
    pub decoded_rows: usize,
    /// Of [`Generation::decoded_rows`], the tokens a candidate got from a twin's row in the same pass (the same
    /// tokens so far and next: computed once, see [`crate::engine::runtime::Runtime::advance`]).
    pub twin_rows: usize,
    /// With `judge`: the model's probability that the question cannot be answered from the schema.
    pub p_unanswerable: Option<f32>,
    /// With `grounding` and a sentence encoder: the cosine between the question and its closest table.
    pub closeness: Option<f32>,
    /// Speculative decoding's proposals and how many were kept, over every candidate.
    pub draft: DraftStats,
    /// With `rank_tables`: each of the grounding's tables' cosine to its question, in its order (empty without a
    /// sentence encoder); `None` for a request that generates.
    pub table_closeness: Option<Vec<f32>>,
}

/// What crosses from the engine to the extension for one request: every candidate (the greedy one first) and the
/// judge's verdict when it was asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub p_unanswerable: Option<f32>,
    /// [`Generation::closeness`].
    #[serde(default)]
    pub closeness: Option<f32>,
    /// [`Generation::table_closeness`].
    #[serde(default)]
    pub table_closeness: Option<Vec<f32>>,
}

impl Generation {
    /// Every candidate, the greedy answer first.
    pub fn candidates(&self) -> Vec<Candidate> {
        let greedy = Candidate {
            text: self.text.clone(),
            sql: self.sql.clone(),
            generated_tokens: self.generated_tokens,
            min_p: self.min_p,
        };
        std::iter::once(greedy).chain(self.samples.iter().cloned()).collect()
    }

    /// What crosses to the extension: the candidates and the judge's verdict (a ranking of tables: only its scores).
    pub fn answer(&self) -> Answer {
        Answer {
            candidates: if self.table_closeness.is_some() { Vec::new() } else { self.candidates() },
            p_unanswerable: self.p_unanswerable,
            closeness: self.closeness,
            table_closeness: self.table_closeness.clone(),
        }
    }

    /// The answer to a `rank_tables` request: the tables' scores, nothing generated.
    pub fn ranked(table_closeness: Vec<f32>) -> Generation {
        Generation {
            text: String::new(),
            sql: None,
            prompt_tokens: 0,
            generated_tokens: 0,
            prefill_s: 0.0,
            decode_s: 0.0,
            stop: StopReason::Eos,
            prefix_tokens: 0,
            prefix_cache_hit: false,
            min_p: None,
            samples: Vec::new(),
            decoded_rows: 0,
            twin_rows: 0,
            p_unanswerable: None,
            closeness: None,
            draft: DraftStats::default(),
            table_closeness: Some(table_closeness),
        }
    }

    /// Decode speed in tokens per second (the first token comes from prefill and is not counted).
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_s > 0.0 && self.generated_tokens > 1 {
            (self.generated_tokens - 1) as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// A text-to-SQL generator. `cancel` is polled between tokens; when it returns true the backend stops and
/// returns [`CoreError::Cancelled`].
pub trait Backend: Send {
    fn generate(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<Generation, CoreError>;
}

/// Options for loading.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Cap on prompt + generated tokens, below the model's own context length (0 = the model's).
    pub max_context: usize,
    /// Bound on the schema-prefix KV cache, in bytes (0 = no cache).
    pub prefix_cache_bytes: usize,
    /// Memory the process may use, in bytes (0 = no limit): a model that would need more is refused before any
    /// tensor is read, with how much it needs, rather than failing halfway or inviting the OOM killer.
    pub memory_limit_bytes: u64,
    /// A sentence encoder ([`crate::engine::embed::Embedder::load`]'s spec) for grounding questions by meaning;
    /// `None` = by spelling only.
    pub embedder: Option<String>,
    /// Where the job loop appends its trace ([`crate::engine::serve::Trace`]; `copilot-engine` takes it from
    /// `COPILOT_ENGINE_TRACE`); `None` = no trace.
    pub trace: Option<std::path::PathBuf>,
}

/// The schema-prefix KV cache's counters (see `prefix_cache`), for `copilot.status()` and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub limit_bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}
