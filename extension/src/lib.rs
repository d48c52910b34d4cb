//! copilot: natural-language questions to SQL inside PostgreSQL.
//!
//! This crate is the PostgreSQL boundary only; everything that does not need PostgreSQL lives in `copilot-core`.
//! - [`gucs`]: every setting;
//! - [`errors`]: every error and its SQLSTATE, message, DETAIL and HINT;
//! - [`shmem`]: the shared board (worker state + request slots) and its protocol;
//! - [`worker`]: the background worker that owns the model;
//! - [`catalog`]: the schema context, read through SPI as the calling role;
//! - [`api`]: `copilot.ask`, `copilot.context`, `copilot.status`, `copilot.last_ask`;
//! - [`pipeline`]: what `ask` does between question and SQL: candidates, planning as the caller, repair, vote,
//!   refusal;
//! - [`pg_gate`]: the gate's rules checked again on PostgreSQL's own parse tree;
//! - [`history`]: `copilot.history`, written by a history writer worker so failed asks are recorded too;
//! - [`memory`]: the analyst's loop — verified examples (`teach`, `feedback`), follow-ups, `refine`, `explain`;
//! - [`exec`]: `copilot.run_sql` and `copilot.run`: gated, read-only, time- and row-bounded execution.
//!
//! Rule at every crossing: only a process's main thread calls into PostgreSQL; the model runs on threads that
//! never do, created with all signals blocked.

use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

mod api;
mod catalog;
mod errors;
mod exec;
pub mod gucs;
mod history;
mod memory;
mod pg_gate;
mod pipeline;
mod shmem;
mod spi;
mod worker;

pgrx::pg_module_magic!(name, version);

// The tables, policies and grants of copilot.history and copilot.examples (sql/ has the same in the upgrade
// script from 0.1.0).
pgrx::extension_sql_file!("objects.sql", name = "objects");

/// Set in the postmaster's `_PG_init` when loaded through shared_preload_libraries; inherited by every backend
/// it forks. Without it there is no board and no worker, and the functions say so.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub(crate) fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a PostgreSQL global on the main thread during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::register(preloading);
    if !preloading {
        return;
    }
    shmem::init();
    history::init();
    worker::register();
    PRELOADED.store(true, Ordering::Relaxed);
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Configuration of the throwaway cluster `cargo pgrx test` starts.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'copilot'",
            concat!("copilot.model = '", env!("COPILOT_TEST_MODEL_PATH"), "'"),
            "copilot.threads = 2",
            "copilot.max_new_tokens = 48",
            // The tiny model is no SQL model: one candidate, no repairs, no yes/no verdict, no value hints (its
            // greedy answers, which these tests rely on, were recorded without them); tests/sql covers the pipeline
            // and the hints.
            "copilot.candidates = 1",
            "copilot.repair_attempts = 0",
            "copilot.refusal_threshold = 1",
            "copilot.value_hints = 0",
        ]
    }
}
