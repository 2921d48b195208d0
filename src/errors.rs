//! Error text shared by every layer: an error and its causes on one line, and a reqwest error
//! described without its URL (URLs may carry credentials; callers add a redacted one).

/// `e` followed by each distinct cause: `outer: inner: root`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    append_causes(&mut s, e.source());
    s
}

fn append_causes(s: &mut String, mut src: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
}

/// What went wrong with an HTTP request, with causes, never the URL.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
    .to_owned();
    append_causes(&mut s, std::error::Error::source(e));
    s
}

/// An I/O error as text, with the errno name added where operators grep for it (a full disk,
/// a read-only or over-quota filesystem).
pub fn io_text(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(28) => " [ENOSPC]",
        Some(30) => " [EROFS]",
        Some(122) => " [EDQUOT]",
        _ => "",
    };
    format!("{e}{name}")
}
