//! flowctl: the operator's view of vswitch.
//!
//! Offline (`--manifests DIR`) it compiles manifests with the same policy and
//! datapath code the switch runs and answers from the compiled tables; live mode
//! talks to vswitchd's control socket. Text by default, `--output json` for scripts.

mod live;
mod render;
mod spec;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use policy::manifest;
use policy::offline::{L4, Offline};

use vswitch::control::{DEFAULT_SOCKET, Request, request};

#[derive(Parser, Debug)]
#[command(
    name = "flowctl",
    version,
    about = "Inspect vswitch flows, trace packets, check reachability"
)]
struct Cli {
    /// Offline mode: compile the manifests in DIR (or one file) instead of asking vswitchd.
    #[arg(long, global = true, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// vswitchd's control socket (live mode).
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    /// Same as text (for `reachability`, a matrix).
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the flows in ovs-ofctl syntax, each with the rule it comes from.
    DumpFlows {
        /// Only this table.
        #[arg(long)]
        table: Option<u8>,
        /// Only flows whose rule mentions RULE (e.g. `default/test-network-policy`).
        #[arg(long, value_name = "RULE")]
        cookie: Option<String>,
    },
    /// Trace a new connection: `tcp,src=NS/POD,dst=NS/POD|IP,tp_dst=PORT`.
    Trace {
        /// Packet: protocol (tcp|udp|sctp|icmp), src=, dst=, tp_dst=.
        spec: String,
    },
    /// Ports with their pods and counters: rx/tx, drops by reason (live).
    DumpPorts,
    /// Tracked connections (live).
    DumpConntrack {
        /// Only this conntrack zone.
        #[arg(long)]
        zone: Option<u16>,
        /// `proto=tcp,ip=10.0.0.1,port=80,state=ESTABLISHED` (also src=, dst=,
        /// sport=, dport=).
        filter: Option<String>,
    },
    /// Counters: cache hit rate, tables, conntrack, drops, policy realisation (live).
    Stats,
    /// Whether the switch is ready (cluster state synced and enforced); exits 1
    /// when not (a readiness probe).
    Health,
    /// Add a flow by hand, ovs-ofctl syntax (live; debugging only: it is not
    /// policy, stays until del-flows or restart, and cannot replace a compiled flow).
    AddFlow { flow: String },
    /// Change the actions of a flow added by hand (live).
    ModFlows { flow: String },
    /// Delete the hand-added flow with this table, priority and match, or all
    /// hand-added flows (live). Compiled flows cannot be deleted.
    DelFlows { flow: Option<String> },
    /// Flows ordered by packet rate, refreshed in place like top (live).
    Watch {
        /// Only this table.
        #[arg(long)]
        table: Option<u8>,
        /// Only flows whose rule mentions RULE.
        #[arg(long, value_name = "RULE")]
        cookie: Option<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after N refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Flows shown.
        #[arg(long, default_value_t = 30)]
        limit: usize,
    },
    /// Every pod to every pod, for one protocol and port.
    Reachability {
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "sctp"])]
        protocol: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Loads and compiles manifests, printing (not failing on) per-object errors.
