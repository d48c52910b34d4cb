//! Spider's exact-set-match and hardness, implemented from the official rules (Yu et al. 2018; the published
//! `evaluation.py` of taoyds/spider). Written from the rules, not translated from the script.
//!
//! A query is parsed (with sqlparser) into Spider's clause structure:
//! `select` = [(agg, val_unit)], `from` = table units + join conditions, `where`/`having` = condition units joined
//! by and/or (flat, left to right, as the official parser reads them), `group by` = column units, `order by` =
//! (direction, [val_unit]), `limit`, and one nested query for each of intersect/union/except.
//! Column names resolve to `__table.column__` (lowercase) through aliases and the tables in FROM; `*` is `__all__`.
//!
//! Before comparison, as the official evaluator does with its defaults: condition values are masked (only nested
//! queries are kept), DISTINCT flags are dropped, and columns linked by foreign keys map to one representative (the
//! lowest column index of the linked set). Exact-set-match is then true when every component —
//! select, select without aggregates, where, where without operators, group by, group by with having, order by
//! (with limit present on both or neither), and/or, intersect/union/except (recursively), keywords — matches as a
//! set, and the FROM table sets are equal when the gold's first FROM item is a table.
//!
//! Hardness counts components on the gold query with the official rules, including their quirks (kept, so our
//! levels are the published ones): a WHERE/HAVING condition counts as an "aggregate" when it is negated, and each
//! and/or word in HAVING counts as one too. The official parser fails on some SQL (functions other than the five
//! aggregates, CASE, casts); so does this one, and a prediction that does not parse does not match.

mod canon;
mod compare;
mod hardness;
mod parse;
#[cfg(test)]
mod tests;

pub use canon::canonicalize;
pub use compare::exact_set_match;
pub use hardness::{hardness, Hardness};
pub use parse::{parse, ParseError};

use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Agg {
    None,
    Max,
    Min,
    Count,
    Sum,
    Avg,
}

