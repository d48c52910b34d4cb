//! The analyst's loop: what copilot remembers and how it is corrected.
//!
//! - `copilot.teach(question, sql)` and `copilot.feedback(history_id, correct, corrected_sql)` store verified
//!   question→SQL pairs in `copilot.examples` — only SQL that passes the gate and plans as the caller, filed under
//!   the tables it reads (resolved by PostgreSQL on the caller's search_path);
//! - at ask time the examples most like the question (BM25 over their questions, `copilot_core::sql::examples`)
//!   among those the caller may see — only examples over tables it can read: row-level security for direct reads,
//!   the same rule (`copilot.readable`) applied once per set of tables at ask time — and whose tables are all in the
//!   schema context are put in the prompt as earlier turns, after the cached schema prefix (most similar last,
//!   nearest the question);
//! - `copilot.ask(question, follow_up => id)` continues the conversation of history row `id` (its chain of
//!   follow-ups, oldest first, as earlier turns); `copilot.refine(sql, instruction)` edits a query as asked;
//! - `copilot.explain(sql)` describes a query clause by clause from its parse tree (no model).
//!
//! Every ask, run and refine goes through [`answer_recorded`], which writes its `copilot.history` row (see
//! [`crate::history`]) whatever the outcome.

use crate::errors::{CopilotError, OrRaise};
use crate::history::{self, Record};
use crate::pipeline::{Answered, Report};
use crate::{api, exec, gucs};
use copilot_core::engine::backend::Exchange;
use copilot_core::sql::schema::Catalog;
use copilot_core::sql::{examples, gate};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// Examples read per ask before ranking (the newest first).
const EXAMPLES_SCANNED: i64 = 5000;
/// Longest model-written summary of `copilot.explain(…, narrative => true)`, in tokens.
const NARRATIVE_TOKENS: usize = 160;
/// How long an ask waits for its history row to be written.
const RECORD_WAIT: Duration = Duration::from_secs(1);
/// Turns of a follow-up chain shown to the model.
const FOLLOW_UP_TURNS: i32 = 6;

thread_local! {
    /// The journal sequence of this session's last recorded ask (for `copilot.last_ask().history_id`).
    static LAST_RECORD: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The history id of this session's last ask, waiting up to two seconds for the history writer.
pub(crate) fn last_history_id() -> Option<i64> {
    LAST_RECORD.get().and_then(|seq| history::receipt(seq, Duration::from_secs(2)))
}

fn current_user() -> String {
    crate::spi::one::<String>("SELECT current_user::text", &[]).ok().flatten().unwrap_or_default()
}

/// Refuse a write up front in a read-only transaction (a hot standby is one): pgrx's writes would otherwise fail
/// with an internal error while taking a transaction id.
fn writable(what: &'static str) -> Result<(), CopilotError> {
    let ro = crate::spi::one::<bool>("SELECT current_setting('transaction_read_only')::bool", &[])?;
    match ro {
        Some(true) => Err(CopilotError::ReadOnly { what }),
        _ => Ok(()),
    }
}

/// What one ask is: its kind for the history, the question as the user wrote it, the conversation it continues.
pub(crate) struct Ask<'a> {
    pub kind: &'static str,
    pub question: &'a str,
    /// The user turn the model gets (the question, or a refine's instruction in context).
    pub prompt_question: String,
    pub follow_up: Option<i64>,
    /// Turns before the question (a refine's query), after the examples and the follow-up chain.
    pub turns: Vec<Exchange>,
}

