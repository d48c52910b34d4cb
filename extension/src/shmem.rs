//! The shared-memory board between sessions and the worker.
//!
//! One `PgLwLock<Board>` holds the worker's state and [`SLOTS`] request slots. Protocol (every transition under
//! the exclusive lock; after each, the side that changed a slot sets the other side's latch):
//!
//! ```text
//!   session: FREE ──claim──▶ PENDING                    worker: PENDING ──pick lowest ticket──▶ RUNNING
//!   worker:  RUNNING ──▶ DONE | FAILED                  session: DONE | FAILED ──read──▶ FREE
//!   session (cancel, timeout, error while waiting): PENDING | RUNNING ──▶ ABANDONED
//!   worker:  ABANDONED ──(stop generating, if it was running)──▶ FREE
//! ```
//!
//! Invariants:
//! - a slot's `ticket` is unique and increasing: the worker serves PENDING slots in ticket order (first come, first
//!   served), so no request starves while others keep arriving;
//! - only the worker writes the result fields, only between RUNNING and DONE/FAILED; only the owning session reads
//!   them, only after DONE/FAILED;
//! - latches are `PGPROC` latches, in shared memory at the same address in every process, so their addresses can be
//!   published here; the worker clears its own at exit, and reclaims a slot whose owner pid has vanished.

use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgLwLock;

pub const SLOTS: usize = 8;
/// Schema context plus question.
pub const INPUT_BYTES: usize = 64 * 1024;
pub const OUTPUT_BYTES: usize = 8 * 1024;
pub const MESSAGE_BYTES: usize = 1024;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    NotStarted = 0,
    Loading = 1,
    Ready = 2,
    Failed = 3,
    Stopped = 4,
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

/// Why a request failed, so the session can pick the SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FailKind {
    None = 0,
    /// The model could not be loaded.
    ModelUnavailable = 1,
    /// The prompt is longer than the model's context.
    PromptTooLong = 2,
    /// Inference or template failure.
    Internal = 3,
    /// The worker restarted while the request was queued or running.
    WorkerRestarted = 4,
}

impl FailKind {
    pub fn from_u32(v: u32) -> FailKind {
        match v {
            1 => FailKind::ModelUnavailable,
            2 => FailKind::PromptTooLong,
            3 => FailKind::Internal,
            4 => FailKind::WorkerRestarted,
            _ => FailKind::None,
        }
    }
}

/// A fixed-capacity UTF-8 buffer in shared memory.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Text<const N: usize> {
    len: u32,
    bytes: [u8; N],
}

impl<const N: usize> Text<N> {
    /// Store `s`, cut at a character boundary if it does not fit. Returns whether it fitted whole.
    pub fn set(&mut self, s: &str) -> bool {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        self.len = end as u32;
        end == s.len()
    }

    pub fn get(&self) -> &str {
        // `set` only ever stores whole characters of a &str.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    pub state: u32,
    pub ticket: u64,
    pub owner_pid: i32,
    /// The owner's `PGPROC` latch (`*mut pg_sys::Latch` as an address).
    pub client_latch: usize,
    pub max_new_tokens: u32,
    /// `input` holds the schema context, then the question: `context_len` splits them.
    pub context_len: u32,
    pub input: Text<INPUT_BYTES>,
    pub fail_kind: u32,
    /// The SQL on success, the reason on failure.
    pub result: Text<OUTPUT_BYTES>,
    /// What the model wrote (for the "no SQL" error's DETAIL).
    pub raw: Text<OUTPUT_BYTES>,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub latency_ms: f64,
}

impl Slot {
    pub fn state(&self) -> SlotState {
        match self.state {
            1 => SlotState::Pending,
            2 => SlotState::Running,
            3 => SlotState::Done,
            4 => SlotState::Failed,
            5 => SlotState::Abandoned,
            _ => SlotState::Free,
        }
    }

