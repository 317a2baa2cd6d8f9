//! `application/x-www-form-urlencoded` (the query strings and bodies of
//! OAuth requests) and HTTP Basic credentials, parsed strictly: a repeated
//! parameter is refused (RFC 6749 section 3.1), a malformed escape or
//! non-UTF-8 text is refused, and an empty value counts as absent.

use std::collections::BTreeMap;

/// The most bytes a query or form body may have.
pub const MAX_FORM: usize = 16 * 1024;
/// The most parameters a form may have.
pub const MAX_PARAMS: usize = 64;

/// Why a form did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormError {
    /// Longer than [`MAX_FORM`] or more than [`MAX_PARAMS`] parameters.
    TooLarge,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// Decoded text that is not UTF-8.
    NotUtf8,
    /// A parameter given more than once.
    Repeated(String),
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormError::TooLarge => {
                write!(f, "the parameters are too large (at most {MAX_FORM} bytes, {MAX_PARAMS} parameters)")
            }
            FormError::BadEscape => f.write_str("malformed percent-escape in the parameters"),
            FormError::NotUtf8 => f.write_str("the parameters are not UTF-8"),
            FormError::Repeated(name) => write!(f, "parameter {name:?} is given more than once"),
        }
    }
}

/// Parsed parameters, by name. Values are wiped when the form is dropped
/// (they carry client secrets, codes, verifiers and tokens).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form(BTreeMap<String, String>);

impl Drop for Form {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

impl Form {
    /// Parses `a=1&b=2` (`+` is a space); empty values are dropped.
    pub fn parse(input: &[u8]) -> Result<Form, FormError> {
        if input.len() > MAX_FORM {
            return Err(FormError::TooLarge);
        }
        let mut map = BTreeMap::new();
        for pair in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            let name = decode(name)?;
            let value = decode(value)?;
            if map.contains_key(&name) {
                return Err(FormError::Repeated(name));
            }
            if map.len() == MAX_PARAMS {
                return Err(FormError::TooLarge);
            }
            map.insert(name, value);
        }
        map.retain(|_, v: &mut String| !v.is_empty());
        Ok(Form(map))
    }

    /// A parameter's value, `None` when absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Every parameter, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes one name or value (`+` is a space).
pub(crate) fn decode(s: &[u8]) -> Result<String, FormError> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hi = s.get(i + 1).copied().and_then(hex_value).ok_or(FormError::BadEscape)?;
                let lo = s.get(i + 2).copied().and_then(hex_value).ok_or(FormError::BadEscape)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

/// Percent-encodes a value for a query string or form body: everything but
/// RFC 3986's unreserved characters is escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `a=1&b=2` from pairs, values escaped.
pub fn encode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&escape(k));
        out.push('=');
        out.push_str(&escape(v));
    }
    out
}

/// The client id and secret of an `Authorization: Basic` header value; both
/// are form-encoded inside the base64 (RFC 6749 section 2.3.1). `None` when
/// the header is not Basic or does not decode.
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, b64) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let b64 = b64.trim();
    if b64.len() > MAX_FORM {
        return None;
    }
    // Standard base64 with padding, decoded through the URL alphabet.
    let url: String = b64
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            '-' | '_' => '!',
            c => c,
        })
        .collect();
    let raw = zeroize::Zeroizing::new(super::super::unb64url(&url)?);
    let text = std::str::from_utf8(&raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((decode(id.as_bytes()).ok()?, decode(secret.as_bytes()).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms_parse_strictly() {
        let f = Form::parse(b"a=1&b=x+y%2Bz&c=&d&e=%C3%A9").unwrap();
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.get("b"), Some("x y+z"));
        assert_eq!((f.get("c"), f.get("d")), (None, None));
        assert_eq!(f.get("e"), Some("é"));
        assert_eq!(Form::parse(b"a=1&a=2"), Err(FormError::Repeated("a".into())));
        assert_eq!(Form::parse(b"a=%zz"), Err(FormError::BadEscape));
        assert_eq!(Form::parse(b"a=%4"), Err(FormError::BadEscape));
        assert_eq!(Form::parse(b"a=%ff"), Err(FormError::NotUtf8));
        assert_eq!(Form::parse(&vec![b'a'; MAX_FORM + 1]), Err(FormError::TooLarge));
        let many: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert_eq!(Form::parse(many.join("&").as_bytes()), Err(FormError::TooLarge));
    }

    #[test]
    fn basic_credentials_decode_form_encoded_parts() {
        // "my%20client:s%3Acret" in base64.
        let h = "Basic bXklMjBjbGllbnQ6cyUzQWNyZXQ=";
        assert_eq!(basic_credentials(h), Some(("my client".into(), "s:cret".into())));
        assert_eq!(basic_credentials("Bearer abc"), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
        // No colon.
        assert_eq!(basic_credentials("Basic YWJj"), None);
        // URL-alphabet characters are not standard base64.
        assert_eq!(basic_credentials("Basic YW-j"), None);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(input in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Form::parse(&input);
            if let Ok(s) = std::str::from_utf8(&input) {
                let _ = basic_credentials(s);
            }
        }

        #[test]
        fn encoding_round_trips(pairs in proptest::collection::btree_map("[a-z_]{1,12}", "\\PC{1,40}", 0..12)) {
            let text = encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let parsed = Form::parse(text.as_bytes()).unwrap();
            let back: Vec<(&str, &str)> = parsed.iter().collect();
            let want: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            prop_assert_eq!(back, want);
        }
    }
}
