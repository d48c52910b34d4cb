//! PostgreSQL's own fix, applied: when planning fails with a HINT that names what was meant —
//! `column t2.maker does not exist` / `Perhaps you meant to reference the column "t1.maker".`, or
//! `missing FROM-clause entry for table "t3"` / `Perhaps you meant to reference the table alias "t2".` — the query
//! with that change made. A small model asked to repair such a query often writes it again unchanged; the hint is
//! exact, and applying it costs no model call. What comes out is only a candidate: it is checked like any other.
//!
//! Only column references are edited (`t2.maker` → `t1.maker`; `maker` → `t1.maker`; `t3.x` → `t2.x`), in place,
//! so the rest of the text stays as written. Text that does not parse, or an error without such a hint, gives
//! nothing.
//!
//! [`join_by_foreign_key`] does the same for the join key PostgreSQL cannot name: `… JOIN cars_data AS t2 ON
//! t1.makeid = t2.makeid` where `cars_data` has no `makeid` but a foreign key `cars_data.id → car_names.makeid`
//! says which of its columns joins to `t1.makeid` (PostgreSQL's hint, `t1.makeid`, would join t1 to itself), and
//! [`join_missing_table`] for a column of a table the query never joined. [`group_by_ungrouped`] groups by a column
//! selected beside an aggregate (what SQLite allows and PostgreSQL refuses).

use crate::sql::explain::comparison;
use crate::sql::gate::{nesting_depth, norm, MAX_NESTING};
use crate::sql::qualify::byte_offset;
use crate::sql::schema::{quote_ident, Catalog, ForeignKey, Table};
use sqlparser::ast::{BinaryOperator, Expr, Ident, ObjectNamePart, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

mod group_by;
mod missing_join;
pub use group_by::{add_group_column, group_by_ungrouped, ungrouped_column};
pub use missing_join::join_missing_table;

/// The queries PostgreSQL's HINT in `error` (as `describe`d: `ERROR:  …` and `HINT:  …` lines) suggests, one per
/// suggestion (a hint may offer two columns), each differing from `sql`.
pub fn apply_hint(sql: &str, error: &str) -> Vec<String> {
    let (Some(message), Some(hint)) = (line(error, "ERROR:"), line(error, "HINT:")) else {
        return Vec::new();
    };
    let edit = if let Some(missing) = missing_column(message) {
        let Some(after) = hint.strip_prefix("Perhaps you meant to reference the column ") else {
            return Vec::new();
        };
        // Only the same column under another alias: PostgreSQL also suggests names a few letters away (`nope` →
        // `name`), a guess about meaning that is the model's to make (it sees the hint in a repair turn).
        let meant = quoted(after).iter().map(|s| parts(s)).filter(|m| m.last() == missing.last()).collect();
        Edit::Column { missing, meant }
    } else if let Some(table) = message.strip_prefix("missing FROM-clause entry for table ") {
        let Some(after) = hint.strip_prefix("Perhaps you meant to reference the table alias ") else {
            return Vec::new();
        };
        Edit::Qualifier { missing: unquote(table), meant: quoted(after) }
    } else {
        return Vec::new();
    };
    let Some(stmts) = parse(sql) else { return Vec::new() };
    let mut refs = Refs(Vec::new());
    let _ = stmts.visit(&mut refs);
    let mut out: Vec<String> = Vec::new();
    for option in edit.options() {
        let mut changes: Vec<(usize, usize, String)> = Vec::new();
        for r in &refs.0 {
            let names: Vec<String> = r.iter().map(norm).collect();
            let replace = match (&edit, &option) {
                (Edit::Column { missing, .. }, Choice::Column(meant)) if names == *missing => {
                    Some((r.first(), r.last(), meant.iter().map(|p| quote_ident(p)).collect::<Vec<_>>().join(".")))
                }
                (Edit::Qualifier { missing, .. }, Choice::Qualifier(meant))
                    if names.len() == 2 && names[0] == *missing =>
                {
                    Some((r.first(), r.first(), quote_ident(meant)))
                }
                _ => None,
            };
            if let Some((Some(first), Some(last), text)) = replace {
                if let Some((start, end)) = byte_range(sql, first, last) {
                    changes.push((start, end, text));
                }
            }
        }
        let Some(text) = edited(sql, changes) else { continue };
        if !out.contains(&text) && !compares_a_column_with_itself(&text) {
            out.push(text);
        }
    }
    out
}

/// For `column a.x does not exist` where the query joins on `a.x = b.y`: the query with `a.x` written as the
/// column of `a`'s table that a single-column foreign key pairs with `b.y` (either way round), every reference to
/// `a.x` changed alike. Nothing when no such key exists, or `a`/`b` do not name one table of `catalog` each.
pub fn join_by_foreign_key(sql: &str, error: &str, catalog: &Catalog) -> Vec<String> {
    let Some(missing) = line(error, "ERROR:").and_then(missing_column) else { return Vec::new() };
    if missing.len() != 2 {
        return Vec::new();
    }
    let Some(stmts) = parse(sql) else { return Vec::new() };
    let mut joins = Joins::default();
    let _ = stmts.visit(&mut joins);
    let table = |alias: &str| -> Option<&Table> {
        let name = joins.aliases.iter().find(|(a, _)| a == alias).map(|(_, n)| n)?;
        catalog_table(catalog, name)
    };
    let Some(mine) = table(&missing[0]) else { return Vec::new() };
    let mut fixes: Vec<String> = Vec::new();
    for (a, b) in &joins.equal {
        let other = if *a == missing {
            b
        } else if *b == missing {
            a
        } else {
            continue;
        };
        let Some(theirs) = other.first().and_then(|alias| table(alias)).filter(|_| other.len() == 2) else {
            continue;
        };
        let col = &other[1];
        // mine.c → theirs.col, or theirs.col → mine.c.
        let forward = refers(mine, theirs).filter(|fk| fk.ref_columns[0] == *col).map(|fk| fk.columns[0].clone());
        let backward = refers(theirs, mine).filter(|fk| fk.columns[0] == *col).map(|fk| fk.ref_columns[0].clone());
        for c in forward.chain(backward) {
            if c != missing[1] && !fixes.contains(&c) {
                fixes.push(c);
            }
        }
    }
    let mut refs = Refs(Vec::new());
    let _ = stmts.visit(&mut refs);
    let mut out = Vec::new();
    for c in fixes {
        let mut changes: Vec<(usize, usize, String)> = Vec::new();
        for r in refs.0.iter().filter(|r| r.iter().map(norm).collect::<Vec<_>>() == missing) {
            let (Some(first), Some(last)) = (r.first(), r.last()) else { continue };
            if let Some((start, end)) = byte_range(sql, first, last) {
                changes.push((start, end, format!("{}.{}", quote_ident(&missing[0]), quote_ident(&c))));
            }
        }
        if let Some(text) = edited(sql, changes) {
            if !out.contains(&text) && !compares_a_column_with_itself(&text) {
                out.push(text);
            }
        }
    }
    out
}

/// The text after `tag` (`ERROR:`, `HINT:`) on its line of a `describe`d error.
fn line<'a>(error: &'a str, tag: &str) -> Option<&'a str> {
    error.lines().find_map(|l| l.trim_start().strip_prefix(tag)).map(str::trim)
}