/// Answer `ask` through the pipeline with the caller's examples and conversation, hand the SQL to `then` (which
/// returns its result and, for `run`, the rows returned), and record the whole thing in `copilot.history` —
/// answered or not.
pub(crate) fn answer_recorded<T>(
    ask: Ask<'_>,
    then: impl FnOnce(&str) -> Result<(T, Option<i64>), CopilotError>,
) -> Result<T, CopilotError> {
    let start = Instant::now();
    let recording = history::enabled();
    let rec = RefCell::new(Record {
        at_epoch: history::now_epoch(),
        role: current_user(),
        kind: ask.kind,
        question: ask.question.to_string(),
        follow_up: ask.follow_up,
        ..Record::default()
    });
    let report: RefCell<Option<Report>> = RefCell::new(None);
    let work = std::panic::AssertUnwindSafe(|| {
        let mut turns = match ask.follow_up {
            Some(id) => conversation(id)?,
            None => Vec::new(),
        };
        turns.extend(ask.turns);
        let (catalog, context, qualifier) = api::context_and_qualifier(Some(&ask.prompt_question))?;
        rec.borrow_mut().schema_fingerprint = Some(history::fingerprint(&context));
        let shown = examples_for(&ask.prompt_question, &catalog)?;
        rec.borrow_mut().examples = shown.iter().map(|(id, _)| *id).collect();
        let mut all: Vec<Exchange> = shown.into_iter().map(|(_, e)| e).collect();
        all.extend(turns);
        let answered = crate::pipeline::answer(&ask.prompt_question, &catalog, &context, &qualifier, &all);
        let Answered { sql, report: r } = match answered {
            Ok(a) => a,
            Err(e) => {
                if let CopilotError::CannotAnswer { report: r, .. } = &e {
                    *report.borrow_mut() = Some((**r).clone());
                }
                return Err(e);
            }
        };
        *report.borrow_mut() = Some(r);
        rec.borrow_mut().sql = Some(sql.clone());
        let (out, rows) = then(&sql)?;
        rec.borrow_mut().rows_returned = rows;
        Ok(out)
    });
    let finish = |rec: &mut Record, report: Option<&Report>| {
        if let Some(r) = report {
            rec.candidates = Some(r.candidates.len() as i32);
            rec.repairs = Some(r.repairs as i32);
        }
        rec.latency_ms = start.elapsed().as_secs_f64() * 1e3;
    };
    // Shared with the error path below, which runs after the work unwound (its borrows are gone by then).
    let (rec_ref, report_ref) = (std::panic::AssertUnwindSafe(&rec), std::panic::AssertUnwindSafe(&report));
    // An ERROR PostgreSQL raises itself (query cancel, statement_timeout during the wait, an SPI error) is recorded
    // too, then raised on: queueing the record touches no catalog, and nothing waits for the writer.
    let result = PgTryBuilder::new(work)
        .catch_others(move |e| {
            if let (true, pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r)) =
                (recording, &e)
            {
                let mut rec = rec_ref.borrow_mut();
                finish(&mut rec, report_ref.borrow().as_ref());
                rec.outcome = crate::errors::sqlstate_text(r.sql_error_code());
                rec.message = Some(r.message().to_string());
                LAST_RECORD.set(history::queue(&rec));
            }
            e.rethrow()
        })
        .execute();
    let mut rec = rec.into_inner();
    finish(&mut rec, report.borrow().as_ref());
    match &result {
        Ok(_) => rec.outcome = "00000".into(),
        Err(e) => {
            rec.outcome = crate::errors::sqlstate_text(e.sqlstate());
            rec.message = Some(e.to_string());
        }
    }
    let seq = if recording { history::queue(&rec) } else { None };
    LAST_RECORD.set(seq);
    // Wait (briefly) for the row, so that it exists for the caller's next statement — `copilot.feedback`, a
    // follow-up, or a look at copilot.history. A writer that is slow to start only costs this wait.
    if let Some(seq) = seq {
        history::receipt(seq, RECORD_WAIT);
    }
    result
}

/// The earlier turns of history row `id`'s conversation, oldest first: the row itself and the rows it follows up,
/// as the caller can see them.
pub(crate) fn conversation(id: i64) -> Result<Vec<Exchange>, CopilotError> {
    if !crate::spi::relation_exists("copilot.history") {
        return Err(CopilotError::NeedsUpgrade { what: "follow-up questions" });
    }
    const CHAIN: &str = "WITH RECURSIVE chain AS ( \
           SELECT id, question, sql, outcome, follow_up, 1 AS depth FROM copilot.history WHERE id = $1 \
           UNION ALL \
           SELECT h.id, h.question, h.sql, h.outcome, h.follow_up, c.depth + 1 \
           FROM copilot.history h JOIN chain c ON h.id = c.follow_up WHERE c.depth < $2) \
         SELECT json_agg(json_build_object('question', question, 'answer', sql, 'outcome', outcome) \
                         ORDER BY depth DESC)::text FROM chain";
    let json: Option<String> = crate::spi::one(CHAIN, &[id.into(), FOLLOW_UP_TURNS.into()])?;
    let rows: Vec<serde_json::Value> = json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
    let Some(last) = rows.last() else {
        return Err(CopilotError::NoSuchHistory { id });
    };
    if last["answer"].is_null() {
        return Err(CopilotError::NothingToFollow { id, outcome: last["outcome"].as_str().unwrap_or("").into() });
    }
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(Exchange { question: r["question"].as_str()?.to_string(), answer: r["answer"].as_str()?.to_string() })
        })
        .collect())
}

