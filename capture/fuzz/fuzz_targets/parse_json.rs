//! `application/json` bodies: one object or an array of objects.
#![no_main]

use holdfast_capture::http::ingest::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = holdfast_capture_fuzz::options(Some("/user/id"));
    holdfast_capture_fuzz::check_parse(data, Format::Json, &opts);
});
