//! Schema-qualify the table names a model wrote bare.
//!
//! When the context shows tables from schemas outside the caller's search_path (a large schema, where only the
//! tables a question needs are shown), each table whose name is unique among those shown is written bare
//! (`country`, not `world_1.country`; [`crate::sql::schema::RenderOptions::bare_unique`]): small models copy short
//! names far more reliably than qualified ones. [`qualify`] then puts the schema back in front of each such name in
//! the SQL the model wrote, so what is planned, run and returned resolves on any search_path.
//!
//! The text is edited in place — a `schema.` inserted before the name — so everything else stays as the model wrote
//! it. Only relations in FROM/JOIN are touched: one-part names, not the name of a WITH query, that match a table
//! shown bare (unquoted names fold to lower case; quoted ones match exactly). Text that does not parse is returned
//! unchanged (the gate reports it).

use crate::sql::gate::{nesting_depth, norm, MAX_NESTING};
use crate::sql::schema::quote_ident;
use sqlparser::ast::{visit_relations, Ident, ObjectNamePart, Query, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::{BTreeMap, HashSet};
use std::ops::ControlFlow;

/// Bare table names shown to the model, and the schema each belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qualifier {
    /// Table name as stored in the catalog → its schema.
    schemas: BTreeMap<String, String>,
}

impl Qualifier {
    /// From `(schema, table)` pairs; a name given twice (in two schemas) is left out: it was not shown bare.
    pub fn new<'a>(tables: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut schemas = BTreeMap::new();
        let mut twice = HashSet::new();
        for (schema, name) in tables {
            if schemas.insert(name.to_string(), schema.to_string()).is_some() {
                twice.insert(name.to_string());
            }
        }
        schemas.retain(|n, _| !twice.contains(n));
        Qualifier { schemas }
    }

    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty()
    }

    /// The schema of a relation written as `ident`, if it is one of the bare names.
    fn schema_of(&self, ident: &Ident) -> Option<&str> {
        self.schemas.get(&norm(ident)).map(String::as_str)
    }

    /// The same bare names resolved in `schema` instead, for those of them `tables` (`(schema, table)` pairs: what
    /// was shown) has there; `None` when it has none of them, or each is already resolved there. A look-alike
    /// schema shown beside the question's (both have a `singer` table) is reached this way when an answer
    /// qualified with the first does not plan: `singer.age` may exist only in the other's `singer`.
    pub fn in_schema<'a>(&self, schema: &str, tables: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let there: HashSet<&str> = tables.into_iter().filter(|(s, _)| *s == schema).map(|(_, t)| t).collect();
        let mut moved = false;
        let mut schemas = self.schemas.clone();
        for (name, s) in schemas.iter_mut() {
            if s != schema && there.contains(name.as_str()) {
                *s = schema.to_string();
                moved = true;
            }
        }
        moved.then_some(Qualifier { schemas })
    }

    /// `sql` with each bare name of a shown table qualified by its schema; unchanged when nothing is to be done or
    /// the text does not parse.
    pub fn qualify(&self, sql: &str) -> String {
        if self.is_empty() || nesting_depth(sql) > MAX_NESTING {
            return sql.to_string();
        }
        let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
            return sql.to_string();
        };
        let mut ctes = Ctes::default();
        let _ = stmts.visit(&mut ctes);
        let mut at: Vec<(usize, &str)> = Vec::new();
        let _ = visit_relations(&stmts, |name| {
            if let [ObjectNamePart::Identifier(id)] = name.0.as_slice() {
                let cte = ctes.0.contains(&norm(id));
                if let (false, Some(schema)) = (cte, self.schema_of(id)) {
                    if let Some(offset) = byte_offset(sql, id.span.start.line, id.span.start.column) {
                        at.push((offset, schema));
                    }
                }
            }
            ControlFlow::<()>::Continue(())
        });
        at.sort_unstable();
        at.dedup();
        let mut out = String::with_capacity(sql.len() + 16 * at.len());
        let mut last = 0;
        for (offset, schema) in at {
            out.push_str(&sql[last..offset]);
            out.push_str(&quote_ident(schema));
            out.push('.');
            last = offset;
        }
        out.push_str(&sql[last..]);
        out
    }
}

/// Names of WITH queries anywhere in the statement (as PostgreSQL matches them).
#[derive(Default)]
struct Ctes(HashSet<String>);

impl Visitor for Ctes {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for c in &with.cte_tables {
                self.0.insert(norm(&c.alias.name));
            }
        }
        ControlFlow::Continue(())
    }
}

