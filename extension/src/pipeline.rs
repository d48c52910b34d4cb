//! What `copilot.ask` does between the question and the SQL it returns: every answer is checked against the
//! caller's database before anyone sees it.
//!
//! 1. **Candidates**: the worker decodes `copilot.candidates` answers to the question together (the first greedy,
//!    the others sampled with a seed taken from the prompt, so the same question gives the same answer). Unless
//!    `copilot.confidence_threshold` is 1, the greedy answer is decoded alone first, and when it plans (step 2)
//!    and the model gave each of its tokens at least that probability it is the answer: no other candidate is
//!    decoded and nothing is run (most questions; a sampled batch costs several times one row on a
//!    compute-bound CPU). Otherwise the others are decoded — the same samples as in one request — and all go on.
//!    Where the context showed a table from another schema by its bare name (a selection from a large schema),
//!    the SQL is schema-qualified first ([`copilot_core::sql::qualify`]), so what follows and what is returned
//!    resolves on any search_path.
//! 2. **Check**: each distinct SQL passes the gate and is planned as the caller (`EXPLAIN` in a rolled-back,
//!    read-only subtransaction under the statement timer; no data is read). PostgreSQL is the judge of names and
//!    types.
//! 3. **Hints**: a candidate PostgreSQL refused with a HINT naming the same column under another alias, or the
//!    alias it meant (`column t2.maker does not exist` / `Perhaps you meant to reference the column "t1.maker"`),
//!    is rewritten as the hint says and checked again ([`copilot_core::sql::hint`]): no model call, and a small
//!    model asked to repair such a query often writes it again unchanged. Likewise a join on a column the table
//!    lacks (`ON t1.makeid = t2.makeid`, `cars_data` has no `makeid`) takes the column a foreign key pairs with
//!    the other side (`cars_data.id → car_names.makeid`: `t2.id`); a column of a table never joined gets the join
//!    a foreign key gives; a column selected beside an aggregate (`must appear in the GROUP BY clause`, what
//!    SQLite allows) is added to a GROUP BY list. Each is only a candidate, checked and voted like the model's own.
//! 4. **Repair**: when no candidate plans, a failing answer (one PostgreSQL gave a HINT for, else the greedy one)
//!    goes back to the model as a continuation of the same conversation — the SQL it wrote, then PostgreSQL's
//!    message, DETAIL and HINT, and the schema's names closest to a missing one — up to `copilot.repair_attempts`
//!    times. The schema prefix is shared, so the prefix cache makes this cheap.
//! 5. **Vote**: the candidates that plan are run read-only as the caller (time-bounded by `copilot.vote_timeout`,
//!    row-bounded) and grouped by equal results (a multiset of rows, column order free); the largest group wins,
//!    ties go to a group with rows over an empty one, then to the group holding the earliest candidate (the greedy
//!    one first). When nothing can be run (a zero
//!    timeout, or every run failed), candidates are grouped by equal plans instead.
//! 6. **Refusal**: `ask` raises `CopilotError::CannotAnswer` (SQLSTATE P0002), naming why and what tables exist,
//!    instead of handing back SQL, when the schema names almost nothing the question asks about (at most
//!    `copilot.grounding_threshold` of its words), the question is not close in meaning to any table either (the
//!    engine's sentence encoder, `copilot.embedding_model`: cosine below `copilot.grounding_similarity` — so
//!    "musicians" still finds `singer`), and the model — asked in the same request, on the same cached schema
//!    prefix, whether these tables can answer it — leans to no (at least `copilot.refusal_threshold`), or
//!    when nothing plans after repair. (A model that wrote no SQL at all is
//!    `NoSql`, 22000, with what it wrote in DETAIL.)
//!
//! Everything is recorded in a [`Report`] (`copilot.ask_verbose`) and counted on the board (`copilot.status()`).

