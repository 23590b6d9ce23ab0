//! Gzip request bodies: every member is decoded (`cat a.gz b.gz` is one valid
//! body, as several streaming compressors produce), bytes after the last member
//! that are not gzip are refused, and inflating stops at the decompressed limit
//! without allocating past it. The output buffer grows in steps that are
//! charged to the caller first, so a small body cannot make the pod allocate
//! memory it was not granted.

use std::io::Read;

use axum::http::StatusCode;

use super::ingest::Rejection;

/// Inflated bytes read per step.
const STEP: usize = 64 * 1024;

fn bad_gzip(message: String) -> Rejection {
    Rejection {
        status: StatusCode::BAD_REQUEST,
        reason: "bad_gzip",
        message,
        index: None,
    }
}

fn too_large(limit: usize) -> Rejection {
    Rejection {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        reason: "body_too_large",
        message: format!("decompressed body exceeds {limit} bytes"),
        index: None,
    }
}

/// Decompresses every gzip member of `body`, refusing to inflate past `limit`
/// bytes, with no memory budget.
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, Rejection> {
    gunzip_bounded(body, limit, |_| Ok(()))
}

/// Decompresses every gzip member of `body` into one buffer of at most `limit`
/// bytes. Before the buffer's capacity grows by `n` bytes, `reserve(n)` is
/// called; its error aborts decoding (a memory budget saying no).
pub fn gunzip_bounded<E: From<Rejection>>(
    body: &[u8],
    limit: usize,
    mut reserve: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    if body.is_empty() {
        return Err(bad_gzip("body is empty, not gzip".to_owned()).into());
    }
    let mut out: Vec<u8> = Vec::new();
    let mut step = vec![0u8; STEP.min(limit.saturating_add(1))];
    let mut rest = body;
    let mut members = 0usize;
    while !rest.is_empty() {
        if members > 0 && !rest.starts_with(&[0x1f, 0x8b]) {
            let n = rest.len();
            return Err(bad_gzip(format!(
                "{n} bytes after gzip member {members} are not gzip"
            ))
            .into());
        }
        let mut decoder = flate2::bufread::GzDecoder::new(rest);
        loop {
            let n = decoder.read(&mut step).map_err(|e| {
                bad_gzip(format!(
                    "body is not valid gzip (member {}): {e}",
                    members + 1
                ))
            })?;
            if n == 0 {
                break;
            }
            if out.len() + n > limit {
                return Err(too_large(limit).into());
            }
            if out.len() + n > out.capacity() {
                let target = (out.capacity() * 2).max(STEP).max(out.len() + n).min(limit);
                let grow = target - out.capacity();
                reserve(grow)?;
                out.reserve_exact(target - out.len());
            }
            out.extend_from_slice(&step[..n]);
        }
        let consumed = body.len() - rest.len();
        rest = decoder.into_inner();
        if body.len() - rest.len() == consumed {
            // A member that consumed nothing cannot happen for valid input; never loop on it.
            return Err(bad_gzip(format!("gzip member {} is empty", members + 1)).into());
        }
        members += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn gzip_is_bounded_and_validated() {
        let gz = gz(&[b'a'; 10_000]);
        assert_eq!(gunzip(&gz, 10_000).unwrap().len(), 10_000);
        assert_eq!(
            gunzip(&gz, 9_999).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(gunzip(b"not gzip", 100).unwrap_err().reason, "bad_gzip");
        assert_eq!(gunzip(b"", 100).unwrap_err().reason, "bad_gzip");
        let truncated = &gz[..gz.len() - 3];
        assert_eq!(gunzip(truncated, 100_000).unwrap_err().reason, "bad_gzip");
    }

    #[test]
    fn decodes_every_member_of_a_multi_member_body() {
        let mut body = gz(b"{\"a\":1}\n");
        body.extend(gz(b"{\"a\":2}\n"));
        body.extend(gz(b"{\"a\":3}\n"));
        assert_eq!(
            gunzip(&body, 1000).unwrap(),
            b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
    }

    #[test]
    fn refuses_trailing_bytes_that_are_not_gzip() {
        let mut body = gz(b"{\"a\":1}\n");
        body.extend(b"{\"a\":2}\n");
        let r = gunzip(&body, 1000).unwrap_err();
        assert_eq!((r.status, r.reason), (StatusCode::BAD_REQUEST, "bad_gzip"));
        assert!(
            r.message.contains("8 bytes after gzip member 1"),
            "{}",
            r.message
        );
        let mut zeros = gz(b"{}");
        zeros.extend([0u8; 4]);
        assert_eq!(gunzip(&zeros, 1000).unwrap_err().reason, "bad_gzip");
        let mut half = gz(b"{}");
        half.extend(&gz(b"{}")[..5]);
        assert_eq!(gunzip(&half, 1000).unwrap_err().reason, "bad_gzip");
    }

    #[test]
    fn the_limit_spans_members() {
        let mut body = gz(&[b'x'; 600]);
        body.extend(gz(&[b'y'; 600]));
        assert_eq!(gunzip(&body, 1200).unwrap().len(), 1200);
        assert_eq!(gunzip(&body, 1199).unwrap_err().reason, "body_too_large");
    }

    #[test]
    fn never_allocates_past_what_was_reserved_or_the_limit() {
        let body = gz(&vec![b'z'; 5 << 20]);
        let mut reserved = 0usize;
        let out = gunzip_bounded::<Rejection>(&body, 5 << 20, |n| {
            reserved += n;
            Ok(())
        })
        .unwrap();
        assert_eq!(out.len(), 5 << 20);
        assert!(
            out.capacity() <= reserved,
            "{} > {reserved}",
            out.capacity()
        );
        assert!(reserved <= 5 << 20, "reserved {reserved} past the limit");
        // A budget that says no stops decoding.
        let refused = gunzip_bounded(&body, 5 << 20, |n| {
            if n > 1 << 20 {
                Err(bad_gzip("budget".into()))
            } else {
                Ok(())
            }
        });
        assert_eq!(refused.unwrap_err().message, "budget");
        // A bomb stops at the limit: 16 MiB of zeros is never inflated past 1 MiB.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for _ in 0..16 {
            enc.write_all(&[0u8; 1 << 20]).unwrap();
        }
        let bomb = enc.finish().unwrap();
        let mut reserved = 0usize;
        let r = gunzip_bounded::<Rejection>(&bomb, 1 << 20, |n| {
            reserved += n;
            Ok(())
        });
        assert_eq!(r.unwrap_err().reason, "body_too_large");
        assert!(reserved <= 1 << 20, "{reserved}");
    }
}
