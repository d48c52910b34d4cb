//! Scoring one answer (execution accuracy, exact matches, valid SQL, schema adherence, Spider exact-set-match) and
//! summarising a run.

use super::exec::{run_pg, Sqlite};
use super::spider_match::{self, Hardness, Schema};
use super::{results, Asked, Bucket, Record, Summary};
use crate::spider::Example;
use crate::sqlnorm;
use copilot_core::sql::gate;
use std::collections::BTreeMap;
use std::time::Duration;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) fn has_order_by(sql: &str) -> bool {
    use sqlparser::ast::Statement;
    let parsed =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::SQLiteDialect {}, sql.trim().trim_end_matches(';'));
    matches!(parsed.as_deref(), Ok([Statement::Query(q)]) if q.order_by.is_some())
}

#[allow(clippy::too_many_arguments)]
pub fn score_one(
    ex: &Example,
    hardness: Option<Hardness>,
    a: &Asked,
    catalog: &copilot_core::sql::schema::Catalog,
    schema: Option<&Schema>,
    sqlite: &mut Sqlite,
    pg: &mut postgres::Client,
    timeout: Duration,
    search_path: &str,
) -> Record {
    let known = sqlnorm::known_names(catalog);
    let mut r = Record {
        index: ex.index,
        db_id: ex.db_id.clone(),
        question: ex.question.clone(),
        gold: ex.query.clone(),
        hardness,
        prediction: a.prediction.clone(),
        ask_error: a.ask_error.clone(),
        latency_s: a.latency_s,
        prompt_tokens: a.prompt_tokens,
        decode_tok_s: a.decode_tok_s,
        valid_sql: false,
        schema_ok: false,
        exact: false,
        exact_novalues: false,
        exact_set: false,
        ex: false,
        exec_error: None,
        gold_rows: None,
        pred_rows: None,
        pipeline: a.pipeline.clone(),
        gold_tables_shown: None,
        context_tables: a.context_tables.as_ref().map(Vec::len),
    };
    if let Some(shown) = &a.context_tables {
        r.gold_tables_shown = gold_tables(ex, schema).map(|gold| gold.iter().all(|t| shown.contains(t)));
    }
    let gold_rs = sqlite.run(&ex.db_id, &ex.query, timeout);
    if let Ok(g) = &gold_rs {
        r.gold_rows = Some(g.rows.len());
    }
    let Some(pred) = a.prediction.as_deref() else { return r };
    let rejection = match gate::check(pred) {
        Ok(checked) => {
            r.valid_sql = true;
            r.schema_ok = gate::unknown_names(&checked, catalog).is_empty();
            None
        }
        Err(e) => Some(e),
    };
    let n = |s: &str| sqlnorm::normalize(s, Some(&known));
    r.exact = matches!((n(pred), n(&ex.query)), (Some(p), Some(g)) if p == g);
    let m = |s: &str| sqlnorm::mask_values(s, Some(&known));
    r.exact_novalues = matches!((m(pred), m(&ex.query)), (Some(p), Some(g)) if p == g);
    if let Some(s) = schema {
        r.exact_set = spider_match::exact_set_match(pred, &ex.query, s).unwrap_or(false);
    }
    if let Some(e) = rejection {
        r.exec_error = Some(format!("not run: {e}"));
        return r;
    }
    match run_pg(pg, search_path, pred, timeout) {
        Ok(p) => {
            r.pred_rows = Some(p.rows.len());
            match &gold_rs {
                Ok(g) => r.ex = results::same_result(g, &p, has_order_by(&ex.query)),
                Err(e) => r.exec_error = Some(format!("gold failed on SQLite: {e}")),
            }
        }
        Err(e) => r.exec_error = Some(e),
    }
    r
}

/// The tables the question's gold query reads, as `db_id.table` (lowercase) — what a context must show for it;
/// None when the gold does not parse against its schema.
pub fn gold_tables(ex: &Example, schema: Option<&Schema>) -> Option<Vec<String>> {
    let tree = spider_match::parse(&ex.query, schema?).ok()?;
    let db = ex.db_id.to_lowercase();
    Some(tree.tables().into_iter().map(|t| format!("{db}.{t}")).collect())
}

