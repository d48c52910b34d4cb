//! Ask one question of a GGUF model over a schema file, from the command line, without PostgreSQL:
//! `cargo run --release -p copilot-core --example generate -- MODEL.gguf SCHEMA.sql "question" [threads]`
use copilot_core::engine::backend::{Backend, GenerateRequest};
use copilot_core::engine::runtime::{configure_threads, LoadOptions, Runtime};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: generate MODEL.gguf SCHEMA.sql QUESTION [THREADS]");
        std::process::exit(2);
    }
    // SAFETY: first thing in main, before any thread exists.
    unsafe { configure_threads(args.get(4).and_then(|t| t.parse().ok()).unwrap_or(2)) };
    let schema = std::fs::read_to_string(&args[2]).expect("read schema file");
    let mut rt = Runtime::load(std::path::Path::new(&args[1]), &LoadOptions::default()).expect("load model");
    eprintln!("loaded {} ({}) in {:.2}s", rt.info().path.display(), rt.info().arch, rt.info().load_s);
    let req = GenerateRequest {
        schema_context: schema,
        question: args[3].clone(),
        max_new_tokens: 256,
        ..Default::default()
    };
    let g = rt.generate(&req, &|| false).expect("generate");
    eprintln!(
        "prompt {} tok, prefill {:.2}s ({:.1} tok/s), {} new tok, decode {:.1} tok/s, stop {}",
        g.prompt_tokens,
        g.prefill_s,
        g.prompt_tokens as f64 / g.prefill_s,
        g.generated_tokens,
        g.decode_tok_s(),
        g.stop.as_str()
    );
    println!("{}", g.sql.unwrap_or_else(|| format!("-- no SQL in: {}", g.text)));
}
