//! The Spider files (`../shared/data/spider`): questions, schemas, SQLite databases, and the schema context a
//! database gets once `data load-pg` has copied it into PostgreSQL.
//!
//! The context is rendered by core from the same table plan `load-pg` executes (lowercased names, inferred
//! PostgreSQL types, the primary and foreign keys PostgreSQL accepts), in schema `<db_id>` shown unqualified — so
//! it is, byte for byte, what `copilot.context()` returns with `search_path = <db_id>` (the eval through the
//! extension checks this for every database it visits).

use crate::data::load_pg::{self, TablePlan};
use crate::eval::spider_match::SpiderTables;
use anyhow::{Context, Result};
use copilot_core::sql::schema::{Catalog, Column, ForeignKey, RelationKind, RenderOptions, Table};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Example {
    /// Position in the source file.
    pub index: usize,
    pub db_id: String,
    pub question: String,
    pub query: String,
}

#[derive(Deserialize)]
struct DevRow {
    db_id: String,
    question: String,
    query: String,
}

#[derive(Deserialize)]
struct TrainRow {
    db_id: String,
    #[serde(rename = "SpiderQuestion")]
    question: String,
    query: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    serde_json::from_reader(std::io::BufReader::new(f)).with_context(|| format!("cannot parse {}", path.display()))
}

/// Spider dev (`dev.json`, 1034 questions).
pub fn load_dev(root: &Path) -> Result<Vec<Example>> {
    let rows: Vec<DevRow> = read_json(&root.join("dev.json"))?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(index, r)| Example { index, db_id: r.db_id, question: r.question, query: r.query })
        .collect())
}

#[derive(Deserialize)]
struct SynRow {
    db_id: String,
    #[serde(rename = "SpiderQuestion")]
    question: String,
    #[serde(rename = "SpiderSynQuestion")]
    syn_question: String,
    query: String,
}

/// Spider-Syn's dev questions (`spider-syn/dev.json`): Spider dev with schema words replaced by synonyms, in the
/// same order as `dev.json`, so indexes and databases line up (checked: every row's `db_id`). Spider-Syn was made
/// from an earlier release of Spider dev: 52 of its 1034 original questions (`SpiderQuestion`) and 32 gold queries
/// differ from today's `dev.json` (Spider's later corrections, e.g. row 16's "average and maximum capacity"), so the
/// paraphrase is scored against Spider-Syn's own gold query, the one written for the question it paraphrases.
pub fn load_dev_syn(root: &Path) -> Result<Vec<Example>> {
    let rows: Vec<SynRow> = read_json(&root.join("spider-syn/dev.json"))?;
    let dev = load_dev(root)?;
    syn_rows_on_dev(rows, &dev)
}

fn syn_rows_on_dev(rows: Vec<SynRow>, dev: &[Example]) -> Result<Vec<Example>> {
    anyhow::ensure!(rows.len() == dev.len(), "spider-syn/dev.json has {} rows, dev.json {}", rows.len(), dev.len());
    rows.into_iter()
        .zip(dev)
        .enumerate()
        .map(|(index, (r, d))| {
            anyhow::ensure!(
                r.db_id == d.db_id,
                "spider-syn/dev.json row {index} is about {}, dev.json's about {} ({} / {})",
                r.db_id,
                d.db_id,
                r.question,
                d.question
            );
            Ok(Example { index, db_id: r.db_id, question: r.syn_question, query: r.query })
        })
        .collect()
}

/// Spider train (`spider-syn/train_spider.json`, 7000 questions, field `SpiderQuestion`).
pub fn load_train(root: &Path) -> Result<Vec<Example>> {
    let rows: Vec<TrainRow> = read_json(&root.join("spider-syn/train_spider.json"))?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(index, r)| Example { index, db_id: r.db_id, question: r.question, query: r.query })
        .collect())
}

/// Spider-Syn's train paraphrases (`spider-syn/train_spider.json`, field `SpiderSynQuestion`), indexed as
/// [`load_train`]'s rows: the same questions with schema words replaced by synonyms.
pub fn load_train_syn(root: &Path) -> Result<Vec<Example>> {
    let rows: Vec<SynRow> = read_json(&root.join("spider-syn/train_spider.json"))?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(index, r)| Example { index, db_id: r.db_id, question: r.syn_question, query: r.query })
        .collect())
}

pub fn load_tables(root: &Path) -> Result<HashMap<String, SpiderTables>> {
    let all: Vec<SpiderTables> = read_json(&root.join("tables.json"))?;
    Ok(all.into_iter().map(|t| (t.db_id.clone(), t)).collect())
}

pub fn sqlite_path(root: &Path, db_id: &str) -> PathBuf {
    root.join("database").join(db_id).join(format!("{db_id}.sqlite"))
}

/// The PostgreSQL type family used to decide whether PostgreSQL accepts a foreign key between two columns.
fn family(pg_type: &str) -> &str {
    match pg_type {
        "integer" | "bigint" | "smallint" => "int",
        other => other,
    }
}