impl Agg {
    fn from_name(name: &str) -> Option<Agg> {
        Some(match name.to_ascii_lowercase().as_str() {
            "max" => Agg::Max,
            "min" => Agg::Min,
            "count" => Agg::Count,
            "sum" => Agg::Sum,
            "avg" => Agg::Avg,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitOp {
    None,
    Minus,
    Plus,
    Times,
    Divide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WhereOp {
    Between,
    Eq,
    Gt,
    Lt,
    Ge,
    Le,
    Ne,
    In,
    Like,
    Is,
    Exists,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ColUnit {
    pub agg: Agg,
    /// `__table.column__`, `__all__`, or (for a column of a derived table) `__alias.column__`.
    pub col: String,
    pub distinct: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValUnit {
    pub op: UnitOp,
    pub left: ColUnit,
    pub right: Option<ColUnit>,
}

/// A condition's right-hand value. Literals and columns are masked (`Masked`) as the official evaluator does by
/// default; nested queries are kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Val {
    Masked,
    None,
    Sql(Box<SqlTree>),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CondUnit {
    pub not: bool,
    pub op: WhereOp,
    pub val_unit: ValUnit,
    pub val1: Val,
    pub val2: Val,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Conj {
    And,
    Or,
}

/// Condition units and the and/or words between them (`conj.len() == units.len() - 1` when not empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conds {
    pub units: Vec<CondUnit>,
    pub conj: Vec<Conj>,
}

impl Conds {
    /// The official structure's list length (units and conjunctions).
    fn list_len(&self) -> usize {
        self.units.len() + self.conj.len()
    }
    fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableUnit {
    Table(String),
    Sql(Box<SqlTree>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    Asc,
    Desc,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SqlTree {
    pub select: Vec<(Agg, ValUnit)>,
    pub from_tables: Vec<TableUnit>,
    pub from_conds: Conds,
    pub where_: Conds,
    pub group_by: Vec<ColUnit>,
    pub having: Conds,
    pub order_by: Option<(Dir, Vec<ValUnit>)>,
    pub limit: Option<u64>,
    pub intersect: Option<Box<SqlTree>>,
    pub union: Option<Box<SqlTree>>,
    pub except: Option<Box<SqlTree>>,
}

impl SqlTree {
    /// Every table the query reads, lowercase: its FROM clause's, and those of every nested query (derived tables,
    /// subqueries in conditions, set operations).
    pub fn tables(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        self.collect_tables(&mut out);
        out
    }

    /// Every column of a table the query names, as `table.column` (lowercase): in its select list, conditions,
    /// grouping and ordering, and in every nested query. `*` and columns of derived tables are left out, and so is
    /// the right side of `a = b` (the parser masks it as a value: mostly a join key).
    pub fn columns(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        self.collect_columns(&mut out);
        let tables = self.tables();
        out.retain(|c| c.split_once('.').is_some_and(|(t, _)| tables.contains(t)));
        out
    }

    fn collect_columns(&self, out: &mut std::collections::BTreeSet<String>) {
        let mut col = |c: &ColUnit| {
            if c.col != "__all__" {
                out.insert(c.col.trim_matches('_').to_lowercase());
            }
        };
        let mut units: Vec<&ValUnit> = self.select.iter().map(|(_, v)| v).collect();
        for conds in [&self.from_conds, &self.where_, &self.having] {
            units.extend(conds.units.iter().map(|u| &u.val_unit));
        }
        units.extend(self.order_by.iter().flat_map(|(_, v)| v));
        for v in units {
            col(&v.left);
            if let Some(r) = &v.right {
                col(r);
            }
        }
        self.group_by.iter().for_each(&mut col);
        for q in self.nested() {
            q.collect_columns(out);
        }
    }

    fn collect_tables(&self, out: &mut std::collections::BTreeSet<String>) {
        for t in &self.from_tables {
            if let TableUnit::Table(n) = t {
                out.insert(n.trim_matches('_').to_lowercase());
            }
        }
        for q in self.nested() {
            q.collect_tables(out);
        }
    }

    /// The queries nested in this one: derived tables, subqueries in conditions, the other sides of set operations.
    fn nested(&self) -> Vec<&SqlTree> {
        let mut out: Vec<&SqlTree> = self
            .from_tables
            .iter()
            .filter_map(|t| match t {
                TableUnit::Sql(q) => Some(q.as_ref()),
                TableUnit::Table(_) => None,
            })
            .collect();
        for conds in [&self.from_conds, &self.where_, &self.having] {
            for u in &conds.units {
                for v in [&u.val1, &u.val2] {
                    if let Val::Sql(q) = v {
                        out.push(q);
                    }
                }
            }
        }
        out.extend([&self.intersect, &self.union, &self.except].into_iter().flatten().map(|q| q.as_ref()));
        out
    }
}

/// One database's schema as Spider's `tables.json` describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct SpiderTables {
    pub db_id: String,
    pub table_names_original: Vec<String>,
    pub column_names_original: Vec<(i64, String)>,
    #[serde(default)]
    pub foreign_keys: Vec<(usize, usize)>,
}

/// The schema the parser resolves names against.
#[derive(Debug, Clone)]
pub struct Schema {
    /// lowercase table name → lowercase column names
    tables: Vec<(String, Vec<String>)>,
    /// `__t.c__` → representative `__t.c__` (foreign-key linked columns)
    fk_map: HashMap<String, String>,
}

impl Schema {
    pub fn from_spider(t: &SpiderTables) -> Schema {
        let mut tables: Vec<(String, Vec<String>)> =
            t.table_names_original.iter().map(|n| (n.to_lowercase(), Vec::new())).collect();
        let mut col_ids: Vec<String> = Vec::new();
        for (ti, c) in &t.column_names_original {
            if *ti < 0 {
                col_ids.push("__all__".into());
            } else {
                let tn = &t.table_names_original[*ti as usize];
                tables[*ti as usize].1.push(c.to_lowercase());
                col_ids.push(format!("__{}.{}__", tn.to_lowercase(), c.to_lowercase()));
            }
        }
        // Union the foreign-key pairs into linked sets; map each member to the set's lowest column index.
        let mut sets: Vec<BTreeSet<usize>> = Vec::new();
        for &(a, b) in &t.foreign_keys {
            match sets.iter_mut().find(|s| s.contains(&a) || s.contains(&b)) {
                Some(s) => {
                    s.insert(a);
                    s.insert(b);
                }
                None => sets.push([a, b].into_iter().collect()),
            }
        }
        let mut fk_map = HashMap::new();
        for s in &sets {
            let first = *s.iter().next().expect("non-empty");
            for &i in s {
                if let (Some(c), Some(r)) = (col_ids.get(i), col_ids.get(first)) {
                    fk_map.insert(c.clone(), r.clone());
                }
            }
        }
        Schema { tables, fk_map }
    }

    /// A schema from table → columns (tests).
    #[cfg(test)]
    pub fn new(tables: &[(&str, &[&str])], foreign_keys: &[(&str, &str)]) -> Schema {
        let mut t = SpiderTables {
            db_id: String::new(),
            table_names_original: tables.iter().map(|(n, _)| n.to_string()).collect(),
            column_names_original: vec![(-1, "*".into())],
            foreign_keys: Vec::new(),
        };
        for (i, (_, cols)) in tables.iter().enumerate() {
            for c in *cols {
                t.column_names_original.push((i as i64, c.to_string()));
            }
        }
        let index = |qualified: &str| -> usize {
            let (tn, cn) = qualified.split_once('.').expect("table.column");
            let ti = tables.iter().position(|(n, _)| n.eq_ignore_ascii_case(tn)).expect("known table") as i64;
            t.column_names_original
                .iter()
                .position(|(i, c)| *i == ti && c.eq_ignore_ascii_case(cn))
                .expect("known column")
        };
        t.foreign_keys = foreign_keys.iter().map(|(a, b)| (index(a), index(b))).collect();
        Schema::from_spider(&t)
    }

    fn has_table(&self, t: &str) -> bool {
        self.tables.iter().any(|(n, _)| n == t)
    }

    fn has_column(&self, t: &str, c: &str) -> bool {
        self.tables.iter().any(|(n, cols)| n == t && cols.iter().any(|x| x == c))
    }
}
