//! A small JSON reader for the plugin configuration, driven by the schema in `config.rs`.
//!
//! Why not serde_json here: its generic deserializer plus the path tracking our error messages need were
//! over half of the `.wasm`, and every KB of it is loaded by every Envoy worker. This reader does only what
//! the configuration needs: objects, arrays, strings, numbers and `null`, read in the order the caller
//! asks for them. It never recurses on its own (the schema decides the depth), so hostile input cannot
//! exhaust the stack, and every error names its line and column.

use std::fmt::Write as _;

/// A cursor over one JSON document. Errors are one line, ending in " at line L column C".
pub struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    /// Where the last key read by `next_key` starts, for errors about that key.
    key_pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self {
            input,
            pos: 0,
            key_pos: 0,
        }
    }

    /// `message` with the position of the next unread byte (line and column count from 1).
    pub fn error(&self, message: &str) -> String {
        self.error_at(self.pos, message)
    }

    /// `message` with the position of the last key read, for "unknown field" and the like.
    pub fn key_error(&self, message: &str) -> String {
        self.error_at(self.key_pos, message)
    }

    fn error_at(&self, pos: usize, message: &str) -> String {
        let before = self.input.get(..pos).unwrap_or(self.input);
        let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        format!("{message} at line {line} column {}", pos - line_start + 1)
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.input.get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.input.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Consumes `null` if it comes next (an optional field written as `null` is absent).
    pub fn null(&mut self) -> bool {
        self.skip_whitespace();
        let found = self
            .input
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(b"null"));
        if found {
            self.pos += 4;
        }
        found
    }

    /// Consumes the `{` that opens an object; anything else is an "invalid type" naming `expected`.
    pub fn begin_object(&mut self, expected: &str) -> Result<(), String> {
        if self.eat(b'{') {
            Ok(())
        } else {
            Err(self.invalid_type(expected))
        }
    }

    /// The next key of the object being read, or `None` at its `}`. `first` is true before the first key.
    pub fn next_key(&mut self, first: &mut bool) -> Result<Option<String>, String> {
        let was_first = std::mem::replace(first, false);
        if self.eat(b'}') {
            return Ok(None);
        }
        if !was_first && !self.eat(b',') {
            return Err(self.unexpected("expected `,` or `}`"));
        }
        if self.peek() != Some(b'"') {
            return Err(self.unexpected("expected a key in double quotes"));
        }
        self.key_pos = self.pos;
        self.pos += 1;
        let key = self.string_body()?;
        if !self.eat(b':') {
            return Err(self.unexpected("expected `:`"));
        }
        Ok(Some(key))
    }

    /// Consumes the `[` that opens an array; anything else is an "invalid type" naming `expected`.
    pub fn begin_array(&mut self, expected: &str) -> Result<(), String> {
        if self.eat(b'[') {
            Ok(())
        } else {
            Err(self.invalid_type(expected))
        }
    }

    /// True if another element follows, false at the array's `]`. `first` is true before the first one.
    pub fn next_element(&mut self, first: &mut bool) -> Result<bool, String> {
        let was_first = std::mem::replace(first, false);
        if self.eat(b']') {
            return Ok(false);
        }
        if !was_first && !self.eat(b',') {
            return Err(self.unexpected("expected `,` or `]`"));
        }
        match self.peek() {
            Some(b']') => Err(self.error("trailing comma")),
            None => Err(self.error("EOF while parsing a list")),
            Some(_) => Ok(true),
        }
    }

    /// A string value.
    pub fn string(&mut self, expected: &str) -> Result<String, String> {
        if self.eat(b'"') {
            self.string_body()
        } else {
            Err(self.invalid_type(expected))
        }
    }

    /// The rest of a string whose opening quote was consumed: escapes decoded, UTF-8 checked.
    fn string_body(&mut self) -> Result<String, String> {
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&b) = self.input.get(self.pos) else {
                return Err(self.error("EOF while parsing a string"));
            };
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => self.escape(&mut out)?,
                0..=0x1f => {
                    self.pos -= 1;
                    return Err(self.error(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ));
                }
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("invalid UTF-8 in string"))
    }

    /// One escape after a backslash, appended to `out` as UTF-8.
    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(&b) = self.input.get(self.pos) else {
            return Err(self.error("EOF while parsing a string"));
        };
        self.pos += 1;
        let simple = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut code = self.hex4()?;
                if (0xd800..0xdc00).contains(&code) {
                    // A UTF-16 high surrogate must be followed by an escaped low one.
                    let low = if self.input.get(self.pos..self.pos + 2) == Some(b"\\u") {
                        self.pos += 2;
                        self.hex4()?
                    } else {
                        0
                    };
                    if !(0xdc00..0xe000).contains(&low) {
                        return Err(self.error("lone leading surrogate in hex escape"));
                    }
                    code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
                }
                let Some(c) = char::from_u32(code) else {
                    return Err(self.error("lone trailing surrogate in hex escape"));
                };
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                return Ok(());
            }
            _ => {
                self.pos -= 1;
                return Err(self.error("invalid escape"));
            }
        };
        out.push(simple);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut code = 0;
        for _ in 0..4 {
            let digit = self
                .input
                .get(self.pos)
                .and_then(|&b| char::from(b).to_digit(16));
            let Some(digit) = digit else {
                return Err(self.error("invalid hex escape"));
            };
            code = code * 16 + digit;
            self.pos += 1;
        }
        Ok(code)
    }

    /// A number value, as its JSON text (checked against JSON's number grammar).
    pub fn number(&mut self, expected: &str) -> Result<&'a str, String> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number_text(),
            _ => Err(self.invalid_type(expected)),
        }
    }

    fn number_text(&mut self) -> Result<&'a str, String> {
        let start = self.pos;
        let digits = |r: &mut Self| {
            let from = r.pos;
            while r.input.get(r.pos).is_some_and(u8::is_ascii_digit) {
                r.pos += 1;
            }
            r.pos - from
        };
        if self.input.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let mut ok = digits(self) > 0
            && (self.input.get(int_start) != Some(&b'0') || self.pos == int_start + 1);
        if ok && self.input.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            ok = digits(self) > 0;
        }
        if ok && matches!(self.input.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.input.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            ok = digits(self) > 0;
        }
        let text = self.input.get(start..self.pos).unwrap_or(&[]);
        match std::str::from_utf8(text) {
            Ok(text) if ok => Ok(text),
            _ => Err(self.error("invalid number")),
        }
    }

    /// "invalid type: <what comes next>, expected <expected>", or the syntax error found on the way.
    fn invalid_type(&mut self, expected: &str) -> String {
        self.skip_whitespace();
        let start = self.pos;
        let what = match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                match self.string_body() {
                    Ok(s) => format!("string {}", quote(&s)),
                    Err(err) => return err,
                }
            }
            Some(b'-' | b'0'..=b'9') => match self.number_text() {
                Ok(n) => format!("number {n}"),
                Err(err) => return err,
            },
            Some(b'{') => "object".to_string(),
            Some(b'[') => "array".to_string(),
            Some(b't' | b'f') => "boolean".to_string(),
            _ if self.null() => "null".to_string(),
            None => return self.error("EOF while parsing a value"),
            Some(_) => return self.error("expected value"),
        };
        self.error_at(start, &format!("invalid type: {what}, expected {expected}"))
    }

    /// A syntax error at the next byte, or "EOF while parsing" at the end.
    fn unexpected(&mut self, message: &str) -> String {
        if self.peek().is_none() {
            self.error("EOF while parsing an object")
        } else {
            self.error(message)
        }
    }

    /// Succeeds only if nothing but whitespace is left.
    pub fn end(&mut self) -> Result<(), String> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("trailing characters")),
        }
    }
}

