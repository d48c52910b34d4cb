//! Every setting of copilot, in one place.
//!
//! | GUC | context | default | what |
//! |---|---|---|---|
//! | `copilot.model` | SIGHUP | the default model's path | GGUF path, or `hf:<owner>/<repo>/<file>` from the hf-hub cache |
//! | `copilot.threads` | POSTMASTER | 2 | inference threads (candle's pools are created once per worker) |
//! | `copilot.max_context_tokens` | POSTMASTER | 8192 | cap on prompt + answer tokens |
//! | `copilot.prefix_cache_mb` | SIGHUP | 256 | memory for the schema-prefix KV cache (0 = off) |
//! | `copilot.max_new_tokens` | USERSET | 256 | longest answer, in tokens |
//! | `copilot.schemas` | USERSET | '' = the caller's search_path | comma-separated schemas the context is built from |
//! | `copilot.context_budget_tokens` | USERSET | 0 = what max_context_tokens leaves | past it, the question's tables and columns are chosen |
//! | `copilot.selected_context_tokens` | USERSET | 1000 | the size of a chosen context (never more than context_budget_tokens) |
//! | `copilot.schema_focus` | USERSET | on | a selection spanning several schemas keeps to the question's schema (and FK paths out of it) |
//! | `copilot.bare_table_names` | USERSET | on | tables chosen from a large schema are shown by unique bare names (SQL qualified back) |
//! | `copilot.include_tables` | USERSET | '' | tables always shown (name or schema.name) |
//! | `copilot.exclude_tables` | USERSET | '' | tables never shown |
//! | `copilot.max_question_chars` | USERSET | 2000 | longest question accepted |
//! | `copilot.request_timeout` | USERSET | 120 s | how long `ask` waits for the worker (queueing + loading + generating) |
//! | `copilot.statement_timeout` | USERSET | 5 s | time limit for executing SQL in `run` / `run_sql` |
//! | `copilot.max_rows` | USERSET | 1000 | most rows `run` / `run_sql` return (a NOTICE says when cut) |
//! | `copilot.candidates` | USERSET | 4 | answers decoded together per question (1 = greedy only) and chosen by their results |
//! | `copilot.confidence_threshold` | USERSET | 0.5 | the greedy answer, decoded first, is returned alone when it plans and the model gave each of its tokens at least this probability (1 = always sample the others) |
//! | `copilot.draft_tokens` | USERSET | 8 | most tokens drafted ahead per decoding pass (speculative decoding; same answers; 0 = off) |
//! | `copilot.draft_history` | SUSET | on | drafts may follow what the engine decoded before, for any session (off: from the prompt and answer only) |
//! | `copilot.repair_attempts` | USERSET | 2 | times a failing answer is sent back with PostgreSQL's error |
//! | `copilot.vote_timeout` | USERSET | 1 s | time limit for running one candidate to compare results (0 = compare plans only) |
//! | `copilot.value_hints` | USERSET | 6 | example values shown per categorical column (0 = none) |
//! | `copilot.backend` | SIGHUP | local | `local` (copilot.model, run by copilot-engine) or `openai` (a remote server) |
//! | `copilot.endpoint` | SIGHUP | '' | `openai`: the API's base URL, e.g. `http://10.0.0.5:8080/v1` |
//! | `copilot.remote_model` | SIGHUP | '' | `openai`: the model name the server knows |
//! | `copilot.api_key_file` | SIGHUP, superuser | '' | `openai`: a file holding the API key (read by the engine only) |
//! | `copilot.remote_timeout` | SIGHUP | 60 s | `openai`: connect and reply time limit per request |
//! | `copilot.engine_memory_mb` | SIGHUP | 0 | address-space limit of the engine process (0 = none); applies at its next start |
//! | `copilot.engine_path` | SIGHUP | '' = `copilot-engine` beside the library | the engine binary |
//! | `copilot.grounding_threshold` | USERSET | 0.1 | a question whose words the schema speaks of no more than this share of is checked with the model |
//! | `copilot.grounding_similarity` | USERSET | 0.375 | such a question is not put to the model when it is this close in meaning (cosine) to one of the tables (needs `copilot.embedding_model`) |
//! | `copilot.embedding_model` | SIGHUP | /var/lib/copilot/models/all-minilm-l6-v2 | the sentence encoder the engine grounds questions with ('' = by spelling only; one that cannot load is logged and left out) |
//! | `copilot.refusal_threshold` | USERSET | 0.2 | such a question is refused when the model's P(the schema cannot answer) reaches this (1 = never) |
//! | `copilot.history` | SUSET | on | record every ask/run in `copilot.history` (skipped on a standby) |
//! | `copilot.history_days` | SIGHUP | 90 | history rows older than this are deleted by the history writer (0 = keep all) |
//! | `copilot.examples` | USERSET | 3 | verified examples (`copilot.teach`, `copilot.feedback`) shown with a question (0 = none) |
//!
//! A change of `copilot.model` takes effect on reload (`SELECT pg_reload_conf()`): the worker exits and the
//! postmaster starts it again with the new model.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Where `scripts/fetch-model` puts the default model (scripts/models.tsv's `default` row: the tuned
/// Qwen2.5-Coder-1.5B of models/qwen2.5-coder-1.5b-copilot-spider). Kept in sync with that table and scripts/lib.sh
/// (trainer/tests/train.rs `the_default_model_is_the_same_file_everywhere`).
pub const DEFAULT_MODEL_PATH: &std::ffi::CStr =
    c"/var/lib/copilot/models/qwen2.5-coder-1.5b-copilot-spider-q4_k_m.gguf";

