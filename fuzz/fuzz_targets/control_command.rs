//! Control socket, client -> server: any bytes as a frame payload decoded as `ClientHello` and
//! as `Command`; whatever decodes must round-trip within the frame cap.
#![no_main]

use belljar_fuzz::{round_trip, start_case};
use belljar_protocol::control::{ClientHello, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    start_case();
    round_trip::<ClientHello>(data);
    round_trip::<Command>(data);
});
