//! WikiSQL metrics (Zhong et al. 2017), from the official rules:
//! a query is a logical form `(sel, agg, conds)` with agg ∈ {'', MAX, MIN, COUNT, SUM, AVG}, conds a set of
//! `(column, op, value)` with op ∈ {=, >, <}. Logical-form accuracy: sel and agg equal and the condition sets
//! equal, string values compared lowercased. Execution accuracy: the two forms run over the table give the same
//! list of results (the official engine lowercases string values, and reads numbers for `real` columns).
//!
//! A predicted SQL string becomes a logical form when it is `SELECT [agg](col) FROM t [WHERE c op v AND …]`;
//! columns resolve against the table's header by name (case-, space- and punctuation-insensitive, so the
//! sql-create-context spelling `school_club_team` finds the header "School/Club Team"). Anything else has no
//! logical form and counts as wrong.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, SelectItem, SetExpr, Statement, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use std::collections::HashMap;
use std::path::Path;

pub const AGG_OPS: [&str; 6] = ["", "MAX", "MIN", "COUNT", "SUM", "AVG"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CondValue {
    Num(f64),
    Text(String),
}

impl CondValue {
    fn key(&self) -> String {
        match self {
            CondValue::Num(f) => format!("{f}"),
            CondValue::Text(s) => s.to_lowercase(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogicalForm {
    pub sel: usize,
    pub agg: usize,
    pub conds: Vec<(usize, usize, CondValue)>,
}

impl LogicalForm {
    /// Logical-form equality: same sel and agg, same set of conditions (values lowercased).
    pub fn same_as(&self, other: &LogicalForm) -> bool {
        let key = |c: &[(usize, usize, CondValue)]| {
            let mut k: Vec<(usize, usize, String)> = c.iter().map(|(a, b, v)| (*a, *b, v.key())).collect();
            k.sort();
            k.dedup();
            k
        };
        self.sel == other.sel && self.agg == other.agg && key(&self.conds) == key(&other.conds)
    }
}

/// One WikiSQL table (`*.tables.jsonl`).
#[derive(Debug, Clone, Deserialize)]
pub struct WikiTable {
    pub id: String,
    pub header: Vec<String>,
    pub types: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

fn norm(name: &str) -> String {
    name.chars().filter(|c| c.is_alphanumeric()).flat_map(|c| c.to_lowercase()).collect()
}

fn column_index(header: &[String], e: &Expr) -> Option<usize> {
    let name = match e {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(p) => p.last()?.value.clone(),
        Expr::Nested(x) => return column_index(header, x),
        _ => return None,
    };
    let n = norm(&name);
    header.iter().position(|h| norm(h) == n)
}

fn literal(e: &Expr) -> Option<CondValue> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<f64>().ok().map(CondValue::Num),
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(CondValue::Text(s.clone())),
            _ => None,
        },
        // sql-create-context writes string values in double quotes, which SQL reads as identifiers.
        Expr::Identifier(i) if i.quote_style == Some('"') => Some(CondValue::Text(i.value.clone())),
        Expr::UnaryOp { op: sqlparser::ast::UnaryOperator::Minus, expr } => match literal(expr)? {
            CondValue::Num(f) => Some(CondValue::Num(-f)),
            _ => None,
        },
        Expr::Nested(x) => literal(x),
        _ => None,
    }
}

fn conds(e: &Expr, header: &[String], out: &mut Vec<(usize, usize, CondValue)>) -> Option<()> {
    match e {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            conds(left, header, out)?;
            conds(right, header, out)
        }
        Expr::Nested(x) => conds(x, header, out),
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Eq => 0,
                BinaryOperator::Gt => 1,
                BinaryOperator::Lt => 2,
                _ => return None,
            };
            // A double-quoted header name is a column; any other double-quoted word is a value.
            let col = column_index(header, left)?;
            let val = literal(right)?;
            out.push((col, op, val));
            Some(())
        }
        _ => None,
    }
}

