//! Executing gold (SQLite) and predictions (PostgreSQL, read-only, rolled back, under a statement timeout).

use super::results::{Cell, ResultSet};
use crate::spider;
use copilot_core::sql::schema::quote_ident;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Sqlite {
    conns: HashMap<String, rusqlite::Connection>,
    root: PathBuf,
}

impl Sqlite {
    pub fn new(root: &Path) -> Sqlite {
        Sqlite { conns: HashMap::new(), root: root.to_path_buf() }
    }

    pub fn run(&mut self, db: &str, sql: &str, timeout: Duration) -> Result<ResultSet, String> {
        if !self.conns.contains_key(db) {
            let c = rusqlite::Connection::open_with_flags(
                spider::sqlite_path(&self.root, db),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .map_err(|e| e.to_string())?;
            self.conns.insert(db.to_string(), c);
        }
        let conn = &self.conns[db];
        let start = Instant::now();
        conn.progress_handler(10_000, Some(move || start.elapsed() > timeout));
        let out = (|| {
            let mut stmt = conn.prepare(sql)?;
            let columns = stmt.column_count();
            let mut rows = Vec::new();
            let mut q = stmt.query([])?;
            while let Some(r) = q.next()? {
                rows.push((0..columns).map(|i| r.get_ref(i).map(Cell::from_sqlite)).collect::<Result<Vec<_>, _>>()?);
            }
            Ok::<_, rusqlite::Error>(ResultSet { columns, rows })
        })();
        conn.progress_handler(0, None::<fn() -> bool>);
        out.map_err(|e| e.to_string())
    }
}

pub(super) fn pg_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// Run a predicted query in a read-only transaction that is rolled back, with a statement timeout.
pub fn run_pg(client: &mut postgres::Client, db: &str, sql: &str, timeout: Duration) -> Result<ResultSet, String> {
    let mut tx = client.build_transaction().read_only(true).start().map_err(|e| pg_error(&e))?;
    tx.batch_execute(&format!(
        "SET LOCAL search_path = {}; SET LOCAL statement_timeout = {}",
        quote_ident(&db.to_lowercase()),
        timeout.as_millis()
    ))
    .map_err(|e| pg_error(&e))?;
    let stmt = tx.prepare(sql).map_err(|e| pg_error(&e))?;
    let types: Vec<String> = stmt.columns().iter().map(|c| c.type_().name().to_string()).collect();
    let msgs = tx.simple_query(sql).map_err(|e| pg_error(&e))?;
    let mut rows = Vec::new();
    for m in msgs {
        if let postgres::SimpleQueryMessage::Row(r) = m {
            rows.push((0..types.len()).map(|i| Cell::from_pg_text(r.get(i), &types[i])).collect());
        }
    }
    let _ = tx.rollback();
    Ok(ResultSet { columns: types.len(), rows })
}