/// The verified examples to show with `question` (id, turn), most similar last: at most `copilot.examples`, among
/// those the caller can see whose tables are all in `catalog`.
pub(crate) fn examples_for(question: &str, catalog: &Catalog) -> Result<Vec<(i64, Exchange)>, CopilotError> {
    let k = gucs::EXAMPLES.get().max(0) as usize;
    if k == 0 || !crate::spi::relation_exists("copilot.examples") {
        return Ok(Vec::new());
    }
    const SCAN: &str = "SELECT coalesce(json_agg(json_build_object('id', id, 'question', question, 'sql', sql, \
         'tables', tables)), '[]')::text FROM (SELECT id, question, sql, tables FROM copilot.examples \
         ORDER BY id DESC LIMIT $1) AS e";
    // Read as the tables' owner and apply the SELECT policy's rule once per distinct set of tables, as the caller,
    // instead of once per row through row-level security (215 ms for 5000 examples measured that way): the same
    // examples come out, and none reaches the prompt unless the caller can read every table it names.
    let owner = AsOwner::enter()?;
    let json: Option<String> = crate::spi::one(SCAN, &[EXAMPLES_SCANNED.into()])?;
    drop(owner);
    let rows: Vec<serde_json::Value> = json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
    let shown: std::collections::HashSet<String> = catalog.tables.iter().map(|t| t.display_name(&[])).collect();
    let tables_of = |r: &serde_json::Value| -> Option<Vec<String>> {
        r["tables"].as_array()?.iter().map(|t| t.as_str().map(str::to_string)).collect()
    };
    let mut readable: std::collections::HashMap<Vec<String>, bool> = std::collections::HashMap::new();
    let mut usable: Vec<&serde_json::Value> = Vec::new();
    for r in &rows {
        let Some(tables) = tables_of(r).filter(|ts| !ts.is_empty() && ts.iter().all(|t| shown.contains(t))) else {
            continue;
        };
        let ok = match readable.get(&tables) {
            Some(ok) => *ok,
            None => {
                let ok = crate::spi::one::<bool>("SELECT copilot.readable($1)", &[DatumWithOid::from(tables.clone())])?
                    .unwrap_or(false);
                readable.insert(tables, ok);
                ok
            }
        };
        if ok {
            usable.push(r);
        }
    }
    let questions: Vec<&str> = usable.iter().map(|r| r["question"].as_str().unwrap_or("")).collect();
    let mut ranked = examples::rank(question, &questions, k);
    ranked.reverse();
    Ok(ranked
        .into_iter()
        .filter_map(|(i, _)| {
            let r = usable[i];
            Some((
                r["id"].as_i64()?,
                Exchange { question: r["question"].as_str()?.to_string(), answer: r["sql"].as_str()?.to_string() },
            ))
        })
        .collect())
}

/// Check `sql` as a verified answer: one query the gate passes that plans as the caller. Returns the tables it
/// reads, schema-qualified as PostgreSQL resolves them on the caller's search_path.
fn verify(sql: &str) -> Result<Vec<String>, CopilotError> {
    let checked = exec::gated(sql)?;
    exec::plan(sql)?;
    let names: Vec<String> = gate::relations(&checked)
        .iter()
        .map(|parts| parts.iter().map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join("."))
        .collect();
    // Each name as PostgreSQL resolves it on the caller's search_path, schema-qualified; NULL for a name it does
    // not resolve and for a temporary table (visible to one session only: no example can be filed under it).
    const RESOLVE: &str = "SELECT coalesce(pg_catalog.json_agg(CASE WHEN c.relpersistence <> 't' \
         THEN pg_catalog.format('%I.%I', n.nspname, c.relname) END ORDER BY t.o), '[]')::text \
         FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS t(name, o) \
         LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name) \
         LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";
    let json: Option<String> = crate::spi::one(RESOLVE, &[DatumWithOid::from(names.clone())])?;
    let resolved: Vec<Option<String>> = json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
    if resolved.is_empty() || resolved.len() != names.len() || resolved.iter().any(Option::is_none) {
        return Err(CopilotError::UnfiledExample { sql: sql.to_string() });
    }
    let mut tables: Vec<String> = resolved.into_iter().flatten().collect();
    tables.dedup();
    Ok(tables)
}

