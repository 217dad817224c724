//! Topic globs, as routes and `allowed_topics` write them.

/// `*` matches any run of characters (also empty), `?` exactly one; the rest literally.
/// Works on bytes, without allocating: topic names and their globs are ASCII (Kafka allows
/// letters, digits, `.`, `_` and `-`), and a `?` meets one byte of anything else.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("events.*", "events.DepositMade"));
        assert!(glob_match("events.*", "events."));
        assert!(!glob_match("events.*", "event.x"));
        assert!(glob_match("*.dlq", "a.b.dlq"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*a*b*", "xxaYYbZ"));
    }
}
