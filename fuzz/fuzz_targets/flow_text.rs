//! Any text as an ovs-ofctl flow: parse must not panic, and what parses must
//! print and parse back to the same flow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(flow) = datapath::parse_flow(text) {
        let printed = flow.to_string();
        let again = datapath::parse_flow(&printed).expect("printed flow parses");
        assert_eq!(again, flow, "{printed}");
    }
});
