//! Real inference with the tiny CI model (SmolLM2-135M-Instruct Q4_1, llama family, GPT-2 BPE in the GGUF).
//! `scripts/fetch-model --tiny` puts it where these tests look; COPILOT_TEST_MODEL overrides the path.
//! These tests fail, loudly, when the model is absent: a skipped inference test would prove nothing.

use copilot_core::backend::{Backend, GenerateRequest, StopReason};
use copilot_core::error::CoreError;
use copilot_core::runtime::{LoadOptions, Runtime};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

fn model_path() -> PathBuf {
    let p = std::env::var_os("COPILOT_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/copilot/models/smollm2-135m-instruct-q4_1.gguf"));
    assert!(p.is_file(), "test model {} is missing: run scripts/fetch-model --tiny (or set COPILOT_TEST_MODEL)", p.display());
    p
}

/// One model for the whole test binary (tests run in parallel threads).
fn runtime() -> &'static Mutex<Runtime> {
    static RT: OnceLock<Mutex<Runtime>> = OnceLock::new();
    RT.get_or_init(|| Mutex::new(Runtime::load(&model_path(), &LoadOptions::default()).expect("load tiny model")))
}

const CONTEXT: &str = "CREATE TABLE singer (singer_id integer, name text, country text, age integer, PRIMARY KEY (singer_id));\n";

fn request(q: &str, max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest { schema_context: CONTEXT.into(), question: q.into(), max_new_tokens }
}

#[test]
fn loads_metadata_and_template_from_the_gguf() {
    let rt = runtime().lock().unwrap();
    let info = rt.info();
    assert_eq!(info.arch, "llama");
    assert!(info.context_length >= 2048, "context {}", info.context_length);
    assert!(rt.template().from_model, "SmolLM2 carries a chat template");
    assert_eq!(info.vocab_size, 49152);
}

#[test]
fn special_tokens_encode_as_single_tokens_and_text_round_trips() {
    let rt = runtime().lock().unwrap();
    let ids = rt.encode("<|im_start|>user\nhello<|im_end|>").unwrap();
    let start = rt.tokenizer().token_to_id("<|im_start|>").unwrap();
    let end = rt.tokenizer().token_to_id("<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&start));
    assert_eq!(ids.last(), Some(&end));
    let text = "SELECT count(*) FROM singer WHERE country = 'France' AND age > 30;";
    assert_eq!(rt.decode(&rt.encode(text).unwrap()).unwrap(), text);
    // SmolLM's pre-tokenizer splits digits one by one.
    assert_eq!(rt.encode("2024").unwrap().len(), 4);
}

#[test]
fn greedy_generation_is_deterministic_and_bounded() {
    let mut rt = runtime().lock().unwrap();
    let req = request("How many singers are there?", 48);
    let a = rt.generate(&req, &|| false).unwrap();
    let b = rt.generate(&req, &|| false).unwrap();
    assert_eq!(a.text, b.text);
    assert!(a.generated_tokens <= 48);
    assert!(a.prompt_tokens > 50, "prompt has {} tokens", a.prompt_tokens);
    if a.stop == StopReason::Length {
        assert_eq!(a.generated_tokens, 48);
    }
}

#[test]
fn max_new_tokens_is_respected() {
    let mut rt = runtime().lock().unwrap();
    let g = rt.generate(&request("List all singer names.", 2), &|| false).unwrap();
    assert!(g.generated_tokens <= 2, "{} tokens", g.generated_tokens);
}

#[test]
fn cancel_stops_generation() {
    let mut rt = runtime().lock().unwrap();
    let err = rt.generate(&request("List all singer names.", 32), &|| true).unwrap_err();
    assert!(matches!(err, CoreError::Cancelled), "{err}");
    // Cancel after a few polls: the model is still usable afterwards.
    let polls = std::cell::Cell::new(0);
    let err = rt
        .generate(&request("List all singer names.", 64), &|| {
            polls.set(polls.get() + 1);
            polls.get() > 3
        })
        .unwrap_err();
    assert!(matches!(err, CoreError::Cancelled));
    assert!(rt.generate(&request("List all singer names.", 4), &|| false).is_ok());
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let mut rt = runtime().lock().unwrap();
    let huge = "CREATE TABLE t (a integer);\n".repeat(2000);
    let req = GenerateRequest { schema_context: huge, question: "x".into(), max_new_tokens: 16 };
    match rt.generate(&req, &|| false) {
        Err(CoreError::PromptTooLong { tokens, limit }) => assert!(tokens > limit),
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

#[test]
fn chunked_prefill_matches_across_chunk_boundaries() {
    // A prompt longer than one prefill chunk must give the same result as the same prompt run again
    // (the KV cache is reset at position 0 and rebuilt chunk by chunk).
    let mut rt = runtime().lock().unwrap();
    let ctx = (0..40).map(|i| format!("CREATE TABLE t{i} (id integer, name text);\n")).collect::<String>();
    let req = GenerateRequest { schema_context: ctx, question: "How many rows are in t7?".into(), max_new_tokens: 24 };
    let a = rt.generate(&req, &|| false).unwrap();
    assert!(a.prompt_tokens > copilot_core::runtime::PREFILL_CHUNK);
    let b = rt.generate(&req, &|| false).unwrap();
    assert_eq!(a.text, b.text);
}

#[test]
fn a_file_that_is_not_gguf_is_a_clear_error() {
    let p = std::env::temp_dir().join(format!("copilot-notgguf-{}", std::process::id()));
    std::fs::write(&p, b"this is not a model").unwrap();
    let err = Runtime::load(&p, &LoadOptions::default()).err().expect("must fail");
    assert!(matches!(err, CoreError::Model(_)), "{err}");
    assert!(err.to_string().contains("not a readable GGUF"), "{err}");
    std::fs::remove_file(&p).unwrap();
}