/// The reference of `column … does not exist`, split into its parts.
fn missing_column(message: &str) -> Option<Vec<String>> {
    message.strip_prefix("column ")?.strip_suffix(" does not exist").map(parts)
}

/// `sql` parsed, unless it nests deeper than the gate allows or does not parse.
fn parse(sql: &str) -> Option<Vec<Statement>> {
    if nesting_depth(sql) > MAX_NESTING {
        return None;
    }
    Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()
}

/// Where the text from `first` to `last` (identifiers of `sql`) lies, as a byte range.
fn byte_range(sql: &str, first: &Ident, last: &Ident) -> Option<(usize, usize)> {
    let start = byte_offset(sql, first.span.start.line, first.span.start.column)?;
    Some((start, byte_offset(sql, last.span.end.line, last.span.end.column)?))
}

/// A FROM entry naming a table: the name it goes by in the query (its alias, else its own last part) and its
/// name's parts, as PostgreSQL folds them.
fn named_table(f: &TableFactor) -> Option<(String, Vec<String>)> {
    let TableFactor::Table { name, alias, .. } = f else { return None };
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(norm(id)),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let key = alias.as_ref().map(|a| norm(&a.name)).or_else(|| parts.last().cloned())?;
    Some((key, parts))
}

/// The one table of `catalog` a name (`[table]` or `[schema, table]`) names; `None` when none or several do.
fn catalog_table<'c>(catalog: &'c Catalog, name: &[String]) -> Option<&'c Table> {
    let mut found = catalog.tables.iter().filter(|t| match name {
        [n] => t.name == *n,
        [s, n] => t.schema == *s && t.name == *n,
        _ => false,
    });
    let t = found.next()?;
    found.next().is_none().then_some(t)
}

