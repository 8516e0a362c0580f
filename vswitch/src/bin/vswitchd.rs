//! vswitchd: runs the switch on this node.
//!
//! `vswitchd --config FILE`. Applies the manifests, brings up the gateway,
//! reattaches recorded ports, then forwards and serves the control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vswitch::config::Config;
use vswitch::daemon::{Daemon, ManifestWatch};

fn usage() -> ExitCode {
    eprintln!("usage: vswitchd --config FILE");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config_path = match args.as_slice() {
        [flag, path] if flag == "--config" => PathBuf::from(path),
        [flag] if flag == "--help" || flag == "-h" => {
            println!("vswitchd --config FILE   (see examples/vswitchd.toml)");
            return ExitCode::SUCCESS;
        }
        _ => return usage(),
    };
    match run(config_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitchd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config =
        Config::load(&config_path).map_err(|e| anyhow::anyhow!(vswitch::daemon::chain(&e)))?;
    let mut watch = config
        .manifests
        .as_deref()
        .map(|dir| ManifestWatch::new(dir, Some(&config.state_dir)));
    let interval = Duration::from_millis(config.watch_interval_ms);
    let daemon = Daemon::start(config, &mut watch)?;
    let packets = daemon
        .switch
        .spawn_packet_thread("packets", Duration::from_micros(daemon.config.busy_poll_us))?;
    daemon.serve()?;
    if let Some(w) = watch {
        let switch = daemon.switch.clone();
        std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || w.run(switch, interval))?;
    }
    eprintln!(
        "vswitchd: ready, control socket {}",
        daemon.config.socket.display()
    );
    let _ = packets.join();
    Ok(())
}
