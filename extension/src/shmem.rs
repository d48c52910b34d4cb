//! The shared-memory board between sessions and the worker, and its protocol.
//!
//! One `PgLwLock<Board>` holds the worker's state and [`SLOTS`] request slots. Every field is private: a slot moves
//! only through the methods below, each called under the exclusive lock, each returning the latches the caller must
//! set (the other side's) so that nothing here calls PostgreSQL and the protocol can be tested as plain Rust.
//!
//! ```text
//!   session  claim            FREE ──────────▶ PENDING
//!   worker   next_pending     PENDING ───────▶ RUNNING            (lowest ticket first)
//!   worker   finish           RUNNING ───────▶ DONE | FAILED       (ABANDONED ─▶ FREE)
//!   session  release          DONE | FAILED ─▶ FREE
//!   session  abandon          PENDING | RUNNING ─▶ ABANDONED      (cancel, timeout, error while waiting)
//!            abandon_owner    the same for every slot of an exiting backend (before_shmem_exit)
//!   worker   reap             ABANDONED ─▶ FREE (the running one: cancel it first); a dead owner's slot ─▶ FREE;
//!                             PENDING ─▶ FAILED while the model is unavailable
//!   worker   worker_start     RUNNING ─▶ FAILED (worker restarted), ABANDONED ─▶ FREE
//! ```
//!
//! Invariants:
//! - a slot's ticket is unique and increasing: the worker serves PENDING slots in ticket order (first come, first
//!   served), so no request starves while others keep arriving; a [`Ticket`] names one request, so a stale holder
//!   (its slot reused since) can never touch the new request;
//! - only the worker writes a slot's result, only between RUNNING and DONE/FAILED; only the owner reads it, only
//!   after DONE/FAILED;
//! - latches are `PGPROC` latches, in shared memory at the same address in every process, so their addresses can be
//!   published here; the worker clears its own at exit.

use copilot_core::error::ErrorKind;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgLwLock;

pub const SLOTS: usize = 8;
/// Schema context plus question.
pub const INPUT_BYTES: usize = 64 * 1024;
/// The answer: every candidate's text and SQL, as JSON.
pub const OUTPUT_BYTES: usize = 32 * 1024;
pub const MESSAGE_BYTES: usize = 1024;

/// A `PGPROC` latch's address (0: none), as published on the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latch(usize);

impl Latch {
    pub const NONE: Latch = Latch(0);

    /// This process's latch.
    pub fn mine() -> Latch {
        // SAFETY: MyLatch is set at process start and points to MyProc->procLatch in shared memory for every process
        // that has attached to shared memory (backends and shmem-enabled background workers).
        Latch(unsafe { pg_sys::MyLatch as usize })
    }

    /// Wake the process waiting on this latch.
    pub fn set(self) {
        if self.0 != 0 {
            // SAFETY: a Latch is only ever built by `mine()` in some process and published on the board, so the
            // address is a PGPROC latch in shared memory. Its owner may have exited since; PGPROC latches outlive
            // processes, so setting it then is at worst a spurious wake-up of whichever backend reuses that PGPROC,
            // which every latch waiter tolerates. SetLatch on another process's latch is how PostgreSQL itself wakes
            // other backends.
            unsafe { pg_sys::SetLatch(self.0 as *mut pg_sys::Latch) };
        }
    }

    /// Whether the process that published this latch as `pid` still owns it. Backends disown their PGPROC latch at
    /// exit and the next user of that PGPROC owns it under its own pid, so a recycled pid alone cannot fool this.
    pub fn owned_by(self, pid: i32) -> bool {
        if self.0 == 0 || pid <= 0 {
            return false;
        }
        // SAFETY: as in `set`, the address is a PGPROC latch in shared memory, valid for the postmaster's lifetime.
        // `owner_pid` is an int written only by OwnLatch/DisownLatch; a torn read is impossible for an aligned int,
        // and a stale one only delays a reap by one round.
        let owner = unsafe { std::ptr::read_volatile(&(*(self.0 as *const pg_sys::Latch)).owner_pid) };
        owner == pid
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    Free = 0,
    Pending = 1,
    Running = 2,
    Done = 3,
    Failed = 4,
    Abandoned = 5,
}

impl TryFrom<u32> for SlotState {
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        use SlotState::*;
        [Free, Pending, Running, Done, Failed, Abandoned].into_iter().find(|s| *s as u32 == v).ok_or(v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    NotStarted = 0,
    Loading = 1,
    Ready = 2,
    Failed = 3,
    Stopped = 4,
}

impl TryFrom<u32> for WorkerState {
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        use WorkerState::*;
        [NotStarted, Loading, Ready, Failed, Stopped].into_iter().find(|s| *s as u32 == v).ok_or(v)
    }
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::NotStarted => "not started",
            WorkerState::Loading => "loading",
            WorkerState::Ready => "ready",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// Why a request failed: the engine's own error kind, or something about the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Engine(ErrorKind),
    /// The model could not be loaded.
    ModelUnavailable,
    /// The worker restarted while the request was queued or running.
    WorkerRestarted,
    /// The engine process died or stopped answering while the request was queued or running (it is restarted).
    EngineRestarted,
}

impl Failure {
    const MODEL_UNAVAILABLE: u32 = 1000;
    const WORKER_RESTARTED: u32 = 1001;
    const ENGINE_RESTARTED: u32 = 1002;

