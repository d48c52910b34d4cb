//! Numbers kept as text: a column declared `text` (a CSV import, a copy of a SQLite file) that holds numbers, used
//! as one — `function avg(text) does not exist`, `operator does not exist: text > integer`. PostgreSQL does not
//! convert text to a number on its own; the author meant the number. The catalog says which column reference is
//! text: the query with that reference cast is a candidate, checked like any other.
//!
//! - In an ordering comparison or arithmetic, and as an argument of a function that wants a number, the text
//!   column is cast to `numeric`. Two queries are offered: the plain cast (`mpg::numeric`), and one that reads
//!   what does not spell a number (`''`, `'null'`, `'n/a'`) as NULL, as an import would have
//!   (`CASE WHEN mpg ~ '<number>' THEN mpg::numeric END`). Both plan; executing them is what tells them apart (the
//!   plain cast fails on such a value), and where the data are clean they give one result and the plain one, being
//!   first, is the one returned.
//! - In `=` / `<>` with a column of a number type on the other side (a join key kept as text on one side), that
//!   column is cast to `text` instead: it never fails, and equal numbers print alike.
//!
//! Only plain column references are cast (a subquery or expression of text type is left to the model), only the
//! ones the catalog types as text, and only where they meet a number (a numeric literal, or a column the catalog
//! types as a number): another comparison with the same operator (`name > 'M'`) is left as written.

use super::{byte_range, catalog_table, edited, line, parse, Joins};
use crate::sql::gate::norm;
use crate::sql::schema::Catalog;
use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, UnaryOperator, Value, Visit, Visitor,
};
use std::ops::ControlFlow;

/// What spells a number, as PostgreSQL's `numeric` input reads it (spaces around allowed).
const NUMBER: &str = r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$";

/// What the error says has no operator or function for text.
enum Failed {
    /// `operator does not exist: <left type> <op> <right type>`.
    Operator { left: String, op: String, right: String },
    /// `function <name>(<argument types>) does not exist`.
    Function { name: String, args: Vec<String> },
}

fn failed(message: &str) -> Option<Failed> {
    if let Some(rest) = message.strip_prefix("operator does not exist: ") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let at = words.iter().position(|w| w.chars().all(|c| "+-*/<>=~!@#%^&|`?".contains(c)))?;
        let (left, right) = (words[..at].join(" "), words[at + 1..].join(" "));
        if left.is_empty() || right.is_empty() {
            return None;
        }
        return Some(Failed::Operator { left, op: words[at].to_string(), right });
    }
    let rest = message.strip_prefix("function ")?.strip_suffix(" does not exist")?;
    let (name, args) = rest.split_once('(')?;
    let args = args.strip_suffix(')')?.split(',').map(|a| a.trim().to_string()).collect();
    Some(Failed::Function { name: name.trim_matches('"').to_lowercase(), args })
}

/// A number written in the query (`150`, `-2.5`, `(3)`).
fn number_literal(e: &Expr) -> bool {
    match e {
        Expr::Value(v) => matches!(v.value, Value::Number(..)),
        Expr::UnaryOp { op: UnaryOperator::Minus | UnaryOperator::Plus, expr } | Expr::Nested(expr) => {
            number_literal(expr)
        }
        _ => false,
    }
}

fn is_text(data_type: &str) -> bool {
    let t = data_type.to_ascii_lowercase();
    ["text", "character varying", "varchar", "character", "char", "bpchar", "citext", "name"]
        .iter()
        .any(|p| t == *p || t.starts_with(&format!("{p}(")))
}

fn is_number(data_type: &str) -> bool {
    let t = data_type.to_ascii_lowercase();
    ["smallint", "integer", "bigint", "numeric", "real", "double precision", "decimal", "int2", "int4", "int8"]
        .iter()
        .any(|p| t == *p || t.starts_with(&format!("{p}(")))
}