/// The byte offset of a 1-based line and character column (sqlparser's spans), if it lies within `text`.
pub(crate) fn byte_offset(text: &str, line: u64, column: u64) -> Option<usize> {
    if line == 0 || column == 0 {
        return None;
    }
    let mut start = 0;
    for _ in 1..line {
        start += text[start..].find('\n')? + 1;
    }
    let rest = &text[start..];
    let (i, _) = rest.char_indices().chain(std::iter::once((rest.len(), ' '))).nth(column as usize - 1)?;
    Some(start + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Qualifier {
        Qualifier::new([
            ("world_1", "country"),
            ("world_1", "countrylanguage"),
            ("car_1", "Cars"),
            ("a", "x"),
            ("b", "x"),
        ])
    }

    #[test]
    fn bare_names_can_be_resolved_in_a_look_alike_schema() {
        let q = Qualifier::new([("singer", "singer"), ("singer", "song"), ("world_1", "city")]);
        let shown =
            [("concert_singer", "singer"), ("concert_singer", "concert"), ("singer", "singer"), ("singer", "song")];
        let alt = q.in_schema("concert_singer", shown).expect("concert_singer has a singer table");
        // `singer` moves, `song` (not in concert_singer) and `city` stay where they were.
        assert_eq!(
            alt.qualify("SELECT s.name FROM singer AS s JOIN song USING (singer_id) JOIN city ON true"),
            "SELECT s.name FROM concert_singer.singer AS s JOIN singer.song USING (singer_id) JOIN world_1.city ON true"
        );
        // Nothing to move: no alternative.
        assert_eq!(q.in_schema("singer", shown), None);
        assert_eq!(q.in_schema("nowhere", shown), None);
    }

    #[test]
    fn bare_names_get_their_schema_and_nothing_else_changes() {
        let sql = "SELECT count(*) FROM country AS t1\n  JOIN countrylanguage t2 ON t1.code = t2.countrycode\nWHERE t2.language = 'country'";
        assert_eq!(
            q().qualify(sql),
            "SELECT count(*) FROM world_1.country AS t1\n  JOIN world_1.countrylanguage t2 ON t1.code = t2.countrycode\nWHERE t2.language = 'country'"
        );
    }

    #[test]
    fn subqueries_set_operations_and_case_are_followed() {
        assert_eq!(
            q().qualify("select Name from COUNTRY where code not in (select countrycode from countrylanguage) union select name from country"),
            "select Name from world_1.COUNTRY where code not in (select countrycode from world_1.countrylanguage) union select name from world_1.country"
        );
    }

    #[test]
    fn qualified_quoted_cte_and_ambiguous_names_are_left_alone() {
        let q = q();
        for sql in [
            "SELECT * FROM world_1.country",
            "SELECT * FROM other.country",
            "WITH country AS (SELECT 1 AS code) SELECT code FROM country",
            "SELECT * FROM x",
            "SELECT * FROM \"Country\"",
            "SELECT * FROM cars",
            "SELECT country FROM unknown_table",
            "SELECT 1",
            "this is not sql FROM country",
        ] {
            assert_eq!(q.qualify(sql), sql, "{sql}");
        }
        // A quoted name matches exactly; an unquoted one folds to lower case.
        assert_eq!(q.qualify("SELECT * FROM \"Cars\""), "SELECT * FROM car_1.\"Cars\"");
        assert_eq!(q.qualify("SELECT * FROM \"country\""), "SELECT * FROM world_1.\"country\"");
    }

    #[test]
    fn offsets_count_characters_not_bytes() {
        let sql = "SELECT 'é€' AS ü, name FROM country WHERE name = 'Curaçao'";
        assert_eq!(q().qualify(sql), "SELECT 'é€' AS ü, name FROM world_1.country WHERE name = 'Curaçao'");
    }

    #[test]
    fn schema_names_are_quoted_when_they_need_it() {
        let q = Qualifier::new([("Sales Data", "orders")]);
        assert_eq!(q.qualify("SELECT * FROM orders"), "SELECT * FROM \"Sales Data\".orders");
        assert!(Qualifier::default().is_empty());
        assert_eq!(Qualifier::default().qualify("SELECT * FROM orders"), "SELECT * FROM orders");
    }

    #[test]
    fn qualifying_twice_changes_nothing_more() {
        let once = q().qualify("SELECT * FROM country JOIN countrylanguage ON code = countrycode");
        assert_eq!(q().qualify(&once), once);
    }
}
