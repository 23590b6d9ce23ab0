//! `Content-Type` header → body format. Input: the header value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Header values are bytes; axum hands the handler a `&str` only when
    // they are visible ASCII, but the function must not care.
    if let Ok(text) = std::str::from_utf8(data) {
        holdfast_capture_fuzz::check_content_type(Some(text));
    }
});
