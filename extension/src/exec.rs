//! Running model SQL: `copilot.run_sql` and `copilot.run`.
//!
//! Layers, outermost first (see docs/safety.md when the adversarial suite lands):
//! 1. the gate (`copilot_core::sql::gate::check`): one query, no data-modifying parts, no deny-listed functions;
//! 2. the text is wrapped as a subquery of our own `SELECT to_jsonb(q) … LIMIT n`, so PostgreSQL's own parser also
//!    refuses several statements or a data-modifying CTE in that position;
//! 3. an internal subtransaction that is **always rolled back**, with `transaction_read_only` on inside it and SPI
//!    in read-only mode: a write that slips through (a volatile user function, say) fails with 25006 and leaves
//!    nothing behind; the SET LOCAL dies with the rollback, so the caller's transaction is as it was;
//! 4. a statement timer armed explicitly (`SET LOCAL statement_timeout` would not bound a statement already
//!    running) for `copilot.statement_timeout`, or the caller's own remaining statement time if that is shorter;
//!    the caller's timer is restored afterwards;
//! 5. the calling role's privileges and row-level security: the function is SECURITY INVOKER.

use crate::errors::{CopilotError, OrRaise};
use crate::gucs;
use copilot_core::sql::gate;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::ffi::c_int;

/// `STATEMENT_TIMEOUT` in PostgreSQL 15's `enum TimeoutId` (utils/timeout.h: STARTUP_PACKET_TIMEOUT,
/// DEADLOCK_TIMEOUT, LOCK_TIMEOUT, STATEMENT_TIMEOUT, …). pgrx does not bind utils/timeout.h.
const STATEMENT_TIMEOUT: c_int = 3;

extern "C-unwind" {
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn enable_timeout_at(id: c_int, fin_time: pg_sys::TimestampTz);
    fn disable_timeout(id: c_int, keep_indicator: bool);
    fn get_timeout_active(id: c_int) -> bool;
    fn get_timeout_finish_time(id: c_int) -> pg_sys::TimestampTz;
}

/// The caller's statement timer, saved so it can be put back exactly.
struct OuterTimer {
    active: bool,
    finish: pg_sys::TimestampTz,
}

impl OuterTimer {
    fn save() -> OuterTimer {
        // SAFETY: plain reads of the timeout module's state, on the main thread; guarded so an ERROR cannot longjmp
        // across Rust frames.
        unsafe {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
                let active = get_timeout_active(STATEMENT_TIMEOUT);
                OuterTimer { active, finish: if active { get_timeout_finish_time(STATEMENT_TIMEOUT) } else { 0 } }
            })
        }
    }

    /// Arm STATEMENT_TIMEOUT for `ms`, or for what is left of the caller's, whichever ends first.
    fn arm(&self, ms: i32) {
        // SAFETY: as in `save`.
        unsafe {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
                let mut delay = ms.max(1) as i64;
                if self.active {
                    let left_ms = (self.finish - pg_sys::GetCurrentTimestamp()) / 1000;
                    delay = delay.min(left_ms.max(1));
                }
                enable_timeout_after(STATEMENT_TIMEOUT, delay.min(i32::MAX as i64) as c_int);
            })
        }
    }

    /// Disarm ours and re-arm the caller's at its original deadline (firing at once if that has passed).
    fn restore(&self) {
        // SAFETY: as in `save`.
        unsafe {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
                disable_timeout(STATEMENT_TIMEOUT, false);
                if self.active {
                    enable_timeout_at(STATEMENT_TIMEOUT, self.finish);
                }
            })
        }
    }
}

/// The statement's text without a trailing `;`, ready to be wrapped as a subquery of ours.
fn body(sql: &str) -> &str {
    sql.trim().trim_end_matches(';')
}

/// Run `query` (text lines of a one-column SQL of ours) read-only in an internal subtransaction that is always
/// rolled back, under a statement timer of `timeout_ms` (or the caller's remaining statement time, if shorter),
/// as the caller. A PostgreSQL error comes back as [`CopilotError::Execution`] with `sql` in its DETAIL; the
/// caller's transaction, timer and mode are as they were either way.
fn read_only(query: &str, timeout_ms: i32, sql: &str) -> Result<Vec<String>, CopilotError> {
    // SAFETY: saving the caller's memory context and resource owner on the main thread, to restore them after the
    // internal subtransaction as PL/Python and PL/Perl do around BeginInternalSubTransaction.
    let (ctx, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    let end_subxact = || {
        // SAFETY: called exactly once per BeginInternalSubTransaction below, on the main thread, after SPI has been
        // disconnected; then the caller's context and owner are put back.
        unsafe {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
        }
    };
    let outer = OuterTimer::save();
    // SAFETY: begins a subtransaction of the caller's transaction; every path below ends it with end_subxact.
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
    }
    let rows = PgTryBuilder::new(|| {
        crate::spi::one::<String>("SELECT set_config('transaction_read_only', 'on', true)", &[])
            .expect("set transaction_read_only");
        outer.arm(timeout_ms);
        let rows: Vec<String> = crate::spi::texts(query);
        outer.restore();
        Ok(rows)
    })
    .catch_others(|e| {
        outer.restore();
        match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => Err(CopilotError::Execution {
                code: r.sql_error_code(),
                message: r.message().to_string(),
                detail: r.detail().map(str::to_string),
                hint: r.hint().map(str::to_string),
                sql: sql.to_string(),
            }),
            other => {
                end_subxact();
                other.rethrow()
            }
        }
    })
    .execute();
    end_subxact();
    rows
}

