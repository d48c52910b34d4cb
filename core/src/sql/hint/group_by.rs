//! A column selected that is neither grouped nor aggregated: `column "t1.name" must appear in the GROUP BY clause
//! or be used in an aggregate function` (42803). SQLite and MySQL take such a column from some row of the group;
//! PostgreSQL refuses the query. Nearly always the column depends on the grouped key (a name beside the id it is
//! grouped by), and the query the author meant groups by it too: the query with the column added to a GROUP BY
//! list is a candidate, one per list the query has (a subquery's or the outer one), each checked like any other —
//! adding it to the wrong list does not plan. A query with no GROUP BY that aggregates only in ORDER BY or HAVING
//! (`SELECT document_id FROM documents ORDER BY count(*) LIMIT 1`) meant to group by what it selects: with one
//! SELECT and no function in its select list, `GROUP BY <column>` is put before that clause. An aggregate in the
//! select list without a GROUP BY (`SELECT min(v), code FROM t`) asks for something else (the row holding the
//! minimum); nothing is offered there.
//!
//! The text is edited in place (the rest stays as written); string literals and quoted names are skipped over.
//! `copilot-trainer data for-postgres` uses the same rewrite on training rows, keeping it only where it gives
//! SQLite's result.

use super::line;
use crate::sql::schema::quote_ident;

/// The column PostgreSQL names in a 42803 message (`column "t1.name" must appear in the GROUP BY clause …`),
/// written back as SQL (each part quoted where PostgreSQL needs it).
pub fn ungrouped_column(message: &str) -> Option<String> {
    let rest = message.strip_prefix("column \"")?;
    let (name, tail) = rest.split_once('"')?;
    if !tail.starts_with(" must appear in the GROUP BY clause") || name.is_empty() {
        return None;
    }
    Some(name.split('.').map(quote_ident).collect::<Vec<_>>().join("."))
}

/// For a 42803 failure (`error` as the pipeline describes it: an `ERROR:` line), the query with the column added
/// to each of its GROUP BY lists in turn — or, where it has none, grouped by the column as the module explains.
pub fn group_by_ungrouped(sql: &str, error: &str) -> Vec<String> {
    let Some(column) = line(error, "ERROR:").and_then(ungrouped_column) else { return Vec::new() };
    let mut out: Vec<String> = (0..).map_while(|nth| add_group_column(sql, &column, nth)).collect();
    if out.is_empty() {
        out.extend(group_where_none(sql, &column));
    }
    out
}

/// `sql` with `column` appended to its `nth` GROUP BY list (counted from 0 in text order), or `None` when there
/// is no such list. The list ends where its own nesting level ends or a clause that follows GROUP BY begins;
/// string literals and quoted names are skipped over, and any whitespace separates words.
pub fn add_group_column(sql: &str, column: &str, nth: usize) -> Option<String> {
    let flat = flat_upper(sql);
    let open = unquoted(sql);
    let start = keyword_at(&flat, &open, "GROUP BY ").nth(nth)? + "GROUP BY ".len();
    let ends = [" HAVING ", " ORDER BY ", " LIMIT ", " UNION ", " INTERSECT ", " EXCEPT ", " WINDOW ", " OFFSET "];
    let mut depth = 0i32;
    let mut i = start;
    while i < sql.len() {
        if open[i] {
            match sql.as_bytes()[i] {
                b'(' => depth += 1,
                b')' if depth == 0 => break,
                b')' => depth -= 1,
                b';' if depth == 0 => break,
                _ if depth == 0 && ends.iter().any(|e| flat.as_bytes()[i..].starts_with(e.as_bytes())) => break,
                _ => {}
            }
        }
        i += 1;
    }
    let list_end = sql[..i].trim_end().len();
    Some(format!("{}, {column}{}", &sql[..list_end], &sql[list_end..]))
}

/// `GROUP BY column` put before the ORDER BY or HAVING of a query with one SELECT, no GROUP BY and no function in
/// its select list; `None` otherwise.
fn group_where_none(sql: &str, column: &str) -> Option<String> {
    let flat = flat_upper(sql);
    let open = unquoted(sql);
    if keyword_at(&flat, &open, "SELECT ").count() != 1 || keyword_at(&flat, &open, "GROUP BY ").next().is_some() {
        return None;
    }
    let from = keyword_at(&flat, &open, "FROM ").next()?;
    if sql[..from].contains('(') {
        return None;
    }
    let at = keyword_at(&flat, &open, "HAVING ").chain(keyword_at(&flat, &open, "ORDER BY ")).min()?;
    Some(format!("{}GROUP BY {column} {}", &sql[..at], &sql[at..]))
}

