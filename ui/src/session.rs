//! Sessions and CSRF. A logged-in session lives in memory only: a random 256-bit id in a cookie (HttpOnly,
//! SameSite=Strict, Secure under TLS), the role's own database connection, and its CSRF token (the synchronizer
//! pattern: every POST must carry it in `X-CSRF-Token` or the form field `csrf`). Before login, the login form is
//! protected by a double-submit token: a random cookie whose value the form must repeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use rand::RngCore;

use crate::db::Conn;
use crate::result::ResultSet;

pub const SESSION_COOKIE: &str = "studio_session";
pub const LOGIN_COOKIE: &str = "studio_login";

pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Equal without an early exit on the first differing byte.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && !a.is_empty() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<u64>) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        c.push_str("; Secure");
    }
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    c
}

pub struct Session {
    pub id: String,
    pub csrf: String,
    pub role: String,
    pub database: String,
    pub conn: Conn,
    /// The last result run, for its CSV download.
    pub last_result: Mutex<Option<ResultSet>>,
    last_seen: Mutex<Instant>,
}

impl Session {
    pub fn user_key(&self) -> String {
        format!("{}@{}", self.role, self.database)
    }
}

pub struct Sessions {
    idle: Duration,
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Sessions { idle, map: Mutex::new(HashMap::new()) }
    }

    pub fn create(&self, role: String, database: String, conn: Conn) -> Arc<Session> {
        let s = Arc::new(Session {
            id: random_token(),
            csrf: random_token(),
            role,
            database,
            conn,
            last_result: Mutex::new(None),
            last_seen: Mutex::new(Instant::now()),
        });
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(s.id.clone(), s.clone());
        s
    }

    /// The session the request's cookie names, if it exists and has not been idle too long.
    pub fn get(&self, headers: &HeaderMap) -> Option<Arc<Session>> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.get(&id)?.clone();
        let mut seen = s.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.elapsed() > self.idle {
            drop(seen);
            map.remove(&id);
            return None;
        }
        *seen = Instant::now();
        drop(seen);
        Some(s)
    }

    pub fn remove(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Drop sessions idle too long (their connections close with them).
    pub fn sweep(&self) {
        let idle = self.idle;
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s.last_seen.lock().map(|t| t.elapsed() <= idle).unwrap_or(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&a, &b));
        assert!(!same_token(&a, &a[..63]));
        assert!(!same_token("", ""));
    }

    #[test]
    fn cookies_parse_and_are_strict() {
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("x=1; studio_session=abc; y=2"));
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "nope"), None);
        let c = set_cookie(SESSION_COOKIE, "abc", true, None);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"), "{c}");
        assert!(!set_cookie(SESSION_COOKIE, "abc", false, None).contains("Secure"));
    }
}
