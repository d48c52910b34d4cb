//! copilot-core: everything in copilot that does not need PostgreSQL.
//!
//! - [`schema`]: the schema model and its one-line `CREATE TABLE` rendering (the model's context);
//! - [`prompt`]: chat-template prompts, laid out schema first, question last;
//! - [`extract`]: one SQL statement out of what a model wrote;
//! - [`gate`]: what model SQL must pass before it runs (one read-only query, no denied functions, known names);
//! - [`model`]: our transformer forward pass over candle ops, with a caller-owned KV state;
//! - [`prefix_cache`]: the schema-prefix KV cache (LRU bounded by bytes, keyed by model and prefix tokens);
//! - [`runtime`]: candle quantized GGUF models (qwen2, llama/mistral) with greedy decoding and stop rules;
//! - [`lora`], [`peft`], [`finetune`]: LoRA adapters over the frozen quantized base, their PEFT files, and the
//!   differentiable forward pass the trainer fine-tunes them with;
//! - [`backend`]: the generation trait the extension's worker and the trainer's evaluator call;
//! - [`source`]: model references (`/path/model.gguf`, `hf:<repo>/<file>`) resolved to local files.

pub mod backend;
pub mod decode;
pub mod error;
pub mod extract;
pub mod finetune;
pub mod gate;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod peft;
pub mod prefix_cache;
pub mod prompt;
pub mod runtime;
pub mod schema;
pub mod source;
pub mod tokenizer;

pub use backend::{Backend, GenerateRequest, Generation, StopReason};
pub use error::CoreError;