    pub fn set_state(&mut self, s: SlotState) {
        self.state = s as u32;
    }

    pub fn context(&self) -> &str {
        let input = self.input.get();
        &input[..(self.context_len as usize).min(input.len())]
    }

    pub fn question(&self) -> &str {
        let input = self.input.get();
        &input[(self.context_len as usize).min(input.len())..]
    }
}

/// The prefix cache's counters, copied from the inference thread after every answer.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct PrefixCacheCounters {
    pub entries: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl From<copilot_core::prefix_cache::CacheStats> for PrefixCacheCounters {
    fn from(s: copilot_core::prefix_cache::CacheStats) -> Self {
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

#[repr(C)]
pub struct Board {
    pub worker_state: u32,
    pub worker_pid: i32,
    /// The worker's `PGPROC` latch, 0 while no worker runs.
    pub worker_latch: usize,
    /// Incremented at every worker start.
    pub worker_generation: u64,
    pub message: Text<MESSAGE_BYTES>,
    pub model: Text<MESSAGE_BYTES>,
    pub model_sha256: Text<64>,
    pub model_arch: Text<64>,
    pub model_bytes: u64,
    pub load_ms: f64,
    pub threads: u32,
    pub next_ticket: u64,
    pub served: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub last_latency_ms: f64,
    pub last_prompt_tokens: u32,
    pub last_generated_tokens: u32,
    pub last_decode_tok_s: f64,
    /// Tokens of the last answer's schema prefix, and whether their state came from the prefix cache (0/1).
    pub last_prefix_tokens: u32,
    pub last_prefix_cache_hit: u32,
    /// The worker's prefix cache, as of its last answer.
    pub prefix_cache: PrefixCacheCounters,
    pub slots: [Slot; SLOTS],
}

impl Default for Board {
    fn default() -> Self {
        // SAFETY: every field of Board is an integer, a float, a byte array or a struct/array of those (repr(C),
        // no references, no enums stored as such), so the all-zero bit pattern is a valid value: state 0 is
        // NotStarted / Free, lengths 0 are empty texts.
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: Board is repr(C), contains no pointers into process-local memory (latch addresses are shared-memory
// addresses stored as integers) and is only accessed under its LWLock.
unsafe impl PGRXSharedMemory for Board {}

impl Board {
    pub fn worker_state(&self) -> WorkerState {
        match self.worker_state {
            1 => WorkerState::Loading,
            2 => WorkerState::Ready,
            3 => WorkerState::Failed,
            4 => WorkerState::Stopped,
            _ => WorkerState::NotStarted,
        }
    }

    pub fn set_worker_state(&mut self, s: WorkerState) {
        self.worker_state = s as u32;
    }

    pub fn queue_depth(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s.state(), SlotState::Pending | SlotState::Running)).count()
    }
}

// SAFETY: the name is unique to this extension.
pub static BOARD: PgLwLock<Board> = unsafe { PgLwLock::new(c"copilot_board") };

pub fn init() {
    pgrx::pg_shmem_init!(BOARD);
}

/// Set a latch whose address was published on the board.
///
/// # Safety
/// `latch` must be 0 or an address published on the board by `my_latch()`, read under the board's lock: a `PGPROC`
/// latch in shared memory. Its owner may have exited since; PGPROC latches outlive processes, so setting it then is
/// at worst a spurious wake-up of whichever backend reuses that PGPROC, which every latch waiter tolerates.
pub unsafe fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: per the function contract, the address points to a PGPROC Latch in shared memory; SetLatch on
        // another process's latch is how PostgreSQL itself wakes other backends.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// This process's latch address, to publish on the board.
pub fn my_latch() -> usize {
    // SAFETY: MyLatch is set at process start and points to MyProc->procLatch in shared memory for every process
    // that has attached to shared memory (backends and shmem-enabled background workers).
    unsafe { pg_sys::MyLatch as usize }
}
