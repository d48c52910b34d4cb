//! Real inference with the tiny CI model (SmolLM2-135M-Instruct Q4_1, llama family, GPT-2 BPE in the GGUF).
//! `scripts/fetch-model --tiny` puts it where these tests look; COPILOT_TEST_MODEL overrides the path.
//! These tests fail, loudly, when the model is absent: a skipped inference test would prove nothing.

use copilot_core::engine::backend::{Backend, GenerateRequest, StopReason};
use copilot_core::engine::runtime::{LoadOptions, Runtime};
use copilot_core::error::CoreError;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

fn model_path() -> PathBuf {
    let p = std::env::var_os("COPILOT_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/copilot/models/smollm2-135m-instruct-q4_1.gguf"));
    assert!(
        p.is_file(),
        "test model {} is missing: run scripts/fetch-model --tiny (or set COPILOT_TEST_MODEL)",
        p.display()
    );
    p
}

/// One model for the whole test binary (tests run in parallel threads).
fn runtime() -> &'static Mutex<Runtime> {
    static RT: OnceLock<Mutex<Runtime>> = OnceLock::new();
    RT.get_or_init(|| Mutex::new(Runtime::load(&model_path(), &LoadOptions::default()).expect("load tiny model")))
}

const CONTEXT: &str =
    "CREATE TABLE singer (singer_id integer, name text, country text, age integer, PRIMARY KEY (singer_id));\n";

fn request(q: &str, max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest { schema_context: CONTEXT.into(), question: q.into(), max_new_tokens, ..Default::default() }
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
    let req = GenerateRequest { schema_context: huge, question: "x".into(), max_new_tokens: 16, ..Default::default() };
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
    let req = GenerateRequest {
        schema_context: ctx,
        question: "How many rows are in t7?".into(),
        max_new_tokens: 24,
        ..Default::default()
    };
    let a = rt.generate(&req, &|| false).unwrap();
    assert!(a.prompt_tokens > copilot_core::engine::runtime::PREFILL_CHUNK);
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

// ---- our forward pass (src/model.rs) and the schema-prefix cache ----

/// candle's own llama implementation, the reference our forward pass must agree with.
fn reference_logits(tokens: &[u32]) -> Vec<f32> {
    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor};
    let path = model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut m =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let x = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward(&x, 0).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn our_forward_pass_matches_candles_reference_model() {
    let rt = runtime().lock().unwrap();
    let tokens = rt.encode("<|im_start|>user\nHow many singers are from France?<|im_end|>\n").unwrap();
    // Up to 9 tokens the two implementations run the same kernels on the same shapes: bit-identical logits.
    for n in [1, 2, 5, 9] {
        assert_eq!(rt.logits(&tokens[..n]).unwrap(), reference_logits(&tokens[..n]), "{n} tokens");
    }
    // Longer, our grouped-query attention stacks n_rep * t query rows in one matmul where candle repeats K/V;
    // gemm then picks another blocking and sums in another order (~1e-6 apart, checked against the naive
    // definition in model.rs), and re-quantizing activations to 8 bits per layer amplifies such differences
    // into visible logit noise. Same prediction, logits within a few percent.
    let ours = rt.logits(&tokens).unwrap();
    let theirs = reference_logits(&tokens);
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff <= 0.05 * scale, "max |diff| {max_diff} (logit scale {scale})");
    let am = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(am(&ours), am(&theirs));
}

fn schema_request(schema: &str, q: &str) -> GenerateRequest {
    GenerateRequest { schema_context: schema.into(), question: q.into(), max_new_tokens: 24, ..Default::default() }
}

const QUESTIONS: [&str; 5] = [
    "How many singers are there?",
    "List the names of singers from France.",
    "What is the average age of all singers?",
    "2024: which singers are older than 40?",
    "  Show every country and how many singers it has ",
];

