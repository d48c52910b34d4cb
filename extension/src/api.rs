//! The SQL functions: `copilot.ask`, `copilot.context`, `copilot.status`.
//!
//! A session never runs the model: it builds the schema context through SPI (as itself, so privileges apply),
//! posts the request on the shared board, sets the worker's latch and waits on its own latch. The wait is
//! interruptible: `CHECK_FOR_INTERRUPTS` runs after every wake-up, so query cancel, `statement_timeout` and
//! backend termination end it; a [`Claim`] guard then marks the request abandoned and the worker stops generating.

use crate::shmem::{self, FailKind, SlotState, WorkerState, BOARD, INPUT_BYTES, SLOTS};
use crate::{catalog, gucs};
use copilot_core::schema::Catalog;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long a session waits for a worker to appear (it restarts within a second or two) before saying none runs.
const NO_WORKER_GRACE: Duration = Duration::from_secs(10);

/// Raise an ERROR with a SQLSTATE, a message, and optional DETAIL and HINT. Never returns.
pub(crate) fn raise(code: PgSqlErrorCode, message: String, detail: Option<String>, hint: Option<&str>) -> ! {
    let mut r = ErrorReport::new(code, message, "copilot");
    if let Some(d) = detail {
        r = r.set_detail(d);
    }
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
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

/// A request slot this session holds. Dropping it without [`Claim::release`] — an ERROR unwinding through the
/// wait — marks the request abandoned so the worker stops working on it and frees the slot.
struct Claim {
    slot: usize,
    ticket: u64,
}

impl Claim {
    fn release(self) {
        {
            let mut b = BOARD.exclusive();
            let s = &mut b.slots[self.slot];
            if s.ticket == self.ticket {
                s.set_state(SlotState::Free);
            }
        }
        std::mem::forget(self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut b = BOARD.exclusive();
        let worker = b.worker_latch;
        let s = &mut b.slots[self.slot];
        if s.ticket != self.ticket {
            return;
        }
        match s.state() {
            SlotState::Pending | SlotState::Running => {
                s.set_state(SlotState::Abandoned);
                // SAFETY: the worker's latch address, read under the board's lock.
                unsafe { shmem::set_latch(worker) };
            }
            SlotState::Done | SlotState::Failed => s.set_state(SlotState::Free),
            _ => {}
        }
    }
}

fn ensure_preloaded() {
    if !crate::preloaded() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "copilot: the model worker is not running: copilot is not in shared_preload_libraries".into(),
            None,
            Some("Add copilot to shared_preload_libraries in postgresql.conf and restart PostgreSQL."),
        );
    }
}

/// Wait until the worker is ready, or raise why it is not.
fn wait_until_ready(deadline: Instant, timeout_ms: i32) {
    let start = Instant::now();
    loop {
        let (state, latch, message, model) = {
            let b = BOARD.share();
            (b.worker_state(), b.worker_latch, b.message.get().to_string(), b.model.get().to_string())
        };
        match state {
            WorkerState::Ready if latch != 0 => return,
            WorkerState::Failed => raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("copilot: the model failed to load: {message}"),
                Some(format!("copilot.model = {model}")),
                Some("Fix copilot.model (a GGUF file path, or hf:<owner>/<repo>/<file> in the Hugging Face cache) and run SELECT pg_reload_conf(); scripts/fetch-model downloads the default model."),
            ),
            _ if latch == 0 && start.elapsed() > NO_WORKER_GRACE.min(deadline.saturating_duration_since(start)) => {
                raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "copilot: the model worker is not running".into(),
                    Some(format!("worker state: {}", state.as_str())),
                    Some("Check the server log for the copilot worker; it restarts automatically after a crash."),
                )
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            raise(
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                format!("copilot: the model is still loading after copilot.request_timeout ({timeout_ms} ms)"),
                Some(format!("copilot.model = {model}")),
                Some("Try again shortly, or raise copilot.request_timeout."),
            );
        }
        wait_on_latch(Duration::from_millis(50));
    }
}

fn claim_slot(context: &str, question: &str, max_new_tokens: u32, deadline: Instant, timeout_ms: i32) -> Claim {
    loop {
        {
            let mut b = BOARD.exclusive();
            if let Some(i) = (0..SLOTS).find(|&i| b.slots[i].state() == SlotState::Free) {
                b.next_ticket += 1;
                let ticket = b.next_ticket;
                let worker = b.worker_latch;
                let s = &mut b.slots[i];
                s.ticket = ticket;
                // SAFETY: MyProcPid is set at backend start and never changes.
                s.owner_pid = unsafe { pg_sys::MyProcPid };
                s.client_latch = shmem::my_latch();
                s.max_new_tokens = max_new_tokens;
                s.input.set(&format!("{context}{question}"));
                s.context_len = context.len() as u32;
                s.fail_kind = 0;
                s.result.clear();
                s.raw.clear();
                s.set_state(SlotState::Pending);
                // SAFETY: the worker's latch address, read under the board's lock.
                unsafe { shmem::set_latch(worker) };
                return Claim { slot: i, ticket };
            }
        }
        if Instant::now() >= deadline {
            raise(
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                format!("copilot: no free request slot within copilot.request_timeout ({timeout_ms} ms)"),
                Some(format!("{SLOTS} requests are already queued or running")),
                None,
            );
        }
        wait_on_latch(Duration::from_millis(10));
    }
}

