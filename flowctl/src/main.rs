//! flowctl: the operator's view of vswitch.
//!
//! Offline (`--manifests DIR`) it compiles manifests with the same policy and
//! datapath code the switch runs and answers from the compiled tables; live mode
//! talks to vswitchd's control socket. Text by default, `--output json` for scripts.

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
    /// Attached ports (live).
    DumpPorts,
    /// Datapath counters: packets, drops by reason, cache, conntrack (live).
    Stats,
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
        Command::DumpPorts | Command::Stats => {
            bail!("dump-ports and stats need a running switch (drop --manifests)")
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
    let out = match &cli.command {
        Command::DumpFlows { table, cookie } => {
            let flows = ask(&Request::DumpFlows)?;
            let keep = |f: &&serde_json::Value| {
                let text = f["flow"].as_str().unwrap_or("");
                table.is_none_or(|t| text.contains(&format!("table={t},")))
                    && cookie
                        .as_deref()
                        .is_none_or(|r| f["rule"].as_str().unwrap_or("").contains(r))
            };
            let kept: Vec<&serde_json::Value> = flows
                .as_array()
                .into_iter()
                .flatten()
                .filter(keep)
                .collect();
            if json {
                pretty(&serde_json::json!(kept))
            } else {
                kept.iter()
                    .map(|f| {
                        format!(
                            "n_packets={}, n_bytes={}, {}  # {}\n",
                            f["n_packets"],
                            f["n_bytes"],
                            f["flow"].as_str().unwrap_or(""),
                            f["rule"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            }
        }
        Command::Trace { spec } => {
            let spec = spec::parse(spec).map_err(|e| anyhow::anyhow!("bad trace spec: {e}"))?;
            let v = ask(&Request::Trace {
                src: spec.src.to_string(),
                dst: spec.dst.to_string(),
                protocol: spec.l4.protocol_name().into(),
                port: spec.l4.port(),
            })?;
            if json {
                pretty(&v)
            } else {
                render::trace_text(&v, color)
            }
        }
        Command::DumpPorts => {
            let v = ask(&Request::Ports)?;
            if json {
                pretty(&v)
            } else {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        format!(
                            "{:<30} {:<8} {} {}\n",
                            p["pod"].as_str().unwrap_or(""),
                            p["ifname"].as_str().unwrap_or(""),
                            p["mac"].as_str().unwrap_or(""),
                            p["ips"]
                        )
                    })
                    .collect()
            }
        }
        Command::Stats => pretty(&ask(&Request::Stats)?),
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
