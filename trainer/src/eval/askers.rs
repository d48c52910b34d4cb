//! Who answers the questions: the extension (`SELECT copilot.ask`), core's runtime in-process, or the gold SQL.

use super::exec::pg_error;
use super::{Asked, EvalArgs, Via};
use crate::spider::Example;
use crate::sqlnorm;
use anyhow::{anyhow, Context, Result};
use copilot_core::engine::backend::{Backend, GenerateRequest};
use copilot_core::sql::schema::quote_ident;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::warn;

pub(super) fn read_asked(path: &Path) -> Result<HashMap<usize, Asked>> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(out) };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Asked>(line) {
            Ok(a) => {
                out.insert(a.index, a);
            }
            // A line cut short by an interrupted run: ignore it, the question is asked again.
            Err(e) => warn!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

pub(super) trait Asker {
    fn label(&self) -> String;
    fn sha256(&mut self) -> Option<String>;
    fn ask(&mut self, ex: &Example, context: &str) -> Asked;
    fn context(&mut self, _db: &str) -> Option<String> {
        None
    }
}

struct ExtensionAsker {
    client: postgres::Client,
    current_db: String,
    /// `--schemas`: every schema is visible at once; the database is never chosen per question.
    all_schemas: bool,
}

/// The relations a rendered context shows (`CREATE TABLE name (…` / `CREATE VIEW name (…`), as lowercase
/// `schema.table` — unqualified names get `default_schema`.
pub(super) fn context_tables(context: &str, default_schema: &str) -> Vec<String> {
    let mut out: Vec<String> = context
        .lines()
        .filter_map(|l| l.strip_prefix("CREATE TABLE ").or_else(|| l.strip_prefix("CREATE VIEW ")))
        .filter_map(|rest| rest.split_once(" (").map(|(name, _)| name))
        .map(|name| {
            let name = name.replace('"', "").to_lowercase();
            if name.contains('.') {
                name
            } else {
                format!("{}.{name}", default_schema.to_lowercase())
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The columns a context shows, as `schema.table.column` (lowercase; unqualified tables in `default_schema`): the
/// column definitions of its `CREATE TABLE` / `CREATE VIEW` lines, comments (value hints) and constraints left out.
pub(super) fn context_columns(context: &str, default_schema: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in context.lines() {
        let Some(rest) = line.strip_prefix("CREATE TABLE ").or_else(|| line.strip_prefix("CREATE VIEW ")) else {
            continue;
        };
        let Some((name, body)) = rest.split_once(" (") else { continue };
        let table = name.replace('"', "").to_lowercase();
        let table = if table.contains('.') { table } else { format!("{}.{table}", default_schema.to_lowercase()) };
        // Comments out, then the definitions split at the commas outside parentheses and quotes.
        let mut text = String::new();
        let mut rest = body;
        while let Some(i) = rest.find("/*") {
            text.push_str(&rest[..i]);
            rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
        }
        text.push_str(rest);
        let (mut depth, mut quoted, mut item) = (0i32, false, String::new());
        let mut items = Vec::new();
        for ch in text.chars() {
            match ch {
                '"' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    items.push(std::mem::take(&mut item));
                    continue;
                }
                _ => {}
            }
            if depth >= 0 {
                item.push(ch);
            }
        }
        items.push(item);
        for it in items {
            let it = it.trim();
            let upper = it.to_uppercase();
            if ["PRIMARY KEY", "FOREIGN KEY", "UNIQUE", "CHECK", "CONSTRAINT"].iter().any(|k| upper.starts_with(k)) {
                continue;
            }
            let col = match it.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or_default().to_string(),
                None => it.split_whitespace().next().unwrap_or_default().to_string(),
            };
            if !col.is_empty() {
                out.insert(format!("{table}.{}", col.to_lowercase()));
            }
        }
    }
    out
}

impl Asker for ExtensionAsker {
    fn label(&self) -> String {
        "copilot.model".into()
    }
    fn sha256(&mut self) -> Option<String> {
        self.client
            .query_one("SELECT model_sha256 FROM copilot.status()", &[])
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
    }
    fn context(&mut self, db: &str) -> Option<String> {
        if self.all_schemas {
            return None;
        }
        self.use_db(db).ok()?;
        // Value hints come from the database's statistics, which training contexts do not carry: compare the rest.
        let ctx: String = self.client.query_one("SELECT copilot.context()", &[]).ok()?.get(0);
        Some(copilot_core::sql::schema::without_value_hints(&ctx))
    }
    fn ask(&mut self, ex: &Example, _context: &str) -> Asked {
        let mut a = Asked {
            index: ex.index,
            prediction: None,
            ask_error: None,
            latency_s: 0.0,
            prompt_tokens: None,
            generated_tokens: None,
            decode_tok_s: None,
            pipeline: None,
            context_tables: None,
        };
        if self.all_schemas {
            // The tables the model is shown for this question (the same selection ask makes), outside the timed
            // ask; read with qualified names (the same tables), so each says its schema.
            let shown = self.client.transaction().and_then(|mut tx| {
                tx.batch_execute("SET LOCAL copilot.bare_table_names = off")?;
                let row = tx.query_one("SELECT copilot.context($1)", &[&ex.question])?;
                tx.commit()?;
                Ok(row)
            });
            match shown {
                Ok(r) => a.context_tables = Some(context_tables(&r.get::<_, String>(0), "public")),
                Err(e) => {
                    a.ask_error = Some(pg_error(&e));
                    return a;
                }
            }
        } else if let Err(e) = self.use_db(&ex.db_id) {
            a.ask_error = Some(e);
            return a;
        }
        let t0 = Instant::now();
        match self.client.query_one("SELECT copilot.ask_verbose($1)::text", &[&ex.question]) {
            Ok(r) => {
                let v: serde_json::Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap_or_default();
                a.prediction = v["sql"].as_str().map(str::to_string);
                let n = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
                let cands = v["candidates"].as_array().cloned().unwrap_or_default();
                let first: Vec<&serde_json::Value> =
                    cands.iter().filter(|c| !c["source"].as_str().unwrap_or("").starts_with("repair")).collect();
                let p = super::Pipeline {
                    candidates: first.len(),
                    planned: first.iter().filter(|c| c["error"].is_null()).count(),
                    repairs: n("repairs"),
                    decision: v["decision"].as_str().unwrap_or("").to_string(),
                    margin: n("margin"),
                    refused: !v["refused"].is_null(),
                    greedy_alone: v["greedy_alone"].as_bool().unwrap_or(false),
                    winner_source: v["winner"]
                        .as_u64()
                        .and_then(|w| cands.get(w as usize)?["source"].as_str().map(str::to_string)),
                    rejected: rejected(&cands),
                };
                if a.prediction.is_none() {
                    a.ask_error = Some(match (&v["refused"], &v["model_output"]) {
                        (serde_json::Value::String(why), _) => format!("refused: {why}"),
                        (_, serde_json::Value::String(out)) => {
                            format!("the model's answer contains no SQL query: {out}")
                        }
                        _ => format!("no answer: {v}"),
                    });
                }
                a.pipeline = Some(p);
            }
            Err(e) => a.ask_error = Some(pg_error(&e)),
        }
        a.latency_s = t0.elapsed().as_secs_f64();
        // This session's own request (copilot.status() shows the server's last answer, whoever asked it).
        if let Ok(Some(r)) = self
            .client
            .query_opt("SELECT prompt_tokens::int8, generated_tokens::int8, decode_tok_s FROM copilot.last_ask()", &[])
        {
            a.prompt_tokens = r.get(0);
            a.generated_tokens = r.get(1);
            a.decode_tok_s = r.get(2);
        }
        a
    }
}

/// The candidates of an `ask_verbose` report that did not plan (`error` set): their SQL (the model's text when
/// it held none) and the error.
fn rejected(cands: &[serde_json::Value]) -> Vec<super::Rejected> {
    let s = |c: &serde_json::Value, k: &str| c[k].as_str().map(str::to_string);
    cands
        .iter()
        .filter_map(|c| {
            Some(super::Rejected {
                source: s(c, "source").unwrap_or_default(),
                sql: s(c, "sql").or_else(|| s(c, "text")).unwrap_or_default(),
                error: s(c, "error")?,
            })
        })
        .collect()
}

impl ExtensionAsker {
    fn use_db(&mut self, db: &str) -> Result<(), String> {
        if self.current_db != db {
            self.client
                .batch_execute(&format!("SET search_path = {}", quote_ident(&db.to_lowercase())))
                .map_err(|e| pg_error(&e))?;
            self.current_db = db.to_string();
        }
        Ok(())
    }
}

struct CoreAsker {
    rt: copilot_core::engine::runtime::Runtime,
    path: PathBuf,
    max_new_tokens: usize,
}

impl Asker for CoreAsker {
    fn label(&self) -> String {
        self.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
    fn sha256(&mut self) -> Option<String> {
        copilot_core::engine::source::sha256_file(&self.path).ok()
    }
    fn ask(&mut self, ex: &Example, context: &str) -> Asked {
        let req = GenerateRequest {
            schema_context: context.to_string(),
            question: ex.question.clone(),
            max_new_tokens: self.max_new_tokens,
            ..Default::default()
        };
        let t0 = Instant::now();
        let out = self.rt.generate(&req, &|| false);
        let latency_s = t0.elapsed().as_secs_f64();
        match out {
            Ok(g) => Asked {
                index: ex.index,
                ask_error: g.sql.is_none().then(|| format!("the model's answer contains no SQL query: {}", g.text)),
                prediction: g.sql.clone(),
                latency_s,
                prompt_tokens: Some(g.prompt_tokens as i64),
                generated_tokens: Some(g.generated_tokens as i64),
                decode_tok_s: Some(g.decode_tok_s()),
                pipeline: None,
                context_tables: None,
            },
            Err(e) => Asked {
                index: ex.index,
                prediction: None,
                ask_error: Some(e.to_string()),
                latency_s,
                prompt_tokens: None,
                generated_tokens: None,
                decode_tok_s: None,
                pipeline: None,
                context_tables: None,
            },
        }
    }
}

struct GoldAsker;

impl Asker for GoldAsker {
    fn label(&self) -> String {
        "gold".into()
    }
    fn sha256(&mut self) -> Option<String> {
        None
    }
    fn ask(&mut self, ex: &Example, context: &str) -> Asked {
        let known = sqlnorm::catalog_from_context(context).map(|c| sqlnorm::known_names(&c));
        let prediction = sqlnorm::normalize(&ex.query, known.as_ref());
        Asked {
            index: ex.index,
            ask_error: prediction.is_none().then(|| "gold does not parse".to_string()),
            prediction,
            latency_s: 0.0,
            prompt_tokens: None,
            generated_tokens: None,
            decode_tok_s: None,
            pipeline: None,
            context_tables: None,
        }
    }
}

/// The asker `--via` names.
pub(super) fn make_asker(args: &EvalArgs) -> Result<Box<dyn Asker>> {
    Ok(match args.via {
        Via::Extension => {
            let client = postgres::Client::connect(&args.pg, postgres::NoTls)
                .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
            let mut asker = ExtensionAsker { client, current_db: String::new(), all_schemas: args.schemas.is_some() };
            if let Some(list) = &args.schemas {
                asker
                    .client
                    .execute("SELECT set_config('copilot.schemas', $1, false)", &[&list.as_str()])
                    .with_context(|| format!("--schemas {list}"))?;
                asker.client.batch_execute("SET search_path = public").context("--schemas: SET search_path")?;
            }
            for s in &args.settings {
                let (name, value) = s.split_once('=').ok_or_else(|| anyhow!("--set {s}: expected NAME=VALUE"))?;
                asker
                    .client
                    .execute("SELECT set_config($1, $2, false)", &[&name.trim(), &value.trim()])
                    .with_context(|| format!("--set {s}"))?;
            }
            Box::new(asker)
        }
        Via::Core => {
            let path = args.model.clone().ok_or_else(|| anyhow!("--via core needs --model FILE"))?;
            let path = copilot_core::engine::source::resolve(&path.to_string_lossy(), true)?;
            // The same prefix cache as the extension's default (256 MB): answers do not depend on it, speed does.
            let opts = copilot_core::engine::runtime::LoadOptions {
                max_context: 8192,
                prefix_cache_bytes: 256 << 20,
                ..Default::default()
            };
            let rt = copilot_core::engine::runtime::Runtime::load(&path, &opts)?;
            Box::new(CoreAsker { rt, path, max_new_tokens: args.max_new_tokens })
        }
        Via::Gold => Box::new(GoldAsker),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn context_tables_reads_the_create_lines_qualified() {
        let ctx = "-- singer: people who sing\nCREATE TABLE singer (singer_id integer, PRIMARY KEY (singer_id));\n\
                   CREATE TABLE concert_singer.\"Stadium\" (stadium_id integer);\n\
                   CREATE VIEW w.v (a text /* e.g. 'CREATE TABLE x (' */);\n";
        assert_eq!(super::context_tables(ctx, "public"), ["concert_singer.stadium", "public.singer", "w.v"]);
    }

    #[test]
    fn context_columns_reads_the_column_definitions_without_comments_or_constraints() {
        let ctx = "-- singer: people who sing\n\
                   CREATE TABLE singer (singer_id integer, \"Song Name\" text /* e.g. 'a, b', 'c (d' */, age numeric(4, 1), \
                   PRIMARY KEY (singer_id), FOREIGN KEY (age) REFERENCES x(y));\n\
                   CREATE VIEW w.v (a text);\n";
        let cols: Vec<String> = super::context_columns(ctx, "public").into_iter().collect();
        assert_eq!(cols, ["public.singer.age", "public.singer.singer_id", "public.singer.song name", "w.v.a"]);
    }

    #[test]
    fn rejected_keeps_the_candidates_that_did_not_plan_with_their_sql_or_text() {
        let cands: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"source": "greedy", "text": "SELECT a FROM t", "sql": "SELECT a FROM t", "error": null},
                {"source": "sample 2", "text": "SELECT b FROM t", "sql": "SELECT b FROM t",
                 "error": "42703: column \"b\" does not exist"},
                {"source": "sample 3", "text": "I cannot tell", "sql": null, "error": "no SQL in the answer"}]"#,
        )
        .unwrap();
        let r = super::rejected(&cands);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].source.as_str(), r[0].sql.as_str()), ("sample 2", "SELECT b FROM t"));
        assert_eq!(r[0].error, "42703: column \"b\" does not exist");
        assert_eq!((r[1].sql.as_str(), r[1].error.as_str()), ("I cannot tell", "no SQL in the answer"));
        // Absent from a report when every candidate planned (older reports read back the same).
        let p = super::super::Pipeline::default();
        assert!(!serde_json::to_string(&p).unwrap().contains("rejected"));
        let back: super::super::Pipeline = serde_json::from_str(
            r#"{"candidates":1,"planned":1,"repairs":0,
            "decision":"only candidate","margin":0,"refused":false}"#,
        )
        .unwrap();
        assert!(back.rejected.is_empty());
    }
}
