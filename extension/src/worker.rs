//! The background worker that owns the model.
//!
//! Threads and who may touch what:
//! - the worker's **main thread** is the only one that calls into PostgreSQL (latches, the board's LWLock, GUCs,
//!   logging). It moves requests from the board to the inference thread and results back, and turns abandoned
//!   requests into cancel flags;
//! - the **inference thread** owns the [`Runtime`] and never calls PostgreSQL. It is created with every signal
//!   blocked, so candle's rayon and barrier pools (created lazily from it) inherit a full mask and PostgreSQL's
//!   signal handlers only ever run on the main thread;
//! - a **checksum thread** (same mask) computes the model file's sha256 for `copilot.status()` without delaying
//!   the first answer.
//!
//! A change of `copilot.model` (SIGHUP) makes the worker exit with status 1; the postmaster restarts it after
//! [`RESTART_SECS`] with the new setting. A model that fails to load leaves the worker running in state `failed`
//! with the reason, so sessions get that reason instead of a timeout.

use crate::gucs;
use crate::shmem::{self, FailKind, SlotState, WorkerState, BOARD, SLOTS};
use copilot_core::backend::{Backend, GenerateRequest};
use copilot_core::prefix_cache::CacheStats;
use copilot_core::runtime::{configure_threads, LoadOptions, Runtime};
use copilot_core::CoreError;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const RESTART_SECS: u64 = 1;

pub fn register() {
    BackgroundWorkerBuilder::new("copilot model worker")
        .set_type("copilot model worker")
        .set_function("copilot_worker_main")
        .set_library("copilot")
        .enable_shmem_access(None)
        .set_restart_time(Some(Duration::from_secs(RESTART_SECS)))
        .load();
}

struct Job {
    slot: usize,
    ticket: u64,
    req: GenerateRequest,
    cancel: Arc<AtomicBool>,
    /// `copilot.prefix_cache_mb` as the main thread read it when dispatching (a reload changes it between jobs).
    prefix_cache_bytes: usize,
}

enum Event {
    Loaded {
        arch: String,
        bytes: u64,
        load_s: f64,
    },
    LoadFailed(String),
    Checksum(String),
    Finished {
        slot: usize,
        ticket: u64,
        outcome: Result<copilot_core::Generation, CoreError>,
        elapsed_ms: f64,
        cache: CacheStats,
    },
}

/// Spawn a thread with every signal blocked (the mask is inherited by any thread it creates).
fn spawn_masked<F: FnOnce() + Send + 'static>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>> {
    // SAFETY: sigfillset/pthread_sigmask only touch the sigset we own and this thread's mask. We block everything
    // around the spawn so the child starts with a full mask (no window where a PostgreSQL handler could run on
    // it), then restore the main thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = std::thread::Builder::new().name(name.into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

fn inference_thread(spec: String, threads: usize, max_context: usize, jobs: Receiver<Job>, events: Sender<Event>) {
    configure_threads(threads);
    // The prefix cache's bound comes with every job (set before it runs), so a reload can change it.
    let opts = LoadOptions { max_context, ..Default::default() };
    let loaded =
        copilot_core::source::resolve(&spec, false).and_then(|path| Runtime::load(&path, &opts).map(|rt| (rt, path)));
    let mut rt = match loaded {
        Ok((rt, path)) => {
            let info = rt.info();
            let _ = events.send(Event::Loaded { arch: info.arch.clone(), bytes: info.file_bytes, load_s: info.load_s });
            let ev = events.clone();
            let _ = spawn_masked("copilot-sha256", move || {
                if let Ok(h) = copilot_core::source::sha256_file(&path) {
                    let _ = ev.send(Event::Checksum(h));
                }
            });
            rt
        }
        Err(e) => {
            let _ = events.send(Event::LoadFailed(e.to_string()));
            return;
        }
    };
    while let Ok(job) = jobs.recv() {
        let t0 = Instant::now();
        rt.set_prefix_cache_bytes(job.prefix_cache_bytes);
        let cancel = job.cancel.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.generate(&job.req, &|| cancel.load(Ordering::Relaxed))
        }))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(CoreError::Inference(format!("inference panicked: {msg}")))
        });
        let elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let cache = rt.prefix_cache_stats();
        if events.send(Event::Finished { slot: job.slot, ticket: job.ticket, outcome, elapsed_ms, cache }).is_err() {
            return;
        }
    }
}

