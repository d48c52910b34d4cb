//! The engine as a service: a loaded model (or a scripted backend) that takes jobs and reports events, the same
//! whether it runs on a thread of the caller or in a process of its own (`copilot-engine`, which PostgreSQL's
//! worker starts and supervises so that a crash of the model never reaches the database).
//!
//! [`Engine::load`] loads what a model reference names (a GGUF path, `hf:…`, or `script:<rules.json>`), with any
//! panic caught and reported with its message. [`serve`] takes jobs in arrival order from a channel of
//! [`Command`]s and sends [`Event`]s back: a model decodes every job it has started together, one pass over the
//! weights per step for all of them, starting the next job between two passes (other engines answer one job at a
//! time); a job's cancel flag is checked between prefill chunks and between passes.
//! [`wire`] is the framing both ends of the process boundary speak.
//!
//! **Trace** (a measurement aid, off by default): with [`LoadOptions::trace`] (`copilot-engine` takes it from
//! `COPILOT_ENGINE_TRACE=<file>` in its environment) the job loop appends one line per prompt read and per decoding
//! pass to that file (see [`Trace`]); `scripts/bench-concurrency` turns it into where the engine's time went at
//! each level.

use crate::engine::backend::{Answer, Backend, CacheStats, GenerateRequest, LoadOptions};
#[cfg(feature = "model")]
use crate::engine::runtime::Runtime;
use crate::engine::scripted::Scripted;
use crate::error::{CoreError, ErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the engine serves: a model, or (`script:<path>`) a scripted backend for tests.
pub enum Engine {
    #[cfg(feature = "model")]
    Model(Box<Runtime>),
    Script(Scripted),
    #[cfg(feature = "remote")]
    Remote(crate::engine::remote::OpenAi),
}

/// Where the engine's answers come from: what `spec` names, or a remote server.
#[derive(Debug, Clone)]
pub enum Source {
    Spec(String),
    #[cfg(feature = "remote")]
    Remote(crate::engine::remote::RemoteConfig),
}

/// What is known once an engine has loaded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Loaded {
    pub arch: String,
    pub file_bytes: u64,
    pub load_s: f64,
    /// The model file, for its checksum (none for a script).
    pub path: Option<std::path::PathBuf>,
    /// What became of the sentence encoder asked for (`LoadOptions::embedder`), for the worker's log.
    #[serde(default)]
    pub embedder: String,
    /// The engine scores tables by meaning: `rank_tables` requests get scores (a sentence encoder loaded). An
    /// engine that says nothing (an older one) does not.
    #[serde(default)]
    pub ranks_tables: bool,
    /// The engine was built without optimisation (a debug build): its kernels run one to two orders of magnitude
    /// slower, which the worker says in the log rather than leaving users to guess why every ask times out.
    #[serde(default)]
    pub debug_build: bool,
}

/// The text a panic carried, if any.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

impl Engine {
    /// Load what `spec` names. A panic while loading (a malformed file candle trips over) is an error with its
    /// message, like any other.
    pub fn load(source: &Source, opts: &LoadOptions) -> Result<(Engine, Loaded), CoreError> {
        match source {
            Source::Spec(spec) => std::panic::catch_unwind(|| Engine::load_inner(spec, opts))
                .unwrap_or_else(|p| Err(CoreError::Model(format!("loading panicked: {}", panic_message(p.as_ref()))))),
            #[cfg(feature = "remote")]
            Source::Remote(cfg) => {
                let loaded = Loaded {
                    arch: "openai".into(),
                    file_bytes: 0,
                    load_s: 0.0,
                    path: None,
                    embedder: "none (a remote engine's questions are grounded by spelling)".into(),
                    ranks_tables: false,
                    debug_build: cfg!(debug_assertions),
                };
                Ok((Engine::Remote(crate::engine::remote::OpenAi::new(cfg.clone())), loaded))
            }
        }
    }

