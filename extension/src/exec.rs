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

/// Check and execute `sql` (see the module documentation). Returns the rows as JSON objects and whether the
/// result was cut at `copilot.max_rows`.
pub fn execute(sql: &str) -> Result<(Vec<pgrx::JsonB>, bool), CopilotError> {
    if let Err(rejection) = gate::check(sql) {
        return Err(CopilotError::Refused { rejection, sql: sql.to_string() });
    }
    let body = sql.trim().trim_end_matches(';');
    let max_rows = gucs::MAX_ROWS.get().max(0) as i64;
    // The newline keeps a trailing `-- comment` in the model's SQL from swallowing our closing parenthesis.
    let wrapped = format!("SELECT to_jsonb(q)::text FROM (\n{body}\n) AS q LIMIT {}", max_rows + 1);
    let timeout_ms = gucs::STATEMENT_TIMEOUT_MS.get();

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
        Spi::run("SELECT set_config('transaction_read_only', 'on', true)").expect("set transaction_read_only");
        outer.arm(timeout_ms);
        let rows: Vec<String> = Spi::connect(|c| {
            c.select(wrapped.as_str(), None, &[])?
                .map(|row| row.get::<String>(1).map(|v| v.unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()
        })
        .expect("SPI select");
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
    let rows = rows?;

    let mut out: Vec<pgrx::JsonB> =
        rows.iter().map(|t| pgrx::JsonB(serde_json::from_str(t).unwrap_or(serde_json::Value::Null))).collect();
    let capped = out.len() as i64 > max_rows;
    if capped {
        out.truncate(max_rows as usize);
        pgrx::notice!("copilot: the result was cut at copilot.max_rows ({max_rows}) rows");
    }
    Ok((out, capped))
}

/// Run SQL (typically model SQL a user edited) through the gate, read-only, time- and row-bounded, as the caller.
/// One JSON object per row, keyed by column name.
#[pg_extern(strict, parallel_unsafe)]
fn run_sql(sql: &str) -> SetOfIterator<'static, pgrx::JsonB> {
    let (rows, _) = execute(sql).or_raise();
    SetOfIterator::new(rows)
}

/// Ask the model (see `copilot.ask`) and run its SQL as `copilot.run_sql` does. When the answer names tables or
/// columns the schema context does not have, the model is asked once more with those problems spelled out, and
/// the second answer is run (PostgreSQL reports whatever is still wrong).
#[pg_extern(strict, parallel_unsafe)]
fn run(question: &str) -> SetOfIterator<'static, pgrx::JsonB> {
    let (mut sql, catalog, context) = crate::api::ask_with_catalog(question).or_raise();
    if let Ok(checked) = gate::check(&sql) {
        let unknown = gate::unknown_names(&checked, &catalog);
        if !unknown.is_empty() {
            let problems: Vec<String> = unknown.iter().map(|u| u.to_string()).collect();
            pgrx::debug1!("copilot: repairing {sql:?}: {}", problems.join("; "));
            let repair = copilot_core::sql::prompt::repair_question(question.trim(), &sql, &problems);
            sql = crate::api::generate_sql(&context, &repair).or_raise();
        }
    }
    let (rows, _) = execute(&sql).or_raise();
    SetOfIterator::new(rows)
}