/// The logical form of a SQL string over a table with this header, if the query is in WikiSQL's grammar.
pub fn to_logical_form(sql: &str, header: &[String]) -> Option<LogicalForm> {
    let stmts = Parser::parse_sql(&GenericDialect {}, sql.trim().trim_end_matches(';')).ok()?;
    let [Statement::Query(q)] = stmts.as_slice() else { return None };
    if q.order_by.is_some() || q.limit_clause.is_some() {
        return None;
    }
    let SetExpr::Select(s) = q.body.as_ref() else { return None };
    if s.projection.len() != 1 || s.from.len() != 1 || !s.from[0].joins.is_empty() || s.having.is_some() {
        return None;
    }
    let e = match &s.projection[0] {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
        _ => return None,
    };
    let (agg, col_expr) = match e {
        Expr::Function(f) => {
            let name = f.name.to_string().to_uppercase();
            let agg = AGG_OPS.iter().position(|a| !a.is_empty() && *a == name)?;
            let FunctionArguments::List(list) = &f.args else { return None };
            match list.args.as_slice() {
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))] => (agg, x.clone()),
                _ => return None,
            }
        }
        other => (0, other.clone()),
    };
    let sel = column_index(header, &col_expr)?;
    let mut cs = Vec::new();
    if let Some(w) = &s.selection {
        conds(w, header, &mut cs)?;
    }
    Some(LogicalForm { sel, agg, conds: cs })
}

#[derive(Debug, Clone, PartialEq)]
enum Cv {
    Null,
    Num(f64),
    Text(String),
}

fn cell(v: &serde_json::Value, ty: &str) -> Cv {
    match v {
        serde_json::Value::Null => Cv::Null,
        serde_json::Value::Number(n) => Cv::Num(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) if ty == "real" => {
            s.replace(',', "").trim().parse::<f64>().map(Cv::Num).unwrap_or(Cv::Text(s.to_lowercase()))
        }
        serde_json::Value::String(s) => Cv::Text(s.to_lowercase()),
        other => Cv::Text(other.to_string().to_lowercase()),
    }
}

fn cond_value(v: &CondValue, ty: &str) -> Cv {
    match (v, ty) {
        (CondValue::Num(f), _) => Cv::Num(*f),
        (CondValue::Text(s), "real") => {
            s.replace(',', "").trim().parse::<f64>().map(Cv::Num).unwrap_or(Cv::Text(s.to_lowercase()))
        }
        (CondValue::Text(s), _) => Cv::Text(s.to_lowercase()),
    }
}

fn compare(a: &Cv, b: &Cv) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Cv::Num(x), Cv::Num(y)) => x.partial_cmp(y),
        (Cv::Text(x), Cv::Text(y)) => Some(x.cmp(y)),
        // SQLite orders numbers before text.
        (Cv::Num(_), Cv::Text(_)) => Some(std::cmp::Ordering::Less),
        (Cv::Text(_), Cv::Num(_)) => Some(std::cmp::Ordering::Greater),
        _ => None,
    }
}

/// Run a logical form over the table, as the official engine's SQL would: the list of results.
pub fn execute(lf: &LogicalForm, t: &WikiTable) -> Vec<String> {
    let ty = |i: usize| t.types.get(i).map(String::as_str).unwrap_or("text");
    let rows: Vec<&Vec<serde_json::Value>> = t
        .rows
        .iter()
        .filter(|r| {
            lf.conds.iter().all(|(c, op, v)| {
                let Some(x) = r.get(*c) else { return false };
                let ord = compare(&cell(x, ty(*c)), &cond_value(v, ty(*c)));
                matches!(
                    (op, ord),
                    (0, Some(std::cmp::Ordering::Equal))
                        | (1, Some(std::cmp::Ordering::Greater))
                        | (2, Some(std::cmp::Ordering::Less))
                )
            })
        })
        .collect();
    let vals: Vec<Cv> = rows.iter().map(|r| r.get(lf.sel).map(|x| cell(x, ty(lf.sel))).unwrap_or(Cv::Null)).collect();
    let show = |v: &Cv| match v {
        Cv::Null => "NULL".to_string(),
        Cv::Num(f) => format!("{f}"),
        Cv::Text(s) => s.clone(),
    };
    let nums = || vals.iter().filter_map(|v| if let Cv::Num(f) = v { Some(*f) } else { None });
    match AGG_OPS[lf.agg] {
        "" => vals.iter().map(show).collect(),
        "COUNT" => vec![vals.iter().filter(|v| **v != Cv::Null).count().to_string()],
        "SUM" if vals.iter().all(|v| *v == Cv::Null) => vec!["NULL".into()],
        "SUM" => vec![format!("{}", nums().sum::<f64>())],
        "AVG" => match nums().count() {
            0 => vec!["NULL".into()],
            n => vec![format!("{}", nums().sum::<f64>() / n as f64)],
        },
        agg => {
            let non_null: Vec<&Cv> = vals.iter().filter(|v| **v != Cv::Null).collect();
            let best = non_null.into_iter().reduce(|a, b| {
                let o = compare(b, a).unwrap_or(std::cmp::Ordering::Equal);
                if (agg == "MAX" && o.is_gt()) || (agg == "MIN" && o.is_lt()) {
                    b
                } else {
                    a
                }
            });
            vec![best.map(show).unwrap_or_else(|| "NULL".into())]
        }
    }
}

