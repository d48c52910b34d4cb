//! The studio's HTTP surface (axum): the login page, the studio page, its static files, and a small JSON API that
//! each call one `copilot.*` function as the logged-in role.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use minijinja::{context, Environment};
use serde::Deserialize;
use serde_json::json;

use crate::chart;
use crate::db::{sql, Backend, SqlError};
use crate::ratelimit::RateLimiter;
use crate::result::ResultSet;
use crate::session::{self, Session, Sessions, LOGIN_COOKIE, SESSION_COOKIE};

pub const MAX_BODY: usize = 64 * 1024;

pub struct Settings {
    /// Mark cookies Secure (the studio serves TLS).
    pub secure_cookies: bool,
    /// Requests a minute per user for the API calls that reach the database, and login attempts a minute per role.
    pub rate_per_minute: u32,
    /// A session unused this long is dropped with its connection.
    pub idle: Duration,
}

pub struct AppState {
    backend: Backend,
    pub sessions: Sessions,
    limiter: RateLimiter,
    templates: Environment<'static>,
    secure_cookies: bool,
}

impl AppState {
    pub fn new(backend: Backend, settings: Settings) -> Arc<AppState> {
        let mut templates = Environment::new();
        templates.add_template("login.html", include_str!("../templates/login.html")).expect("login template");
        templates.add_template("studio.html", include_str!("../templates/studio.html")).expect("studio template");
        Arc::new(AppState {
            backend,
            sessions: Sessions::new(settings.idle),
            limiter: RateLimiter::new(settings.rate_per_minute),
            templates,
            secure_cookies: settings.secure_cookies,
        })
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Result<String, ApiError> {
        self.templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|e| ApiError::studio(StatusCode::INTERNAL_SERVER_ERROR, format!("template {name}: {e}")))
    }
}

/// An error as the page receives it: `{"error": {sqlstate, message, detail, hint}}` (sqlstate empty when the
/// studio itself refused).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: SqlError,
}

impl ApiError {
    fn studio(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, error: SqlError::new("", message) }
    }
}

impl From<SqlError> for ApiError {
    fn from(error: SqlError) -> Self {
        // Client-class SQLSTATEs are the request's fault; a lost connection is a gateway problem.
        let status = if error.sqlstate.starts_with("08") { StatusCode::BAD_GATEWAY } else { StatusCode::BAD_REQUEST };
        ApiError { status, error }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.error }))).into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/ask", post(ask))
        .route("/api/run", post(run))
        .route("/api/explain", post(explain))
        .route("/api/feedback", post(feedback))
        .route("/api/cancel", post(cancel))
        .route("/api/history", get(history))
        .route("/api/status", get(status))
        .route("/api/result.csv", get(csv))
        .route_layer(middleware::from_fn_with_state(state.clone(), api_guard));
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/static/studio.js", get(|| asset("text/javascript", include_bytes!("../static/studio.js"))))
        .route("/static/studio.css", get(|| asset("text/css", include_bytes!("../static/studio.css"))))
        .route(
            "/static/chart.umd.min.js",
            get(|| asset("text/javascript", include_bytes!("../static/vendor/chart.umd.min.js"))),
        )
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}

/// Every API call needs a session; every POST its CSRF token (header `X-CSRF-Token`), checked before the body is
/// read; the POSTs that do work in the database (ask, run, explain, feedback — not cancel) count against the
/// user's rate limit.
async fn api_guard(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let Some(s) = state.sessions.get(req.headers()) else {
        return ApiError::studio(StatusCode::UNAUTHORIZED, "not logged in (or the session expired): log in again")
            .into_response();
    };
    if req.method() == Method::POST {
        let sent = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !session::same_token(sent, &s.csrf) {
            return ApiError::studio(StatusCode::FORBIDDEN, "missing or wrong CSRF token: reload the page")
                .into_response();
        }
    }
    if req.method() == Method::POST && req.uri().path() != "/api/cancel" {
        if let Err(wait) = state.limiter.check(&s.user_key()) {
            let mut res = ApiError::studio(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many requests: try again in {} s", wait.as_secs() + 1),
            )
            .into_response();
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs() + 1));
            return res;
        }
    }
    req.extensions_mut().insert(s.clone());
    let res = next.run(req).await;
    // The role's connection is gone (the server restarted, or the backend was terminated): end the session, so the
    // next request asks to log in again instead of failing the same way.
    if res.status() == StatusCode::BAD_GATEWAY {
        state.sessions.remove(&s.id);
    }
    res
}

