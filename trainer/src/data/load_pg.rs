//! `data load-pg`: copy Spider SQLite databases into PostgreSQL with their rows, primary keys and foreign keys.
//!
//! Rules (so that SQL written for Spider runs unchanged and answers match SQLite's):
//! - identifiers are lower-cased (Spider's SQL writes `Singer_ID` unquoted, which PostgreSQL folds to
//!   `singer_id`), and quoted only where PostgreSQL needs it;
//! - column types come from SQLite's declared type *and* the stored values: an INTEGER-affinity column whose values
//!   are all integers becomes `integer` (or `bigint` past 32 bits); REAL-affinity numbers become
//!   `double precision`; NUMERIC-affinity numbers `numeric`; anything that holds a value of another kind (SQLite
//!   lets an `int` column hold `''`) stays `text`, so every row is copied exactly; a column of any declared type
//!   whose values are all integers written canonically (`2014`, not `007`) becomes an integer column, since SQLite
//!   compares such text with numbers by value and PostgreSQL would refuse `text = integer`;
//! - rows are copied with COPY; afterwards every table's row count is compared with SQLite's;
//! - primary keys and foreign keys are added after the data. Spider has keys PostgreSQL rejects (duplicate "primary"
//!   values, foreign keys between columns of different types or to non-unique columns): those are skipped with a
//!   warning, the data stays. Foreign keys are added `NOT VALID` (the rows are Spider's, not ours to fix).

use super::LoadPgArgs;
use anyhow::{anyhow, bail, Context, Result};
use copilot_core::sql::schema::quote_ident;
use indicatif::{ProgressBar, ProgressStyle};
use rusqlite::types::ValueRef;
use std::io::Write;
use std::path::Path;
use tracing::{info, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// One schema per db_id.
    Schema,
    /// Tables in `public` (a single database).
    Public,
}

/// SQLite's type affinity of a declared column type (https://www.sqlite.org/datatype3.html, section 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

pub fn affinity(declared: &str) -> Affinity {
    let d = declared.to_ascii_uppercase();
    if d.contains("INT") {
        Affinity::Integer
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        Affinity::Text
    } else if d.contains("BLOB") || d.trim().is_empty() {
        Affinity::Blob
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        Affinity::Real
    } else {
        Affinity::Numeric
    }
}

/// What the stored values of a column are.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValueSummary {
    pub non_null: usize,
    pub integers: usize,
    pub reals: usize,
    pub texts: usize,
    pub blobs: usize,
    pub max_abs_int: u64,
    /// Text values that are canonical integers (`42`, `-7`; not `007`, `4.0` or ` 1`).
    pub integer_texts: usize,
}

/// `Some(n)` when `s` is an integer written the one way PostgreSQL's integer output would write it.
fn canonical_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && s != "-0";
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

impl ValueSummary {
    pub fn add(&mut self, v: ValueRef<'_>) {
        match v {
            ValueRef::Null => return,
            ValueRef::Integer(i) => {
                self.integers += 1;
                self.max_abs_int = self.max_abs_int.max(i.unsigned_abs());
            }
            ValueRef::Real(_) => self.reals += 1,
            ValueRef::Text(t) => {
                self.texts += 1;
                if let Some(i) = std::str::from_utf8(t).ok().and_then(canonical_int) {
                    self.integer_texts += 1;
                    self.max_abs_int = self.max_abs_int.max(i.unsigned_abs());
                }
            }
            ValueRef::Blob(_) => self.blobs += 1,
        }
        self.non_null += 1;
    }
}

/// The PostgreSQL type for a column, from its SQLite declaration and its values.
pub fn pg_type(declared: &str, v: &ValueSummary) -> &'static str {
    let int_type = if v.max_abs_int > i32::MAX as u64 { "bigint" } else { "integer" };
    let all_int = v.integers == v.non_null;
    let all_num = v.integers + v.reals == v.non_null;
    // Integers stored as text (Spider's `"Year" text` holding '2014', or key columns declared text that reference
    // int keys): SQLite compares them with numbers by value, PostgreSQL refuses `text = integer`. Written the one
    // canonical way, they become integers: same values, and Spider's SQL runs as it does on SQLite.
    if v.texts > 0 && v.integer_texts == v.texts && v.integers + v.texts == v.non_null {
        return int_type;
    }
    match affinity(declared) {
        Affinity::Text => "text",
        Affinity::Blob if v.blobs > 0 && v.blobs == v.non_null => "bytea",
        Affinity::Blob => "text",
        Affinity::Integer if all_int => int_type,
        Affinity::Real if all_num => "double precision",
        Affinity::Numeric if all_int && v.non_null > 0 => int_type,
        Affinity::Numeric if all_num => "numeric",
        _ => "text",
    }
}