use crate::errors::CopilotError;
use crate::exec;
use crate::gucs;
use crate::shmem::{PipelineCounts, BOARD};
use copilot_core::engine::backend::{Candidate, Exchange, GenerateRequest};
use copilot_core::sql::gate;
use copilot_core::sql::hint::{apply_hint, group_by_ungrouped, join_by_foreign_key, join_missing_table};
use copilot_core::sql::prompt::repair_message;
use copilot_core::sql::schema::{Catalog, Qualifier};
use copilot_core::sql::suggest::{similar_names, Grounding};
use serde::Serialize;
use std::collections::BTreeMap;

/// Rows a candidate may return when it runs for the vote; past this its result counts as "this many or more".
const VOTE_ROWS: usize = 1000;

/// What happened to one candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// `greedy`, `sample N`, or `repair N`.
    pub source: String,
    /// What the model wrote.
    pub text: String,
    /// The SQL taken from it, table names qualified where the context showed them bare.
    pub sql: Option<String>,
    /// The SQL as the model wrote it (what a repair shows it again), when qualifying changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written: Option<String>,
    /// The lowest probability the model gave one of its tokens (how sure it was), when the backend says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// `null` when it planned; otherwise why not (the gate's or PostgreSQL's words, with the SQLSTATE).
    pub error: Option<String>,
    /// The vote group it fell in, if it was run or compared.
    pub group: Option<usize>,
    /// Rows it returned when run for the vote (`VOTE_ROWS + 1` means "more").
    pub rows: Option<usize>,
    #[serde(skip)]
    plan: Option<String>,
}

/// The whole story of one answer, for `copilot.ask_verbose`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub question: String,
    pub candidates: Vec<Tried>,
    /// The greedy answer was returned alone: it planned and the model was sure enough of every token
    /// (`copilot.confidence_threshold`), so no other candidate was decoded.
    pub greedy_alone: bool,
    pub repairs: usize,
    /// Candidates rewritten as PostgreSQL's HINT said (`column t2.x does not exist` / `… the column "t1.x"`), or
    /// with a join column taken from the foreign key between the two tables.
    pub hints_applied: usize,
    /// How the winner was chosen: `only candidate`, `largest result group`, `tie, earliest candidate`,
    /// `plan agreement`, or why nothing was returned.
    pub decision: String,
    /// The winning group's size minus the runner-up's (0 with a single group or a tie).
    pub margin: usize,
    pub groups: Vec<Vec<usize>>,
    pub winner: Option<usize>,
    pub refused: Option<String>,
    /// The model's probability that the schema cannot answer the question, when it was asked.
    pub p_unanswerable: Option<f32>,
    /// The share of the question's words the schema speaks of (`copilot_core::sql::suggest::grounding`).
    pub grounding: Option<f32>,
    /// For a poorly grounded question, when the engine has a sentence encoder: the cosine between the question and
    /// its closest table (at least `copilot.grounding_similarity`: the judge was not asked).
    pub closeness: Option<f32>,
}

/// The SQL `ask` returns, and how it was chosen.
pub struct Answered {
    pub sql: String,
    pub report: Report,
}

fn describe(e: &CopilotError) -> String {
    match e {
        CopilotError::Execution { message, detail, hint, .. } => {
            let mut s = format!("ERROR:  {message}");
            if let Some(d) = detail {
                s.push_str(&format!("\nDETAIL:  {d}"));
            }
            if let Some(h) = hint {
                s.push_str(&format!("\nHINT:  {h}"));
            }
            s
        }
        e => format!("ERROR:  {e}"),
    }
}

/// Gate, then plan as the caller. `Ok(plan text)` or the reason, in words for the model and the report.
fn check(sql: &str, catalog: &Catalog) -> Result<String, String> {
    let checked = gate::check(sql).map_err(|r| format!("ERROR:  the query is not allowed: {r}"))?;
    crate::pg_gate::check(sql).map_err(|r| format!("ERROR:  the query is not allowed: {r}"))?;
    exec::plan(sql).map_err(|e| {
        let mut why = describe(&e);
        if let Some(s) = similar_names(&why, catalog) {
            why.push_str(&format!("\n{s}"));
        }
        // The gate's own reading of unknown names, when PostgreSQL's message does not already say it.
        let unknown: Vec<String> = gate::unknown_names(&checked, catalog).iter().map(|u| u.to_string()).collect();
        if !unknown.is_empty() && !why.contains("does not exist") {
            why.push_str(&format!("\nAlso: {}.", unknown.join("; ")));
        }
        why
    })
}

