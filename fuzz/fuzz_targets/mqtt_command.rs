//! MQTT command messages (`<prefix>/cmd` payloads), with `install` allowed and a small limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = perch::service::mqtt::parse_command(data, true, 4096);
});
