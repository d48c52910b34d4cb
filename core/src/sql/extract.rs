//! Getting one SQL statement out of what a model wrote.
//!
//! Models wrap SQL in code fences, put prose before and after it, write several statements, or stop in the middle
//! of one. [`extract_sql`] returns the first statement, without its terminating semicolon, or `None` when the output
//! holds no query at all. It does not judge whether the statement is safe: that is the gate's job.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// Where the first statement ends: the byte index of the first `;` outside quotes and comments, if any.
pub fn statement_end(sql: &str) -> Option<usize> {
    scan_code(sql, |c| c == b';')
}

/// Visit, in order, the bytes of `sql` that are code — outside string literals, quoted identifiers, dollar-quoted
/// strings and comments — until `stop` returns true; the index it stopped at. `None` when it never stopped, or
/// when a dollar-quoted string is left open (the rest is all string).
pub(crate) fn scan_code(sql: &str, mut stop: impl FnMut(u8) -> bool) -> Option<usize> {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if i + 1 < b.len() && b[i + 1] == q {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // Dollar quoting: $$…$$ or $tag$…$tag$.
                if let Some(len) = dollar_tag_len(&b[i..]) {
                    let tag = &b[i..i + len];
                    let body = i + len;
                    match find(&b[body..], tag) {
                        Some(end) => i = body + end + len - 1,
                        None => return None,
                    }
                }
            }
            c if stop(c) => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn dollar_tag_len(b: &[u8]) -> Option<usize> {
    let mut j = 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    (j < b.len() && b[j] == b'$' && !b[1..j].first().is_some_and(|c| c.is_ascii_digit())).then_some(j + 1)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The content of the first fenced code block, or of an unterminated one. `None` when there is no fence.
fn fenced(text: &str) -> Option<&str> {
    let start = text.find("```")?;
    let after = &text[start + 3..];
    // Skip the info string (`sql`, `postgresql`, …) up to the end of the line.
    let body = match after.find('\n') {
        Some(nl) if after[..nl].trim().chars().all(|c| c.is_ascii_alphanumeric()) => &after[nl + 1..],
        _ => after,
    };
    Some(match body.find("```") {
        Some(end) => &body[..end],
        None => body,
    })
}

/// Byte offsets where a query may start: each whole-word `SELECT`, `WITH` or `VALUES`, moved back over an opening
/// parenthesis that begins a parenthesised query (`(SELECT …) UNION (SELECT …)`). Sorted, first first.
fn query_starts(text: &str) -> Vec<usize> {
    let lower = text.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut starts = Vec::new();
    for kw in ["select", "with", "values"] {
        for (at, _) in lower.match_indices(kw) {
            let end = at + kw.len();
            if (at == 0 || !word(bytes[at - 1])) && (end >= bytes.len() || !word(bytes[end])) {
                let head = text[..at].trim_end();
                let at = match head.strip_suffix('(') {
                    Some(h) if h.trim().is_empty() || h.ends_with('\n') => h.len(),
                    _ => at,
                };
                starts.push(at);
            }
        }
    }
    starts.sort_unstable();
    starts.dedup();
    starts
}

fn parses(sql: &str) -> bool {
    // Deep nesting would make sqlparser backtrack for minutes (see gate::MAX_NESTING); the gate refuses it anyway.
    crate::sql::gate::nesting_depth(sql) <= crate::sql::gate::MAX_NESTING
        && Parser::parse_sql(&PostgreSqlDialect {}, sql).is_ok_and(|v| v.len() == 1)
}

/// The statement that starts at the beginning of `text`: cut at its semicolon, then, if it does not parse, with
/// trailing lines (prose) dropped until it does. `Ok` when it parses, `Err` with the untrimmed text otherwise.
fn statement_at(text: &str) -> Result<String, String> {
    let stmt = match statement_end(text) {
        Some(end) => &text[..end],
        None => text,
    }
    .trim();
    if parses(stmt) {
        return Ok(stmt.to_string());
    }
    let lines: Vec<&str> = stmt.lines().collect();
    for keep in (1..lines.len()).rev() {
        let candidate = lines[..keep].join("\n");
        if parses(candidate.trim()) {
            return Ok(candidate.trim().to_string());
        }
    }
    Err(stmt.to_string())
}

/// Extract the first SQL query from model output. See the module documentation.
///
/// Inside the first code fence if it holds a query, else in the whole output, each place a query may start is
/// tried in order; the first that parses wins. When none parses, the first candidate is returned as written, so
/// the caller can show the user what the model wrote and why it was refused.
pub fn extract_sql(output: &str) -> Option<String> {
    let region = fenced(output).filter(|r| !query_starts(r).is_empty()).unwrap_or(output);
    let mut first_unparsed: Option<String> = None;
    for start in query_starts(region) {
        match statement_at(&region[start..]) {
            Ok(sql) => return Some(sql),
            Err(raw) if !raw.is_empty() && first_unparsed.is_none() => first_unparsed = Some(raw),
            Err(_) => {}
        }
    }
    first_unparsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_statement() {
        assert_eq!(extract_sql("SELECT count(*) FROM singer").as_deref(), Some("SELECT count(*) FROM singer"));
    }

    #[test]
    fn fenced_with_prose_around() {
        let out =
            "Here is the query:\n```sql\nSELECT name\nFROM singer\nWHERE country = 'France';\n```\nIt returns names.";
        assert_eq!(extract_sql(out).as_deref(), Some("SELECT name\nFROM singer\nWHERE country = 'France'"));
    }

    #[test]
    fn primed_fence_without_info_string_or_close() {
        assert_eq!(extract_sql("```\nselect 1").as_deref(), Some("select 1"));
        assert_eq!(
            extract_sql("```postgresql\nWITH a AS (SELECT 1) SELECT * FROM a\n```").as_deref(),
            Some("WITH a AS (SELECT 1) SELECT * FROM a")
        );
    }

    #[test]
    fn first_statement_only() {
        assert_eq!(extract_sql("SELECT 1; DROP TABLE singer;").as_deref(), Some("SELECT 1"));
    }

    #[test]
    fn semicolons_inside_literals_and_comments_do_not_split() {
        assert_eq!(
            extract_sql("SELECT 'a;b', \"c;d\" FROM t -- x;y\nWHERE e = $$f;g$$; SELECT 2").as_deref(),
            Some("SELECT 'a;b', \"c;d\" FROM t -- x;y\nWHERE e = $$f;g$$")
        );
        assert_eq!(extract_sql("SELECT /* ; */ 1; x").as_deref(), Some("SELECT /* ; */ 1"));
        assert_eq!(extract_sql("SELECT 'it''s;' AS s;").as_deref(), Some("SELECT 'it''s;' AS s"));
    }

    #[test]
    fn trailing_prose_without_semicolon_is_dropped() {
        let out = "SELECT name FROM singer\nWHERE age > 30\nThis query lists singers older than thirty.";
        assert_eq!(extract_sql(out).as_deref(), Some("SELECT name FROM singer\nWHERE age > 30"));
    }

    #[test]
    fn words_containing_keywords_are_not_queries() {
        assert_eq!(extract_sql("The selection is withheld."), None);
        assert_eq!(extract_sql("I cannot answer that."), None);
        assert_eq!(extract_sql(""), None);
        assert_eq!(extract_sql("```sql\n```"), None);
    }

    #[test]
    fn prose_before_the_query() {
        assert_eq!(
            extract_sql("To count them, select rows: SELECT count(*) FROM t").as_deref(),
            Some("SELECT count(*) FROM t")
        );
    }

    #[test]
    fn values_and_parenthesised_set_operations() {
        assert_eq!(extract_sql("VALUES (1), (2)").as_deref(), Some("VALUES (1), (2)"));
        assert_eq!(extract_sql("(SELECT 1) UNION (SELECT 2);").as_deref(), Some("(SELECT 1) UNION (SELECT 2)"));
    }

    #[test]
    fn unparseable_statement_is_returned_for_the_gate_to_reject() {
        assert_eq!(extract_sql("SELECT FROM WHERE").as_deref(), Some("SELECT FROM WHERE"));
    }

    #[test]
    fn statement_end_handles_unterminated_dollar_quote() {
        assert_eq!(statement_end("SELECT $$abc;"), None);
        assert_eq!(statement_end("SELECT $1;"), Some(9));
    }
}
