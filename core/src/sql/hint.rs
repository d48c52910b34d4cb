//! PostgreSQL's own fix, applied: when planning fails with a HINT that names what was meant —
//! `column t2.maker does not exist` / `Perhaps you meant to reference the column "t1.maker".`, or
//! `missing FROM-clause entry for table "t3"` / `Perhaps you meant to reference the table alias "t2".` — the query
//! with that change made. A small model asked to repair such a query often writes it again unchanged; the hint is
//! exact, and applying it costs no model call. What comes out is only a candidate: it is checked like any other.
//!
//! Only column references are edited (`t2.maker` → `t1.maker`; `maker` → `t1.maker`; `t3.x` → `t2.x`), in place,
//! so the rest of the text stays as written. Text that does not parse, or an error without such a hint, gives
//! nothing.

use crate::sql::explain::comparison;
use crate::sql::gate::{nesting_depth, norm, MAX_NESTING};
use crate::sql::qualify::byte_offset;
use crate::sql::schema::quote_ident;
use sqlparser::ast::{Expr, Ident, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// The queries PostgreSQL's HINT in `error` (as `describe`d: `ERROR:  …` and `HINT:  …` lines) suggests, one per
/// suggestion (a hint may offer two columns), each differing from `sql`.
pub fn apply_hint(sql: &str, error: &str) -> Vec<String> {
    let line = |tag: &str| error.lines().find_map(|l| l.trim_start().strip_prefix(tag)).map(str::trim);
    let (Some(message), Some(hint)) = (line("ERROR:"), line("HINT:")) else {
        return Vec::new();
    };
    let edit = if let Some(missing) = message.strip_prefix("column ").and_then(|m| m.strip_suffix(" does not exist")) {
        let Some(after) = hint.strip_prefix("Perhaps you meant to reference the column ") else {
            return Vec::new();
        };
        // Only the same column under another alias: PostgreSQL also suggests names a few letters away (`nope` →
        // `name`), a guess about meaning that is the model's to make (it sees the hint in a repair turn).
        let missing = parts(missing);
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
    if nesting_depth(sql) > MAX_NESTING {
        return Vec::new();
    }
    let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return Vec::new();
    };
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
                let start = byte_offset(sql, first.span.start.line, first.span.start.column);
                let end = byte_offset(sql, last.span.end.line, last.span.end.column);
                if let (Some(start), Some(end)) = (start, end) {
                    changes.push((start, end, text));
                }
            }
        }
        if changes.is_empty() {
            continue;
        }
        changes.sort();
        changes.dedup();
        if changes.windows(2).any(|w| w[0].1 > w[1].0) {
            continue;
        }
        let mut text = String::with_capacity(sql.len() + 8);
        let mut last = 0;
        for (start, end, with) in changes {
            text.push_str(&sql[last..start]);
            text.push_str(&with);
            last = end;
        }
        text.push_str(&sql[last..]);
        if text != sql && !out.contains(&text) && !compares_a_column_with_itself(&text) {
            out.push(text);
        }
    }
    out
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