/// The exact value of a JSON number's text as f64, or `None` when f64 cannot hold it exactly this way.
///
/// Exact means: at most 15 significant digits once trailing zeros are dropped (so the integer part
/// fits in f64's 53 bits), and a power of ten up to 10^22 (all exact in f64). One multiplication or
/// division then rounds once, as correct parsing would. That covers every percentage the contract allows
/// (at most 100, two decimals) and every value written back from one. Anything else is refused rather than
/// approximated. An approximation could differ from its own written-back form and change in a round trip.
/// A general correctly rounded parser (`f64::from_str`) would add 17 KB to the `.wasm`.
pub fn number_value(text: &str) -> Option<f64> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa_text, exponent_text) = match rest.find(['e', 'E']) {
        Some(i) => (rest.get(..i)?, rest.get(i + 1..)?),
        None => (rest, "0"),
    };
    let mut exponent: i64 = exponent_text.trim_start_matches('+').parse().ok()?;
    let (int_part, frac_part) = mantissa_text.split_once('.').unwrap_or((mantissa_text, ""));
    exponent = exponent.checked_sub(i64::try_from(frac_part.len()).ok()?)?;
    let digits = int_part.bytes().chain(frac_part.bytes());
    let significant = digits.skip_while(|&b| b == b'0').collect::<Vec<u8>>();
    let kept = significant
        .iter()
        .rposition(|&b| b != b'0')
        .map_or(0, |i| i + 1);
    exponent = exponent.checked_add(i64::try_from(significant.len() - kept).ok()?)?;
    let significant = significant.get(..kept)?;
    let sign = if negative { -1.0 } else { 1.0 };
    if significant.is_empty() {
        return Some(sign * 0.0);
    }
    if significant.len() > 15 || exponent.unsigned_abs() > 22 {
        return None;
    }
    let mantissa = significant
        .iter()
        .fold(0u64, |m, &b| m * 10 + u64::from(b - b'0'));
    // Powers of ten up to 10^22 are exact in f64.
    let power = (0..exponent.unsigned_abs()).fold(1.0_f64, |p, _| p * 10.0);
    let magnitude = if exponent >= 0 {
        mantissa as f64 * power
    } else {
        mantissa as f64 / power
    };
    Some(sign * magnitude)
}

