//! `Content-Encoding: gzip` bodies: single and multi-member, truncated,
//! trailing garbage, bombs past the limit; then the inflated body is parsed
//! as NDJSON, as the handler would.
#![no_main]

use holdfast_capture::http::ingest::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(body) =
        holdfast_capture_fuzz::check_gunzip(data, holdfast_capture_fuzz::GUNZIP_LIMIT)
    {
        let opts = holdfast_capture_fuzz::options(Some("/user/id"));
        holdfast_capture_fuzz::check_parse(&body, Format::Ndjson, &opts);
    }
});