/// `sql` with ASCII letters upper-cased and ASCII whitespace as spaces: every character keeps its bytes, so
/// positions are the same as in `sql`, and a clause's words have one spelling.
fn flat_upper(sql: &str) -> String {
    sql.chars().map(|c| if c.is_ascii_whitespace() { ' ' } else { c.to_ascii_uppercase() }).collect()
}

/// Where `keyword` (upper case, ending in a space) begins in `flat` outside quotes, as a whole word.
fn keyword_at<'a>(flat: &'a str, open: &'a [bool], keyword: &'a str) -> impl Iterator<Item = usize> + 'a {
    flat.match_indices(keyword)
        .map(|(i, _)| i)
        .filter(move |&i| open[i] && (i == 0 || matches!(flat.as_bytes()[i - 1], b' ' | b'(' | b')')))
}

/// Per byte of `sql`: whether it lies outside string literals, quoted names and comments (the quotes and comment
/// marks themselves are inside).
fn unquoted(sql: &str) -> Vec<bool> {
    let b = sql.as_bytes();
    let mut open = vec![true; b.len()];
    let mut i = 0;
    while i < b.len() {
        let end = match (b[i], b.get(i + 1)) {
            (q @ (b'\'' | b'"'), _) => b[i + 1..].iter().position(|&c| c == q).map_or(b.len(), |p| i + 1 + p + 1),
            (b'-', Some(b'-')) => b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p),
            (b'/', Some(b'*')) => b[i + 2..].windows(2).position(|w| w == b"*/").map_or(b.len(), |p| i + 2 + p + 2),
            _ => {
                i += 1;
                continue;
            }
        };
        open[i..end].iter_mut().for_each(|o| *o = false);
        i = end;
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(message: &str) -> String {
        format!("ERROR:  {message}")
    }

    #[test]
    fn the_ungrouped_column_is_read_from_postgresql_s_message() {
        let m = "column \"t1.name\" must appear in the GROUP BY clause or be used in an aggregate function";
        assert_eq!(ungrouped_column(m).as_deref(), Some("t1.name"));
        let m = "column \"t1.Song Name\" must appear in the GROUP BY clause or be used in an aggregate function";
        assert_eq!(ungrouped_column(m).as_deref(), Some("t1.\"Song Name\""));
        assert_eq!(ungrouped_column("column \"x\" does not exist"), None);
        assert_eq!(ungrouped_column("aggregate functions are not allowed in WHERE"), None);
    }

    #[test]
    fn a_column_joins_the_right_group_by_list() {
        let sql = "SELECT t1.name, count(*) FROM a AS t1 JOIN b AS t2 ON t1.id = t2.a GROUP BY t1.id ORDER BY count(*) DESC LIMIT 1";
        assert_eq!(
            add_group_column(sql, "t1.name", 0).unwrap(),
            "SELECT t1.name, count(*) FROM a AS t1 JOIN b AS t2 ON t1.id = t2.a GROUP BY t1.id, t1.name ORDER BY count(*) DESC LIMIT 1"
        );
        assert_eq!(
            add_group_column("SELECT a, b FROM t GROUP BY a", "b", 0).unwrap(),
            "SELECT a, b FROM t GROUP BY a, b"
        );
        assert_eq!(add_group_column("SELECT a, b FROM t GROUP BY a", "b", 1), None);
        assert_eq!(add_group_column("SELECT a, max(b) FROM t", "a", 0), None);
        // In a subquery: the list ends at its closing parenthesis; the second list is the outer one.
        let sql =
            "SELECT x FROM t WHERE y IN (SELECT y FROM u GROUP BY y HAVING count(*) > 1) GROUP BY x HAVING sum(z) > 0";
        assert_eq!(
            add_group_column(sql, "w", 0).unwrap(),
            "SELECT x FROM t WHERE y IN (SELECT y FROM u GROUP BY y, w HAVING count(*) > 1) GROUP BY x HAVING sum(z) > 0"
        );
        assert_eq!(
            add_group_column(sql, "w", 1).unwrap(),
            "SELECT x FROM t WHERE y IN (SELECT y FROM u GROUP BY y HAVING count(*) > 1) GROUP BY x, w HAVING sum(z) > 0"
        );
        // Set operations end the list; functions' parentheses do not; text in quotes is not a clause.
        assert_eq!(
            add_group_column("SELECT a FROM t GROUP BY lower(a) UNION SELECT a FROM u", "b", 0).unwrap(),
            "SELECT a FROM t GROUP BY lower(a), b UNION SELECT a FROM u"
        );
        assert_eq!(
            add_group_column("SELECT a FROM t WHERE c = 'GROUP BY x' GROUP BY a", "b", 0).unwrap(),
            "SELECT a FROM t WHERE c = 'GROUP BY x' GROUP BY a, b"
        );
        assert_eq!(
            add_group_column("SELECT a FROM t GROUP BY a, \" LIMIT \"", "b", 0).unwrap(),
            "SELECT a FROM t GROUP BY a, \" LIMIT \", b"
        );
        // A model writes clauses on lines of their own: a newline separates words as a space does.
        assert_eq!(
            add_group_column("SELECT a, b\nFROM t\nGROUP BY a\nORDER BY count(*)", "b", 0).unwrap(),
            "SELECT a, b\nFROM t\nGROUP BY a, b\nORDER BY count(*)"
        );
        // A word that only ends in GROUP is not the clause.
        assert_eq!(add_group_column("SELECT a FROM t AS subgroup BY", "b", 0), None);
        // Letters of other scripts before and in the list keep their bytes (positions stay aligned).
        assert_eq!(
            add_group_column("SELECT name, count(*) FROM t WHERE city = '東京都' GROUP BY id ORDER BY 2", "name", 0)
                .unwrap(),
            "SELECT name, count(*) FROM t WHERE city = '東京都' GROUP BY id, name ORDER BY 2"
        );
        assert_eq!(
            add_group_column("SELECT café, nom FROM t GROUP BY café", "t.nom", 0).unwrap(),
            "SELECT café, nom FROM t GROUP BY café, t.nom"
        );
        // Comments are not clauses, and an apostrophe in one opens no string.
        assert_eq!(
            add_group_column("SELECT a, b FROM t -- don't\n/* GROUP BY x */ GROUP BY a", "b", 0).unwrap(),
            "SELECT a, b FROM t -- don't\n/* GROUP BY x */ GROUP BY a, b"
        );
    }

    #[test]
    fn each_group_by_list_gives_a_candidate() {
        let sql = "SELECT x, name FROM t WHERE y IN (SELECT y FROM u GROUP BY y) GROUP BY x";
        let e = err("column \"t.name\" must appear in the GROUP BY clause or be used in an aggregate function");
        assert_eq!(
            group_by_ungrouped(sql, &e),
            vec![
                "SELECT x, name FROM t WHERE y IN (SELECT y FROM u GROUP BY y, t.name) GROUP BY x",
                "SELECT x, name FROM t WHERE y IN (SELECT y FROM u GROUP BY y) GROUP BY x, t.name",
            ]
        );
        // Another error, or no error line: nothing.
        assert!(group_by_ungrouped(sql, &err("column \"name\" does not exist")).is_empty());
        assert!(group_by_ungrouped(sql, "").is_empty());
    }

    #[test]
    fn an_aggregate_only_in_order_by_groups_by_the_selected_column() {
        let e = err(
            "column \"documents.document_id\" must appear in the GROUP BY clause or be used in an aggregate function",
        );
        assert_eq!(
            group_by_ungrouped("SELECT document_id FROM documents ORDER BY count(*) ASC LIMIT 1", &e),
            vec!["SELECT document_id FROM documents GROUP BY documents.document_id ORDER BY count(*) ASC LIMIT 1"]
        );
        assert_eq!(
            group_by_ungrouped("SELECT document_id FROM documents\nHAVING count(*) > 2", &e),
            vec!["SELECT document_id FROM documents\nGROUP BY documents.document_id HAVING count(*) > 2"]
        );
        // An aggregate in the select list asks for the row holding it, not a group: nothing.
        assert!(group_by_ungrouped("SELECT min(v), document_id FROM documents", &e).is_empty());
        assert!(group_by_ungrouped("SELECT document_id, count(*) FROM documents ORDER BY 2", &e).is_empty());
        // Several SELECTs: which one to group is not known.
        assert!(group_by_ungrouped(
            "SELECT document_id FROM documents WHERE x IN (SELECT x FROM y) ORDER BY count(*)",
            &e
        )
        .is_empty());
    }
}
