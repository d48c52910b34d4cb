//! A result set as CSV (RFC 4180): fields with a comma, quote, CR or LF are quoted, quotes doubled; NULL is an empty
//! field. Text that a spreadsheet would run as a formula (starting with = + - @ TAB CR) gets a leading `'`.

use crate::result::ResultSet;
use serde_json::Value;

pub fn field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{text}") } else { text.to_string() };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

fn value(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => field(s),
        // Numbers (negative ones too) and booleans are data, not formulas.
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => field(&other.to_string()),
    }
}

pub fn to_csv(r: &ResultSet) -> String {
    let mut out = String::new();
    out.push_str(&r.columns.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
    out.push_str("\r\n");
    for row in &r.rows {
        out.push_str(&row.iter().map(value).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_fields() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        assert_eq!(field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(field(""), "");
    }

    #[test]
    fn defuses_formulas_in_text_only() {
        assert_eq!(field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(value(&Value::from(-5)), "-5");
        assert_eq!(value(&Value::from("-5")), "'-5");
    }

    #[test]
    fn whole_result() {
        let r = ResultSet {
            columns: vec!["name".into(), "n, total".into()],
            rows: vec![
                vec![Value::from("O'Neil, \"Jr\""), Value::from(3)],
                vec![Value::Null, Value::from(1.5)],
                vec![Value::from(true), serde_json::json!({"a": [1, 2]})],
            ],
        };
        assert_eq!(
            to_csv(&r),
            "name,\"n, total\"\r\n\"O'Neil, \"\"Jr\"\"\",3\r\n,1.5\r\ntrue,\"{\"\"a\"\":[1,2]}\"\r\n"
        );
    }
}
