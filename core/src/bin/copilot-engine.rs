//! `copilot-engine`: the model in a process of its own, so that nothing it does — a crash in a kernel, an
//! out-of-memory kill, a hang — can take PostgreSQL down. PostgreSQL's copilot worker starts it, feeds it jobs on
//! its stdin and reads events from its stdout (frames of `copilot_core::engine::serve::wire`), and restarts it when
//! it dies or stops answering.
//!
//! `copilot-engine --model SPEC [--embedder SPEC] [--threads N] [--max-context N] [--memory-mb N]`
//! `copilot-engine --backend openai --endpoint URL --remote-model NAME [--api-key-file F] [--timeout-ms N]`
//!
//! - `SPEC`: a GGUF path, `hf:<owner>/<repo>/<file>` (Hugging Face cache, no download), or `script:<rules.json>`;
//! - `--embedder`: a sentence encoder (a sentence-transformers folder or `hf:<repo>/model.safetensors`) that
//!   grounds questions by meaning (`copilot_core::engine::embed`); one that cannot load is reported and left out;
//! - `--backend openai`: answers come from an OpenAI-compatible server at `URL` (e.g. `http://10.0.0.5:8080/v1`);
//!   the API key, if any, is read from a file so that it appears in no command line, log or error;
//! - `--memory-mb`: the process's address space is limited to this (`RLIMIT_AS`), so a model too large for it fails
//!   to load with a clear reason instead of inviting the kernel's OOM killer;
//! - the process exits when its stdin closes (the worker went away) or on a `Shutdown` command.
//!
//! A heartbeat goes out every 250 ms while the process lives, so the worker can tell a long job from a hung engine.

use copilot_core::engine::runtime::{configure_threads, LoadOptions};
use copilot_core::engine::serve::{self, wire, Command, Event, HEARTBEAT};
use std::sync::mpsc::{channel, RecvTimeoutError};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn remote_source(args: &[String]) -> serve::Source {
    use copilot_core::engine::remote::RemoteConfig;
    let key = match arg(args, "--api-key-file") {
        Some(f) => match std::fs::read_to_string(&f) {
            Ok(k) => Some(k.trim().to_string()).filter(|k| !k.is_empty()),
            Err(e) => {
                eprintln!("copilot-engine: cannot read the API key file {f}: {e}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let timeout_ms = arg(args, "--timeout-ms").and_then(|v| v.parse::<u64>().ok()).unwrap_or(60_000);
    serve::Source::Remote(RemoteConfig {
        endpoint: arg(args, "--endpoint").unwrap_or_default(),
        model: arg(args, "--remote-model").unwrap_or_default(),
        api_key: key,
        timeout: std::time::Duration::from_millis(timeout_ms.max(1)),
        retries: 2,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let source = match (arg(&args, "--backend").as_deref(), arg(&args, "--model")) {
        (Some("openai"), _) => remote_source(&args),
        (None | Some("local"), Some(spec)) => serve::Source::Spec(spec),
        _ => {
            eprintln!(
                "usage: copilot-engine --model SPEC [--threads N] [--max-context N] [--memory-mb N]\n       \
                 copilot-engine --backend openai --endpoint URL --remote-model NAME [--api-key-file F] [--timeout-ms N]"
            );
            std::process::exit(2);
        }
    };
    let num = |name: &str| arg(&args, name).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    // SAFETY: first thing in main, before any thread of this process exists.
    unsafe { configure_threads(num("--threads").max(1)) };
    let memory_mb = num("--memory-mb");
    if memory_mb > 0 {
        let bytes = (memory_mb as libc::rlim_t) << 20;
        let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
        // SAFETY: setrlimit only reads the struct we pass; it limits this process's own address space.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
            eprintln!("copilot-engine: cannot limit memory to {memory_mb} MB: {}", std::io::Error::last_os_error());
        }
    }
    let (cmd_tx, cmd_rx) = channel::<Command>();
    let (ev_tx, ev_rx) = channel::<Event>();
    // Commands: read on their own thread so a cancel reaches a running job. EOF = the worker is gone.
    std::thread::Builder::new()
        .name("copilot-engine-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            loop {
                match wire::read::<_, Command>(&mut stdin) {
                    Ok(c) => {
                        let stop = matches!(c, Command::Shutdown);
                        if cmd_tx.send(c).is_err() || stop {
                            std::process::exit(0);
                        }
                    }
                    Err(wire::WireError::Closed) => std::process::exit(0),
                    Err(e) => {
                        eprintln!("copilot-engine: bad command on stdin: {e}");
                        std::process::exit(2);
                    }
                }
            }
        })
        .expect("spawn the stdin reader");
    // Events, and a heartbeat whenever there is nothing else to say.
    std::thread::Builder::new()
        .name("copilot-engine-stdout".into())
        .spawn(move || {
            let mut stdout = std::io::stdout().lock();
            loop {
                let ev = match ev_rx.recv_timeout(HEARTBEAT) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => Event::Heartbeat,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                if wire::write(&mut stdout, &ev).is_err() {
                    std::process::exit(0);
                }
            }
        })
        .expect("spawn the stdout writer");
    let opts = LoadOptions {
        max_context: num("--max-context"),
        memory_limit_bytes: (memory_mb as u64) << 20,
        embedder: arg(&args, "--embedder").filter(|s| !s.is_empty()),
        // A measurement aid (scripts/bench-concurrency): one line per prompt read and per decoding pass.
        trace: std::env::var_os("COPILOT_ENGINE_TRACE").map(std::path::PathBuf::from),
        ..Default::default()
    };
    serve::serve(&source, &opts, cmd_rx, ev_tx.clone());
    // Loading failed (reported) or the commands ended: keep the heartbeat going until the worker closes stdin, so
    // a failed load is read as "failed", not as a dead engine.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        let _ = &ev_tx;
    }
}
