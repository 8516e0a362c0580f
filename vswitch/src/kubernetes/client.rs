//! The API client, and this node's pod CIDRs read before the watchers start.

use k8s_openapi::api::core::v1::Node as ApiNode;
use kube::{Api, Client};

use crate::config::Config;

/// The API client: the configured kubeconfig, else in-cluster or the default
/// kubeconfig.
pub(super) async fn client(config: &Config) -> anyhow::Result<Client> {
    let kube_config = match &config.kubernetes.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("bad kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no in-cluster config or kubeconfig: {e}"))?,
    };
    Client::try_from(kube_config).map_err(|e| anyhow::anyhow!("cannot build the API client: {e}"))
}

/// This node's pod CIDRs (`spec.podCIDRs` of its Node object, one per family
/// when dual-stack; else `spec.podCIDR`), retried until the API server
/// answers: until then nothing can be forwarded anyway.
///
/// Fails when no client can be built, or the Node has no or a bad pod CIDR.
pub fn own_pod_cidrs(config: &Config) -> anyhow::Result<Vec<ipnet::IpNet>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = client(config).await?;
        let nodes = Api::<ApiNode>::all(client);
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            match nodes.get(&config.node_name).await {
                Ok(node) => {
                    // podCIDRs (dual-stack: one per family), else podCIDR.
                    let spec = node.spec.unwrap_or_default();
                    let cidrs: Vec<String> = spec
                        .pod_cidrs
                        .filter(|c| !c.is_empty())
                        .or_else(|| spec.pod_cidr.map(|c| vec![c]))
                        .ok_or_else(|| anyhow::anyhow!("node {} has no spec.podCIDR", config.node_name))?;
                    return cidrs
                        .iter()
                        .map(|cidr| {
                            cidr.parse().map_err(|e| {
                                anyhow::anyhow!("node {}: bad podCIDR {cidr:?}: {e}", config.node_name)
                            })
                        })
                        .collect();
                }
                Err(e) => {
                    tracing::warn!(node = %config.node_name, error = %e, "cannot read this node's pod CIDR yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    })
}
