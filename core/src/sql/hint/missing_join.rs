//! A column read from a table the query never joined: `SELECT model FROM car_names ORDER BY mpg` where only
//! `cars_data` has `mpg`, or `… FROM car_names AS t1 WHERE t2.weight < 3000` with no `t2` at all. PostgreSQL has no
//! hint for these (no table of the FROM clause has the column), and a small model asked to repair them often writes
//! them again. The catalog knows which table has the column and which foreign key joins it to one the query reads:
//! the query with that join added is a candidate, checked like any other.
//!
//! Only one foreign-key step is taken (a single-column key, either way round), only in the SELECT that reads the
//! column itself (not one that merely contains it in a subquery), and the join is added right after the FROM item it
//! joins to, so the rest of the text stays as written. Where several tables or keys would do, each gives a query
//! (at most [`MAX_OPTIONS`]); where none does, nothing.

use super::{
    byte_range, catalog_table, compares_a_column_with_itself, edited, line, missing_column, named_table, parse, refers,
    unquote, Refs,
};
use crate::sql::gate::norm;
use crate::sql::qualify::byte_offset;
use crate::sql::schema::{quote_ident, Catalog, Table};
use sqlparser::ast::{Ident, OrderBy, Query, Select, SetExpr, Spanned, Visit, Visitor};
use std::ops::ControlFlow;

/// The most queries one failure gives (one per table and key that would do).
pub const MAX_OPTIONS: usize = 3;

/// What the error says is missing.
enum Missing {
    /// `column "x" does not exist` (`qualifier` None) or `column t1.x does not exist` where `t1`'s table lacks `x`.
    Column { qualifier: Option<String>, name: String },
    /// `missing FROM-clause entry for table "t2"`: every `t2.…` the SELECT reads.
    Alias(String),
}

/// For a column no table of its SELECT's FROM clause has (or an alias no FROM item gives), the query with a join to
/// the table that has it, along a single-column foreign key from or to a table the SELECT already reads.
pub fn join_missing_table(sql: &str, error: &str, catalog: &Catalog) -> Vec<String> {
    let Some(message) = line(error, "ERROR:") else { return Vec::new() };
    let missing = if let Some(c) = missing_column(message) {
        match c.as_slice() {
            [name] => Missing::Column { qualifier: None, name: name.clone() },
            [q, name] => Missing::Column { qualifier: Some(q.clone()), name: name.clone() },
            _ => return Vec::new(),
        }
    } else if let Some(t) = message.strip_prefix("missing FROM-clause entry for table ") {
        Missing::Alias(unquote(t))
    } else {
        return Vec::new();
    };
    let Some(stmts) = parse(sql) else { return Vec::new() };
    let mut scopes = Scopes(Vec::new());
    let _ = stmts.visit(&mut scopes);
    let mut out: Vec<String> = Vec::new();
    for scope in &scopes.0 {
        for text in scope.joins(sql, &missing, catalog) {
            if out.len() < MAX_OPTIONS && !out.contains(&text) && !compares_a_column_with_itself(&text) {
                out.push(text);
            }
        }
    }
    out
}

/// One SELECT: its FROM items and the column references it reads itself (its query's ORDER BY included, its
/// subqueries' not).
struct Scope {
    /// (qualifier, the table's name as written, index of the FROM item holding it).
    from: Vec<(String, Vec<String>, usize)>,
    /// Where each FROM item (a table and its joins) starts and ends, as (line, column) pairs.
    spans: Vec<((u64, u64), (u64, u64))>,
    refs: Vec<Vec<Ident>>,
}

impl Scope {
    fn new(select: &Select, order_by: Option<&OrderBy>) -> Scope {
        let mut from = Vec::new();
        let mut spans = Vec::new();
        for (i, item) in select.from.iter().enumerate() {
            for factor in std::iter::once(&item.relation).chain(item.joins.iter().map(|j| &j.relation)) {
                from.extend(named_table(factor).map(|(key, parts)| (key, parts, i)));
            }
            let span = item.span();
            spans.push(((span.start.line, span.start.column), (span.end.line, span.end.column)));
        }
        let mut all = Direct { refs: Vec::new(), nested: Vec::new() };
        let _ = select.visit(&mut all);
        if let Some(o) = order_by {
            let _ = o.visit(&mut all);
        }
        let nested: Vec<_> = all.nested.iter().map(|r| r.span).collect();
        let refs = all.refs.into_iter().filter(|r| r.first().is_some_and(|id| !nested.contains(&id.span))).collect();
        Scope { from, spans, refs }
    }