/// `t`'s single-column foreign keys to `to`.
fn refers<'a>(t: &'a Table, to: &'a Table) -> impl Iterator<Item = &'a ForeignKey> {
    t.foreign_keys
        .iter()
        .filter(move |fk| fk.columns.len() == 1 && fk.ref_table == to.name && fk.ref_schema == to.schema)
}

/// `sql` with each `(start, end, text)` change made; `None` when there is none or two overlap.
fn edited(sql: &str, mut changes: Vec<(usize, usize, String)>) -> Option<String> {
    if changes.is_empty() {
        return None;
    }
    changes.sort();
    changes.dedup();
    if changes.windows(2).any(|w| w[0].1 > w[1].0) {
        return None;
    }
    let mut text = String::with_capacity(sql.len() + 8);
    let mut last = 0;
    for (start, end, with) in changes {
        text.push_str(&sql[last..start]);
        text.push_str(&with);
        last = end;
    }
    text.push_str(&sql[last..]);
    (text != sql).then_some(text)
}

/// The relations a query names (alias or own name → name parts, as PostgreSQL folds them) and its equalities
/// between two column references.
#[derive(Default)]
struct Joins {
    aliases: Vec<(String, Vec<String>)>,
    equal: Vec<(Vec<String>, Vec<String>)>,
}

impl Visitor for Joins {
    type Break = ();

    fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
        self.aliases.extend(named_table(f));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::BinaryOp { left, op: BinaryOperator::Eq, right } = e {
            if let (Expr::CompoundIdentifier(l), Expr::CompoundIdentifier(r)) = (left.as_ref(), right.as_ref()) {
                self.equal.push((l.iter().map(norm).collect(), r.iter().map(norm).collect()));
            }
        }
        ControlFlow::Continue(())
    }
}

