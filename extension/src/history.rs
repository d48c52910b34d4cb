//! `copilot.history`: one row for every ask, run and refine — failed ones too.
//!
//! A failed ask ends in an ERROR, which rolls back everything the caller's transaction wrote, so the session does
//! not write its own row. It puts the record on a small shared-memory journal instead, and a **history writer**
//! (a dynamic background worker connected to that database, started on demand, one per database at a time)
//! inserts it in its own transaction and exits after a second with nothing to write. What this buys:
//! - failed and cancelled-by-refusal asks are recorded, and a caller's ROLLBACK does not erase its questions;
//! - asking works in a read-only transaction (the record is still written, by the writer) and on a hot standby
//!   (nothing can be written there: recording is skipped, the ask is not affected);
//! - the ask never waits for the insert: its cost is queueing a record (microseconds) plus, when no writer runs
//!   for the database, registering one. `copilot.last_ask()` waits (briefly) for the row's id when asked for it.
//!
//! When the journal is full (a writer cannot keep up, or cannot start: `max_worker_processes`), records are
//! dropped and counted (`copilot.status()`'s `answers.history_dropped`), never raised.

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use serde::Serialize;
use std::time::Duration;

/// Records waiting for a writer.
pub const JOURNAL_SLOTS: usize = 16;
/// Largest record (JSON); a longer question or SQL is cut to fit.
pub const RECORD_BYTES: usize = 16 * 1024;
/// Databases with a writer at the same time.
const WRITERS: usize = 8;
/// Ids of recent inserts, for `copilot.last_ask()`.
const RECEIPTS: usize = 64;
/// A writer that has not shown a sign of life for this long is taken for dead and replaced.
const WRITER_STALE_MS: u64 = 10_000;
/// A writer exits after this long with nothing to write.
const WRITER_IDLE_MS: u64 = 1_000;

/// One row of `copilot.history`, as the session hands it to the writer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// Seconds since the epoch when the ask began.
    pub at_epoch: f64,
    pub role: String,
    pub kind: &'static str,
    pub question: String,
    pub follow_up: Option<i64>,
    pub schema_fingerprint: Option<String>,
    pub sql: Option<String>,
    /// SQLSTATE; `00000` when answered.
    pub outcome: String,
    pub message: Option<String>,
    pub candidates: Option<i32>,
    pub repairs: Option<i32>,
    pub examples: Vec<i64>,
    pub latency_ms: f64,
    pub rows_returned: Option<i64>,
}

impl Record {
    /// The record as JSON that fits a journal slot: the SQL, then the question, are shortened when it would not.
    fn to_json(&self) -> String {
        let mut r = self.clone();
        for pass in 1..=4 {
            let s = serde_json::to_string(&r).unwrap_or_default();
            if s.len() <= RECORD_BYTES {
                return s;
            }
            let cut = |t: &mut String, keep: usize| {
                if t.len() > keep {
                    let mut end = keep;
                    while !t.is_char_boundary(end) {
                        end -= 1;
                    }
                    t.truncate(end);
                    t.push_str(" …");
                }
            };
            // Escaping can make a text longer in JSON than in memory: each pass keeps less.
            let keep = RECORD_BYTES / (4 << pass);
            if let Some(sql) = r.sql.as_mut() {
                cut(sql, keep);
            }
            cut(&mut r.question, keep);
            if let Some(m) = r.message.as_mut() {
                cut(m, keep / 2);
            }
        }
        String::new()
    }
}

/// What became of a queued record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    Queued,
    Written(i64),
    /// Dropped, or too old to remember.
    Unknown,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    /// 0 free, 1 queued, 2 taken by a writer.
    state: u32,
    db: u32,
    /// The writer that took it (state 2).
    taker: i32,
    seq: u64,
    record: crate::shmem::Text<RECORD_BYTES>,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Writer {
    /// 0: no writer.
    db: u32,
    pid: i32,
    heartbeat_ms: u64,
}