#[test]
fn the_prefix_cache_does_not_change_a_single_token() {
    let mut rt = runtime().lock().unwrap();
    rt.set_prefix_cache_bytes(0);
    let without: Vec<_> =
        QUESTIONS.iter().map(|q| rt.generate(&schema_request(CONTEXT, q), &|| false).unwrap()).collect();
    rt.set_prefix_cache_bytes(64 << 20);
    let before = rt.prefix_cache_stats();
    let with: Vec<_> = QUESTIONS.iter().map(|q| rt.generate(&schema_request(CONTEXT, q), &|| false).unwrap()).collect();
    let after = rt.prefix_cache_stats();
    rt.set_prefix_cache_bytes(0);
    for (a, b) in without.iter().zip(&with) {
        assert_eq!(a.text, b.text);
        assert_eq!((a.prompt_tokens, a.generated_tokens, a.stop), (b.prompt_tokens, b.generated_tokens, b.stop));
        assert!(
            a.prefix_tokens > 50 && a.prefix_tokens == b.prefix_tokens,
            "{} vs {}",
            a.prefix_tokens,
            b.prefix_tokens
        );
        assert!(!a.prefix_cache_hit);
    }
    // The first question computed the prefix; the others were served from the cache (one entry: one schema),
    // except where the question's first character merges differently with the prefix's last token.
    assert!(!with[0].prefix_cache_hit);
    assert!(with[1].prefix_cache_hit && with[2].prefix_cache_hit);
    assert!(after.hits - before.hits >= 3, "{before:?} -> {after:?}");
    assert!(after.entries >= 1);
}

#[test]
fn the_prefix_cache_respects_its_bound_and_separates_schemas() {
    let mut rt = runtime().lock().unwrap();
    let other = "CREATE TABLE concert (concert_id integer, concert_name text, year integer);\n";
    // Size one entry, then allow exactly one.
    rt.set_prefix_cache_bytes(64 << 20);
    rt.clear_prefix_cache();
    rt.generate(&schema_request(CONTEXT, "How many singers are there?"), &|| false).unwrap();
    let one = rt.prefix_cache_stats().bytes;
    assert!(one > 0);
    rt.set_prefix_cache_bytes(one + one / 2);
    let a = rt.generate(&schema_request(other, "How many concerts are there?"), &|| false).unwrap();
    assert!(!a.prefix_cache_hit, "a different schema must not hit another schema's entry");
    let s = rt.prefix_cache_stats();
    assert_eq!(s.entries, 1, "{s:?}");
    assert!(s.bytes <= s.limit_bytes, "{s:?}");
    assert!(s.evictions >= 1, "{s:?}");
    // The singer schema was evicted: a miss again, then a hit.
    let b = rt.generate(&schema_request(CONTEXT, "How many singers are there?"), &|| false).unwrap();
    let c = rt.generate(&schema_request(CONTEXT, "How many singers are there?"), &|| false).unwrap();
    assert!(!b.prefix_cache_hit && c.prefix_cache_hit);
    assert_eq!(b.text, c.text);
    rt.set_prefix_cache_bytes(0);
    assert_eq!(rt.prefix_cache_stats().entries, 0);
}

#[test]
fn a_cancelled_prefix_leaves_no_entry() {
    let mut rt = runtime().lock().unwrap();
    rt.set_prefix_cache_bytes(64 << 20);
    rt.clear_prefix_cache();
    let err = rt.generate(&schema_request(CONTEXT, "How many singers are there?"), &|| true).unwrap_err();
    assert!(matches!(err, CoreError::Cancelled));
    assert_eq!(rt.prefix_cache_stats().entries, 0);
    rt.set_prefix_cache_bytes(0);
}

#[test]
fn several_candidates_keep_the_greedy_answer_and_are_reproducible() {
    use copilot_core::engine::backend::Sampling;
    let mut rt = runtime().lock().unwrap();
    let one = request("List the names of singers from France.", 32);
    let mut four = one.clone();
    four.sampling = Sampling { candidates: 4, ..Sampling::default() };
    let g1 = rt.generate(&one, &|| false).unwrap();
    let g4 = rt.generate(&four, &|| false).unwrap();
    // The first candidate is the greedy answer, decoded in the same pass as the others.
    assert_eq!((g4.text.as_str(), g4.stop), (g1.text.as_str(), g1.stop));
    assert!(g1.samples.is_empty());
    assert_eq!(g4.samples.len(), 3);
    // Seeded from the prompt: the same request draws the same candidates; another question draws others.
    let again = rt.generate(&four, &|| false).unwrap();
    assert_eq!(again.samples, g4.samples);
    assert!(g4.samples.iter().any(|c| c.text != g4.text), "sampling at 0.7 should not always repeat the greedy answer");
    // Every candidate's tokens were decoded (end-of-turn tokens are chosen, not decoded).
    let all: usize = g4.generated_tokens + g4.samples.iter().map(|c| c.generated_tokens).sum::<usize>();
    assert!(g4.decoded_rows <= all && g4.decoded_rows + 4 >= all, "{} rows for {all} tokens", g4.decoded_rows);
    // Every answer says how sure the model was of its least likely token; the greedy answer alone says the same.
    for c in g4.candidates() {
        assert!(c.min_p.is_some_and(|p| p > 0.0 && p <= 1.0), "{:?}", c.min_p);
    }
    assert_eq!(g1.min_p, g4.min_p);
    // Asked for after the greedy answer: the same sampled candidates, without decoding the greedy one again.
    let mut rest = four.clone();
    rest.sampling.skip_greedy = true;
    let r = rt.generate(&rest, &|| false).unwrap();
    assert_eq!(r.candidates(), g4.samples);
    let greedy_rows = g4.generated_tokens - usize::from(g4.stop == StopReason::Eos);
    assert_eq!(r.decoded_rows, g4.decoded_rows - greedy_rows, "the greedy answer's tokens were not decoded");
    rest.sampling.candidates = 1;
    assert!(matches!(rt.generate(&rest, &|| false), Err(CoreError::Inference(_))));
}