fn tried(source: String, c: &Candidate, qualifier: &Qualifier) -> Tried {
    let sql = c.sql.as_deref().map(|s| qualifier.qualify(s));
    let written = c.sql.clone().filter(|w| sql.as_ref() != Some(w));
    Tried {
        source,
        text: c.text.clone(),
        sql,
        written,
        min_p: c.min_p,
        error: None,
        group: None,
        rows: None,
        plan: None,
    }
}

/// Check every candidate from `from` on (each distinct SQL once; one equal to a candidate before `from` takes that
/// one's outcome).
fn check_all(list: &mut [Tried], from: usize, catalog: &Catalog) {
    let mut seen: BTreeMap<String, Result<String, String>> = BTreeMap::new();
    for t in &list[..from] {
        let outcome = match (&t.plan, &t.error) {
            (Some(plan), _) => Ok(plan.clone()),
            (None, Some(why)) => Err(why.clone()),
            (None, None) => continue,
        };
        if let Some(sql) = &t.sql {
            seen.entry(sql.trim().to_string()).or_insert(outcome);
        }
    }
    for t in list[from..].iter_mut() {
        let Some(sql) = t.sql.clone() else {
            t.error = Some("the model wrote no SQL".into());
            continue;
        };
        let r = seen.entry(sql.trim().to_string()).or_insert_with(|| check(&sql, catalog)).clone();
        match r {
            Ok(plan) => t.plan = Some(plan),
            Err(why) => t.error = Some(why),
        }
    }
}

/// Rows as PostgreSQL writes their values (NULL as `None`).
type Rows = Vec<Vec<Option<String>>>;

/// A result as a vote key: every row's values sorted (column order free), rows sorted (a multiset).
fn result_key(rows: &[Vec<Option<String>>]) -> Rows {
    let mut rows: Rows = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.sort();
            r
        })
        .collect();
    rows.sort();
    rows
}

/// Group the candidates that planned (indexes into `list`) by equal results — `run` gives a candidate's rows, or
/// `None` when it failed or ran out of time — or by equal plans when nothing could be run (`execute` false, or
/// every run failed), and pick the winner. Returns (winner, decision, margin, groups).
fn vote(
    list: &mut [Tried],
    execute: bool,
    run: impl Fn(&str) -> Option<Rows>,
) -> (usize, String, usize, Vec<Vec<usize>>) {
    let planned: Vec<usize> = (0..list.len()).filter(|&i| list[i].plan.is_some()).collect();
    if planned.len() == 1 {
        return (planned[0], "only candidate".into(), 0, vec![planned]);
    }
    let mut by_result: Vec<(Rows, Vec<usize>)> = Vec::new();
    if execute {
        let mut runs: BTreeMap<String, Option<(Rows, usize)>> = BTreeMap::new();
        for &i in &planned {
            let sql = list[i].sql.clone().unwrap_or_default();
            let run = runs
                .entry(sql.trim().to_string())
                .or_insert_with(|| run(&sql).map(|r| (result_key(&r), r.len())))
                .clone();
            if let Some((key, n)) = run {
                list[i].rows = Some(n);
                match by_result.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, members)) => members.push(i),
                    None => by_result.push((key, vec![i])),
                }
            }
        }
    }
    let (mut groups, how): (Vec<Vec<usize>>, &str) = if by_result.is_empty() {
        // Nothing could be run: agree on plans instead.
        let mut by_plan: Vec<(String, Vec<usize>)> = Vec::new();
        for &i in &planned {
            let plan = list[i].plan.clone().unwrap_or_default();
            match by_plan.iter_mut().find(|(p, _)| *p == plan) {
                Some((_, members)) => members.push(i),
                None => by_plan.push((plan, vec![i])),
            }
        }
        (by_plan.into_iter().map(|(_, m)| m).collect(), "plan agreement")
    } else {
        (by_result.into_iter().map(|(_, m)| m).collect(), "largest result group")
    };
    // Largest group; among equals, one whose result has rows before an empty one (a question is asked of data
    // that answers it), then the one holding the earliest candidate (members are in candidate order). Groups are
    // returned (and numbered) in that order: the winner's first.
    groups.sort_by_key(|g| (std::cmp::Reverse(g.len()), list[g[0]].rows == Some(0), g[0]));
    for (g, members) in groups.iter().enumerate() {
        for &i in members {
            list[i].group = Some(g);
        }
    }
    let runner_up = groups.get(1).map_or(0, Vec::len);
    let margin = groups[0].len() - runner_up;
    let decision = if groups.len() > 1 && margin == 0 { format!("{how}, tie: earliest candidate") } else { how.into() };
    (groups[0][0], decision, margin, groups)
}

