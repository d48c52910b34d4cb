//! The SQL functions: `copilot.ask`, `copilot.context`, `copilot.status`, `copilot.last_ask`.
//!
//! A session never runs the model: it builds the schema context through SPI (as itself, so privileges apply),
//! posts the request on the shared board, sets the worker's latch and waits on its own latch. The wait is
//! interruptible: `CHECK_FOR_INTERRUPTS` runs after every wake-up, so query cancel and `statement_timeout` end it
//! and a [`Claim`] guard then abandons the request (the worker stops generating). Backend termination exits the
//! process without unwinding: a `before_shmem_exit` callback abandons the exiting backend's requests instead.

use crate::errors::{CopilotError, OrRaise};
use crate::shmem::{Latch, Metrics, Owner, Poll, Readiness, Ticket, BOARD, INPUT_BYTES, SLOTS};
use crate::{catalog, gucs};
use copilot_core::engine::backend::{Answer, GenerateRequest};
use copilot_core::sql::schema::{Catalog, Qualifier};
use copilot_core::sql::select::Closeness;
use copilot_core::sql::suggest::Grounding;
use pgrx::prelude::*;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a session waits for a worker to appear (it restarts within a second or two) before saying none runs.
const NO_WORKER_GRACE: Duration = Duration::from_secs(10);

thread_local! {
    /// What this session's last answered request cost (`copilot.last_ask()`).
    static LAST_ASK: Cell<Option<Metrics>> = const { Cell::new(None) };
    /// Whether this backend has registered its exit callback.
    static EXIT_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Sleep on this backend's latch for at most `timeout`, then service interrupts (cancel, statement_timeout,
/// termination all raise here).
fn wait_on_latch(timeout: Duration) {
    let ms = timeout.as_millis().clamp(1, 1000) as std::ffi::c_long;
    // SAFETY: MyLatch is this backend's own latch; WaitLatch/ResetLatch are called on the main thread, outside any
    // critical section. WL_EXIT_ON_PM_DEATH makes the backend exit if the postmaster dies.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// Sleep on this backend's latch (interruptible: cancel and termination raise here).
pub(crate) fn sleep(d: Duration) {
    wait_on_latch(d);
}

pub(crate) fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set at backend start and never changes.
    unsafe { pg_sys::MyProcPid }
}

/// Abandon the exiting backend's requests (FATAL, `pg_terminate_backend`): the process ends without unwinding
/// through the [`Claim`] guard.
#[pg_guard]
unsafe extern "C-unwind" fn abandon_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // This backend never raises while holding the board's lock, so taking it here cannot self-deadlock.
    let worker = BOARD.exclusive().abandon_owner(my_pid());
    if let Some(w) = worker {
        w.set();
    }
}

fn register_exit_hook() {
    if !EXIT_HOOK.get() {
        // SAFETY: registering a callback with PostgreSQL on the main thread; it runs once at backend exit, while
        // shared memory is still attached.
        unsafe { pg_sys::before_shmem_exit(Some(abandon_at_exit), pg_sys::Datum::from(0)) };
        EXIT_HOOK.set(true);
    }
}

/// A request this session holds. Dropping it without [`Claim::release`] — an ERROR unwinding through the wait —
/// abandons the request so the worker stops working on it and frees the slot.
struct Claim(Ticket);