/// Restores the caller's user id when dropped (also when an ERROR unwinds through it).
struct AsOwner {
    user: pg_sys::Oid,
    context: i32,
}

impl AsOwner {
    /// Act as the owner of copilot's tables for the writes `teach` and `feedback` make after checking everything
    /// as the caller: nobody needs INSERT or UPDATE on them, so nobody can write rows those checks did not pass.
    /// SECURITY_RESTRICTED_OPERATION, as PostgreSQL does for maintenance commands run as a table's owner.
    fn enter() -> Result<AsOwner, CopilotError> {
        let owner: Option<pg_sys::Oid> =
            crate::spi::one("SELECT relowner FROM pg_catalog.pg_class WHERE oid = 'copilot.examples'::regclass", &[])?;
        let owner = owner.ok_or_else(|| CopilotError::Catalog("copilot.examples has no owner".into()))?;
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        // SAFETY: reading and setting this backend's current user id on its main thread, as PostgreSQL's own
        // SECURITY DEFINER and maintenance code does; Drop puts the saved values back, and a transaction abort
        // restores them too.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(
                owner,
                context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        Ok(AsOwner { user, context })
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the user id and security context saved in `enter`, on the main thread.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Store a verified pair as the caller; an identical pair the caller can already see is returned instead.
fn store(question: &str, sql: &str, source: &str, history_id: Option<i64>) -> Result<i64, CopilotError> {
    if !crate::spi::relation_exists("copilot.examples") {
        return Err(CopilotError::NeedsUpgrade { what: "verified examples" });
    }
    let q = api::validate_question(question)?;
    writable("a verified example")?;
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let tables = verify(sql)?;
    let existing: Option<i64> = crate::spi::one(
        "SELECT (SELECT id FROM copilot.examples WHERE question = $1 AND sql = $2 ORDER BY id LIMIT 1)",
        &[q.into(), sql.into()],
    )?;
    if let Some(id) = existing {
        return Ok(id);
    }
    let role = current_user();
    let owner = AsOwner::enter()?;
    let id: Option<i64> = Spi::get_one_with_args(
        "INSERT INTO copilot.examples (role, question, sql, tables, source, history_id) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        &[role.as_str().into(), q.into(), sql.into(), DatumWithOid::from(tables), source.into(), history_id.into()],
    )?;
    drop(owner);
    id.ok_or_else(|| CopilotError::Catalog("the example was not stored".into()))
}

/// Store a verified question→SQL pair: later questions like it are shown this answer. The SQL must pass the gate
/// and plan as the caller; the pair is visible to every role that can read all the tables it reads.
#[pg_extern(strict, parallel_unsafe)]
fn teach(question: &str, sql: &str) -> i64 {
    store(question, sql, "teach", None).or_raise()
}

/// Say whether history row `history_id` (one of the caller's) was answered correctly. Correct: its SQL becomes a
/// verified example. Wrong with `corrected_sql`: the correction does (checked like `teach`). Returns the example's
/// id, or NULL when none was stored.
#[pg_extern(parallel_unsafe)]
fn feedback(
    history_id: Option<i64>,
    correct: Option<bool>,
    corrected_sql: default!(Option<&str>, "NULL"),
) -> Option<i64> {
    let (Some(history_id), Some(correct)) = (history_id, correct) else {
        CopilotError::NullArgument { what: "history_id and correct" }.raise()
    };
    if !crate::spi::relation_exists("copilot.history") {
        CopilotError::NeedsUpgrade { what: "feedback" }.raise();
    }
    writable("feedback").or_raise();
    let row: Option<String> = crate::spi::one(
        "SELECT (SELECT json_build_object('question', question, 'sql', sql, 'role', role, 'kind', kind, \
         'follow_up', follow_up)::text FROM copilot.history WHERE id = $1)",
        &[history_id.into()],
    )
    .map_err(CopilotError::from)
    .or_raise();
    let row: serde_json::Value = row
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or_else(|| CopilotError::NoSuchHistory { id: history_id }.raise());
    if row["role"].as_str() != Some(current_user().as_str()) {
        CopilotError::NotYourHistory { id: history_id }.raise();
    }
    let question = row["question"].as_str().unwrap_or_default().to_string();
    let teach_sql = match (correct, corrected_sql.map(str::trim).filter(|s| !s.is_empty())) {
        (_, Some(fixed)) => Some(fixed.to_string()),
        (true, None) => row["sql"].as_str().map(str::to_string),
        (false, None) => None,
    };
    // A follow-up's or a refine's words only make sense after the turns before them: they are marked, not taught.
    let standalone = row["kind"].as_str() == Some("ask") && row["follow_up"].is_null();
    if teach_sql.is_some() && !standalone {
        pgrx::notice!(
            "copilot: history row {history_id} continues a conversation, so it is not stored as a verified example; \
             teach the question in full with copilot.teach"
        );
    }
    let example =
        teach_sql.filter(|_| standalone).map(|sql| store(&question, &sql, "feedback", Some(history_id)).or_raise());
    let owner = AsOwner::enter().or_raise();
    Spi::run_with_args(
        "UPDATE copilot.history SET feedback = $2, corrected_sql = $3 WHERE id = $1",
        &[history_id.into(), correct.into(), corrected_sql.into()],
    )
    .map_err(CopilotError::from)
    .or_raise();
    drop(owner);
    example
}

/// Edit a query as the instruction says ("only those from France", "sort by age"), over the caller's tables:
/// the query and the instruction go to the model as a conversation, and the edited SQL is checked like `ask`'s.
#[pg_extern(strict, parallel_unsafe)]
fn refine(sql: &str, instruction: &str) -> String {
    let instruction = api::validate_question(instruction).or_raise();
    api::ensure_preloaded().or_raise();
    exec::gated(sql).or_raise();
    let ask = Ask {
        kind: "refine",
        question: instruction,
        prompt_question: format!("Change that query: {instruction}"),
        follow_up: None,
        turns: vec![Exchange { question: "Write the query we start from.".into(), answer: sql.trim().to_string() }],
    };
    answer_recorded(ask, |s| Ok((s.to_string(), None))).or_raise()
}

/// What a query does, clause by clause, in plain language — built from its parse tree, so it is always right about
/// what the SQL does. With `narrative`, a short summary written by the model is added first.
#[pg_extern(strict, parallel_unsafe)]
fn explain(sql: &str, narrative: default!(bool, false)) -> String {
    let text = copilot_core::sql::explain::explain(sql)
        .map_err(|e| CopilotError::CannotExplain {
            syntax: matches!(e, copilot_core::sql::explain::ExplainError::Parse(_)),
            reason: e.to_string(),
            sql: sql.to_string(),
        })
        .or_raise();
    if !narrative {
        return text;
    }
    format!("{}\n\n{text}", narrate(sql).or_raise())
}

/// What the model says the query does, in two or three sentences, with the caller's schema as context.
fn narrate(sql: &str) -> Result<String, CopilotError> {
    api::ensure_preloaded()?;
    // The caller's tables help the model read the names; without any, the SQL alone is described.
    let context = api::context_for_caller().map(|(_, c)| c).unwrap_or_default();
    let req = copilot_core::engine::backend::GenerateRequest {
        question: format!(
            "In two or three plain sentences for someone who does not read SQL, say what this query returns:\n\
             ```sql\n{}\n```",
            sql.trim()
        ),
        max_new_tokens: NARRATIVE_TOKENS,
        prose: true,
        sampling: crate::gucs::sampling(1),
        ..Default::default()
    };
    let (answer, _) = api::generate(&context, &req)?;
    let text = answer.candidates.first().map(|c| c.text.trim().to_string()).unwrap_or_default();
    if text.is_empty() {
        return Ok("Summary (written by the model): none — it wrote nothing.".into());
    }
    Ok(format!("Summary (written by the model): {text}"))
}
