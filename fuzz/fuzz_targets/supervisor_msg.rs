//! Worker link, supervisor -> worker: any bytes as a frame payload decoded as `SupervisorMsg`;
//! whatever decodes must round-trip within the frame cap.
#![no_main]

use belljar_fuzz::{round_trip, start_case};
use belljar_protocol::worker::SupervisorMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    start_case();
    match round_trip::<SupervisorMsg>(data) {
        Some(SupervisorMsg::Pressure(p)) => assert_eq!(p.level.to_string(), p.level.as_str()),
        // The request checks take anything that decodes, without panicking.
        Some(SupervisorMsg::Prompt(p)) => {
            let _ = p.sampling.check();
        }
        _ => {}
    }
});