impl Claim {
    fn release(self) {
        BOARD.exclusive().release(self.0);
        std::mem::forget(self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let worker = BOARD.exclusive().abandon(self.0);
        if let Some(w) = worker {
            w.set();
        }
    }
}

pub(crate) fn ensure_preloaded() -> Result<(), CopilotError> {
    match crate::preloaded() {
        true => Ok(()),
        false => Err(CopilotError::NotPreloaded),
    }
}

/// Wait until the worker is ready, or say why it is not.
fn wait_until_ready(deadline: Instant, timeout_ms: i32) -> Result<(), CopilotError> {
    let start = Instant::now();
    loop {
        let readiness = BOARD.share().readiness();
        match readiness {
            Readiness::Ready => return Ok(()),
            Readiness::Failed { message, model } => return Err(CopilotError::ModelFailed { reason: message, model }),
            Readiness::Waiting { state, published: false }
                if start.elapsed() > NO_WORKER_GRACE.min(deadline.saturating_duration_since(start)) =>
            {
                return Err(CopilotError::WorkerNotRunning { state })
            }
            Readiness::Waiting { .. } => {}
        }
        if Instant::now() >= deadline {
            return Err(CopilotError::StillLoading { timeout_ms, model: BOARD.share().model() });
        }
        wait_on_latch(Duration::from_millis(50));
    }
}

fn claim_slot(context: &str, payload: &str, deadline: Instant, timeout_ms: i32) -> Result<Claim, CopilotError> {
    register_exit_hook();
    let owner = Owner { pid: my_pid(), latch: Latch::mine() };
    loop {
        let claimed = BOARD.exclusive().claim(owner, context, payload);
        if let Some((ticket, worker)) = claimed {
            worker.set();
            return Ok(Claim(ticket));
        }
        if Instant::now() >= deadline {
            return Err(CopilotError::NoFreeSlot { timeout_ms, slots: SLOTS });
        }
        wait_on_latch(Duration::from_millis(10));
    }
}

/// Build the caller's context, or say why there is nothing to show the model.
pub(crate) fn context_for_caller() -> Result<(Catalog, String), CopilotError> {
    context_for(None)
}

/// The caller's readable tables (less `copilot.exclude_tables`) and their rendered context; with a question, and a
/// schema larger than `copilot.context_budget_tokens`, only the tables and columns the question needs
/// ([`copilot_core::sql::select`]) plus `copilot.include_tables`.
pub(crate) fn context_for(question: Option<&str>) -> Result<(Catalog, String), CopilotError> {
    context_and_qualifier(question).map(|(catalog, text, _)| (catalog, text))
}

/// [`context_for`], and the tables it shows bare from schemas outside the search_path (a selection from a large
/// schema writes unique names bare: `copilot_core::sql::qualify`), which the model's SQL must be qualified with.
pub(crate) fn context_and_qualifier(question: Option<&str>) -> Result<(Catalog, String, Qualifier), CopilotError> {
    let configured = gucs::schemas();
    let (mut catalog, mut opts) = catalog::load(&configured, gucs::VALUE_HINTS.get().max(0) as usize)?;
    let named = |t: &copilot_core::sql::schema::Table, list: &[String]| {
        list.iter().any(|n| match n.split_once('.') {
            Some((s, name)) => t.schema.eq_ignore_ascii_case(s) && t.name.eq_ignore_ascii_case(name),
            None => t.name.eq_ignore_ascii_case(n),
        })
    };
    let (exclude, include) = (gucs::exclude_tables(), gucs::include_tables());
    catalog.tables.retain(|t| !named(t, &exclude));
    if catalog.is_empty() {
        let scope = if configured.is_empty() {
            "the search_path".to_string()
        } else {
            format!("copilot.schemas ({})", configured.join(", "))
        };
        return Err(CopilotError::NoReadableTables { scope });
    }
    if let Some(q) = question {
        let budget = gucs::context_budget_tokens();
        let tokens = |c: &Catalog| c.render(&opts).len().div_ceil(3);
        if tokens(&catalog) > budget {
            // Past the budget, the question's tables are chosen within a size of their own (at most the budget).
            let size = gucs::selected_context_tokens();
            let (always, rest): (Vec<_>, Vec<_>) = catalog.tables.drain(..).partition(|t| named(t, &include));
            let always = Catalog { tables: always };
            let left = size.saturating_sub(tokens(&always));
            let rest = Catalog { tables: rest };
            let focus = gucs::SCHEMA_FOCUS.get();
            let closeness = if focus { meaning_of_tables(q, &rest) } else { Closeness::new() };
            let (mut chosen, report) =
                copilot_core::sql::select::select_with(&rest, q, &[], left, &tokens, focus, &closeness);
            chosen.tables.extend(always.tables);
            chosen.normalize();
            if chosen.is_empty() {
                return Err(CopilotError::ContextBudgetTooSmall { budget: size });
            }
            catalog = chosen;
            // Shown with unique names bare (`copilot.bare_table_names`), which is never longer than the qualified
            // rendering the budget was counted on: the tables chosen do not depend on the setting.
            opts.bare_unique = gucs::BARE_TABLE_NAMES.get();
            // When the selection was narrowed to the question's schema(s), that schema's tables are the bare ones
            // (a look-alike schema shown beside it is written qualified), and the model's bare names resolve there.
            opts.bare_schema = report.schemas.into_iter().next();
        }
    }
    let text = catalog.render(&opts);
    let qualifier = catalog.qualifier(&opts);
    Ok((catalog, text, qualifier))
}

/// How close in meaning each table of a catalog spanning several schemas is to the question, by the engine's
/// sentence encoder: ranking requests through the board (nothing is generated; the encoder caches the tables'
/// vectors, so a schema's tables are encoded once), as many as the tables' sentences need to fit the board's
/// request size (a few hundred wide tables take more than one). Empty — the tables are then chosen by their words —
/// for one schema, when the engine is not ready or has no encoder, or when a request fails; a table past
/// [`Grounding::of`]'s first tables gets no score.
fn meaning_of_tables(question: &str, catalog: &Catalog) -> Closeness {
    let several = catalog.tables.iter().any(|t| t.schema != catalog.tables[0].schema);
    let status = BOARD.share().status();
    if !several || status.state != crate::shmem::WorkerState::Ready || !status.ranks_tables {
        return Closeness::new();
    }
    let Some(grounding) = Grounding::of(question, catalog) else { return Closeness::new() };
    // Room for the sentences in one request: the board's input less the question and the request's other fields.
    let room = INPUT_BYTES.saturating_sub(4 * question.len() + 4096);
    if room < 1024 {
        // A question this long (copilot.max_question_chars raised) leaves no room for the tables: by the words.
        return Closeness::new();
    }
    let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
    let mut used = 0;
    for sentence in &grounding.tables {
        // Counted twice over for JSON's escapes (a request that still does not fit fails, and the words decide); a
        // sentence alone over the room is cut at a character.
        let mut cost = 2 * sentence.len() + 4;
        let sentence = if cost > room {
            let mut end = room / 2 - 4;
            while !sentence.is_char_boundary(end) {
                end -= 1;
            }
            cost = room;
            sentence[..end].to_string()
        } else {
            sentence.clone()
        };
        if used + cost > room && !chunks.last().is_some_and(Vec::is_empty) {
            chunks.push(Vec::new());
            used = 0;
        }
        used += cost;
        if let Some(c) = chunks.last_mut() {
            c.push(sentence);
        }
    }
    // The rankings are part of this ask (or context call), not answers of their own: copilot.last_ask() keeps the
    // answer's metrics.
    let last = LAST_ASK.get();
    let mut scores: Vec<f32> = Vec::with_capacity(grounding.tables.len());
    for tables in chunks {
        let want = tables.len();
        let req = GenerateRequest {
            question: question.to_string(),
            rank_tables: true,
            grounding: Some(Box::new(Grounding { tables, ..grounding.clone() })),
            ..Default::default()
        };
        match generate("", &req).map(|(a, _)| a.table_closeness.unwrap_or_default()) {
            Ok(part) if part.len() == want => scores.extend(part),
            other => {
                let why = other.map_or_else(|e| e.to_string(), |p| format!("{} scores for {want} tables", p.len()));
                pgrx::debug1!(
                    "copilot: the tables could not be ranked by meaning ({why}); they are chosen by their words"
                );
                scores.clear();
                break;
            }
        }
    }
    LAST_ASK.set(last);
    // Grounding::of describes the catalog's first tables, in order: the scores line up with them.
    catalog.tables.iter().zip(scores).map(|(t, c)| ((t.schema.clone(), t.name.clone()), c)).collect()
}

/// Turn a natural-language question into one SQL query over the tables the caller can read: several candidate
/// answers, each checked against the caller's database (gate, then planned as the caller), repaired from
/// PostgreSQL's own errors when none plans, chosen by their results — or a refusal when none can answer.
///
/// With `follow_up` (a `copilot.history` id, e.g. `(SELECT history_id FROM copilot.last_ask())`), the question
/// continues that conversation: the earlier questions and their SQL come first, as the model's earlier turns.
/// Verified examples like the question (`copilot.teach`, `copilot.feedback`) are shown too. Every ask is recorded
/// in `copilot.history`, answered or not. A NULL question gives NULL.
#[pg_extern(name = "ask", parallel_unsafe)]
fn ask_follow_up(question: Option<&str>, follow_up: default!(Option<i64>, "NULL")) -> Option<String> {
    Some(answer_question(question?, follow_up))
}

/// `ask(text)` as extension version 0.1.0 declares it (symbol `ask_wrapper`): a database not yet updated with
/// `ALTER EXTENSION copilot UPDATE` keeps working with this library.
#[pg_extern(strict, parallel_unsafe, sql = false)]
fn ask(question: &str) -> String {
    answer_question(question, None)
}

fn answer_question(question: &str, follow_up: Option<i64>) -> String {
    let q = validate_question(question).or_raise();
    ensure_preloaded().or_raise();
    let ask = crate::memory::Ask { kind: "ask", question: q, prompt_question: q.to_string(), follow_up, turns: vec![] };
    crate::memory::answer_recorded(ask, |sql| Ok((sql.to_string(), None))).or_raise()
}

pub(crate) fn validate_question(question: &str) -> Result<&str, CopilotError> {
    let max = gucs::MAX_QUESTION_CHARS.get().max(1) as usize;
    let q = question.trim();
    if q.is_empty() {
        return Err(CopilotError::EmptyQuestion);
    }
    let chars = q.chars().count();
    if chars > max {
        return Err(CopilotError::QuestionTooLong { chars, max });
    }
    if q.contains('\0') {
        return Err(CopilotError::NulInQuestion);
    }
    Ok(q)
}

/// Send a request (the caller's schema context, then the conversation) to the worker and wait for its candidates,
/// the greedy one first.
pub(crate) fn generate(context: &str, req: &GenerateRequest) -> Result<(Answer, Metrics), CopilotError> {
    let payload = serde_json::to_string(&GenerateRequest { schema_context: String::new(), ..req.clone() })
        .map_err(|e| CopilotError::Catalog(format!("cannot encode the request: {e}")))?;
    if context.len() + payload.len() > INPUT_BYTES {
        return Err(CopilotError::ContextTooLarge { bytes: context.len(), limit: INPUT_BYTES });
    }
    let timeout_ms = gucs::REQUEST_TIMEOUT_MS.get();
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1) as u64);
    wait_until_ready(deadline, timeout_ms)?;
    let claim = claim_slot(context, &payload, deadline, timeout_ms)?;
    loop {
        let poll = BOARD.share().poll(claim.0);
        match poll {
            Poll::Answered { answer, metrics } => {
                claim.release();
                LAST_ASK.set(Some(metrics));
                let answer: Answer = serde_json::from_str(&answer).map_err(|e| CopilotError::Worker {
                    failure: crate::shmem::Failure::Engine(copilot_core::error::ErrorKind::Inference),
                    message: format!("the worker's answer is malformed: {e}"),
                })?;
                return Ok((answer, metrics));
            }
            Poll::Failed(failure, message) => {
                claim.release();
                return Err(CopilotError::Worker { failure, message });
            }
            // Nothing of ours is on the board any more: dropping the claim touches nothing.
            Poll::Lost => return Err(CopilotError::RequestLost),
            Poll::Waiting => {}
        }
        if Instant::now() >= deadline {
            drop(claim);
            return Err(CopilotError::NoAnswer { timeout_ms });
        }
        wait_on_latch(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The schema context `copilot.ask` shows the model for the calling role, as one-line CREATE statements: with a
/// question, exactly the tables and columns chosen for it (the whole readable schema while it fits
/// `copilot.context_budget_tokens`); without one (or NULL), every readable table. Tables in
/// `copilot.exclude_tables` are never shown; what the caller cannot read never reaches the selection.
#[pg_extern(name = "context", parallel_unsafe)]
fn context_question(question: default!(Option<&str>, "NULL")) -> String {
    let q = question.map(|q| validate_question(q).or_raise());
    context_for(q).or_raise().1
}

/// `context()` as extension version 0.2.0 declares it (symbol `context_wrapper`): a database not yet updated with
/// `ALTER EXTENSION copilot UPDATE` keeps working with this library.
#[pg_extern(parallel_unsafe, sql = false)]
fn context() -> String {
    context_for_caller().or_raise().1
}

/// What this session's last answered request cost, and its `copilot.history` id (NULL when it was not recorded):
/// one row, or none before its first answer.
#[pg_extern(name = "last_ask", parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn last_ask_with_history() -> TableIterator<
    'static,
    (
        name!(latency_ms, f64),
        name!(prompt_tokens, i32),
        name!(generated_tokens, i32),
        name!(decode_tok_s, f64),
        name!(prefix_tokens, i32),
        name!(prefix_cache_hit, bool),
        name!(history_id, Option<i64>),
    ),
> {
    let history_id = crate::memory::last_history_id();
    TableIterator::new(last_cost().map(|(a, b, c, d, e, f)| (a, b, c, d, e, f, history_id)))
}

/// This session's last answer's cost, as `last_ask()` lists it.
fn last_cost() -> Option<(f64, i32, i32, f64, i32, bool)> {
    LAST_ASK.get().map(|m| {
        (
            m.latency_ms,
            m.prompt_tokens as i32,
            m.generated_tokens as i32,
            m.decode_tok_s,
            m.prefix_tokens as i32,
            m.prefix_cache_hit,
        )
    })
}

/// `last_ask()` as extension version 0.1.0 declares it (symbol `last_ask_wrapper`, no `history_id`).
#[pg_extern(parallel_unsafe, sql = false)]
#[allow(clippy::type_complexity)]
fn last_ask() -> TableIterator<
    'static,
    (
        name!(latency_ms, f64),
        name!(prompt_tokens, i32),
        name!(generated_tokens, i32),
        name!(decode_tok_s, f64),
        name!(prefix_tokens, i32),
        name!(prefix_cache_hit, bool),
    ),
> {
    TableIterator::new(last_cost())
}

/// The worker's state, the model it serves, and request counters.
#[pg_extern(parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn status() -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(model, String),
        name!(model_sha256, Option<String>),
        name!(model_arch, Option<String>),
        name!(model_bytes, i64),
        name!(load_ms, f64),
        name!(threads, i32),
        name!(worker_pid, Option<i32>),
        name!(requests_served, i64),
        name!(requests_failed, i64),
        name!(requests_cancelled, i64),
        name!(queue_depth, i32),
        name!(last_latency_ms, Option<f64>),
        name!(last_prompt_tokens, Option<i32>),
        name!(last_decode_tok_s, Option<f64>),
        name!(message, Option<String>),
        name!(last_prefix_tokens, Option<i32>),
        name!(last_prefix_cache_hit, Option<bool>),
        name!(prefix_cache_entries, i64),
        name!(prefix_cache_mb, f64),
        name!(prefix_cache_limit_mb, f64),
        name!(prefix_cache_hits, i64),
        name!(prefix_cache_misses, i64),
        name!(prefix_cache_evictions, i64),
        name!(answers, pgrx::JsonB),
    ),
> {
    ensure_preloaded().or_raise();
    let s = BOARD.share().status();
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let c = s.prefix_cache;
    const MB: f64 = 1024.0 * 1024.0;
    let row = (
        s.state.as_str().to_string(),
        s.model.clone(),
        opt(&s.model_sha256),
        opt(&s.model_arch),
        s.model_bytes as i64,
        s.load_ms,
        s.threads as i32,
        s.worker_pid,
        s.served as i64,
        s.failed as i64,
        s.cancelled as i64,
        s.queue_depth as i32,
        s.last.map(|m| m.latency_ms),
        s.last.map(|m| m.prompt_tokens as i32),
        s.last.map(|m| m.decode_tok_s),
        opt(&s.message),
        s.last.map(|m| m.prefix_tokens as i32),
        s.last.map(|m| m.prefix_cache_hit),
        c.entries as i64,
        c.bytes as f64 / MB,
        c.limit_bytes as f64 / MB,
        c.hits as i64,
        c.misses as i64,
        c.evictions as i64,
        pgrx::JsonB(answers_json(&s.pipeline, crate::history::JOURNAL.share().counts(), &s.embedder)),
    );
    TableIterator::once(row)
}

/// The answer pipeline's counters as `copilot.status()` shows them.
fn answers_json(p: &crate::shmem::PipelineCounts, (written, dropped): (u64, u64), encoder: &str) -> serde_json::Value {
    let ratio = |a: u64, b: u64| if b == 0 { serde_json::Value::Null } else { serde_json::json!(a as f64 / b as f64) };
    serde_json::json!({
        "asks": p.asks,
        "candidates": p.candidates,
        "planned_first_try": p.planned_first_try,
        "planned_first_try_rate": ratio(p.planned_first_try, p.candidates),
        "repairs": p.repairs,
        "repaired": p.repaired,
        "hints_applied": p.hints_applied,
        "votes": p.votes,
        "mean_vote_margin": ratio(p.margin_sum, p.votes),
        "refusals": p.refusals,
        "greedy_alone": p.greedy_alone,
        "history_written": written,
        "history_dropped": dropped,
        // The sentence encoder questions are grounded with (copilot.embedding_model), as the engine loaded it:
        // by meaning, or left out and why (then by spelling only). NULL until a model is loaded.
        "sentence_encoder": (!encoder.is_empty()).then_some(encoder),
    })
}

/// `copilot.ask` with its working shown: the SQL it would return (NULL when it would refuse) and, for every
/// candidate, what the model wrote, why it did or did not plan, its vote group and row count, the repairs made, and
/// why the winner won, and the verified examples shown with the question. For debugging answers (not recorded in
/// copilot.history); it never raises for a refusal.
#[pg_extern(strict, parallel_unsafe)]
fn ask_verbose(question: &str) -> pgrx::JsonB {
    let q = validate_question(question).or_raise();
    ensure_preloaded().or_raise();
    let (catalog, context, qualifier) = context_and_qualifier(Some(q)).or_raise();
    let examples = crate::memory::examples_for(q, &catalog).or_raise();
    let ids: Vec<i64> = examples.iter().map(|(id, _)| *id).collect();
    let turns: Vec<_> = examples.into_iter().map(|(_, e)| e).collect();
    let (sql, report) = match crate::pipeline::answer(q, &catalog, &context, &qualifier, &turns) {
        Ok(a) => (Some(a.sql), a.report),
        Err(CopilotError::CannotAnswer { report, .. }) => (None, *report),
        Err(CopilotError::NoSql { raw }) => {
            let mut v = serde_json::json!({ "sql": null, "decision": "no SQL", "model_output": raw });
            v["question"] = serde_json::json!(q);
            return pgrx::JsonB(v);
        }
        Err(e) => e.raise(),
    };
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    v["sql"] = serde_json::json!(sql);
    v["examples"] = serde_json::json!(ids);
    pgrx::JsonB(v)
}
