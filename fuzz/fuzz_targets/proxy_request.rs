//! What a sandbox sends the egress proxy is untrusted: the request-head parser, the TLS
//! ClientHello (SNI) parser and host normalisation must never panic, and what they accept must be
//! consistent (lengths inside the input, hosts that normalise to the same thing twice).
#![no_main]
use delegate_agent::egress::{matcher, request, rules, sni};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = request::parse_head(data) {
        assert!(head.head_len <= data.len() && head.head_len <= request::MAX_HEAD);
        assert!(head.port != 0);
        if let Ok(host) = matcher::normalize_host(&head.host) {
            let again = matcher::normalize_host(&host.to_string())
                .expect("a normalised host re-normalises");
            assert_eq!(again, host);
        }
        if let request::Kind::Forward(fwd) = &head.kind {
            let up = fwd.upstream_head("a.example");
            assert!(up.ends_with(b"\r\n\r\n"));
        }
    }
    match sni::parse_client_hello(data) {
        Ok(Some(hello)) => {
            assert!(hello.len <= data.len() && hello.len <= sni::MAX_CLIENT_HELLO);
            if let Some(name) = hello.server_name {
                let _ = matcher::normalize_host(&name);
            }
        }
        Ok(None) => assert!(data.len() < sni::MAX_CLIENT_HELLO + 5),
        Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(rule) = rules::Rule::parse(text) {
            let again =
                rules::Rule::parse(&rule.to_string()).expect("a rule's canonical text parses");
            assert_eq!(again, rule);
        }
    }
});
