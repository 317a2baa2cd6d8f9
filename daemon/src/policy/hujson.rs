//! huJSON: JSON for people, as Tailscale policy files are written. Standard
//! JSON (RFC 8259) plus `//` line comments, `/* */` block comments and a
//! trailing comma after the last element of an array or object.
//!
//! Every value keeps the line and column where it starts, so that later
//! checks can say where a problem is. Objects keep their members in file
//! order; a key given twice in one object is an error.

use std::fmt;

/// Nesting beyond this is refused (a bound on recursion for hostile input).
pub const MAX_DEPTH: usize = 64;

/// A place in the text: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    /// The line, from 1.
    pub line: u32,
    /// The column, from 1.
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

/// A syntax error and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

impl std::error::Error for SyntaxError {}

/// A value with the position it starts at.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// Where it starts.
    pub pos: Pos,
    /// What it is.
    pub kind: Kind,
}

/// The JSON kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number (kept as written and as a float).
    Number(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object: members in file order, each key with its position.
    Object(Vec<(Key, Value)>),
}

/// An object key with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Where it starts.
    pub pos: Pos,
    /// The key.
    pub name: String,
}

impl Value {
    /// A short name of the kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Number(_) => "a number",
            Kind::String(_) => "a string",
            Kind::Array(_) => "an array",
            Kind::Object(_) => "an object",
        }
    }

    /// Converts to `serde_json` (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.kind {
            Kind::Null => serde_json::Value::Null,
            Kind::Bool(b) => serde_json::Value::Bool(*b),
            Kind::Number(n) => serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, |n| {
                // Integers stay integers.
                if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                    serde_json::Value::from(n.as_f64().unwrap_or_default() as i64)
                } else {
                    serde_json::Value::Number(n)
                }
            }),
            Kind::String(s) => serde_json::Value::String(s.clone()),
            Kind::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Kind::Object(o) => {
                serde_json::Value::Object(o.iter().map(|(k, v)| (k.name.clone(), v.to_json())).collect())
            }
        }
    }
}

/// Parses a whole huJSON document (one value, with comments and whitespace around it).
pub fn parse(text: &str) -> Result<Value, SyntaxError> {
    let mut p = Parser { chars: text.chars().collect(), at: 0, line: 1, col: 1 };
    p.skip_blank()?;
    let v = p.value(0)?;
    p.skip_blank()?;
    if p.at < p.chars.len() {
        return Err(p.error("unexpected text after the end of the document"));
    }
    Ok(v)
}

struct Parser {
    chars: Vec<char>,
    at: usize,
    line: u32,
    col: u32,
}

impl Parser {
    fn pos(&self) -> Pos {
        Pos { line: self.line, col: self.col }
    }

