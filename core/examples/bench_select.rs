//! What schema selection itself costs (`copilot_core::sql::select`), without PostgreSQL: the catalog bench-schema
//! builds — the Spider dev databases as schemas (from `tables.json`) plus `DISTRACTORS` wide generated `warehouse`
//! tables of 30 columns chained by foreign keys, as `scripts/bench-schema` creates them — and the first `N` dev
//! questions of those databases, each selected at a budget of `BUDGET` estimated tokens (characters / 3, as the
//! extension counts). Prints one JSON object: tables, the full context's characters and render time, and the
//! selection's p50/p95/max milliseconds. `copilot.context(question)` adds the catalog read as the caller to this.
//!
//! `cargo run --release -p copilot-core --example bench_select -- SPIDER_DIR [N] [BUDGET] [DISTRACTORS]`
use copilot_core::sql::schema::{Catalog, Column, ForeignKey, RelationKind, RenderOptions, Table};
use copilot_core::sql::select::select;
use serde_json::Value;
use std::time::Instant;

fn spider_tables(db: &Value) -> Vec<Table> {
    let schema = db["db_id"].as_str().unwrap_or_default().to_lowercase();
    let names: Vec<String> = db["table_names_original"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .map(String::from)
        .collect();
    let cols: Vec<(i64, String)> = db["column_names_original"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c[0].as_i64().unwrap_or(-1), c[1].as_str().unwrap_or_default().to_string()))
        .collect();
    let types: Vec<String> =
        db["column_types"].as_array().into_iter().flatten().map(|v| v.as_str().unwrap_or("text").to_string()).collect();
    let col_name = |i: usize| cols[i].1.clone();
    let mut tables: Vec<Table> = names
        .iter()
        .enumerate()
        .map(|(ti, name)| Table {
            schema: schema.clone(),
            name: name.to_lowercase(),
            kind: RelationKind::Table,
            columns: cols
                .iter()
                .zip(&types)
                .filter(|((t, _), _)| *t == ti as i64)
                .map(|((_, c), ty)| Column { name: c.to_lowercase(), data_type: ty.clone(), ..Default::default() })
                .collect(),
            primary_key: Vec::new(),
            foreign_keys: Vec::new(),
            comment: None,
        })
        .collect();
    for pk in db["primary_keys"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
        let t = cols[pk as usize].0;
        if t >= 0 {
            tables[t as usize].primary_key.push(col_name(pk as usize).to_lowercase());
        }
    }
    for fk in db["foreign_keys"].as_array().into_iter().flatten() {
        let (Some(a), Some(b)) = (fk[0].as_u64(), fk[1].as_u64()) else { continue };
        let (ta, tb) = (cols[a as usize].0, cols[b as usize].0);
        if ta >= 0 && tb >= 0 {
            tables[ta as usize].foreign_keys.push(ForeignKey {
                columns: vec![col_name(a as usize).to_lowercase()],
                ref_schema: schema.clone(),
                ref_table: names[tb as usize].to_lowercase(),
                ref_columns: vec![col_name(b as usize).to_lowercase()],
            });
        }
    }
    tables
}