/// Returns the compiled cluster and whether any object was rejected.
fn offline(dir: &Path) -> Result<(Offline, bool)> {
    let m = manifest::load(dir)
        .with_context(|| format!("failed to load manifests from {}", dir.display()))?;
    for e in &m.errors {
        eprintln!("flowctl: {}", render::error_chain(e));
    }
    let compiled = Offline::new(m.to_cluster()).context("failed to compile manifests")?;
    Ok((compiled, !m.errors.is_empty()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "flowctl",
            &mut std::io::stdout(),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let Some(dir) = &cli.manifests else {
        return live(&cli);
    };
    let (offline, had_errors) = offline(dir)?;
    let json = cli.output == Output::Json;
    let color = !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let out = match cli.command {
        Command::DumpFlows { table, cookie } => {
            render::dump_flows(&offline, table, cookie.as_deref(), json)
        }
        Command::Trace { spec } => {
            let spec = spec::parse(&spec).map_err(|e| anyhow::anyhow!("bad trace spec: {e}"))?;
            let traced = offline
                .trace(&spec.src, &spec.dst, spec.l4)
                .map_err(|e| anyhow::anyhow!("cannot trace: {e}"))?;
            render::trace(&offline, &spec, &traced, json, color)
        }
        Command::Reachability { protocol, port } => {
            let l4 = match protocol.as_str() {
                "udp" => L4::Udp(port),
                "sctp" => L4::Sctp(port),
                _ => L4::Tcp(port),
            };
            render::reachability(&offline, l4, json, color)
        }
        Command::DumpPorts
        | Command::Health
        | Command::DumpConntrack { .. }
        | Command::Stats
        | Command::AddFlow { .. }
        | Command::ModFlows { .. }
        | Command::DelFlows { .. }
        | Command::Watch { .. } => {
            bail!("this command needs a running switch (drop --manifests)")
        }
        Command::Completions { .. } => unreachable!("handled above"),
    };
    print!("{out}");
    Ok(if had_errors {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Live mode: ask vswitchd over its control socket.
fn live(cli: &Cli) -> Result<ExitCode> {
    if !cli.socket.exists() {
        bail!(
            "no running switch: control socket {} does not exist (start vswitchd, or use --manifests DIR for offline mode)",
            cli.socket.display()
        );
    }
    let ask = |req: &Request| {
        request(&cli.socket, req).map_err(|e| anyhow::anyhow!(render::error_chain(&e)))
    };
    let json = cli.output == Output::Json;
    let color = !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let pretty = |v: &serde_json::Value| {
        format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
    };
    // Asks, then prints the answer as JSON or as `text` renders it.
    let view = |req: &Request, text: fn(&serde_json::Value, bool) -> String| {
        ask(req).map(|v| if json { pretty(&v) } else { text(&v, color) })
    };
    let out = match &cli.command {
        Command::DumpFlows { table, cookie } => {
            let flows = ask(&Request::DumpFlows)?;
            let kept = live::kept_flows(&flows, *table, cookie.as_deref());
            if json {
                pretty(&serde_json::json!(kept))
            } else {
                live::flows_text(&kept, color)
            }
        }
        Command::Trace { spec } => {
            let spec = spec::parse(spec).map_err(|e| anyhow::anyhow!("bad trace spec: {e}"))?;
            view(
                &Request::Trace {
                    src: spec.src.to_string(),
                    dst: spec.dst.to_string(),
                    protocol: spec.l4.protocol_name().into(),
                    port: spec.l4.port(),
                },
                render::trace_text,
            )?
        }
        Command::DumpPorts => view(&Request::Ports, live::ports_text)?,
        Command::DumpConntrack { zone, filter } => view(
            &Request::DumpConntrack {
                zone: *zone,
                filter: filter.clone(),
            },
            live::conntrack_text,
        )?,
        Command::Stats => view(&Request::Stats, live::stats_text)?,
        Command::Health => {
            let v = ask(&Request::Health)?;
            let ready = v["ready"].as_bool().unwrap_or(false);
            if json {
                print!("{}", pretty(&v));
            } else {
                println!(
                    "{} (source {}, node {}, generation {})",
                    if ready { "ready" } else { "not ready" },
                    v["source"].as_str().unwrap_or("?"),
                    v["node"].as_str().unwrap_or("?"),
                    v["generation"]
                );
            }
            return Ok(if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::AddFlow { flow } => {
            ask(&Request::AddFlow { flow: flow.clone() })?;
            eprintln!(
                "flowctl: flow added by hand (not policy; it stays until del-flows or a vswitchd restart)"
            );
            String::new()
        }
        Command::ModFlows { flow } => {
            ask(&Request::ModFlows { flow: flow.clone() })?;
            String::new()
        }
        Command::DelFlows { flow } => {
            let v = ask(&Request::DelFlows { flow: flow.clone() })?;
            if json {
                pretty(&v)
            } else {
                format!("{} flow(s) deleted\n", v["deleted"])
            }
        }
        Command::Watch {
            table,
            cookie,
            interval,
            count,
            limit,
        } => {
            if !(*interval > 0.0 && interval.is_finite()) {
                bail!("--interval must be a positive number of seconds");
            }
            let mut previous = std::collections::HashMap::new();
            let mut n = 0u64;
            loop {
                let flows = ask(&Request::DumpFlows)?;
                let kept = live::kept_flows(&flows, *table, cookie.as_deref());
                let frame = if json {
                    format!("{}\n", serde_json::json!(kept))
                } else {
                    let clear = if std::io::stdout().is_terminal() {
                        "\x1b[H\x1b[2J"
                    } else {
                        ""
                    };
                    format!(
                        "{clear}flowctl watch: {} flows, every {interval}s (Ctrl-C to stop)\n{}",
                        kept.len(),
                        live::watch_frame(&kept, &previous, *interval, *limit, color)
                    )
                };
                print!("{frame}");
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                previous = kept
                    .iter()
                    .map(|f| {
                        (
                            f["flow"].as_str().unwrap_or("").to_string(),
                            f["n_packets"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs_f64(*interval));
            }
            String::new()
        }
        Command::Reachability { .. } => bail!("reachability runs offline: use --manifests DIR"),
        Command::Completions { .. } => unreachable!("handled before"),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