/// Answer `question` (after the conversation `history`) over the caller's `catalog`, rendered as `context`.
pub fn answer(
    question: &str,
    catalog: &Catalog,
    context: &str,
    qualifier: &Qualifier,
    history: &[Exchange],
) -> Result<Answered, CopilotError> {
    let k = gucs::CANDIDATES.get().max(1) as usize;
    let sure_at = gucs::CONFIDENCE_THRESHOLD.get();
    // Decode the greedy answer alone first, and the others only if it is not good enough.
    let greedy_first = k > 1 && sure_at < 1.0;
    let mut decoded = if greedy_first { 1 } else { k };
    let max_new_tokens = gucs::MAX_NEW_TOKENS.get().max(1) as usize;
    let threshold = gucs::REFUSAL_THRESHOLD.get();
    // Only a question the schema barely speaks of is put to the model's judgement (a cheap lexical check first).
    let words = Grounding::of(question, catalog);
    let grounding = words.as_ref().map(Grounding::share);
    let poorly_grounded = grounding.is_some_and(|g| f64::from(g) <= gucs::GROUNDING_THRESHOLD.get());
    let judge = threshold < 1.0 && history.is_empty() && poorly_grounded;
    let req = GenerateRequest {
        schema_context: String::new(),
        history: history.to_vec(),
        question: question.to_string(),
        max_new_tokens,
        sampling: gucs::sampling(decoded),
        judge,
        // The engine may find the question close in meaning to a table, and then skip the judge.
        grounding: words
            .filter(|_| judge)
            .map(|g| Box::new(Grounding { min_similarity: gucs::GROUNDING_SIMILARITY.get() as f32, ..g })),
        prose: false,
        rank_tables: false,
    };
    let (answer, _) = crate::api::generate(context, &req)?;
    let mut list: Vec<Tried> = answer
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| tried(if i == 0 { "greedy".into() } else { format!("sample {i}") }, c, qualifier))
        .collect();
    let mut report = Report {
        question: question.to_string(),
        p_unanswerable: answer.p_unanswerable,
        grounding,
        closeness: answer.closeness,
        ..Report::default()
    };
    if let Some(p) = answer.p_unanswerable.filter(|p| f64::from(*p) >= threshold) {
        let near = match answer.closeness {
            Some(c) => format!(", nor is it close in meaning to any of them (cosine {c:.2})"),
            None => String::new(),
        };
        let why = format!(
            "the tables name almost nothing it asks about ({:.0} % of its words){near}, and asked whether they can \
             answer it, the model leans to no (p = {p:.2}, copilot.refusal_threshold = {threshold})",
            100.0 * grounding.unwrap_or(0.0)
        );
        return Err(refuse(report, list, why, catalog, decoded));
    }
    check_all(&mut list, 0, catalog);
    if greedy_first {
        let sure = list[0].min_p.is_some_and(|p| f64::from(p) >= sure_at);
        if list[0].plan.is_some() && sure {
            report.greedy_alone = true;
        } else {
            let rest = GenerateRequest {
                sampling: copilot_core::engine::backend::Sampling { skip_greedy: true, ..gucs::sampling(k) },
                judge: false,
                ..req.clone()
            };
            let (more, _) = crate::api::generate(context, &rest)?;
            let from = list.len();
            list.extend(
                more.candidates.iter().enumerate().map(|(i, c)| tried(format!("sample {}", i + 1), c, qualifier)),
            );
            check_all(&mut list, from, catalog);
            decoded = k;
        }
    }
    let mut hinted = apply_hints(&mut list, 0, catalog, qualifier, &mut report);

    // Repair the greedy answer while nothing plans.
    let attempts = gucs::REPAIR_ATTEMPTS.get().max(0) as usize;
    let mut conversation = history.to_vec();
    // The answer to repair: one PostgreSQL already says how to fix (a HINT), else the greedy one.
    let mut last = list
        .iter()
        .position(|t| t.sql.is_some() && t.error.as_deref().is_some_and(|e| e.contains("HINT:")))
        .unwrap_or(0);
    let mut ask = question.to_string();
    while !list.iter().any(|t| t.plan.is_some()) && report.repairs < attempts {
        let (Some(sql), Some(error)) =
            (list[last].written.clone().or(list[last].sql.clone()), list[last].error.clone())
        else {
            break;
        };
        conversation.push(Exchange { question: ask.clone(), answer: sql });
        ask = repair_message(&error);
        let repair = GenerateRequest {
            history: conversation.clone(),
            question: ask.clone(),
            sampling: gucs::sampling(1),
            judge: false,
            ..req.clone()
        };
        let (fixed, _) = crate::api::generate(context, &repair)?;
        report.repairs += 1;
        let Some(first) = fixed.candidates.first() else { break };
        let mut t = tried(format!("repair {}", report.repairs), first, qualifier);
        check_all(std::slice::from_mut(&mut t), 0, catalog);
        list.push(t);
        last = list.len() - 1;
        hinted = apply_hints(&mut list, hinted, catalog, qualifier, &mut report);
    }

    let planned = list.iter().filter(|t| t.plan.is_some()).count();
    if planned == 0 && list.iter().all(|t| t.sql.is_none()) {
        report.decision = "no SQL".into();
        report.candidates = list.clone();
        count(&report, decoded);
        return Err(CopilotError::NoSql { raw: list[0].text.clone() });
    }
    if planned == 0 {
        let why = "none of the answers the model wrote can run on this database".to_string();
        return Err(refuse(report, list, why, catalog, decoded));
    }
    let timeout_ms = gucs::VOTE_TIMEOUT_MS.get();
    let (winner, decision, margin, groups) =
        vote(&mut list, timeout_ms > 0, |sql| exec::result_rows(sql, timeout_ms, VOTE_ROWS).ok());
    report.winner = Some(winner);
    report.decision = match list[winner].min_p {
        Some(p) if report.greedy_alone => format!(
            "greedy answer alone: it plans and its least likely token had p = {p:.2} (copilot.confidence_threshold \
             = {sure_at})"
        ),
        _ => decision,
    };
    report.margin = margin;
    report.groups = groups;
    let sql = list[winner].sql.clone().unwrap_or_default();
    report.candidates = list;
    count(&report, decoded);
    Ok(Answered { sql, report })
}