#[derive(Debug, Clone)]
pub struct ColumnPlan {
    pub sqlite_name: String,
    pub name: String,
    pub pg_type: &'static str,
}

#[derive(Debug, Clone)]
pub struct ForeignKeyPlan {
    pub columns: Vec<String>,
    pub ref_table: String,
    pub ref_columns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TablePlan {
    pub sqlite_name: String,
    pub name: String,
    pub columns: Vec<ColumnPlan>,
    pub primary_key: Vec<String>,
    pub foreign_keys: Vec<ForeignKeyPlan>,
    pub rows: u64,
}

fn sqlite_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Read a SQLite database's tables, inferring PostgreSQL types from declarations and values.
pub fn plan(db: &rusqlite::Connection) -> Result<Vec<TablePlan>> {
    let mut names: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    names.dedup();
    let mut plans = Vec::new();
    for t in names {
        // (cid, name, type, notnull, dflt, pk)
        let info: Vec<(String, String, i64)> = db
            .prepare(&format!("PRAGMA table_info({})", sqlite_ident(&t)))?
            .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(5)?)))?
            .collect::<Result<_, _>>()?;
        let mut summaries = vec![ValueSummary::default(); info.len()];
        let cols = info.iter().map(|c| sqlite_ident(&c.0)).collect::<Vec<_>>().join(", ");
        let mut rows = 0u64;
        {
            let mut stmt = db.prepare(&format!("SELECT {cols} FROM {}", sqlite_ident(&t)))?;
            let mut q = stmt.query([])?;
            while let Some(row) = q.next()? {
                rows += 1;
                for (i, s) in summaries.iter_mut().enumerate() {
                    s.add(row.get_ref(i)?);
                }
            }
        }
        let columns: Vec<ColumnPlan> = info
            .iter()
            .zip(&summaries)
            .map(|((n, ty, _), s)| ColumnPlan {
                sqlite_name: n.clone(),
                name: n.to_lowercase(),
                pg_type: pg_type(ty, s),
            })
            .collect();
        let mut pk: Vec<(i64, String)> = info.iter().filter(|c| c.2 > 0).map(|c| (c.2, c.0.to_lowercase())).collect();
        pk.sort();
        // (id, seq, table, from, to)
        let fk_rows: Vec<(i64, i64, String, String, Option<String>)> = db
            .prepare(&format!("PRAGMA foreign_key_list({})", sqlite_ident(&t)))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<Result<_, _>>()?;
        let mut foreign_keys: Vec<ForeignKeyPlan> = Vec::new();
        let mut ids: Vec<i64> = fk_rows.iter().map(|f| f.0).collect();
        ids.dedup();
        for id in ids {
            let mut parts: Vec<&(i64, i64, String, String, Option<String>)> =
                fk_rows.iter().filter(|f| f.0 == id).collect();
            parts.sort_by_key(|f| f.1);
            foreign_keys.push(ForeignKeyPlan {
                columns: parts.iter().map(|f| f.3.to_lowercase()).collect(),
                ref_table: parts[0].2.to_lowercase(),
                // A missing "to" means the referenced table's primary key; filled in below.
                ref_columns: parts.iter().filter_map(|f| f.4.as_ref().map(|c| c.to_lowercase())).collect(),
            });
        }
        plans.push(TablePlan {
            sqlite_name: t.clone(),
            name: t.to_lowercase(),
            columns,
            primary_key: pk.into_iter().map(|p| p.1).collect(),
            foreign_keys,
            rows,
        });
    }
    // Resolve implicit foreign-key targets (REFERENCES t without columns = t's primary key).
    let pks: Vec<(String, Vec<String>)> = plans.iter().map(|p| (p.name.clone(), p.primary_key.clone())).collect();
    for p in &mut plans {
        for fk in &mut p.foreign_keys {
            if fk.ref_columns.is_empty() {
                if let Some((_, k)) = pks.iter().find(|(n, _)| *n == fk.ref_table) {
                    fk.ref_columns = k.clone();
                }
            }
        }
    }
    Ok(plans)
}

