//! User values inside error lines: JSON-escaped, cut when long, never a line break.
//!
//! A refused configuration is logged by Envoy and printed by canaryctl as one line. Values come from users
//! (and from whatever a broken tool sent), so they are quoted as JSON strings, cut to a readable length,
//! and any control character or line separator left in a message is escaped.

/// Longest user value shown in an error, in characters; longer ones are cut with `…`.
pub const MAX_SHOWN: usize = 64;

/// Longest error line, in characters (the middle of a longer one is cut).
pub const MAX_LINE: usize = 400;

/// `value` cut to [`MAX_SHOWN`] characters, with `…` where it was cut.
pub fn cut(value: &str) -> String {
    match value.char_indices().nth(MAX_SHOWN) {
        Some((at, _)) => format!("{}…", value.get(..at).unwrap_or(value)),
        None => value.to_string(),
    }
}

/// A string value as JSON (`"v 2"`, `"a\nb"`), cut when long; line separators JSON leaves alone are
/// escaped too.
pub fn quote(value: &str) -> String {
    let json = serde_json::to_string(&cut(value)).unwrap_or_else(|_| "\"?\"".to_string());
    one_line(&json, usize::MAX)
}

/// A value typed by a user where a number was expected: a number is shown as written, anything else quoted.
pub fn quote_value(text: &str) -> String {
    let is_number = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
        && text.bytes().any(|b| b.is_ascii_digit());
    if is_number {
        cut(text)
    } else {
        quote(text)
    }
}

/// `message` as one line: control characters and Unicode line breaks escaped, and cut in the middle
/// when longer than `max` characters (the start names the field, the end the position).
pub fn one_line(message: &str, max: usize) -> String {
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    let chars = out.chars().count();
    if chars <= max {
        return out;
    }
    let keep_end = max / 4;
    let keep_start = max.saturating_sub(keep_end + 1);
    let start: String = out.chars().take(keep_start).collect();
    let end: String = out.chars().skip(chars - keep_end).collect();
    format!("{start}…{end}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_quoted_and_cut() {
        assert_eq!(quote("v 2"), "\"v 2\"");
        assert_eq!(quote("a\nb\"c\u{1}"), "\"a\\nb\\\"c\\u0001\"");
        assert_eq!(quote("a\u{2028}b\u{85}"), "\"a\\u2028b\\u0085\"");
        let long = "x".repeat(1000);
        let shown = quote(&long);
        assert_eq!(shown, format!("\"{}…\"", "x".repeat(MAX_SHOWN)));
        assert_eq!(cut("é".repeat(70).as_str()).chars().count(), MAX_SHOWN + 1);
        assert_eq!(quote_value("12.500000001"), "12.500000001");
        assert_eq!(quote_value("twelve"), "\"twelve\"");
    }

    #[test]
    fn messages_become_one_bounded_line() {
        assert_eq!(
            one_line("a\nb\r\tc\u{2028}d\u{7f}", MAX_LINE),
            "a\\nb\\r\\tc\\u2028d\\u007f"
        );
        let long = format!("field: {} at line 1 column 9", "y".repeat(5000));
        let line = one_line(&long, MAX_LINE);
        assert_eq!(line.chars().count(), MAX_LINE);
        assert!(line.starts_with("field: yyy") && line.ends_with("at line 1 column 9"));
        assert!(line.contains('…'));
    }
}
