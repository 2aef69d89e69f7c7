//! Worker link, worker -> supervisor: any bytes as a frame payload decoded as `WorkerMsg`;
//! whatever decodes must round-trip within the frame cap, and a `Failed` must classify.
#![no_main]

use belljar_fuzz::{round_trip, start_case};
use belljar_protocol::worker::WorkerMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    start_case();
    if let Some(WorkerMsg::Failed(f)) = round_trip::<WorkerMsg>(data) {
        let _ = f.permanent();
    }
});