async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(s) = state.sessions.get(&headers) {
        let page = state.render("studio.html", context! { role => s.role, database => s.database, csrf => s.csrf })?;
        return Ok(Html(page).into_response());
    }
    login_page(&state, StatusCode::OK, None)
}

/// The login form with a fresh double-submit token (cookie + hidden field).
fn login_page(state: &AppState, status: StatusCode, error: Option<SqlError>) -> Result<Response, ApiError> {
    let token = session::random_token();
    let page = state.render("login.html", context! { csrf => token, error => error })?;
    let cookie = session::set_cookie(LOGIN_COOKIE, &token, state.secure_cookies, Some(3600));
    Ok((status, [(header::SET_COOKIE, cookie)], Html(page)).into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    role: String,
    password: String,
    #[serde(default)]
    csrf: String,
}

async fn login(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, ApiError> {
    let expected = session::cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if !session::same_token(&form.csrf, &expected) {
        return login_page(
            &state,
            StatusCode::FORBIDDEN,
            Some(SqlError::new("", "the login form expired or was not sent from this page (CSRF): try again")),
        );
    }
    let role = form.role.trim();
    if role.is_empty() {
        return login_page(&state, StatusCode::BAD_REQUEST, Some(SqlError::new("", "give a database role")));
    }
    if let Err(wait) = state.limiter.check(&format!("login:{role}")) {
        let msg = format!("too many login attempts for {role}: try again in {} s", wait.as_secs() + 1);
        return login_page(&state, StatusCode::TOO_MANY_REQUESTS, Some(SqlError::new("", msg)));
    }
    let conn = match state.backend.connect(role, &form.password).await {
        Ok(c) => c,
        Err(e) => return login_page(&state, StatusCode::UNAUTHORIZED, Some(e)),
    };
    let who = match conn.query(sql::WHOAMI, &[]).await {
        Ok(r) => r.rows.into_iter().next().unwrap_or_default(),
        Err(e) => return login_page(&state, StatusCode::UNAUTHORIZED, Some(e)),
    };
    let field = |i: usize| who.get(i).cloned().flatten().unwrap_or_default();
    if field(1) == "true" {
        let msg = format!("{role} is a superuser: copilot studio logs in ordinary roles only, so that privileges and row-level security apply");
        return login_page(&state, StatusCode::FORBIDDEN, Some(SqlError::new("42501", msg)));
    }
    let s = state.sessions.create(field(0), field(2), conn);
    tracing::info!(role = %s.role, database = %s.database, "logged in");
    let mut res = Redirect::to("/").into_response();
    let h = res.headers_mut();
    h.append(header::SET_COOKIE, cookie_value(&session::set_cookie(SESSION_COOKIE, &s.id, state.secure_cookies, None)));
    h.append(header::SET_COOKIE, cookie_value(&session::set_cookie(LOGIN_COOKIE, "", state.secure_cookies, Some(0))));
    Ok(res)
}

fn cookie_value(c: &str) -> HeaderValue {
    HeaderValue::from_str(c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Result<Response, ApiError> {
    if let Some(s) = state.sessions.get(&headers) {
        if !session::same_token(&form.csrf, &s.csrf) {
            return Err(ApiError::studio(StatusCode::FORBIDDEN, "missing or wrong CSRF token: reload the page"));
        }
        state.sessions.remove(&s.id);
    }
    let mut res = Redirect::to("/").into_response();
    res.headers_mut().append(
        header::SET_COOKIE,
        cookie_value(&session::set_cookie(SESSION_COOKIE, "", state.secure_cookies, Some(0))),
    );
    Ok(res)
}

type Sess = axum::Extension<Arc<Session>>;

fn first_text(rows: &crate::db::Rows) -> Option<String> {
    rows.rows.first().and_then(|r| r.first().cloned().flatten())
}

#[derive(Deserialize)]
struct AskReq {
    question: String,
    follow_up: Option<i64>,
}

async fn ask(axum::Extension(s): Sess, Json(req): Json<AskReq>) -> Result<Json<serde_json::Value>, ApiError> {
    if req.question.trim().is_empty() {
        return Err(ApiError::studio(StatusCode::BAD_REQUEST, "ask a question"));
    }
    let answer = s.conn.query(sql::ASK, &[Some(req.question), req.follow_up.map(|i| i.to_string())]).await;
    // Whether answered or refused, the attempt has a history row; the thread continues from answered ones.
    let history_id = match &answer {
        Ok(_) => {
            s.conn.query(sql::LAST_ASK, &[]).await.ok().and_then(|r| first_text(&r)).and_then(|t| t.parse::<i64>().ok())
        }
        Err(_) => None,
    };
    let answer = answer?;
    Ok(Json(json!({ "sql": first_text(&answer), "history_id": history_id, "notices": answer.notices })))
}

#[derive(Deserialize)]
struct SqlReq {
    sql: String,
}

async fn run(axum::Extension(s): Sess, Json(req): Json<SqlReq>) -> Result<Json<serde_json::Value>, ApiError> {
    if req.sql.trim().is_empty() {
        return Err(ApiError::studio(StatusCode::BAD_REQUEST, "no SQL to run"));
    }
    let out = s.conn.query(sql::RUN_SQL, &[Some(req.sql)]).await?;
    let result = ResultSet::from_json_rows(out.rows.iter().filter_map(|r| r.first().and_then(|v| v.as_deref())))
        .map_err(|e| ApiError::studio(StatusCode::BAD_GATEWAY, e))?;
    let chart = chart::choose(&result);
    let capped = out.notices.iter().any(|n| n.contains("max_rows"));
    let body = json!({
        "columns": result.columns,
        "rows": result.rows,
        "chart": chart,
        "notices": out.notices,
        "capped": capped,
    });
    *s.last_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    Ok(Json(body))
}

async fn explain(axum::Extension(s): Sess, Json(req): Json<SqlReq>) -> Result<Json<serde_json::Value>, ApiError> {
    let out = s.conn.query(sql::EXPLAIN, &[Some(req.sql)]).await?;
    Ok(Json(json!({ "text": first_text(&out) })))
}

#[derive(Deserialize)]
struct FeedbackReq {
    history_id: i64,
    correct: bool,
    corrected_sql: Option<String>,
}

async fn feedback(axum::Extension(s): Sess, Json(req): Json<FeedbackReq>) -> Result<Json<serde_json::Value>, ApiError> {
    let corrected = req.corrected_sql.filter(|c| !c.trim().is_empty());
    let out = s
        .conn
        .query(sql::FEEDBACK, &[Some(req.history_id.to_string()), Some(req.correct.to_string()), corrected])
        .await?;
    Ok(Json(json!({ "example_id": first_text(&out), "notices": out.notices })))
}

async fn cancel(axum::Extension(s): Sess) -> Result<Json<serde_json::Value>, ApiError> {
    s.conn.cancel().await?;
    Ok(Json(json!({ "cancel_sent": true })))
}

async fn history(axum::Extension(s): Sess) -> Result<Json<serde_json::Value>, ApiError> {
    let out = s.conn.query(sql::HISTORY, &[]).await?;
    let items: Vec<serde_json::Value> = out
        .rows
        .into_iter()
        .map(|r| {
            let f = |i: usize| r.get(i).cloned().flatten();
            json!({
                "id": f(0).and_then(|t| t.parse::<i64>().ok()), "at": f(1), "role": f(2), "kind": f(3),
                "question": f(4), "sql": f(5), "outcome": f(6), "message": f(7),
                "feedback": f(8).map(|t| t == "true"),
            })
        })
        .collect();
    Ok(Json(json!({ "role": s.role, "items": items })))
}

async fn status(axum::Extension(s): Sess) -> Result<Json<serde_json::Value>, ApiError> {
    let out = s.conn.query(sql::STATUS, &[]).await?;
    let r = out.rows.into_iter().next().unwrap_or_default();
    Ok(Json(json!({ "state": r.first().cloned().flatten(), "model": r.get(1).cloned().flatten() })))
}

async fn csv(axum::Extension(s): Sess) -> Result<Response, ApiError> {
    let result = s.last_result.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(result) = result else {
        return Err(ApiError::studio(StatusCode::NOT_FOUND, "run a query first"));
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"copilot-result.csv\""),
        ],
        crate::csv::to_csv(&result),
    )
        .into_response())
}