pub static MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(DEFAULT_MODEL_PATH));
pub static THREADS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static MAX_CONTEXT_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(8192);
pub static PREFIX_CACHE_MB: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static MAX_NEW_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static SCHEMAS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static CONTEXT_BUDGET_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// 1,000 estimated tokens: the size reports/large_schema.md measures (gold-table recall 98.3 %, EX within 2 points
/// of asking each database alone, p50 1.41×). A schema that fits the window is shown whole (selecting inside one
/// schema cost accuracy and time when measured); see context.md (2026-12-05, session 11).
pub static SELECTED_CONTEXT_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BARE_TABLE_NAMES: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static SCHEMA_FOCUS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static INCLUDE_TABLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static EXCLUDE_TABLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_QUESTION_CHARS: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(120_000);
pub static STATEMENT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
pub static MAX_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static CANDIDATES: GucSetting<i32> = GucSetting::<i32>::new(4);
pub static CONFIDENCE_THRESHOLD: GucSetting<f64> = GucSetting::<f64>::new(0.5);
pub static DRAFT_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(8);
pub static REPAIR_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static VOTE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
pub static VALUE_HINTS: GucSetting<i32> = GucSetting::<i32>::new(6);
pub static HISTORY: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static DRAFT_HISTORY: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static HISTORY_DAYS: GucSetting<i32> = GucSetting::<i32>::new(90);
pub static EXAMPLES: GucSetting<i32> = GucSetting::<i32>::new(3);
pub static REFUSAL_THRESHOLD: GucSetting<f64> = GucSetting::<f64>::new(0.2);
pub static GROUNDING_THRESHOLD: GucSetting<f64> = GucSetting::<f64>::new(0.1);
pub static GROUNDING_SIMILARITY: GucSetting<f64> = GucSetting::<f64>::new(0.375);
/// Where `scripts/fetch-model --minilm` puts all-MiniLM-L6-v2 (scripts/models.tsv's `minilm` row).
pub const DEFAULT_EMBEDDING_MODEL: &std::ffi::CStr = c"/var/lib/copilot/models/all-minilm-l6-v2";
pub static EMBEDDING_MODEL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(DEFAULT_EMBEDDING_MODEL));
pub static ENGINE_MEMORY_MB: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Requests the engine decodes together (one pass over the weights per step for all of them): as many as the board
/// has slots, so no session's request waits for another's to end (reports/concurrency.md).
pub static DECODE_TOGETHER: GucSetting<i32> = GucSetting::<i32>::new(crate::shmem::SLOTS as i32);
pub static BACKEND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"local"));
pub static ENDPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static REMOTE_MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static API_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static REMOTE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static ENGINE_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Register the settings. PGC_POSTMASTER ones can only be defined while shared_preload_libraries is processed;
/// in a backend that loads the library later (not preloaded) they are left out: no worker reads them there.
pub fn register(preloading: bool) {
    GucRegistry::define_string_guc(
        c"copilot.model",
        c"The GGUF model the background worker loads.",
        c"A file path, or hf:<owner>/<repo>/<file> resolved through the Hugging Face cache (no download). \
          Takes effect on reload: the worker restarts with the new model.",
        &MODEL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.embedding_model",
        c"The sentence encoder the engine grounds questions with by meaning (empty: by spelling only).",
        c"A sentence-transformers folder (config.json, tokenizer.json, model.safetensors), its model.safetensors, or \
          hf:<owner>/<repo>/model.safetensors in the Hugging Face cache; scripts/fetch-model --minilm installs \
          all-MiniLM-L6-v2. One that cannot load is logged and left out. Takes effect on reload.",
        &EMBEDDING_MODEL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.prefix_cache_mb",
        c"Memory the worker may keep for schema-prefix KV states, in megabytes (0 turns the cache off).",
        c"The state after a prompt's system text and schema context is kept per exact prefix, least recently used \
          first out, so the next question over the same schema skips that part of the prefill. Takes effect on reload.",
        &PREFIX_CACHE_MB,
        0,
        1 << 20,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"copilot.engine_memory_mb",
        c"Address space the engine process may use, in megabytes (0 = no limit).",
        c"Enforced with RLIMIT_AS on the engine process; a model that needs more is refused when it loads, with how \
          much it needs. Takes effect when the engine next starts (a change of copilot.model, or a restart).",
        &ENGINE_MEMORY_MB,
        0,
        1 << 24,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"copilot.decode_together",
        c"How many requests the engine works on at once (1 = one at a time, in arrival order).",
        c"Requests decode together: each step is one pass over the model's weights for the next token of every one of \
          them, and a new request's prompt is read between two steps. Each request's tokens are the same as alone. \
          Takes effect on reload.",
        &DECODE_TOGETHER,
        1,
        crate::shmem::SLOTS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.backend",
        c"Where answers are generated: local (copilot.model, in the copilot-engine process) or openai.",
        c"openai sends the same conversation to an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama) at \
          copilot.endpoint; the rest of copilot (context, checks, repair, vote) is the same.",
        &BACKEND,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.endpoint",
        c"The OpenAI-compatible API's base URL, e.g. http://10.0.0.5:8080/v1 (copilot.backend = openai).",
        c"",
        &ENDPOINT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.remote_model",
        c"The model name the remote server knows (copilot.backend = openai).",
        c"",
        &REMOTE_MODEL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.api_key_file",
        c"A file holding the remote server's API key (copilot.backend = openai).",
        c"Read by the engine process only; the key appears in no setting, status, log or error.",
        &API_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"copilot.remote_timeout",
        c"Time limit to connect to the remote server and to receive each reply.",
        c"",
        &REMOTE_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"copilot.engine_path",
        c"The copilot-engine binary the worker runs the model in.",
        c"Empty means copilot-engine in PostgreSQL's library directory, where the extension installs it.",
        &ENGINE_PATH,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    if preloading {
        register_postmaster_gucs();
    }
    register_session_gucs();
    register_answer_gucs();
}

fn register_postmaster_gucs() {
    GucRegistry::define_int_guc(
        c"copilot.threads",
        c"CPU threads used for inference.",
        c"Inference thread pools are created once per worker start.",
        &THREADS,
        1,
        256,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.max_context_tokens",
        c"Upper bound on prompt plus answer tokens.",
        c"Prompts longer than this are refused; the model's own context length also applies.",
        &MAX_CONTEXT_TOKENS,
        512,
        131_072,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

fn register_session_gucs() {
    GucRegistry::define_int_guc(
        c"copilot.max_new_tokens",
        c"Longest answer the model may generate, in tokens.",
        c"",
        &MAX_NEW_TOKENS,
        1,
        4096,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.schemas",
        c"Comma-separated schemas whose tables form the model's context.",
        c"Empty means the schemas of the caller's search_path. Only tables and views the caller may SELECT are shown.",
        &SCHEMAS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.context_budget_tokens",
        c"Largest schema context shown with a question, in estimated tokens; past it the question's tables are chosen.",
        c"When the readable schema is larger, the tables and columns the question speaks of are chosen (with their \
          join paths and keys), within copilot.selected_context_tokens (and never more than this). 0 = what \
          copilot.max_context_tokens leaves after the answer and the rest of the prompt. Tokens are estimated as \
          characters / 3.",
        &CONTEXT_BUDGET_TOKENS,
        0,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.selected_context_tokens",
        c"Size of the context chosen for a question from a schema larger than copilot.context_budget_tokens.",
        c"In estimated tokens (characters / 3); the smaller of this and copilot.context_budget_tokens.",
        &SELECTED_CONTEXT_TOKENS,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"copilot.schema_focus",
        c"When a large schema context spans several schemas, choose tables from the question's schema only.",
        c"The schema whose two best-matching tables match the question best; tables of other schemas are still \
          shown on a foreign-key path from the chosen ones, and copilot.include_tables always. Off: the best tables \
          of any schema fill the budget.",
        &SCHEMA_FOCUS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"copilot.bare_table_names",
        c"Show the tables chosen from a large schema by their bare names where no other chosen table shares the name.",
        c"The model's SQL is then schema-qualified back before it is checked, run or returned. Off: names outside \
          the search_path are shown schema-qualified. The tables chosen are the same either way.",
        &BARE_TABLE_NAMES,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.include_tables",
        c"Comma-separated tables always shown to the model (name or schema.name), whatever the question.",
        c"Only tables the caller may SELECT; they count against copilot.context_budget_tokens.",
        &INCLUDE_TABLES,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"copilot.exclude_tables",
        c"Comma-separated tables never shown to the model (name or schema.name).",
        c"",
        &EXCLUDE_TABLES,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.max_question_chars",
        c"Longest question accepted, in characters.",
        c"",
        &MAX_QUESTION_CHARS,
        1,
        100_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.request_timeout",
        c"How long copilot.ask waits for an answer (queueing, model loading and generation).",
        c"statement_timeout and query cancel also interrupt the wait.",
        &REQUEST_TIMEOUT_MS,
        100,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"copilot.statement_timeout",
        c"Time limit for executing SQL in copilot.run and copilot.run_sql.",
        c"Armed as a statement timer around the execution; the caller's own statement_timeout still applies.",
        &STATEMENT_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"copilot.max_rows",
        c"Most rows copilot.run and copilot.run_sql return.",
        c"A NOTICE says when a result was cut.",
        &MAX_ROWS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
}

fn register_answer_gucs() {
    GucRegistry::define_float_guc(
        c"copilot.grounding_threshold",
        c"Questions whose content words the schema speaks of no more than this share of are checked for refusal.",
        c"The share of the question's words (not stopwords, numbers or quoted values) that match a table or column \
          name, comment or example value. At or below it, the model is asked whether the tables can answer the \
          question (copilot.refusal_threshold). 0 checks only questions with no such word.",
        &GROUNDING_THRESHOLD,
        0.0,
        1.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"copilot.grounding_similarity",
        c"A poorly grounded question this close in meaning to a table is answered without asking the model to judge it.",
        c"The cosine between the question's and each table's sentence vector (name, comment and columns), by the \
          engine's sentence encoder (copilot.embedding_model). Chosen on Spider train with copilot-trainer \
          eval-grounding (reports/eval/grounding_calibration.md). Above 1: never.",
        &GROUNDING_SIMILARITY,
        0.0,
        2.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"copilot.refusal_threshold",
        c"Refuse a poorly grounded question when the model's probability that the schema cannot answer it reaches this.",
        c"Asked, in the same request, on the same cached schema prefix, only for questions at or below \
          copilot.grounding_threshold. 1 turns the check off; answers that PostgreSQL cannot plan even after repair \
          are refused either way. The defaults were chosen on Spider train (docs/evaluation.md).",
        &REFUSAL_THRESHOLD,
        0.0,
        1.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.candidates",
        c"Answers the model writes per question (the first greedy, the others sampled), decoded together.",
        c"Each candidate that PostgreSQL can plan is run read-only (copilot.vote_timeout) and the answers are grouped by \
          their results; the largest group wins, ties go to the greedy answer. 1 = the greedy answer only.",
        &CANDIDATES,
        1,
        16,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"copilot.confidence_threshold",
        c"Return the greedy answer alone when it plans and the model gave each of its tokens at least this probability.",
        c"With copilot.candidates above 1, the greedy answer is decoded first; the other candidates are sampled (and \
          voted on) only when it does not plan as the caller or the model was less sure of one of its tokens. 1 = \
          always sample them (one request for all, as before); 0 = whenever the greedy answer plans. Chosen on Spider \
          train (copilot-trainer eval-confidence, docs/evaluation.md).",
        &CONFIDENCE_THRESHOLD,
        0.0,
        1.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.draft_tokens",
        c"Most tokens drafted ahead per decoding pass (speculative decoding; 0 = off).",
        c"Drafts are what the engine decoded after the same tokens before, else the tokens that followed the \
          answer's last tokens in the prompt or the answer, checked by the model in the same pass; a drafted token \
          is kept only when it is the one decoding chooses, so answers are the same with any value. The engine \
          drafts only as many as pay on this machine.",
        &DRAFT_TOKENS,
        0,
        32,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.repair_attempts",
        c"How many times an answer PostgreSQL cannot plan is sent back to the model with the error.",
        c"0 turns repair off: an answer that does not plan is then reported as the question being unanswerable.",
        &REPAIR_ATTEMPTS,
        0,
        8,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.vote_timeout",
        c"Time limit for running one candidate answer read-only to compare its result with the others'.",
        c"0 compares the candidates' plans instead of their results (nothing is executed by copilot.ask).",
        &VOTE_TIMEOUT_MS,
        0,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"copilot.value_hints",
        c"Example values shown to the model per categorical column (from pg_stats, enum labels, CHECK constraints).",
        c"Only columns the caller may read, of tables that have been analyzed. 0 shows none.",
        &VALUE_HINTS,
        0,
        50,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"copilot.draft_history",
        c"Draft from what the engine decoded before (speculative decoding).",
        c"The engine counts which token followed every run of up to 4 tokens it decoded, for every session, and \
          drafts the likeliest continuations first; answers are the same either way, only their speed changes. One \
          role's answers can so make another's decode faster: off (in postgresql.conf) drafts come from each \
          request's own prompt and answer only.",
        &DRAFT_HISTORY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"copilot.history",
        c"Record every copilot.ask and copilot.run in copilot.history.",
        c"Rows are written by a background worker in its own transaction, so failed asks are recorded too. Nothing \
          is recorded on a hot standby.",
        &HISTORY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.history_days",
        c"Days copilot.history keeps a row (0 keeps every row).",
        c"Older rows are deleted by the history writer when it next writes in that database.",
        &HISTORY_DAYS,
        0,
        36_500,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"copilot.examples",
        c"Verified examples shown to the model with a question (0 = none).",
        c"The examples most like the question (BM25 over their questions) among those over tables the caller can \
          read and the schema context shows, taught with copilot.teach or copilot.feedback.",
        &EXAMPLES,
        0,
        16,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// How answers are decoded for `candidates` candidates: the sampling defaults and this session's drafts.
pub fn sampling(candidates: usize) -> copilot_core::engine::backend::Sampling {
    let draft = copilot_core::engine::draft::DraftPolicy {
        tokens: DRAFT_TOKENS.get().max(0) as usize,
        history: DRAFT_HISTORY.get(),
        ..Default::default()
    };
    copilot_core::engine::backend::Sampling { candidates, draft, ..Default::default() }
}

/// The prefix cache bound in bytes.
pub fn prefix_cache_bytes() -> usize {
    PREFIX_CACHE_MB.get().max(0) as usize * 1024 * 1024
}

fn text(g: &GucSetting<Option<CString>>) -> String {
    g.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What the engine process serves, as the settings say now; a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineSpec {
    Local { model: String, embedder: String },
    OpenAi { endpoint: String, model: String, key_file: String, timeout_ms: i32 },
}

impl EngineSpec {
    pub fn current() -> EngineSpec {
        match text(&BACKEND).trim() {
            "openai" => EngineSpec::OpenAi {
                endpoint: text(&ENDPOINT),
                model: text(&REMOTE_MODEL),
                key_file: text(&API_KEY_FILE),
                timeout_ms: REMOTE_TIMEOUT_MS.get(),
            },
            _ => EngineSpec::Local { model: model(), embedder: text(&EMBEDDING_MODEL) },
        }
    }

    /// How `copilot.status()` names it (never the key).
    pub fn describe(&self) -> String {
        match self {
            EngineSpec::Local { model, .. } => model.clone(),
            EngineSpec::OpenAi { endpoint, model, .. } => format!("openai:{model} at {endpoint}"),
        }
    }
}

pub fn engine_path() -> String {
    ENGINE_PATH.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn model() -> String {
    MODEL.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The configured schemas, trimmed; empty when the caller's search_path is to be used.
/// The schema context's budget in estimated tokens: the setting, or (0) what the context window leaves after the
/// answer and about 1,024 tokens of system text, examples, conversation and question.
pub fn context_budget_tokens() -> usize {
    match CONTEXT_BUDGET_TOKENS.get() {
        n if n > 0 => n as usize,
        _ => (MAX_CONTEXT_TOKENS.get() - MAX_NEW_TOKENS.get() - 1024).max(256) as usize,
    }
}

/// The size of a question's chosen context: `copilot.selected_context_tokens`, never more than the budget.
pub fn selected_context_tokens() -> usize {
    (SELECTED_CONTEXT_TOKENS.get().max(1) as usize).min(context_budget_tokens())
}

pub fn include_tables() -> Vec<String> {
    list(&INCLUDE_TABLES)
}

pub fn exclude_tables() -> Vec<String> {
    list(&EXCLUDE_TABLES)
}

/// A comma-separated list setting's items, trimmed, empty ones dropped.
fn list(g: &GucSetting<Option<CString>>) -> Vec<String> {
    g.get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

pub fn schemas() -> Vec<String> {
    list(&SCHEMAS)
}