/// Each candidate from `from` on that failed with a PostgreSQL HINT naming the column or alias it meant, with that
/// change made; with a join column its table lacks replaced by the one a foreign key pairs with the other side; or
/// with a join added to the table that has a column no table of its FROM clause has ([`copilot_core::sql::hint`]);
/// or with a column selected beside an aggregate added to a GROUP BY list — checked and added to the list (they take
/// part in the vote like the others: the same answer with the correction). A corrected query that fails again is
/// corrected again, up to three rounds (a query may read two columns it never joined, or select two ungrouped
/// columns).
/// And an answer whose bare table names were qualified with one schema is tried with them resolved in each other
/// shown schema that has tables of those names ([`Qualifier::in_schema`]): a look-alike schema shown beside the
/// question's, which the question's words could not tell apart, may be the one whose columns the answer reads.
/// Returns the list's length: where the next call starts.
fn apply_hints(
    list: &mut Vec<Tried>,
    from: usize,
    catalog: &Catalog,
    qualifier: &Qualifier,
    report: &mut Report,
) -> usize {
    const ROUNDS: usize = 3;
    // The shown tables and their schemas, for the look-alike correction: the same for every candidate.
    let shown = || catalog.tables.iter().map(|t| (t.schema.as_str(), t.name.as_str()));
    let mut schemas: Vec<&str> = shown().map(|(s, _)| s).collect();
    schemas.sort_unstable();
    schemas.dedup();
    let mut next = from;
    for _ in 0..ROUNDS {
        let mut added: Vec<Tried> = Vec::new();
        for t in &list[next..] {
            let (Some(sql), Some(error)) = (&t.sql, &t.error) else { continue };
            let hinted = apply_hint(sql, error).into_iter().map(|s| (s, "PostgreSQL's hint applied"));
            let keyed = join_by_foreign_key(sql, error, catalog).into_iter().map(|s| (s, "join key by foreign key"));
            let joined = join_missing_table(sql, error, catalog).into_iter().map(|s| (s, "missing table joined"));
            let grouped = group_by_ungrouped(sql, error).into_iter().map(|s| (s, "ungrouped column grouped"));
            let elsewhere = t.written.as_deref().into_iter().flat_map(|w| {
                schemas
                    .iter()
                    .filter_map(move |s| qualifier.in_schema(s, shown()).map(|q| q.qualify(w)))
                    .map(|s| (s, "tables of a look-alike schema"))
            });
            for (fixed, how) in hinted.chain(keyed).chain(joined).chain(grouped).chain(elsewhere) {
                if list.iter().chain(&added).any(|o| o.sql.as_deref() == Some(fixed.as_str())) {
                    continue;
                }
                let mut h = Tried {
                    source: format!("{}, {how}", t.source),
                    text: t.text.clone(),
                    sql: Some(fixed),
                    written: None,
                    min_p: None,
                    error: None,
                    group: None,
                    rows: None,
                    plan: None,
                };
                check_all(std::slice::from_mut(&mut h), 0, catalog);
                report.hints_applied += 1;
                added.push(h);
            }
        }
        next = list.len();
        if added.is_empty() {
            break;
        }
        list.extend(added);
    }
    list.len()
}

