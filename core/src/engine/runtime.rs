//! The model runtime: a quantized GGUF model run by candle on the CPU, with greedy decoding and SQL stop rules.
//!
//! Supported families: `qwen2` (Qwen2 / Qwen2.5, Qwen2.5-Coder) and `llama` (Llama, Mistral, SmolLM). The GGUF is
//! read once; weights stay quantized in memory. Decoding is greedy (argmax) and stops at the first of: an
//! end-of-turn token, a `;` that ends the statement, a closing code fence, or `max_new_tokens`.
//!
//! The prompt is prefilled in chunks of [`PREFILL_CHUNK`] tokens. Between chunks and between generated tokens the
//! `cancel` callback is polled, so an abandoned request stops within one chunk.
//!
//! **Schema-prefix cache.** A prompt is prefilled in two parts: its schema prefix (system text + schema context,
//! see [`crate::sql::prompt`]) and then the question's tokens. The state after the prefix is kept in a
//! [`PrefixCache`]; the next question over the same prefix starts from it. The split is the same whether the cache
//! is on, off, hit or missed, so the computation — and the generated SQL, token for token — does not depend on the
//! cache (a test checks it).

use crate::engine::backend::{Backend, Candidate, GenerateRequest, Generation, Sampling, StopReason};
use crate::engine::draft::{DraftPolicy, DraftStats, Drafter, History, Source};
use crate::engine::model::{Config, KvCache, Rows, Transformer};
use crate::engine::prefix_cache::{prefix_key, shared_prefix_len, CacheStats, PrefixCache};
use crate::engine::sample::{argmax, prompt_seed, sample_top_k, token_prob, Rng};
use crate::error::CoreError;
use crate::sql::extract::{extract_sql, statement_end};
use crate::sql::prompt::{build_conversation, build_judge_with, ChatTemplate, Prompt, ASSISTANT_PRIMER, JUDGE_TEXT};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Tokens per prefill step: bounds the attention scratch memory and the latency of a cancel.
pub const PREFILL_CHUNK: usize = 256;

