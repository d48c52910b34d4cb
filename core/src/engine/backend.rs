//! The generation backend: what the extension's worker and the trainer's evaluator call.
//!
//! A backend turns (schema context, question) into model output and the SQL extracted from it. The candle runtime
//! ([`crate::engine::runtime::Runtime`]) is the one we ship; the trait keeps room for another engine behind the same calls.

use crate::error::CoreError;

/// One question to answer.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The rendered schema context ([`crate::sql::schema::Catalog::render`]).
    pub schema_context: String,
    pub question: String,
    pub max_new_tokens: usize,
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What a backend produced for one request.
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
}

impl Generation {
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