/// Fail every request still on the board from an earlier incarnation of the worker, and publish this one.
fn start_board(spec: &str, threads: usize) {
    let mut b = BOARD.exclusive();
    b.worker_generation += 1;
    // SAFETY: MyProcPid is set once at process start and only read here, on the main thread.
    b.worker_pid = unsafe { pg_sys::MyProcPid };
    b.worker_latch = shmem::my_latch();
    b.set_worker_state(WorkerState::Loading);
    b.message.clear();
    b.model.set(spec);
    b.model_sha256.clear();
    b.model_arch.clear();
    b.model_bytes = 0;
    b.load_ms = 0.0;
    b.threads = threads as u32;
    for s in b.slots.iter_mut() {
        match s.state() {
            SlotState::Running => {
                s.fail_kind = FailKind::WorkerRestarted as u32;
                s.result.set("the copilot worker restarted while answering this request");
                s.set_state(SlotState::Failed);
                // SAFETY: the latch address was published by the slot's owner under this lock.
                unsafe { shmem::set_latch(s.client_latch) };
            }
            SlotState::Abandoned => s.set_state(SlotState::Free),
            _ => {}
        }
    }
}

/// Ask the inference thread to stop the running generation, if any (it polls the flag between tokens).
fn cancel(running: &Option<(usize, u64, Arc<AtomicBool>)>) {
    if let Some((_, _, flag)) = running {
        flag.store(true, Ordering::Relaxed);
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn copilot_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let spec = gucs::model();
    let threads = gucs::THREADS.get().max(1) as usize;
    let max_context = gucs::MAX_CONTEXT_TOKENS.get().max(1) as usize;
    start_board(&spec, threads);
    log!("copilot worker: loading model {spec} with {threads} thread(s)");

    let (job_tx, job_rx) = channel::<Job>();
    let (ev_tx, ev_rx) = channel::<Event>();
    let spawned = {
        let spec = spec.clone();
        spawn_masked("copilot-inference", move || inference_thread(spec, threads, max_context, job_rx, ev_tx))
    };
    if let Err(e) = spawned {
        let mut b = BOARD.exclusive();
        b.set_worker_state(WorkerState::Failed);
        b.message.set(&format!("cannot start the inference thread: {e}"));
    }

    // The running job: (slot, ticket, cancel flag).
    let mut running: Option<(usize, u64, Arc<AtomicBool>)> = None;
    let mut last_reap = Instant::now();
    loop {
        let timeout = if running.is_some() { Duration::from_millis(2) } else { Duration::from_millis(200) };
        if !BackgroundWorker::wait_latch(Some(timeout)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file on SIGHUP is what every background worker does, on its main
            // thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if gucs::model() != spec {
                log!("copilot worker: copilot.model changed to {}; restarting to load it", gucs::model());
                cancel(&running);
                BOARD.exclusive().worker_latch = 0;
                // SAFETY: a background worker exits with proc_exit; status 1 asks the postmaster to restart it.
                unsafe { pg_sys::proc_exit(1) };
            }
        }

        // Results and state changes from the inference side.
        loop {
            match ev_rx.try_recv() {
                Ok(ev) => handle_event(ev, &mut running),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // The inference thread ended: either the model failed to load (state already Failed) or it
                    // died. Either way nothing more will be answered.
                    let mut b = BOARD.exclusive();
                    if b.worker_state() != WorkerState::Failed {
                        b.set_worker_state(WorkerState::Failed);
                        b.message.set("the inference thread stopped");
                    }
                    running = None;
                    break;
                }
            }
        }

        let mut b = BOARD.exclusive();
        let state = b.worker_state();
        let reason = b.message.get().to_string();
        let reap = last_reap.elapsed() > Duration::from_secs(1);
        let mut cancelled = 0;
        for (i, s) in b.slots.iter_mut().enumerate() {
            let is_running = running.as_ref().is_some_and(|r| r.0 == i && r.1 == s.ticket);
            match s.state() {
                SlotState::Abandoned if is_running => {
                    // Counted when the inference thread reports the cancelled generation.
                    cancel(&running);
                }
                SlotState::Abandoned => {
                    s.set_state(SlotState::Free);
                    cancelled += 1;
                }
                SlotState::Pending | SlotState::Running | SlotState::Done | SlotState::Failed
                    if reap && !pid_alive(s.owner_pid) =>
                {
                    // The session went away without cleaning up (FATAL, crash): reclaim its slot.
                    if is_running {
                        cancel(&running);
                        s.set_state(SlotState::Abandoned);
                    } else {
                        s.set_state(SlotState::Free);
                    }
                }
                SlotState::Pending if state == WorkerState::Failed => {
                    s.fail_kind = FailKind::ModelUnavailable as u32;
                    s.result.set(&reason);
                    s.set_state(SlotState::Failed);
                    // SAFETY: latch address published by the slot's owner, read under the lock.
                    unsafe { shmem::set_latch(s.client_latch) };
                }
                _ => {}
            }
        }
        b.cancelled += cancelled;
        if reap {
            last_reap = Instant::now();
        }
        if state == WorkerState::Ready && running.is_none() {
            let next =
                (0..SLOTS).filter(|&i| b.slots[i].state() == SlotState::Pending).min_by_key(|&i| b.slots[i].ticket);
            if let Some(i) = next {
                let s = &mut b.slots[i];
                s.set_state(SlotState::Running);
                let cancel = Arc::new(AtomicBool::new(false));
                let job = Job {
                    slot: i,
                    ticket: s.ticket,
                    req: GenerateRequest {
                        schema_context: s.context().to_string(),
                        question: s.question().to_string(),
                        max_new_tokens: s.max_new_tokens as usize,
                    },
                    cancel: cancel.clone(),
                    prefix_cache_bytes: gucs::prefix_cache_bytes(),
                };
                running = Some((i, s.ticket, cancel));
                if job_tx.send(job).is_err() {
                    running = None;
                }
            }
        }
    }

    // SIGTERM or postmaster death: stop generating, unpublish ourselves.
    cancel(&running);
    let mut b = BOARD.exclusive();
    b.worker_latch = 0;
    b.set_worker_state(WorkerState::Stopped);
    log!("copilot worker: stopped");
}

