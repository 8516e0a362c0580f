//! vswitchd: runs the switch on this node.
//!
//! `vswitchd --config FILE [--log-format text|json]`. Applies the manifests,
//! brings up the gateway, reattaches recorded ports, then forwards and serves the
//! control socket (and, when configured, metrics and the audit log).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vswitch::config::Config;
use vswitch::daemon::Daemon;
use vswitch::manifests::ManifestWatch;

#[derive(Parser, Debug)]
#[command(
    name = "vswitchd",
    version,
    about = "The vswitch daemon (see examples/vswitchd.toml)"
)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Log lines as text or as JSON objects (one per line). Levels come from
    /// RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SIGTERM/SIGINT are taken by one thread (below) for a graceful stop; every
    // thread started from here on inherits the block.
    if let Err(e) = vswitch::sys::block_termination_signals() {
        eprintln!("vswitchd: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    match run(cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config =
        Config::load(&config_path).map_err(|e| anyhow::anyhow!(control::error_chain(&e)))?;
    let mut watch = config
        .manifests
        .as_deref()
        .map(|dir| ManifestWatch::new(dir, Some(&config.state_dir)));
    let interval = Duration::from_millis(config.watch_interval_ms);
    let daemon = Daemon::start(config, &mut watch)?;
    let (realiser, forwarder) = (daemon.realiser.clone(), daemon.forwarder.clone());
    let wants_events = daemon.config.metrics_address.is_some()
        || daemon.config.audit.is_some()
        || daemon.config.recent.max_tuples > 0;
    if wants_events && let Some(events) = forwarder.connection_events(16_384) {
        let (realiser, audit, recent) = (
            realiser.clone(),
            daemon.config.audit.clone(),
            daemon.recent.clone(),
        );
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || vswitch::audit::run(realiser, events, audit, recent))?;
    }
    // DNS answers copied by the datapath (only while a ClusterNetworkPolicy
    // has domainNames peers): learned for those peers.
    if let Some(frames) = forwarder.punted_frames(4096) {
        let (realiser, dns) = (realiser.clone(), daemon.config.dns.clone());
        std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || vswitch::snoop::run(realiser, dns, frames))?;
    }
    if let Some(address) = daemon.config.metrics_address {
        let web = daemon.config.web.then(|| vswitch::web::Web {
            realiser: realiser.clone(),
            recent: daemon.recent.clone(),
            node: daemon.config.node_name.clone(),
            ready: daemon.ready.clone(),
        });
        let web_on = web.is_some();
        vswitch::metrics::start(address, realiser.clone(), forwarder.clone(), web)?;
        tracing::info!(%address, "serving metrics on /metrics");
        if web_on {
            tracing::info!("serving the web view on http://{address}/ (read only)");
        }
    }
    let threads = daemon.config.packet_threads();
    let busy_poll = vswitch::forwarder::Polling {
        min: Duration::from_micros(daemon.config.busy_poll_us),
        max: Duration::from_micros(daemon.config.busy_poll_max_us),
    };
    let packets = forwarder.spawn(
        "packets",
        threads,
        busy_poll,
        daemon.config.packet_thread_nice,
    )?;
    tracing::info!(threads = packets.len(), "packet threads started");
    daemon.serve()?;
    {
        let (realiser, config) = (realiser.clone(), daemon.config.clone());
        std::thread::Builder::new()
            .name("routes".into())
            .spawn(move || vswitch::gateway::sync_routes_forever(realiser, config))?;
    }
    if daemon.config.source == vswitch::config::Source::Kubernetes {
        let (realiser, config, ready) = (
            realiser.clone(),
            daemon.config.clone(),
            daemon.ready.clone(),
        );
        std::thread::Builder::new()
            .name("kubernetes".into())
            .spawn(move || {
                if let Err(e) = vswitch::kubernetes::run(realiser, config, ready) {
                    tracing::error!("kubernetes source stopped: {e:#}");
                }
            })?;
    }
    if let Some(w) = watch {
        let realiser = realiser.clone();
        std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || w.run(realiser, interval))?;
    }
    {
        let forwarder = forwarder.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(sig) = vswitch::sys::wait_termination() {
                    tracing::info!(signal = sig, "stopping");
                    forwarder.stop();
                }
            })?;
    }
    tracing::info!(socket = %daemon.config.socket.display(), "ready");
    packets.join();
    // Stopped by a signal: keep the connections for the next start. (After a
    // crash or kill -9 there is nothing to keep: established connections are
    // then dropped and reconnect.)
    match daemon.save_conntrack() {
        Ok(n) => tracing::info!(connections = n, "conntrack saved for the next start"),
        Err(e) => tracing::error!("cannot save conntrack: {e:#}"),
    }
    Ok(())
}
