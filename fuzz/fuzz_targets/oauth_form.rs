//! The OAuth form parser of the identity provider
//! (`daemon/src/identity/provider/form.rs`, included as it is, with the
//! base64url decoder it uses) on arbitrary bytes: query strings and bodies
//! of `/oidc/*` requests and `Authorization: Basic` values arrive from the
//! network.
//!
//! Nothing may panic; a form that parses is re-encoded and parses to the
//! same parameters; a percent-decoded value re-escapes to something that
//! decodes to it again.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The same module path as in the daemon, so the parser's `super::super::unb64url` resolves.
#[allow(dead_code)]
#[path = "../../daemon/src/identity"]
mod identity {
    #[path = "b64.rs"]
    mod b64;
    pub use b64::unb64url;
    #[path = "provider"]
    pub mod provider {
        #[path = "form.rs"]
        pub mod form;
    }
}

use identity::provider::form::{basic_credentials, decode, encode, escape, Form};

fuzz_target!(|data: &[u8]| {
    if let Ok(form) = Form::parse(data) {
        let again = encode(form.iter());
        let reparsed = Form::parse(again.as_bytes()).expect("an encoded form parses");
        assert_eq!(reparsed, form, "round trip of {again:?}");
    }
    if let Ok(text) = decode(data) {
        assert_eq!(decode(escape(&text).as_bytes()).as_deref(), Ok(text.as_str()));
    }
    if let Ok(header) = std::str::from_utf8(data) {
        let _ = basic_credentials(header);
    }
});