/// One gold example (`*.jsonl`): its table and logical form.
#[derive(Debug, Clone, Deserialize)]
pub struct WikiExample {
    pub table_id: String,
    pub sql: LogicalForm,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WikiScores {
    pub n: usize,
    pub parsed: usize,
    pub lf_correct: usize,
    pub ex_correct: usize,
    pub lf_accuracy: f64,
    pub ex_accuracy: f64,
}

/// Score predicted SQL strings against gold examples.
pub fn score(
    examples: &[WikiExample],
    tables: &HashMap<String, WikiTable>,
    predictions: &[Option<String>],
) -> WikiScores {
    let mut s = WikiScores { n: examples.len(), ..Default::default() };
    for (ex, pred) in examples.iter().zip(predictions) {
        let Some(t) = tables.get(&ex.table_id) else { continue };
        let Some(lf) = pred.as_deref().and_then(|p| to_logical_form(p, &t.header)) else { continue };
        s.parsed += 1;
        if lf.same_as(&ex.sql) {
            s.lf_correct += 1;
        }
        if execute(&lf, t) == execute(&ex.sql, t) {
            s.ex_correct += 1;
        }
    }
    if s.n > 0 {
        s.lf_accuracy = s.lf_correct as f64 / s.n as f64;
        s.ex_accuracy = s.ex_correct as f64 / s.n as f64;
    }
    s
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
}

/// `eval wikisql`: official files (`dev.jsonl`, `dev.tables.jsonl`) and a predictions file with one JSON object
/// per line holding `"sql"` (a SQL string, or null), in the order of the examples.
pub fn run_files(data: &Path, tables: &Path, predictions: &Path) -> Result<WikiScores> {
    let examples: Vec<WikiExample> = read_jsonl(data)?;
    let tables: HashMap<String, WikiTable> =
        read_jsonl::<WikiTable>(tables)?.into_iter().map(|t| (t.id.clone(), t)).collect();
    #[derive(Deserialize)]
    struct P {
        sql: Option<String>,
    }
    let preds: Vec<Option<String>> = read_jsonl::<P>(predictions)?.into_iter().map(|p| p.sql).collect();
    anyhow::ensure!(preds.len() == examples.len(), "{} predictions for {} examples", preds.len(), examples.len());
    Ok(score(&examples, &tables, &preds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> WikiTable {
        serde_json::from_value(serde_json::json!({
            "id": "1-10015132-11",
            "header": ["Player", "No.", "Nationality", "Position", "Years in Toronto", "School/Club Team"],
            "types": ["text", "real", "text", "text", "text", "text"],
            "rows": [
                ["Antonio Lang", 21, "United States", "Guard-Forward", "1999-2000", "Duke"],
                ["Voshon Lenard", 2, "United States", "Guard", "2002-03", "Minnesota"],
                ["Martin Lewis", 32, "United States", "Guard-Forward", "1996-97", "Butler CC (KS)"],
                ["Brad Lohaus", 33, "United States", "Forward-Center", "1996", "Iowa"]
            ]
        }))
        .unwrap()
    }

    #[test]
    fn sql_create_context_style_sql_becomes_a_logical_form() {
        let t = table();
        let lf = to_logical_form(
            "SELECT position FROM table_10015132_11 WHERE school_club_team = \"Butler CC (KS)\"",
            &t.header,
        )
        .unwrap();
        assert_eq!(lf, LogicalForm { sel: 3, agg: 0, conds: vec![(5, 0, CondValue::Text("Butler CC (KS)".into()))] });
        let lf =
            to_logical_form("SELECT COUNT(player) FROM t WHERE no > 20 AND nationality = 'United States'", &t.header)
                .unwrap();
        assert_eq!(lf.agg, 3);
        assert_eq!(lf.conds.len(), 2);
        assert!(to_logical_form("SELECT player FROM t ORDER BY no", &t.header).is_none());
        assert!(to_logical_form("SELECT player FROM t WHERE no >= 3", &t.header).is_none());
        assert!(to_logical_form("SELECT nosuch FROM t", &t.header).is_none());
    }

    #[test]
    fn logical_form_accuracy_ignores_condition_order_and_value_case() {
        let a = LogicalForm {
            sel: 0,
            agg: 0,
            conds: vec![(1, 1, CondValue::Num(20.0)), (2, 0, CondValue::Text("United States".into()))],
        };
        let b = LogicalForm {
            sel: 0,
            agg: 0,
            conds: vec![(2, 0, CondValue::Text("united states".into())), (1, 1, CondValue::Num(20.0))],
        };
        assert!(a.same_as(&b));
        let c = LogicalForm { sel: 0, agg: 3, ..b.clone() };
        assert!(!a.same_as(&c));
    }

    #[test]
    fn execution_follows_the_official_engine() {
        let t = table();
        let q = |sql: &str| execute(&to_logical_form(sql, &t.header).unwrap(), &t);
        assert_eq!(q("SELECT player FROM t WHERE school_club_team = 'DUKE'"), vec!["antonio lang"]);
        assert_eq!(q("SELECT COUNT(player) FROM t WHERE no > 20"), vec!["3"]);
        assert_eq!(q("SELECT MAX(no) FROM t"), vec!["33"]);
        assert_eq!(q("SELECT MIN(no) FROM t WHERE position = 'Guard-Forward'"), vec!["21"]);
        assert_eq!(q("SELECT SUM(no) FROM t WHERE no < 30"), vec!["23"]);
        assert_eq!(q("SELECT AVG(no) FROM t WHERE no < 30"), vec!["11.5"]);
        assert_eq!(q("SELECT player FROM t WHERE no > 100"), Vec::<String>::new());
    }

    #[test]
    fn scores_count_logical_form_and_execution_separately() {
        let t = table();
        let tables: HashMap<String, WikiTable> = [(t.id.clone(), t)].into_iter().collect();
        let gold =
            |sel, agg, conds| WikiExample { table_id: "1-10015132-11".into(), sql: LogicalForm { sel, agg, conds } };
        let examples = vec![
            gold(0, 0, vec![(5, 0, CondValue::Text("Duke".into()))]),
            gold(1, 1, vec![]),
            gold(0, 0, vec![(1, 0, CondValue::Num(2.0))]),
        ];
        let preds = vec![
            Some("SELECT player FROM t WHERE school_club_team = 'duke'".to_string()), // lf ✓ ex ✓
            Some("SELECT no FROM t ORDER BY no DESC LIMIT 1".to_string()),            // no logical form
            Some("SELECT player FROM t WHERE years_in_toronto = '2002-03'".to_string()), // lf ✗ ex ✓
        ];
        let s = score(&examples, &tables, &preds);
        assert_eq!((s.n, s.parsed, s.lf_correct, s.ex_correct), (3, 2, 1, 2));
    }

    #[test]
    fn official_file_layout_is_read() {
        let dir = std::env::temp_dir().join(format!("copilot-wikisql-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = serde_json::json!({"id": "1-1", "header": ["Player", "No."], "types": ["text", "real"],
                                   "rows": [["Ann", 1], ["Bob", 2]]});
        std::fs::write(dir.join("dev.tables.jsonl"), format!("{t}\n")).unwrap();
        let ex = |sel: usize, agg: usize, conds: serde_json::Value| serde_json::json!({"phase": 1, "table_id": "1-1", "question": "q", "sql": {"sel": sel, "agg": agg, "conds": conds}});
        std::fs::write(
            dir.join("dev.jsonl"),
            format!("{}\n{}\n", ex(0, 0, serde_json::json!([[1, 0, 2]])), ex(1, 1, serde_json::json!([]))),
        )
        .unwrap();
        std::fs::write(dir.join("preds.jsonl"), "{\"sql\": \"SELECT player FROM t WHERE no = 2\"}\n{\"sql\": null}\n")
            .unwrap();
        let s = run_files(&dir.join("dev.jsonl"), &dir.join("dev.tables.jsonl"), &dir.join("preds.jsonl")).unwrap();
        assert_eq!((s.n, s.parsed, s.lf_correct, s.ex_correct), (2, 1, 1, 1));
        assert_eq!(s.lf_accuracy, 0.5);
        std::fs::write(dir.join("preds.jsonl"), "{\"sql\": null}\n").unwrap();
        assert!(run_files(&dir.join("dev.jsonl"), &dir.join("dev.tables.jsonl"), &dir.join("preds.jsonl")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
