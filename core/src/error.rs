//! Errors of the core crate. Each variant says what went wrong in words a user can act on, without naming any
//! setting of the programs built on core (the extension adds its own hints when it maps them to SQLSTATEs).

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
    #[error("prompt is {tokens} tokens, more than the {limit} this model allows")]
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
    /// A remote inference server could not answer (see [`RemoteFailure`]).
    #[error("remote engine: {message}")]
    Remote { failure: RemoteFailure, message: String },
}

/// How a remote inference server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoteFailure {
    /// No connection (refused, DNS, TLS).
    Unreachable,
    /// It answered 4xx: the request, the key or the model name is wrong (not retried).
    Rejected,
    /// It answered 5xx (retried, then given up).
    ServerError,
    /// Its answer is not the OpenAI-compatible JSON expected.
    Malformed,
    /// It did not answer within the time allowed.
    Timeout,
}

/// The kind of a [`CoreError`] without its text: what crosses a process or shared-memory boundary beside the
/// message, so the far side can choose its response (a SQLSTATE, say) without parsing words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorKind {
    Model = 1,
    Tokenizer = 2,
    Template = 3,
    PromptTooLong = 4,
    Inference = 5,
    Cancelled = 6,
    Source = 7,
    RemoteUnreachable = 8,
    RemoteRejected = 9,
    RemoteServerError = 10,
    RemoteMalformed = 11,
    RemoteTimeout = 12,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Model,
        ErrorKind::Tokenizer,
        ErrorKind::Template,
        ErrorKind::PromptTooLong,
        ErrorKind::Inference,
        ErrorKind::Cancelled,
        ErrorKind::Source,
        ErrorKind::RemoteUnreachable,
        ErrorKind::RemoteRejected,
        ErrorKind::RemoteServerError,
        ErrorKind::RemoteMalformed,
        ErrorKind::RemoteTimeout,
    ];
}

impl TryFrom<u32> for ErrorKind {
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        ErrorKind::ALL.into_iter().find(|k| *k as u32 == v).ok_or(v)
    }
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::Model(_) => ErrorKind::Model,
            CoreError::Tokenizer(_) => ErrorKind::Tokenizer,
            CoreError::Template(_) => ErrorKind::Template,
            CoreError::PromptTooLong { .. } => ErrorKind::PromptTooLong,
            CoreError::Inference(_) => ErrorKind::Inference,
            CoreError::Cancelled => ErrorKind::Cancelled,
            CoreError::Source(_) => ErrorKind::Source,
            CoreError::Remote { failure, .. } => match failure {
                RemoteFailure::Unreachable => ErrorKind::RemoteUnreachable,
                RemoteFailure::Rejected => ErrorKind::RemoteRejected,
                RemoteFailure::ServerError => ErrorKind::RemoteServerError,
                RemoteFailure::Malformed => ErrorKind::RemoteMalformed,
                RemoteFailure::Timeout => ErrorKind::RemoteTimeout,
            },
        }
    }
}

#[cfg(feature = "model")]
impl From<candle_core::Error> for CoreError {
    fn from(e: candle_core::Error) -> Self {
        CoreError::Inference(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_number() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::try_from(k as u32), Ok(k));
        }
        assert_eq!(ErrorKind::try_from(0), Err(0));
        assert_eq!(ErrorKind::try_from(99), Err(99));
    }
}