    fn load_inner(spec: &str, opts: &LoadOptions) -> Result<(Engine, Loaded), CoreError> {
        if let Some(path) = spec.strip_prefix("script:") {
            let t0 = Instant::now();
            let s = Scripted::load(std::path::Path::new(path))?;
            let loaded = Loaded {
                arch: "script".into(),
                file_bytes: 0,
                load_s: t0.elapsed().as_secs_f64(),
                path: None,
                embedder: "scripted".into(),
                ranks_tables: false,
                debug_build: cfg!(debug_assertions),
            };
            return Ok((Engine::Script(s), loaded));
        }
        Engine::load_model(spec, opts)
    }

    #[cfg(feature = "model")]
    fn load_model(spec: &str, opts: &LoadOptions) -> Result<(Engine, Loaded), CoreError> {
        let path = crate::engine::source::resolve(spec, false)?;
        let rt = Runtime::load(&path, opts)?;
        let info = rt.info();
        let loaded = Loaded {
            arch: info.arch.clone(),
            file_bytes: info.file_bytes,
            load_s: info.load_s,
            path: Some(path),
            embedder: rt.embedder_status().to_string(),
            ranks_tables: rt.ranks_tables(),
            debug_build: cfg!(debug_assertions),
        };
        Ok((Engine::Model(Box::new(rt)), loaded))
    }

    #[cfg(not(feature = "model"))]
    fn load_model(spec: &str, _opts: &LoadOptions) -> Result<(Engine, Loaded), CoreError> {
        Err(CoreError::Model(format!("{spec}: this build of copilot-core has no local model engine (feature `model`)")))
    }

    /// Start one job: a model's job is read and prefilled and comes back ready to decode (see [`Engine::advance`]);
    /// any other engine answers it here, whole. A panic is an error with its message.
    pub fn begin(&mut self, job: &Job, cancel: &dyn Fn() -> bool) -> Result<Begun, CoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            #[cfg(feature = "model")]
            Engine::Model(rt) => {
                rt.set_prefix_cache_bytes(job.prefix_cache_bytes);
                Ok(match rt.begin(&job.req, cancel)? {
                    crate::engine::runtime::Begun::Answered(g) => Begun::Answered(g),
                    crate::engine::runtime::Begun::Decoding(d) => Begun::Decoding(d),
                })
            }
            Engine::Script(s) => s.generate(&job.req, cancel).map(|g| Begun::Answered(Box::new(g))),
            #[cfg(feature = "remote")]
            Engine::Remote(r) => r.generate(&job.req, cancel).map(|g| Begun::Answered(Box::new(g))),
        }))
        .unwrap_or_else(|p| Err(CoreError::Inference(format!("inference panicked: {}", panic_message(p.as_ref())))))
    }

    /// One decoding pass shared by the jobs in `jobs` ([`crate::engine::runtime::Runtime::advance`]); a panic is
    /// an error with its message, for all of them.
    #[cfg(feature = "model")]
    pub fn advance(&mut self, jobs: &mut [&mut Decoding]) -> Result<(), CoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            Engine::Model(rt) => rt.advance(jobs),
            #[allow(unreachable_patterns)]
            _ => Err(CoreError::Inference("only a local model decodes in passes".into())),
        }))
        .unwrap_or_else(|p| Err(CoreError::Inference(format!("inference panicked: {}", panic_message(p.as_ref())))))
    }

    /// The answer of a job [`Engine::advance`] has finished.
    #[cfg(feature = "model")]
    pub fn finish(&self, d: Decoding) -> Result<crate::Generation, CoreError> {
        match self {
            Engine::Model(rt) => rt.finish(d),
            #[allow(unreachable_patterns)]
            _ => Err(CoreError::Inference("only a local model decodes in passes".into())),
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        match self {
            #[cfg(feature = "model")]
            Engine::Model(rt) => rt.prefix_cache_stats(),
            #[allow(unreachable_patterns)]
            _ => CacheStats::default(),
        }
    }
}

