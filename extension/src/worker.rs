//! The background worker: it serves the board and supervises the engine process that runs the model.
//!
//! The model runs in `copilot-engine`, a process of its own started here (fork and exec, with `PR_SET_PDEATHSIG`
//! so it never outlives the worker, and an address-space limit of `copilot.engine_memory_mb`). PostgreSQL's
//! postmaster never sees it: a segfault in a kernel, an out-of-memory kill or a `kill -9` ends that process only,
//! and no backend of the database is disconnected. The worker reads the engine's events (frames on its stdout) on
//! a thread, writes jobs and cancels to its stdin, and restarts it when it dies — or when it stops sending its
//! heartbeat for [`ENGINE_SILENCE`] (a hang, a `SIGSTOP`) — failing the requests it held with a SQLSTATE that
//! says so (58000).
//!
//! Threads and who may touch what:
//! - the worker's **main thread** is the only one that calls into PostgreSQL (latches, the board's LWLock, GUCs,
//!   logging);
//! - the **engine reader** thread only turns frames from the engine's stdout into channel messages and rings the
//!   [`Doorbell`] (an eventfd, no PostgreSQL state) after each. It is created with every signal blocked, so
//!   PostgreSQL's handlers only ever run on the main thread.
//!
//! The main thread sleeps in `WaitLatchOrSocket` on its latch (set by sessions when they submit or abandon a
//! request) and the doorbell, so it wakes for work, not on a timer: polling every 2 ms while a job ran preempted
//! the engine's compute threads about 500 times a second on a 2-core machine (reports/engine_boundary.md).
//!
//! A change of `copilot.model` (SIGHUP) restarts the engine with the new model; the worker stays. A model that
//! fails to load leaves the worker in state `failed` with the reason, so sessions get that reason at once.

use crate::gucs::{self, EngineSpec};
use crate::shmem::{Failure, Latch, Metrics, Outcome, PrefixCacheCounters, Ticket, BOARD};
use copilot_core::engine::backend::GenerateRequest;
use copilot_core::engine::serve::{wire, Command, Event, Job};
use copilot_core::error::ErrorKind;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const RESTART_SECS: u64 = 1;

/// How long the engine may say nothing (it sends a heartbeat every 250 ms, busy or not) before it is deemed hung,
/// killed and restarted.
pub const ENGINE_SILENCE: Duration = Duration::from_secs(3);