    fn code(self) -> u32 {
        match self {
            Failure::Engine(k) => k as u32,
            Failure::ModelUnavailable => Failure::MODEL_UNAVAILABLE,
            Failure::WorkerRestarted => Failure::WORKER_RESTARTED,
            Failure::EngineRestarted => Failure::ENGINE_RESTARTED,
        }
    }
}

impl TryFrom<u32> for Failure {
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            Failure::MODEL_UNAVAILABLE => Ok(Failure::ModelUnavailable),
            Failure::WORKER_RESTARTED => Ok(Failure::WorkerRestarted),
            Failure::ENGINE_RESTARTED => Ok(Failure::EngineRestarted),
            v => ErrorKind::try_from(v).map(Failure::Engine),
        }
    }
}

/// A fixed-capacity UTF-8 buffer in shared memory.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Text<const N: usize> {
    len: u32,
    bytes: [u8; N],
}

impl<const N: usize> Text<N> {
    /// Store `s`, cut at a character boundary if it does not fit. Returns whether it fitted whole.
    pub(crate) fn set(&mut self, s: &str) -> bool {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        self.len = end as u32;
        end == s.len()
    }

    pub(crate) fn get(&self) -> &str {
        // `set` only ever stores whole characters of a &str.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

/// What one answer cost; returned to the session that asked (`copilot.last_ask()`), and kept for the last answer
/// served (`copilot.status()`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct Metrics {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// Leading prompt tokens that form the schema prefix, and whether their state came from the prefix cache.
    pub prefix_tokens: u32,
    pub prefix_cache_hit: bool,
    pub latency_ms: f64,
    pub decode_tok_s: f64,
    /// Candidates decoded together, and the tokens decoded across all of them.
    pub candidates: u32,
    pub decoded_rows: u32,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    state: u32,
    ticket: u64,
    owner_pid: i32,
    owner_latch: Latch,
    /// `input` holds the schema context, then the rest of the request (JSON): `context_len` splits them.
    context_len: u32,
    input: Text<INPUT_BYTES>,
    failure: u32,
    /// The answer (JSON) on success, the reason on failure.
    result: Text<OUTPUT_BYTES>,
    metrics: Metrics,
}

impl Slot {
    fn state(&self) -> SlotState {
        // Only this module writes `state`, always from a SlotState.
        SlotState::try_from(self.state).unwrap_or(SlotState::Free)
    }

    fn set_state(&mut self, s: SlotState) {
        self.state = s as u32;
    }

    fn holds(&self, t: Ticket) -> bool {
        self.ticket == t.ticket && self.state() != SlotState::Free
    }

    fn context(&self) -> &str {
        let input = self.input.get();
        &input[..(self.context_len as usize).min(input.len())]
    }

    fn payload(&self) -> &str {
        let input = self.input.get();
        &input[(self.context_len as usize).min(input.len())..]
    }

    fn fail(&mut self, why: Failure, reason: &str) -> Latch {
        self.failure = why.code();
        self.result.set(reason);
        self.set_state(SlotState::Failed);
        self.owner_latch
    }
}

/// The prefix cache's counters, copied from the inference side after every answer.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PrefixCacheCounters {
    pub entries: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl From<copilot_core::engine::backend::CacheStats> for PrefixCacheCounters {
    fn from(s: copilot_core::engine::backend::CacheStats) -> Self {
        PrefixCacheCounters {
            entries: s.entries as u64,
            bytes: s.bytes as u64,
            limit_bytes: s.limit_bytes as u64,
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
        }
    }
}

/// What the answer pipeline did, summed over every `ask` (see `crate::pipeline`).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PipelineCounts {
    pub asks: u64,
    /// Candidates decoded (first try).
    pub candidates: u64,
    /// Of those, how many planned as the caller on the first try.
    pub planned_first_try: u64,
    /// Repair round trips, and asks a repair turned into an answer.
    pub repairs: u64,
    pub repaired: u64,
    /// Candidates rewritten as a PostgreSQL HINT said.
    pub hints_applied: u64,
    /// Asks decided by a vote among several groups, and the sum of their winning margins.
    pub votes: u64,
    pub margin_sum: u64,
    /// Asks refused as unanswerable.
    pub refusals: u64,
    /// Asks answered by the greedy answer alone (`copilot.confidence_threshold`), no other candidate decoded.
    pub greedy_alone: u64,
}

