//! Which chart suits a result, from its shape: one category + one number → bar; a date/time + a number → line;
//! two numbers → scatter; a single value → a big number; anything else → no chart (the table says it all).
//! The page starts with this choice and lets the user switch.

use serde::Serialize;
use serde_json::Value;

use crate::result::ResultSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChartKind {
    Bar,
    Line,
    Scatter,
    Number,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChartSpec {
    pub kind: ChartKind,
    /// Column index of the category / time / first number (x axis); for `number`, the value's column.
    pub x: Option<usize>,
    /// Column index of the number plotted (y axis).
    pub y: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Number,
    Temporal,
    Text,
    Empty,
}

/// `2014-05-01`, `2014-05-01T10:00:00`, `2014-05-01 10:00:00+02`: what PostgreSQL's date/timestamp look like in JSON.
fn is_temporal_text(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
        && (b.len() == 10 || b[10] == b'T' || b[10] == b' ')
}

fn classify(name: &str, values: impl Iterator<Item = Value>) -> ColumnKind {
    let (mut numbers, mut temporal, mut texts, mut year_like) = (0, 0, 0, true);
    for v in values {
        match v {
            Value::Null => {}
            Value::Number(n) => {
                numbers += 1;
                year_like &= n.as_i64().is_some_and(|y| (1000..=2999).contains(&y));
            }
            Value::String(s) if is_temporal_text(&s) => temporal += 1,
            _ => texts += 1,
        }
    }
    let lower = name.to_ascii_lowercase();
    match (numbers, temporal, texts) {
        (0, 0, 0) => ColumnKind::Empty,
        (n, 0, 0) if n > 0 && year_like && (lower == "year" || lower.ends_with("_year") || lower == "yr") => {
            ColumnKind::Temporal
        }
        (_, 0, 0) => ColumnKind::Number,
        (0, _, 0) => ColumnKind::Temporal,
        _ => ColumnKind::Text,
    }
}

pub fn choose(r: &ResultSet) -> ChartSpec {
    let none = ChartSpec { kind: ChartKind::None, x: None, y: None };
    if r.rows.is_empty() || r.columns.is_empty() {
        return none;
    }
    if r.rows.len() == 1 && r.columns.len() == 1 {
        return ChartSpec { kind: ChartKind::Number, x: Some(0), y: Some(0) };
    }
    let kinds: Vec<ColumnKind> = r
        .columns
        .iter()
        .enumerate()
        .map(|(i, name)| classify(name, r.rows.iter().map(|row| row.get(i).cloned().unwrap_or(Value::Null))))
        .collect();
    let first =
        |k: ColumnKind, not: Option<usize>| kinds.iter().enumerate().position(|(i, &c)| c == k && Some(i) != not);
    let number = first(ColumnKind::Number, None);
    if let (Some(t), Some(n)) = (first(ColumnKind::Temporal, None), number) {
        return ChartSpec { kind: ChartKind::Line, x: Some(t), y: Some(n) };
    }
    if let (Some(c), Some(n)) = (first(ColumnKind::Text, None), number) {
        return ChartSpec { kind: ChartKind::Bar, x: Some(c), y: Some(n) };
    }
    if let Some(n) = number {
        if let Some(m) = first(ColumnKind::Number, Some(n)) {
            return ChartSpec { kind: ChartKind::Scatter, x: Some(n), y: Some(m) };
        }
        if r.rows.len() == 1 {
            return ChartSpec { kind: ChartKind::Number, x: Some(n), y: Some(n) };
        }
    }
    none
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rs(columns: &[&str], rows: Vec<Vec<Value>>) -> ResultSet {
        ResultSet { columns: columns.iter().map(|c| c.to_string()).collect(), rows }
    }

    #[test]
    fn category_and_number_is_bar() {
        let r = rs(&["count", "country"], vec![vec![json!(3), json!("France")], vec![json!(1), json!("US")]]);
        assert_eq!(choose(&r), ChartSpec { kind: ChartKind::Bar, x: Some(1), y: Some(0) });
    }

    #[test]
    fn date_and_number_is_line() {
        let r =
            rs(&["day", "n"], vec![vec![json!("2014-01-01"), json!(2)], vec![json!("2014-01-02T10:00:00"), json!(5)]]);
        assert_eq!(choose(&r).kind, ChartKind::Line);
        // A year column is time too.
        let r = rs(&["Year", "n"], vec![vec![json!(2014), json!(2)], vec![json!(2015), json!(5)]]);
        assert_eq!(choose(&r), ChartSpec { kind: ChartKind::Line, x: Some(0), y: Some(1) });
    }

    #[test]
    fn two_numbers_is_scatter() {
        let r = rs(&["age", "capacity"], vec![vec![json!(52), json!(1000)], vec![json!(41), json!(2000.5)]]);
        assert_eq!(choose(&r), ChartSpec { kind: ChartKind::Scatter, x: Some(0), y: Some(1) });
    }

    #[test]
    fn single_value_is_big_number() {
        assert_eq!(choose(&rs(&["count"], vec![vec![json!(6)]])).kind, ChartKind::Number);
        assert_eq!(choose(&rs(&["name"], vec![vec![json!("Joe")]])).kind, ChartKind::Number);
        // One row of one number beside text: a bar of one would say less than the number.
        assert_eq!(choose(&rs(&["n", "m"], vec![vec![json!(1), json!("x")]])).kind, ChartKind::Bar);
    }

    #[test]
    fn text_only_or_empty_is_no_chart() {
        assert_eq!(choose(&rs(&["a", "b"], vec![vec![json!("x"), json!("y")]])).kind, ChartKind::None);
        assert_eq!(choose(&rs(&["a"], vec![])).kind, ChartKind::None);
        assert_eq!(choose(&rs(&["a"], vec![vec![json!(1)], vec![json!(2)]])).kind, ChartKind::None);
    }

    #[test]
    fn nulls_do_not_change_a_column_kind() {
        let r = rs(&["country", "n"], vec![vec![json!("France"), Value::Null], vec![Value::Null, json!(2)]]);
        assert_eq!(choose(&r).kind, ChartKind::Bar);
        // A mixed column (numbers and words) is text.
        let r = rs(&["v", "n"], vec![vec![json!(1), json!(1)], vec![json!("one"), json!(2)]]);
        assert_eq!(choose(&r), ChartSpec { kind: ChartKind::Bar, x: Some(0), y: Some(1) });
    }
}
