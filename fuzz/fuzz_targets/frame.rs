//! Any byte sequence, as a frame from any port, through parse and a stateful
//! pipeline: must never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use datapath::{Datapath, DatapathConfig, PortNo, Time, parse_flow};
use libfuzzer_sys::fuzz_target;

fn datapath() -> &'static Arc<Datapath> {
    static DP: OnceLock<Arc<Datapath>> = OnceLock::new();
    DP.get_or_init(|| {
        let dp = Datapath::new(DatapathConfig::default());
        let flows = [
            "table=0,priority=10,in_port=1,actions=goto_table:10",
            "table=0,priority=10,in_port=2,actions=goto_table:10",
            "table=10,priority=10,ip,actions=ct(zone=1,table=30)",
            "table=10,priority=10,ipv6,actions=ct(zone=1,table=30)",
            "table=10,priority=5,arp,arp_op=1,actions=move:dl_src->dl_dst,set_field:02:00:00:00:00:fe->dl_src,load:0x2->nw_proto[],move:arp_sha->arp_tha,move:nw_src->nw_dst,output:in_port",
            "table=30,priority=10,ct_state=+inv+trk,actions=drop",
            "table=30,priority=5,ct_state=+new+trk,actions=ct(commit,zone=1),resubmit(,40),output:2",
            "table=30,priority=1,actions=output:1",
            "table=40,priority=1,tcp,tp_dst=0x50/0xfff0,actions=controller",
        ];
        dp.update(Time::ZERO, |t| {
            t.apply(flows.iter().map(|f| parse_flow(f).unwrap()), |_| true, Time::ZERO)
        })
        .unwrap();
        dp
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&port, frame)) = data.split_first() else { return };
    let mut frame = frame.to_vec();
    let mut worker = datapath().worker();
    worker.begin_batch();
    let _ = worker.process(Time::from_secs(1), PortNo(u32::from(port % 4)), &mut frame);
});
