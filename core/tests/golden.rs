//! Golden files for the schema context and the prompts, one per chat template family.
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test -p copilot-core --test golden`, then
//! review the diff: these bytes are what the model sees.

use copilot_core::sql::prompt::{build_prompt, ChatTemplate};
use copilot_core::sql::schema::{without_value_hints, Catalog, RenderOptions};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn check(name: &str, actual: &str) {
    let path = dir().join("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

fn catalog() -> Catalog {
    serde_json::from_str(&std::fs::read_to_string(dir().join("fixtures/concert_singer.json")).unwrap()).unwrap()
}

fn template(file: &str, bos: &str, eos: &str) -> ChatTemplate {
    ChatTemplate::new(Some(std::fs::read_to_string(dir().join("fixtures").join(file)).unwrap()), bos, eos)
}

const QUESTION: &str = "How many singers are from France?";

#[test]
fn schema_context() {
    check("concert_singer.context.sql", &catalog().render(&RenderOptions::default()));
}

/// Value hints as the extension gathers them: most common values (an open list, "e.g."), a CHECK list or enum
/// labels (a closed list, "one of"), a value that needs quoting; removing them gives the plain context back.
#[test]
fn schema_context_with_value_hints() {
    let mut c = catalog();
    let mut set = |table: &str, column: &str, values: &[&str], complete: bool| {
        let t = c.tables.iter_mut().find(|t| t.name == table).unwrap();
        let col = t.columns.iter_mut().find(|col| col.name == column).unwrap();
        col.values = values.iter().map(|v| v.to_string()).collect();
        col.values_complete = complete;
    };
    set("singer", "country", &["Netherlands", "United States", "France"], false);
    set("concert", "theme", &["Free choice", "Bleeding Love", "Happy Tonight"], false);
    set("stadium", "location", &["Raith Rovers", "Ayr United", "Queen's Park"], false);
    set("concert", "year", &["2014", "2015"], true);
    let plain = catalog().render(&RenderOptions::default());
    let hinted = c.render(&RenderOptions::default());
    check("concert_singer.values.context.sql", &hinted);
    assert_ne!(hinted, plain);
    assert_eq!(without_value_hints(&hinted), plain);
}

#[test]
fn schema_context_without_comments_and_all_qualified() {
    let opts = RenderOptions { unqualified_schemas: vec![], comments: false, ..RenderOptions::default() };
    check("concert_singer.qualified.sql", &catalog().render(&opts));
}

#[test]
fn prompt_qwen25_coder() {
    let ctx = catalog().render(&RenderOptions::default());
    let p = build_prompt(&template("qwen2.5-coder.jinja", "<|endoftext|>", "<|im_end|>"), &ctx, QUESTION).unwrap();
    check("prompt.qwen2.5-coder.txt", &p.text());
    assert!(p.suffix.starts_with(QUESTION));
}

#[test]
fn prompt_mistral_instruct_v01_folds_system_into_user() {
    let ctx = catalog().render(&RenderOptions::default());
    let p = build_prompt(&template("mistral-7b-instruct-v0.1.jinja", "<s>", "</s>"), &ctx, QUESTION).unwrap();
    check("prompt.mistral-7b-instruct-v0.1.txt", &p.text());
    assert!(p.prefix.starts_with("<s>[INST] You are an expert PostgreSQL analyst."));
}

#[test]
fn prompt_smollm2() {
    let ctx = catalog().render(&RenderOptions::default());
    let p = build_prompt(&template("smollm2.jinja", "<|im_start|>", "<|im_end|>"), &ctx, QUESTION).unwrap();
    check("prompt.smollm2.txt", &p.text());
}

#[test]
fn prompt_chatml_fallback() {
    let ctx = catalog().render(&RenderOptions::default());
    let p = build_prompt(&ChatTemplate::chatml(), &ctx, QUESTION).unwrap();
    check("prompt.chatml.txt", &p.text());
}

/// The plain-language explanations of real Spider dev queries: one `.txt` per `.sql` in `golden/explain/`.
#[test]
fn explain_golden() {
    use copilot_core::sql::explain::explain;
    let mut queries: Vec<PathBuf> = std::fs::read_dir(dir().join("golden/explain"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    queries.sort();
    assert!(queries.len() >= 20, "{} golden queries", queries.len());
    for path in queries {
        let sql = std::fs::read_to_string(&path).unwrap();
        let text = explain(sql.trim()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let txt = path.with_extension("txt");
        check(&format!("explain/{}", txt.file_name().unwrap().to_string_lossy()), &format!("{text}\n"));
    }
}

/// What `copilot.ask(question, follow_up => id)` shows the model when the caller has verified examples: the
/// schema prefix (cached) unchanged, then each example as an earlier question and answer (most similar last), then
/// the conversation being followed up (oldest first), then the new question — a three-turn conversation.
#[test]
fn prompt_with_examples_and_follow_ups() {
    use copilot_core::engine::backend::Exchange;
    use copilot_core::sql::prompt::build_conversation;
    let ctx = catalog().render(&RenderOptions::default());
    let t = template("qwen2.5-coder.jinja", "<|endoftext|>", "<|im_end|>");
    let turns = vec![
        Exchange {
            question: "Which singers come from Germany?".into(),
            answer: "SELECT name FROM singer WHERE country = 'Germany'".into(),
        },
        Exchange { question: QUESTION.into(), answer: "SELECT count(*) FROM singer WHERE country = 'France'".into() },
        Exchange {
            question: "and how old are they on average?".into(),
            answer: "SELECT avg(age) FROM singer WHERE country = 'France'".into(),
        },
    ];
    let p = build_conversation(&t, &ctx, &turns, "only those older than 30").unwrap();
    let single = build_prompt(&t, &ctx, QUESTION).unwrap();
    assert_eq!(p.prefix, single.prefix, "examples and earlier turns come after the cached schema prefix");
    check("conversation.qwen2.5-coder.txt", &p.text());
}
