//! A strict, bounded parser for the TLS ClientHello a client sends first inside a CONNECT tunnel:
//! it reads the server name (SNI) without decrypting anything, so the proxy can refuse a tunnel
//! whose TLS session names another host than the one the policy allowed (domain fronting).
//!
//! It reads TLS records (handshake type only, versions 3.0 to 1.3 on the wire), reassembles a
//! ClientHello fragmented over several records, and walks the ClientHello fields with explicit
//! length checks. Anything outside the grammar is an error, never a panic; input beyond
//! [`MAX_CLIENT_HELLO`] bytes is refused. An Encrypted Client Hello shows only its outer (public)
//! name here, and that is the name checked.
//!
//! This module is pure: it parses a byte slice and does no I/O.

use thiserror::Error;

/// Most bytes of TLS records read while looking for a complete ClientHello.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

const RECORD_HEADER: usize = 5;
const MAX_RECORD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// Why the first bytes of a tunnel are not a usable ClientHello. Not retryable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SniError {
    #[error("the tunnel did not start with a TLS handshake")]
    NotTls,
    #[error("the first TLS handshake message is not a ClientHello")]
    NotClientHello,
    #[error("the TLS ClientHello is too large")]
    TooLarge,
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
}

/// What the proxy needs from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension, as sent (not normalised); `None` if absent.
    pub server_name: Option<String>,
    /// Bytes of `buf` taken by the records that carried the ClientHello.
    pub len: usize,
}

/// Parse the ClientHello at the start of `buf`. `Ok(None)`: the bytes so far are a valid prefix and
/// more are needed.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHello>, SniError> {
    let mut pos = 0;
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            check_prefix(&buf[pos..], pos == 0)?;
            return Ok(None);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(if pos == 0 {
                SniError::NotTls
            } else {
                SniError::Malformed("record type changed")
            });
        }
        if header[1] != 3 || header[2] > 4 {
            return Err(if pos == 0 {
                SniError::NotTls
            } else {
                SniError::Malformed("record version")
            });
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(SniError::Malformed("record length"));
        }
        if pos + RECORD_HEADER + len > MAX_CLIENT_HELLO {
            return Err(SniError::TooLarge);
        }
        let Some(fragment) = buf.get(pos + RECORD_HEADER..pos + RECORD_HEADER + len) else {
            if handshake.is_empty() {
                // Check the handshake type as soon as it is there, not when the record is complete.
                if let Some(&t) = buf.get(pos + RECORD_HEADER) {
                    if t != HANDSHAKE_CLIENT_HELLO {
                        return Err(SniError::NotClientHello);
                    }
                }
            }
            return Ok(None);
        };
        handshake.extend_from_slice(fragment);
        pos += RECORD_HEADER + len;
        if handshake[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(SniError::NotClientHello);
        }
        if handshake.len() < 4 {
            continue;
        }
        let body_len = (usize::from(handshake[1]) << 16)
            | (usize::from(handshake[2]) << 8)
            | usize::from(handshake[3]);
        if body_len + 4 > MAX_CLIENT_HELLO {
            return Err(SniError::TooLarge);
        }
        match handshake.len().cmp(&(body_len + 4)) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Greater => {
                return Err(SniError::Malformed(
                    "data after the ClientHello in its records",
                ))
            }
            std::cmp::Ordering::Equal => {
                let server_name = parse_body(&handshake[4..])?;
                return Ok(Some(ClientHello {
                    server_name,
                    len: pos,
                }));
            }
        }
    }
}