    /// This SELECT with each join that would give it what `missing` names.
    fn joins(&self, sql: &str, missing: &Missing, catalog: &Catalog) -> Vec<String> {
        let read: Vec<Vec<String>> = self.refs.iter().map(|r| r.iter().map(norm).collect()).collect();
        let mut tables = Vec::new();
        for (_, name, _) in &self.from {
            let Some(t) = catalog_table(catalog, name) else { return Vec::new() };
            tables.push(t);
        }
        let has = |t: &Table, c: &str| t.columns.iter().any(|col| col.name == c);
        // The columns the new table must have, the alias it takes, and the references renamed to it.
        let (needed, alias, rename): (Vec<String>, Option<String>, Option<(String, String)>) = match missing {
            Missing::Column { qualifier: None, name } => {
                if !read.iter().any(|r| r == std::slice::from_ref(name)) || tables.iter().any(|t| has(t, name)) {
                    return Vec::new();
                }
                (vec![name.clone()], None, None)
            }
            Missing::Column { qualifier: Some(q), name } => {
                // When a FROM table has the column, PostgreSQL's own hint names it: not a missing join.
                if !self.from.iter().any(|(a, _, _)| a == q)
                    || !read.iter().any(|r| r.len() == 2 && r[0] == *q && r[1] == *name)
                    || tables.iter().any(|t| has(t, name))
                {
                    return Vec::new();
                }
                (vec![name.clone()], None, Some((q.clone(), name.clone())))
            }
            Missing::Alias(a) => {
                if self.from.iter().any(|(k, _, _)| k == a) {
                    return Vec::new();
                }
                let mut cols: Vec<String> =
                    read.iter().filter(|r| r.len() == 2 && r[0] == *a).map(|r| r[1].clone()).collect();
                cols.sort();
                cols.dedup();
                if cols.is_empty() {
                    return Vec::new();
                }
                (cols, Some(a.clone()), None)
            }
        };
        let mut out = Vec::new();
        for target in &catalog.tables {
            if tables.iter().any(|t| std::ptr::eq(*t, target)) || !needed.iter().all(|c| has(target, c)) {
                continue;
            }
            for (j, (key, name, item)) in self.from.iter().enumerate() {
                let theirs = tables[j];
                // target.c → theirs.d, or theirs.d → target.c: (target's column, theirs).
                let forward = refers(target, theirs).map(|fk| (fk.columns[0].clone(), fk.ref_columns[0].clone()));
                let backward = refers(theirs, target).map(|fk| (fk.ref_columns[0].clone(), fk.columns[0].clone()));
                for (mine, other) in forward.chain(backward) {
                    let new_alias = alias.clone().unwrap_or_else(|| self.fresh_alias(&target.name));
                    // Written as the table it joins to is: schema-qualified when that one is, or when it lives in
                    // another schema.
                    let written = if name.len() == 2 || target.schema != theirs.schema {
                        format!("{}.{}", quote_ident(&target.schema), quote_ident(&target.name))
                    } else {
                        quote_ident(&target.name)
                    };
                    let a = quote_ident(&new_alias);
                    // `AS` only where the name would not serve as its own qualifier.
                    let named = if written == a { written.clone() } else { format!("{written} AS {a}") };
                    let join = format!(
                        " JOIN {named} ON {a}.{} = {}.{}",
                        quote_ident(&mine),
                        quote_ident(key),
                        quote_ident(&other)
                    );
                    let ((l0, c0), (l1, c1)) = self.spans[*item];
                    let (Some(start), Some(end)) = (byte_offset(sql, l0, c0), byte_offset(sql, l1, c1)) else {
                        continue;
                    };
                    let at = past_closing_parens(sql, start, end);
                    let mut changes = vec![(at, at, join)];
                    if let Some((q, c)) = &rename {
                        for r in self.refs.iter().filter(|r| r.len() == 2 && norm(&r[0]) == *q && norm(&r[1]) == *c) {
                            if let Some((s, e)) = byte_range(sql, &r[0], &r[0]) {
                                changes.push((s, e, a.clone()));
                            }
                        }
                    }
                    // A span that ended early would put the join inside an expression: keep only text that parses.
                    if let Some(text) = edited(sql, changes).filter(|t| parse(t).is_some()) {
                        out.push(text);
                    }
                }
            }
        }
        out
    }

