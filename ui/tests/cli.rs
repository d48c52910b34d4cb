//! The binary refuses to serve plain HTTP on a non-loopback address unless told, before it touches the network.

use std::process::Command;

fn studio(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_copilot-studio"))
        .args(["--db", "host=/nonexistent dbname=x"])
        .args(args)
        .output()
        .expect("run copilot-studio")
}

#[test]
fn non_loopback_without_tls_or_flag_is_refused() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let out = studio(&["--listen", addr]);
        assert_eq!(out.status.code(), Some(2), "{addr}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refusing to listen") && err.contains("--insecure-listen"), "{err}");
    }
}

#[test]
fn tls_needs_both_files() {
    let out = studio(&["--listen", "0.0.0.0:0", "--tls-cert", "/nonexistent.pem"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
    // Both given but unreadable: refused with the file's name, not served.
    let out = studio(&["--listen", "0.0.0.0:0", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.pem"));
}

/// With a certificate it serves HTTPS on any address (a self-signed pair made by the openssl command).
#[test]
fn tls_serves_https_on_a_non_loopback_address() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("copilot-studio-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl command makes the test certificate");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut child = Command::new(env!("CARGO_BIN_EXE_copilot-studio"))
        .args(["--db", "host=/nonexistent dbname=x", "--listen", "0.0.0.0:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().strip_prefix("copilot studio: https://0.0.0.0:").and_then(|r| r.strip_suffix('/'));
    let port = port.unwrap_or_else(|| panic!("unexpected first line: {line}")).to_string();
    let page = Command::new("curl")
        .args(["-sk", "-D", "-", &format!("https://127.0.0.1:{port}/")])
        .output()
        .expect("the curl command fetches the page");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("id=\"login-form\""), "{page}");
    assert!(page.to_ascii_lowercase().contains("set-cookie: studio_login=") && page.contains("; Secure"), "{page}");
}
