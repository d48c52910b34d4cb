//! The studio's only way to the database: one connection per logged-in session, as that session's role. Every
//! statement is a `&'static str` constant (see [`sql`]); what the user typed only ever travels as a bind parameter.

#[cfg(test)]
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, CancelToken, Client, Config, NoTls};

/// Every statement the studio sends. Parameters are all text (`$n::text`), cast in SQL where a function wants
/// another type, and every result column is cast to text, so one row shape serves them all.
pub mod sql {
    /// The role behind the connection, whether it is a superuser, and the database.
    pub const WHOAMI: &str =
        "SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)::text, \
         current_database()::text";
    /// Ask (or continue a conversation: `$2` is the history id of the thread's last answer, or NULL).
    pub const ASK: &str = "SELECT copilot.ask($1::text, follow_up => $2::text::bigint)";
    /// The history id of this connection's last answer.
    pub const LAST_ASK: &str = "SELECT history_id::text FROM copilot.last_ask()";
    /// Run SQL through copilot's gate, read-only, time- and row-bounded, as the caller: one JSON object per row.
    pub const RUN_SQL: &str = "SELECT r::text FROM copilot.run_sql($1::text) AS r";
    /// What a query does, clause by clause.
    pub const EXPLAIN: &str = "SELECT copilot.explain($1::text)";
    /// Thumbs up/down on a history row, optionally with the corrected SQL.
    pub const FEEDBACK: &str =
        "SELECT copilot.feedback($1::text::bigint, $2::text::boolean, corrected_sql => $3::text)::text";
    /// The history the role may see (row-level security decides: its own rows; copilot_admin sees all).
    /// (Ordered by the table's bigint id, not by the text column of the same name.)
    pub const HISTORY: &str = "SELECT h.id::text, to_char(h.at, 'YYYY-MM-DD HH24:MI:SS'), h.role::text, h.kind, \
         h.question, h.sql, h.outcome, h.message, h.feedback::text FROM copilot.history h ORDER BY h.id DESC LIMIT 100";
    /// The worker's state and model, for the page's header.
    pub const STATUS: &str = "SELECT state::text, model::text FROM copilot.status()";
}

/// A database error as the page shows it: SQLSTATE, message, DETAIL and HINT — never a stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SqlError {
    pub sqlstate: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl SqlError {
    pub fn new(sqlstate: &str, message: impl Into<String>) -> Self {
        SqlError { sqlstate: sqlstate.to_string(), message: message.into(), detail: None, hint: None }
    }

    /// From tokio-postgres: the server's own fields when the server answered, else the client's message (a lost
    /// or refused connection) under SQLSTATE class 08.
    pub fn from_pg(e: &tokio_postgres::Error, connecting: bool) -> Self {
        match e.as_db_error() {
            Some(db) => SqlError {
                sqlstate: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            },
            None => SqlError::new(if connecting { "08001" } else { "08006" }, e.to_string()),
        }
    }
}

/// Rows (every column as text, NULL as None) and the NOTICEs the server sent while producing them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rows {
    pub rows: Vec<Vec<Option<String>>>,
    pub notices: Vec<String>,
}

/// A logged-in role's connection.
pub enum Conn {
    Pg(Box<PgConn>),
    #[cfg(test)]
    Fake(Arc<fake::FakeDb>, String),
}

impl Conn {
    pub async fn query(&self, stmt: &'static str, params: &[Option<String>]) -> Result<Rows, SqlError> {
        match self {
            Conn::Pg(c) => c.query(stmt, params).await,
            #[cfg(test)]
            Conn::Fake(f, role) => f.query(role, stmt, params),
        }
    }

