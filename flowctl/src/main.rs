//! flowctl: the operator's view of vswitch.
//!
//! Offline (`--manifests DIR`) it compiles manifests with the same policy and
//! datapath code the switch runs and answers from the compiled tables; live mode
//! talks to vswitchd's control socket. Text by default, `--output json` for scripts.

mod diff;
mod live;
mod preview;
mod render;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use policy::manifest;
use policy::offline::Offline;
use policy::probe::L4;

use control::view::{
    ConnView, Deleted, DnsView, FlowView, HealthView, PolicyView, PortView, StatsView, TraceView,
};
use control::{Client, ConnFilter, DEFAULT_SOCKET, Request, error_chain, spec};
use policy::status::Rejections;

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
    /// Every policy by tier (Admin ClusterNetworkPolicies, NetworkPolicies,
    /// Baseline ClusterNetworkPolicies): in force or rejected and why, rules,
    /// flows, and what fails closed.
    DumpPolicies,
    /// Names learned from the pods' DNS answers (for ClusterNetworkPolicy
    /// `domainNames` peers), with their addresses and expiry (live).
    DumpDns,
    /// Services the switch load-balances: each ClusterIP frontend, its ready
    /// backends and (live) the tracked connections to each.
    DumpServices,
    /// The select groups the Service flows name (`group:N`), in ovs-ofctl's
    /// add-group syntax: one bucket per backend.
    DumpGroups,
    /// Trace a new connection: `tcp,src=NS/POD|IP,dst=NS/POD|IP,tp_dst=PORT`.
    Trace {
        /// Packet: protocol (tcp|udp|sctp|icmp), src= and dst= (a pod as
        /// NS/POD, or an IP address), tp_dst=.
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
    /// Every pod to every pod, for one protocol and port (default tcp/80).
    Reachability {
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "sctp"])]
        protocol: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
    /// The reachability changes from the `--manifests` set to NEW (offline):
    /// every pod in both, to every other, on every port a policy of either set
    /// names (and tcp/80), or only `--protocol`/`--port`. Exits 1 when
    /// something changes, like `diff`.
    Diff {
        /// The changed manifest directory (or file).
        new: PathBuf,
        #[arg(long, value_parser = ["tcp", "udp", "sctp"])]
        protocol: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Connections the switch has seen recently, per source, destination and
    /// port: counts allowed and denied, the verdict now and what staged
    /// policies would do (live).
    Recent,
    /// Replay the connections the switch has seen recently against the
    /// policy set in `--manifests DIR` (its NetworkPolicies and
    /// ClusterNetworkPolicies; the switch's own pods, namespaces and nodes)
    /// and list every connection whose verdict would change, grouped by
    /// rule (live). Exits 0 when nothing would change, 1 when something
    /// would, 2 on errors (an invalid manifest in DIR, no switch).
    WhatIf,
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Loads and compiles manifests, printing (not failing on) per-object errors.
/// Returns the compiled cluster and whether any object was rejected.
fn offline(dir: &Path) -> Result<(Offline, Rejections, bool)> {
    let m = manifest::load(dir)
        .with_context(|| format!("failed to load manifests from {}", dir.display()))?;
    let mut rejected = Rejections::new();
    for e in &m.errors {
        eprintln!("flowctl: {}", error_chain(e));
        if let Some((kind, name)) = rejected_object(e) {
            rejected.insert((kind.to_string(), name), error_chain(e));
        }
    }
    for p in &m.cluster_policies {
        for w in &p.warnings {
            eprintln!("flowctl: ClusterNetworkPolicy {}: {w}", p.name);
        }
    }
    let compiled = Offline::with_services(m.to_cluster(), &m.services)
        .context("failed to compile manifests")?;
    Ok((compiled, rejected, !m.errors.is_empty()))
}

/// (kind, name) of the object a manifest error rejected, when it names one.
fn rejected_object(e: &policy::Error) -> Option<(&'static str, String)> {
    match e {
        policy::Error::InFile { source, .. } => rejected_object(source),
        policy::Error::Invalid { kind, object, .. } => Some((kind, object.clone())),
        _ => None,
    }
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
    if let Command::WhatIf = cli.command {
        let Some(dir) = &cli.manifests else {
            bail!(
                "what-if needs --manifests DIR: the policy set to replay recent connections against"
            );
        };
        // Like diff: 0 nothing changes, 1 something does, 2 cannot tell.
        return Ok(what_if(&cli, dir).unwrap_or_else(|e| {
            eprintln!("flowctl: {e:#}");
            ExitCode::from(2)
        }));
    }
    let Some(dir) = &cli.manifests else {
        return live(&cli);
    };
    let (offline, rejected, had_errors) = offline(dir)?;
    let json = cli.output == Output::Json;
    let color = !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let out = match cli.command {
        Command::DumpFlows { table, cookie } => {
            render::dump_flows(&offline, table, cookie.as_deref(), json)
        }
        Command::DumpGroups => {
            let v: Vec<String> = policy::pipeline::groups(&offline.topology)
                .iter()
                .map(ToString::to_string)
                .collect();
            if json {
                pretty(&v)
            } else {
                v.iter().map(|g| format!("{g}\n")).collect()
            }
        }
        Command::DumpServices => {
            let v = control::view::service_views(
                &offline.topology.frontends,
                offline.compiler.cluster(),
                |_, _| None,
            );
            if json {
                pretty(&v)
            } else {
                live::services_text(&v, color)
            }
        }
        Command::DumpPolicies => {
            // The staged compiler has every policy, staged ones included.
            let compiler = offline
                .shadow
                .as_ref()
                .map_or(&offline.compiler, |s| &s.compiler);
            let v = policy::status::views(compiler, &rejected);
            if json {
                pretty(&v)
            } else {
                live::policies_text(&v, color)
            }
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
        Command::Diff {
            new,
            protocol,
            port,
        } => {
            let (after, _, new_errors) = self::offline(&new)?;
            let only = match (protocol.as_deref(), port) {
                (None, None) => None,
                (p, port) => {
                    let port = port.unwrap_or(80);
                    Some(match p {
                        Some("udp") => L4::Udp(port),
                        Some("sctp") => L4::Sctp(port),
                        _ => L4::Tcp(port),
                    })
                }
            };
            let changes = diff::changes(&offline, &after, only);
            print!(
                "{}",
                if json {
                    pretty(&changes)
                } else {
                    diff::text(&changes, color)
                }
            );
            return Ok(if had_errors || new_errors {
                ExitCode::from(2)
            } else if changes.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::DumpPorts
        | Command::DumpDns
        | Command::Health
        | Command::DumpConntrack { .. }
        | Command::Stats
        | Command::AddFlow { .. }
        | Command::ModFlows { .. }
        | Command::DelFlows { .. }
        | Command::Recent
        | Command::Watch { .. } => {
            bail!("this command needs a running switch (drop --manifests)")
        }
        Command::Completions { .. } | Command::WhatIf => unreachable!("handled above"),
    };
    print!("{out}");
    Ok(if had_errors {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// `what-if`: the proposal read here (errors reported here), replayed by
/// the switch.
fn what_if(cli: &Cli, dir: &Path) -> Result<ExitCode> {
    let files = preview::proposal(dir)?;
    let mut client = connect(cli)?;
    let v: control::view::WhatIfView = typed(
        client
            .call(&Request::WhatIf { files })
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
    )?;
    let json = cli.output == Output::Json;
    let color = !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if json {
        print!("{}", pretty(&v));
    } else {
        print!("{}", preview::what_if_text(&v, color));
    }
    Ok(if v.changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The control socket, with a clear error when no switch runs.
fn connect(cli: &Cli) -> Result<Client> {
    if !cli.socket.exists() {
        bail!(
            "no running switch: control socket {} does not exist (start vswitchd, or use --manifests DIR for offline mode)",
            cli.socket.display()
        );
    }
    Client::connect(&cli.socket, "flowctl").map_err(|e| anyhow::anyhow!(error_chain(&e)))
}

/// Live mode: ask vswitchd over its control socket.
fn live(cli: &Cli) -> Result<ExitCode> {
    let mut client = connect(cli)?;
    let mut ask = |req: &Request| -> Result<serde_json::Value> {
        client
            .call(req)
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
    };
    let json = cli.output == Output::Json;
    let color = !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let out = match &cli.command {
        Command::DumpFlows { table, cookie } => {
            let flows: Vec<FlowView> = typed(ask(&Request::DumpFlows)?)?;
            let kept = live::kept_flows(&flows, *table, cookie.as_deref());
            if json {
                pretty(&kept)
            } else {
                live::flows_text(&kept, color)
            }
        }
        Command::DumpPolicies => {
            let v: Vec<PolicyView> = typed(ask(&Request::DumpPolicies)?)?;
            if json {
                pretty(&v)
            } else {
                live::policies_text(&v, color)
            }
        }
        Command::Trace { spec } => {
            let spec = spec::parse(spec).map_err(|e| anyhow::anyhow!("bad trace spec: {e}"))?;
            let v: TraceView = typed(ask(&Request::Trace {
                src: spec.src,
                dst: spec.dst,
                l4: spec.l4,
            })?)?;
            if json {
                pretty(&v)
            } else {
                render::trace_text(&v, color)
            }
        }
        Command::DumpGroups => {
            let v: Vec<String> = typed(ask(&Request::DumpGroups)?)?;
            if json {
                pretty(&v)
            } else {
                v.iter().map(|g| format!("{g}\n")).collect()
            }
        }
        Command::DumpServices => {
            let v: Vec<control::view::ServiceView> = typed(ask(&Request::DumpServices)?)?;
            if json {
                pretty(&v)
            } else {
                live::services_text(&v, color)
            }
        }
        Command::DumpDns => {
            let v: Vec<DnsView> = typed(ask(&Request::DumpDns)?)?;
            if json {
                pretty(&v)
            } else {
                live::dns_text(&v, color)
            }
        }
        Command::Recent => {
            let v: control::view::RecentView = typed(ask(&Request::Recent)?)?;
            if json {
                pretty(&v)
            } else {
                preview::recent_text(&v, color)
            }
        }
        Command::DumpPorts => {
            let v: Vec<PortView> = typed(ask(&Request::Ports)?)?;
            if json {
                pretty(&v)
            } else {
                live::ports_text(&v, color)
            }
        }
        Command::DumpConntrack { zone, filter } => {
            let filter = ConnFilter::parse(filter.as_deref().unwrap_or(""))
                .map_err(|e| anyhow::anyhow!("bad filter: {e}"))?;
            let v: Vec<ConnView> = typed(ask(&Request::DumpConntrack {
                zone: *zone,
                filter,
            })?)?;
            if json {
                pretty(&v)
            } else {
                live::conntrack_text(&v, color)
            }
        }
        Command::Stats => {
            let v: StatsView = typed(ask(&Request::Stats)?)?;
            if json {
                pretty(&v)
            } else {
                live::stats_text(&v, color)
            }
        }
        Command::Health => {
            let v: HealthView = typed(ask(&Request::Health)?)?;
            if json {
                print!("{}", pretty(&v));
            } else {
                println!(
                    "{} (source {}, node {}, generation {})",
                    if v.ready { "ready" } else { "not ready" },
                    v.source,
                    v.node,
                    v.generation
                );
            }
            return Ok(if v.ready {
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
            let v: Deleted = typed(ask(&Request::DelFlows { flow: flow.clone() })?)?;
            if json {
                pretty(&v)
            } else {
                format!("{} flow(s) deleted\n", v.deleted)
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
                let flows: Vec<FlowView> = typed(ask(&Request::DumpFlows)?)?;
                let kept = live::kept_flows(&flows, *table, cookie.as_deref());
                let frame = if json {
                    format!("{}\n", serde_json::to_string(&kept).unwrap_or_default())
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
                previous = kept.iter().map(|f| (f.flow.clone(), f.n_packets)).collect();
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs_f64(*interval));
            }
            String::new()
        }
        Command::Reachability { .. } => bail!("reachability runs offline: use --manifests DIR"),
        Command::Diff { .. } => bail!("diff runs offline: flowctl --manifests OLD diff NEW"),
        Command::Completions { .. } | Command::WhatIf => unreachable!("handled before"),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// An answer as pretty JSON, one line break at the end.
fn pretty<T: serde::Serialize>(v: &T) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
}

/// An answer as its typed view.
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).context("vswitchd sent an answer this flowctl cannot read")
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