/// The queries with the text column references the error is about cast, as the module says; nothing when the
/// error is another, or no reference the catalog types as text is in such a place.
pub fn cast_text_operands(sql: &str, error: &str, catalog: &Catalog) -> Vec<String> {
    let Some(what) = line(error, "ERROR:").and_then(failed) else { return Vec::new() };
    let Some(stmts) = parse(sql) else { return Vec::new() };
    let mut joins = Joins::default();
    let _ = stmts.visit(&mut joins);
    // A column reference's type, through the relations the query names.
    let type_of = |e: &Expr| -> Option<(Vec<Ident>, String)> {
        let ids = match e {
            Expr::Identifier(id) => vec![id.clone()],
            Expr::CompoundIdentifier(ids) => ids.clone(),
            _ => return None,
        };
        let names: Vec<String> = ids.iter().map(norm).collect();
        let tables = joins.aliases.iter().filter_map(|(alias, name)| Some((alias, catalog_table(catalog, name)?)));
        let mut types = match names.as_slice() {
            [column] => tables
                .filter_map(|(_, t)| t.columns.iter().find(|c| c.name == *column))
                .map(|c| c.data_type.clone())
                .collect::<Vec<_>>(),
            [alias, column] => tables
                .filter(|(a, _)| *a == alias)
                .filter_map(|(_, t)| t.columns.iter().find(|c| c.name == *column))
                .map(|c| c.data_type.clone())
                .collect(),
            _ => return None,
        };
        types.dedup();
        (types.len() == 1).then(|| (ids, types.remove(0)))
    };
    // (reference, cast to): every place the error is about.
    let mut casts: Vec<(Vec<Ident>, &'static str)> = Vec::new();
    let mut visit = |e: &Expr| match (&what, e) {
        (Failed::Operator { left, op, right }, Expr::BinaryOp { left: l, op: o, right: r }) if o.to_string() == *op => {
            let equality = matches!(op.as_str(), "=" | "<>" | "!=");
            for (text_side, text_expr, other_expr) in [(left, l, r), (right, r, l)] {
                if !is_text(text_side) {
                    continue;
                }
                let Some((ids, _)) = type_of(text_expr).filter(|(_, t)| is_text(t)) else { continue };
                // Only where this comparison is the one the error is about: text met a number here. Another
                // comparison with the same operator (`name > 'M'`, two text columns) is left as written.
                match type_of(other_expr) {
                    // A key kept as text on one side: compare the number as text (it never fails).
                    Some((other, t)) if equality && is_number(&t) => casts.push((other, "text")),
                    Some((_, t)) if is_number(&t) => casts.push((ids, "numeric")),
                    None if number_literal(other_expr) => casts.push((ids, "numeric")),
                    _ => {}
                }
            }
        }
        // `c BETWEEN 1 AND 2` and `c IN (1, 2)` fail as `text >= integer` and `text = integer`.
        (Failed::Operator { left, op, right }, Expr::Between { expr, low, high, .. })
            if op == ">=" && is_text(left) && is_number(right) && number_literal(low) && number_literal(high) =>
        {
            casts.extend(type_of(expr).filter(|(_, t)| is_text(t)).map(|(ids, _)| (ids, "numeric")));
        }
        (Failed::Operator { left, op, right }, Expr::InList { expr, list, .. })
            if op == "=" && is_text(left) && is_number(right) && list.iter().all(number_literal) =>
        {
            casts.extend(type_of(expr).filter(|(_, t)| is_text(t)).map(|(ids, _)| (ids, "numeric")));
        }
        (Failed::Function { name, args }, Expr::Function(f))
            if f.name.0.last().and_then(|p| p.as_ident()).is_some_and(|id| norm(id) == *name) =>
        {
            let FunctionArguments::List(list) = &f.args else { return };
            for (arg, declared) in list.args.iter().zip(args) {
                let FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) = arg else { continue };
                if is_text(declared) {
                    if let Some((ids, _)) = type_of(x).filter(|(_, t)| is_text(t)) {
                        casts.push((ids, "numeric"));
                    }
                }
            }
        }
        _ => {}
    };
    let _ = stmts.visit(&mut Exprs(&mut visit));
    if casts.is_empty() {
        return Vec::new();
    }
    let spans: Vec<(usize, usize, &str)> = casts
        .iter()
        .filter_map(|(ids, to)| Some((byte_range(sql, ids.first()?, ids.last()?)?, *to)))
        .map(|((s, e), to)| (s, e, to))
        .collect();
    let plain = edited(sql, spans.iter().map(|&(s, e, to)| (s, e, format!("{}::{to}", &sql[s..e]))).collect());
    let guarded = edited(
        sql,
        spans
            .iter()
            .map(|&(s, e, to)| {
                let c = &sql[s..e];
                let with = match to {
                    "numeric" => format!("CASE WHEN {c} ~ '{NUMBER}' THEN {c}::numeric END"),
                    _ => format!("{c}::{to}"),
                };
                (s, e, with)
            })
            .collect(),
    );
    let mut out: Vec<String> = plain.into_iter().collect();
    out.extend(guarded.filter(|g| !out.contains(g)));
    out
}

