//! The engine: a quantized GGUF model run on the CPU.
//!
//! - [`model`]: our transformer forward pass (configuration, weights, prompt pass, decoding step) with a
//!   caller-owned KV state;
//! - [`kernels`], [`decode`]: the decoding step's weight products (AVX2 over the GGUF blocks) and its per-token
//!   arithmetic on plain vectors;
//! - [`amx`]: weight products of many rows on Intel AMX tiles (prompts; decoding passes with `COPILOT_AMX=all`);
//! - [`rows16`]: Q4_K weights interleaved 16 rows at a time and the decode kernels over them (AVX-512 VNNI);
//! - [`prompt_kernels`]: a prompt's weight products (AVX-512 VNNI over the same blocks; no second copy of them);
//! - [`runtime`]: load, tokenize, prefill, greedy decoding with SQL stop rules;
//! - [`prefix_cache`]: the schema-prefix KV cache (LRU bounded by bytes, keyed by model and prefix tokens);
//! - [`tokenizer`]: the tokenizer built from the GGUF's metadata;
//! - [`embed`]: a BERT-family sentence encoder (all-MiniLM-L6-v2) for telling whether a question speaks of the
//!   schema by meaning, not only by its words;
//! - [`source`]: model references (`/path/model.gguf`, `hf:<repo>/<file>`) resolved to local files;
//! - [`draft`]: speculative decoding's drafts, by prompt lookup (verified by the multi-row pass);
//! - [`sample`]: greedy and seeded top-k choice of the next token;
//! - `remote` (feature `remote`): an OpenAI-compatible inference server instead of a local model;
//! - [`scripted`]: answers from a JSON file instead of a model, for testing what surrounds the model;
//! - [`serve`]: the engine as a service (jobs in, events out) and the framing of its process boundary;
//! - [`backend`]: the generation trait the extension's worker and the trainer's evaluator call;
//! - [`alloc`]: the process-wide allocator policy the model's working memory needs;
//! - [`host`]: the machine a measurement ran on (CPU, cores, memory, load, time), for every report.
//!
//! Everything that runs a model locally (model, kernels, decode, runtime, prefix_cache, tokenizer, alloc) is behind
//! the `model` feature (candle); without it the engine room is the service, its wire format and the backends that
//! need no weights (scripted, remote).

#[cfg(feature = "model")]
pub mod alloc;
#[cfg(feature = "model")]
pub mod amx;
#[cfg(feature = "model")]
mod amx16;
pub mod backend;
#[cfg(feature = "model")]
pub mod decode;
pub mod draft;
#[cfg(feature = "model")]
pub mod embed;
pub use copilot_fastmath as fastmath;
pub mod host;
#[cfg(feature = "model")]
pub mod kernels;
#[cfg(feature = "model")]
pub mod model;
#[cfg(feature = "model")]
pub mod prefix_cache;
#[cfg(feature = "model")]
pub mod prompt_kernels;
#[cfg(feature = "model")]
pub mod q4_1;
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(feature = "model")]
pub mod rows16;
#[cfg(feature = "model")]
pub mod runtime;
pub mod sample;
pub mod scripted;
pub mod serve;
pub mod source;
#[cfg(feature = "model")]
pub mod tokenizer;