/// One request on the board, as its owner (or the worker running it) names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
    ticket: u64,
}

/// Who asks: the session's pid and latch.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub pid: i32,
    pub latch: Latch,
}

/// What a session finds when it looks at its request.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    Waiting,
    Answered {
        answer: String,
        metrics: Metrics,
    },
    Failed(Failure, String),
    /// The slot no longer holds this request (the worker restarted and the slot was reused).
    Lost,
}

/// A request the worker took to run.
#[derive(Debug, Clone)]
pub struct Taken {
    pub ticket: Ticket,
    pub context: String,
    pub payload: String,
}

/// How a request the worker ran ended.
pub enum Outcome<'a> {
    Answered { answer: &'a str, metrics: Metrics },
    Failed(Failure, &'a str),
    Cancelled,
}

/// What [`Board::reap`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Reaped {
    /// Running requests that were abandoned: stop generating them.
    pub cancel: Vec<Ticket>,
    /// Sessions to wake (their pending requests failed).
    pub wake: Vec<Latch>,
}

/// A copy of the board's worker state and counters, for `copilot.status()`.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: WorkerState,
    pub worker_pid: Option<i32>,
    pub message: String,
    pub model: String,
    pub model_sha256: String,
    pub model_arch: String,
    /// What became of the sentence encoder (the engine's words: loaded, left out and why, or none).
    pub embedder: String,
    /// The engine scores tables by meaning (`rank_tables` requests get scores); false until it says so.
    pub ranks_tables: bool,
    pub model_bytes: u64,
    pub load_ms: f64,
    pub threads: u32,
    pub served: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub queue_depth: usize,
    /// The last answer served (to any session), if any.
    pub last: Option<Metrics>,
    pub prefix_cache: PrefixCacheCounters,
    pub pipeline: PipelineCounts,
}

/// Whether the worker can take requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Readiness {
    Ready,
    /// Loading, or not (yet) running: `published` says whether a worker is attached to the board.
    Waiting {
        state: WorkerState,
        published: bool,
    },
    Failed {
        message: String,
        model: String,
    },
}

#[repr(C)]
pub struct Board {
    worker_state: u32,
    worker_pid: i32,
    /// The worker's latch, NONE while no worker runs.
    worker_latch: Latch,
    /// Incremented at every worker start.
    worker_generation: u64,
    message: Text<MESSAGE_BYTES>,
    model: Text<MESSAGE_BYTES>,
    model_sha256: Text<64>,
    model_arch: Text<64>,
    embedder: Text<MESSAGE_BYTES>,
    ranks_tables: bool,
    model_bytes: u64,
    load_ms: f64,
    threads: u32,
    next_ticket: u64,
    served: u64,
    failed: u64,
    cancelled: u64,
    last: Metrics,
    prefix_cache: PrefixCacheCounters,
    pipeline: PipelineCounts,
    slots: [Slot; SLOTS],
}

impl Default for Board {
    fn default() -> Self {
        // SAFETY: every field of Board is an integer, a float, a bool, a byte array or a struct/array of those
        // (repr(C), no references, no Rust enums stored as such), so the all-zero bit pattern is a valid value:
        // state 0 is NotStarted / Free, lengths 0 are empty texts, false and Latch::NONE are zero.
        unsafe { std::mem::zeroed() }
    }
}

impl Board {
    /// A zeroed board made in place on the heap: the board is about 800 KB, which a debug build's
    /// `Box::default()` would first build on the stack (tests run on 2 MB thread stacks).
    #[cfg(test)]
    fn boxed() -> Box<Board> {
        // SAFETY: the all-zero bit pattern is a valid Board (see Default).
        unsafe { zeroed_box() }
    }
}

/// A zeroed `T` made in place on the heap (shared-memory values are hundreds of KB: a debug build's `Box::default()`
/// would build them on the 2 MB test stack first).
///
/// # Safety
/// The all-zero bit pattern must be a valid `T`, and `T` must not be zero-sized.
#[cfg(test)]
pub(crate) unsafe fn zeroed_box<T>() -> Box<T> {
    let layout = std::alloc::Layout::new::<T>();
    // SAFETY: the caller promises a non-zero size and that zero is a valid T; the allocation is checked for null and
    // handed to Box with the same layout, which frees it.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<T>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(p)
    }
}

// SAFETY: Board is repr(C), contains no pointers into process-local memory (latch addresses are shared-memory
// addresses stored as integers) and is only accessed under its LWLock.
unsafe impl PGRXSharedMemory for Board {}

impl Board {
    fn worker_state(&self) -> WorkerState {
        WorkerState::try_from(self.worker_state).unwrap_or(WorkerState::NotStarted)
    }