#[test]
fn a_prompt_asked_again_soon_starts_from_its_state_and_changes_no_token() {
    use copilot_core::engine::backend::Sampling;
    let mut rt = runtime().lock().unwrap();
    let mut four = schema_request(CONTEXT, "List the names of singers from France.");
    four.sampling = Sampling { candidates: 4, ..Sampling::default() };
    let mut greedy = four.clone();
    greedy.sampling.candidates = 1;
    let mut rest = four.clone();
    rest.sampling.skip_greedy = true;
    // The reference: all four candidates in one request, nothing kept (the prefix cache off).
    rt.set_prefix_cache_bytes(0);
    let all = rt.generate(&four, &|| false).unwrap();
    assert_eq!(rt.recent_prompts(), 0, "without the prefix cache no prompt state is kept");
    // As copilot's pipeline asks when unsure: the greedy answer, then the sampled ones for the same prompt.
    rt.set_prefix_cache_bytes(64 << 20);
    rt.clear_prefix_cache();
    let g = rt.generate(&greedy, &|| false).unwrap();
    assert_eq!(rt.recent_prompts(), 1);
    let before = rt.prefix_cache_stats();
    let r = rt.generate(&rest, &|| false).unwrap();
    let after = rt.prefix_cache_stats();
    // Served from the kept state: the prefix cache was not even asked, and the answers are the same tokens.
    assert_eq!((after.hits, after.misses), (before.hits, before.misses), "{before:?} -> {after:?}");
    assert!(r.prefix_cache_hit);
    assert_eq!((g.text.as_str(), g.stop), (all.text.as_str(), all.stop));
    assert_eq!(r.candidates(), all.samples);
    // Served once, the state is dropped (a prompt is asked at most twice); asked a third time it is read again,
    // after the cached prefix, with the same answers.
    assert_eq!(rt.recent_prompts(), 0);
    let again = rt.generate(&rest, &|| false).unwrap();
    assert_eq!(rt.prefix_cache_stats().hits, after.hits + 1);
    assert_eq!(again.candidates(), all.samples);
    // Another question is read as before (and kept too); the kept prompts go with their schema's cache entry.
    let other = rt.generate(&schema_request(CONTEXT, "How many singers are there?"), &|| false).unwrap();
    assert_eq!(rt.recent_prompts(), 2);
    assert!(other.prefix_cache_hit);
    rt.clear_prefix_cache();
    assert_eq!(rt.recent_prompts(), 0);
    rt.set_prefix_cache_bytes(0);
}

#[test]
fn a_repair_turn_continues_the_conversation() {
    use copilot_core::engine::backend::Exchange;
    use copilot_core::sql::prompt::repair_message;
    let mut rt = runtime().lock().unwrap();
    let mut req = request(&repair_message("ERROR:  column \"singer_name\" does not exist"), 24);
    req.history =
        vec![Exchange { question: "List the singer names.".into(), answer: "SELECT singer_name FROM singer".into() }];
    let (tokens, prefix) = rt.prompt_tokens(&req).unwrap();
    let (single, single_prefix) = rt.prompt_tokens(&request("List the singer names.", 24)).unwrap();
    // The schema prefix (and so its cache entry) is the one a plain question has; the conversation follows it.
    assert_eq!(prefix, single_prefix);
    assert_eq!(tokens[..prefix], single[..prefix]);
    assert!(tokens.len() > single.len() + 10);
    assert!(rt.generate(&req, &|| false).is_ok());
}