/// The refusal error, with the report (and the board's counters) saying why.
fn refuse(mut report: Report, list: Vec<Tried>, why: String, catalog: &Catalog, k: usize) -> CopilotError {
    report.decision = "refused".into();
    report.refused = Some(why.clone());
    let tried = list.iter().filter_map(|t| Some(format!("{} → {}", t.sql.as_ref()?, t.error.as_ref()?))).collect();
    report.candidates = list;
    count(&report, k);
    CopilotError::CannotAnswer {
        why,
        tables: catalog.tables.iter().map(|t| t.name.clone()).collect(),
        tried,
        report: Box::new(report),
    }
}

/// Add this answer to the board's counters (`copilot.status()`).
fn count(report: &Report, k: usize) {
    let c = PipelineCounts {
        asks: 1,
        candidates: k as u64,
        planned_first_try: report.candidates.iter().take(k).filter(|t| t.plan.is_some()).count() as u64,
        repairs: report.repairs as u64,
        repaired: u64::from(report.repairs > 0 && report.winner.is_some()),
        hints_applied: report.hints_applied as u64,
        votes: u64::from(report.groups.len() > 1),
        margin_sum: report.margin as u64,
        refusals: u64::from(report.refused.is_some()),
        greedy_alone: u64::from(report.greedy_alone),
    };
    BOARD.exclusive().count_pipeline(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(i: usize, planned: bool) -> Tried {
        Tried {
            source: format!("c{i}"),
            text: String::new(),
            sql: Some(format!("SELECT {i}")),
            written: None,
            min_p: None,
            error: (!planned).then(|| "ERROR:  no".into()),
            group: None,
            rows: None,
            plan: planned.then(|| format!("plan {}", i % 2)),
        }
    }

    #[test]
    fn result_keys_ignore_column_and_row_order() {
        let a = vec![vec![Some("1".into()), Some("x".into())], vec![Some("2".into()), None]];
        let b = vec![vec![None, Some("2".into())], vec![Some("x".into()), Some("1".into())]];
        assert_eq!(result_key(&a), result_key(&b));
        let c = vec![vec![Some("1".into()), Some("x".into())]];
        assert_ne!(result_key(&a), result_key(&c), "a multiset: row counts matter");
    }

    #[test]
    fn without_execution_plans_are_compared_and_ties_go_to_the_earliest() {
        // Candidates 0 and 2 plan alike ("plan 0"), 1 and 3 alike ("plan 1"): a tie between two groups of two.
        let mut list: Vec<Tried> = (0..4).map(|i| t(i, true)).collect();
        let (w, decision, margin, groups) = vote(&mut list, false, |_| None);
        assert_eq!((w, margin), (0, 0));
        assert!(decision.contains("tie"), "{decision}");
        assert_eq!(groups, vec![vec![0, 2], vec![1, 3]]);
        // With candidate 0 failing, the plan-1 group (1, 3) outnumbers (2): it wins by one.
        let mut list: Vec<Tried> = (0..4).map(|i| t(i, i != 0)).collect();
        let (w, decision, margin, groups) = vote(&mut list, false, |_| None);
        assert_eq!((w, margin, decision.as_str()), (1, 1, "plan agreement"));
        assert_eq!(groups, vec![vec![1, 3], vec![2]], "the winning group first");
        assert_eq!((list[1].group, list[2].group), (Some(0), Some(1)), "groups numbered in that order");
        assert_eq!(list[0].group, None, "a candidate that did not plan takes no part");
    }

    #[test]
    fn a_single_planned_candidate_wins_alone() {
        let mut list: Vec<Tried> = (0..3).map(|i| t(i, i == 2)).collect();
        assert_eq!(vote(&mut list, true, |_| unreachable!("one candidate needs no run")).0, 2);
    }

    #[test]
    fn results_group_candidates_and_failed_or_slow_runs_take_no_part() {
        // Results by SQL: 0 and 2 return {1}, 1 returns {2}, 3 fails (timeout): {0, 2} wins by one over {1}.
        let rows = |v: &str| Some(vec![vec![Some(v.to_string())]]);
        let run = |sql: &str| match sql {
            "SELECT 0" | "SELECT 2" => rows("1"),
            "SELECT 1" => rows("2"),
            _ => None,
        };
        let mut list: Vec<Tried> = (0..4).map(|i| t(i, true)).collect();
        let (w, decision, margin, groups) = vote(&mut list, true, run);
        assert_eq!((w, margin, decision.as_str()), (0, 1, "largest result group"));
        assert_eq!(groups, vec![vec![0, 2], vec![1]]);
        assert_eq!(list[3].group, None, "a failed run takes no part");
        // Every run failing: fall back to plans.
        let mut list: Vec<Tried> = (0..4).map(|i| t(i, true)).collect();
        assert_eq!(vote(&mut list, true, |_| None).1, "plan agreement, tie: earliest candidate");
        // A tie between an empty result and one with rows goes to the rows, even when the empty one came first.
        let run = |sql: &str| if sql == "SELECT 0" { Some(vec![]) } else { rows("x") };
        let mut list: Vec<Tried> = (0..2).map(|i| t(i, true)).collect();
        let (w, decision, _, _) = vote(&mut list, true, run);
        assert_eq!((w, decision.contains("tie")), (1, true));
    }
}
