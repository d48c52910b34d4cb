//! The real sentence encoder, all-MiniLM-L6-v2 (`scripts/fetch-model --minilm` puts it where these tests look;
//! COPILOT_EMBEDDER overrides the folder). These tests fail, loudly, when it is absent.

use copilot_core::engine::embed::{cosine, Embedder};

fn embedder() -> Embedder {
    let spec = std::env::var("COPILOT_EMBEDDER").unwrap_or_else(|_| "/var/lib/copilot/models/all-minilm-l6-v2".into());
    Embedder::load(&spec).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model --minilm (or set COPILOT_EMBEDDER)"))
}

#[test]
fn synonyms_are_closer_than_unrelated_words() {
    let mut e = embedder();
    let v = e.embed(&["automobiles", "cars", "singer", "musicians", "airports", "aerodromes"]).unwrap();
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]), "automobiles~cars vs automobiles~singer");
    assert!(cosine(&v[3], &v[2]) > cosine(&v[3], &v[4]), "musicians~singer vs musicians~airports");
    assert!(cosine(&v[5], &v[4]) > cosine(&v[5], &v[2]), "aerodromes~airports vs aerodromes~singer");
    for (i, a) in v.iter().enumerate() {
        assert!((cosine(a, a) - 1.0).abs() < 1e-4, "vector {i} is not unit length");
    }
}

/// The vectors sentence-transformers computes for this model (its README's example pair is close; unrelated
/// sentences are far): a forward pass that drifted would move these.
#[test]
fn sentences_compare_as_the_model_intends() {
    let mut e = embedder();
    let v = e
        .embed(&["How many singers do we have?", "What is the total number of singers?", "Show the flight numbers."])
        .unwrap();
    assert!(cosine(&v[0], &v[1]) > 0.7, "paraphrases: {}", cosine(&v[0], &v[1]));
    assert!(cosine(&v[0], &v[2]) < 0.4, "unrelated: {}", cosine(&v[0], &v[2]));
}

/// The engine with the encoder: a judged question close in meaning to a table skips the judge; one that is not
/// (or with a minimum no cosine reaches) gets the verdict. Needs the tiny CI model too (`scripts/fetch-model --tiny`).
#[test]
fn the_runtime_skips_the_judge_for_a_question_close_to_a_table() {
    use copilot_core::engine::backend::{Backend, GenerateRequest, LoadOptions};
    use copilot_core::engine::runtime::Runtime;
    use copilot_core::sql::schema::{Catalog, Column, Table};
    use copilot_core::sql::suggest::Grounding;
    let model = std::env::var("COPILOT_TEST_MODEL")
        .unwrap_or_else(|_| "/var/lib/copilot/models/smollm2-135m-instruct-q4_1.gguf".into());
    let embedder =
        std::env::var("COPILOT_EMBEDDER").unwrap_or_else(|_| "/var/lib/copilot/models/all-minilm-l6-v2".into());
    let opts = LoadOptions { embedder: Some(embedder), ..Default::default() };
    let mut rt =
        Runtime::load(std::path::Path::new(&model), &opts).expect("load the tiny model (scripts/fetch-model --tiny)");
    assert!(rt.embedder_status().contains("by meaning"), "{}", rt.embedder_status());
    assert!(rt.ranks_tables());
    let col = |n: &str| Column { name: n.into(), data_type: "text".into(), ..Default::default() };
    let table = |name: &str, cols: &[&str]| Table {
        schema: String::new(),
        name: name.into(),
        kind: Default::default(),
        columns: cols.iter().map(|c| col(c)).collect(),
        primary_key: vec![],
        foreign_keys: vec![],
        comment: None,
    };
    let catalog = Catalog {
        tables: vec![table("singer", &["singer_id", "name", "country", "age"]), table("stadium", &["capacity"])],
    };
    let ask = |rt: &mut Runtime, q: &str, min: f32| {
        let g = Grounding { min_similarity: min, ..Grounding::of(q, &catalog).unwrap() };
        let req = GenerateRequest {
            schema_context: "CREATE TABLE singer (singer_id int, name text, country text, age int);".into(),
            question: q.into(),
            max_new_tokens: 4,
            judge: true,
            grounding: Some(Box::new(g)),
            ..Default::default()
        };
        rt.generate(&req, &|| false).unwrap()
    };
    let g = ask(&mut rt, "How many musicians are there?", 0.3);
    let close = g.closeness.expect("closeness with an encoder");
    assert!(close >= 0.3, "musicians vs singer: {close}");
    assert_eq!(g.p_unanswerable, None, "close to a table: no verdict");
    let g = ask(&mut rt, "How many musicians are there?", 1.01);
    assert!(g.p_unanswerable.is_some(), "a minimum no cosine reaches: the judge is asked");
    let far = ask(&mut rt, "Which airline flies to the most airports?", 0.3);
    assert!(far.closeness.unwrap() < close, "an unrelated question is farther from every table");
    // A ranking request: every table's cosine, in the grounding's order, nothing generated.
    let rank = |rt: &mut Runtime, q: &str| {
        let req = GenerateRequest {
            question: q.into(),
            rank_tables: true,
            grounding: Some(Box::new(Grounding::of(q, &catalog).unwrap())),
            ..Default::default()
        };
        let g = rt.generate(&req, &|| false).unwrap();
        assert_eq!((g.generated_tokens, g.answer().candidates.len()), (0, 0), "a ranking generates nothing");
        g.table_closeness.expect("a ranking's scores")
    };
    let scores = rank(&mut rt, "How many musicians are there?");
    assert_eq!(scores.len(), 2);
    assert!(scores[0] > scores[1], "musicians: singer before stadium ({scores:?})");
    assert!((scores[0] - close).abs() < 1e-6, "the closest table's score is the question's closeness");
    let scores = rank(&mut rt, "Which arena holds the most people?");
    assert!(scores[1] > scores[0], "arena: stadium before singer ({scores:?})");
    // Without an encoder the judge is asked as before.
    let mut plain = Runtime::load(std::path::Path::new(&model), &LoadOptions::default()).unwrap();
    assert!(plain.embedder_status().contains("spelling only"));
    assert!(!plain.ranks_tables());
    let g = ask(&mut plain, "How many musicians are there?", 0.3);
    assert_eq!(g.closeness, None);
    assert!(g.p_unanswerable.is_some());
    assert_eq!(rank(&mut plain, "How many musicians are there?"), Vec::<f32>::new(), "no encoder: no scores");
    // Under a memory limit the model fits but the model and the encoder do not: the encoder is left out.
    let model_bytes = std::fs::metadata(&model).unwrap().len();
    let tight = LoadOptions {
        embedder: opts.embedder.clone(),
        memory_limit_bytes: copilot_core::engine::runtime::memory_needed(model_bytes) + (1 << 20),
        ..Default::default()
    };
    let rt = Runtime::load(std::path::Path::new(&model), &tight).unwrap();
    assert!(rt.embedder_status().contains("left out"), "{}", rt.embedder_status());
    assert!(!rt.ranks_tables(), "an encoder left out ranks nothing");
    // An encoder that cannot load leaves the engine working, and says why.
    let bad = LoadOptions { embedder: Some("/nonexistent/encoder".into()), ..Default::default() };
    let rt = Runtime::load(std::path::Path::new(&model), &bad).unwrap();
    assert!(rt.embedder_status().contains("could not be loaded"), "{}", rt.embedder_status());
    assert!(!rt.ranks_tables());
}
