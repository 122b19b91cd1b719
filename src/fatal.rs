//! A fatal error as one line for people: every cause once, even where a library's message already includes its source's.

/// `e` and its causes joined with ": ", skipping a cause whose text is already shown and
/// letting a cause that repeats the one before it (and adds to it) take its place.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    push_causes(&mut parts, Some(e));
    parts.join(": ")
}

/// A gRPC status as its message and the causes under it (its own `Display` repeats the
/// code and debug-prints the source).
pub fn status(s: &tonic::Status) -> String {
    let mut parts = vec![s.message().trim().to_owned()];
    push_causes(&mut parts, std::error::Error::source(s));
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

/// [`chain`] for an `anyhow` error with its contexts.
pub fn describe(e: &anyhow::Error) -> String {
    chain(e.as_ref())
}

fn push_causes(parts: &mut Vec<String>, mut next: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(err) = next {
        push_part(parts, err.to_string());
        next = err.source();
    }
}

fn push_part(parts: &mut Vec<String>, msg: String) {
    let msg = msg.trim().to_owned();
    if msg.is_empty() || parts.iter().any(|p| p.contains(&msg)) {
        return;
    }
    match parts.last_mut() {
        Some(last) if msg.starts_with(last.as_str()) => *last = msg,
        _ => parts.push(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error: {0}")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn repeated_causes_show_once() {
        let io = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let e = anyhow::Error::new(Connect(io))
            .context("tcp connect error")
            .context("connecting to flowlens at 127.0.0.1:1");
        let text = describe(&e);
        assert_eq!(text.matches("tcp connect error").count(), 1, "{text}");
        assert_eq!(text.matches("refused").count(), 1, "{text}");
        assert!(
            text.starts_with("connecting to flowlens at 127.0.0.1:1: "),
            "{text}"
        );
    }
}