/// The columns the question's gold query names, as `db_id.table.column` (lowercase); None when the gold does not
/// parse against its schema.
pub fn gold_columns(ex: &Example, schema: Option<&Schema>) -> Option<Vec<String>> {
    let tree = spider_match::parse(&ex.query, schema?).ok()?;
    let db = ex.db_id.to_lowercase();
    Some(tree.columns().into_iter().map(|c| format!("{db}.{c}")).collect())
}

pub fn summarize(records: &[Record]) -> Summary {
    let n = records.len();
    let pipes = || records.iter().filter_map(|r| r.pipeline.as_ref());
    let frac = |f: &dyn Fn(&Record) -> bool| {
        if n == 0 {
            0.0
        } else {
            records.iter().filter(|r| f(r)).count() as f64 / n as f64
        }
    };
    let mut lat: Vec<f64> =
        records.iter().filter(|r| r.ask_error.is_none() || r.prediction.is_some()).map(|r| r.latency_s).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mut tps: Vec<f64> =
        records.iter().filter_map(|r| r.decode_tok_s).filter(|x| x.is_finite() && *x > 0.0).collect();
    tps.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mut pt: Vec<i64> = records.iter().filter_map(|r| r.prompt_tokens).collect();
    pt.sort_unstable();
    let mut by_hardness = BTreeMap::new();
    for h in Hardness::ALL {
        let rs: Vec<&Record> = records.iter().filter(|r| r.hardness == Some(h)).collect();
        if rs.is_empty() {
            continue;
        }
        let k = rs.len() as f64;
        by_hardness.insert(
            h.as_str().to_string(),
            Bucket {
                n: rs.len(),
                ex: rs.iter().filter(|r| r.ex).count() as f64 / k,
                exact_set: rs.iter().filter(|r| r.exact_set).count() as f64 / k,
            },
        );
    }
    Summary {
        n,
        ex: frac(&|r| r.ex),
        exact: frac(&|r| r.exact),
        exact_novalues: frac(&|r| r.exact_novalues),
        exact_set: frac(&|r| r.exact_set),
        valid_sql: frac(&|r| r.valid_sql),
        schema_ok: frac(&|r| r.schema_ok),
        ask_errors: records.iter().filter(|r| r.ask_error.is_some()).count(),
        exec_errors: records.iter().filter(|r| r.exec_error.is_some()).count(),
        latency_p50_s: percentile(&lat, 50.0),
        latency_p95_s: percentile(&lat, 95.0),
        decode_tok_s_p50: (!tps.is_empty()).then(|| percentile(&tps, 50.0)),
        prompt_tokens_p50: (!pt.is_empty()).then(|| pt[(pt.len() - 1) / 2]),
        by_hardness,
        repaired_asks: pipes().filter(|p| p.repairs > 0).count(),
        repaired_answered: records
            .iter()
            .filter(|r| r.pipeline.as_ref().is_some_and(|p| p.repairs > 0) && r.prediction.is_some())
            .count(),
        voted: pipes().filter(|p| p.decision.starts_with("largest") || p.decision.starts_with("plan")).count(),
        mean_vote_margin: {
            let m: Vec<usize> = pipes().filter(|p| p.decision.starts_with("largest")).map(|p| p.margin).collect();
            (!m.is_empty()).then(|| m.iter().sum::<usize>() as f64 / m.len() as f64)
        },
        refusals: pipes().filter(|p| p.refused).count(),
        greedy_alone: pipes().filter(|p| p.greedy_alone).count(),
        table_recall_n: records.iter().filter(|r| r.gold_tables_shown.is_some()).count(),
        table_recall: {
            let shown: Vec<bool> = records.iter().filter_map(|r| r.gold_tables_shown).collect();
            (!shown.is_empty()).then(|| shown.iter().filter(|s| **s).count() as f64 / shown.len() as f64)
        },
        context_tables_p50: {
            let mut k: Vec<usize> = records.iter().filter_map(|r| r.context_tables).collect();
            k.sort_unstable();
            (!k.is_empty()).then(|| k[(k.len() - 1) / 2])
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 95.0), 5.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