/// The gate, then the same rules on PostgreSQL's own parse tree: what SQL from outside (a model, a user) must
/// pass before copilot plans, runs or stores it. A refusal carries the SQL.
pub fn gated(sql: &str) -> Result<gate::Checked, CopilotError> {
    let refused = |rejection| CopilotError::Refused { rejection, sql: sql.to_string() };
    let checked = gate::check(sql).map_err(refused)?;
    crate::pg_gate::check(sql).map_err(refused)?;
    Ok(checked)
}

/// Check and execute `sql` (see the module documentation). Returns the rows as JSON objects and whether the
/// result was cut at `copilot.max_rows`.
pub fn execute(sql: &str) -> Result<(Vec<pgrx::JsonB>, bool), CopilotError> {
    gated(sql)?;
    let max_rows = gucs::MAX_ROWS.get().max(0) as i64;
    // The newline keeps a trailing `-- comment` in the model's SQL from swallowing our closing parenthesis.
    let wrapped = format!("SELECT to_jsonb(q)::text FROM (\n{}\n) AS q LIMIT {}", body(sql), max_rows + 1);
    let rows = read_only(&wrapped, gucs::STATEMENT_TIMEOUT_MS.get(), sql)?;
    let mut out: Vec<pgrx::JsonB> =
        rows.iter().map(|t| pgrx::JsonB(serde_json::from_str(t).unwrap_or(serde_json::Value::Null))).collect();
    let capped = out.len() as i64 > max_rows;
    if capped {
        out.truncate(max_rows as usize);
        pgrx::notice!("copilot: the result was cut at copilot.max_rows ({max_rows}) rows");
    }
    Ok((out, capped))
}

/// Plan `sql` (already through the gate) as the caller, exactly as [`execute`] would run it, without reading any
/// data: `EXPLAIN (COSTS OFF)` in the same rolled-back, read-only subtransaction. Returns the plan's text.
pub fn plan(sql: &str) -> Result<String, CopilotError> {
    let wrapped = format!("EXPLAIN (COSTS OFF) SELECT q::text FROM (\n{}\n) AS q", body(sql));
    Ok(read_only(&wrapped, gucs::STATEMENT_TIMEOUT_MS.get(), sql)?.join("\n"))
}

/// The result of `sql` (already through the gate) as the caller sees it, run read-only under `timeout_ms` and cut
/// at `max_rows` + 1 rows: each row as its column values in PostgreSQL's text form (column order kept).
pub fn result_rows(sql: &str, timeout_ms: i32, max_rows: usize) -> Result<Vec<Vec<Option<String>>>, CopilotError> {
    let wrapped = format!("SELECT q::text FROM (\n{}\n) AS q LIMIT {}", body(sql), max_rows + 1);
    Ok(read_only(&wrapped, timeout_ms, sql)?.iter().map(|r| record_fields(r)).collect())
}

/// The fields of a record in PostgreSQL's text form: `(1,"a b",,"x""y")` → `1`, `a b`, NULL, `x"y`. An unquoted
/// empty field is NULL; a quoted one is a string (possibly empty); `""` inside quotes and `\` escape.
pub fn record_fields(text: &str) -> Vec<Option<String>> {
    let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')).unwrap_or(text);
    let mut out = Vec::new();
    let mut field = String::new();
    let (mut quoted, mut in_quotes) = (false, false);
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, in_quotes) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => in_quotes = false,
            ('"', false) => (in_quotes, quoted) = (true, true),
            ('\\', _) => field.extend(chars.next()),
            (',', false) => {
                out.push((quoted || !field.is_empty()).then(|| std::mem::take(&mut field)));
                quoted = false;
            }
            (c, _) => field.push(c),
        }
    }
    out.push((quoted || !field.is_empty()).then_some(field));
    out
}

/// Run SQL (typically model SQL a user edited) through the gate, read-only, time- and row-bounded, as the caller.
/// One JSON object per row, keyed by column name.
#[pg_extern(strict, parallel_unsafe)]
fn run_sql(sql: &str) -> SetOfIterator<'static, pgrx::JsonB> {
    let (rows, _) = execute(sql).or_raise();
    SetOfIterator::new(rows)
}

/// Ask the model as `copilot.ask` does (candidates checked against the database, repaired, voted) and run the
/// chosen SQL as `copilot.run_sql` does.
#[pg_extern(strict, parallel_unsafe)]
fn run(question: &str) -> SetOfIterator<'static, pgrx::JsonB> {
    let q = crate::api::validate_question(question).or_raise();
    crate::api::ensure_preloaded().or_raise();
    let ask =
        crate::memory::Ask { kind: "run", question: q, prompt_question: q.to_string(), follow_up: None, turns: vec![] };
    let rows = crate::memory::answer_recorded(ask, |sql| {
        let (rows, _) = execute(sql)?;
        let n = rows.len() as i64;
        Ok((rows, Some(n)))
    })
    .or_raise();
    SetOfIterator::new(rows)
}

#[cfg(test)]
mod tests {
    use super::record_fields;

    #[test]
    fn record_text_splits_into_fields() {
        let f = |s: &str| record_fields(s);
        assert_eq!(f("(1,abc)"), vec![Some("1".into()), Some("abc".into())]);
        assert_eq!(
            f(r#"(1,"a, b",,"x""y","")"#),
            vec![Some("1".into()), Some("a, b".into()), None, Some("x\"y".into()), Some(String::new())]
        );
        assert_eq!(f(r#"("back\\slash")"#), vec![Some("back\\slash".into())]);
        assert_eq!(f("(42)"), vec![Some("42".into())]);
    }
}
