//! Partition keys from a configured JSON pointer (`--key-pointer`). Input:
//! the pointer on the first line, then an NDJSON body.
#![no_main]

use holdfast_capture::http::ingest::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (pointer, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(pointer) = std::str::from_utf8(pointer) else {
        return;
    };
    let opts = holdfast_capture_fuzz::options(Some(pointer));
    holdfast_capture_fuzz::check_parse(body, Format::Ndjson, &opts);
});