/// Speculative decoding (drafts from the engine's history or by prompt lookup, verified in one multi-row pass)
/// changes the number of passes, never a token: every candidate, greedy and sampled, every stop reason, with drafts
/// that are mostly right and drafts that are mostly wrong (one-token matches, long drafts); with several candidates
/// drafts start once a row is left alone in its pass.
#[test]
fn speculative_decoding_changes_no_token() {
    use copilot_core::engine::backend::Sampling;
    use copilot_core::engine::draft::{DraftPolicy, DraftStats};
    let mut rt = runtime().lock().unwrap();
    // The prefix cache on, as served (the_prefix_cache_does_not_change_a_single_token checks it changes nothing):
    // each question's prompt is computed once instead of 16 times.
    rt.set_prefix_cache_bytes(64 << 20);
    rt.clear_prefix_cache();
    // The default drafts from the engine's history first (here mostly the plain run of the same request just
    // before, so its drafts are long and mostly kept); the others by lookup only.
    let policies = [
        DraftPolicy::default(),
        DraftPolicy { history: false, ..DraftPolicy::default() },
        DraftPolicy { tokens: 12, min_ngram: 1, adapt: false, history: false },
        DraftPolicy { tokens: 1, min_ngram: 1, adapt: false, history: false },
    ];
    rt.take_draft_history();
    let mut total = DraftStats::default();
    let mut passes_saved = false;
    // A question whose answer copies the prompt (drafts are kept) and one whose answer mostly does not.
    let questions = [
        "Repeat this query exactly: SELECT name, country, age FROM singer WHERE country = 'France' ORDER BY age DESC",
        QUESTIONS[1],
    ];
    for (qi, q) in questions.iter().enumerate() {
        for (candidates, max_new_tokens, prose) in [(1, 32, false), (3, 12, false), (1, 16, true), (2, 1, false)] {
            let mut req = schema_request(CONTEXT, q);
            req.max_new_tokens = max_new_tokens;
            req.prose = prose && qi == 0;
            req.sampling = Sampling { candidates, draft: DraftPolicy::OFF, ..Sampling::default() };
            let plain = rt.generate(&req, &|| false).unwrap();
            assert_eq!(plain.draft, DraftStats::default(), "no drafts when speculation is off");
            for p in policies {
                req.sampling.draft = p;
                let spec = rt.generate(&req, &|| false).unwrap();
                let what = format!("{q:?}, {candidates} candidates, {max_new_tokens} tokens, {p:?}");
                assert_eq!(spec.text, plain.text, "{what}");
                assert_eq!(spec.sql, plain.sql, "{what}");
                assert_eq!((spec.stop, spec.generated_tokens), (plain.stop, plain.generated_tokens), "{what}");
                assert_eq!(spec.samples, plain.samples, "{what}");
                assert_eq!(spec.decoded_rows, plain.decoded_rows, "{what}");
                assert!(spec.draft.accepted <= spec.draft.proposed, "{what}: {:?}", spec.draft);
                // One candidate: every kept draft token is a pass not run.
                passes_saved |= candidates == 1 && spec.draft.accepted > 0;
                total.add(spec.draft);
            }
        }
    }
    // Both paths were exercised: drafts kept and drafts thrown away.
    assert!(total.accepted > 0, "{total:?}");
    assert!(total.accepted < total.proposed, "{total:?}");
    assert!(passes_saved, "some answer should take fewer passes than tokens: {total:?}");
    assert!(!rt.take_draft_history().is_empty(), "every decoded token is learned");
    rt.set_prefix_cache_bytes(0);
}