fn handle_event(ev: Event, running: &mut Option<(usize, u64, Arc<AtomicBool>)>) {
    match ev {
        Event::Loaded { arch, bytes, load_s } => {
            let mut b = BOARD.exclusive();
            b.set_worker_state(WorkerState::Ready);
            b.model_arch.set(&arch);
            b.model_bytes = bytes;
            b.load_ms = load_s * 1000.0;
            drop(b);
            log!("copilot worker: model ready ({arch}, {bytes} bytes, loaded in {load_s:.2} s)");
        }
        Event::LoadFailed(reason) => {
            let mut b = BOARD.exclusive();
            b.set_worker_state(WorkerState::Failed);
            b.message.set(&reason);
            drop(b);
            warning!("copilot worker: cannot load the model: {reason}");
        }
        Event::Checksum(h) => {
            BOARD.exclusive().model_sha256.set(&h);
        }
        Event::Finished { slot, ticket, outcome, elapsed_ms, cache } => {
            if running.as_ref().is_some_and(|r| r.0 == slot && r.1 == ticket) {
                *running = None;
            }
            let mut b = BOARD.exclusive();
            b.prefix_cache = cache.into();
            let s = &mut b.slots[slot];
            if s.ticket != ticket || s.state() != SlotState::Running {
                // Abandoned while running: the session is gone; free the slot.
                if s.ticket == ticket && s.state() == SlotState::Abandoned {
                    s.set_state(SlotState::Free);
                }
                b.cancelled += 1;
                return;
            }
            match outcome {
                Ok(g) => {
                    s.fail_kind = FailKind::None as u32;
                    s.result.set(g.sql.as_deref().unwrap_or(""));
                    s.raw.set(&g.text);
                    s.prompt_tokens = g.prompt_tokens as u32;
                    s.generated_tokens = g.generated_tokens as u32;
                    s.latency_ms = elapsed_ms;
                    s.set_state(SlotState::Done);
                    let latch = s.client_latch;
                    b.served += 1;
                    b.last_latency_ms = elapsed_ms;
                    b.last_prompt_tokens = g.prompt_tokens as u32;
                    b.last_generated_tokens = g.generated_tokens as u32;
                    b.last_decode_tok_s = g.decode_tok_s();
                    b.last_prefix_tokens = g.prefix_tokens as u32;
                    b.last_prefix_cache_hit = u32::from(g.prefix_cache_hit);
                    // SAFETY: latch address published by the slot's owner, read under the lock.
                    unsafe { shmem::set_latch(latch) };
                }
                Err(CoreError::Cancelled) => {
                    s.set_state(SlotState::Free);
                    b.cancelled += 1;
                }
                Err(e) => {
                    s.fail_kind = match e {
                        CoreError::PromptTooLong { .. } => FailKind::PromptTooLong,
                        _ => FailKind::Internal,
                    } as u32;
                    s.result.set(&e.to_string());
                    s.set_state(SlotState::Failed);
                    let latch = s.client_latch;
                    b.failed += 1;
                    // SAFETY: as above.
                    unsafe { shmem::set_latch(latch) };
                }
            }
        }
    }
}
