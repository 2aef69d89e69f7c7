//! Control socket, server -> client: any bytes as a frame payload decoded as `ServerHello` and
//! as `Response` (the status report included); whatever decodes must round-trip within the cap.
#![no_main]

use belljar_fuzz::{round_trip, start_case};
use belljar_protocol::control::{Response, ServerHello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    start_case();
    round_trip::<ServerHello>(data);
    round_trip::<Response>(data);
});
