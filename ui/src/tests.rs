//! The studio's HTTP behaviour over a recording stand-in database: CSRF, login, rate limit, body limit, and that
//! whatever a user types reaches the database only as a bind parameter of a fixed statement.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::app::{self, AppState, Settings};
use crate::db::{fake::FakeDb, sql, Backend, Rows, SqlError};

fn rows(r: &[&[Option<&str>]]) -> Rows {
    Rows { rows: r.iter().map(|row| row.iter().map(|v| v.map(str::to_string)).collect()).collect(), notices: vec![] }
}

/// A database where alice and bob are ordinary roles and root a superuser; run_sql answers two rows (or an error
/// for a DELETE), ask answers a fixed SQL.
fn fake() -> Arc<FakeDb> {
    Arc::new(FakeDb::new(|role, stmt, params| match stmt {
        s if s == sql::WHOAMI => {
            Ok(rows(&[&[Some(role), Some(if role == "root" { "true" } else { "false" }), Some("copilot_demo")]]))
        }
        s if s == sql::ASK => Ok(rows(&[&[Some("SELECT country, count(*) FROM singer GROUP BY country")]])),
        s if s == sql::LAST_ASK => Ok(rows(&[&[Some("42")]])),
        s if s == sql::RUN_SQL => {
            let text = params[0].clone().unwrap_or_default();
            if text.to_ascii_uppercase().starts_with("DELETE") {
                return Err(SqlError {
                    sqlstate: "25006".into(),
                    message: "copilot: refused: only queries are allowed, found DELETE".into(),
                    detail: Some(format!("SQL: {text}")),
                    hint: None,
                });
            }
            let mut r = rows(&[
                &[Some(r#"{"country": "France", "count": 4}"#)],
                &[Some(r#"{"country": "O'Neil, \"Jr\"\n", "count": 1}"#)],
            ]);
            r.notices.push("copilot: the result was cut at copilot.max_rows (2) rows".into());
            Ok(r)
        }
        _ => Ok(Rows::default()),
    }))
}

fn studio(db: &Arc<FakeDb>, rate: u32) -> Router {
    let state = AppState::new(
        Backend::Fake(db.clone()),
        Settings { secure_cookies: false, rate_per_minute: rate, idle: Duration::from_secs(600) },
    );
    app::router(state)
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).to_string();
    Reply { status, headers, body }
}

fn set_cookies(r: &Reply) -> Vec<String> {
    r.headers.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect()
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let i = text.find(start).unwrap_or_else(|| panic!("{start:?} not in {text}")) + start.len();
    &text[i..i + text[i..].find(end).unwrap()]
}

/// The login form's cookie and token.
async fn login_form(app: &Router) -> (String, String) {
    let r = send(app, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    let cookie = set_cookies(&r).into_iter().find(|c| c.starts_with("studio_login=")).expect("login cookie");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let token = between(&r.body, "name=\"csrf\" value=\"", "\"").to_string();
    assert_eq!(cookie, format!("studio_login={token}"));
    (cookie, token)
}

async fn post_login(app: &Router, cookie: &str, form: &str) -> Reply {
    send(
        app,
        Request::post("/login")
            .header(header::COOKIE, cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form.to_string()))
            .unwrap(),
    )
    .await
}

/// Log in; returns the session cookie and the page's CSRF token.
async fn login(app: &Router, role: &str) -> (String, String) {
    let (cookie, token) = login_form(app).await;
    let r = post_login(app, &cookie, &format!("role={role}&password=right&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let session = set_cookies(&r).into_iter().find(|c| c.starts_with("studio_session=")).expect("session cookie");
    assert!(session.contains("HttpOnly") && session.contains("SameSite=Strict"), "{session}");
    let session = session.split(';').next().unwrap().to_string();
    let page = send(app, Request::get("/").header(header::COOKIE, &session).body(Body::empty()).unwrap()).await;
    assert!(page.body.contains(&format!("{role} @ copilot_demo")), "{}", page.body);
    let csrf = between(&page.body, "name=\"csrf-token\" content=\"", "\"").to_string();
    assert_eq!(csrf.len(), 64);
    (session, csrf)
}

fn api(path: &str, session: &str, csrf: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(path).header(header::COOKIE, session).header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = csrf {
        b = b.header("x-csrf-token", t);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

#[tokio::test]
async fn login_without_the_forms_token_is_refused() {
    let db = fake();
    let app = studio(&db, 100);
    let (cookie, token) = login_form(&app).await;
    for (cookie, form) in [
        (cookie.as_str(), "role=alice&password=right".to_string()),
        (cookie.as_str(), "role=alice&password=right&csrf=0000".to_string()),
        ("", format!("role=alice&password=right&csrf={token}")),
    ] {
        let r = post_login(&app, cookie, &form).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{form}");
        assert!(r.body.contains("CSRF"), "{}", r.body);
        assert!(!set_cookies(&r).iter().any(|c| c.starts_with("studio_session=")));
    }
    assert!(db.calls.lock().unwrap().is_empty(), "nothing reached the database");
}

#[tokio::test]
async fn wrong_password_is_refused_with_the_servers_error() {
    let db = fake();
    let app = studio(&db, 100);
    let (cookie, token) = login_form(&app).await;
    let r = post_login(&app, &cookie, &format!("role=alice&password=wrong&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("28P01") && r.body.contains("password authentication failed for user &quot;alice&quot;"));
    assert!(!set_cookies(&r).iter().any(|c| c.starts_with("studio_session=")));
    // An unknown role, and no role at all.
    let r = post_login(&app, &cookie, &format!("role=mallory&password=right&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = post_login(&app, &cookie, &format!("role=+&password=right&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn superusers_are_not_logged_in() {
    let db = fake();
    let app = studio(&db, 100);
    let (cookie, token) = login_form(&app).await;
    let r = post_login(&app, &cookie, &format!("role=root&password=right&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("superuser"), "{}", r.body);
    assert!(!set_cookies(&r).iter().any(|c| c.starts_with("studio_session=")));
}

#[tokio::test]
async fn every_post_needs_the_sessions_csrf_token() {
    let db = fake();
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let (_, bobs_csrf) = login(&app, "bob").await;
    let before = db.calls.lock().unwrap().len();
    for path in ["/api/ask", "/api/run", "/api/explain", "/api/feedback", "/api/cancel"] {
        let body = r#"{"question": "q", "sql": "SELECT 1", "history_id": 1, "correct": true}"#;
        for token in [None, Some(""), Some("0123"), Some(bobs_csrf.as_str())] {
            let r = send(&app, api(path, &session, token, body)).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} {token:?}");
            assert!(json(&r)["error"]["message"].as_str().unwrap().contains("CSRF"));
        }
    }
    assert_eq!(db.calls.lock().unwrap().len(), before, "no refused request reached the database");
    assert_eq!(db.cancels.load(Ordering::SeqCst), 0);
    // Logout too.
    let r = send(
        &app,
        Request::post("/logout")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("csrf=nope"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // With the right token it works.
    let r = send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn api_needs_a_session() {
    let db = fake();
    let app = studio(&db, 100);
    let r = send(&app, api("/api/run", "studio_session=forged", Some("x"), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&app, Request::get("/api/history").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&app, Request::get("/api/result.csv").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(db.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn user_text_is_only_ever_a_bind_parameter() {
    let db = fake();
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let question = "'); DROP TABLE singer; -- \" $1 \\";
    let evil_sql = "SELECT 1; DROP TABLE singer; --'";
    let body = serde_json::json!({ "question": question, "follow_up": 7 }).to_string();
    let r = send(&app, api("/api/ask", &session, Some(&csrf), &body)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(json(&r)["history_id"], 42);
    for path in ["/api/run", "/api/explain"] {
        let body = serde_json::json!({ "sql": evil_sql }).to_string();
        assert_eq!(send(&app, api(path, &session, Some(&csrf), &body)).await.status, StatusCode::OK);
    }
    let body = serde_json::json!({ "history_id": 42, "correct": false, "corrected_sql": evil_sql }).to_string();
    assert_eq!(send(&app, api("/api/feedback", &session, Some(&csrf), &body)).await.status, StatusCode::OK);
    let calls = db.calls.lock().unwrap().clone();
    let constants = [sql::WHOAMI, sql::ASK, sql::LAST_ASK, sql::RUN_SQL, sql::EXPLAIN, sql::FEEDBACK];
    for (stmt, params) in &calls {
        assert!(constants.contains(&stmt.as_str()), "an unexpected statement was sent: {stmt}");
        assert!(!stmt.contains("DROP"), "{stmt}");
        let _ = params;
    }
    let find = |s: &str| calls.iter().find(|(stmt, _)| stmt == s).unwrap().1.clone();
    assert_eq!(find(sql::ASK), vec![Some(question.to_string()), Some("7".to_string())]);
    assert_eq!(find(sql::RUN_SQL), vec![Some(evil_sql.to_string())]);
    assert_eq!(find(sql::EXPLAIN), vec![Some(evil_sql.to_string())]);
    assert_eq!(find(sql::FEEDBACK), vec![Some("42".into()), Some("false".into()), Some(evil_sql.to_string())]);
}

#[tokio::test]
async fn oversized_and_malformed_bodies_are_refused_before_the_database() {
    let db = fake();
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let before = db.calls.lock().unwrap().len();
    let huge = serde_json::json!({ "sql": "x".repeat(app::MAX_BODY + 1) }).to_string();
    let r = send(&app, api("/api/run", &session, Some(&csrf), &huge)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = send(&app, api("/api/run", &session, Some(&csrf), "{not json")).await;
    assert!(r.status.is_client_error(), "{}", r.status);
    let r = send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": 5}"#)).await;
    assert!(r.status.is_client_error(), "{}", r.status);
    // A huge login form too.
    let (cookie, token) = login_form(&app).await;
    let form = format!("role=alice&password={}&csrf={token}", "p".repeat(app::MAX_BODY));
    assert_eq!(post_login(&app, &cookie, &form).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(db.calls.lock().unwrap().len(), before);
}

#[tokio::test]
async fn rate_limit_is_per_user() {
    let db = fake();
    let app = studio(&db, 3);
    let (alice, alice_csrf) = login(&app, "alice").await;
    let (bob, bob_csrf) = login(&app, "bob").await;
    for _ in 0..3 {
        let r = send(&app, api("/api/run", &alice, Some(&alice_csrf), r#"{"sql": "SELECT 1"}"#)).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = send(&app, api("/api/run", &alice, Some(&alice_csrf), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.get(header::RETRY_AFTER).is_some());
    assert!(json(&r)["error"]["message"].as_str().unwrap().contains("too many requests"));
    // Cancel still works (it is how a user stops what they started), and bob has his own allowance.
    let r = send(&app, api("/api/cancel", &alice, Some(&alice_csrf), "{}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(db.cancels.load(Ordering::SeqCst), 1);
    let r = send(&app, api("/api/run", &bob, Some(&bob_csrf), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn login_attempts_are_rate_limited_per_role() {
    let db = fake();
    let app = studio(&db, 2);
    let (cookie, token) = login_form(&app).await;
    for _ in 0..2 {
        let r = post_login(&app, &cookie, &format!("role=alice&password=guess&csrf={token}")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let (cookie, token) = login_form(&app).await;
    let r = post_login(&app, &cookie, &format!("role=alice&password=right&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "even the right password waits");
    let r = post_login(&app, &cookie, &format!("role=bob&password=right&csrf={token}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn run_answers_rows_chart_notice_and_csv() {
    let db = fake();
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let r =
        send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": "SELECT country, count(*) FROM singer"}"#)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = json(&r);
    assert_eq!(v["columns"], serde_json::json!(["country", "count"]));
    assert_eq!(v["rows"][0], serde_json::json!(["France", 4]));
    assert_eq!(v["chart"], serde_json::json!({"kind": "bar", "x": 0, "y": 1}));
    assert_eq!(v["capped"], true);
    assert!(v["notices"][0].as_str().unwrap().contains("max_rows"));
    let csv =
        send(&app, Request::get("/api/result.csv").header(header::COOKIE, &session).body(Body::empty()).unwrap()).await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.headers[header::CONTENT_DISPOSITION].to_str().unwrap().starts_with("attachment"));
    assert_eq!(csv.body, "country,count\r\nFrance,4\r\n\"O'Neil, \"\"Jr\"\"\n\",1\r\n");
}

#[tokio::test]
async fn database_errors_show_sqlstate_message_and_detail() {
    let db = fake();
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let r = send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": "DELETE FROM singer"}"#)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        json(&r),
        serde_json::json!({"error": {
            "sqlstate": "25006",
            "message": "copilot: refused: only queries are allowed, found DELETE",
            "detail": "SQL: DELETE FROM singer"
        }})
    );
}

#[tokio::test]
async fn logout_ends_the_session() {
    let db = fake();
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let r = send(
        &app,
        Request::post("/logout")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={csrf}")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let r = send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn pages_carry_security_headers_and_the_bundled_chart_library() {
    let db = fake();
    let app = studio(&db, 100);
    let r = send(&app, Request::get("/").body(Body::empty()).unwrap()).await;
    let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(r.headers[header::X_FRAME_OPTIONS], "DENY");
    let js = send(&app, Request::get("/static/chart.umd.min.js").body(Body::empty()).unwrap()).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.body.contains("Chart.js v4"), "the vendored Chart.js is served");
    assert_eq!(js.headers[header::CONTENT_TYPE], "text/javascript");
}

#[test]
fn plain_http_only_on_loopback_unless_told() {
    use crate::check_listen;
    let a = |s: &str| s.parse().unwrap();
    assert!(check_listen(a("127.0.0.1:8780"), false, false).is_ok());
    assert!(check_listen(a("[::1]:8780"), false, false).is_ok());
    for addr in ["0.0.0.0:8780", "[::]:8780", "192.168.1.5:80", "10.0.0.1:8780"] {
        let e = check_listen(a(addr), false, false).unwrap_err();
        assert!(e.contains("--insecure-listen"), "{e}");
        assert!(check_listen(a(addr), true, false).is_ok(), "TLS");
        assert!(check_listen(a(addr), false, true).is_ok(), "--insecure-listen");
    }
}

#[tokio::test]
async fn a_lost_connection_ends_the_session() {
    let db = Arc::new(FakeDb::new(|role, stmt, _| match stmt {
        s if s == sql::WHOAMI => Ok(rows(&[&[Some(role), Some("false"), Some("copilot_demo")]])),
        _ => Err(SqlError::new("08006", "connection closed")),
    }));
    let app = studio(&db, 100);
    let (session, csrf) = login(&app, "alice").await;
    let r = send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(json(&r)["error"]["sqlstate"], "08006");
    let r = send(&app, api("/api/run", &session, Some(&csrf), r#"{"sql": "SELECT 1"}"#)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "log in again");
}