    /// The table's own name when no FROM entry of this SELECT goes by it, else the name with a number.
    fn fresh_alias(&self, table: &str) -> String {
        let taken = |a: &str| self.from.iter().any(|(k, _, _)| k == a);
        if !taken(table) {
            return table.to_string();
        }
        (2..).map(|n| format!("{table}_{n}")).find(|a| !taken(a)).unwrap_or_default()
    }
}

/// `end` moved past the `)`s that close what opened in `sql[start..end]`: sqlparser's spans of `USING (a)` and
/// `ON (a = b)` end at the last name inside. Quoted text is skipped when counting.
fn past_closing_parens(sql: &str, start: usize, end: usize) -> usize {
    let mut open = 0usize;
    let mut quote: Option<char> = None;
    for c in sql[start..end].chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => open += 1,
            (None, ')') => open = open.saturating_sub(1),
            _ => {}
        }
    }
    let mut at = end;
    while open > 0 {
        let rest = &sql[at..];
        let skipped = rest.len() - rest.trim_start().len();
        if rest[skipped..].starts_with(')') {
            at += skipped + 1;
            open -= 1;
        } else {
            break;
        }
    }
    at
}

/// Every SELECT of a statement, nested ones included, each with its query's ORDER BY when it is that query's body.
struct Scopes(Vec<Scope>);

impl Visitor for Scopes {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        fn selects<'a>(body: &'a SetExpr, out: &mut Vec<&'a Select>) {
            match body {
                SetExpr::Select(s) => out.push(s),
                SetExpr::SetOperation { left, right, .. } => {
                    selects(left, out);
                    selects(right, out);
                }
                _ => {} // a parenthesized query is visited as a query of its own
            }
        }
        let mut found = Vec::new();
        selects(&q.body, &mut found);
        let order_by = matches!(*q.body, SetExpr::Select(_)).then_some(q.order_by.as_ref()).flatten();
        for s in found {
            self.0.push(Scope::new(s, order_by));
        }
        ControlFlow::Continue(())
    }
}

/// References under a node, and those inside its subqueries (whose first identifiers' spans mark them).
struct Direct {
    refs: Vec<Vec<Ident>>,
    nested: Vec<Ident>,
}

