//! STUN on arbitrary bytes: `stun::is_stun` and `stun::parse` never panic;
//! whatever parses has a Binding class and, re-encoded as a request or a
//! response for the address it carries, parses back to the same values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wiremesh_core::stun;

fuzz_target!(|data: &[u8]| {
    let looks = stun::is_stun(data);
    let Ok(m) = stun::parse(data) else { return };
    assert!(looks, "parse accepted what is_stun refused");
    let mut buf = [0u8; stun::MAX_BINDING_RESPONSE_LEN];
    let n = stun::encode_binding_request(&m.transaction_id, &mut buf).expect("buffer is large enough");
    let r = stun::parse(&buf[..n]).expect("an encoded request parses");
    assert_eq!(
        (r.class, r.transaction_id, r.mapped, r.fingerprint),
        (stun::Class::Request, m.transaction_id, None, true)
    );
    if let Some(addr) = m.mapped {
        let n = stun::encode_binding_response(&m.transaction_id, addr, &mut buf).expect("buffer is large enough");
        let r = stun::parse(&buf[..n]).expect("an encoded response parses");
        assert_eq!((r.class, r.mapped), (stun::Class::Success, Some(addr)));
    }
});