    fn set_worker_state(&mut self, s: WorkerState) {
        self.worker_state = s as u32;
    }

    fn queue_depth(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s.state(), SlotState::Pending | SlotState::Running)).count()
    }

    // ---- the worker's life ----------------------------------------------------------------------------------

    /// A worker (re)starts: publish it, and fail every request an earlier incarnation was running (their sessions
    /// are woken through the returned latches). Pending requests stay queued for this one.
    pub fn worker_start(&mut self, pid: i32, latch: Latch, model: &str, threads: u32) -> Vec<Latch> {
        self.worker_generation += 1;
        self.worker_pid = pid;
        self.worker_latch = latch;
        self.set_worker_state(WorkerState::Loading);
        self.message.clear();
        self.model.set(model);
        self.model_sha256.clear();
        self.model_arch.clear();
        self.embedder.clear();
        self.ranks_tables = false;
        self.model_bytes = 0;
        self.load_ms = 0.0;
        self.threads = threads;
        let mut wake = Vec::new();
        for s in self.slots.iter_mut() {
            match s.state() {
                SlotState::Running => wake.push(
                    s.fail(Failure::WorkerRestarted, "the copilot worker restarted while answering this request"),
                ),
                SlotState::Abandoned => s.set_state(SlotState::Free),
                _ => {}
            }
        }
        wake
    }

    pub fn worker_loaded(&mut self, arch: &str, bytes: u64, load_ms: f64, embedder: &str, ranks_tables: bool) {
        self.set_worker_state(WorkerState::Ready);
        self.model_arch.set(arch);
        self.embedder.set(embedder);
        self.ranks_tables = ranks_tables;
        self.model_bytes = bytes;
        self.load_ms = load_ms;
    }

    /// The engine process died or was killed for not answering: every request queued or running fails (its
    /// session is woken through the returned latches) and the worker is loading again.
    pub fn engine_lost(&mut self, reason: &str) -> Vec<Latch> {
        let mut wake = Vec::new();
        for s in self.slots.iter_mut() {
            match s.state() {
                SlotState::Pending | SlotState::Running => {
                    self.failed += 1;
                    wake.push(s.fail(Failure::EngineRestarted, reason));
                }
                SlotState::Abandoned => s.set_state(SlotState::Free),
                _ => {}
            }
        }
        self.set_worker_state(WorkerState::Loading);
        self.message.set(reason);
        self.model_sha256.clear();
        wake
    }

    /// The model cannot be served (load failed, or the inference side stopped). Pending requests are failed by the
    /// next [`Board::reap`].
    pub fn worker_failed(&mut self, reason: &str) {
        if self.worker_state() != WorkerState::Failed {
            self.set_worker_state(WorkerState::Failed);
            self.message.set(reason);
        }
    }

    pub fn set_model_sha256(&mut self, hex: &str) {
        self.model_sha256.set(hex);
    }

    /// The worker is exiting: sessions stop waking it and wait for its successor.
    pub fn worker_exit(&mut self, stopped: bool) {
        self.worker_latch = Latch::NONE;
        if stopped {
            self.set_worker_state(WorkerState::Stopped);
        }
    }

    // ---- sessions -------------------------------------------------------------------------------------------

    pub fn readiness(&self) -> Readiness {
        match self.worker_state() {
            WorkerState::Ready if self.worker_latch != Latch::NONE => Readiness::Ready,
            WorkerState::Failed => {
                Readiness::Failed { message: self.message.get().to_string(), model: self.model.get().to_string() }
            }
            state => Readiness::Waiting { state, published: self.worker_latch != Latch::NONE },
        }
    }

    pub fn model(&self) -> String {
        self.model.get().to_string()
    }

    /// Take a free slot for a request (the schema context, then the rest of it as `payload`); `None` when all are
    /// busy. The caller wakes the returned worker latch. Both must fit in [`INPUT_BYTES`] (checked by the caller,
    /// which can say so properly).
    pub fn claim(&mut self, owner: Owner, context: &str, payload: &str) -> Option<(Ticket, Latch)> {
        let slot = (0..SLOTS).find(|&i| self.slots[i].state() == SlotState::Free)?;
        self.next_ticket += 1;
        let ticket = Ticket { slot, ticket: self.next_ticket };
        let s = &mut self.slots[slot];
        s.ticket = ticket.ticket;
        s.owner_pid = owner.pid;
        s.owner_latch = owner.latch;
        s.input.set(&format!("{context}{payload}"));
        s.context_len = context.len() as u32;
        s.failure = 0;
        s.result.clear();
        s.metrics = Metrics::default();
        s.set_state(SlotState::Pending);
        Some((ticket, self.worker_latch))
    }

    pub fn poll(&self, t: Ticket) -> Poll {
        let s = &self.slots[t.slot];
        if s.ticket != t.ticket {
            return Poll::Lost;
        }
        match s.state() {
            SlotState::Done => Poll::Answered { answer: s.result.get().to_string(), metrics: s.metrics },
            SlotState::Failed => Poll::Failed(
                Failure::try_from(s.failure).unwrap_or(Failure::Engine(ErrorKind::Inference)),
                s.result.get().to_string(),
            ),
            SlotState::Free => Poll::Lost,
            _ => Poll::Waiting,
        }
    }

    /// The owner has read its answer or failure: the slot is free again.
    pub fn release(&mut self, t: Ticket) {
        let s = &mut self.slots[t.slot];
        if s.holds(t) && matches!(s.state(), SlotState::Done | SlotState::Failed) {
            s.set_state(SlotState::Free);
        }
    }

    /// The owner stops waiting (cancel, timeout, an error): a queued or running request is abandoned, a finished
    /// one freed. Returns the worker's latch when it has something to do about it.
    pub fn abandon(&mut self, t: Ticket) -> Option<Latch> {
        let worker = self.worker_latch;
        let s = &mut self.slots[t.slot];
        if !s.holds(t) {
            return None;
        }
        match s.state() {
            SlotState::Pending | SlotState::Running => {
                s.set_state(SlotState::Abandoned);
                Some(worker)
            }
            SlotState::Done | SlotState::Failed => {
                s.set_state(SlotState::Free);
                None
            }
            _ => None,
        }
    }

    /// Abandon every request of an exiting backend (its `before_shmem_exit` callback). Returns the worker's latch
    /// when any was queued or running.
    pub fn abandon_owner(&mut self, pid: i32) -> Option<Latch> {
        let tickets: Vec<Ticket> = (0..SLOTS)
            .filter(|&i| self.slots[i].owner_pid == pid && self.slots[i].state() != SlotState::Free)
            .map(|i| Ticket { slot: i, ticket: self.slots[i].ticket })
            .collect();
        tickets.into_iter().filter_map(|t| self.abandon(t)).last()
    }

    // ---- the worker's requests ------------------------------------------------------------------------------

    /// The oldest pending request, now running; `None` unless the worker is ready and something waits.
    pub fn next_pending(&mut self) -> Option<Taken> {
        if self.worker_state() != WorkerState::Ready {
            return None;
        }
        let i = (0..SLOTS)
            .filter(|&i| self.slots[i].state() == SlotState::Pending)
            .min_by_key(|&i| self.slots[i].ticket)?;
        let s = &mut self.slots[i];
        s.set_state(SlotState::Running);
        Some(Taken {
            ticket: Ticket { slot: i, ticket: s.ticket },
            context: s.context().to_string(),
            payload: s.payload().to_string(),
        })
    }

    /// A request the worker ran has ended. Returns the owner's latch when there is an answer or failure to read.
    /// A request abandoned meanwhile is freed and counted as cancelled; a ticket no slot holds is ignored.
    pub fn finish(&mut self, t: Ticket, outcome: Outcome<'_>) -> Option<Latch> {
        let s = &mut self.slots[t.slot];
        if s.ticket != t.ticket {
            return None;
        }
        match (s.state(), outcome) {
            (SlotState::Running, Outcome::Answered { answer, metrics }) => {
                s.failure = 0;
                s.result.set(answer);
                s.metrics = metrics;
                s.set_state(SlotState::Done);
                self.served += 1;
                self.last = metrics;
                Some(s.owner_latch)
            }
            (SlotState::Running, Outcome::Failed(why, reason)) => {
                self.failed += 1;
                Some(s.fail(why, reason))
            }
            (SlotState::Running | SlotState::Abandoned, _) => {
                // Cancelled by us (abandoned), or the session went away: nobody reads it.
                s.set_state(SlotState::Free);
                self.cancelled += 1;
                None
            }
            _ => None,
        }
    }

    /// Periodic housekeeping by the worker: free abandoned slots (asking to cancel the running ones first), free
    /// the slots of owners that are gone (`alive(pid, latch)` says whether a session still exists), and fail
    /// pending requests while the model cannot be served.
    pub fn reap(&mut self, running: &[Ticket], alive: impl Fn(i32, Latch) -> bool) -> Reaped {
        let mut out = Reaped::default();
        let failed = (self.worker_state() == WorkerState::Failed).then(|| self.message.get().to_string());
        for i in 0..SLOTS {
            let s = &mut self.slots[i];
            let is_running = running.iter().any(|t| t.slot == i && t.ticket == s.ticket);
            let state = s.state();
            if matches!(state, SlotState::Pending | SlotState::Running | SlotState::Done | SlotState::Failed)
                && !alive(s.owner_pid, s.owner_latch)
            {
                s.set_state(SlotState::Abandoned);
            }
            match (s.state(), is_running) {
                (SlotState::Abandoned, true) => out.cancel.push(Ticket { slot: i, ticket: s.ticket }),
                (SlotState::Abandoned, false) => {
                    s.set_state(SlotState::Free);
                    if state != SlotState::Done && state != SlotState::Failed {
                        self.cancelled += 1;
                    }
                }
                (SlotState::Pending, _) => {
                    if let Some(reason) = &failed {
                        out.wake.push(s.fail(Failure::ModelUnavailable, reason));
                    }
                }
                _ => {}
            }
        }
        out
    }

    pub fn count_pipeline(&mut self, c: PipelineCounts) {
        let p = &mut self.pipeline;
        p.asks += c.asks;
        p.candidates += c.candidates;
        p.planned_first_try += c.planned_first_try;
        p.repairs += c.repairs;
        p.repaired += c.repaired;
        p.hints_applied += c.hints_applied;
        p.votes += c.votes;
        p.margin_sum += c.margin_sum;
        p.refusals += c.refusals;
        p.greedy_alone += c.greedy_alone;
    }

    pub fn set_prefix_cache(&mut self, c: PrefixCacheCounters) {
        self.prefix_cache = c;
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.worker_state(),
            worker_pid: (self.worker_latch != Latch::NONE).then_some(self.worker_pid),
            message: self.message.get().to_string(),
            model: self.model.get().to_string(),
            model_sha256: self.model_sha256.get().to_string(),
            model_arch: self.model_arch.get().to_string(),
            embedder: self.embedder.get().to_string(),
            ranks_tables: self.ranks_tables,
            model_bytes: self.model_bytes,
            load_ms: self.load_ms,
            threads: self.threads,
            served: self.served,
            failed: self.failed,
            cancelled: self.cancelled,
            queue_depth: self.queue_depth(),
            last: (self.served > 0).then_some(self.last),
            prefix_cache: self.prefix_cache,
            pipeline: self.pipeline,
        }
    }
}

