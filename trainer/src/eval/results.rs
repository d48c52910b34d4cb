//! Execution results and their comparison (execution accuracy).
//!
//! Gold runs on Spider's SQLite file, the prediction on PostgreSQL over the same rows, so cells are compared by
//! value, not by type: anything that reads as a finite number is a number (SQLite's text '2014' equals
//! PostgreSQL's integer 2014; AVG's numeric 30.3333333333333333 equals SQLite's real 30.333333333333332), rounded
//! to 6 significant digits; NULL equals NULL; everything else compares as text. Two results are the same when
//! they have as many rows and columns and some permutation of the predicted columns makes the rows equal — as a
//! multiset, or as a sequence when the gold query has ORDER BY.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Cell {
    Null,
    Num(String),
    Text(String),
}

/// A number's canonical form: 6 significant digits, no negative zero.
pub fn canonical_number(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    let s = format!("{:.5e}", f);
    // Trim the mantissa's trailing zeros: 1.50000e1 → 1.5e1.
    match s.split_once('e') {
        Some((m, e)) => {
            let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
            format!("{m}e{e}")
        }
        None => s,
    }
}

impl Cell {
    pub fn from_text(s: &str) -> Cell {
        let t = s.trim();
        if !t.is_empty() && t.len() < 40 {
            if let Ok(f) = t.parse::<f64>() {
                if f.is_finite() {
                    return Cell::Num(canonical_number(f));
                }
            }
        }
        Cell::Text(s.to_string())
    }

    pub fn from_f64(f: f64) -> Cell {
        if f.is_finite() {
            Cell::Num(canonical_number(f))
        } else {
            Cell::Text(f.to_string())
        }
    }

    pub fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Cell {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(i) => Cell::from_f64(i as f64),
            ValueRef::Real(f) => Cell::from_f64(f),
            ValueRef::Text(t) => Cell::from_text(&String::from_utf8_lossy(t)),
            ValueRef::Blob(b) => Cell::Text(b.iter().map(|x| format!("{x:02x}")).collect()),
        }
    }

    /// A PostgreSQL value in text form with its type name (from the row description).
    pub fn from_pg_text(v: Option<&str>, type_name: &str) -> Cell {
        match v {
            None => Cell::Null,
            Some(s) if type_name == "bool" => Cell::Num(if s == "t" { "1e0".into() } else { "0".into() }),
            Some(s) => Cell::from_text(s),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultSet {
    pub columns: usize,
    pub rows: Vec<Vec<Cell>>,
}

/// How many column assignments the comparison tries before giving up (wide results with many equal columns).
const MAX_PERMUTATIONS: usize = 5000;

/// Do `pred` and `gold` hold the same result (see the module documentation)?
pub fn same_result(gold: &ResultSet, pred: &ResultSet, ordered: bool) -> bool {
    if gold.rows.len() != pred.rows.len() || gold.columns != pred.columns {
        return false;
    }
    let n = gold.columns;
    if n == 0 {
        return true;
    }
    let column = |rs: &ResultSet, j: usize| -> Vec<Cell> {
        let mut c: Vec<Cell> = rs.rows.iter().map(|r| r[j].clone()).collect();
        if !ordered {
            c.sort();
        }
        c
    };
    let gcols: Vec<Vec<Cell>> = (0..n).map(|j| column(gold, j)).collect();
    let pcols: Vec<Vec<Cell>> = (0..n).map(|j| column(pred, j)).collect();
    // Candidates: predicted columns holding the same values as each gold column.
    let cand: Vec<Vec<usize>> = gcols.iter().map(|g| (0..n).filter(|&k| &pcols[k] == g).collect()).collect();
    if cand.iter().any(|c| c.is_empty()) {
        return false;
    }
    let mut gold_rows = gold.rows.clone();
    if !ordered {
        gold_rows.sort();
    }
    let mut perm = vec![usize::MAX; n];
    let mut used = vec![false; n];
    let mut tries = 0usize;
    search(0, &cand, &mut perm, &mut used, &mut tries, &|perm: &[usize]| {
        let mut rows: Vec<Vec<Cell>> = pred.rows.iter().map(|r| perm.iter().map(|&k| r[k].clone()).collect()).collect();
        if !ordered {
            rows.sort();
        }
        rows == gold_rows
    })
}

fn search(
    j: usize,
    cand: &[Vec<usize>],
    perm: &mut Vec<usize>,
    used: &mut Vec<bool>,
    tries: &mut usize,
    check: &dyn Fn(&[usize]) -> bool,
) -> bool {
    if j == cand.len() {
        *tries += 1;
        return check(perm);
    }
    for &k in &cand[j] {
        if used[k] || *tries >= MAX_PERMUTATIONS {
            continue;
        }
        used[k] = true;
        perm[j] = k;
        if search(j + 1, cand, perm, used, tries, check) {
            return true;
        }
        used[k] = false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(rows: &[&[&str]]) -> ResultSet {
        ResultSet {
            columns: rows.first().map_or(0, |r| r.len()),
            rows: rows
                .iter()
                .map(|r| r.iter().map(|c| if *c == "NULL" { Cell::Null } else { Cell::from_text(c) }).collect())
                .collect(),
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(Cell::from_text("2014"), Cell::from_f64(2014.0));
        assert_eq!(Cell::from_text("30.3333333333333333"), Cell::from_f64(30.333333333333332));
        assert_eq!(Cell::from_text("1.50"), Cell::from_f64(1.5));
        assert_ne!(Cell::from_text("1.5"), Cell::from_f64(1.6));
        assert_eq!(Cell::from_f64(-0.0), Cell::from_f64(0.0));
        assert_eq!(Cell::from_text("France"), Cell::Text("France".into()));
        assert_eq!(Cell::from_pg_text(Some("t"), "bool"), Cell::from_f64(1.0));
    }

    #[test]
    fn multiset_unless_ordered() {
        let g = rs(&[&["a", "1"], &["b", "2"]]);
        let p = rs(&[&["b", "2"], &["a", "1"]]);
        assert!(same_result(&g, &p, false));
        assert!(!same_result(&g, &p, true));
        // duplicates count
        assert!(!same_result(&rs(&[&["a"], &["a"]]), &rs(&[&["a"]]), false));
        assert!(!same_result(&rs(&[&["a"], &["b"]]), &rs(&[&["a"], &["a"]]), false));
    }

    #[test]
    fn columns_may_be_permuted() {
        let g = rs(&[&["a", "1"], &["b", "2"]]);
        let p = rs(&[&["1", "a"], &["2", "b"]]);
        assert!(same_result(&g, &p, false));
        assert!(same_result(&g, &p, true));
        // a permutation must hold row by row, not only column by column
        let p2 = rs(&[&["2", "a"], &["1", "b"]]);
        assert!(!same_result(&g, &p2, false));
    }

    #[test]
    fn shapes_must_agree() {
        assert!(!same_result(&rs(&[&["a", "1"]]), &rs(&[&["a"]]), false));
        assert!(same_result(&ResultSet { columns: 2, rows: vec![] }, &ResultSet { columns: 2, rows: vec![] }, false));
        assert!(!same_result(&ResultSet { columns: 1, rows: vec![] }, &rs(&[&["a"]]), false));
        assert!(same_result(&rs(&[&["NULL"]]), &rs(&[&["NULL"]]), false));
        assert!(!same_result(&rs(&[&["NULL"]]), &rs(&[&["0"]]), false));
    }
}
