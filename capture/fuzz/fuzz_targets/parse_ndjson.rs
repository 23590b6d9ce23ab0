//! `application/x-ndjson` bodies: one object per line, blank lines and
//! `\r\n` allowed.
#![no_main]

use holdfast_capture::http::ingest::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = holdfast_capture_fuzz::options(Some("/user/id"));
    holdfast_capture_fuzz::check_parse(data, Format::Ndjson, &opts);
});
