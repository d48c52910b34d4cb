//! Phase 2: normalisation before comparison.

use std::collections::BTreeSet;

use super::*;

// ---------------------------------------------------------------------------------------------------------------
// Normalisation before comparison (the official defaults: values masked at parse time, DISTINCT off, FK columns
// mapped).

/// Drop DISTINCT flags and map foreign-key-linked columns of the tables in FROM to their representative.
pub fn canonicalize(tree: &SqlTree, schema: &Schema) -> SqlTree {
    let valid: BTreeSet<String> = tree
        .from_tables
        .iter()
        .filter_map(|t| match t {
            TableUnit::Table(n) => Some(n.trim_matches('_').to_string()),
            TableUnit::Sql(_) => None,
        })
        .flat_map(|t| {
            schema
                .tables
                .iter()
                .filter(|(n, _)| *n == t)
                .flat_map(|(n, cols)| cols.iter().map(move |c| format!("__{n}.{c}__")))
                .collect::<Vec<_>>()
        })
        .collect();
    canon_sql(tree, &valid, schema)
}

fn canon_col(c: &ColUnit, valid: &BTreeSet<String>, schema: &Schema) -> ColUnit {
    let col = match schema.fk_map.get(&c.col) {
        Some(m) if valid.contains(&c.col) => m.clone(),
        _ => c.col.clone(),
    };
    ColUnit { agg: c.agg, col, distinct: false }
}

fn canon_vu(v: &ValUnit, valid: &BTreeSet<String>, schema: &Schema) -> ValUnit {
    ValUnit {
        op: v.op,
        left: canon_col(&v.left, valid, schema),
        right: v.right.as_ref().map(|r| canon_col(r, valid, schema)),
    }
}

fn canon_conds(c: &Conds, valid: &BTreeSet<String>, schema: &Schema) -> Conds {
    Conds {
        units: c
            .units
            .iter()
            .map(|u| CondUnit { val_unit: canon_vu(&u.val_unit, valid, schema), ..u.clone() })
            .collect(),
        conj: c.conj.clone(),
    }
}

fn canon_sql(t: &SqlTree, valid: &BTreeSet<String>, schema: &Schema) -> SqlTree {
    SqlTree {
        select: t.select.iter().map(|(a, v)| (*a, canon_vu(v, valid, schema))).collect(),
        from_tables: t.from_tables.clone(),
        from_conds: canon_conds(&t.from_conds, valid, schema),
        where_: canon_conds(&t.where_, valid, schema),
        group_by: t.group_by.iter().map(|c| canon_col(c, valid, schema)).collect(),
        having: canon_conds(&t.having, valid, schema),
        order_by: t.order_by.as_ref().map(|(d, vs)| (*d, vs.iter().map(|v| canon_vu(v, valid, schema)).collect())),
        limit: t.limit,
        intersect: t.intersect.as_ref().map(|x| Box::new(canon_sql(x, valid, schema))),
        union: t.union.as_ref().map(|x| Box::new(canon_sql(x, valid, schema))),
        except: t.except.as_ref().map(|x| Box::new(canon_sql(x, valid, schema))),
    }
}