/// The `warehouse` distractors of scripts/bench-schema, built by the same rule.
fn warehouse(n: usize) -> Vec<Table> {
    let subjects = [
        "sales",
        "customer",
        "product",
        "inventory",
        "shipment",
        "invoice",
        "payment",
        "employee",
        "supplier",
        "campaign",
        "web",
        "store",
        "region",
        "ledger",
        "contract",
        "ticket",
        "vendor",
        "order",
        "account",
        "member",
    ];
    let kinds = [
        "fact", "dim", "history", "daily", "snapshot", "staging", "detail", "summary", "log", "archive", "monthly",
        "audit", "line", "event", "status",
    ];
    let vocab = [
        "name",
        "country",
        "age",
        "year",
        "city",
        "title",
        "amount",
        "price",
        "created_at",
        "updated_at",
        "status",
        "type",
        "code",
        "description",
        "email",
        "phone",
        "address",
        "rank",
        "score",
        "start_date",
        "quantity",
        "total",
        "category",
        "language",
        "rating",
        "capacity",
        "weight",
        "height",
        "population",
        "budget",
        "location",
        "gender",
        "nationality",
        "level",
        "duration",
        "salary",
        "points",
        "color",
        "model",
        "version",
        "owner_name",
        "first_name",
        "last_name",
        "birth_date",
        "channel",
        "source",
        "theme",
        "team",
        "grade",
        "hours",
    ];
    let name = |i: usize| {
        let suffix = if i >= 300 { format!("_{}", i / 300) } else { String::new() };
        format!("{}_{}{suffix}", subjects[i % 20], kinds[(i / 20) % 15])
    };
    (0..n)
        .map(|i| {
            let mut columns = vec![Column { name: "id".into(), data_type: "integer".into(), ..Default::default() }];
            for j in 1..=28 {
                let v = vocab[(i * 7 + j * 3) % vocab.len()];
                let c = if columns.iter().any(|c| c.name == v) { format!("{v}_{j}") } else { v.to_string() };
                columns.push(Column { name: c, data_type: "text".into(), ..Default::default() });
            }
            columns.push(Column { name: "ref_id".into(), data_type: "integer".into(), ..Default::default() });
            let foreign_keys = if i > 0 {
                vec![ForeignKey {
                    columns: vec!["ref_id".into()],
                    ref_schema: "warehouse".into(),
                    ref_table: name((i * 13) % i),
                    ref_columns: vec!["id".into()],
                }]
            } else {
                Vec::new()
            };
            Table {
                schema: "warehouse".into(),
                name: name(i),
                kind: RelationKind::Table,
                columns,
                primary_key: vec!["id".into()],
                foreign_keys,
                comment: None,
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(spider) = args.get(1) else {
        eprintln!("usage: bench_select SPIDER_DIR [QUESTIONS] [BUDGET] [DISTRACTORS]");
        std::process::exit(2);
    };
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, budget, distractors) = (arg(2, 300), arg(3, 1000), arg(4, 300));
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{spider}/{f}")).expect("read")).expect("json")
    };
    let (dbs, dev) = (read("tables.json"), read("dev.json"));
    let dev_dbs: Vec<&str> = {
        let mut d: Vec<&str> = dev.as_array().expect("dev").iter().filter_map(|q| q["db_id"].as_str()).collect();
        d.sort_unstable();
        d.dedup();
        d
    };
    let mut tables: Vec<Table> = dbs
        .as_array()
        .expect("tables")
        .iter()
        .filter(|db| db["db_id"].as_str().is_some_and(|d| dev_dbs.contains(&d)))
        .flat_map(spider_tables)
        .collect();
    tables.extend(warehouse(distractors));
    let catalog = Catalog { tables };
    let opts = RenderOptions { unqualified_schemas: vec!["public".into()], ..Default::default() };
    let tokens = |c: &Catalog| c.render(&opts).len().div_ceil(3);
    let t0 = Instant::now();
    let full = catalog.render(&opts).len();
    let render_ms = t0.elapsed().as_secs_f64() * 1e3;
    let questions: Vec<&str> =
        dev.as_array().expect("dev").iter().filter_map(|q| q["question"].as_str()).take(n).collect();
    let mut ms: Vec<f64> = Vec::with_capacity(questions.len());
    let mut kept = Vec::with_capacity(questions.len());
    for q in &questions {
        let t = Instant::now();
        let (chosen, _) = select(&catalog, q, &[], budget, &tokens);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        kept.push(chosen.tables.len());
    }
    ms.sort_by(f64::total_cmp);
    kept.sort_unstable();
    let at = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "tables": catalog.tables.len(),
            "full_context_chars": full,
            "full_render_ms": render_ms,
            "questions": questions.len(),
            "budget_tokens": budget,
            "select_ms_p50": at(&ms, 0.5),
            "select_ms_p95": at(&ms, 0.95),
            "select_ms_max": ms.last(),
            "tables_kept_p50": kept[kept.len() / 2],
        })
    );
}
