//! Writes the synthetic cluster (`policy::synthetic`) as a manifest directory:
//! `synthetic-cluster DIR [NAMESPACES] [PODS_PER_NAMESPACE]` (default 1000 x 10:
//! 10,000 pods and 10,000 NetworkPolicies).

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: synthetic-cluster DIR [NAMESPACES] [PODS_PER_NAMESPACE]");
        std::process::exit(2);
    };
    let number = |i: usize, default: usize| -> usize {
        args.get(i).map_or(default, |a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("synthetic-cluster: {a:?} is not a number");
                std::process::exit(2)
            })
        })
    };
    let (namespaces, pods) = (number(1, 1000), number(2, 10));
    std::fs::create_dir_all(dir)?;
    for (name, text) in policy::synthetic::manifests(namespaces, pods) {
        std::fs::write(std::path::Path::new(dir).join(name), text)?;
    }
    Ok(())
}
