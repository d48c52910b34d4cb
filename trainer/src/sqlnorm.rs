//! SQL normalization, used by `data prepare` (the SQL we train on) and by `eval` (exact match); and the catalog a
//! `CREATE TABLE …` context declares (both check names against it).
//!
//! Rules, in order (documented in docs/evaluation.md):
//! 1. Parse as one statement (SQLite dialect first — Spider and sql-create-context are written for SQLite — then
//!    PostgreSQL), every unquoted word lowercased first (PostgreSQL folds identifiers). Anything else is "unparseable".
//! 2. A double-quoted word that names no table or column of the context is a string value (sql-create-context
//!    writes `WHERE name = "Bob"`, which PostgreSQL would read as a column): it becomes `'Bob'`.
//! 3. Print it back with sqlparser: one line, keywords upper case, canonical spacing and operators, no trailing
//!    semicolon.
//!
//! `mask_values` additionally replaces every literal by `?` (the "no-values" exact match).

use copilot_core::sql::schema::{Catalog, Column, RelationKind, Table};
use sqlparser::ast::{CreateTable, Expr, Ident, Statement, Value, VisitMut, VisitorMut};
use sqlparser::dialect::{PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Word};
use std::collections::HashSet;
use std::ops::ControlFlow;

/// The lowercase table and column names of a catalog: the `known` set [`normalize`] takes.
pub fn known_names(catalog: &copilot_core::sql::schema::Catalog) -> HashSet<String> {
    catalog
        .tables
        .iter()
        .flat_map(|t| std::iter::once(t.name.to_lowercase()).chain(t.columns.iter().map(|c| c.name.to_lowercase())))
        .collect()
}

/// The tables and columns a `CREATE TABLE …` context declares.
pub fn catalog_from_context(context: &str) -> Option<Catalog> {
    let stmts = Parser::parse_sql(&SQLiteDialect {}, context).ok()?;
    let mut tables = Vec::new();
    for s in stmts {
        let Statement::CreateTable(CreateTable { name, columns, .. }) = s else { return None };
        let parts: Vec<String> = name.0.iter().map(|p| p.to_string().trim_matches('"').to_string()).collect();
        let (schema, tname) = match parts.as_slice() {
            [t] => (String::new(), t.clone()),
            [s, t] => (s.clone(), t.clone()),
            _ => return None,
        };
        tables.push(Table {
            schema,
            name: tname,
            kind: RelationKind::Table,
            columns: columns
                .iter()
                .map(|c| Column {
                    name: c.name.value.clone(),
                    data_type: c.data_type.to_string(),
                    not_null: false,
                    comment: None,
                    ..Default::default()
                })
                .collect(),
            primary_key: Vec::new(),
            foreign_keys: Vec::new(),
            comment: None,
        });
    }
    (!tables.is_empty()).then_some(Catalog { tables })
}

fn parse_one(sql: &str) -> Option<Statement> {
    let text = sql.trim().trim_end_matches(';').trim();
    let parsed = Parser::parse_sql(&SQLiteDialect {}, text).or_else(|_| Parser::parse_sql(&PostgreSqlDialect {}, text));
    match parsed {
        Ok(mut v) if v.len() == 1 => v.pop(),
        _ => None,
    }
}

struct Rewrite<'a> {
    known: Option<&'a HashSet<String>>,
    mask: bool,
}

impl VisitorMut for Rewrite<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let (Expr::Identifier(Ident { value, quote_style: Some('"'), .. }), Some(known)) = (&*e, self.known) {
            if !known.contains(&value.to_lowercase()) {
                *e = Expr::value(Value::SingleQuotedString(value.clone()));
            }
        }
        if self.mask {
            if let Expr::Value(v) = e {
                if !matches!(v.value, Value::Null | Value::Boolean(_)) {
                    v.value = Value::Placeholder("?".into());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// Lowercase every unquoted word before parsing: identifiers fold as PostgreSQL folds them, and keywords are
/// printed upper case by sqlparser whatever their case was.
fn lowercase_words(sql: &str) -> String {
    let Ok(tokens) = Tokenizer::new(&SQLiteDialect {}, sql).tokenize() else { return sql.to_string() };
    let mut out = String::with_capacity(sql.len());
    for t in tokens {
        match t {
            Token::Word(Word { value, quote_style: None, .. }) => out.push_str(&value.to_lowercase()),
            other => out.push_str(&other.to_string()),
        }
    }
    out
}

/// Normalize one SQL statement (see the module documentation). `known` holds the lowercase table and column
/// names of the context, for rule 2. None when it does not parse as one statement.
pub fn normalize(sql: &str, known: Option<&HashSet<String>>) -> Option<String> {
    let mut stmt = parse_one(&lowercase_words(sql))?;
    let _ = stmt.visit(&mut Rewrite { known, mask: false });
    Some(stmt.to_string())
}

/// As [`normalize`], with every literal replaced by `?`.
pub fn mask_values(sql: &str, known: Option<&HashSet<String>>) -> Option<String> {
    let mut stmt = parse_one(&lowercase_words(sql))?;
    let _ = stmt.visit(&mut Rewrite { known, mask: true });
    Some(stmt.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_parse_into_catalogs() {
        let c = catalog_from_context(
            "CREATE TABLE head (age INTEGER); CREATE TABLE department (name VARCHAR, budget VARCHAR)",
        )
        .unwrap();
        assert_eq!(c.tables.len(), 2);
        assert_eq!(c.tables[1].columns[1].name, "budget");
        assert!(catalog_from_context("SELECT 1").is_none());
        assert!(catalog_from_context("CREATE TABLE (").is_none());
    }

    fn known() -> HashSet<String> {
        ["head", "name", "age", "born_state"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spacing_case_and_semicolon() {
        assert_eq!(
            normalize("select  count(*)  from HEAD where Age>56 ;", None).unwrap(),
            "SELECT count(*) FROM head WHERE age > 56"
        );
        assert_eq!(normalize("SELECT name FROM head", None), normalize("select NAME from head;", None));
    }

    #[test]
    fn double_quoted_values_become_strings() {
        let k = known();
        assert_eq!(
            normalize("SELECT name FROM head WHERE born_state = \"California\"", Some(&k)).unwrap(),
            "SELECT name FROM head WHERE born_state = 'California'"
        );
        // a double-quoted real column stays a column
        assert_eq!(normalize("SELECT \"name\" FROM head", Some(&k)).unwrap(), "SELECT \"name\" FROM head");
    }

    #[test]
    fn string_literals_keep_their_case() {
        assert_eq!(
            normalize("SELECT name FROM head WHERE name = 'Bob'", None).unwrap(),
            "SELECT name FROM head WHERE name = 'Bob'"
        );
    }

    #[test]
    fn masking_literals() {
        assert_eq!(
            mask_values("SELECT name FROM head WHERE age > 56 AND name = 'Bob' LIMIT 3", None).unwrap(),
            mask_values("SELECT name FROM head WHERE age > 1 AND name = 'X' LIMIT 1", None).unwrap()
        );
    }

    #[test]
    fn broken_sql_does_not_normalize() {
        assert!(normalize("SELEC name FROM", None).is_none());
        assert!(normalize("SELECT 1; SELECT 2", None).is_none());
    }
}