fn pk_holds(db: &rusqlite::Connection, p: &TablePlan) -> Result<bool> {
    if p.primary_key.is_empty() {
        return Ok(false);
    }
    let col = |name: &str| -> String {
        let c = p.columns.iter().find(|c| c.name == name).map(|c| c.sqlite_name.as_str()).unwrap_or(name);
        format!("\"{}\"", c.replace('"', "\"\""))
    };
    let cols: Vec<String> = p.primary_key.iter().map(|k| col(k)).collect();
    if p.primary_key.iter().any(|k| !p.columns.iter().any(|c| &c.name == k)) {
        return Ok(false);
    }
    let table = format!("\"{}\"", p.sqlite_name.replace('"', "\"\""));
    let nulls: i64 = db.query_row(
        &format!(
            "SELECT count(*) FROM {table} WHERE {}",
            cols.iter().map(|c| format!("{c} IS NULL")).collect::<Vec<_>>().join(" OR ")
        ),
        [],
        |r| r.get(0),
    )?;
    // Distinct as PostgreSQL sees the loaded values: integers stored as text compare as integers there.
    let distinct: i64 =
        db.query_row(&format!("SELECT count(*) FROM (SELECT DISTINCT {} FROM {table})", cols.join(", ")), [], |r| {
            r.get(0)
        })?;
    Ok(nulls == 0 && distinct as u64 == p.rows)
}

/// The catalog `data load-pg` creates for this SQLite database in schema `schema`.
pub fn catalog(sqlite: &Path, schema: &str) -> Result<Catalog> {
    let db = rusqlite::Connection::open_with_flags(sqlite, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", sqlite.display()))?;
    let plans = load_pg::plan(&db)?;
    let mut pk_ok: HashMap<String, bool> = HashMap::new();
    for p in &plans {
        pk_ok.insert(p.name.clone(), pk_holds(&db, p)?);
    }
    let mut tables = Vec::new();
    for p in &plans {
        let pk = if pk_ok[&p.name] { p.primary_key.clone() } else { Vec::new() };
        let mut fks = Vec::new();
        for fk in &p.foreign_keys {
            let Some(target) = plans.iter().find(|t| t.name == fk.ref_table) else { continue };
            if fk.ref_columns.len() != fk.columns.len() || !pk_ok[&target.name] {
                continue;
            }
            // PostgreSQL needs a unique constraint on exactly the referenced columns (here: the primary key) …
            let mut a = fk.ref_columns.clone();
            let mut b = target.primary_key.clone();
            a.sort();
            b.sort();
            if a != b {
                continue;
            }
            // … and comparable types on both sides.
            let ty =
                |t: &TablePlan, c: &str| t.columns.iter().find(|x| x.name == c).map(|x| family(x.pg_type).to_string());
            let types_ok =
                fk.columns.iter().zip(&fk.ref_columns).all(|(c, r)| ty(p, c).is_some() && ty(p, c) == ty(target, r));
            if !types_ok {
                continue;
            }
            fks.push(ForeignKey {
                columns: fk.columns.clone(),
                ref_schema: schema.to_string(),
                ref_table: fk.ref_table.clone(),
                ref_columns: fk.ref_columns.clone(),
            });
        }
        tables.push(Table {
            schema: schema.to_string(),
            name: p.name.clone(),
            kind: RelationKind::Table,
            columns: p
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    data_type: c.pg_type.to_string(),
                    not_null: pk.contains(&c.name),
                    comment: None,
                    ..Default::default()
                })
                .collect(),
            primary_key: pk,
            foreign_keys: fks,
            comment: None,
        });
    }
    let mut c = Catalog { tables };
    c.normalize();
    Ok(c)
}

/// The schema context for a database loaded in schema `db_id` and read with `search_path = db_id`.
pub fn render_context(catalog: &Catalog, db_id: &str) -> String {
    catalog.render(&RenderOptions {
        unqualified_schemas: vec![db_id.to_lowercase()],
        comments: true,
        ..RenderOptions::default()
    })
}

/// Catalogs and contexts, computed once per database.
#[derive(Default)]
pub struct Contexts {
    root: PathBuf,
    cache: HashMap<String, (Catalog, String)>,
}

impl Contexts {
    pub fn new(root: &Path) -> Contexts {
        Contexts { root: root.to_path_buf(), cache: HashMap::new() }
    }

    pub fn get(&mut self, db_id: &str) -> Result<&(Catalog, String)> {
        if !self.cache.contains_key(db_id) {
            let schema = db_id.to_lowercase();
            let cat = catalog(&sqlite_path(&self.root, db_id), &schema)?;
            let text = render_context(&cat, &schema);
            self.cache.insert(db_id.to_string(), (cat, text));
        }
        Ok(&self.cache[db_id])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(db: &str, q: &str) -> Example {
        Example { index: 0, db_id: db.into(), question: q.into(), query: "SELECT 1".into() }
    }

    fn syn(db: &str, original: &str, paraphrase: &str, query: &str) -> SynRow {
        SynRow { db_id: db.into(), question: original.into(), syn_question: paraphrase.into(), query: query.into() }
    }

    #[test]
    fn syn_rows_line_up_by_position_and_database_and_keep_their_own_gold() {
        let d = vec![dev("a", "What is the maximum capacity and the average?"), dev("b", "How many?")];
        // Row 0's original wording (and gold) is Spider's earlier release: accepted, scored on its own gold.
        let rows = vec![
            syn("a", "What is the average and the maximum capacity?", "average and most seats?", "SELECT avg(x)"),
            syn("b", "How many?", "What number?", "SELECT count(*)"),
        ];
        let got = syn_rows_on_dev(rows, &d).unwrap();
        assert_eq!(got[0].question, "average and most seats?");
        assert_eq!(got[0].query, "SELECT avg(x)");
        assert_eq!((got[1].index, got[1].db_id.as_str()), (1, "b"));
        let shifted = vec![syn("b", "How many?", "What number?", "q"), syn("a", "x", "y", "q")];
        let e = syn_rows_on_dev(shifted, &d).unwrap_err().to_string();
        assert!(e.contains("row 0 is about b, dev.json's about a"), "{e}");
        assert!(syn_rows_on_dev(vec![], &d).is_err(), "row counts must agree");
    }
}