/// Candidate rows that are twins (the same tokens so far and next) run once a pass and their twins take what it
/// computed: every candidate's text, stop and token count are those of rows each run on their own, with and without
/// drafts, alone and beside another job; and twins do occur (sampled candidates that agree with the greedy one).
#[test]
fn twin_candidates_computed_once_change_no_token() {
    use copilot_core::engine::backend::Sampling;
    use copilot_core::engine::draft::DraftPolicy;
    let mut rt = runtime().lock().unwrap();
    let mut shared = 0;
    for (qi, q) in QUESTIONS.iter().enumerate() {
        for (candidates, temperature, draft) in
            [(4, 0.2, DraftPolicy::OFF), (4, 0.7, DraftPolicy::default()), (3, 1.0, DraftPolicy::OFF)]
        {
            let mut req = schema_request(CONTEXT, q);
            req.max_new_tokens = 24;
            req.sampling = Sampling { candidates, temperature, draft, ..Sampling::default() };
            rt.set_share_twins(false);
            let each = rt.generate(&req, &|| false).unwrap();
            assert_eq!(each.twin_rows, 0, "no twins shared when switched off");
            rt.set_share_twins(true);
            let once = rt.generate(&req, &|| false).unwrap();
            let what = format!("question {qi}, {candidates} candidates at {temperature}, {draft:?}");
            assert_eq!((&once.text, once.stop, once.generated_tokens), (&each.text, each.stop, each.generated_tokens));
            assert_eq!(once.samples, each.samples, "{what}");
            assert_eq!(once.decoded_rows, each.decoded_rows, "{what}");
            assert!(once.twin_rows <= once.decoded_rows, "{what}");
            shared += once.twin_rows;
        }
    }
    rt.set_share_twins(false);
    assert!(shared > 0, "some sampled candidate agreed with another for a token");
}

#[test]
fn no_tokens_asked_none_decoded_with_or_without_drafts() {
    let mut rt = runtime().lock().unwrap();
    let g = rt.generate(&request("How many singers are there?", 0), &|| false).unwrap();
    assert_eq!((g.generated_tokens, g.stop, g.text.as_str()), (0, StopReason::Length, ""));
}

/// Several jobs decoded together — one pass over the weights per step for all their rows, a job joining between
/// two passes, others ending before the rest — give each job exactly what it gets alone: every candidate's text,
/// stop and token count, with and without drafts.
#[test]
fn jobs_decoded_together_give_each_what_it_gets_alone() {
    use copilot_core::engine::backend::Sampling;
    use copilot_core::engine::draft::DraftPolicy;
    use copilot_core::engine::runtime::Begun;
    let mut rt = runtime().lock().unwrap();
    rt.set_prefix_cache_bytes(64 << 20);
    rt.clear_prefix_cache();
    let other = "CREATE TABLE concert (concert_id integer PRIMARY KEY, name text, year integer);\n";
    let mut reqs = Vec::new();
    for (i, q) in QUESTIONS.iter().enumerate() {
        let mut r = schema_request(if i % 2 == 0 { CONTEXT } else { other }, q);
        r.max_new_tokens = [32, 8, 24, 1, 16][i];
        r.sampling = Sampling {
            candidates: [1, 3, 1, 2, 2][i],
            draft: if i % 2 == 0 { DraftPolicy::default() } else { DraftPolicy::OFF },
            ..Sampling::default()
        };
        reqs.push(r);
    }
    let alone: Vec<_> = reqs.iter().map(|r| rt.generate(r, &|| false).unwrap()).collect();
    // Together, with twin rows run once (each alone ran every row itself): the first four start at once, the last
    // joins after three passes.
    rt.set_share_twins(true);
    let begin = |rt: &mut copilot_core::engine::runtime::Runtime, r| match rt.begin(r, &|| false).unwrap() {
        Begun::Decoding(d) => d,
        Begun::Answered(_) => panic!("a generation request is decoded"),
    };
    let mut jobs: Vec<_> = reqs[..4].iter().map(|r| begin(&mut rt, r)).collect();
    let mut passes = 0;
    let mut most_rows = 0;
    while jobs.iter().any(|d| !d.is_done()) || jobs.len() < reqs.len() {
        if passes == 3 {
            jobs.push(begin(&mut rt, &reqs[4]));
        }
        most_rows = most_rows.max(jobs.iter().map(|d| d.rows_going()).sum::<usize>());
        let mut all: Vec<&mut _> = jobs.iter_mut().map(|d| &mut **d).collect();
        rt.advance(&mut all).unwrap();
        passes += 1;
    }
    assert!(most_rows >= 6, "several jobs' rows shared passes ({most_rows} at most)");
    // Jobs overlapped: fewer passes in all than the tokens the jobs decoded one after the other.
    let one_after_the_other: usize = alone.iter().map(|g| g.generated_tokens).sum();
    assert!(passes < one_after_the_other, "{passes} passes for {one_after_the_other} tokens one job at a time");
    for (i, (d, a)) in jobs.into_iter().zip(&alone).enumerate() {
        let g = rt.finish(*d).unwrap();
        let what = format!("job {i}: {:?}", QUESTIONS[i]);
        assert_eq!(
            (g.text.as_str(), g.stop, g.generated_tokens),
            (a.text.as_str(), a.stop, a.generated_tokens),
            "{what}"
        );
        assert_eq!(g.samples, a.samples, "{what}");
        assert_eq!(g.decoded_rows, a.decoded_rows, "{what}");
    }
    rt.set_share_twins(false);
    rt.set_prefix_cache_bytes(0);
}

