//! Every error copilot raises, in one place: each kind's SQLSTATE, message, DETAIL and HINT.
//!
//! Code anywhere in the extension builds a [`CopilotError`] (or gets one from core, the gate or the worker) and
//! calls [`CopilotError::raise`]; nothing else chooses a SQLSTATE. Setting names (`copilot.*`) appear here, in
//! messages and hints, and never in core, whose errors the trainer's users see too.

use crate::shmem::{Failure, WorkerState};
use copilot_core::error::ErrorKind;
use copilot_core::sql::gate::Rejection;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CopilotError {
    #[error("the question is empty")]
    EmptyQuestion,
    #[error("the question contains a NUL character")]
    NulInQuestion,
    #[error("the question is {chars} characters long, more than copilot.max_question_chars ({max})")]
    QuestionTooLong { chars: usize, max: usize },
    #[error("the model worker is not running: copilot is not in shared_preload_libraries")]
    NotPreloaded,
    #[error("cannot read the catalog: {0}")]
    Catalog(String),
    #[error("no tables you can SELECT from in {scope}")]
    NoReadableTables { scope: String },
    #[error("not even the table this question needs most fits the context chosen for it ({budget} tokens: copilot.selected_context_tokens, at most copilot.context_budget_tokens)")]
    ContextBudgetTooSmall { budget: usize },
    #[error("the schema context is {bytes} bytes, more than the {limit} a request can carry")]
    ContextTooLarge { bytes: usize, limit: usize },
    #[error("the model failed to load: {reason}")]
    ModelFailed { reason: String, model: String },
    #[error("the model worker is not running")]
    WorkerNotRunning { state: WorkerState },
    #[error("the model is still loading after copilot.request_timeout ({timeout_ms} ms)")]
    StillLoading { timeout_ms: i32, model: String },
    #[error("no free request slot within copilot.request_timeout ({timeout_ms} ms)")]
    NoFreeSlot { timeout_ms: i32, slots: usize },
    #[error("no answer within copilot.request_timeout ({timeout_ms} ms)")]
    NoAnswer { timeout_ms: i32 },
    #[error("the request was lost (the worker restarted)")]
    RequestLost,
    /// The worker (or the engine behind it) could not answer.
    #[error("{message}")]
    Worker { failure: Failure, message: String },
    #[error("the model's answer contains no SQL query")]
    NoSql { raw: String },
    /// No answer the model wrote can run on the caller's database (after repair), or it wrote none.
    #[error("cannot answer this question from the tables you can read: {why}")]
    CannotAnswer { why: String, tables: Vec<String>, tried: Vec<String>, report: Box<crate::pipeline::Report> },
    /// The gate refused SQL before anything executed it.
    #[error("refused: {rejection}")]
    Refused { rejection: Rejection, sql: String },
    /// This database's copilot objects are older than the library (0.1.0): the feature needs its tables.
    #[error("{what} need copilot 0.2.0 in this database")]
    NeedsUpgrade { what: &'static str },
    #[error("cannot tell which tables this SQL reads, so it cannot be filed as an example")]
    UnfiledExample { sql: String },
    #[error("{what} must not be NULL")]
    NullArgument { what: &'static str },
    #[error("cannot store {what} in a read-only transaction")]
    ReadOnly { what: &'static str },
    #[error("no copilot.history row {id} that you can see")]
    NoSuchHistory { id: i64 },
    #[error("copilot.history row {id} has no SQL to follow up (its outcome was {outcome})")]
    NothingToFollow { id: i64, outcome: String },
    #[error("copilot.history row {id} belongs to another role")]
    NotYourHistory { id: i64 },
    #[error("cannot explain this SQL: {reason}")]
    CannotExplain { reason: String, sql: String, syntax: bool },
    /// PostgreSQL refused or failed to run SQL we executed for the caller: its own error, with the SQL added.
    #[error("{message}")]
    Execution { code: PgSqlErrorCode, message: String, detail: Option<String>, hint: Option<String>, sql: String },
}

impl CopilotError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use CopilotError::*;
        use PgSqlErrorCode::*;
        match self {
            EmptyQuestion | NulInQuestion => ERRCODE_INVALID_PARAMETER_VALUE,
            QuestionTooLong { .. } | ContextTooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            NotPreloaded | ModelFailed { .. } | WorkerNotRunning { .. } | RequestLost => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            Catalog(_) => ERRCODE_INTERNAL_ERROR,
            NoReadableTables { .. } => ERRCODE_UNDEFINED_TABLE,
            ContextBudgetTooSmall { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            StillLoading { .. } | NoFreeSlot { .. } | NoAnswer { .. } => ERRCODE_QUERY_CANCELED,
            Worker { failure, .. } => match failure {
                Failure::ModelUnavailable | Failure::WorkerRestarted => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                // Outside PostgreSQL and not the caller's doing: the engine process died and is being restarted.
                Failure::EngineRestarted => ERRCODE_SYSTEM_ERROR,
                Failure::Engine(ErrorKind::PromptTooLong) => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                Failure::Engine(ErrorKind::Model | ErrorKind::Source) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                Failure::Engine(ErrorKind::Cancelled) => ERRCODE_QUERY_CANCELED,
                Failure::Engine(ErrorKind::Tokenizer | ErrorKind::Template | ErrorKind::Inference) => {
                    ERRCODE_INTERNAL_ERROR
                }
                // A remote inference server, as a client of it sees each failure.
                Failure::Engine(ErrorKind::RemoteUnreachable) => ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                Failure::Engine(ErrorKind::RemoteRejected) => ERRCODE_SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
                Failure::Engine(ErrorKind::RemoteServerError) => ERRCODE_CONNECTION_FAILURE,
                Failure::Engine(ErrorKind::RemoteMalformed) => ERRCODE_PROTOCOL_VIOLATION,
                Failure::Engine(ErrorKind::RemoteTimeout) => ERRCODE_QUERY_CANCELED,
            },
            NoSql { .. } => ERRCODE_DATA_EXCEPTION,
            CannotAnswer { .. } => ERRCODE_NO_DATA_FOUND,
            Refused { rejection, .. } => match rejection {
                Rejection::Unparseable(_) | Rejection::Empty => ERRCODE_SYNTAX_ERROR,
                Rejection::DeniedFunction(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
                Rejection::MultipleStatements(_)
                | Rejection::NotAQuery(_)
                | Rejection::DataModifyingCte
                | Rejection::SelectInto
                | Rejection::LockingClause => ERRCODE_READ_ONLY_SQL_TRANSACTION,
                Rejection::TooDeep(_) => ERRCODE_STATEMENT_TOO_COMPLEX,
            },
            NeedsUpgrade { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            NoSuchHistory { .. } | NothingToFollow { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            ReadOnly { .. } => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            NullArgument { .. } => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            UnfiledExample { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            NotYourHistory { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            CannotExplain { syntax: true, .. } => ERRCODE_SYNTAX_ERROR,
            CannotExplain { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            Execution { code, .. } => *code,
        }
    }

    pub fn detail(&self) -> Option<String> {
        use CopilotError::*;
        match self {
            ModelFailed { model, .. } | StillLoading { model, .. } => Some(format!("copilot.model = {model}")),
            WorkerNotRunning { state } => Some(format!("worker state: {}", state.as_str())),
            NoFreeSlot { slots, .. } => Some(format!("{slots} requests are already queued or running")),
            NoSql { raw } => Some(format!("model output: {raw}")),
            CannotAnswer { tables, tried, .. } => {
                let mut d = format!("tables you can read: {}", tables.join(", "));
                for t in tried.iter().take(4) {
                    d.push_str(&format!("\ntried: {t}"));
                }
                Some(d)
            }
            Refused { sql, .. } | CannotExplain { sql, .. } | UnfiledExample { sql } => Some(format!("SQL: {sql}")),
            Execution { detail, sql, .. } => Some(match detail {
                Some(d) => format!("{d}\nSQL: {sql}"),
                None => format!("SQL: {sql}"),
            }),
            _ => None,
        }
    }

    pub fn hint(&self) -> Option<String> {
        use CopilotError::*;
        let h = match self {
            QuestionTooLong { .. } => "Shorten the question or raise copilot.max_question_chars.",
            NotPreloaded => "Add copilot to shared_preload_libraries in postgresql.conf and restart PostgreSQL.",
            NoReadableTables { .. } => {
                "Set search_path or copilot.schemas to the schemas holding your tables, and check your privileges."
            }
            ContextTooLarge { .. } => "Narrow copilot.schemas to the schemas the question is about.",
            ContextBudgetTooSmall { .. } => {
                "Raise copilot.selected_context_tokens and copilot.context_budget_tokens (or \
                 copilot.max_context_tokens), or exclude wide tables with copilot.exclude_tables."
            }
            ModelFailed { .. } | Worker { failure: Failure::ModelUnavailable, .. } => {
                "Fix copilot.model (a GGUF file path, or hf:<owner>/<repo>/<file> in the Hugging Face cache) and run \
                 SELECT pg_reload_conf(); scripts/fetch-model downloads the default model. A model over the engine's \
                 memory limit needs a larger copilot.engine_memory_mb."
            }
            WorkerNotRunning { .. } => {
                "Check the server log for the copilot worker; it restarts automatically after a crash."
            }
            StillLoading { .. } => "Try again shortly, or raise copilot.request_timeout.",
            Worker { failure: Failure::EngineRestarted, .. } => {
                "The model's engine process is restarted automatically; ask again in a few seconds. The server log \
                 has the reason."
            }
            NoAnswer { .. } => "The worker may be busy with other requests; see copilot.status().",
            Worker { failure: Failure::Engine(ErrorKind::PromptTooLong), .. } => {
                "Narrow copilot.schemas to the schemas the question is about, or use a model with a longer context \
                 (copilot.model, copilot.max_context_tokens)."
            }
            NoSql { .. } => "Rephrase the question, naming the tables or columns it is about.",
            CannotAnswer { .. } => {
                "Rephrase the question with the names of the tables or columns it is about, or check copilot.schemas \
                 and your privileges; copilot.ask_verbose() shows every answer tried."
            }
            NeedsUpgrade { .. } => "Run ALTER EXTENSION copilot UPDATE in this database.",
            NoSuchHistory { .. } => {
                "SELECT id, question FROM copilot.history ORDER BY id DESC shows your history; copilot.last_ask() \
                 has the id of your last ask."
            }
            NothingToFollow { .. } => "Follow up a question that was answered, or ask it again.",
            NotYourHistory { .. } => "Feedback is given by the role that asked.",
            UnfiledExample { .. } => {
                "An example must read at least one table (not a temporary one) whose name PostgreSQL resolves; \
                 schema-qualify the table names."
            }
            ReadOnly { .. } => "On a hot standby, connect to the primary; otherwise use a read-write transaction.",
            CannotExplain { .. } => "copilot.explain describes one query (SELECT, WITH, VALUES, set operations).",
            Execution { hint, .. } => return hint.clone(),
            _ => return None,
        };
        Some(h.to_string())
    }

    /// Raise this error as a PostgreSQL ERROR. Never returns.
    pub fn raise(self) -> ! {
        let message = match &self {
            // PostgreSQL's own message stays as it wrote it.
            CopilotError::Execution { message, .. } => message.clone(),
            e => format!("copilot: {e}"),
        };
        let mut r = ErrorReport::new(self.sqlstate(), message, "copilot");
        if let Some(d) = self.detail() {
            r = r.set_detail(d);
        }
        if let Some(h) = self.hint() {
            r = r.set_hint(h);
        }
        r.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<pgrx::spi::Error> for CopilotError {
    fn from(e: pgrx::spi::Error) -> Self {
        CopilotError::Catalog(e.to_string())
    }
}

/// A SQLSTATE as its five characters (as `copilot.history.outcome` stores it).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let c = code as u32;
    (0..5).map(|i| char::from(b'0' + ((c >> (6 * i)) & 0x3F) as u8)).collect()
}

/// `Result::unwrap_or_raise`: the extension's functions end their error paths here.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, CopilotError> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_failure_has_a_sqlstate_and_prompt_too_long_says_what_to_change() {
        for k in ErrorKind::ALL {
            let e = CopilotError::Worker { failure: Failure::Engine(k), message: "x".into() };
            let _ = e.sqlstate();
        }
        let e = CopilotError::Worker {
            failure: Failure::Engine(ErrorKind::PromptTooLong),
            message: "prompt is 9000 tokens".into(),
        };
        assert_eq!(e.sqlstate(), PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED);
        assert!(e.hint().unwrap().contains("copilot.schemas"));
    }

    #[test]
    fn sqlstates_read_as_their_five_characters() {
        assert_eq!(sqlstate_text(PgSqlErrorCode::ERRCODE_QUERY_CANCELED), "57014");
        assert_eq!(sqlstate_text(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND), "P0002");
        assert_eq!(sqlstate_text(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION), "00000");
    }

    #[test]
    fn gate_refusals_keep_their_sqlstates_and_show_the_sql() {
        let r = |rejection| CopilotError::Refused { rejection, sql: "DROP TABLE t".into() };
        assert_eq!(
            r(Rejection::NotAQuery("DROP".into())).sqlstate(),
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION
        );
        assert_eq!(
            r(Rejection::DeniedFunction("pg_sleep".into())).sqlstate(),
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
        );
        assert_eq!(r(Rejection::Empty).sqlstate(), PgSqlErrorCode::ERRCODE_SYNTAX_ERROR);
        assert_eq!(r(Rejection::TooDeep(40)).sqlstate(), PgSqlErrorCode::ERRCODE_STATEMENT_TOO_COMPLEX);
        assert_eq!(r(Rejection::Empty).detail().unwrap(), "SQL: DROP TABLE t");
    }
}
