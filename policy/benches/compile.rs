//! Policy compiler at scale. Run: `cargo bench -p policy --bench compile`.
//!
//! A generated cluster of 10,000 pods in 1,000 namespaces with 10,000
//! NetworkPolicies (ten per namespace: default deny, allow from own namespace, from
//! labelled namespaces, from pod labels on a port, ipBlock with except, named
//! port, port range, egress to namespaces and DNS, egress ipBlock, namespace AND
//! pod selector). Before the timed benchmarks it prints the flow count and the
//! peak heap of one full compile, measured by a counting allocator.

#![allow(unsafe_code)] // the counting global allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use divan::Bencher;
use policy::compile::{Change, Compiler};
use policy::model::ObjectKey;
use policy::synthetic::{cluster, cluster_policies, pod_labels};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAMESPACES: usize = 1000;
const PODS_PER_NS: usize = 10;

fn main() {
    let c = cluster(NAMESPACES, PODS_PER_NS);
    assert_eq!(c.pods().count(), NAMESPACES * PODS_PER_NS);
    assert_eq!(c.policies().count(), NAMESPACES * 10);
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let compiler = Compiler::from_cluster(c.clone());
    let took = t.elapsed();
    let peak = PEAK.load(Relaxed) - base;
    let flows = compiler.flows();
    let conj: usize = flows.iter().filter(|f| f.is_conjunctive()).count();
    eprintln!(
        "scale: {} pods, {} namespaces, {} policies -> {} flows ({} conjunctive clause flows); one full compile {:.0} ms, peak heap {:.1} MiB",
        NAMESPACES * PODS_PER_NS,
        NAMESPACES,
        NAMESPACES * 10,
        flows.len(),
        conj,
        took.as_secs_f64() * 1e3,
        peak as f64 / (1 << 20) as f64
    );
    drop(flows);
    drop(compiler);
    let c = with_tiers();
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let compiler = Compiler::from_cluster(c);
    let took = t.elapsed();
    let peak = PEAK.load(Relaxed) - base;
    eprintln!(
        "scale with tiers: + {TIERS} ClusterNetworkPolicies -> {} flows; one full compile {:.0} ms, peak heap {:.1} MiB",
        compiler.len(),
        took.as_secs_f64() * 1e3,
        peak as f64 / (1 << 20) as f64
    );
    drop(compiler);
    divan::main();
}

const TIERS: usize = 200;

/// The cluster above plus 200 ClusterNetworkPolicies (Admin and Baseline).
fn with_tiers() -> policy::Cluster {
    let mut c = cluster(NAMESPACES, PODS_PER_NS);
    for p in cluster_policies(TIERS) {
        c.upsert_cluster_policy(p);
    }
    c
}

#[divan::bench(sample_count = 5)]
fn full_compile_with_200_cluster_network_policies(bencher: Bencher) {
    let c = with_tiers();
    bencher
        .with_inputs(|| c.clone())
        .bench_values(|c| black_box(Compiler::from_cluster(c).len()));
}

/// Relabels one pod with the tiers in force.
#[divan::bench(sample_count = 50)]
fn relabel_one_pod_with_tiers(bencher: Bencher) {
    relabel(bencher, with_tiers());
}

#[divan::bench(sample_count = 5)]
fn full_compile_10k_pods_10k_policies(bencher: Bencher) {
    let c = cluster(NAMESPACES, PODS_PER_NS);
    bencher
        .with_inputs(|| c.clone())
        .bench_values(|c| black_box(Compiler::from_cluster(c).len()));
}

/// Relabels one pod (alternating two label sets): recompiles what it touches.
#[divan::bench(sample_count = 50)]
fn relabel_one_pod(bencher: Bencher) {
    relabel(bencher, cluster(NAMESPACES, PODS_PER_NS));
}

/// Relabels one pod of `c`, alternating two label sets.
fn relabel(bencher: Bencher, c: policy::Cluster) {
    let mut compiler = Compiler::from_cluster(c);
    let key = ObjectKey::new("ns-500", "pod-4");
    let mut pod = compiler.cluster().pod(&key).unwrap().clone();
    let mut flip = false;
    bencher.bench_local(|| {
        flip = !flip;
        pod.labels = pod_labels(if flip { 3 } else { 4 }, flip);
        let diff = compiler.apply(Change::Pod(pod.clone()));
        black_box(diff.len())
    });
}