#[cfg(feature = "model")]
use crate::engine::runtime::Decoding;

/// A job once started ([`Engine::begin`]).
pub enum Begun {
    Answered(Box<crate::Generation>),
    #[cfg(feature = "model")]
    Decoding(Box<Decoding>),
}

/// One request to answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub req: GenerateRequest,
    /// The prefix cache's bound for this job (a reload of the server's settings changes it between jobs).
    pub prefix_cache_bytes: usize,
}

/// What the engine is told.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    Run(Job),
    /// Stop working on a job (queued or running); it ends with `Finished` and `Err(Cancelled)`.
    Cancel(u64),
    Shutdown,
}

/// What a finished job produced, as it crosses back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Done {
    pub answer: Answer,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefix_tokens: usize,
    pub prefix_cache_hit: bool,
    pub decode_tok_s: f64,
    pub candidates: usize,
    pub decoded_rows: usize,
}

impl From<&crate::Generation> for Done {
    fn from(g: &crate::Generation) -> Done {
        Done {
            answer: g.answer(),
            prompt_tokens: g.prompt_tokens,
            generated_tokens: g.generated_tokens,
            prefix_tokens: g.prefix_tokens,
            prefix_cache_hit: g.prefix_cache_hit,
            decode_tok_s: g.decode_tok_s(),
            candidates: 1 + g.samples.len(),
            decoded_rows: g.decoded_rows,
        }
    }
}

/// A failure as it crosses back: its kind (for the SQLSTATE) and its words.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failed {
    pub kind: u32,
    pub message: String,
}

impl Failed {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::try_from(self.kind).unwrap_or(ErrorKind::Inference)
    }
}

impl From<&CoreError> for Failed {
    fn from(e: &CoreError) -> Failed {
        Failed { kind: e.kind() as u32, message: e.to_string() }
    }
}

/// What the engine reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Event {
    Loaded(Loaded),
    LoadFailed(String),
    Checksum(String),
    Finished {
        id: u64,
        outcome: Result<Done, Failed>,
        elapsed_ms: f64,
        cache: CacheCounters,
    },
    /// Sent while the engine is alive (every `HEARTBEAT`), so a supervisor can tell a hung engine from a busy one.
    Heartbeat,
}

/// The prefix cache's counters, as they cross.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheCounters {
    pub entries: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl From<CacheStats> for CacheCounters {
    fn from(s: CacheStats) -> Self {
        CacheCounters {
            entries: s.entries as u64,
            bytes: s.bytes as u64,
            limit_bytes: s.limit_bytes as u64,
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
        }
    }
}

/// How often a live engine says so.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);

/// Load `spec`, report it, then answer jobs until `Shutdown` or until the command channel closes. Commands are read
/// on the calling thread's behalf by `commands`; a `Cancel` for the running job sets its flag at once (a reader
/// feeds `commands` while a job runs, see [`serve_split`]).
pub fn serve(source: &Source, opts: &LoadOptions, commands: Receiver<Command>, events: Sender<Event>) {
    let cancels: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
    let c2 = cancels.clone();
    // Route commands: runs to the queue, cancels to the flags (so a cancel reaches a running job).
    let router = std::thread::Builder::new().name("copilot-engine-commands".into()).spawn(move || {
        while let Ok(c) = commands.recv() {
            match c {
                Command::Run(job) => {
                    c2.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id, Arc::new(AtomicBool::new(false)));
                    if jobs_tx.send(job).is_err() {
                        break;
                    }
                }
                Command::Cancel(id) => {
                    if let Some(f) = c2.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                        f.store(true, Ordering::Relaxed);
                    }
                }
                Command::Shutdown => break,
            }
        }
    });
    serve_split(source, opts, jobs_rx, &cancels, &events);
    drop(router);
}

