//! vswitch-cni: the CNI plugin that attaches pods to vswitchd.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let vars = std::env::vars().collect();
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    match vswitch::cni::run(&vars, &stdin) {
        Ok(out) => {
            if !out.is_null() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err((e, version)) => {
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
