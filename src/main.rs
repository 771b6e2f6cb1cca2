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
    /// The gateway's configuration file, for serve, config and token (default: ./agentwire.toml
    /// when it exists). probe and bench refuse it: they reach a gateway from outside.
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
    /// Load-test a running gateway (see docs/performance.md).
    Bench(agentwire::tools::bench::BenchArgs),
    /// Check delivery end to end against a running gateway: exit 0 when a five-event run arrived
    /// in order and the ledger balanced, 1 otherwise.
    Probe {
        /// The gateway's public door (`/ws`): `http://` or `https://` (port 80 or 443 by default).
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        /// The gateway's internal door (`/v1/*`): `http://` or `https://`.
        #[arg(long, default_value = "http://127.0.0.1:8001")]
        api_url: String,
        /// A PEM CA certificate to trust for `https://` doors, besides the system's CA
        /// certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR` when set): for a private CA.
        #[arg(long, env = "AGENTWIRE_PROBE_CA_FILE", value_name = "PATH")]
        ca_file: Option<PathBuf>,
        /// A producer key, when the gateway asks for one (from the environment: keys on a command
        /// line show in `ps`).
        #[arg(long, env = "AGENTWIRE_PROBE_PRODUCER_KEY", hide_env_values = true)]
        producer_key: Option<String>,
        /// An operator key, when the gateway asks for one.
        #[arg(long, env = "AGENTWIRE_PROBE_OPERATOR_KEY", hide_env_values = true)]
        operator_key: Option<String>,
        /// A browser token whose `threads` claim allows `agentwire-probe-*`, when the gateway
        /// authenticates browsers.
        #[arg(long, env = "AGENTWIRE_PROBE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// How long the whole check may take.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Mint a development token signed with auth.jwt_secret (HS256) and print it.
    Token {
        /// The user (`sub`).
        #[arg(long)]
        user: String,
        /// A thread (or `prefix*`) the token lets its holder read; repeat for more.
        #[arg(long = "thread")]
        threads: Vec<String>,
        /// Make it a subscription token for this one thread instead.
        #[arg(long, conflicts_with = "threads")]
        subscription: Option<String>,
        /// How long it is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

fn main() -> ExitCode {
    agentwire::outbound::install_tls_provider();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        // A file given to a command that does not read it would be ignored in silence.
        Command::Probe { .. } | Command::Bench(_) if cli.config.is_some() => {
            eprintln!(
                "agentwire: --config is the gateway's configuration; probe and bench do not read it \
                 (the probe takes --url, --api-url and AGENTWIRE_PROBE_*, see docs/operations.md)"
            );
            ExitCode::from(EXIT_CONFIG)
        }
        // The probe is a client: it needs no gateway configuration.
        Command::Probe {
            url,
            api_url,
            producer_key,
            operator_key,
            token,
            ca_file,
            timeout,
        } => probe(
            &agentwire::tools::probe::Doors {
                url,
                api_url,
                producer_key,
                operator_key,
                token,
                ca_file,
            },
            timeout,
        ),
        Command::Bench(args) => bench(args),
        Command::Config => match load(cli.config.as_deref()) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Token {
            user,
            threads,
            subscription,
            ttl,
        } => match load(cli.config.as_deref()) {
            Ok(config) => token(&config, &user, &threads, subscription.as_deref(), ttl),
            Err(code) => code,
        },
        Command::Serve => match load(cli.config.as_deref()) {
            Ok(config) => match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("agentwire: {error:#}");
                    ExitCode::FAILURE
                }
            },
            Err(code) => code,
        },
    }
}

fn load(file: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(file).map_err(|error| {
        eprintln!("agentwire: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn bench(args: agentwire::tools::bench::BenchArgs) -> ExitCode {
    agentwire::server::raise_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("agentwire bench: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agentwire::tools::bench::run(args)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agentwire bench: FAIL: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn token(
    config: &Config,
    user: &str,
    threads: &[String],
    subscription: Option<&str>,
    ttl: std::time::Duration,
) -> ExitCode {
    let Some(secret) = &config.auth.jwt_secret else {
        eprintln!("agentwire token: auth.jwt_secret is not set (tokens are signed with it)");
        return ExitCode::from(64);
    };
    match agentwire::auth::mint(secret.expose(), user, threads, subscription, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("agentwire token: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn probe(doors: &agentwire::tools::probe::Doors, timeout: std::time::Duration) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            println!("agentwire probe: FAIL: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agentwire::tools::probe::run(doors, timeout)) {
        Ok(report) => {
            let ledger = &report.ledger;
            println!(
                "agentwire probe: ok: 5/5 events in order on {} (seq {}..{}) in {:.1} ms; ledger balanced: emitted {}, delivered {}, pending {}, lost {}",
                report.channel,
                report.first_seq,
                report.first_seq + 4,
                report.elapsed.as_secs_f64() * 1000.0,
                ledger["emitted"],
                ledger["delivered"],
                ledger["pending"],
                ledger["lost_total"],
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("agentwire probe: FAIL: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let telemetry = agentwire::telemetry::init(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let served = runtime.block_on(async {
        let bind = |address| async move {
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))
        };
        let doors = agentwire::server::Doors {
            public: bind(config.listen).await?,
            internal: bind(config.internal_listen).await?,
        };
        let open_files = agentwire::server::raise_file_limit();
        let gateway = Gateway::new(config).context("cannot set up the broker")?;
        tracing::info!(public = %config_address(&doors.public), internal = %config_address(&doors.internal), version = env!("CARGO_PKG_VERSION"), broker = gateway.broker.kind(), open_files, "Listening.");
        let stop = CancellationToken::new();
        tokio::spawn(signals(stop.clone()));
        agentwire::server::run(Arc::new(gateway), doors, stop).await;
        Ok(())
    });
    // Outside the runtime: the exporter's blocking client flushes the last spans.
    drop(runtime);
    telemetry.shutdown();
    served
}

/// The address a listener is bound to, for the start line.
fn config_address(listener: &tokio::net::TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// Decides shutdown: the first SIGTERM or SIGINT starts the drain; a SIGINT during the drain (a
/// second Ctrl-C) exits at once with 130.
async fn signals(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "Cannot listen for {name}.");
            None
        }
    };
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT");
    async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
        match signal {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    tokio::select! {
        _ = received(&mut terminate) => tracing::info!("SIGTERM: shutting down."),
        _ = received(&mut interrupt) => tracing::info!("SIGINT: shutting down (SIGINT again to exit at once)."),
    }
    stop.cancel();
    received(&mut interrupt).await;
    tracing::warn!("SIGINT again: exiting now, without draining.");
    std::process::exit(130);
}