impl Visitor for Direct {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        let mut inner = Refs(Vec::new());
        let _ = q.visit(&mut inner);
        self.nested.extend(inner.0.into_iter().filter_map(|r| r.into_iter().next()));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &sqlparser::ast::Expr) -> ControlFlow<()> {
        let mut one = Refs(Vec::new());
        let _ = one.pre_visit_expr(e);
        self.refs.append(&mut one.0);
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cars;
    use super::*;

    fn missing(sql: &str, e: &str) -> Vec<String> {
        join_missing_table(sql, &format!("ERROR:  {e}"), &cars())
    }

    #[test]
    fn an_unqualified_column_of_an_unjoined_table_joins_it_by_its_key() {
        // cars_data.id → car_names.makeid: the key read from the referencing side.
        assert_eq!(
            missing(
                "SELECT model FROM car_names ORDER BY horsepower DESC LIMIT 1",
                "column \"horsepower\" does not exist"
            ),
            vec![
                "SELECT model FROM car_names JOIN cars_data ON cars_data.id = car_names.makeid \
                 ORDER BY horsepower DESC LIMIT 1"
            ]
        );
        // The other way round (car_names.model → model_list.model), after an alias, in the outer SELECT only: the
        // subquery reads its own table.
        assert_eq!(
            missing(
                "SELECT n.make FROM car_names n WHERE maker = 3 AND n.makeid IN (SELECT id FROM cars_data)",
                "column \"maker\" does not exist"
            ),
            vec![
                "SELECT n.make FROM car_names n JOIN model_list ON model_list.model = n.model \
                 WHERE maker = 3 AND n.makeid IN (SELECT id FROM cars_data)"
            ]
        );
    }

    #[test]
    fn an_alias_no_from_item_gives_becomes_the_joined_table() {
        assert_eq!(
            missing(
                "SELECT T1.model FROM car.car_names AS T1 WHERE T2.horsepower > 100 AND T2.year = 1980",
                "missing FROM-clause entry for table \"t2\""
            ),
            vec![
                "SELECT T1.model FROM car.car_names AS T1 JOIN car.cars_data AS t2 ON t2.id = t1.makeid \
                 WHERE T2.horsepower > 100 AND T2.year = 1980"
            ]
        );
        // In a subquery: the join goes into the SELECT that reads the alias.
        assert_eq!(
            missing(
                "SELECT make FROM car_names WHERE makeid IN (SELECT c.makeid FROM car_names AS c WHERE d.year > 1980)",
                "missing FROM-clause entry for table \"d\""
            ),
            vec![
                "SELECT make FROM car_names WHERE makeid IN (SELECT c.makeid FROM car_names AS c JOIN cars_data AS d \
                 ON d.id = c.makeid WHERE d.year > 1980)"
            ]
        );
    }

    #[test]
    fn the_join_goes_after_a_using_or_parenthesized_condition() {
        assert_eq!(
            missing(
                "SELECT make FROM car_names JOIN model_list USING (model) WHERE (year > 1980)",
                "column \"year\" does not exist"
            ),
            vec![
                "SELECT make FROM car_names JOIN model_list USING (model) JOIN cars_data ON cars_data.id = \
                  car_names.makeid WHERE (year > 1980)"
            ]
        );
        assert_eq!(
            missing(
                "SELECT n.make FROM car_names AS n JOIN model_list AS l ON (n.model = l.model) WHERE d.year = 1",
                "missing FROM-clause entry for table \"d\""
            ),
            vec![
                "SELECT n.make FROM car_names AS n JOIN model_list AS l ON (n.model = l.model) JOIN cars_data AS d \
                  ON d.id = n.makeid WHERE d.year = 1"
            ]
        );
    }

    #[test]
    fn a_column_qualified_by_the_wrong_table_moves_to_the_joined_one() {
        assert_eq!(
            missing("SELECT t1.model FROM car_names AS t1 WHERE t1.year > 1980", "column t1.year does not exist"),
            vec![
                "SELECT t1.model FROM car_names AS t1 JOIN cars_data ON cars_data.id = t1.makeid \
                  WHERE cars_data.year > 1980"
            ]
        );
    }

    #[test]
    fn nothing_when_no_key_or_no_table_would_do() {
        for (sql, e) in [
            // No table has the column.
            ("SELECT model FROM car_names ORDER BY weight", "column \"weight\" does not exist"),
            // model_list and cars_data share no key.
            ("SELECT model FROM model_list ORDER BY horsepower", "column \"horsepower\" does not exist"),
            // The FROM already has a table with the column (an ambiguity or a scope error, not a missing join).
            ("SELECT horsepower FROM cars_data ORDER BY horsepower", "column \"horsepower\" does not exist"),
            // The SELECT that fails does not read the column itself.
            // (car_names → model_list has a key, cars_data → model_list none).
            (
                "SELECT model FROM car_names WHERE makeid IN (SELECT id FROM cars_data WHERE maker = 1)",
                "column \"maker\" does not exist",
            ),
            // An alias whose columns no single table has.
            (
                "SELECT 1 FROM car_names AS a WHERE b.horsepower = 1 AND b.maker = 2",
                "missing FROM-clause entry for table \"b\"",
            ),
            // An unknown FROM table, another error, text that does not parse.
            ("SELECT model FROM nowhere ORDER BY horsepower", "column \"horsepower\" does not exist"),
            ("SELECT model FROM car_names ORDER BY horsepower", "relation \"x\" does not exist"),
            ("SELECT FROM ORDER BY horsepower", "column \"horsepower\" does not exist"),
        ] {
            assert!(missing(sql, e).is_empty(), "{sql}");
        }
    }
}