/// Whether `sql` compares a column reference with itself (`t1.makeid = t1.makeid`): what a hint gives when the
/// column it names exists on one side of a join only — the query would plan, and answer wrongly.
fn compares_a_column_with_itself(sql: &str) -> bool {
    struct SelfCompare(bool);
    impl Visitor for SelfCompare {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::BinaryOp { left, op, right } = e {
                let column = |e: &Expr| match e {
                    Expr::Identifier(id) => Some(vec![norm(id)]),
                    Expr::CompoundIdentifier(ids) => Some(ids.iter().map(norm).collect::<Vec<_>>()),
                    _ => None,
                };
                if comparison(op) && column(left).is_some() && column(left) == column(right) {
                    self.0 = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else { return false };
    let mut v = SelfCompare(false);
    let _ = stmts.visit(&mut v);
    v.0
}

enum Edit {
    /// A column reference (its parts, as PostgreSQL folded them) and the references the hint offers instead.
    Column { missing: Vec<String>, meant: Vec<Vec<String>> },
    /// A qualifier with no FROM entry, and the aliases the hint offers instead.
    Qualifier { missing: String, meant: Vec<String> },
}

enum Choice {
    Column(Vec<String>),
    Qualifier(String),
}

impl Edit {
    fn options(&self) -> Vec<Choice> {
        match self {
            Edit::Column { meant, .. } => meant.iter().cloned().map(Choice::Column).collect(),
            Edit::Qualifier { meant, .. } => meant.iter().cloned().map(Choice::Qualifier).collect(),
        }
    }
}

/// Column references written in the query (one part or several), each as its identifiers.
struct Refs(Vec<Vec<Ident>>);

impl Visitor for Refs {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(id) => self.0.push(vec![id.clone()]),
            Expr::CompoundIdentifier(ids) => self.0.push(ids.clone()),
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The `"…"` strings of a hint (PostgreSQL's quotes; an embedded quote is not doubled there).
fn quoted(hint: &str) -> Vec<String> {
    hint.split('"').skip(1).step_by(2).filter(|s| !s.is_empty()).map(str::to_string).take(2).collect()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s).to_string()
}

/// A reference as PostgreSQL prints it in a message (`t2.maker`, `"maker"`, `t1.maker` inside a hint's quotes),
/// split into its parts. PostgreSQL prints names as stored, so they compare with folded identifiers as they are.
fn parts(s: &str) -> Vec<String> {
    unquote(s).split('.').map(|p| p.trim_matches('"').to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(message: &str, hint: &str) -> String {
        format!("ERROR:  {message}\nHINT:  {hint}")
    }

    #[test]
    fn a_qualified_column_takes_the_alias_postgres_names() {
        let sql = "SELECT T1.FullName, count(*) FROM car_makers AS t1 JOIN model_list AS t2 ON t1.id = t2.maker \
                   GROUP BY t1.id HAVING count(t2.Maker) > 3";
        let e = err("column t2.maker does not exist", "Perhaps you meant to reference the column \"t1.maker\".");
        assert_eq!(
            apply_hint(sql, &e),
            vec![
                "SELECT T1.FullName, count(*) FROM car_makers AS t1 JOIN model_list AS t2 ON t1.id = t1.maker \
                  GROUP BY t1.id HAVING count(t1.maker) > 3"
            ]
        );
    }

    #[test]
    fn an_unqualified_column_and_two_suggestions_give_two_queries() {
        let sql = "SELECT name FROM singer AS s JOIN concert AS c ON s.id = c.singer_id";
        let e = err(
            "column \"name\" does not exist",
            "Perhaps you meant to reference the column \"s.name\" or the column \"c.name\".",
        );
        assert_eq!(
            apply_hint(sql, &e),
            vec![
                "SELECT s.name FROM singer AS s JOIN concert AS c ON s.id = c.singer_id",
                "SELECT c.name FROM singer AS s JOIN concert AS c ON s.id = c.singer_id"
            ]
        );
    }

    #[test]
    fn a_missing_from_entry_takes_the_alias_postgres_names() {
        let sql = "SELECT t3.name FROM singer AS t2\nWHERE t3.age > 30";
        let e =
            err("missing FROM-clause entry for table \"t3\"", "Perhaps you meant to reference the table alias \"t2\".");
        assert_eq!(apply_hint(sql, &e), vec!["SELECT t2.name FROM singer AS t2\nWHERE t2.age > 30"]);
    }

    #[test]
    fn quoted_and_multibyte_text_keeps_its_place() {
        let sql = "SELECT 'ü€', t2.\"Full Name\" FROM a AS t1 JOIN b AS t2 ON true WHERE t2.x = 'é'";
        let e =
            err("column t2.Full Name does not exist", "Perhaps you meant to reference the column \"t1.Full Name\".");
        assert_eq!(
            apply_hint(sql, &e),
            vec!["SELECT 'ü€', t1.\"Full Name\" FROM a AS t1 JOIN b AS t2 ON true WHERE t2.x = 'é'"]
        );
    }

    #[test]
    fn a_hint_that_would_compare_a_column_with_itself_is_not_taken() {
        // car_names AS t1 has makeid, cars_data AS t2 does not: the hint's t1.makeid would join t1 to itself.
        let sql =
            "SELECT t1.model FROM car_names AS t1 JOIN cars_data AS t2 ON t1.makeid = t2.makeid ORDER BY t2.horsepower";
        let e = err("column t2.makeid does not exist", "Perhaps you meant to reference the column \"t1.makeid\".");
        assert!(apply_hint(sql, &e).is_empty());
        assert!(compares_a_column_with_itself("SELECT 1 FROM a WHERE x = X"));
        assert!(!compares_a_column_with_itself("SELECT 1 FROM a AS t1 JOIN b AS t2 ON t1.x = t2.x"));
    }

    /// car_1's shape: cars_data.id → car_names.makeid; car_names.model → model_list.model (in schema car).
    pub(super) fn cars() -> Catalog {
        use crate::sql::schema::{Column, ForeignKey};
        let col = |n: &str| Column { name: n.into(), data_type: "integer".into(), ..Default::default() };
        let fk = |c: &str, t: &str, r: &str| ForeignKey {
            columns: vec![c.into()],
            ref_schema: "car".into(),
            ref_table: t.into(),
            ref_columns: vec![r.into()],
        };
        let table = |name: &str, cols: &[&str], fks: Vec<ForeignKey>| Table {
            schema: "car".into(),
            name: name.into(),
            kind: Default::default(),
            columns: cols.iter().map(|c| col(c)).collect(),
            primary_key: vec![],
            foreign_keys: fks,
            comment: None,
        };
        Catalog {
            tables: vec![
                table("car_names", &["makeid", "model", "make"], vec![fk("model", "model_list", "model")]),
                table("cars_data", &["id", "horsepower", "year"], vec![fk("id", "car_names", "makeid")]),
                table("model_list", &["modelid", "model", "maker"], vec![]),
            ],
        }
    }

    #[test]
    fn a_join_column_the_table_lacks_takes_the_one_its_foreign_key_names() {
        let e = err("column t2.makeid does not exist", "Perhaps you meant to reference the column \"t1.makeid\".");
        // The key's referencing side lacks the column; every reference to it changes alike.
        let sql = "SELECT t1.model, t2.makeid FROM car.car_names AS t1 JOIN cars_data AS t2 ON t1.makeid = t2.makeid \
                   ORDER BY t2.horsepower LIMIT 1";
        assert_eq!(
            join_by_foreign_key(sql, &e, &cars()),
            vec![
                "SELECT t1.model, t2.id FROM car.car_names AS t1 JOIN cars_data AS t2 ON t1.makeid = t2.id \
                   ORDER BY t2.horsepower LIMIT 1"
            ]
        );
        // The referenced side lacks it (the key read the other way round), written on the right of `=`.
        let e = err("column n.id does not exist", "");
        let sql = "SELECT max(d.horsepower) FROM cars_data d JOIN car_names n ON d.id = n.id";
        assert_eq!(
            join_by_foreign_key(sql, &e, &cars()),
            vec!["SELECT max(d.horsepower) FROM cars_data d JOIN car_names n ON d.id = n.makeid"]
        );
        // A table named without an alias is its own qualifier.
        let e = err("column cars_data.makeid does not exist", "");
        let sql = "SELECT count(*) FROM car_names JOIN cars_data ON car_names.makeid = cars_data.makeid";
        assert_eq!(
            join_by_foreign_key(sql, &e, &cars()),
            vec!["SELECT count(*) FROM car_names JOIN cars_data ON car_names.makeid = cars_data.id"]
        );
    }

    #[test]
    fn no_join_key_without_a_foreign_key_between_the_two_tables() {
        let catalog = cars();
        for (sql, e) in [
            // cars_data and model_list have no key between them.
            (
                "SELECT 1 FROM cars_data AS a JOIN model_list AS b ON a.modelid = b.modelid",
                "column a.modelid does not exist",
            ),
            // Not a join equality.
            (
                "SELECT a.makeid FROM cars_data AS a JOIN car_names AS b ON a.id = b.makeid",
                "column a.makeid does not exist",
            ),
            // An unknown table, an unqualified column, another error, text that does not parse.
            ("SELECT 1 FROM nowhere AS a JOIN car_names AS b ON a.makeid = b.makeid", "column a.makeid does not exist"),
            (
                "SELECT 1 FROM cars_data AS a JOIN car_names AS b ON makeid = b.makeid",
                "column \"makeid\" does not exist",
            ),
            (
                "SELECT 1 FROM cars_data AS a JOIN car_names AS b ON a.makeid = b.makeid",
                "relation \"x\" does not exist",
            ),
            ("SELECT FROM WHERE a.makeid = b.makeid", "column a.makeid does not exist"),
        ] {
            assert!(join_by_foreign_key(sql, &format!("ERROR:  {e}"), &catalog).is_empty(), "{sql}");
        }
    }

    #[test]
    fn nothing_without_a_usable_hint() {
        let sql = "SELECT t2.maker FROM a AS t1 JOIN b AS t2 ON true";
        for e in [
            "ERROR:  column t2.maker does not exist".to_string(),
            err("column t2.maker does not exist", "There is a column named \"maker\" in table \"t1\", but it cannot be referenced from this part of the query."),
            err("relation \"b\" does not exist", "Perhaps you meant to reference the column \"t1.maker\"."),
            err("column t9.other does not exist", "Perhaps you meant to reference the column \"t1.other\"."),
            // A name a few letters away is a guess about meaning, not a misplaced column.
            err("column t2.maker does not exist", "Perhaps you meant to reference the column \"t1.make\"."),
            err("column t2.maker does not exist", "Perhaps you meant to reference the column \"t2.maker\"."),
            String::new(),
        ] {
            assert!(apply_hint(sql, &e).is_empty(), "{e}");
        }
        let e = err("column t2.maker does not exist", "Perhaps you meant to reference the column \"t1.maker\".");
        assert!(apply_hint("not sql at all", &e).is_empty());
    }
}