/// `value` as a JSON string literal: quoted, with `"`, `\` and control characters escaped.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_decode_every_escape_and_check_utf8() {
        let mut r = Reader::new(br#""a\"b\\c\/d\b\f\n\r\t\u00e9\ud83d\ude00 x""#);
        assert_eq!(
            r.string("a string").unwrap(),
            "a\"b\\c/d\u{8}\u{c}\n\r\t\u{e9}\u{1f600} x"
        );
        for (bad, message) in [
            (&b"\"a"[..], "EOF while parsing a string at line 1 column 3"),
            (b"\"\\q\"", "invalid escape at line 1 column 3"),
            (b"\"\\u12\"", "invalid hex escape at line 1 column 6"),
            (b"\"\\ud800\"", "lone leading surrogate in hex escape at line 1 column 8"),
            (b"\"\\udc00\"", "lone trailing surrogate in hex escape at line 1 column 8"),
            (b"\"\xff\"", "invalid UTF-8 in string at line 1 column 4"),
            (b"\"a\nb\"", "control character (\\u0000-\\u001F) found while parsing a string at line 1 column 3"),
        ] {
            assert_eq!(Reader::new(bad).string("a string").unwrap_err(), message);
        }
    }

    #[test]
    fn numbers_follow_the_json_grammar() {
        for good in ["0", "-0", "12.5", "1e2", "1E+2", "2.5e-3", "100"] {
            let mut r = Reader::new(good.as_bytes());
            assert_eq!(r.number("a number").unwrap(), good);
            r.end().unwrap();
        }
        for bad in ["01", "1.", ".5", "-", "1e", "+1"] {
            let mut r = Reader::new(bad.as_bytes());
            let result = r.number("a number").and_then(|_| r.end());
            assert!(result.is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn number_values_are_exact_or_refused() {
        for (text, value) in [
            ("12.5", 12.5_f64),
            ("0.01", 0.01),
            ("99.99", 99.99),
            ("33.33", 33.33),
            ("57.01", 57.01),
            ("100", 100.0),
            ("-1", -1.0),
            ("1e2", 100.0),
            ("1E+2", 100.0),
            ("1250e-2", 12.5),
            ("0.29", 0.29),
            ("12.500000000000000000000", 12.5),
            ("0.000000000000000000001", 1e-21),
            ("0", 0.0),
            ("0.000e5", 0.0),
            ("123456789012345e-22", 1.23456789012345e-8),
        ] {
            assert_eq!(
                number_value(text).map(f64::to_bits),
                Some(value.to_bits()),
                "{text}"
            );
        }
        assert_eq!(
            number_value("-0").map(f64::to_bits),
            Some((-0.0_f64).to_bits())
        );
        for inexact in [
            "12.500000000000000000001",
            "1e999",
            "1e23",
            "1.2499999999999997e41",
            "1234567890123456",
            "1e99999999999999999999",
        ] {
            assert_eq!(number_value(inexact), None, "{inexact}");
        }
    }

    #[test]
    fn objects_and_arrays_reject_missing_and_trailing_commas() {
        let keys = |json: &str| -> Result<Vec<String>, String> {
            let mut r = Reader::new(json.as_bytes());
            r.begin_object("an object")?;
            let (mut first, mut keys) = (true, Vec::new());
            while let Some(k) = r.next_key(&mut first)? {
                keys.push(k);
                r.number("a number")?;
            }
            r.end()?;
            Ok(keys)
        };
        assert_eq!(keys(r#" { "a" : 1 , "b":2 } "#).unwrap(), ["a", "b"]);
        assert_eq!(keys("{}").unwrap(), Vec::<String>::new());
        assert_eq!(
            keys(r#"{"a":1,}"#).unwrap_err(),
            "expected a key in double quotes at line 1 column 8"
        );
        assert_eq!(
            keys(r#"{"a":1 "b":2}"#).unwrap_err(),
            "expected `,` or `}` at line 1 column 8"
        );
        assert_eq!(
            keys(r#"{a:1}"#).unwrap_err(),
            "expected a key in double quotes at line 1 column 2"
        );
        assert_eq!(
            keys(r#"{"a" 1}"#).unwrap_err(),
            "expected `:` at line 1 column 6"
        );
        assert_eq!(
            keys(r#"{"a":1"#).unwrap_err(),
            "EOF while parsing an object at line 1 column 7"
        );
        assert_eq!(
            keys("{}x").unwrap_err(),
            "trailing characters at line 1 column 3"
        );
        assert_eq!(
            keys("[]").unwrap_err(),
            "invalid type: array, expected an object at line 1 column 1"
        );

        let count = |json: &str| -> Result<usize, String> {
            let mut r = Reader::new(json.as_bytes());
            r.begin_array("an array")?;
            let (mut first, mut n) = (true, 0);
            while r.next_element(&mut first)? {
                r.number("a number")?;
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(count("[1, 2,3]").unwrap(), 3);
        assert_eq!(count("[ ]").unwrap(), 0);
        assert_eq!(
            count("[1,]").unwrap_err(),
            "trailing comma at line 1 column 4"
        );
        assert_eq!(
            count("[1 2]").unwrap_err(),
            "expected `,` or `]` at line 1 column 4"
        );
        assert_eq!(
            count("[1,\n\"x\"]").unwrap_err(),
            "invalid type: string \"x\", expected a number at line 2 column 1"
        );
    }

    #[test]
    fn invalid_types_name_what_was_found() {
        for (json, found) in [
            ("true", "boolean"),
            ("null", "null"),
            ("{}", "object"),
            (r#""a\"b""#, "string \"a\\\"b\""),
        ] {
            assert_eq!(
                Reader::new(json.as_bytes()).number("a number").unwrap_err(),
                format!("invalid type: {found}, expected a number at line 1 column 1")
            );
        }
        assert_eq!(
            Reader::new(b" -2.5").string("a string").unwrap_err(),
            "invalid type: number -2.5, expected a string at line 1 column 2"
        );
        assert_eq!(
            Reader::new(b"  ").string("a string").unwrap_err(),
            "EOF while parsing a value at line 1 column 3"
        );
        assert_eq!(
            Reader::new(b"?").string("a string").unwrap_err(),
            "expected value at line 1 column 1"
        );
    }

    #[test]
    fn quote_escapes_like_json() {
        assert_eq!(quote("a\"b\\c\n\u{1}é"), r#""a\"b\\c\n\u0001é""#);
        assert_eq!(quote(""), r#""""#);
    }
}