/// Refuse early what can already be seen not to be TLS (so a plain-text client is answered at once).
fn check_prefix(partial: &[u8], first: bool) -> Result<(), SniError> {
    let bad = match partial {
        [] => false,
        [t, ..] if *t != CONTENT_HANDSHAKE => true,
        [_, major, ..] if *major != 3 => true,
        [_, _, minor, ..] if *minor > 4 => true,
        _ => false,
    };
    match (bad, first) {
        (false, _) => Ok(()),
        (true, true) => Err(SniError::NotTls),
        (true, false) => Err(SniError::Malformed("record header")),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.buf.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn parse_body(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader { buf: body };
    let version = r.take(2, "legacy_version")?;
    if version[0] != 3 {
        return Err(SniError::Malformed("legacy_version"));
    }
    r.take(32, "random")?;
    if r.vec8("session_id")?.len() > 32 {
        return Err(SniError::Malformed("session_id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites"));
    }
    if r.vec8("compression_methods")?.is_empty() {
        return Err(SniError::Malformed("compression_methods"));
    }
    if r.is_empty() {
        return Ok(None);
    }
    let mut exts = Reader {
        buf: r.vec16("extensions")?,
    };
    if !r.is_empty() {
        return Err(SniError::Malformed("data after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut server_name = None;
    while !exts.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if seen.contains(&ty) {
            return Err(SniError::Malformed("duplicate extension"));
        }
        seen.push(ty);
        if ty == EXT_SERVER_NAME {
            server_name = parse_server_name(data)?;
        }
    }
    Ok(server_name)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec16("server_name_list")?,
    };
    if !outer.is_empty() || list.is_empty() {
        return Err(SniError::Malformed("server_name_list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let ty = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if ty != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err(SniError::Malformed("two host names"));
        }
        if name.is_empty() || name.len() > 255 || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(SniError::Malformed("host name"));
        }
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::pki_types::ServerName;
    use std::sync::Arc;

    /// The bytes a real rustls client sends first.
    fn client_hello(name: &str, sni: bool) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.enable_sni = sni;
        let server = ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// The same handshake bytes, cut into records of at most `size` bytes.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let body = &hello[5..];
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn reads_the_server_name_rustls_sends() {
        let hello = client_hello("registry.opentofu.org", true);
        let parsed = parse_client_hello(&hello).unwrap().unwrap();
        assert_eq!(parsed.server_name.as_deref(), Some("registry.opentofu.org"));
        assert_eq!(parsed.len, hello.len());
    }

    #[test]
    fn no_server_name_when_sni_is_off_or_the_name_is_an_address() {
        for (name, sni) in [("example.com", false), ("10.1.2.3", true)] {
            let hello = client_hello(name, sni);
            assert_eq!(
                parse_client_hello(&hello).unwrap().unwrap().server_name,
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn needs_more_bytes_until_the_hello_is_complete() {
        let hello = client_hello("a.example", true);
        for cut in 0..hello.len() {
            assert_eq!(parse_client_hello(&hello[..cut]), Ok(None), "cut at {cut}");
        }
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03application data follows");
        let parsed = parse_client_hello(&more).unwrap().unwrap();
        assert_eq!(
            parsed.len,
            hello.len(),
            "bytes after the hello are not consumed"
        );
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let hello = client_hello("split.example", true);
        for size in [1, 3, 7, 100] {
            let split = refragment(&hello, size);
            let parsed = parse_client_hello(&split).unwrap().unwrap();
            assert_eq!(
                parsed.server_name.as_deref(),
                Some("split.example"),
                "size {size}"
            );
            assert_eq!(parsed.len, split.len());
        }
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls)
        );
        assert_eq!(parse_client_hello(b"G"), Err(SniError::NotTls));
        assert_eq!(
            parse_client_hello(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Err(SniError::NotTls)
        );
        assert_eq!(parse_client_hello(&[22, 2]), Err(SniError::NotTls));
        assert_eq!(parse_client_hello(&[22, 3, 9]), Err(SniError::NotTls));
        // A ServerHello (type 2) where a ClientHello belongs.
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello)
        );
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 40, 2]),
            Err(SniError::NotClientHello)
        );
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 0]),
            Err(SniError::Malformed("record length"))
        );
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0x40, 1]),
            Err(SniError::Malformed("record length"))
        );
        // A handshake length beyond the bound.
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 4, 1, 0x10, 0, 0]),
            Err(SniError::TooLarge)
        );
    }

    #[test]
    fn refuses_a_hello_longer_than_the_bound_over_many_records() {
        let mut buf = Vec::new();
        // A ClientHello header announcing 60000 bytes, then 1-byte records forever.
        buf.extend_from_slice(&[22, 3, 1, 0, 4, 1, 0, 0xea, 0x60]);
        while buf.len() <= MAX_CLIENT_HELLO + 10 {
            buf.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
        }
        assert_eq!(parse_client_hello(&buf), Err(SniError::TooLarge));
    }

    /// Hand-built hello with the given extensions block (None: no extensions at all).
    fn synthetic(exts: Option<Vec<u8>>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        if let Some(e) = exts {
            body.extend_from_slice(&(e.len() as u16).to_be_bytes());
            body.extend_from_slice(&e);
        }
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (ty, name) in entries {
            list.push(*ty);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn walks_hand_built_hellos() {
        let ok = |exts| parse_client_hello(&synthetic(exts)).map(|h| h.and_then(|h| h.server_name));
        assert_eq!(ok(None), Ok(None));
        assert_eq!(ok(Some(vec![])), Ok(None));
        assert_eq!(
            ok(Some(sni_ext(&[(0, b"a.example")]))),
            Ok(Some("a.example".into()))
        );
        assert_eq!(
            ok(Some(sni_ext(&[(7, b"x"), (0, b"a.example")]))),
            Ok(Some("a.example".into()))
        );
        assert!(ok(Some(sni_ext(&[(0, b"a.example"), (0, b"b.example")]))).is_err());
        assert!(ok(Some(sni_ext(&[(0, b"")]))).is_err());
        assert!(ok(Some(sni_ext(&[(0, b"a\0b")]))).is_err());
        assert!(ok(Some(sni_ext(&[]))).is_err());
        let mut twice = sni_ext(&[(0, b"a.example")]);
        twice.extend(sni_ext(&[(0, b"a.example")]));
        assert_eq!(
            ok(Some(twice)),
            Err(SniError::Malformed("duplicate extension"))
        );
        // An extension whose length runs past the block.
        assert!(ok(Some(vec![0, 0, 0, 9, 0])).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_client_hello(&data);
        }

        #[test]
        fn never_panics_on_a_mutated_hello(pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut hello = client_hello("mutated.example", true);
            let i = pos.index(hello.len());
            hello[i] = byte;
            let end = cut.index(hello.len() + 1);
            let _ = parse_client_hello(&hello[..end]);
        }
    }
}