/// Calls a closure on every expression of a statement.
struct Exprs<'a, F: FnMut(&Expr)>(&'a mut F);

impl<F: FnMut(&Expr)> Visitor for Exprs<'_, F> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        (self.0)(e);
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::schema::{Column, Table};

    fn catalog() -> Catalog {
        let col = |name: &str, t: &str| Column { name: name.into(), data_type: t.into(), ..Column::default() };
        let table = |name: &str, columns: Vec<Column>| Table {
            schema: "public".into(),
            name: name.into(),
            kind: Default::default(),
            columns,
            primary_key: Vec::new(),
            foreign_keys: Vec::new(),
            comment: None,
        };
        Catalog {
            tables: vec![
                table(
                    "cars_data",
                    vec![col("id", "integer"), col("mpg", "text"), col("horsepower", "text"), col("year", "integer")],
                ),
                table("car_makers", vec![col("id", "integer"), col("country", "text"), col("maker", "text")]),
                table("countries", vec![col("countryid", "integer"), col("countryname", "text")]),
            ],
        }
    }

    fn err(message: &str) -> String {
        format!("ERROR:  {message}\nHINT:  No operator matches the given name and argument types. You might need to add explicit type casts.")
    }

    #[test]
    fn a_text_column_averaged_is_cast_to_numeric() {
        let out = cast_text_operands(
            "SELECT avg(mpg) FROM cars_data WHERE year < 1980",
            &err("function avg(text) does not exist"),
            &catalog(),
        );
        assert_eq!(
            out,
            vec![
                "SELECT avg(mpg::numeric) FROM cars_data WHERE year < 1980".to_string(),
                format!(
                    "SELECT avg(CASE WHEN mpg ~ '{NUMBER}' THEN mpg::numeric END) FROM cars_data WHERE year < 1980"
                ),
            ]
        );
        // Through an alias, and a function spelled in capitals.
        let out = cast_text_operands(
            "SELECT SUM(t.horsepower) FROM cars_data AS t",
            &err("function sum(text) does not exist"),
            &catalog(),
        );
        assert_eq!(out[0], "SELECT SUM(t.horsepower::numeric) FROM cars_data AS t");
        // A quoted name keeps its quotes; text around it (a literal with the same words) is untouched.
        let mut c = catalog();
        c.tables[0].columns.push(Column {
            name: "Top Speed".into(),
            data_type: "character varying(10)".into(),
            ..Column::default()
        });
        let out = cast_text_operands(
            "SELECT avg(\"Top Speed\") FROM cars_data WHERE mpg = 'avg(\"Top Speed\")'",
            &err("function avg(character varying) does not exist"),
            &c,
        );
        assert_eq!(out[0], "SELECT avg(\"Top Speed\"::numeric) FROM cars_data WHERE mpg = 'avg(\"Top Speed\")'");
    }

    #[test]
    fn a_text_column_compared_with_a_number_is_cast_and_only_that_one() {
        let out = cast_text_operands(
            "SELECT count(*) FROM cars_data WHERE horsepower > 150 AND year > 1970",
            &err("operator does not exist: text > integer"),
            &catalog(),
        );
        assert_eq!(out[0], "SELECT count(*) FROM cars_data WHERE horsepower::numeric > 150 AND year > 1970");
        assert_eq!(out.len(), 2);
        // The text on the right.
        let out = cast_text_operands(
            "SELECT count(*) FROM cars_data WHERE 150.5 < horsepower",
            &err("operator does not exist: numeric < text"),
            &catalog(),
        );
        assert_eq!(out[0], "SELECT count(*) FROM cars_data WHERE 150.5 < horsepower::numeric");
    }

    #[test]
    fn a_join_key_kept_as_text_compares_the_number_as_text() {
        let out = cast_text_operands(
            "SELECT t1.countryname FROM countries AS t1 JOIN car_makers AS t2 ON t1.countryid = t2.country",
            &err("operator does not exist: integer = text"),
            &catalog(),
        );
        assert_eq!(
            out,
            vec!["SELECT t1.countryname FROM countries AS t1 JOIN car_makers AS t2 ON t1.countryid::text = t2.country"]
        );
    }

    #[test]
    fn only_the_comparison_that_meets_a_number_is_cast() {
        let c = catalog();
        let e = err("operator does not exist: text > integer");
        let out = cast_text_operands(
            "SELECT count(*) FROM cars_data AS t1 JOIN car_makers AS t2 ON t1.id = t2.id WHERE t1.horsepower > 150 AND t2.maker > 'M' AND t2.maker > t2.country",
            &e,
            &c,
        );
        assert_eq!(
            out[0],
            "SELECT count(*) FROM cars_data AS t1 JOIN car_makers AS t2 ON t1.id = t2.id WHERE t1.horsepower::numeric > 150 AND t2.maker > 'M' AND t2.maker > t2.country"
        );
        let e = err("operator does not exist: integer = text");
        let out = cast_text_operands(
            "SELECT t1.countryname FROM countries AS t1 JOIN car_makers AS t2 ON t1.countryid = t2.country WHERE t2.maker = 'ford'",
            &e,
            &c,
        );
        assert_eq!(
            out,
            vec!["SELECT t1.countryname FROM countries AS t1 JOIN car_makers AS t2 ON t1.countryid::text = t2.country WHERE t2.maker = 'ford'"]
        );
        // BETWEEN and IN over numbers.
        let out = cast_text_operands(
            "SELECT count(*) FROM cars_data WHERE mpg BETWEEN 10 AND -2.5",
            &err("operator does not exist: text >= integer"),
            &c,
        );
        assert_eq!(out[0], "SELECT count(*) FROM cars_data WHERE mpg::numeric BETWEEN 10 AND -2.5");
        let out = cast_text_operands(
            "SELECT count(*) FROM cars_data WHERE mpg IN (18, 20)",
            &err("operator does not exist: text = integer"),
            &c,
        );
        assert_eq!(out[0], "SELECT count(*) FROM cars_data WHERE mpg::numeric IN (18, 20)");
    }

    #[test]
    fn nothing_where_the_catalog_does_not_say_text_or_the_error_is_another() {
        let c = catalog();
        // A subquery of text type is not a column reference.
        assert!(cast_text_operands(
            "SELECT count(*) FROM cars_data WHERE year > (SELECT max(horsepower) FROM cars_data)",
            &err("operator does not exist: integer > text"),
            &c,
        )
        .is_empty());
        // An integer column, a column no table has, an unknown alias.
        assert!(cast_text_operands("SELECT avg(year) FROM cars_data", &err("function avg(text) does not exist"), &c)
            .is_empty());
        assert!(cast_text_operands("SELECT avg(nope) FROM cars_data", &err("function avg(text) does not exist"), &c)
            .is_empty());
        assert!(cast_text_operands("SELECT avg(x.mpg) FROM cars_data", &err("function avg(text) does not exist"), &c)
            .is_empty());
        // Other errors, and text that does not parse.
        assert!(
            cast_text_operands("SELECT avg(mpg) FROM cars_data", &err("column \"mpg\" does not exist"), &c).is_empty()
        );
        assert!(cast_text_operands("SELECT avg(mpg FROM", &err("function avg(text) does not exist"), &c).is_empty());
        assert!(cast_text_operands("SELECT avg(mpg) FROM cars_data", "", &c).is_empty());
    }

    #[test]
    fn messages_are_read_with_types_of_several_words() {
        let Some(Failed::Operator { left, op, right }) =
            failed("operator does not exist: character varying >= double precision")
        else {
            panic!("not read");
        };
        assert_eq!((left.as_str(), op.as_str(), right.as_str()), ("character varying", ">=", "double precision"));
        let Some(Failed::Function { name, args }) = failed("function round(text, integer) does not exist") else {
            panic!("not read");
        };
        assert_eq!((name.as_str(), args), ("round", vec!["text".to_string(), "integer".to_string()]));
        assert!(failed("operator does not exist: - text").is_none());
        assert!(is_text("character varying(40)") && is_text("text") && !is_text("integer"));
        assert!(is_number("numeric(10,2)") && is_number("double precision") && !is_number("text"));
    }
}
