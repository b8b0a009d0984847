//! The `Date` header of responses the lb writes itself (RFC 9110 §6.6.1), formatted at most
//! once a second per worker thread.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// `Sun, 06 Nov 1994 08:49:37 GMT`.
const LEN: usize = 29;

thread_local! {
    static CACHE: RefCell<(u64, [u8; LEN])> = const { RefCell::new((u64::MAX, [0; LEN])) };
}

/// The current time as an IMF-fixdate.
pub(crate) fn now() -> [u8; LEN] {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            let mut bytes = [b' '; LEN];
            let n = text.len().min(LEN);
            bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
            *c = (secs, bytes);
        }
        c.1
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_imf_fixdates() {
        let d = super::now();
        let text = std::str::from_utf8(&d).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