/// The engine's job loop with a model: jobs sent together are decoded together, each answered as alone; a cancel
/// ends its job only.
#[test]
fn the_engine_serves_jobs_together_and_cancels_one() {
    use copilot_core::engine::serve::{serve, Command, Event, Job, Source};
    let alone: Vec<_> = {
        let mut rt = runtime().lock().unwrap();
        QUESTIONS[..3].iter().map(|q| rt.generate(&schema_request(CONTEXT, q), &|| false).unwrap()).collect()
    };
    let (ctx, crx) = std::sync::mpsc::channel();
    let (etx, erx) = std::sync::mpsc::channel();
    let spec = Source::Spec(model_path().display().to_string());
    let trace = std::env::temp_dir().join(format!("copilot-engine-trace-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let opts = LoadOptions { trace: Some(trace.clone()), ..LoadOptions::default() };
    let h = std::thread::spawn(move || serve(&spec, &opts, crx, etx));
    assert!(matches!(erx.recv().unwrap(), Event::Loaded(_)));
    let job = |id: u64, q: &str| Job { id, req: schema_request(CONTEXT, q), prefix_cache_bytes: 64 << 20 };
    for (i, q) in QUESTIONS[..3].iter().enumerate() {
        ctx.send(Command::Run(job(i as u64 + 1, q))).unwrap();
    }
    let mut long = job(9, "Write a long query over every column of singer, with many conditions.");
    long.req.max_new_tokens = 200;
    ctx.send(Command::Run(long)).unwrap();
    ctx.send(Command::Cancel(9)).unwrap();
    let mut done = std::collections::BTreeMap::new();
    while done.len() < 4 {
        if let Event::Finished { id, outcome, .. } = erx.recv().unwrap() {
            done.insert(id, outcome);
        }
    }
    for (i, a) in alone.iter().enumerate() {
        let d = done[&(i as u64 + 1)].as_ref().expect("answered");
        assert_eq!(d.answer.candidates[0].sql, a.sql, "job {}", i + 1);
        assert_eq!(d.generated_tokens, a.generated_tokens, "job {}", i + 1);
    }
    assert!(matches!(&done[&9], Err(f) if f.kind() == copilot_core::error::ErrorKind::Cancelled), "{:?}", done[&9]);
    ctx.send(Command::Shutdown).unwrap();
    drop(ctx);
    h.join().unwrap();
    // The trace: a line per prompt read (four jobs) and per pass, each with its end time and duration; the passes'
    // rows add up to at least the tokens the three answered jobs generated.
    let text = std::fs::read_to_string(&trace).unwrap();
    std::fs::remove_file(&trace).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    let begins: Vec<&Vec<&str>> = lines.iter().filter(|l| l[0] == "begin").collect();
    let passes: Vec<&Vec<&str>> = lines.iter().filter(|l| l[0] == "pass").collect();
    assert_eq!(begins.len() + passes.len(), lines.len(), "{text}");
    assert_eq!(begins.len(), 4, "{text}");
    // (The cancelled job may have been cancelled before its prompt was read: `failed`.)
    let how = ["whole", "after-prefix", "recent", "failed"];
    assert!(begins.iter().all(|l| l.len() == 6 && how.contains(&l[3])), "{text}");
    assert_eq!(begins[0][3], "whole", "the first prompt had nothing cached: {text}");
    assert!(passes.iter().all(|l| l.len() == 5 && l[4].parse::<usize>().unwrap() >= 1), "{text}");
    for l in &lines {
        assert!(l[1].parse::<f64>().unwrap() > 1.7e9 && l[2].parse::<f64>().unwrap() >= 0.0, "{l:?}");
    }
    let rows: usize = passes.iter().map(|l| l[3].parse::<usize>().unwrap()).sum();
    let generated: usize = alone.iter().map(|a| a.generated_tokens).sum();
    assert!(rows + 3 >= generated, "{rows} rows for {generated} tokens: {text}");
}
