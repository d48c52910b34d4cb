//! copilot-core: everything in copilot that does not need PostgreSQL, in three rooms.
//!
//! - [`sql`]: SQL text — the schema model and its one-line `CREATE TABLE` rendering, chat-template prompts,
//!   extraction of one statement from what a model wrote, and the gate model SQL must pass before it runs;
//! - [`engine`]: the model — our transformer forward pass and decode kernels over candle, the runtime with its
//!   stop rules and schema-prefix KV cache, the tokenizer, model sources (`/path/model.gguf`, `hf:<repo>/<file>`)
//!   and the [`engine::backend::Backend`] trait the extension's worker and the trainer's evaluator call;
//! - [`tune`] (feature `train`): LoRA adapters over the frozen quantized base, their PEFT files, and the
//!   differentiable forward pass the trainer fine-tunes them with.
//!
//! The PostgreSQL extension builds without `train` and without `hub` (no training code, no HTTP client).

pub mod engine;
pub mod error;
pub mod sql;
#[cfg(feature = "train")]
pub mod tune;

pub use engine::backend::{Backend, GenerateRequest, Generation, StopReason};
pub use error::CoreError;