/// The journal: records waiting for their database's writer, the writers running, and recent receipts.
#[repr(C)]
pub struct Journal {
    entries: [Entry; JOURNAL_SLOTS],
    writers: [Writer; WRITERS],
    receipts: [(u64, i64); RECEIPTS],
    next_receipt: usize,
    next_seq: u64,
    written: u64,
    dropped: u64,
}

impl Default for Journal {
    fn default() -> Self {
        // SAFETY: every field is an integer, a byte array or an array/struct of those (repr(C)), so all-zero is a
        // valid value: free entries, no writers, empty receipts.
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: repr(C), no pointers, only accessed under its LWLock.
unsafe impl PGRXSharedMemory for Journal {}

impl Journal {
    #[cfg(test)]
    fn boxed() -> Box<Journal> {
        // SAFETY: all-zero is a valid Journal (see Default).
        unsafe { crate::shmem::zeroed_box() }
    }

    /// Queue a record for database `db`. Returns its sequence number and whether the caller must start a writer
    /// for `db` (none registered, or the registered one is stale — it is then replaced by a placeholder the new
    /// writer takes over), or `None` when the journal is full (the record is dropped and counted).
    pub fn queue(&mut self, db: u32, json: &str, now_ms: u64) -> Option<(u64, bool)> {
        let Some(e) = self.entries.iter_mut().find(|e| e.state == 0) else {
            self.dropped += 1;
            return None;
        };
        self.next_seq += 1;
        let seq = self.next_seq;
        e.state = 1;
        e.db = db;
        e.seq = seq;
        e.record.set(json);
        let alive = self.writers.iter().any(|w| w.db == db && now_ms.saturating_sub(w.heartbeat_ms) < WRITER_STALE_MS);
        if alive {
            return Some((seq, false));
        }
        match self.writers.iter_mut().find(|w| w.db == db) {
            Some(w) => {
                // A writer silent this long died (or hangs): what it had taken goes back in the queue.
                let dead = w.pid;
                *w = Writer { db, pid: 0, heartbeat_ms: now_ms };
                for e in self.entries.iter_mut().filter(|e| e.db == db && e.state == 2 && e.taker == dead) {
                    e.state = 1;
                }
            }
            None => match self.writers.iter_mut().find(|w| w.db == 0) {
                Some(w) => *w = Writer { db, pid: 0, heartbeat_ms: now_ms },
                // Every writer place is taken by other databases: the record waits until one frees up.
                None => return Some((seq, false)),
            },
        }
        Some((seq, true))
    }

    /// Starting a writer failed: forget its place, drop that database's queued records (nobody will write them).
    pub fn launch_failed(&mut self, db: u32) {
        for w in self.writers.iter_mut().filter(|w| w.db == db && w.pid == 0) {
            *w = Writer::default();
        }
        for e in self.entries.iter_mut().filter(|e| e.db == db && e.state == 1) {
            e.state = 0;
            self.dropped += 1;
        }
    }

    /// A writer for `db` takes up to `max` queued records (sequence, JSON) and shows it is alive.
    pub fn take(&mut self, db: u32, pid: i32, now_ms: u64, max: usize) -> Vec<(u64, String)> {
        // A placeholder (pid 0) becomes this writer; another writer's place is left alone.
        if let Some(w) = self.writers.iter_mut().find(|w| w.db == db && (w.pid == pid || w.pid == 0)) {
            w.pid = pid;
            w.heartbeat_ms = now_ms;
        }
        let mut out = Vec::new();
        for e in self.entries.iter_mut().filter(|e| e.db == db && e.state == 1).take(max) {
            e.state = 2;
            e.taker = pid;
            out.push((e.seq, e.record.get().to_string()));
        }
        out
    }

    /// The writer inserted record `seq` as row `id` (`None`: it could not, the record is dropped).
    pub fn done(&mut self, seq: u64, id: Option<i64>) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.state == 2 && e.seq == seq) {
            e.state = 0;
            e.record.clear();
        }
        match id {
            Some(id) => {
                self.receipts[self.next_receipt % RECEIPTS] = (seq, id);
                self.next_receipt += 1;
                self.written += 1;
            }
            None => self.dropped += 1,
        }
    }

