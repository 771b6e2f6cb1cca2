//! The `agentwire` binary: `agentwire` (or `agentwire serve`) runs the gateway,
//! `agentwire config` prints the effective configuration. A bad configuration exits with 64.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use agentwire::Gateway;
use agentwire::config::Config;

/// sysexits.h EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "agentwire",
    version,
    about = "WebSocket gateway for AI-agent execution events"
)]
struct Cli {
    /// Configuration file (default: ./agentwire.toml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print the effective configuration (defaults < file < AGENTWIRE_* environment) as TOML.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("agentwire: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Serve => match serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("agentwire: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    agentwire::telemetry::init(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr().context("no local address")?;
        tracing::info!(%address, version = env!("CARGO_PKG_VERSION"), broker = "memory", "Listening.");
        let stop = CancellationToken::new();
        tokio::spawn(signals(stop.clone()));
        agentwire::server::run(Arc::new(Gateway::new(config)), listener, stop).await;
        Ok(())
    })
}

/// Decides shutdown: the first SIGTERM or SIGINT starts the drain.
async fn signals(stop: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM: shutting down."),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down."),
    }
    stop.cancel();
}
