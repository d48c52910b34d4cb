//! copilot studio: a web page over the copilot extension. A thin client: every answer comes from `copilot.*`
//! functions inside PostgreSQL, called as the logged-in database role.

pub mod app;
pub mod chart;
pub mod csv;
pub mod db;
pub mod ratelimit;
pub mod result;
pub mod session;
pub mod tls;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

/// The studio serves plain HTTP on loopback only, unless it has TLS or the operator said `--insecure-listen`:
/// passwords and session cookies must not cross a network in clear by accident.
pub fn check_listen(addr: SocketAddr, tls: bool, insecure_listen: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || tls || insecure_listen {
        Ok(())
    } else {
        Err(format!(
            "refusing to listen on {addr} without TLS: it is not a loopback address, and logins carry database \
             passwords. Give --tls-cert and --tls-key, listen on 127.0.0.1, or pass --insecure-listen"
        ))
    }
}