/// One value in COPY's text format.
fn copy_value(v: ValueRef<'_>, pg_type: &str, out: &mut Vec<u8>) {
    match v {
        ValueRef::Null => out.extend_from_slice(b"\\N"),
        ValueRef::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        ValueRef::Real(f) => {
            let s = if f.is_nan() {
                "NaN".to_string()
            } else if f.is_infinite() {
                if f > 0.0 {
                    "Infinity".into()
                } else {
                    "-Infinity".into()
                }
            } else {
                format!("{f:?}")
            };
            out.extend_from_slice(s.as_bytes());
        }
        ValueRef::Text(t) => escape_copy(&String::from_utf8_lossy(t), out),
        ValueRef::Blob(b) if pg_type == "bytea" => {
            out.extend_from_slice(b"\\\\x");
            for byte in b {
                out.extend_from_slice(format!("{byte:02x}").as_bytes());
            }
        }
        ValueRef::Blob(b) => escape_copy(&String::from_utf8_lossy(b), out),
    }
}

fn escape_copy(s: &str, out: &mut Vec<u8>) {
    for c in s.chars() {
        match c {
            '\\' => out.extend_from_slice(b"\\\\"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\0' => {}
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

fn idents(cols: &[String]) -> String {
    cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
}

/// Load one SQLite database into `schema`. Returns (tables, rows, skipped constraints).
pub fn load_one(
    pg: &mut postgres::Client,
    sqlite_path: &Path,
    schema: &str,
    create_schema: bool,
    replace: bool,
) -> Result<(usize, u64, usize)> {
    let db = rusqlite::Connection::open_with_flags(sqlite_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", sqlite_path.display()))?;
    let plans = plan(&db)?;
    let mut tx = pg.transaction()?;
    if create_schema {
        let exists: bool =
            tx.query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema])?.get(0);
        if exists && !replace {
            bail!("schema {schema} already exists (use --replace to reload it)");
        }
        tx.batch_execute(&format!("DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0};", quote_ident(schema)))?;
    } else {
        for p in &plans {
            let exists: bool =
                tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified(schema, &p.name)])?.get(0);
            if exists && !replace {
                bail!("table {} already exists (use --replace to reload it)", qualified(schema, &p.name));
            }
            if exists {
                tx.batch_execute(&format!("DROP TABLE {} CASCADE", qualified(schema, &p.name)))?;
            }
        }
    }
    let mut total_rows = 0u64;
    for p in &plans {
        let cols =
            p.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), c.pg_type)).collect::<Vec<_>>().join(", ");
        tx.batch_execute(&format!("CREATE TABLE {} ({cols})", qualified(schema, &p.name)))?;
        let names = p.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let mut writer = tx.copy_in(&format!("COPY {} ({names}) FROM STDIN", qualified(schema, &p.name)))?;
        let sel = p.columns.iter().map(|c| sqlite_ident(&c.sqlite_name)).collect::<Vec<_>>().join(", ");
        let mut stmt = db.prepare(&format!("SELECT {sel} FROM {}", sqlite_ident(&p.sqlite_name)))?;
        let mut q = stmt.query([])?;
        let mut buf = Vec::with_capacity(1 << 16);
        while let Some(row) = q.next()? {
            for (i, c) in p.columns.iter().enumerate() {
                if i > 0 {
                    buf.push(b'\t');
                }
                copy_value(row.get_ref(i)?, c.pg_type, &mut buf);
            }
            buf.push(b'\n');
            if buf.len() > 1 << 20 {
                writer.write_all(&buf)?;
                buf.clear();
            }
        }
        writer.write_all(&buf)?;
        let copied = writer.finish()?;
        if copied != p.rows {
            bail!("{}: copied {copied} rows, SQLite has {}", p.name, p.rows);
        }
        total_rows += copied;
    }
    let mut skipped = 0usize;
    let mut try_ddl = |tx: &mut postgres::Transaction<'_>, what: &str, sql: String| -> Result<()> {
        let mut sp = tx.savepoint("copilot_ddl")?;
        match sp.batch_execute(&sql) {
            Ok(()) => sp.commit()?,
            Err(e) => {
                sp.rollback()?;
                skipped += 1;
                warn!(
                    "{schema}: skipped {what}: {}",
                    e.as_db_error().map(|d| d.message().to_string()).unwrap_or(e.to_string())
                );
            }
        }
        Ok(())
    };
    for p in &plans {
        if !p.primary_key.is_empty() {
            try_ddl(
                &mut tx,
                &format!("primary key of {}", p.name),
                format!("ALTER TABLE {} ADD PRIMARY KEY ({})", qualified(schema, &p.name), idents(&p.primary_key)),
            )?;
        }
    }
    for p in &plans {
        for fk in &p.foreign_keys {
            if fk.ref_columns.len() != fk.columns.len() {
                continue;
            }
            try_ddl(
                &mut tx,
                &format!("foreign key {}({}) -> {}", p.name, fk.columns.join(","), fk.ref_table),
                format!(
                    "ALTER TABLE {} ADD FOREIGN KEY ({}) REFERENCES {} ({}) NOT VALID",
                    qualified(schema, &p.name),
                    idents(&fk.columns),
                    qualified(schema, &fk.ref_table),
                    idents(&fk.ref_columns)
                ),
            )?;
        }
    }
    // Verify: PostgreSQL holds as many rows as SQLite, table by table.
    for p in &plans {
        let n: i64 = tx.query_one(&format!("SELECT count(*) FROM {}", qualified(schema, &p.name)), &[])?.get(0);
        if n as u64 != p.rows {
            bail!("{}: PostgreSQL has {n} rows, SQLite {}", p.name, p.rows);
        }
    }
    tx.commit()?;
    pg.batch_execute(&format!(
        "ANALYZE {}",
        plans.iter().map(|p| qualified(schema, &p.name)).collect::<Vec<_>>().join(", ")
    ))
    .ok();
    Ok((plans.len(), total_rows, skipped))
}