    fn error(&self, message: &str) -> SyntaxError {
        SyntaxError { pos: self.pos(), message: message.into() }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    /// Skips whitespace and comments.
    fn skip_blank(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\n' | '\r' | '\u{feff}') => {
                    self.bump();
                }
                Some('/') => {
                    let start = self.pos();
                    match self.chars.get(self.at + 1) {
                        Some('/') => {
                            while self.peek().is_some_and(|c| c != '\n') {
                                self.bump();
                            }
                        }
                        Some('*') => {
                            self.bump();
                            self.bump();
                            loop {
                                match self.bump() {
                                    None => {
                                        return Err(SyntaxError {
                                            pos: start,
                                            message: "comment not closed (missing */)".into(),
                                        })
                                    }
                                    Some('*') if self.peek() == Some('/') => {
                                        self.bump();
                                        break;
                                    }
                                    Some(_) => {}
                                }
                            }
                        }
                        _ => return Err(self.error("unexpected '/' (comments start with // or /*)")),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth >= MAX_DEPTH {
            return Err(self.error(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let pos = self.pos();
        let kind = match self.peek() {
            None => return Err(self.error("unexpected end of the document, a value was expected")),
            Some('{') => self.object(depth)?,
            Some('[') => self.array(depth)?,
            Some('"') => Kind::String(self.string()?),
            Some('t') => self.word("true", Kind::Bool(true))?,
            Some('f') => self.word("false", Kind::Bool(false))?,
            Some('n') => self.word("null", Kind::Null)?,
            Some(c) if c == '-' || c.is_ascii_digit() => self.number()?,
            Some(c) => return Err(self.error(&format!("unexpected character {c:?}, a value was expected"))),
        };
        Ok(Value { pos, kind })
    }

    fn word(&mut self, word: &str, kind: Kind) -> Result<Kind, SyntaxError> {
        let start = self.pos();
        for w in word.chars() {
            if self.peek() != Some(w) {
                return Err(SyntaxError { pos: start, message: format!("unknown word (expected {word})") });
            }
            self.bump();
        }
        if self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return Err(SyntaxError { pos: start, message: format!("unknown word (expected {word})") });
        }
        Ok(kind)
    }

    fn number(&mut self) -> Result<Kind, SyntaxError> {
        let start = self.pos();
        let from = self.at;
        if self.peek() == Some('-') {
            self.bump();
        }
        let digits = |p: &mut Parser| {
            let mut n = 0;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.bump();
                n += 1;
            }
            n
        };
        let int_start = self.at;
        if digits(self) == 0 {
            return Err(SyntaxError { pos: start, message: "a number needs digits".into() });
        }
        if self.chars[int_start] == '0' && self.at - int_start > 1 {
            return Err(SyntaxError { pos: start, message: "numbers may not start with 0".into() });
        }
        if self.peek() == Some('.') {
            self.bump();
            if digits(self) == 0 {
                return Err(self.error("digits expected after the decimal point"));
            }
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.bump();
            if matches!(self.peek(), Some('+' | '-')) {
                self.bump();
            }
            if digits(self) == 0 {
                return Err(self.error("digits expected in the exponent"));
            }
        }
        let text: String = self.chars[from..self.at].iter().collect();
        text.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Kind::Number)
            .ok_or(SyntaxError { pos: start, message: format!("number {text} out of range") })
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump(); // the opening quote
        let mut s = String::new();
        loop {
            let here = self.pos();
            match self.bump() {
                None => return Err(SyntaxError { pos: start, message: "string not closed (missing \")".into() }),
                Some('"') => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('"') => s.push('"'),
                    Some('\\') => s.push('\\'),
                    Some('/') => s.push('/'),
                    Some('b') => s.push('\u{8}'),
                    Some('f') => s.push('\u{c}'),
                    Some('n') => s.push('\n'),
                    Some('r') => s.push('\r'),
                    Some('t') => s.push('\t'),
                    Some('u') => {
                        let hi = self.hex4(here)?;
                        let c = if (0xd800..0xdc00).contains(&hi) {
                            if self.bump() != Some('\\') || self.bump() != Some('u') {
                                return Err(SyntaxError { pos: here, message: "unpaired surrogate escape".into() });
                            }
                            let lo = self.hex4(here)?;
                            if !(0xdc00..0xe000).contains(&lo) {
                                return Err(SyntaxError { pos: here, message: "unpaired surrogate escape".into() });
                            }
                            char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                        } else {
                            char::from_u32(hi)
                        };
                        s.push(c.ok_or(SyntaxError { pos: here, message: "invalid \\u escape".into() })?);
                    }
                    _ => return Err(SyntaxError { pos: here, message: "unknown escape in a string".into() }),
                },
                Some(c) if (c as u32) < 0x20 => {
                    return Err(SyntaxError { pos: here, message: "control character in a string".into() })
                }
                Some(c) => s.push(c),
            }
        }
    }

    fn hex4(&mut self, at: Pos) -> Result<u32, SyntaxError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = self.bump().and_then(|c| c.to_digit(16));
            v = v * 16 + d.ok_or(SyntaxError { pos: at, message: "\\u needs four hex digits".into() })?;
        }
        Ok(v)
    }

    fn array(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_blank()?;
            if self.peek() == Some(']') {
                self.bump();
                return Ok(Kind::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.error("expected ',' or ']' in an array")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.bump();
        let mut members: Vec<(Key, Value)> = Vec::new();
        loop {
            self.skip_blank()?;
            match self.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(Kind::Object(members));
                }
                Some('"') => {}
                _ => return Err(self.error("expected a quoted key or '}' in an object")),
            }
            let pos = self.pos();
            let name = self.string()?;
            if members.iter().any(|(k, _)| k.name == name) {
                return Err(SyntaxError { pos, message: format!("key {name:?} given twice in one object") });
            }
            self.skip_blank()?;
            if self.peek() != Some(':') {
                return Err(self.error("expected ':' after an object key"));
            }
            self.bump();
            self.skip_blank()?;
            let v = self.value(depth + 1)?;
            members.push((Key { pos, name }, v));
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => return Err(self.error("expected ',' or '}' in an object")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> SyntaxError {
        parse(text).expect_err(text)
    }

    #[test]
    fn comments_and_trailing_commas() {
        let v = parse(
            "// head\n{\n  /* block\n  comment */ \"a\": [1, 2.5, -3e2,], // tail\n  \"b\": {\"c\": null, \"d\": true,},\n}\n",
        )
        .unwrap();
        assert_eq!(v.to_json(), serde_json::json!({"a": [1, 2.5, -300], "b": {"c": null, "d": true}}));
        let Kind::Object(m) = &v.kind else { panic!() };
        // Line 4 is `  comment */ "a": [1, 2.5, -3e2,], // tail`.
        assert_eq!(m[0].0.pos, Pos { line: 4, col: 14 });
        assert_eq!(m[1].1.pos, Pos { line: 5, col: 8 });
        let Kind::Array(a) = &m[0].1.kind else { panic!() };
        assert_eq!(a[1].pos, Pos { line: 4, col: 23 });
    }

    #[test]
    fn strings_and_escapes() {
        let v = parse(r#"["a\"b\\c\/\n\t\u00e9\ud83d\ude00", "ünï"]"#).unwrap();
        assert_eq!(v.to_json(), serde_json::json!(["a\"b\\c/\n\té😀", "ünï"]));
    }

    #[test]
    fn every_error_names_its_place() {
        let cases: &[(&str, u32, u32, &str)] = &[
            ("", 1, 1, "unexpected end"),
            ("{\"a\": 1", 1, 8, "expected ',' or '}'"),
            ("{\n  \"a\" 1}", 2, 7, "expected ':'"),
            ("[1 2]", 1, 4, "expected ',' or ']'"),
            ("{a: 1}", 1, 2, "quoted key"),
            ("{\"a\": 1, \"a\": 2}", 1, 10, "given twice"),
            ("/* open", 1, 1, "comment not closed"),
            ("\"open", 1, 1, "string not closed"),
            ("[\"\\q\"]", 1, 3, "unknown escape"),
            ("[\"\\u12\"]", 1, 3, "four hex digits"),
            ("[\"\\ud800x\"]", 1, 3, "unpaired surrogate"),
            ("[tru]", 1, 2, "expected true"),
            ("[nulls]", 1, 2, "expected null"),
            ("[01]", 1, 2, "start with 0"),
            ("[1.]", 1, 4, "decimal point"),
            ("[1e]", 1, 4, "exponent"),
            ("[-]", 1, 2, "needs digits"),
            ("[1e999]", 1, 2, "out of range"),
            ("{} x", 1, 4, "after the end"),
            ("[/ x]", 1, 2, "unexpected '/'"),
            ("[@]", 1, 2, "unexpected character"),
            ("[\"a\nb\"]", 1, 4, "control character"),
        ];
        for (text, line, col, what) in cases {
            let e = err(text);
            assert_eq!((e.pos.line, e.pos.col), (*line, *col), "{text:?}: {e}");
            assert!(e.message.contains(what), "{text:?}: {e}");
        }
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(err(&deep).message.contains("nested deeper"));
    }
}