pub fn register() {
    BackgroundWorkerBuilder::new("copilot model worker")
        .set_type("copilot model worker")
        .set_function("copilot_worker_main")
        .set_library("copilot")
        .enable_shmem_access(None)
        .set_restart_time(Some(Duration::from_secs(RESTART_SECS)))
        .load();
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

/// How long the main loop sleeps when nothing wakes it: the engine's silence and restarts are checked this often.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The main loop's sleep while a job runs if the doorbell could not be made (polling, as before it existed).
const POLL_WAIT: Duration = Duration::from_millis(2);

/// An eventfd the engine's reader thread writes after each message it passes on; the main loop waits on it beside
/// its latch. Ringing and draining are plain system calls on a descriptor this struct owns: any thread may ring.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Arc<Doorbell>> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor that we then own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd, is open, and nothing else owns it.
        Ok(Arc::new(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Wake the main loop. A full counter (EAGAIN) already means "ring", so the result is ignored.
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd this struct owns.
        unsafe { libc::write(self.0.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
    }

    /// Reset the counter (non-blocking: nothing to read is fine).
    fn drain(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from the eventfd this struct owns.
        unsafe { libc::read(self.0.as_raw_fd(), std::ptr::addr_of_mut!(n).cast(), 8) };
    }
}

/// Sleep until the latch is set, the doorbell rings or `timeout` passes (without a doorbell: the latch or the
/// timeout). False when the worker must stop (SIGTERM, the postmaster gone).
fn wait(bell: Option<&Doorbell>, timeout: Duration) -> bool {
    let Some(bell) = bell else { return BackgroundWorker::wait_latch(Some(timeout)) };
    let events = pg_sys::WL_LATCH_SET | pg_sys::WL_SOCKET_READABLE | pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH;
    // SAFETY: called on the worker's main thread only; MyLatch is this process's own latch, and the descriptor is
    // an open eventfd that `bell` keeps alive for the call. ResetLatch and CHECK_FOR_INTERRUPTS follow, as in
    // every latch loop of PostgreSQL.
    let rc = unsafe {
        let rc = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            bell.0.as_raw_fd(),
            timeout.as_millis().try_into().unwrap_or(i64::MAX) as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        rc
    };
    pg_sys::check_for_interrupts!();
    // Drained before the channel is read: a message sent after this rings again and the next wait returns at once.
    bell.drain();
    !BackgroundWorker::sigterm_received() && rc & pg_sys::WL_POSTMASTER_DEATH as i32 == 0
}

/// What the reader thread passes on.
enum Incoming {
    Event(Event),
    /// The engine's stdout ended or carried garbage: the process is gone or broken.
    Gone(String),
}

/// The running engine process and the worker's view of it.
struct EngineProc {
    child: Child,
    /// Commands for the writer thread, which owns the engine's stdin: a hung engine with a full pipe blocks that
    /// thread, never the worker's main loop (which must keep watching the heartbeat and the board).
    commands: Sender<Command>,
    incoming: Receiver<Incoming>,
    last_heard: Instant,
    started: Instant,
}

/// The engine binary: `copilot.engine_path`, else `copilot-engine` beside the extension's library.
fn engine_path() -> std::path::PathBuf {
    let configured = gucs::engine_path();
    if !configured.is_empty() {
        return configured.into();
    }
    // SAFETY: pkglib_path is a NUL-terminated C string PostgreSQL sets once at process start (MAXPGPATH bytes).
    let dir = unsafe { std::ffi::CStr::from_ptr(std::ptr::addr_of!(pg_sys::pkglib_path).cast::<std::ffi::c_char>()) };
    std::path::Path::new(&*dir.to_string_lossy()).join("copilot-engine")
}

fn spawn_engine(
    bell: Option<Arc<Doorbell>>,
    spec: &EngineSpec,
    threads: usize,
    max_context: usize,
    memory_mb: usize,
) -> std::io::Result<EngineProc> {
    let path = engine_path();
    let mut cmd = std::process::Command::new(&path);
    match spec {
        EngineSpec::Local { model, embedder } => {
            cmd.arg("--model").arg(model);
            if !embedder.trim().is_empty() {
                cmd.arg("--embedder").arg(embedder.trim());
            }
        }
        EngineSpec::OpenAi { endpoint, model, key_file, timeout_ms } => {
            cmd.args(["--backend", "openai", "--endpoint", endpoint, "--remote-model", model]);
            cmd.arg("--timeout-ms").arg(timeout_ms.to_string());
            if !key_file.is_empty() {
                cmd.arg("--api-key-file").arg(key_file);
            }
        }
    }
    cmd.arg("--threads").arg(threads.to_string());
    cmd.arg("--max-context").arg(max_context.to_string());
    cmd.arg("--memory-mb").arg(memory_mb.to_string());
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // The engine is not a PostgreSQL process: it gets the caller's environment minus what would change how it runs
    // (RUST_BACKTRACE would only lengthen its log lines).
    cmd.env_remove("RUST_BACKTRACE");
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe functions
    // (sigemptyset, sigprocmask, prctl, getppid, _exit), touching nothing of the parent's heap.
    unsafe {
        cmd.pre_exec(|| {
            // PostgreSQL blocks signals around some calls; the engine starts with none blocked.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Die with the worker, whatever the reason it goes.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start the engine {}: {e}", path.display())))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, incoming) = channel();
    spawn_masked("copilot-engine-reader", move || loop {
        let (msg, last) = match wire::read::<_, Event>(&mut stdout) {
            Ok(ev) => (Incoming::Event(ev), false),
            Err(e) => (Incoming::Gone(e.to_string()), true),
        };
        let sent = tx.send(msg).is_ok();
        if let Some(b) = &bell {
            b.ring();
        }
        if last || !sent {
            return;
        }
    })?;
    let (commands, outgoing) = channel::<Command>();
    spawn_masked("copilot-engine-writer", move || {
        // Ends when the worker drops its sender or the engine's stdin breaks; a blocked write ends when the
        // worker kills the engine (the pipe's reader goes away).
        while let Ok(c) = outgoing.recv() {
            if wire::write(&mut stdin, &c).is_err() {
                return;
            }
        }
    })?;
    Ok(EngineProc { child, commands, incoming, last_heard: Instant::now(), started: Instant::now() })
}

impl EngineProc {
    /// Hand a command to the writer thread. A write that fails means the engine is gone: its reader reports it.
    fn send(&mut self, c: Command) {
        let _ = self.commands.send(c);
    }

    /// Kill (SIGKILL) and reap; what happened to it, in words.
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => describe_exit(status),
            Err(e) => format!("could not be waited for ({e})"),
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// What the worker keeps about each job the engine is running (up to `copilot.decode_together` at once).
struct Running {
    ticket: Ticket,
    id: u64,
    cancelled: bool,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn copilot_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut spec = EngineSpec::current();
    let threads = gucs::THREADS.get().max(1) as usize;
    let max_context = gucs::MAX_CONTEXT_TOKENS.get().max(1) as usize;
    // SAFETY: MyProcPid is set once at process start and only read here, on the main thread.
    let pid = unsafe { pg_sys::MyProcPid };
    let wake = BOARD.exclusive().worker_start(pid, Latch::mine(), &spec.describe(), threads as u32);
    wake.into_iter().for_each(Latch::set);

    let bell = Doorbell::new()
        .map_err(|e| warning!("copilot worker: no eventfd ({e}); polling the engine every 2 ms instead"))
        .ok();
    let mut engine: Option<EngineProc> = None;
    let mut running: Vec<Running> = Vec::new();
    let mut next_id = 0u64;
    // Restarts: after a quick death, wait longer before the next try (1 s, 2 s, 4 s … 30 s).
    let mut backoff = Duration::from_secs(0);
    let mut restart_at = Instant::now();
    loop {
        if engine.is_none() && Instant::now() >= restart_at {
            let memory_mb = gucs::ENGINE_MEMORY_MB.get().max(0) as usize;
            log!("copilot worker: starting the engine for {} with {threads} thread(s)", spec.describe());
            match spawn_engine(bell.clone(), &spec, threads, max_context, memory_mb) {
                Ok(e) => engine = Some(e),
                Err(e) => {
                    BOARD.exclusive().worker_failed(&e.to_string());
                    warning!("copilot worker: {e}");
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    restart_at = Instant::now() + backoff;
                }
            }
        }
        let timeout = if !running.is_empty() && bell.is_none() { POLL_WAIT } else { IDLE_WAIT };
        if !wait(bell.as_deref(), timeout) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file on SIGHUP is what every background worker does, on its main
            // thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if EngineSpec::current() != spec {
                spec = EngineSpec::current();
                log!("copilot worker: the engine's settings changed ({}); restarting it", spec.describe());
                if let Some(e) = engine.take() {
                    let _ = e.kill();
                }
                running.clear();
                let wake = {
                    let mut b = BOARD.exclusive();
                    let wake = b.engine_lost("the engine's settings changed; it restarted with the new ones");
                    b.worker_start(pid, Latch::mine(), &spec.describe(), threads as u32);
                    wake
                };
                wake.into_iter().for_each(Latch::set);
                backoff = Duration::from_secs(0);
                restart_at = Instant::now();
                continue;
            }
        }

        // Events from the engine; its death or silence.
        let mut lost: Option<String> = None;
        if let Some(e) = engine.as_mut() {
            loop {
                match e.incoming.try_recv() {
                    Ok(Incoming::Event(ev)) => {
                        e.last_heard = Instant::now();
                        handle_event(ev, &mut running);
                    }
                    Ok(Incoming::Gone(why)) => {
                        lost = Some(format!("stopped talking ({why})"));
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        lost = Some("its reader stopped".into());
                        break;
                    }
                }
            }
            if lost.is_none() && e.last_heard.elapsed() > ENGINE_SILENCE {
                lost = Some(format!("stopped answering (nothing for {} s)", ENGINE_SILENCE.as_secs()));
            }
        }
        if let Some(why) = lost {
            let e = engine.take().expect("an engine to lose");
            let quick = e.started.elapsed() < Duration::from_secs(5);
            let how = e.kill();
            let reason = format!("the copilot engine process {why} and {how}; it is being restarted");
            warning!("copilot worker: {reason}");
            running.clear();
            let wake = BOARD.exclusive().engine_lost(&reason);
            wake.into_iter().for_each(Latch::set);
            backoff = if quick {
                (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
            } else {
                Duration::ZERO
            };
            restart_at = Instant::now() + backoff;
            continue;
        }

        let Some(e) = engine.as_mut() else { continue };
        let mut b = BOARD.exclusive();
        let tickets: Vec<Ticket> = running.iter().map(|r| r.ticket).collect();
        let reaped = b.reap(&tickets, |pid, latch| latch.owned_by(pid));
        reaped.wake.into_iter().for_each(Latch::set);
        let cancel: Vec<u64> = running
            .iter_mut()
            .filter(|r| !r.cancelled && reaped.cancel.contains(&r.ticket))
            .map(|r| {
                r.cancelled = true;
                r.id
            })
            .collect();
        if !cancel.is_empty() {
            drop(b);
            cancel.into_iter().for_each(|id| e.send(Command::Cancel(id)));
            continue;
        }
        // Up to `copilot.decode_together` requests go to the engine, which decodes them together; the rest wait on
        // the board in ticket order.
        let together = gucs::DECODE_TOGETHER.get().clamp(1, crate::shmem::SLOTS as i32) as usize;
        let mut taken_all = Vec::new();
        while running.len() + taken_all.len() < together {
            let Some(taken) = b.next_pending() else { break };
            taken_all.push(taken);
        }
        drop(b);
        for taken in taken_all {
            match serde_json::from_str::<GenerateRequest>(&taken.payload) {
                Ok(mut req) => {
                    req.schema_context = taken.context;
                    next_id += 1;
                    let job = Job { id: next_id, req, prefix_cache_bytes: gucs::prefix_cache_bytes() };
                    running.push(Running { ticket: taken.ticket, id: next_id, cancelled: false });
                    e.send(Command::Run(job));
                }
                Err(err) => {
                    let why = format!("malformed request: {err}");
                    let failed = Outcome::Failed(Failure::Engine(ErrorKind::Inference), &why);
                    if let Some(owner) = BOARD.exclusive().finish(taken.ticket, failed) {
                        owner.set();
                    }
                }
            }
        }
    }

    // SIGTERM or postmaster death: stop the engine, unpublish ourselves.
    if let Some(mut e) = engine.take() {
        e.send(Command::Shutdown);
        let _ = e.kill();
    }
    BOARD.exclusive().worker_exit(true);
    log!("copilot worker: stopped");
}

fn handle_event(ev: Event, running: &mut Vec<Running>) {
    match ev {
        Event::Heartbeat => {}
        Event::Loaded(l) => {
            BOARD.exclusive().worker_loaded(&l.arch, l.file_bytes, l.load_s * 1000.0, &l.embedder, l.ranks_tables);
            log!(
                "copilot worker: model ready ({}, {} bytes, loaded in {:.2} s); sentence encoder: {}",
                l.arch,
                l.file_bytes,
                l.load_s,
                l.embedder
            );
            if l.debug_build {
                warning!(
                    "copilot worker: the engine ({}) is a debug build: answers will be one to two orders of magnitude \
                     slower; install a release build (scripts/lib.sh install_extension --release)",
                    engine_path().display()
                );
            }
        }
        Event::LoadFailed(reason) => {
            BOARD.exclusive().worker_failed(&reason);
            warning!("copilot worker: cannot load the model: {reason}");
        }
        Event::Checksum(h) => BOARD.exclusive().set_model_sha256(&h),
        Event::Finished { id, outcome, elapsed_ms, cache } => {
            let Some(at) = running.iter().position(|r| r.id == id) else { return };
            let r = running.swap_remove(at);
            let mut b = BOARD.exclusive();
            b.set_prefix_cache(PrefixCacheCounters {
                entries: cache.entries,
                bytes: cache.bytes,
                limit_bytes: cache.limit_bytes,
                hits: cache.hits,
                misses: cache.misses,
                evictions: cache.evictions,
            });
            let answer;
            let outcome = match &outcome {
                Ok(done) => {
                    answer = serde_json::to_string(&done.answer).unwrap_or_else(|_| "{}".into());
                    Outcome::Answered {
                        answer: &answer,
                        metrics: Metrics {
                            prompt_tokens: done.prompt_tokens as u32,
                            generated_tokens: done.generated_tokens as u32,
                            prefix_tokens: done.prefix_tokens as u32,
                            prefix_cache_hit: done.prefix_cache_hit,
                            latency_ms: elapsed_ms,
                            decode_tok_s: done.decode_tok_s,
                            candidates: done.candidates as u32,
                            decoded_rows: done.decoded_rows as u32,
                        },
                    }
                }
                Err(f) if f.kind() == ErrorKind::Cancelled => Outcome::Cancelled,
                Err(f) => Outcome::Failed(Failure::Engine(f.kind()), &f.message),
            };
            if let Some(owner) = b.finish(r.ticket, outcome) {
                owner.set();
            }
        }
    }
}
