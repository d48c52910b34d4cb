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
use crate::shmem::{Failure, Latch, Metrics, Outcome, Ticket, BOARD};
use copilot_core::engine::backend::{Backend, GenerateRequest};
use copilot_core::engine::prefix_cache::CacheStats;
use copilot_core::engine::runtime::{LoadOptions, Runtime};
use copilot_core::engine::scripted::Scripted;
use copilot_core::error::ErrorKind;
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
    ticket: Ticket,
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
        ticket: Ticket,
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

/// The text a panic carried, if any.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// What the inference thread serves: a model, or (`script:<path>`) a scripted backend for tests.
enum Engine {
    Model(Box<Runtime>),
    Script(Scripted),
}

impl Engine {
    fn load(spec: &str, opts: &LoadOptions) -> Result<(Engine, String, u64, f64), CoreError> {
        if let Some(path) = spec.strip_prefix("script:") {
            let t0 = Instant::now();
            let s = Scripted::load(std::path::Path::new(path))?;
            return Ok((Engine::Script(s), "script".into(), 0, t0.elapsed().as_secs_f64()));
        }
        let path = copilot_core::engine::source::resolve(spec, false)?;
        let rt = Runtime::load(&path, opts)?;
        let info = rt.info();
        let (arch, bytes, load_s) = (info.arch.clone(), info.file_bytes, info.load_s);
        Ok((Engine::Model(Box::new(rt)), arch, bytes, load_s))
    }

    fn file(&self) -> Option<std::path::PathBuf> {
        match self {
            Engine::Model(rt) => Some(rt.info().path.clone()),
            Engine::Script(_) => None,
        }
    }

    fn generate(&mut self, job: &Job, cancel: &dyn Fn() -> bool) -> Result<copilot_core::Generation, CoreError> {
        match self {
            Engine::Model(rt) => {
                rt.set_prefix_cache_bytes(job.prefix_cache_bytes);
                rt.generate(&job.req, cancel)
            }
            Engine::Script(s) => s.generate(&job.req, cancel),
        }
    }

    fn cache_stats(&self) -> CacheStats {
        match self {
            Engine::Model(rt) => rt.prefix_cache_stats(),
            Engine::Script(_) => CacheStats::default(),
        }
    }
}

fn inference_thread(spec: String, max_context: usize, jobs: Receiver<Job>, events: Sender<Event>) {
    // The prefix cache's bound comes with every job (set before it runs), so a reload can change it.
    let opts = LoadOptions { max_context, ..Default::default() };
    // A panic while loading (a malformed file candle trips over) is reported with its message, like one while
    // answering.
    let loaded = std::panic::catch_unwind(|| Engine::load(&spec, &opts))
        .unwrap_or_else(|p| Err(CoreError::Model(format!("loading panicked: {}", panic_message(p.as_ref())))));
    let mut engine = match loaded {
        Ok((engine, arch, bytes, load_s)) => {
            let _ = events.send(Event::Loaded { arch, bytes, load_s });
            if let Some(path) = engine.file() {
                let ev = events.clone();
                let _ = spawn_masked("copilot-sha256", move || {
                    if let Ok(h) = copilot_core::engine::source::sha256_file(&path) {
                        let _ = ev.send(Event::Checksum(h));
                    }
                });
            }
            engine
        }
        Err(e) => {
            let _ = events.send(Event::LoadFailed(e.to_string()));
            return;
        }
    };
    while let Ok(job) = jobs.recv() {
        let t0 = Instant::now();
        let cancel = job.cancel.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.generate(&job, &|| cancel.load(Ordering::Relaxed))
        }))
        .unwrap_or_else(|p| Err(CoreError::Inference(format!("inference panicked: {}", panic_message(p.as_ref())))));
        let elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let cache = engine.cache_stats();
        if events.send(Event::Finished { ticket: job.ticket, outcome, elapsed_ms, cache }).is_err() {
            return;
        }
    }
}