pub fn run(args: &LoadPgArgs) -> Result<()> {
    let dbdir = args.spider.join("database");
    let mut dbs = args.dbs.clone();
    if args.all {
        let mut all: Vec<String> = std::fs::read_dir(&dbdir)
            .with_context(|| format!("cannot read {}", dbdir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(format!("{}.sqlite", e.file_name().to_string_lossy())).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        all.sort();
        dbs = all;
    }
    if args.layout == Layout::Public && dbs.len() != 1 {
        bail!("--layout public loads exactly one database (got {})", dbs.len());
    }
    let mut pg = postgres::Client::connect(&args.pg, postgres::NoTls)
        .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
    let bar = ProgressBar::new(dbs.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").map_err(|e| anyhow!("{e}"))?);
    let mut failures = 0;
    for db in &dbs {
        bar.set_message(db.clone());
        let path = dbdir.join(db).join(format!("{db}.sqlite"));
        let (schema, create) = match args.layout {
            Layout::Schema => (db.to_lowercase(), true),
            Layout::Public => ("public".to_string(), false),
        };
        match load_one(&mut pg, &path, &schema, create, args.replace) {
            Ok((tables, rows, skipped)) => {
                info!("{db}: {tables} tables, {rows} rows into schema {schema} ({skipped} constraints skipped)")
            }
            Err(e) => {
                failures += 1;
                warn!("{db}: {e:#}");
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if failures > 0 {
        bail!("{failures} of {} databases failed to load", dbs.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(affinity("int"), Affinity::Integer);
        assert_eq!(affinity("BIGINT UNSIGNED"), Affinity::Integer);
        assert_eq!(affinity("varchar(255)"), Affinity::Text);
        assert_eq!(affinity("real"), Affinity::Real);
        assert_eq!(affinity("double"), Affinity::Real);
        assert_eq!(affinity("number"), Affinity::Numeric);
        assert_eq!(affinity("bool"), Affinity::Numeric);
        assert_eq!(affinity(""), Affinity::Blob);
        // "point" contains INT: SQLite's own (surprising) rule.
        assert_eq!(affinity("POINT"), Affinity::Integer);
    }

    fn summary(db: &rusqlite::Connection, col: &str) -> ValueSummary {
        let mut s = ValueSummary::default();
        let mut st = db.prepare(&format!("SELECT {col} FROM t")).unwrap();
        let mut q = st.query([]).unwrap();
        while let Some(r) = q.next().unwrap() {
            s.add(r.get_ref(0).unwrap());
        }
        s
    }

    #[test]
    fn types_come_from_declarations_and_values() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE t (a int, b int, c real, d number, e bool, f text, g number, h int);
             INSERT INTO t VALUES (1, 1, 1.5, 2.25, 'T', '1', 3, 5000000000);
             INSERT INTO t VALUES (2, '', 2, 3, 'F', 'x', NULL, NULL);
             CREATE TABLE u (y text, z text);
             INSERT INTO u VALUES ('2014', '007'), ('2015', '12');",
        )
        .unwrap();
        let ty = |col: &str, decl: &str| pg_type(decl, &summary(&db, col));
        assert_eq!(ty("a", "int"), "integer");
        assert_eq!(ty("b", "int"), "text", "an int column holding '' must stay text to keep the row");
        assert_eq!(ty("c", "real"), "double precision");
        assert_eq!(ty("d", "number"), "numeric");
        assert_eq!(ty("e", "bool"), "text");
        assert_eq!(ty("f", "text"), "text");
        assert_eq!(ty("g", "number"), "integer");
        assert_eq!(ty("h", "int"), "bigint");
        let mut y = ValueSummary::default();
        let mut z = ValueSummary::default();
        let mut st = db.prepare("SELECT y, z FROM u").unwrap();
        let mut q = st.query([]).unwrap();
        while let Some(r) = q.next().unwrap() {
            y.add(r.get_ref(0).unwrap());
            z.add(r.get_ref(1).unwrap());
        }
        assert_eq!(pg_type("text", &y), "integer", "canonical integers in a text column");
        assert_eq!(pg_type("text", &z), "text", "'007' is not written as an integer would be");
    }

    #[test]
    fn canonical_integers_only() {
        assert_eq!(canonical_int("42"), Some(42));
        assert_eq!(canonical_int("-7"), Some(-7));
        assert_eq!(canonical_int("0"), Some(0));
        for s in ["007", "4.0", " 1", "", "-", "-0", "1e3", "99999999999999999999"] {
            assert_eq!(canonical_int(s), None, "{s:?}");
        }
    }

    #[test]
    fn copy_text_format_escapes() {
        let mut out = Vec::new();
        escape_copy("a\tb\\c\nd", &mut out);
        assert_eq!(out, b"a\\tb\\\\c\\nd");
        let mut out = Vec::new();
        copy_value(ValueRef::Null, "text", &mut out);
        assert_eq!(out, b"\\N");
        let mut out = Vec::new();
        copy_value(ValueRef::Real(0.1), "double precision", &mut out);
        assert_eq!(out, b"0.1");
        let mut out = Vec::new();
        copy_value(ValueRef::Blob(&[0xde, 0xad]), "bytea", &mut out);
        assert_eq!(out, b"\\\\xdead");
    }

    #[test]
    fn plan_reads_keys_of_a_spider_database() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/spider/database/concert_singer/concert_singer.sqlite");
        let db = rusqlite::Connection::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let plans = plan(&db).unwrap();
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["concert", "singer", "singer_in_concert", "stadium"]);
        let sic = plans.iter().find(|p| p.name == "singer_in_concert").unwrap();
        assert_eq!(sic.primary_key, ["concert_id", "singer_id"]);
        assert_eq!(sic.foreign_keys.len(), 2);
        // concert.stadium_id is declared text but holds integers and references stadium's int key.
        let concert = plans.iter().find(|p| p.name == "concert").unwrap();
        assert_eq!(concert.columns.iter().find(|c| c.name == "stadium_id").unwrap().pg_type, "integer");
        assert_eq!(concert.columns.iter().find(|c| c.name == "year").unwrap().pg_type, "integer");
        assert_eq!(concert.columns.iter().find(|c| c.name == "theme").unwrap().pg_type, "text");
        let singer = plans.iter().find(|p| p.name == "singer").unwrap();
        assert_eq!(singer.rows, 6);
        assert_eq!(singer.columns.iter().find(|c| c.name == "age").unwrap().pg_type, "integer");
    }
}