// SAFETY: the name is unique to this extension.
pub static BOARD: PgLwLock<Board> = unsafe { PgLwLock::new(c"copilot_board") };

pub fn init() {
    pgrx::pg_shmem_init!(BOARD);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> Box<Board> {
        let mut b = Board::boxed();
        b.worker_start(100, Latch(1), "m.gguf", 2);
        b.worker_loaded("qwen2", 10, 1.0, "none", false);
        b
    }

    fn owner(pid: i32) -> Owner {
        Owner { pid, latch: Latch(pid as usize * 16) }
    }

    fn answered<'a>(sql: &'a str) -> Outcome<'a> {
        Outcome::Answered { answer: sql, metrics: Metrics { prompt_tokens: 7, ..Default::default() } }
    }

    #[test]
    fn states_decode_only_from_their_numbers() {
        for s in [SlotState::Free, SlotState::Pending, SlotState::Running, SlotState::Done, SlotState::Failed] {
            assert_eq!(SlotState::try_from(s as u32), Ok(s));
        }
        assert_eq!(SlotState::try_from(6), Err(6));
        assert_eq!(WorkerState::try_from(2), Ok(WorkerState::Ready));
        assert_eq!(WorkerState::try_from(9), Err(9));
        for f in [
            Failure::ModelUnavailable,
            Failure::WorkerRestarted,
            Failure::EngineRestarted,
            Failure::Engine(ErrorKind::PromptTooLong),
        ] {
            assert_eq!(Failure::try_from(f.code()), Ok(f));
        }
        assert!(Failure::try_from(0).is_err());
    }

    #[test]
    fn the_encoder_the_engine_loaded_is_shown_until_the_next_start() {
        let mut b = board();
        assert_eq!(b.status().embedder, "none");
        assert!(!b.status().ranks_tables);
        b.worker_start(101, Latch(2), "m.gguf", 2);
        b.worker_loaded("qwen2", 10, 1.0, "/models/minilm (grounding by meaning)", true);
        assert_eq!(b.status().embedder, "/models/minilm (grounding by meaning)");
        assert!(b.status().ranks_tables);
        b.worker_start(102, Latch(3), "m.gguf", 2);
        assert_eq!(b.status().embedder, "", "a new start forgets the last engine's encoder");
        assert!(!b.status().ranks_tables, "and that it ranked tables: the next engine may not");
    }

    #[test]
    fn a_request_goes_round_trip_and_frees_its_slot() {
        let mut b = board();
        let (t, worker) = b.claim(owner(7), "CREATE TABLE t (a int);", "how many?").unwrap();
        assert_eq!(worker, Latch(1));
        assert_eq!(b.poll(t), Poll::Waiting);
        let job = b.next_pending().unwrap();
        assert_eq!((job.context.as_str(), job.payload.as_str()), ("CREATE TABLE t (a int);", "how many?"));
        assert!(b.next_pending().is_none(), "one request, taken once");
        assert_eq!(b.finish(job.ticket, answered("SELECT 1")), Some(owner(7).latch));
        match b.poll(t) {
            Poll::Answered { answer, metrics } => assert_eq!((answer.as_str(), metrics.prompt_tokens), ("SELECT 1", 7)),
            p => panic!("{p:?}"),
        }
        b.release(t);
        assert_eq!(b.poll(t), Poll::Lost);
        assert_eq!(b.status().served, 1);
        assert_eq!(b.status().last.unwrap().prompt_tokens, 7);
        assert_eq!(b.status().queue_depth, 0);
    }

    #[test]
    fn pending_requests_are_served_by_ticket_and_slots_run_out() {
        let mut b = board();
        let tickets: Vec<Ticket> = (0..SLOTS as i32).map(|i| b.claim(owner(10 + i), "", "q").unwrap().0).collect();
        assert!(b.claim(owner(99), "", "q").is_none(), "all {SLOTS} slots busy");
        // Free slot 0 and reuse it: the newcomer's ticket is the largest, so it is served last.
        let first = b.next_pending().unwrap();
        assert_eq!(first.ticket, tickets[0]);
        b.finish(first.ticket, answered("SELECT 1"));
        b.release(tickets[0]);
        let late = b.claim(owner(50), "", "late").unwrap().0;
        let order: Vec<Ticket> = std::iter::from_fn(|| {
            let j = b.next_pending()?;
            b.finish(j.ticket, Outcome::Cancelled);
            Some(j.ticket)
        })
        .collect();
        assert_eq!(order.len(), SLOTS);
        assert_eq!(&order[..SLOTS - 1], &tickets[1..]);
        assert_eq!(order[SLOTS - 1], late);
    }

    #[test]
    fn a_stale_ticket_touches_nothing() {
        let mut b = board();
        let (t, _) = b.claim(owner(7), "", "q").unwrap();
        assert!(b.abandon(t).is_some());
        let r = b.reap(&[], |_, _| true);
        assert_eq!(r, Reaped::default());
        // The slot is free and reused by someone else: the old ticket can neither read nor free it.
        let (t2, _) = b.claim(owner(8), "", "other").unwrap();
        assert_eq!(t2.slot, t.slot);
        assert_eq!(b.poll(t), Poll::Lost);
        assert!(b.abandon(t).is_none());
        b.release(t);
        assert_eq!(b.poll(t2), Poll::Waiting);
        let j = b.next_pending().unwrap();
        assert!(b.finish(t, answered("SELECT 2")).is_none(), "finish with a stale ticket");
        assert!(b.finish(j.ticket, answered("SELECT 3")).is_some());
    }

    #[test]
    fn abandoning_a_running_request_cancels_it_and_counts_it() {
        let mut b = board();
        let (t, _) = b.claim(owner(7), "", "q").unwrap();
        let j = b.next_pending().unwrap();
        assert_eq!(b.abandon(t), Some(Latch(1)), "the worker is woken");
        let r = b.reap(&[j.ticket], |_, _| true);
        assert_eq!(r.cancel, vec![j.ticket], "the running generation must be stopped");
        assert_eq!(b.status().queue_depth, 0, "abandoned is not queued");
        // The generation ends (cancelled or not): nobody is woken, the slot is free, one cancel counted.
        assert!(b.finish(j.ticket, answered("SELECT 1")).is_none());
        assert_eq!((b.status().cancelled, b.status().served), (1, 0));
        assert!(b.claim(owner(8), "", "q").is_some());
    }

    #[test]
    fn several_requests_run_at_once_and_only_the_abandoned_one_is_cancelled() {
        let mut b = board();
        let (t1, _) = b.claim(owner(7), "", "q1").unwrap();
        let (t2, _) = b.claim(owner(8), "", "q2").unwrap();
        let (t3, _) = b.claim(owner(9), "", "q3").unwrap();
        let running: Vec<Ticket> = (0..3).map(|_| b.next_pending().unwrap().ticket).collect();
        assert_eq!(running, vec![t1, t2, t3], "taken in ticket order, all running together");
        assert!(b.next_pending().is_none());
        assert_eq!(b.status().queue_depth, 3);
        assert!(b.abandon(t2).is_some());
        let r = b.reap(&running, |_, _| true);
        assert_eq!(r.cancel, vec![t2], "only the abandoned request is stopped");
        assert_eq!(r, b.reap(&running, |_, _| true), "asked again until it ends");
        // The others finish and are read; the cancelled one frees its slot when its end is reported.
        assert_eq!(b.finish(t1, answered("SELECT 1")), Some(owner(7).latch));
        assert!(b.finish(t2, Outcome::Cancelled).is_none());
        assert_eq!(b.finish(t3, answered("SELECT 3")), Some(owner(9).latch));
        assert!(matches!(b.poll(t3), Poll::Answered { answer, .. } if answer == "SELECT 3"));
        assert_eq!((b.status().served, b.status().cancelled), (2, 1));
    }

    #[test]
    fn an_exiting_backend_abandons_all_its_requests() {
        let mut b = board();
        let (a, _) = b.claim(owner(7), "", "q1").unwrap();
        let (other, _) = b.claim(owner(8), "", "q2").unwrap();
        let j = b.next_pending().unwrap();
        assert_eq!(j.ticket, a);
        assert_eq!(b.abandon_owner(7), Some(Latch(1)));
        assert!(b.abandon_owner(7).is_none(), "nothing left to abandon");
        assert_eq!(b.poll(other), Poll::Waiting, "another session's request is untouched");
        assert_eq!(b.reap(&[j.ticket], |_, _| true).cancel, vec![j.ticket]);
        b.finish(j.ticket, Outcome::Cancelled);
        assert_eq!(b.next_pending().unwrap().ticket, other);
    }

    #[test]
    fn the_slots_of_owners_that_are_gone_are_reclaimed() {
        let mut b = board();
        let (gone_running, _) = b.claim(owner(7), "", "q1").unwrap();
        let (gone_pending, _) = b.claim(owner(8), "", "q2").unwrap();
        let (alive, _) = b.claim(owner(9), "", "q3").unwrap();
        let j = b.next_pending().unwrap();
        assert_eq!(j.ticket, gone_running);
        let r = b.reap(&[j.ticket], |pid, _| pid == 9);
        assert_eq!(r.cancel, vec![j.ticket], "the running request's owner is gone: stop generating");
        assert_eq!(b.poll(gone_pending), Poll::Lost, "a gone owner's queued request is dropped");
        assert_eq!(b.poll(alive), Poll::Waiting, "a live owner's request stays");
        assert!(b.finish(j.ticket, answered("SELECT 1")).is_none(), "nobody to wake");
        assert_eq!(b.status().cancelled, 2);
        assert_eq!(b.next_pending().unwrap().ticket, alive);
    }

    #[test]
    fn a_failed_model_fails_pending_requests_and_a_restart_fails_running_ones() {
        let mut b = board();
        let (pending, _) = b.claim(owner(7), "", "q1").unwrap();
        let (running, _) = b.claim(owner(8), "", "q2").unwrap();
        let j = b.next_pending().unwrap();
        assert_eq!(j.ticket, pending);
        // The worker restarts while `pending` runs: it fails with WorkerRestarted and its owner is woken.
        let wake = b.worker_start(101, Latch(2), "m.gguf", 2);
        assert_eq!(wake, vec![owner(7).latch]);
        assert!(matches!(b.poll(pending), Poll::Failed(Failure::WorkerRestarted, _)));
        // The new worker cannot load the model: the queued request fails with the reason.
        b.worker_failed("no such file");
        assert_eq!(b.readiness(), Readiness::Failed { message: "no such file".into(), model: "m.gguf".into() });
        let r = b.reap(&[], |_, _| true);
        assert_eq!(r.wake, vec![owner(8).latch]);
        assert_eq!(b.poll(running), Poll::Failed(Failure::ModelUnavailable, "no such file".into()));
        assert!(b.next_pending().is_none(), "nothing runs on a failed worker");
    }

    #[test]
    fn a_lost_engine_fails_every_waiting_request_and_loads_again() {
        let mut b = board();
        let (running, _) = b.claim(owner(7), "", "q1").unwrap();
        let (pending, _) = b.claim(owner(8), "", "q2").unwrap();
        let j = b.next_pending().unwrap();
        assert_eq!(j.ticket, running);
        let wake = b.engine_lost("the engine process was killed (signal 9); restarting it");
        assert_eq!(wake, vec![owner(7).latch, owner(8).latch]);
        for t in [running, pending] {
            assert!(matches!(b.poll(t), Poll::Failed(Failure::EngineRestarted, ref m) if m.contains("signal 9")));
        }
        assert!(matches!(b.readiness(), Readiness::Waiting { state: WorkerState::Loading, .. }));
        assert!(b.next_pending().is_none());
        // A late `Finished` from the dead engine for the failed request changes nothing.
        assert!(b.finish(j.ticket, answered("SELECT 1")).is_none());
        assert!(matches!(b.poll(running), Poll::Failed(Failure::EngineRestarted, _)));
    }

    #[test]
    fn texts_are_cut_on_character_boundaries() {
        let mut t = Text::<5> { len: 0, bytes: [0; 5] };
        assert!(!t.set("aébcd"));
        assert_eq!(t.get(), "aébc");
        assert!(t.set("ab"));
        assert_eq!(t.get(), "ab");
    }
}