/// Ask the inference thread to stop the running generation, if any (it polls the flag between tokens).
fn cancel(running: &Option<(Ticket, Arc<AtomicBool>)>) {
    if let Some((_, flag)) = running {
        flag.store(true, Ordering::Relaxed);
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn copilot_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let spec = gucs::model();
    let threads = gucs::THREADS.get().max(1) as usize;
    let max_context = gucs::MAX_CONTEXT_TOKENS.get().max(1) as usize;
    // SAFETY: MyProcPid is set once at process start and only read here, on the main thread.
    let pid = unsafe { pg_sys::MyProcPid };
    let wake = BOARD.exclusive().worker_start(pid, Latch::mine(), &spec, threads as u32);
    wake.into_iter().for_each(Latch::set);
    log!("copilot worker: loading model {spec} with {threads} thread(s)");
    // candle sizes its thread pools from these variables when it first builds them (on the inference thread).
    // Set here, before this process has any thread but its main one.
    // SAFETY: the worker is single-threaded at this point (the inference thread is spawned below), so no other
    // thread can read the environment while it changes.
    unsafe { copilot_core::engine::runtime::configure_threads(threads) };

    let (job_tx, job_rx) = channel::<Job>();
    let (ev_tx, ev_rx) = channel::<Event>();
    let spawned = {
        let spec = spec.clone();
        spawn_masked("copilot-inference", move || inference_thread(spec, max_context, job_rx, ev_tx))
    };
    if let Err(e) = spawned {
        BOARD.exclusive().worker_failed(&format!("cannot start the inference thread: {e}"));
    }

    let mut running: Option<(Ticket, Arc<AtomicBool>)> = None;
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
                BOARD.exclusive().worker_exit(false);
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
                    // The inference thread ended: either the model failed to load (state already failed) or it
                    // died. Either way nothing more will be answered.
                    BOARD.exclusive().worker_failed("the inference thread stopped");
                    running = None;
                    break;
                }
            }
        }

        let mut b = BOARD.exclusive();
        let reaped = b.reap(running.as_ref().map(|r| r.0), |pid, latch| latch.owned_by(pid));
        if reaped.cancel_running {
            cancel(&running);
        }
        reaped.wake.into_iter().for_each(Latch::set);
        if running.is_none() {
            if let Some(taken) = b.next_pending() {
                match serde_json::from_str::<GenerateRequest>(&taken.payload) {
                    Ok(mut req) => {
                        req.schema_context = taken.context;
                        let cancel = Arc::new(AtomicBool::new(false));
                        let job = Job {
                            ticket: taken.ticket,
                            req,
                            cancel: cancel.clone(),
                            prefix_cache_bytes: gucs::prefix_cache_bytes(),
                        };
                        running = Some((taken.ticket, cancel));
                        if job_tx.send(job).is_err() {
                            // The inference side is gone; the next round fails what is queued.
                            b.worker_failed("the inference thread stopped");
                        }
                    }
                    Err(e) => {
                        let why = format!("malformed request: {e}");
                        let failed = Outcome::Failed(Failure::Engine(ErrorKind::Inference), &why);
                        if let Some(owner) = b.finish(taken.ticket, failed) {
                            owner.set();
                        }
                    }
                }
            }
        }
    }

    // SIGTERM or postmaster death: stop generating, unpublish ourselves.
    cancel(&running);
    BOARD.exclusive().worker_exit(true);
    log!("copilot worker: stopped");
}

fn handle_event(ev: Event, running: &mut Option<(Ticket, Arc<AtomicBool>)>) {
    match ev {
        Event::Loaded { arch, bytes, load_s } => {
            BOARD.exclusive().worker_loaded(&arch, bytes, load_s * 1000.0);
            log!("copilot worker: model ready ({arch}, {bytes} bytes, loaded in {load_s:.2} s)");
        }
        Event::LoadFailed(reason) => {
            BOARD.exclusive().worker_failed(&reason);
            warning!("copilot worker: cannot load the model: {reason}");
        }
        Event::Checksum(h) => BOARD.exclusive().set_model_sha256(&h),
        Event::Finished { ticket, outcome, elapsed_ms, cache } => {
            if running.as_ref().is_some_and(|r| r.0 == ticket) {
                *running = None;
            }
            let mut b = BOARD.exclusive();
            b.set_prefix_cache(cache.into());
            let (answer, message);
            let outcome = match &outcome {
                Ok(g) => {
                    answer = serde_json::to_string(&g.answer()).unwrap_or_else(|_| "{}".into());
                    Outcome::Answered {
                        answer: &answer,
                        metrics: Metrics {
                            prompt_tokens: g.prompt_tokens as u32,
                            generated_tokens: g.generated_tokens as u32,
                            prefix_tokens: g.prefix_tokens as u32,
                            prefix_cache_hit: g.prefix_cache_hit,
                            latency_ms: elapsed_ms,
                            decode_tok_s: g.decode_tok_s(),
                            candidates: 1 + g.samples.len() as u32,
                            decoded_rows: g.decoded_rows as u32,
                        },
                    }
                }
                Err(CoreError::Cancelled) => Outcome::Cancelled,
                Err(e) => {
                    message = e.to_string();
                    Outcome::Failed(Failure::Engine(e.kind()), &message)
                }
            };
            if let Some(owner) = b.finish(ticket, outcome) {
                owner.set();
            }
        }
    }
}