/// Build the caller's context, or raise when there is nothing to show the model.
fn context_for_caller() -> (Catalog, String) {
    let configured = gucs::schemas();
    let (catalog, opts) = catalog::load(&configured).unwrap_or_else(|e| {
        raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("copilot: cannot read the catalog: {e}"), None, None)
    });
    if catalog.is_empty() {
        let scope = if configured.is_empty() {
            "the search_path".to_string()
        } else {
            format!("copilot.schemas ({})", configured.join(", "))
        };
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("copilot: no tables you can SELECT from in {scope}"),
            None,
            Some("Set search_path or copilot.schemas to the schemas holding your tables, and check your privileges."),
        );
    }
    let text = catalog.render(&opts);
    (catalog, text)
}

/// Turn a natural-language question into one SQL query over the tables the caller can read.
#[pg_extern(strict, parallel_unsafe)]
fn ask(question: &str) -> String {
    ask_sql(question)
}

/// `copilot.ask`'s work: validate, describe the caller's tables, ask the worker.
pub(crate) fn ask_sql(question: &str) -> String {
    ask_with_catalog(question).0
}

/// As [`ask_sql`], also returning the catalog and context the answer was generated from (for the gate's name
/// check and the repair round trip in `copilot.run`).
pub(crate) fn ask_with_catalog(question: &str) -> (String, Catalog, String) {
    let q = validate_question(question);
    ensure_preloaded();
    let (catalog, context) = context_for_caller();
    let sql = generate_sql(&context, q);
    (sql, catalog, context)
}

fn validate_question(question: &str) -> &str {
    let max_chars = gucs::MAX_QUESTION_CHARS.get().max(1) as usize;
    let q = question.trim();
    if q.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "copilot: the question is empty".into(), None, None);
    }
    let n = q.chars().count();
    if n > max_chars {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("copilot: the question is {n} characters long, more than copilot.max_question_chars ({max_chars})"),
            None,
            Some("Shorten the question or raise copilot.max_question_chars."),
        );
    }
    if q.contains('\0') {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "copilot: the question contains a NUL character".into(),
            None,
            None,
        );
    }
    q
}

/// Send (context, question) to the worker and wait for the SQL. The question is not validated here: callers
/// validate what users typed; `copilot.run`'s repair question is ours.
pub(crate) fn generate_sql(context: &str, q: &str) -> String {
    if context.len() + q.len() > INPUT_BYTES {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "copilot: the schema context is {} bytes, more than the {INPUT_BYTES} a request can carry",
                context.len()
            ),
            None,
            Some("Narrow copilot.schemas to the schemas the question is about."),
        );
    }

    let timeout_ms = gucs::REQUEST_TIMEOUT_MS.get();
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(1) as u64);
    wait_until_ready(deadline, timeout_ms);
    let max_new = gucs::MAX_NEW_TOKENS.get().max(1) as u32;
    let claim = claim_slot(context, q, max_new, deadline, timeout_ms);

    loop {
        let outcome = {
            let b = BOARD.share();
            let s = &b.slots[claim.slot];
            if s.ticket != claim.ticket {
                Some(Err((FailKind::WorkerRestarted, "the request was lost (worker restarted)".to_string())))
            } else {
                match s.state() {
                    SlotState::Done => Some(Ok((s.result.get().to_string(), s.raw.get().to_string()))),
                    SlotState::Failed => Some(Err((FailKind::from_u32(s.fail_kind), s.result.get().to_string()))),
                    _ => None,
                }
            }
        };
        match outcome {
            Some(Ok((sql, raw))) => {
                claim.release();
                if sql.trim().is_empty() {
                    raise(
                        PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                        "copilot: the model's answer contains no SQL query".into(),
                        Some(format!("model output: {raw}")),
                        Some("Rephrase the question, naming the tables or columns it is about."),
                    );
                }
                return sql;
            }
            Some(Err((kind, reason))) => {
                claim.release();
                let code = match kind {
                    FailKind::PromptTooLong => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    FailKind::ModelUnavailable | FailKind::WorkerRestarted => {
                        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
                    }
                    _ => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                };
                raise(code, format!("copilot: {reason}"), None, None);
            }
            None => {}
        }
        if Instant::now() >= deadline {
            drop(claim);
            raise(
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                format!("copilot: no answer within copilot.request_timeout ({timeout_ms} ms)"),
                None,
                Some("The worker may be busy with other requests; see copilot.status()."),
            );
        }
        wait_on_latch(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The schema context `copilot.ask` would show the model for the calling role, as one-line CREATE statements.
#[pg_extern(parallel_unsafe)]
fn context() -> String {
    context_for_caller().1
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
    ),
> {
    ensure_preloaded();
    let b = BOARD.share();
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let served = b.served > 0;
    let c = b.prefix_cache;
    const MB: f64 = 1024.0 * 1024.0;
    let row = (
        b.worker_state().as_str().to_string(),
        b.model.get().to_string(),
        opt(b.model_sha256.get()),
        opt(b.model_arch.get()),
        b.model_bytes as i64,
        b.load_ms,
        b.threads as i32,
        (b.worker_latch != 0).then_some(b.worker_pid),
        b.served as i64,
        b.failed as i64,
        b.cancelled as i64,
        b.queue_depth() as i32,
        served.then_some(b.last_latency_ms),
        served.then_some(b.last_prompt_tokens as i32),
        served.then_some(b.last_decode_tok_s),
        opt(b.message.get()),
        served.then_some(b.last_prefix_tokens as i32),
        served.then_some(b.last_prefix_cache_hit != 0),
        c.entries as i64,
        c.bytes as f64 / MB,
        c.limit_bytes as f64 / MB,
        c.hits as i64,
        c.misses as i64,
        c.evictions as i64,
    );
    TableIterator::once(row)
}