    /// A writer with nothing left to take leaves — unless a record for its database arrived since it looked, in
    /// which case it must stay (returns false).
    pub fn leave(&mut self, db: u32, pid: i32) -> bool {
        if self.entries.iter().any(|e| e.db == db && e.state == 1) {
            return false;
        }
        for w in self.writers.iter_mut().filter(|w| w.db == db && w.pid == pid) {
            *w = Writer::default();
        }
        // Records it took and did not finish (it is leaving through an error) go back in the queue.
        for e in self.entries.iter_mut().filter(|e| e.db == db && e.state == 2 && e.taker == pid) {
            e.state = 1;
        }
        true
    }

    pub fn receipt(&self, seq: u64) -> Receipt {
        if let Some((_, id)) = self.receipts.iter().find(|(s, _)| *s == seq && seq != 0) {
            return Receipt::Written(*id);
        }
        if self.entries.iter().any(|e| e.state != 0 && e.seq == seq) {
            return Receipt::Queued;
        }
        Receipt::Unknown
    }

    /// (written, dropped) since the server started.
    pub fn counts(&self) -> (u64, u64) {
        (self.written, self.dropped)
    }
}

// SAFETY: the name is unique to this extension.
pub static JOURNAL: PgLwLock<Journal> = unsafe { PgLwLock::new(c"copilot_history_journal") };

pub fn init() {
    pgrx::pg_shmem_init!(JOURNAL);
}

pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}

pub fn now_epoch() -> f64 {
    since_epoch().as_secs_f64()
}

fn since_epoch() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// A short, stable name for a schema context (FNV-1a, 64 bits, hex): equal contexts, equal fingerprints.
pub fn fingerprint(context: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in context.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn recovery_in_progress() -> bool {
    // SAFETY: a plain read of shared recovery state, on the main thread.
    unsafe { pg_sys::RecoveryInProgress() }
}

fn my_database() -> u32 {
    // SAFETY: MyDatabaseId is set once a backend has connected and never changes.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Whether asks in this session are recorded now: `copilot.history` is on, the server is not a standby, and this
/// database's copilot has the table (0.2.0 on). Reads the catalog: call it before the work, not in an error path.
pub fn enabled() -> bool {
    gucs::HISTORY.get()
        && crate::preloaded()
        && !recovery_in_progress()
        && crate::spi::relation_exists("copilot.history")
}

/// Hand `record` to this database's history writer (no catalog access: safe on an error path). Returns the
/// record's sequence number (for [`receipt`]), or `None` when the journal is full or no writer could be started.
/// Never raises.
pub fn queue(record: &Record) -> Option<u64> {
    let db = my_database();
    let json = record.to_json();
    let queued = JOURNAL.exclusive().queue(db, &json, now_ms());
    let (seq, launch) = queued?;
    if launch && start_writer(db).is_err() {
        JOURNAL.exclusive().launch_failed(db);
        pgrx::debug1!("copilot: could not start a history writer; the record is dropped");
        return None;
    }
    Some(seq)
}

fn start_writer(db: u32) -> Result<(), String> {
    BackgroundWorkerBuilder::new("copilot history writer")
        .set_type("copilot history writer")
        .set_function("copilot_history_writer")
        .set_library("copilot")
        .set_argument(Some(pg_sys::Datum::from(db)))
        .enable_spi_access()
        .set_restart_time(None)
        .load_dynamic()
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// The id `copilot.history` gave record `seq`, waiting up to `wait` for the writer.
pub fn receipt(seq: u64, wait: Duration) -> Option<i64> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let r = JOURNAL.share().receipt(seq);
        match r {
            Receipt::Written(id) => return Some(id),
            Receipt::Unknown => return None,
            Receipt::Queued if std::time::Instant::now() >= deadline => return None,
            Receipt::Queued => crate::api::sleep(Duration::from_millis(5)),
        }
    }
}

const INSERT: &str = "INSERT INTO copilot.history (at, role, kind, question, follow_up, schema_fingerprint, sql, \
     outcome, message, candidates, repairs, examples, latency_ms, rows_returned) \
     SELECT to_timestamp((s.j->>'at_epoch')::float8), r.role, r.kind, r.question, r.follow_up, r.schema_fingerprint, r.sql, \
            r.outcome, r.message, r.candidates, r.repairs, r.examples, r.latency_ms, r.rows_returned \
     FROM (SELECT $1::pg_catalog.jsonb AS j) AS s, pg_catalog.jsonb_populate_record(NULL::copilot.history, s.j) AS r \
     RETURNING id";

/// Run `f` (SPI work) in its own subtransaction: kept when it returns, rolled back when PostgreSQL raises, so one
/// failing statement (a record PostgreSQL refuses, a retention DELETE hitting lock_timeout) is logged and the writer
/// goes on.
fn guarded<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    // SAFETY: saving the memory context and resource owner around an internal subtransaction, on the writer's main
    // thread, as PL/Python and PL/Perl do.
    let (ctx, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: begins a subtransaction of the writer's transaction; both paths below end it.
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
    }
    let r = PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                Err(r.message().to_string())
            }
            other => Err(format!("{other:?}")),
        })
        .execute();
    // SAFETY: ends the subtransaction begun above (kept on success, rolled back on error), then restores the
    // context and owner.
    unsafe {
        match r {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(ctx);
        pg_sys::CurrentResourceOwner = owner;
    }
    match r {
        Ok(v) => Some(v),
        Err(message) => {
            pgrx::warning!("copilot history writer: {what} failed: {message}");
            None
        }
    }
}

