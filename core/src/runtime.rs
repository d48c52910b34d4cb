//! The model runtime: a quantized GGUF model run by candle on the CPU, with greedy decoding and SQL stop rules.
//!
//! Supported families: `qwen2` (Qwen2 / Qwen2.5, Qwen2.5-Coder) and `llama` (Llama, Mistral, SmolLM). The GGUF is
//! read once; weights stay quantized in memory. Decoding is greedy (argmax) and stops at the first of: an
//! end-of-turn token, a `;` that ends the statement, a closing code fence, or `max_new_tokens`.
//!
//! The prompt is prefilled in chunks of [`PREFILL_CHUNK`] tokens. Between chunks and between generated tokens the
//! `cancel` callback is polled, so an abandoned request stops within one chunk. Chunked prefill at a non-zero
//! position is also what a schema-prefix KV cache needs: the same call continues from a cached prefix.

use crate::backend::{Backend, GenerateRequest, Generation, StopReason};
use crate::error::CoreError;
use crate::extract::{extract_sql, statement_end};
use crate::prompt::{build_prompt, ChatTemplate, Prompt, ASSISTANT_PRIMER};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, D};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Tokens per prefill step: bounds the attention scratch memory and the latency of a cancel.
pub const PREFILL_CHUNK: usize = 256;

/// Set the number of CPU threads candle uses. It takes effect only before candle's first operation in this process
/// (its thread pools are created once), so call it first thing on the inference thread.
pub fn configure_threads(threads: usize) {
    if threads > 0 {
        // Read by candle's pool builders (CANDLE_NUM_THREADS for its barrier pool, RAYON_NUM_THREADS for rayon).
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

enum Weights {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward(x, pos),
            Weights::Llama(m) => m.forward(x, pos),
        }
    }
}

/// What is known about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// `general.architecture`.
    pub arch: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    pub context_length: usize,
    pub file_bytes: u64,
    pub load_s: f64,
    pub vocab_size: usize,
}

/// Options for loading.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Cap on prompt + generated tokens, below the model's own context length (0 = the model's).
    pub max_context: usize,
}

/// A loaded model with its tokenizer and chat template.
pub struct Runtime {
    weights: Weights,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_ids: Vec<u32>,
    info: ModelInfo,
    max_context: usize,
    device: Device,
}

