//! `copilot-studio --db 'host=/var/run/postgresql dbname=mydb'`: serve the studio on http://127.0.0.1:8780/.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use copilot_studio::app::{self, AppState, Settings};
use copilot_studio::db::Backend;

#[derive(Parser)]
#[command(version, about = "copilot studio: ask in plain language, read, edit and run the SQL, chart the rows")]
struct Args {
    /// The database to serve, as a libpq connection string or URL without the role (each user logs in with their
    /// own role and password), e.g. `host=/var/lib/copilot/demo port=5433 dbname=copilot_demo`.
    #[arg(long)]
    db: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8780")]
    listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (passwords and cookies then cross the network in clear).
    #[arg(long)]
    insecure_listen: bool,
    /// Requests a minute per user that work in the database (ask, run, explain, feedback), and login attempts a
    /// minute per role.
    #[arg(long, default_value_t = 60)]
    rate_limit: u32,
    /// Minutes a session may be idle before it is dropped with its connection.
    #[arg(long, default_value_t = 30)]
    idle_minutes: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "copilot_studio=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tls = args.tls_cert.is_some();
    if let Err(e) = copilot_studio::check_listen(args.listen, tls, args.insecure_listen) {
        eprintln!("copilot-studio: {e}");
        std::process::exit(2);
    }
    let config = tokio_postgres::Config::from_str(&args.db).map_err(|e| anyhow::anyhow!("--db: {e}"))?;
    if config.get_user().is_some() || config.get_password().is_some() {
        tracing::warn!("--db names a user or password: ignored, every user logs in with their own role");
    }
    let state = AppState::new(
        Backend::Pg(Box::new(config)),
        Settings {
            secure_cookies: tls,
            rate_per_minute: args.rate_limit,
            idle: Duration::from_secs(args.idle_minutes.max(1) * 60),
        },
    );
    let sweeper = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            sweeper.sessions.sweep();
        }
    });
    let router = app::router(state);
    let tcp = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = tcp.local_addr()?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let acceptor = copilot_studio::tls::acceptor(cert, key)?;
            eprintln!("copilot studio: https://{addr}/");
            axum::serve(copilot_studio::tls::TlsListener { tcp, acceptor }, router)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        _ => {
            eprintln!("copilot studio: http://{addr}/");
            axum::serve(tcp, router).with_graceful_shutdown(shutdown).await?;
        }
    }
    Ok(())
}