    /// Ask the server to cancel whatever this connection is running now (a no-op when idle).
    pub async fn cancel(&self) -> Result<(), SqlError> {
        match self {
            Conn::Pg(c) => c.cancel.cancel_query(NoTls).await.map_err(|e| SqlError::from_pg(&e, true)),
            #[cfg(test)]
            Conn::Fake(f, _) => {
                f.cancels.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }
    }
}

/// Where logins connect to.
pub enum Backend {
    Pg(Box<Config>),
    #[cfg(test)]
    Fake(Arc<fake::FakeDb>),
}

impl Backend {
    /// Connect as `role` with `password`.
    pub async fn connect(&self, role: &str, password: &str) -> Result<Conn, SqlError> {
        match self {
            Backend::Pg(base) => PgConn::connect(base, role, password).await.map(|c| Conn::Pg(Box::new(c))),
            #[cfg(test)]
            Backend::Fake(f) => f.connect(role, password).map(|()| Conn::Fake(f.clone(), role.to_string())),
        }
    }
}

pub struct PgConn {
    client: Client,
    cancel: CancelToken,
    notices: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

impl PgConn {
    async fn connect(base: &Config, role: &str, password: &str) -> Result<PgConn, SqlError> {
        let mut cfg = base.clone();
        cfg.user(role).password(password).application_name("copilot-studio");
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        let (client, mut connection) = cfg.connect(NoTls).await.map_err(|e| SqlError::from_pg(&e, true))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notice(n)) => {
                        let _ = tx.send(n.message().to_string());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("connection closed: {e}");
                        break;
                    }
                }
            }
        });
        let cancel = client.cancel_token();
        Ok(PgConn { client, cancel, notices: tokio::sync::Mutex::new(rx) })
    }

    /// One statement at a time per connection (the lock), so the NOTICEs drained afterwards are this statement's.
    /// Dropped before it finishes (the browser went away), it cancels the backend's query.
    async fn query(&self, stmt: &'static str, params: &[Option<String>]) -> Result<Rows, SqlError> {
        let mut notices = self.notices.lock().await;
        while notices.try_recv().is_ok() {}
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let guard = CancelOnDrop(Some(self.cancel.clone()));
        let result = self.client.query(stmt, &params).await;
        guard.disarm();
        let rows = result.map_err(|e| SqlError::from_pg(&e, false))?;
        let mut out = Rows::default();
        for row in rows {
            let mut fields = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                fields.push(row.try_get::<_, Option<String>>(i).map_err(|e| SqlError::new("XX000", e.to_string()))?);
            }
            out.rows.push(fields);
        }
        while let Ok(n) = notices.try_recv() {
            out.notices.push(n);
        }
        Ok(out)
    }
}

struct CancelOnDrop(Option<CancelToken>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            tokio::spawn(async move {
                let _ = token.cancel_query(NoTls).await;
            });
        }
    }
}

#[cfg(test)]
pub mod fake {
    //! A database stand-in for the HTTP tests: records every statement and its parameters.
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    type Respond = dyn Fn(&str, &str, &[Option<String>]) -> Result<Rows, SqlError> + Send + Sync;

    pub struct FakeDb {
        pub calls: Mutex<Vec<(String, Vec<Option<String>>)>>,
        pub cancels: AtomicUsize,
        pub respond: Box<Respond>,
    }

    impl FakeDb {
        pub fn new(
            respond: impl Fn(&str, &str, &[Option<String>]) -> Result<Rows, SqlError> + Send + Sync + 'static,
        ) -> Self {
            FakeDb { calls: Mutex::new(vec![]), cancels: AtomicUsize::new(0), respond: Box::new(respond) }
        }

        /// Role `alice`/`bob` with password `right`; `root` is a superuser with password `right`.
        pub fn connect(&self, role: &str, password: &str) -> Result<(), SqlError> {
            if ["alice", "bob", "root"].contains(&role) && password == "right" {
                Ok(())
            } else {
                Err(SqlError::new("28P01", format!("password authentication failed for user \"{role}\"")))
            }
        }

        pub fn query(&self, role: &str, stmt: &str, params: &[Option<String>]) -> Result<Rows, SqlError> {
            self.calls.lock().unwrap().push((stmt.to_string(), params.to_vec()));
            (self.respond)(role, stmt, params)
        }
    }
}