fn md_str(ct: &gguf_file::Content, key: &str) -> Option<String> {
    ct.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// What a model file says about text, without its weights: the tokenizer, the chat template and the stop tokens.
/// `data prepare` uses it to render and count training rows exactly as the runtime will see them.
pub struct TextSide {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub stop_ids: Vec<u32>,
}

impl TextSide {
    /// Read only the GGUF header (metadata), not the tensors.
    pub fn load(path: &Path) -> Result<TextSide, CoreError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| CoreError::Model(format!("cannot open {}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| CoreError::Model(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        TextSide::from_content(path, &ct)
    }

    fn from_content(path: &Path, ct: &gguf_file::Content) -> Result<TextSide, CoreError> {
        let tokenizer = crate::tokenizer::load(path, ct)?;
        let token_text = |id: Option<u32>| -> String { id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default() };
        let bos = token_text(md_u32(ct, "tokenizer.ggml.bos_token_id"));
        let eos_id = md_u32(ct, "tokenizer.ggml.eos_token_id");
        let eos = token_text(eos_id);
        let template = ChatTemplate::new(md_str(ct, "tokenizer.chat_template"), &bos, &eos);
        let mut stop_ids: Vec<u32> = Vec::new();
        stop_ids.extend(eos_id);
        stop_ids.extend(md_u32(ct, "tokenizer.ggml.eot_token_id"));
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<|end_of_text|>"] {
            stop_ids.extend(tokenizer.token_to_id(t));
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(TextSide { tokenizer, template, stop_ids })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CoreError> {
        self.tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| CoreError::Tokenizer(e.to_string()))
    }
}

impl Runtime {
    /// Load a GGUF model file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Runtime, CoreError> {
        let t0 = Instant::now();
        let mut file = std::fs::File::open(path)
            .map_err(|e| CoreError::Model(format!("cannot open {}: {e}", path.display())))?;
        let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| CoreError::Model(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        let arch = md_str(&ct, "general.architecture")
            .ok_or_else(|| CoreError::Model("the GGUF has no general.architecture".into()))?;
        let name = md_str(&ct, "general.name");
        let context_length = md_u32(&ct, &format!("{arch}.context_length")).unwrap_or(4096) as usize;
        let text = TextSide::from_content(path, &ct)?;
        let TextSide { tokenizer, template, stop_ids } = text;

        let device = Device::Cpu;
        let weights = match arch.as_str() {
            "qwen2" => Weights::Qwen2(
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut file, &device)
                    .map_err(|e| CoreError::Model(format!("cannot load qwen2 weights: {e}")))?,
            ),
            "llama" | "mistral" => Weights::Llama(
                quantized_llama::ModelWeights::from_gguf(ct, &mut file, &device)
                    .map_err(|e| CoreError::Model(format!("cannot load llama weights: {e}")))?,
            ),
            other => {
                return Err(CoreError::Model(format!(
                    "architecture \"{other}\" is not supported (supported: qwen2, llama, mistral)"
                )))
            }
        };
        let vocab_size = tokenizer.get_vocab_size(true);
        let max_context = match opts.max_context {
            0 => context_length,
            n => n.min(context_length),
        };
        let info = ModelInfo {
            path: path.to_path_buf(),
            arch,
            name,
            context_length,
            file_bytes,
            load_s: t0.elapsed().as_secs_f64(),
            vocab_size,
        };
        Ok(Runtime { weights, tokenizer, template, stop_ids, info, max_context, device })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encode text that may contain the template's special-token markers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CoreError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| CoreError::Tokenizer(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, CoreError> {
        self.tokenizer.decode(ids, true).map_err(|e| CoreError::Tokenizer(e.to_string()))
    }

    /// Render the prompt for a request with this model's chat template.
    pub fn prompt(&self, req: &GenerateRequest) -> Result<Prompt, CoreError> {
        build_prompt(&self.template, &req.schema_context, &req.question)
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, CoreError> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, pos)?;
        Ok(logits.squeeze(0)?)
    }

    /// Greedy decoding from prompt tokens. See the module documentation for the stop rules.
    pub fn generate_tokens(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Generation, CoreError> {
        if prompt.is_empty() {
            return Err(CoreError::Inference("empty prompt".into()));
        }
        if prompt.len() + max_new_tokens > self.max_context {
            return Err(CoreError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.max_context.saturating_sub(max_new_tokens),
            });
        }
        let t0 = Instant::now();
        let mut logits = None;
        for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            if cancel() {
                return Err(CoreError::Cancelled);
            }
            logits = Some(self.forward(chunk, i * PREFILL_CHUNK)?);
        }
        let mut logits = logits.expect("prompt is not empty");
        let prefill_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut ids: Vec<u32> = Vec::with_capacity(max_new_tokens);
        let mut text = String::new();
        let mut stop = StopReason::Length;
        for step in 0..max_new_tokens {
            if cancel() {
                return Err(CoreError::Cancelled);
            }
            let next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if self.stop_ids.contains(&next) {
                stop = StopReason::Eos;
                break;
            }
            ids.push(next);
            text = self.decode(&ids)?;
            if let Some(p) = text.find("```") {
                text.truncate(p);
                stop = StopReason::Fence;
                break;
            }
            if let Some(end) = statement_end(&text) {
                text.truncate(end + 1);
                stop = StopReason::StatementEnd;
                break;
            }
            if step + 1 < max_new_tokens {
                logits = self.forward(&[next], prompt.len() + step)?;
            }
        }
        let decode_s = t1.elapsed().as_secs_f64();
        let sql = extract_sql(&format!("{ASSISTANT_PRIMER}{text}"));
        Ok(Generation {
            text,
            sql,
            prompt_tokens: prompt.len(),
            generated_tokens: ids.len() + usize::from(stop == StopReason::Eos),
            prefill_s,
            decode_s,
            stop,
        })
    }
}

impl Backend for Runtime {
    fn generate(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<Generation, CoreError> {
        let prompt = self.prompt(req)?;
        let tokens = self.encode(&prompt.text())?;
        self.generate_tokens(&tokens, req.max_new_tokens, cancel)
    }
}