/// Set the number of CPU threads candle uses (its barrier pool reads `CANDLE_NUM_THREADS`, rayon
/// `RAYON_NUM_THREADS`, when they are first built).
///
/// # Safety
/// This writes the process environment. Call it while the process has a single thread — before spawning any
/// thread, in particular the one that will run the model — so that nothing reads the environment meanwhile
/// (glibc's `setenv` is not thread-safe; Rust 2024 makes `set_var` unsafe for that reason).
pub unsafe fn configure_threads(threads: usize) {
    if threads > 0 {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Prompts read lately whose state is kept ([`Runtime::begin_with_prefix`]): a request for the same prompt soon
/// after — copilot's pipeline asks for the sampled candidates right after a greedy answer it was unsure of, and
/// with several sessions other prompts come in between — starts from that state instead of reading the question
/// again (once: the entry is then dropped).
const RECENT_PROMPTS: usize = 8;

/// A prompt's tokens after its cached schema prefix beyond which its state is not kept: what such an entry holds
/// apart from the prefix cache's own entry (whose tensors it shares) stays small.
const RECENT_OWN_TOKENS: usize = 512;

/// The state after a whole prompt: its K/V (the schema prefix's segments shared with the prefix cache's entry)
/// and the logits after its last token — exactly what reading the prompt again would compute.
struct RecentPrompt {
    prompt: Vec<u32>,
    prefix_len: usize,
    prefix_key: crate::engine::prefix_cache::PrefixKey,
    kv: KvCache,
    logits: Vec<f32>,
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
    /// What the prefix cache keys on besides the tokens: path, size and modification time of the file.
    pub identity: String,
}

pub use crate::engine::backend::LoadOptions;

/// What loading a model file of `file_bytes` needs: the weights as read, candle's tiled copy of the layer weights
/// for prompts (about as large again), and working memory.
pub fn memory_needed(file_bytes: u64) -> u64 {
    2 * file_bytes + (256 << 20)
}

/// A loaded model with its tokenizer and chat template.
pub struct Runtime {
    model: Transformer,
    prefix_cache: PrefixCache,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_ids: Vec<u32>,
    info: ModelInfo,
    max_context: usize,
    /// What drafts pay on this machine, learned from the passes run (see [`Drafter`]).
    drafter: Drafter,
    /// Candidate rows of one job that are twins (the same tokens so far and the same tokens to feed) run once a
    /// pass (see [`Runtime::advance`]). On by default since the full test suite passed with it (measured:
    /// reports/twins.md, decode 1.14× with 4 candidates; context.md, 2026-12-05): the tokens are the same either
    /// way (tested).
    share_twins: bool,
    /// The sentence encoder that grounds questions by meaning ([`LoadOptions::embedder`]), if it loaded.
    embedder: Option<crate::engine::embed::Embedder>,
    /// The last prompts read, most recent first (see [`RECENT_PROMPTS`]); kept only beside the prefix cache's
    /// entry for their schema prefix, and dropped with it.
    recent: VecDeque<RecentPrompt>,
    /// What became of [`LoadOptions::embedder`], for the engine's log and status.
    embedder_status: String,
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
        let mut file =
            std::fs::File::open(path).map_err(|e| CoreError::Model(format!("cannot open {}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| CoreError::Model(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        TextSide::from_content(path, &ct)
    }

    fn from_content(path: &Path, ct: &gguf_file::Content) -> Result<TextSide, CoreError> {
        let tokenizer = crate::engine::tokenizer::load(path, ct)?;
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
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| CoreError::Tokenizer(e.to_string()))
    }
}

impl Runtime {
    /// Load a GGUF model file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Runtime, CoreError> {
        let t0 = Instant::now();
        let mut file =
            std::fs::File::open(path).map_err(|e| CoreError::Model(format!("cannot open {}: {e}", path.display())))?;
        let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        if opts.memory_limit_bytes > 0 && memory_needed(file_bytes) > opts.memory_limit_bytes {
            return Err(CoreError::Model(format!(
                "{} needs about {} MB of memory, more than the engine's limit of {} MB",
                path.display(),
                memory_needed(file_bytes) >> 20,
                opts.memory_limit_bytes >> 20
            )));
        }
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| CoreError::Model(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        // Architecture, shapes and context length, or why this model cannot run, before any tensor is read.
        let cfg = Config::from_gguf(&ct).map_err(|e| CoreError::Model(e.to_string()))?;
        let name = md_str(&ct, "general.name");
        let text = TextSide::from_content(path, &ct)?;
        let TextSide { tokenizer, template, stop_ids } = text;
        let (arch, context_length) = (cfg.arch.clone(), cfg.context_length);
        let model = Transformer::from_gguf(cfg, &ct, &mut file, &Device::Cpu, opts.max_context)
            .map_err(|e| CoreError::Model(format!("cannot load {arch} weights: {e}")))?;
        // Done here rather than by the first question (see `Transformer::prepare`); part of the load time.
        model
            .prepare(candle_core::utils::get_num_threads())
            .map_err(|e| CoreError::Model(format!("cannot prepare {arch} weights: {e}")))?;
        // The cap on prompt + answer is the positions the model was built for: `opts.max_context`, at most its own.
        let max_context = model.max_positions();
        let vocab_size = tokenizer.get_vocab_size(true);
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let identity = format!("{}|{file_bytes}|{mtime}", path.display());
        let info = ModelInfo {
            path: path.to_path_buf(),
            arch,
            name,
            context_length,
            file_bytes,
            load_s: t0.elapsed().as_secs_f64(),
            vocab_size,
            identity,
        };
        let prefix_cache = PrefixCache::new(opts.prefix_cache_bytes);
        // The encoder is an aid, not a requirement: without it questions are grounded by spelling, as before.
        let (embedder, embedder_status) = match opts.embedder.as_deref().filter(|s| !s.trim().is_empty()) {
            None => (None, "none (grounding by spelling only)".to_string()),
            // Under a memory limit, an encoder that would not fit beside the model is left out (an allocation
            // failure would abort the engine, and the worker would restart it into the same failure).
            Some(spec)
                if opts.memory_limit_bytes > 0
                    && memory_needed(file_bytes)
                        + 2 * crate::engine::embed::Embedder::weights_bytes(spec).unwrap_or(0)
                        > opts.memory_limit_bytes =>
            {
                (None, format!("{spec} left out: with the model it needs more than the engine's memory limit of {} MB; grounding by spelling only", opts.memory_limit_bytes >> 20))
            }
            Some(spec) => match crate::engine::embed::Embedder::load(spec) {
                Ok(e) => (Some(e), format!("{spec} {}", crate::engine::backend::BY_MEANING)),
                Err(e) => (None, format!("{spec} could not be loaded ({e}); grounding by spelling only")),
            },
        };
        Ok(Runtime {
            model,
            prefix_cache,
            tokenizer,
            template,
            stop_ids,
            info,
            max_context,
            drafter: Drafter::default(),
            share_twins: true,
            recent: VecDeque::new(),
            embedder,
            embedder_status,
        })
    }

    /// What became of the sentence encoder asked for at load ([`LoadOptions::embedder`]).
    pub fn embedder_status(&self) -> &str {
        &self.embedder_status
    }

    /// A sentence encoder loaded: [`Runtime::table_closeness`] gives scores.
    pub fn ranks_tables(&self) -> bool {
        self.embedder.is_some()
    }

    /// Each of `g`'s tables' cosine to its question, in its order, by the sentence encoder (empty without one).
    pub fn table_closeness(&mut self, g: &crate::sql::suggest::Grounding) -> Result<Vec<f32>, CoreError> {
        let Some(e) = self.embedder.as_mut() else { return Ok(Vec::new()) };
        let tables: Vec<&str> = g.tables.iter().map(String::as_str).collect();
        let q = e.embed(&[g.question.as_str()])?;
        let t = e.embed(&tables)?;
        Ok(t.iter().map(|v| crate::engine::embed::cosine(&q[0], v)).collect())
    }

    /// How close `g`'s question is to its closest table, by the sentence encoder (`None` without one).
    pub fn closeness(&mut self, g: &crate::sql::suggest::Grounding) -> Result<Option<f32>, CoreError> {
        if self.embedder.is_none() {
            return Ok(None);
        }
        let cosines = self.table_closeness(g)?;
        Ok(g.closeness(|_, _| cosines))
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

    /// Render the prompt for a request (its conversation so far, then its question) with this model's template.
    pub fn prompt(&self, req: &GenerateRequest) -> Result<Prompt, CoreError> {
        let mut p = build_conversation(&self.template, &req.schema_context, &req.history, &req.question)?;
        if req.prose {
            p.suffix.truncate(p.suffix.len() - ASSISTANT_PRIMER.len());
        }
        Ok(p)
    }

    /// The logits after `tokens` from an empty state (for tests and tools).
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, CoreError> {
        let mut kv = KvCache::new();
        Ok(self.prefill(tokens, &mut kv, &|| false)?.to_vec1::<f32>()?)
    }

    /// What a row beyond the first costs on this machine, as a share of a one-row pass (learned from the passes
    /// run; drafts are sized by it).
    pub fn draft_row_share(&self) -> f64 {
        self.drafter.row_share()
    }

    /// What the engine has decoded before, which drafts follow ([`crate::engine::draft::History`]); taken out,
    /// the engine starts from none.
    pub fn take_draft_history(&mut self) -> History {
        std::mem::take(&mut self.drafter.history)
    }

    /// Put back a history taken with [`Runtime::take_draft_history`] (benchmarks keep one per policy, so one
    /// policy's answers do not draft another's).
    pub fn set_draft_history(&mut self, history: History) {
        self.drafter.history = history;
    }

    pub fn prefix_cache_stats(&self) -> CacheStats {
        self.prefix_cache.stats()
    }

    /// Change the prefix cache's bound (0 turns it off and frees it).
    pub fn set_prefix_cache_bytes(&mut self, bytes: usize) {
        if bytes != self.prefix_cache.limit_bytes() {
            self.prefix_cache.set_limit(bytes);
            self.forget_recent();
        }
    }

    pub fn clear_prefix_cache(&mut self) {
        self.prefix_cache.clear();
        self.recent.clear();
    }

    /// Prompts kept in [`Runtime::recent`] (for tests and status).
    pub fn recent_prompts(&self) -> usize {
        self.recent.len()
    }

    /// Drop the recent prompts whose schema prefix the prefix cache no longer holds: what they keep alive is then
    /// only their own tokens' K/V and logits.
    fn forget_recent(&mut self) {
        let cache = &self.prefix_cache;
        self.recent.retain(|r| cache.contains(&r.prefix_key));
    }

    /// The state after `prompt` (split at `prefix_len`) if it was read lately: its K/V and logits. The entry is
    /// taken out: the pipeline asks for a prompt at most twice (the greedy answer, then the sampled ones), so its
    /// slot goes to prompts not asked again yet — with 8 sessions, 13 of 22 second asks found their prompt when
    /// hits kept their slot (reports/concurrency_intel.md, context.md 2026-12-07).
    fn recent_prompt(&mut self, prompt: &[u32], prefix_len: usize) -> Option<(KvCache, Vec<f32>)> {
        self.forget_recent();
        let at = self.recent.iter().position(|r| r.prefix_len == prefix_len && r.prompt == prompt)?;
        let r = self.recent.remove(at).expect("found just above");
        Some((r.kv, r.logits))
    }

    /// Keep the state after `prompt` for a request of the same prompt soon after, where its schema prefix is in
    /// the prefix cache and its own tokens are few.
    fn remember_prompt(&mut self, prompt: &[u32], prefix_len: usize, kv: &KvCache, logits: &[f32]) {
        if prefix_len == 0 || prompt.len() - prefix_len > RECENT_OWN_TOKENS {
            return;
        }
        let prefix_key = prefix_key(&self.info.identity, &prompt[..prefix_len]);
        if !self.prefix_cache.contains(&prefix_key) {
            return;
        }
        self.recent.retain(|r| !(r.prefix_len == prefix_len && r.prompt == prompt));
        self.recent.truncate(RECENT_PROMPTS - 1);
        self.recent.push_front(RecentPrompt {
            prompt: prompt.to_vec(),
            prefix_len,
            prefix_key,
            kv: kv.clone(),
            logits: logits.to_vec(),
        });
        self.forget_recent();
    }

    /// Prefill `tokens` after `cache`'s state, in chunks, polling `cancel` before each; logits of the last token.
    /// The chunks' K/V are stored as one segment (see [`KvCache::merge_segments_from`]).
    fn prefill(&self, tokens: &[u32], cache: &mut KvCache, cancel: &dyn Fn() -> bool) -> Result<Tensor, CoreError> {
        let first = cache.segment_count();
        let mut logits = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            if cancel() {
                return Err(CoreError::Cancelled);
            }
            logits = Some(self.model.forward(chunk, cache)?);
        }
        cache.merge_segments_from(first)?;
        logits.ok_or_else(|| CoreError::Inference("nothing to prefill".into()))
    }

    /// The state after `prompt[..prefix_len]`: from the prefix cache, or computed (and then kept).
    fn prefix_state(
        &mut self,
        prompt: &[u32],
        prefix_len: usize,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(KvCache, bool), CoreError> {
        if prefix_len == 0 {
            return Ok((KvCache::new(), false));
        }
        let head = &prompt[..prefix_len];
        let key = self.prefix_cache.enabled().then(|| prefix_key(&self.info.identity, head));
        if let Some(kv) = key.as_ref().and_then(|k| self.prefix_cache.get(k)) {
            return Ok((kv, true));
        }
        let mut kv = KvCache::new();
        self.prefill(head, &mut kv, cancel)?;
        if let Some(k) = key {
            self.prefix_cache.insert(k, kv.clone());
        }
        Ok((kv, false))
    }

    /// Greedy decoding from prompt tokens, with no prefix split. See the module documentation for the stop rules.
    pub fn generate_tokens(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Generation, CoreError> {
        self.generate_with_prefix(prompt, 0, max_new_tokens, &Sampling::default(), false, cancel)
    }

    /// Decoding where `prompt[..prefix_len]` is the schema prefix: its state comes from (or goes to) the prefix
    /// cache, and only the rest is prefilled. `sampling.candidates` answers continue that one prompt state: the
    /// first greedy, the others sampled, all decoded together (one pass over the weights per step for every
    /// candidate still going; see [`Transformer::step_many`]).
    pub fn generate_with_prefix(
        &mut self,
        prompt: &[u32],
        prefix_len: usize,
        max_new_tokens: usize,
        sampling: &Sampling,
        prose: bool,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Generation, CoreError> {
        let d = self.begin_with_prefix(prompt, prefix_len, max_new_tokens, sampling, prose, cancel)?;
        self.decode_alone(d, cancel)
    }

    /// Run one job's decoding to its end, alone: [`Runtime::advance`] with one job until it is done.
    fn decode_alone(&mut self, mut d: Decoding, cancel: &dyn Fn() -> bool) -> Result<Generation, CoreError> {
        while !d.is_done() {
            if cancel() {
                return Err(CoreError::Cancelled);
            }
            self.advance(&mut [&mut d])?;
        }
        self.finish(d)
    }

    /// Everything of [`Runtime::generate_with_prefix`] before the first decoding pass: the prefix state, the
    /// prefill of the rest, and the candidates' rows ready to decode.
    pub fn begin_with_prefix(
        &mut self,
        prompt: &[u32],
        prefix_len: usize,
        max_new_tokens: usize,
        sampling: &Sampling,
        prose: bool,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Decoding, CoreError> {
        if prompt.is_empty() {
            return Err(CoreError::Inference("empty prompt".into()));
        }
        if prompt.len() + max_new_tokens > self.max_context {
            return Err(CoreError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.max_context.saturating_sub(max_new_tokens),
            });
        }
        if sampling.rows().is_empty() {
            return Err(CoreError::Inference("skip_greedy needs at least two candidates".into()));
        }
        let prefix_len = prefix_len.min(prompt.len() - 1);
        let t0 = Instant::now();
        // A prompt read lately (the same tokens, the same split) starts from its state: the same K/V and logits
        // reading it again would compute.
        let (kv, logits, cache_hit, read) = match self.recent_prompt(prompt, prefix_len) {
            Some((kv, logits)) => (kv, logits, true, Read::Recent),
            None => {
                let (mut kv, cache_hit) = self.prefix_state(prompt, prefix_len, cancel)?;
                let logits = self.prefill(&prompt[prefix_len..], &mut kv, cancel)?.to_vec1::<f32>()?;
                self.remember_prompt(prompt, prefix_len, &kv, &logits);
                let read = if cache_hit { Read::AfterPrefix } else { Read::Whole };
                (kv, logits, cache_hit, read)
            }
        };
        let prefill_s = t0.elapsed().as_secs_f64();
        let seed = prompt_seed(prompt) ^ sampling.seed;
        // Drafts are verified by the multi-row pass, whose rows compute exactly what the one-token step does; the
        // candle path (our kernels off, or not on the CPU) has no such pass.
        let policy = if self.batchable() { sampling.draft } else { DraftPolicy::OFF };
        let rows: Vec<Row> = sampling
            .rows()
            .map(|i| Row {
                kv: kv.clone(),
                logits: logits.clone(),
                ahead: VecDeque::new(),
                draft: None,
                ids: Vec::new(),
                text: String::new(),
                stop: None,
                rng: (i > 0).then(|| Rng::new(seed, i as u64)),
                min_p: 1.0,
            })
            .collect();
        Ok(Decoding {
            rows,
            prompt: prompt.to_vec(),
            sampling: *sampling,
            stop: StopRules { max_new_tokens, prose },
            policy,
            stats: DraftStats::default(),
            next: Vec::new(),
            done: max_new_tokens == 0,
            prefix_len,
            cache_hit,
            read,
            prefill_s,
            decode_started: Instant::now(),
            p_unanswerable: None,
            closeness: None,
            twin_rows: 0,
        })
    }

    /// Whether twin candidate rows run once a pass (the default) or each its own row: the tokens are the same
    /// either way.
    pub fn set_share_twins(&mut self, on: bool) {
        self.share_twins = on;
    }

    /// Several sequences' rows may share a pass only where every row computes exactly what a pass of its own
    /// would: our kernels on the CPU ([`Transformer::step_many`]).
    fn batchable(&self) -> bool {
        self.model.own_kernels() && self.model.on_cpu()
    }

    /// One decoding step of every job in `jobs` that is not done: each chooses its rows' next tokens from the
    /// logits it has (and drafts), then all their rows go through one pass over the weights together. A job none
    /// of whose rows goes on is done (see [`Decoding::is_done`]) and takes no part in the pass.
    ///
    /// With one job this is exactly the loop a job alone has always run: the one-row, one-token case is the
    /// single-token pass, anything else one [`Transformer::step_many`] pass. With several, their rows share one
    /// pass; every row computes what it would alone, so each job's tokens do not depend on what else is decoded
    /// (tested). Where that does not hold (our kernels off), each job runs its own pass, one after the other.
    /// With [`Runtime::set_share_twins`], candidate rows of a job that are twins — the same tokens so far and the
    /// same tokens to feed, as sampled candidates are until they first draw differently — run once, and the twins
    /// take the row's logits and K/V positions ([`Generation::twin_rows`] counts those tokens).
    /// On an error in the pass every job's state is left as before it; the error is the pass's, for all of them.
    pub fn advance(&mut self, jobs: &mut [&mut Decoding]) -> Result<(), CoreError> {
        let mut drafter = std::mem::take(&mut self.drafter);
        let planned = self.plan_all(jobs, &mut drafter);
        let result = planned.and_then(|()| self.pass(jobs, &mut drafter));
        self.drafter = drafter;
        result
    }

    fn plan_all(&self, jobs: &mut [&mut Decoding], drafter: &mut Drafter) -> Result<(), CoreError> {
        let mut scratch = Vec::new();
        let going = jobs.iter().filter(|d| !d.done).count();
        for d in jobs.iter_mut().filter(|d| !d.done) {
            // A kept draft token saves a pass only where its row is the pass's only row: beside other rows (other
            // candidates, other jobs) the pass runs anyway and the token saves just that row's share of it, which
            // its row in this pass costs already. Measured (bench-speculative, 4 candidates, Zen 3): drafting there
            // made decoding 0.87× (history) and 0.97× (lookup) as fast.
            let alone = going == 1 && d.rows.iter().filter(|r| r.stop.is_none()).count() == 1;
            self.plan(d, drafter, alone, &mut scratch)?;
            if d.next.is_empty() {
                d.done = true;
            }
        }
        Ok(())
    }

    /// Choose each going row's next token (and what it drafts) into `d.next`; rows that end are marked so.
    ///
    /// With `sampling.draft` on and the row `alone` in the pass, it carries, after the token just chosen, a draft of
    /// the tokens likely to follow ([`Drafter::propose`]) through the same pass; the pass returns the logits after
    /// every one of them. The next token is then chosen from those logits exactly as without a draft (argmax, or
    /// the row's generator drawn once per token, in the same order); while it equals the drafted token the
    /// following logits are already known and no pass is needed. At the first difference the rest of the draft's
    /// K/V is dropped. So every row's tokens are the same as without drafts; only the number of passes changes.
    fn plan(
        &self,
        d: &mut Decoding,
        drafter: &mut Drafter,
        alone: bool,
        scratch: &mut Vec<f32>,
    ) -> Result<(), CoreError> {
        let StopRules { max_new_tokens, prose } = d.stop;
        let (sampling, prompt, policy) = (&d.sampling, &d.prompt, d.policy);
        d.next.clear();
        for (i, r) in d.rows.iter_mut().enumerate().filter(|(_, r)| r.stop.is_none()) {
            loop {
                let t = match &mut r.rng {
                    None => argmax(&r.logits),
                    Some(rng) => sample_top_k(&r.logits, sampling.temperature, sampling.top_k, rng, scratch),
                };
                if self.stop_ids.contains(&t) {
                    r.stop = Some(StopReason::Eos);
                    break;
                }
                r.min_p = r.min_p.min(token_prob(&r.logits, t));
                drafter.history.learn(prompt, &r.ids, t);
                r.ids.push(t);
                r.text = self.decode(&r.ids)?;
                let last = r.ids.len() == max_new_tokens;
                if prose {
                    if last {
                        r.stop = Some(StopReason::Length);
                    }
                } else if let Some(p) = r.text.find("```") {
                    r.text.truncate(p);
                    r.stop = Some(StopReason::Fence);
                } else if let Some(end) = statement_end(&r.text) {
                    r.text.truncate(end + 1);
                    r.stop = Some(StopReason::StatementEnd);
                } else if last {
                    r.stop = Some(StopReason::Length);
                }
                if r.stop.is_some() {
                    // The answer ended: what was left of a draft was neither right nor wrong.
                    if let Some((src, kept)) = r.draft.take() {
                        drafter.record_outcome(src, kept, kept);
                    }
                    break;
                }
                // The draft guessed this token: the logits after it came with the last pass.
                if r.ahead.front().is_some_and(|(d, _)| *d == t) {
                    r.logits = r.ahead.pop_front().expect("checked").1;
                    d.stats.accepted += 1;
                    if let Some((_, kept)) = &mut r.draft {
                        *kept += 1;
                    }
                    continue;
                }
                if let Some((src, kept)) = r.draft.take() {
                    // Guessed wrong from here on (forget the positions it added), or used up.
                    let wrong = !r.ahead.is_empty();
                    drafter.record_outcome(src, kept + usize::from(wrong), kept);
                    r.kv.rewind(r.kv.len() - r.ahead.len());
                    r.ahead.clear();
                }
                let mut tokens = vec![t];
                let room = max_new_tokens - r.ids.len() - 1;
                let drafted = if alone { drafter.propose(prompt, &r.ids, policy, room) } else { None };
                if let Some((draft, src)) = drafted {
                    tokens.extend(draft);
                    r.draft = Some((src, 0));
                }
                d.next.push((i, tokens));
                break;
            }
        }
        for (_, t) in &d.next {
            if t.len() > 1 {
                d.stats.proposed += t.len() - 1;
                d.stats.passes += 1;
            }
        }
        Ok(())
    }

    /// Run the rows the jobs planned: one pass for all of them when they may share it, else one per job.
    fn pass(&self, jobs: &mut [&mut Decoding], drafter: &mut Drafter) -> Result<(), CoreError> {
        let mut going: Vec<&mut Decoding> = jobs.iter_mut().filter(|d| !d.done).map(|d| &mut **d).collect();
        if going.is_empty() {
            return Ok(());
        }
        if going.len() > 1 && !self.batchable() {
            for d in going {
                self.pass_of(&mut [d], drafter)?;
            }
            return Ok(());
        }
        self.pass_of(&mut going, drafter)
    }

    fn pass_of(&self, going: &mut [&mut Decoding], drafter: &mut Drafter) -> Result<(), CoreError> {
        let t_pass = Instant::now();
        let twins: Vec<Vec<Option<usize>>> = going.iter().map(|d| self.twins(d)).collect();
        let runs = |d: &Decoding, tw: &[Option<usize>]| -> usize {
            d.next.iter().zip(tw).filter(|(_, of)| of.is_none()).map(|((_, t), _)| t.len()).sum()
        };
        let pass_rows: usize = going.iter().zip(&twins).map(|(d, tw)| runs(d, tw)).sum();
        // The first row of a job is never a twin, so a pass of one row is the job's first row.
        if going.len() == 1 && pass_rows == 1 {
            // One row, one token: the single-token pass (what greedy decoding of one candidate has always run).
            let d = &mut *going[0];
            let (i, t) = &d.next[0];
            let r = &mut d.rows[*i];
            r.logits = self.model.forward(t, &mut r.kv)?.to_vec1::<f32>()?;
        } else {
            let mut seqs: Vec<Rows> = Vec::with_capacity(pass_rows);
            for (d, tw) in going.iter_mut().zip(&twins) {
                let Decoding { rows, next, .. } = &mut **d;
                // `next` is in row order: each row takes its planned tokens, if any, unless its twin runs them.
                let mut planned = next.iter().zip(tw).peekable();
                for (i, row) in rows.iter_mut().enumerate() {
                    if let Some(((_, t), of)) = planned.next_if(|((j, _), _)| *j == i) {
                        if of.is_none() {
                            seqs.push(Rows { cache: &mut row.kv, tokens: t });
                        }
                    }
                }
            }
            let mut logits = self.model.step_many(&mut seqs)?.into_iter();
            drop(seqs);
            for (d, tw) in going.iter_mut().zip(&twins) {
                let Decoding { rows, next, .. } = &mut **d;
                for ((i, t), _) in next.iter().zip(tw).filter(|(_, of)| of.is_none()) {
                    let r = &mut rows[*i];
                    r.logits = logits.next().expect("a row per token");
                    r.ahead = t[1..].iter().map(|&d| (d, logits.next().expect("a row per token"))).collect();
                }
            }
        }
        // Each twin takes what its row computed: the same logits, the same K/V positions.
        for (d, tw) in going.iter_mut().zip(&twins) {
            for (j, of) in tw.iter().enumerate() {
                let Some(k) = *of else { continue };
                let (from, to) = (d.next[k].0, d.next[j].0);
                let (before, after) = d.rows.split_at_mut(to);
                let (src, dst) = (&before[from], &mut after[0]);
                dst.kv.catch_up(&src.kv);
                dst.logits.clone_from(&src.logits);
                dst.ahead.clone_from(&src.ahead);
                d.twin_rows += d.next[j].1.len();
            }
        }
        drafter.record_pass(pass_rows, t_pass.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }

    /// For each of `d.next`'s rows, the earlier entry of `d.next` whose row is its twin, if any: a row with the same
    /// tokens so far (so the same K/V: every position of a row computes what it would in a pass of its own) and the
    /// same tokens to feed computes exactly what that row computes, so it does not run. Sampled candidates are
    /// twins until they first draw a different token — often for a whole answer (four candidates that agree).
    fn twins(&self, d: &Decoding) -> Vec<Option<usize>> {
        let mut of: Vec<Option<usize>> = vec![None; d.next.len()];
        if !self.share_twins {
            return of;
        }
        for j in 1..d.next.len() {
            let (rj, tj) = (&d.rows[d.next[j].0], &d.next[j].1);
            of[j] = (0..j).find(|&k| {
                let (rk, tk) = (&d.rows[d.next[k].0], &d.next[k].1);
                of[k].is_none() && tk == tj && rk.kv.len() == rj.kv.len() && rk.ids == rj.ids
            });
        }
        of
    }

    /// A job's answer once it is done (or where it stands, if not).
    pub fn finish(&self, d: Decoding) -> Result<Generation, CoreError> {
        let decode_s = d.decode_started.elapsed().as_secs_f64();
        let Decoding {
            mut rows,
            prompt,
            stats,
            prefix_len,
            cache_hit,
            prefill_s,
            p_unanswerable,
            closeness,
            twin_rows,
            ..
        } = d;
        let decoded_rows = rows.iter().map(|r| r.ids.len()).sum();
        let samples = rows
            .drain(1..)
            .map(|r| {
                let generated_tokens = r.generated_tokens();
                let min_p = Some(r.min_p);
                Candidate {
                    sql: extract_sql(&format!("{ASSISTANT_PRIMER}{}", r.text)),
                    text: r.text,
                    generated_tokens,
                    min_p,
                }
            })
            .collect();
        let greedy = rows.pop().expect("one row at least");
        Ok(Generation {
            sql: extract_sql(&format!("{ASSISTANT_PRIMER}{}", greedy.text)),
            generated_tokens: greedy.generated_tokens(),
            min_p: Some(greedy.min_p),
            stop: greedy.stop.unwrap_or(StopReason::Length),
            text: greedy.text,
            prompt_tokens: prompt.len(),
            prefill_s,
            decode_s,
            prefix_tokens: prefix_len,
            prefix_cache_hit: cache_hit,
            samples,
            decoded_rows,
            twin_rows,
            p_unanswerable,
            closeness,
            draft: stats,
            table_closeness: None,
        })
    }

    /// The prompt tokens for a request and the length of its schema prefix within them.
    pub fn prompt_tokens(&self, req: &GenerateRequest) -> Result<(Vec<u32>, usize), CoreError> {
        let prompt = self.prompt(req)?;
        let full = self.encode(&prompt.text())?;
        let head = self.encode(&prompt.prefix)?;
        let prefix_len = shared_prefix_len(&head, &full);
        Ok((full, prefix_len))
    }
}

/// When a candidate's decoding ends: after `max_new_tokens`, at the end of the turn, and — unless `prose` — at the
/// end of its SQL block or statement.
#[derive(Clone, Copy)]
struct StopRules {
    max_new_tokens: usize,
    prose: bool,
}

/// One candidate being decoded.
struct Row {
    kv: KvCache,
    logits: Vec<f32>,
    ids: Vec<u32>,
    text: String,
    stop: Option<StopReason>,
    /// `None` for the greedy row.
    rng: Option<Rng>,
    /// The lowest probability of a token it chose so far ([`Candidate::min_p`]).
    min_p: f32,
    /// The draft's tokens not yet decided, each with the logits after it (computed by the last pass, its K/V
    /// already in `kv`).
    ahead: VecDeque<(u32, Vec<f32>)>,
    /// Where the pending draft came from, and how many of its tokens were kept so far.
    draft: Option<(Source, usize)>,
}

/// One job between decoding passes: its candidates' rows and what its answer reports. Made by
/// [`Runtime::begin`] (or [`Runtime::begin_with_prefix`]), moved on by [`Runtime::advance`] — alone or together
/// with other jobs' — and turned into the answer by [`Runtime::finish`].
pub struct Decoding {
    rows: Vec<Row>,
    prompt: Vec<u32>,
    sampling: Sampling,
    stop: StopRules,
    policy: DraftPolicy,
    stats: DraftStats,
    /// The rows of the coming pass: (row, the token chosen and its draft), in row order.
    next: Vec<(usize, Vec<u32>)>,
    done: bool,
    prefix_len: usize,
    cache_hit: bool,
    /// How its prompt was read (for the engine's trace).
    read: Read,
    prefill_s: f64,
    decode_started: Instant,
    p_unanswerable: Option<f32>,
    closeness: Option<f32>,
    /// Tokens fed to a row by its twin's pass instead of its own ([`Generation::twin_rows`]).
    twin_rows: usize,
}

/// How a job's prompt was read: taken whole from a recent prompt's state, its own tokens after a cached schema
/// prefix, or all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Recent,
    AfterPrefix,
    Whole,
}

impl Read {
    pub fn as_str(self) -> &'static str {
        match self {
            Read::Recent => "recent",
            Read::AfterPrefix => "after-prefix",
            Read::Whole => "whole",
        }
    }
}

impl Decoding {
    /// How the prompt was read, and how many of its tokens follow the schema prefix.
    pub fn prompt_read(&self) -> (Read, usize) {
        (self.read, self.prompt.len() - self.prefix_len)
    }

    /// Rows the last pass ran for this job (its planned tokens, twins included): 0 once it is done.
    pub fn rows_last_pass(&self) -> usize {
        if self.done {
            0
        } else {
            self.next.iter().map(|(_, t)| t.len()).sum()
        }
    }

    /// Every row has stopped: [`Runtime::finish`] gives the answer.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Rows still decoding.
    pub fn rows_going(&self) -> usize {
        self.rows.iter().filter(|r| r.stop.is_none()).count()
    }
}

/// A request once its prompt is read: answered already (nothing to decode), or ready to decode.
pub enum Begun {
    Answered(Box<Generation>),
    Decoding(Box<Decoding>),
}

impl Row {
    /// Tokens the model produced, the end-of-turn token included.
    fn generated_tokens(&self) -> usize {
        self.ids.len() + usize::from(self.stop == Some(StopReason::Eos))
    }
}

impl Runtime {
    /// The model's probability that `req`'s question cannot be answered from its schema: asked (after the same,
    /// cached, schema prefix) whether it can be, P(no) over the single-token spellings of yes and no.
    pub fn p_unanswerable(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<f32, CoreError> {
        self.p_unanswerable_with(req, JUDGE_TEXT, cancel)
    }

    /// [`Runtime::p_unanswerable`] with another wording of the judge's question (calibration experiments).
    pub fn p_unanswerable_with(
        &mut self,
        req: &GenerateRequest,
        judge_text: &str,
        cancel: &dyn Fn() -> bool,
    ) -> Result<f32, CoreError> {
        let prompt = build_judge_with(&self.template, &req.schema_context, &req.question, judge_text)?;
        let full = self.encode(&prompt.text())?;
        let head = self.encode(&prompt.prefix)?;
        let prefix_len = shared_prefix_len(&head, &full).min(full.len().saturating_sub(1));
        if full.len() + 1 > self.max_context {
            return Err(CoreError::PromptTooLong { tokens: full.len(), limit: self.max_context.saturating_sub(1) });
        }
        let (mut kv, _) = self.prefix_state(&full, prefix_len, cancel)?;
        let logits = self.prefill(&full[prefix_len..], &mut kv, cancel)?.to_vec1::<f32>()?;
        let ids = |words: &[&str]| -> Vec<u32> {
            let mut v: Vec<u32> = words
                .iter()
                .filter_map(|w| match self.encode(w).ok()?.as_slice() {
                    [id] => Some(*id),
                    _ => None,
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (yes, no) = (ids(&["yes", "Yes", "YES", " yes", " Yes"]), ids(&["no", "No", "NO", " no", " No"]));
        if yes.is_empty() || no.is_empty() {
            return Err(CoreError::Tokenizer("yes/no are not single tokens in this vocabulary".into()));
        }
        let max = yes.iter().chain(&no).map(|&i| logits[i as usize]).fold(f32::NEG_INFINITY, f32::max);
        let mass = |ids: &[u32]| ids.iter().map(|&i| ((logits[i as usize] - max) as f64).exp()).sum::<f64>();
        let (y, n) = (mass(&yes), mass(&no));
        Ok((n / (y + n)) as f32)
    }
}

impl Runtime {
    /// Everything of answering `req` before its first decoding pass: grounding, the judge, the prompt and its
    /// prefill. A ranking request is answered here; any other is returned ready for [`Runtime::advance`].
    pub fn begin(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<Begun, CoreError> {
        if req.rank_tables {
            return Ok(Begun::Answered(Box::new(Generation::ranked(match &req.grounding {
                Some(g) => self.table_closeness(g)?,
                None => Vec::new(),
            }))));
        }
        // A question that spells little of the schema but is close in meaning to a table needs no judge.
        let closeness = match (&req.grounding, req.judge) {
            (Some(g), true) => self.closeness(g)?,
            _ => None,
        };
        let near = req.close_to_a_table(closeness);
        let p = if req.judge && !near { Some(self.p_unanswerable(req, cancel)?) } else { None };
        let (tokens, prefix_len) = self.prompt_tokens(req)?;
        let mut d =
            self.begin_with_prefix(&tokens, prefix_len, req.max_new_tokens, &req.sampling, req.prose, cancel)?;
        d.p_unanswerable = p;
        d.closeness = closeness;
        Ok(Begun::Decoding(Box::new(d)))
    }
}

impl Backend for Runtime {
    fn generate(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<Generation, CoreError> {
        match self.begin(req, cancel)? {
            Begun::Answered(g) => Ok(*g),
            Begun::Decoding(d) => self.decode_alone(*d, cancel),
        }
    }
}
