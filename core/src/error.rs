//! Errors of the core crate. Each variant says what went wrong in words a user can act on; the extension maps
//! them to SQLSTATEs at its boundary.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    /// The model file is missing, unreadable, or not a GGUF we can run.
    #[error("model: {0}")]
    Model(String),
    /// The tokenizer could not be built or failed on the input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// The prompt does not fit in the model's context window.
    #[error("prompt is {tokens} tokens, more than the {limit} this model allows (narrow copilot.schemas or use a model with a longer context)")]
    PromptTooLong { tokens: usize, limit: usize },
    /// Inference failed inside candle.
    #[error("inference: {0}")]
    Inference(String),
    /// The caller withdrew the request (cancel, timeout, shutdown).
    #[error("generation cancelled")]
    Cancelled,
    /// A model reference could not be resolved to a local file.
    #[error("model source: {0}")]
    Source(String),
}

impl From<candle_core::Error> for CoreError {
    fn from(e: candle_core::Error) -> Self {
        CoreError::Inference(e.to_string())
    }
}