/// The job loop of [`serve`]: jobs started in order, each with the cancel flag the router keeps for it; a model's
/// jobs decode together ([`Engine::advance`]), each answered when it ends.
fn serve_split(
    source: &Source,
    opts: &LoadOptions,
    jobs: Receiver<Job>,
    cancels: &Mutex<HashMap<u64, Arc<AtomicBool>>>,
    events: &Sender<Event>,
) {
    let mut engine = match Engine::load(source, opts) {
        Ok((engine, loaded)) => {
            let path = loaded.path.clone();
            let _ = events.send(Event::Loaded(loaded));
            if let Some(path) = path {
                let ev = events.clone();
                let _ = std::thread::Builder::new().name("copilot-sha256".into()).spawn(move || {
                    if let Ok(h) = crate::engine::source::sha256_file(&path) {
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
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    let mut trace = opts.trace.as_deref().and_then(Trace::open);
    loop {
        // Start at most one job between two passes, so a prompt's prefill holds the others up once; wait for one
        // only when nothing is decoding.
        let job = if active.is_empty() {
            match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            }
        } else if open {
            match jobs.try_recv() {
                Ok(j) => Some(j),
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    None
                }
            }
        } else {
            None
        };
        if let Some(job) = job {
            let flag = cancels.lock().unwrap_or_else(|p| p.into_inner()).get(&job.id).cloned().unwrap_or_default();
            let t0 = Instant::now();
            let begun = engine.begin(&job, &|| flag.load(Ordering::Relaxed));
            if let Some(t) = trace.as_mut() {
                t.begin(t0, &begun, active.len());
            }
            match begun {
                Ok(Begun::Answered(g)) => {
                    if !report(&engine, cancels, events, job.id, t0, Ok(Done::from(&*g))) {
                        return;
                    }
                }
                #[cfg(feature = "model")]
                Ok(Begun::Decoding(d)) => active.push(Active { id: job.id, t0, flag, d }),
                Err(e) => {
                    if !report(&engine, cancels, events, job.id, t0, Err(Failed::from(&e))) {
                        return;
                    }
                }
            }
        }
        if !decode_pass(&mut engine, &mut active, cancels, events, trace.as_mut()) {
            return;
        }
    }
}

/// The job loop's trace ([`LoadOptions::trace`]): one line per event, fields separated by spaces, times in
/// seconds since the Unix epoch (when the event ended) and milliseconds (how long it took):
/// - `begin <time> <ms> <how> <own tokens> <decoding>`: a job's prompt read; `how` is `recent` (taken whole from a
///   prompt read lately), `after-prefix` (its tokens after a cached schema prefix), `whole`, or `answered` /
///   `failed` (no decoding followed); `own tokens` those after the schema prefix; `decoding` the jobs then decoding.
/// - `pass <time> <ms> <rows> <jobs>`: one decoding pass, its rows (the tokens its jobs planned, drafts included;
///   a twin candidate's, which its twin's row computes, too) and the jobs in it.
///
/// A line that cannot be written is dropped (the trace never fails a job).
pub struct Trace {
    file: std::fs::File,
}

impl Trace {
    /// Append to `path` (created if missing); `None` when it cannot be opened (no trace then).
    fn open(path: &std::path::Path) -> Option<Trace> {
        std::fs::OpenOptions::new().create(true).append(true).open(path).ok().map(|file| Trace { file })
    }

    /// `<event> <time> <ms> <rest>` for an event that started at `t0` and ends now.
    fn line(&mut self, event: &str, t0: Instant, rest: std::fmt::Arguments) {
        use std::io::Write as _;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = writeln!(self.file, "{event} {:.3} {ms:.3} {rest}", now.as_secs_f64());
    }

    fn begin(&mut self, t0: Instant, begun: &Result<Begun, CoreError>, decoding: usize) {
        match begun {
            #[cfg(feature = "model")]
            Ok(Begun::Decoding(d)) => {
                let (how, own) = d.prompt_read();
                self.line("begin", t0, format_args!("{} {own} {decoding}", how.as_str()))
            }
            Ok(Begun::Answered(_)) => self.line("begin", t0, format_args!("answered 0 {decoding}")),
            Err(_) => self.line("begin", t0, format_args!("failed 0 {decoding}")),
        }
    }
}

/// A job decoding in the engine's shared passes.
#[cfg_attr(not(feature = "model"), allow(dead_code))]
struct Active {
    id: u64,
    t0: Instant,
    flag: Arc<AtomicBool>,
    #[cfg(feature = "model")]
    d: Box<Decoding>,
}

/// Send a finished job's event and forget its cancel flag; false when nobody listens any more.
fn report(
    engine: &Engine,
    cancels: &Mutex<HashMap<u64, Arc<AtomicBool>>>,
    events: &Sender<Event>,
    id: u64,
    t0: Instant,
    outcome: Result<Done, Failed>,
) -> bool {
    cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    let elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let cache = engine.cache_stats().into();
    events.send(Event::Finished { id, outcome, elapsed_ms, cache }).is_ok()
}

/// One pass for every job decoding (those cancelled leave first, answered `Cancelled`); the jobs it finishes are
/// answered. An error of the pass fails every job in it (their states are the pass's, not one job's).
#[cfg(feature = "model")]
fn decode_pass(
    engine: &mut Engine,
    active: &mut Vec<Active>,
    cancels: &Mutex<HashMap<u64, Arc<AtomicBool>>>,
    events: &Sender<Event>,
    trace: Option<&mut Trace>,
) -> bool {
    let mut ok = true;
    active.retain(|a| {
        let cancelled = a.flag.load(Ordering::Relaxed);
        if cancelled {
            ok &= report(engine, cancels, events, a.id, a.t0, Err(Failed::from(&CoreError::Cancelled)));
        }
        !cancelled
    });
    if active.is_empty() {
        return ok;
    }
    let result = {
        let mut ds: Vec<&mut Decoding> = active.iter_mut().map(|a| &mut *a.d).collect();
        let t0 = Instant::now();
        let result = engine.advance(&mut ds);
        if let Some(t) = trace {
            let rows: usize = ds.iter().map(|d| d.rows_last_pass()).sum();
            let jobs = ds.iter().filter(|d| d.rows_last_pass() > 0).count();
            // (A step where every job ended at planning ran nothing: no line.)
            if rows > 0 {
                t.line("pass", t0, format_args!("{rows} {jobs}"));
            }
        }
        result
    };
    if let Err(e) = result {
        let failed = Failed::from(&e);
        for a in active.drain(..) {
            ok &= report(engine, cancels, events, a.id, a.t0, Err(failed.clone()));
        }
        return ok;
    }
    let mut i = 0;
    while i < active.len() {
        if active[i].d.is_done() {
            let a = active.remove(i);
            let outcome = engine.finish(*a.d);
            let outcome = outcome.as_ref().map(Done::from).map_err(Failed::from);
            ok &= report(engine, cancels, events, a.id, a.t0, outcome);
        } else {
            i += 1;
        }
    }
    ok
}

#[cfg(not(feature = "model"))]
fn decode_pass(
    _engine: &mut Engine,
    _active: &mut Vec<Active>,
    _cancels: &Mutex<HashMap<u64, Arc<AtomicBool>>>,
    _events: &Sender<Event>,
    _trace: Option<&mut Trace>,
) -> bool {
    true
}

/// The framing on the engine's pipes: each message is a 4-byte little-endian length and that many bytes of JSON.
/// A reader refuses frames larger than [`wire::MAX_FRAME`] and anything that is not one whole message.
pub mod wire {
    use std::io::{Read, Write};

    /// The largest frame either side accepts (a request carries a schema context of at most 64 KiB; answers are
    /// smaller).
    pub const MAX_FRAME: usize = 4 << 20;

    #[derive(Debug, thiserror::Error)]
    pub enum WireError {
        #[error("the other side closed the pipe")]
        Closed,
        #[error("frame of {0} bytes is larger than {MAX_FRAME}")]
        TooLarge(usize),
        #[error("malformed message: {0}")]
        Malformed(String),
        #[error("i/o: {0}")]
        Io(#[from] std::io::Error),
    }

    pub fn write<W: Write, T: serde::Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
        let body = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
        if body.len() > MAX_FRAME {
            return Err(WireError::TooLarge(body.len()));
        }
        w.write_all(&(body.len() as u32).to_le_bytes())?;
        w.write_all(&body)?;
        w.flush()?;
        Ok(())
    }

    /// Decode one frame's body.
    pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
        serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))
    }

    pub fn read<R: Read, T: serde::de::DeserializeOwned>(r: &mut R) -> Result<T, WireError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
            Err(e) => return Err(e.into()),
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(WireError::TooLarge(n));
        }
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        })?;
        decode(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &std::path::Path) -> String {
        let p = dir.join("rules.json");
        std::fs::write(&p, r#"{"rules": [{"match": "", "answers": ["SELECT 1", "SELECT 2"]}]}"#).unwrap();
        format!("script:{}", p.display())
    }

    #[test]
    fn jobs_are_answered_in_order_and_a_cancel_reaches_its_job() {
        let dir = std::env::temp_dir().join(format!("copilot-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ctx, crx) = std::sync::mpsc::channel();
        let (etx, erx) = std::sync::mpsc::channel();
        let spec = Source::Spec(script(&dir));
        let h = std::thread::spawn(move || serve(&spec, &LoadOptions::default(), crx, etx));
        assert!(
            matches!(erx.recv().unwrap(), Event::Loaded(Loaded { ref arch, ranks_tables: false, .. }) if arch == "script")
        );
        let job =
            |id| Job { id, req: GenerateRequest { question: "q".into(), ..Default::default() }, prefix_cache_bytes: 0 };
        ctx.send(Command::Run(job(1))).unwrap();
        ctx.send(Command::Run(job(2))).unwrap();
        let mut done = Vec::new();
        while done.len() < 2 {
            if let Event::Finished { id, outcome, .. } = erx.recv().unwrap() {
                done.push((id, outcome.unwrap().answer.candidates[0].sql.clone()));
            }
        }
        assert_eq!(done, vec![(1, Some("SELECT 1".to_string())), (2, Some("SELECT 1".to_string()))]);
        ctx.send(Command::Shutdown).unwrap();
        drop(ctx);
        h.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_model_that_cannot_load_is_reported() {
        let (_ctx, crx) = std::sync::mpsc::channel();
        let (etx, erx) = std::sync::mpsc::channel();
        serve(&Source::Spec("/nonexistent/model.gguf".into()), &LoadOptions::default(), crx, etx);
        assert!(matches!(erx.recv().unwrap(), Event::LoadFailed(m) if m.contains("/nonexistent/model.gguf")));
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let mut buf = Vec::new();
        wire::write(&mut buf, &Command::Cancel(7)).unwrap();
        let back: Command = wire::read(&mut buf.as_slice()).unwrap();
        assert!(matches!(back, Command::Cancel(7)));
        // Truncated, oversized, garbage, empty.
        assert!(matches!(wire::read::<_, Command>(&mut &buf[..buf.len() - 1]), Err(wire::WireError::Closed)));
        let huge = ((wire::MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(wire::read::<_, Command>(&mut &huge[..]), Err(wire::WireError::TooLarge(_))));
        let mut junk = 3u32.to_le_bytes().to_vec();
        junk.extend_from_slice(b"{{{");
        assert!(matches!(wire::read::<_, Command>(&mut junk.as_slice()), Err(wire::WireError::Malformed(_))));
        assert!(matches!(wire::read::<_, Command>(&mut &[][..]), Err(wire::WireError::Closed)));
    }
}
