//! The catalog `scripts/bench-schema` builds, without PostgreSQL: the Spider dev databases as schemas (from
//! `tables.json`) plus wide generated `warehouse` distractors (30 columns, chained by foreign keys), built by the same
//! rule as the script's SQL. Shared by the schema-selection examples.
use copilot_core::sql::schema::{Catalog, Column, ForeignKey, RelationKind, RenderOptions, Table};
use serde_json::Value;

pub fn spider_tables(db: &Value) -> Vec<Table> {
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
pub fn warehouse(n: usize) -> Vec<Table> {
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

/// The Spider dev databases' tables (those `dev` asks about) as schemas, then `distractors` warehouse tables.
pub fn catalog(dbs: &Value, dev: &Value, distractors: usize) -> Catalog {
    let mut dev_dbs: Vec<&str> = dev.as_array().expect("dev").iter().filter_map(|q| q["db_id"].as_str()).collect();
    dev_dbs.sort_unstable();
    dev_dbs.dedup();
    let mut tables: Vec<Table> = dbs
        .as_array()
        .expect("tables")
        .iter()
        .filter(|db| db["db_id"].as_str().is_some_and(|d| dev_dbs.contains(&d)))
        .flat_map(spider_tables)
        .collect();
    tables.extend(warehouse(distractors));
    Catalog { tables }
}

/// Spider's `dev.json` from `spider` (a directory), and the catalog above built from its `tables.json`.
pub fn load(spider: &str, distractors: usize) -> (Value, Catalog) {
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{spider}/{f}")).expect("read")).expect("json")
    };
    let (dbs, dev) = (read("tables.json"), read("dev.json"));
    let catalog = catalog(&dbs, &dev, distractors);
    (dev, catalog)
}

/// How the context is rendered with every schema visible (search_path = public).
pub fn render_options() -> RenderOptions {
    RenderOptions { unqualified_schemas: vec!["public".into()], ..Default::default() }
}

/// A catalog's cost as the extension counts it: rendered characters / 3 (estimated tokens).
pub fn tokens(c: &Catalog) -> usize {
    c.render(&render_options()).len().div_ceil(3)
}
