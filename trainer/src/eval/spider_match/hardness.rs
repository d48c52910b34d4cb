//! Phase 4: Spider's hardness levels, counted on the gold query.

use super::*;

// ---------------------------------------------------------------------------------------------------------------
// Hardness.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hardness {
    Easy,
    Medium,
    Hard,
    Extra,
}

impl Hardness {
    pub const ALL: [Hardness; 4] = [Hardness::Easy, Hardness::Medium, Hardness::Hard, Hardness::Extra];
    pub fn as_str(self) -> &'static str {
        match self {
            Hardness::Easy => "easy",
            Hardness::Medium => "medium",
            Hardness::Hard => "hard",
            Hardness::Extra => "extra",
        }
    }
}

fn component1(t: &SqlTree) -> usize {
    let mut n = 0;
    n += usize::from(!t.where_.is_empty());
    n += usize::from(!t.group_by.is_empty());
    n += usize::from(t.order_by.is_some());
    n += usize::from(t.limit.is_some());
    n += t.from_tables.len().saturating_sub(1);
    let all = [&t.from_conds, &t.where_, &t.having];
    n += all.iter().map(|c| c.conj.iter().filter(|x| **x == Conj::Or).count()).sum::<usize>();
    n += all.iter().map(|c| c.units.iter().filter(|u| u.op == WhereOp::Like).count()).sum::<usize>();
    n
}

fn nested(t: &SqlTree) -> usize {
    let mut n = 0;
    for c in [&t.from_conds, &t.where_, &t.having] {
        for u in &c.units {
            n += usize::from(matches!(u.val1, Val::Sql(_)));
            n += usize::from(matches!(u.val2, Val::Sql(_)));
        }
    }
    n + usize::from(t.intersect.is_some()) + usize::from(t.except.is_some()) + usize::from(t.union.is_some())
}

fn others(t: &SqlTree) -> usize {
    let mut aggs = t.select.iter().filter(|(a, _)| *a != Agg::None).count();
    // Official quirk: a condition unit's first field is its NOT flag, which the aggregate count reads.
    aggs += t.where_.units.iter().filter(|u| u.not).count();
    aggs += t.group_by.iter().filter(|c| c.agg != Agg::None).count();
    if let Some((_, vs)) = &t.order_by {
        aggs += vs.iter().filter(|v| v.left.agg != Agg::None).count();
        aggs += vs.iter().filter_map(|v| v.right.as_ref()).filter(|c| c.agg != Agg::None).count();
    }
    // Official quirk: HAVING's list holds the and/or words too, and each counts.
    aggs += t.having.units.iter().filter(|u| u.not).count() + t.having.conj.len();
    let mut n = usize::from(aggs > 1);
    n += usize::from(t.select.len() > 1);
    n += usize::from(t.where_.list_len() > 1);
    n += usize::from(t.group_by.len() > 1);
    n
}

/// The official hardness level of a (gold) query.
pub fn hardness(t: &SqlTree) -> Hardness {
    let c1 = component1(t);
    let c2 = nested(t);
    let o = others(t);
    if c1 <= 1 && o == 0 && c2 == 0 {
        Hardness::Easy
    } else if (o <= 2 && c1 <= 1 && c2 == 0) || (c1 <= 2 && o < 2 && c2 == 0) {
        Hardness::Medium
    } else if (o > 2 && c1 <= 2 && c2 == 0)
        || (c1 > 2 && c1 <= 3 && o <= 2 && c2 == 0)
        || (c1 <= 1 && o == 0 && c2 <= 1)
    {
        Hardness::Hard
    } else {
        Hardness::Extra
    }
}