fn insert_one(json: &str) -> Option<i64> {
    guarded("a record (dropped)", || Spi::get_one_with_args::<i64>(INSERT, &[json.into()]).ok().flatten()).flatten()
}

/// The history writer: connected to one database as the bootstrap superuser, it inserts that database's queued
/// records, each batch in one transaction, applies `copilot.history_days`, and exits when idle.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn copilot_history_writer(arg: pg_sys::Datum) {
    let db = arg.value() as u32;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    let pid = crate::api::my_pid();
    let days = gucs::HISTORY_DAYS.get();
    let ready = BackgroundWorker::transaction(|| {
        // The writer runs as the bootstrap superuser: no name it uses may resolve through a schema a user can
        // create objects in (CVE-2018-1058). Functions and operators then come from pg_catalog only.
        let _ = Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)");
        let exists = crate::spi::relation_exists("copilot.history");
        if exists && days > 0 {
            guarded("the copilot.history_days clean-up", || {
                Spi::run_with_args(
                    "DELETE FROM copilot.history WHERE at < pg_catalog.now() - pg_catalog.make_interval(days => $1)",
                    &[days.into()],
                )
            });
        }
        exists
    });
    let mut idle_since = std::time::Instant::now();
    loop {
        if BackgroundWorker::sigterm_received() {
            break;
        }
        let batch = JOURNAL.exclusive().take(db, pid, now_ms(), 32);
        if batch.is_empty() {
            if idle_since.elapsed() >= Duration::from_millis(WRITER_IDLE_MS) && JOURNAL.exclusive().leave(db, pid) {
                return;
            }
            BackgroundWorker::wait_latch(Some(Duration::from_millis(20)));
            continue;
        }
        idle_since = std::time::Instant::now();
        if !ready {
            for (seq, _) in batch {
                JOURNAL.exclusive().done(seq, None);
            }
            continue;
        }
        let ids: Vec<(u64, Option<i64>)> =
            BackgroundWorker::transaction(|| batch.iter().map(|(seq, json)| (*seq, insert_one(json))).collect());
        let mut j = JOURNAL.exclusive();
        for (seq, id) in ids {
            j.done(seq, id);
        }
    }
    JOURNAL.exclusive().leave(db, pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_per_database_is_started_and_replaced_when_stale() {
        let mut j = Journal::boxed();
        assert_eq!(j.queue(5, "{}", 1000), Some((1, true)), "the first record starts a writer");
        assert_eq!(j.queue(5, "{}", 1001), Some((2, false)), "its placeholder counts as alive");
        assert_eq!(j.queue(6, "{}", 1002), Some((3, true)), "another database gets its own");
        assert_eq!(j.take(5, 42, 1003, 10).len(), 2);
        assert_eq!(j.queue(5, "{}", 1003 + WRITER_STALE_MS), Some((4, true)), "a silent writer is replaced");
    }

    #[test]
    fn receipts_follow_a_record_from_queue_to_row() {
        let mut j = Journal::boxed();
        let (seq, _) = j.queue(5, r#"{"q":1}"#, 0).unwrap();
        assert_eq!(j.receipt(seq), Receipt::Queued);
        let taken = j.take(5, 42, 0, 10);
        assert_eq!(taken, vec![(seq, r#"{"q":1}"#.to_string())]);
        assert!(j.take(5, 42, 0, 10).is_empty(), "a taken record is not taken twice");
        assert_eq!(j.receipt(seq), Receipt::Queued, "taken but not yet written");
        j.done(seq, Some(77));
        assert_eq!(j.receipt(seq), Receipt::Written(77));
        assert_eq!(j.counts(), (1, 0));
        assert_eq!(j.receipt(999), Receipt::Unknown);
    }

    #[test]
    fn a_full_journal_drops_and_counts_and_a_failed_launch_frees_its_records() {
        let mut j = Journal::boxed();
        for _ in 0..JOURNAL_SLOTS {
            assert!(j.queue(5, "{}", 0).is_some());
        }
        assert_eq!(j.queue(5, "{}", 0), None);
        assert_eq!(j.counts(), (0, 1));
        j.launch_failed(5);
        assert_eq!(j.counts(), (0, 1 + JOURNAL_SLOTS as u64));
        assert!(j.queue(5, "{}", 0).is_some_and(|(_, launch)| launch), "room again, and a writer to start");
    }

    #[test]
    fn a_writer_does_not_leave_while_its_database_has_records() {
        let mut j = Journal::boxed();
        j.queue(5, "{}", 0);
        assert!(!j.leave(5, 42), "a record is waiting");
        let t = j.take(5, 42, 0, 10);
        j.done(t[0].0, Some(1));
        assert!(j.leave(5, 42));
        assert_eq!(j.queue(5, "{}", 0).map(|(_, launch)| launch), Some(true), "gone: the next record starts one");
    }

    #[test]
    fn a_dead_writers_records_go_back_to_the_queue_and_are_not_lost() {
        let mut j = Journal::boxed();
        let (a, _) = j.queue(5, "{}", 0).unwrap();
        assert_eq!(j.take(5, 42, 0, 10).len(), 1);
        // Writer 42 falls silent; the next record replaces it, and what it took is queued again.
        let (b, launch) = j.queue(5, "{}", WRITER_STALE_MS + 1).unwrap();
        assert!(launch);
        let again: Vec<u64> = j.take(5, 43, WRITER_STALE_MS + 2, 10).into_iter().map(|(s, _)| s).collect();
        assert_eq!(again, vec![a, b]);
        // 42 comes back to life and leaves: it must not clear 43's place or hand back 43's records.
        assert!(j.leave(5, 42));
        assert_eq!(j.receipt(a), Receipt::Queued, "still taken by 43");
        assert_eq!(j.queue(5, "{}", WRITER_STALE_MS + 3).map(|(_, launch)| launch), Some(false), "43 still runs");
        // 43 leaves through an error with records taken: they wait for the next writer, not dropped.
        assert!(!j.leave(5, 43), "a queued record keeps it");
        j.take(5, 43, WRITER_STALE_MS + 4, 10);
        assert!(j.leave(5, 43));
        assert_eq!(j.counts(), (0, 0), "nothing dropped");
        assert_eq!(j.receipt(a), Receipt::Queued);
    }

    #[test]
    fn long_records_are_cut_to_fit_a_slot() {
        let r = Record {
            question: "q".repeat(RECORD_BYTES),
            sql: Some("s".repeat(RECORD_BYTES)),
            outcome: "00000".into(),
            ..Record::default()
        };
        let json = r.to_json();
        assert!(json.len() <= RECORD_BYTES && json.contains('…'), "{}", json.len());
        assert_eq!(fingerprint("abc"), fingerprint("abc"));
        assert_ne!(fingerprint("abc"), fingerprint("abd"));
    }
}
