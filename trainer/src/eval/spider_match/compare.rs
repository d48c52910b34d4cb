//! Phase 3: exact-set-match, component by component.

use std::collections::BTreeSet;

use super::*;

// ---------------------------------------------------------------------------------------------------------------
// Component matching.

/// (label_total, pred_total, matched) → the component matches when the totals agree and all of pred matched.
fn full(label_total: usize, pred_total: usize, cnt: usize) -> bool {
    pred_total == label_total && cnt == pred_total
}

fn multiset_count<T: PartialEq + Clone>(pred: &[T], label: &[T]) -> usize {
    let mut rest: Vec<T> = label.to_vec();
    let mut cnt = 0;
    for p in pred {
        if let Some(i) = rest.iter().position(|l| l == p) {
            rest.remove(i);
            cnt += 1;
        }
    }
    cnt
}

/// Per-component results of one comparison (true = the component matches).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Components {
    pub select: bool,
    pub select_no_agg: bool,
    pub where_: bool,
    pub where_no_op: bool,
    pub group_no_having: bool,
    pub group: bool,
    pub order: bool,
    pub and_or: bool,
    pub iuen: bool,
    pub keywords: bool,
}

impl Components {
    fn all(&self) -> bool {
        self.select
            && self.select_no_agg
            && self.where_
            && self.where_no_op
            && self.group_no_having
            && self.group
            && self.order
            && self.and_or
            && self.iuen
            && self.keywords
    }
}

fn strip_table(col: &str) -> String {
    match col.split_once('.') {
        Some((_, c)) => c.to_string(),
        None => col.to_string(),
    }
}

fn keywords(t: &SqlTree) -> BTreeSet<&'static str> {
    let mut k = BTreeSet::new();
    if !t.where_.is_empty() {
        k.insert("where");
    }
    if !t.group_by.is_empty() {
        k.insert("group");
    }
    if !t.having.is_empty() {
        k.insert("having");
    }
    if let Some((d, _)) = &t.order_by {
        k.insert(if *d == Dir::Asc { "asc" } else { "desc" });
        k.insert("order");
    }
    if t.limit.is_some() {
        k.insert("limit");
    }
    if t.except.is_some() {
        k.insert("except");
    }
    if t.union.is_some() {
        k.insert("union");
    }
    if t.intersect.is_some() {
        k.insert("intersect");
    }
    let all_conds = [&t.from_conds, &t.where_, &t.having];
    if all_conds.iter().any(|c| c.conj.contains(&Conj::Or)) {
        k.insert("or");
    }
    let units: Vec<&CondUnit> = all_conds.iter().flat_map(|c| c.units.iter()).collect();
    if units.iter().any(|u| u.not) {
        k.insert("not");
    }
    if units.iter().any(|u| u.op == WhereOp::In) {
        k.insert("in");
    }
    if units.iter().any(|u| u.op == WhereOp::Like) {
        k.insert("like");
    }
    k
}

fn nested_match(pred: &Option<Box<SqlTree>>, label: &Option<Box<SqlTree>>) -> (usize, usize, usize) {
    let lt = usize::from(label.is_some());
    let pt = usize::from(pred.is_some());
    let cnt = match (pred, label) {
        (Some(p), Some(l)) => usize::from(exact_match_canonical(p, l)),
        _ => 0,
    };
    (lt, pt, cnt)
}

/// Compare two canonicalized trees component by component.
pub fn components(pred: &SqlTree, label: &SqlTree) -> Components {
    let mut c = Components::default();
    // select / select without aggregates
    let lt = label.select.len();
    let pt = pred.select.len();
    c.select = full(lt, pt, multiset_count(&pred.select, &label.select));
    let p_noagg: Vec<&ValUnit> = pred.select.iter().map(|(_, v)| v).collect();
    let l_noagg: Vec<&ValUnit> = label.select.iter().map(|(_, v)| v).collect();
    c.select_no_agg = full(lt, pt, multiset_count(&p_noagg, &l_noagg));
    // where / where without operators
    let lt = label.where_.units.len();
    let pt = pred.where_.units.len();
    c.where_ = full(lt, pt, multiset_count(&pred.where_.units, &label.where_.units));
    let p_noop: Vec<&ValUnit> = pred.where_.units.iter().map(|u| &u.val_unit).collect();
    let l_noop: Vec<&ValUnit> = label.where_.units.iter().map(|u| &u.val_unit).collect();
    c.where_no_op = full(lt, pt, multiset_count(&p_noop, &l_noop));
    // group by (columns without their table)
    let pg: Vec<String> = pred.group_by.iter().map(|u| strip_table(&u.col)).collect();
    let lg: Vec<String> = label.group_by.iter().map(|u| strip_table(&u.col)).collect();
    c.group_no_having = full(lg.len(), pg.len(), multiset_count(&pg, &lg));
    // group by with having
    let pt = usize::from(!pred.group_by.is_empty());
    let lt = usize::from(!label.group_by.is_empty());
    let pcols: Vec<&String> = pred.group_by.iter().map(|u| &u.col).collect();
    let lcols: Vec<&String> = label.group_by.iter().map(|u| &u.col).collect();
    let cnt = usize::from(pt == 1 && lt == 1 && pcols == lcols && pred.having == label.having);
    c.group = full(lt, pt, cnt);
    // order by (limit present on both or neither)
    let pt = usize::from(pred.order_by.is_some());
    let lt = usize::from(label.order_by.is_some());
    let cnt = usize::from(
        label.order_by.is_some() && pred.order_by == label.order_by && pred.limit.is_some() == label.limit.is_some(),
    );
    c.order = full(lt, pt, cnt);
    // and/or (as sets)
    let pa: BTreeSet<Conj> = pred.where_.conj.iter().copied().collect();
    let la: BTreeSet<Conj> = label.where_.conj.iter().copied().collect();
    c.and_or = pa == la;
    // intersect/union/except
    let parts = [
        nested_match(&pred.intersect, &label.intersect),
        nested_match(&pred.except, &label.except),
        nested_match(&pred.union, &label.union),
    ];
    let (lt, pt, cnt) = parts.iter().fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    c.iuen = full(lt, pt, cnt);
    // keywords
    let pk = keywords(pred);
    let lk = keywords(label);
    let cnt = pk.iter().filter(|k| lk.contains(*k)).count();
    c.keywords = full(lk.len(), pk.len(), cnt);
    c
}

fn exact_match_canonical(pred: &SqlTree, label: &SqlTree) -> bool {
    if !components(pred, label).all() {
        return false;
    }
    if let Some(TableUnit::Table(_)) = label.from_tables.first() {
        let mut l = label.from_tables.clone();
        let mut p = pred.from_tables.clone();
        l.sort();
        p.sort();
        return l == p;
    }
    true
}

/// Spider exact-set-match of a predicted query against the gold, both parsed with `schema`. A prediction that
/// does not parse does not match.
pub fn exact_set_match(pred_sql: &str, gold_sql: &str, schema: &Schema) -> Result<bool, ParseError> {
    let gold = canonicalize(&parse(gold_sql, schema)?, schema);
    let Ok(pred) = parse(pred_sql, schema) else { return Ok(false) };
    Ok(exact_match_canonical(&canonicalize(&pred, schema), &gold))
}
