//! The proxy's request-head parser: a strict, size-limited reading of what a sandbox sends to the
//! egress proxy, with `httparse` underneath.
//!
//! Accepted: `CONNECT host:port` (authority form, port required) and absolute-form plain HTTP
//! (`GET http://host[:port]/path`), HTTP/1.0 or 1.1, at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] headers, credentials in one `Proxy-Authorization: Basic` header. Refused, each
//! with a status and a short reason: anything `httparse` refuses, origin-form requests (the proxy is
//! not a web server), `https://` absolute URIs (use CONNECT), user info in a URI, fragments,
//! request bodies framed by `Transfer-Encoding` (only `Content-Length` bodies are relayed, so that
//! exactly one request reaches the upstream per connection), conflicting `Content-Length`s.
//!
//! For plain HTTP it also renders the head to send upstream ([`Forward::upstream_head`]): origin-form
//! target, hop-by-hop and proxy headers removed, `Host` set from the checked URI (never the client's
//! own `Host` header), `Connection: close`.
//!
//! This module is pure: it parses bytes and does no I/O. Passwords never appear in `Debug` output or
//! errors.

use base64::Engine;
use std::fmt;
use thiserror::Error;

/// Largest request head accepted, request line included.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;
/// Longest decoded `user:password` accepted.
const MAX_CREDENTIALS: usize = 512;

/// Why a request head is refused. Not retryable: the client sent something the proxy will not take.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("bad request target: {0}")]
    BadTarget(&'static str),
    #[error("bad Proxy-Authorization header: {0}")]
    BadCredentials(&'static str),
    #[error("method {0} is not supported by the egress proxy")]
    Method(String),
    #[error("request bodies with Transfer-Encoding are not supported for plain HTTP (use HTTPS)")]
    TransferEncoding,
    #[error("bad Content-Length")]
    ContentLength,
}

impl RequestError {
    /// The HTTP status the proxy answers with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::TooLarge | RequestError::TooManyHeaders => 431,
            RequestError::Method(_) => 405,
            RequestError::TransferEncoding => 501,
            _ => 400,
        }
    }
}

/// Basic credentials from `Proxy-Authorization`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A plain-HTTP request to relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub method: String,
    /// Origin-form target (`/path?query`).
    pub path: String,
    /// Headers to pass on (hop-by-hop, proxy and `Host` headers already removed), in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Length of the request body that follows the head.
    pub content_length: u64,
}

impl Forward {
    /// The head to send upstream; `host_header` is the checked authority (`host` or `host:port`).
    pub fn upstream_head(&self, host_header: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(
            format!(
                "{} {} HTTP/1.1\r\nHost: {host_header}\r\n",
                self.method, self.path
            )
            .as_bytes(),
        );
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out
    }
}

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Forward(Forward),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub kind: Kind,
    /// The host exactly as written by the client (brackets kept for IPv6), not yet normalised.
    pub host: String,
    pub port: u16,
    pub credentials: Option<Credentials>,
    /// Bytes of the buffer the head took; what follows is body or tunnel data.
    pub head_len: usize,
}

impl RequestHead {
    /// The destination as asked, `host:port`, whole (the head is at most [`MAX_HEAD`] bytes).
    /// Not cut here: the host is sandbox-chosen text, so it is redacted first and bounded after
    /// (`sandbox::egress_wiring`); cutting first could leave the start of a secret that crosses
    /// the cut unrecognised.
    pub fn destination(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Headers never passed upstream: hop-by-hop (RFC 9110 §7.6.1), the proxy's own, and `Host`
/// (replaced by the checked authority).
const DROPPED: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

/// Parse the head at the start of `buf`. `Ok(None)`: incomplete, read more (the caller stops at
/// [`MAX_HEAD`] bytes: a partial head that long is [`RequestError::TooLarge`]).
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    let head_len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD => return Err(RequestError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    if head_len > MAX_HEAD {
        return Err(RequestError::TooLarge);
    }
    let method = req
        .method
        .ok_or_else(|| RequestError::Malformed("no method".into()))?;
    let target = req
        .path
        .ok_or_else(|| RequestError::Malformed("no target".into()))?;
    let credentials = credentials(req.headers)?;
    let content_length = content_length(req.headers)?;
    let has_te = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));

    if method == "CONNECT" {
        if content_length.unwrap_or(0) != 0 || has_te {
            return Err(RequestError::BadTarget("CONNECT carries no body"));
        }
        let (host, port) = split_authority(target, None)?;
        return Ok(Some(RequestHead {
            kind: Kind::Connect,
            host,
            port,
            credentials,
            head_len,
        }));
    }
    if !METHODS.contains(&method) {
        return Err(RequestError::Method(method.to_string()));
    }
    if has_te {
        return Err(RequestError::TransferEncoding);
    }
    let Some(scheme_end) = target.find("://") else {
        return Err(RequestError::BadTarget(
            "the egress proxy takes absolute URIs (http://host/path) or CONNECT",
        ));
    };
    let scheme = &target[..scheme_end];
    if scheme.eq_ignore_ascii_case("https") {
        return Err(RequestError::BadTarget("use CONNECT for https"));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(RequestError::BadTarget("only http:// URIs are relayed"));
    }
    let rest = &target[scheme_end + 3..];
    if rest.contains('#') {
        return Err(RequestError::BadTarget("a fragment in the request target"));
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let (host, port) = split_authority(authority, Some(80))?;
    let path = match path.as_bytes().first() {
        None => "/".to_string(),
        Some(b'?') => format!("/{path}"),
        _ => path.to_string(),
    };
    let connection_tokens: Vec<String> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| {
            String::from_utf8_lossy(h.value)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let headers = req
        .headers
        .iter()
        .filter(|h| {
            let lower = h.name.to_ascii_lowercase();
            !DROPPED.contains(&lower.as_str()) && !connection_tokens.contains(&lower)
        })
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    Ok(Some(RequestHead {
        kind: Kind::Forward(Forward {
            method: method.to_string(),
            path,
            headers,
            content_length: content_length.unwrap_or(0),
        }),
        host,
        port,
        credentials,
        head_len,
    }))
}

/// `host:port`, `[v6]:port`; the port may be omitted only when a default is given.
fn split_authority(
    authority: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), RequestError> {
    if authority.is_empty() {
        return Err(RequestError::BadTarget("empty host"));
    }
    if authority.contains('@') {
        return Err(RequestError::BadTarget("user info in the request target"));
    }
    let (host, port) = if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or(RequestError::BadTarget("missing \"]\""))?;
        let (host, after) = authority.split_at(close + 1);
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(RequestError::BadTarget("junk after \"]\"")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(RequestError::BadTarget("empty host"));
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err(RequestError::BadTarget(
            "an IPv6 address must be in brackets",
        ));
    }
    let port = match (port, default_port) {
        (Some(p), _) => parse_port(p).ok_or(RequestError::BadTarget("bad port"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(RequestError::BadTarget("CONNECT needs host:port")),
    };
    Ok((host.to_string(), port))
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|n| *n != 0)
}

fn credentials(headers: &[httparse::Header<'_>]) -> Result<Option<Credentials>, RequestError> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authorization"));
    let Some(h) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(RequestError::BadCredentials("sent twice"));
    }
    let value = std::str::from_utf8(h.value)
        .map_err(|_| RequestError::BadCredentials("not text"))?
        .trim();
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(RequestError::BadCredentials("expected Basic"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(RequestError::BadCredentials("expected Basic"));
    }
    let token = token.trim();
    if token.len() > MAX_CREDENTIALS * 4 / 3 + 4 {
        return Err(RequestError::BadCredentials("too long"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| RequestError::BadCredentials("not base64"))?;
    let text = String::from_utf8(decoded).map_err(|_| RequestError::BadCredentials("not text"))?;
    let (user, password) = text
        .split_once(':')
        .ok_or(RequestError::BadCredentials("expected user:password"))?;
    Ok(Some(Credentials {
        user: user.to_string(),
        password: password.to_string(),
    }))
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, RequestError> {
    let mut found: Option<u64> = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        let text = std::str::from_utf8(h.value)
            .map_err(|_| RequestError::ContentLength)?
            .trim();
        if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RequestError::ContentLength);
        }
        let n: u64 = text.parse().map_err(|_| RequestError::ContentLength)?;
        if found.is_some_and(|f| f != n) {
            return Err(RequestError::ContentLength);
        }
        found = Some(n);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn basic(user: &str, pass: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    }

    fn head(s: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn parses_connect_with_credentials() {
        let text = format!(
            "CONNECT registry.opentofu.org:443 HTTP/1.1\r\nHost: registry.opentofu.org:443\r\nProxy-Authorization: Basic {}\r\n\r\n\x16\x03\x01",
            basic("t1", "s3cret:with:colons")
        );
        let h = head(&text).unwrap().unwrap();
        assert_eq!(h.kind, Kind::Connect);
        assert_eq!((h.host.as_str(), h.port), ("registry.opentofu.org", 443));
        assert_eq!(
            h.credentials,
            Some(Credentials {
                user: "t1".into(),
                password: "s3cret:with:colons".into()
            })
        );
        assert_eq!(
            h.head_len,
            text.len() - 3,
            "tunnel bytes after the head are not part of it"
        );
        assert_eq!(h.destination(), "registry.opentofu.org:443");
        assert!(
            !format!("{h:?}").contains("s3cret"),
            "the password never shows in Debug"
        );
    }

    #[test]
    fn a_long_destination_is_kept_whole_for_redaction_before_it_is_cut() {
        // A secret crossing where an early cut would fall must reach the redactor whole.
        let host = format!("{}tok-5ecret-value.example", "a".repeat(290));
        let h = head(&format!("CONNECT {host}:443 HTTP/1.1\r\n\r\n"))
            .unwrap()
            .unwrap();
        assert_eq!(h.destination(), format!("{host}:443"));
    }

    #[test]
    fn parses_connect_targets() {
        let cases = [
            ("[2001:db8::1]:443", "[2001:db8::1]", 443),
            ("10.0.0.1:5432", "10.0.0.1", 5432),
            ("Example.COM.:8443", "Example.COM.", 8443),
        ];
        for (target, host, port) in cases {
            let h = head(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"))
                .unwrap()
                .unwrap();
            assert_eq!((h.host.as_str(), h.port), (host, port), "{target}");
            assert_eq!(h.credentials, None);
        }
    }

    #[test]
    fn parses_absolute_form_and_renders_the_upstream_head() {
        let text = format!(
            "POST http://mirror.example:8080/v1/x?y=1 HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: Basic {}\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nContent-Length: 5\r\nAccept: */*\r\nUpgrade: websocket\r\n\r\nhello",
            basic("t", "p")
        );
        let h = head(&text).unwrap().unwrap();
        let Kind::Forward(f) = &h.kind else {
            panic!("not forward")
        };
        assert_eq!((h.host.as_str(), h.port), ("mirror.example", 8080));
        assert_eq!(f.path, "/v1/x?y=1");
        assert_eq!(f.content_length, 5);
        assert_eq!(&text.as_bytes()[h.head_len..], b"hello");
        let up = String::from_utf8(f.upstream_head("mirror.example:8080")).unwrap();
        assert_eq!(
            up,
            "POST /v1/x?y=1 HTTP/1.1\r\nHost: mirror.example:8080\r\nContent-Length: 5\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_defaults() {
        let cases = [
            ("http://a.example", "a.example", 80, "/"),
            ("HTTP://a.example?q", "a.example", 80, "/?q"),
            ("http://[::1]:8080/p", "[::1]", 8080, "/p"),
            ("http://10.1.1.1/", "10.1.1.1", 80, "/"),
        ];
        for (target, host, port, path) in cases {
            let h = head(&format!("GET {target} HTTP/1.0\r\n\r\n"))
                .unwrap()
                .unwrap();
            let Kind::Forward(f) = &h.kind else { panic!() };
            assert_eq!(
                (h.host.as_str(), h.port, f.path.as_str()),
                (host, port, path),
                "{target}"
            );
        }
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        let full = "CONNECT a.example:443 HTTP/1.1\r\nX: y\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(head(&full[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn refuses_bad_requests_with_a_status() {
        let cases: &[(&str, u16)] = &[
            ("GARBAGE\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET https://a.example/ HTTP/1.1\r\n\r\n", 400),
            ("GET ftp://a.example/ HTTP/1.1\r\n\r\n", 400),
            ("GET http://user:pw@a.example/ HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.example/#frag HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.example:0/ HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.example:99999/ HTTP/1.1\r\n\r\n", 400),
            ("GET http:///x HTTP/1.1\r\n\r\n", 400),
            ("GET http://[::1/ HTTP/1.1\r\n\r\n", 400),
            ("GET http://::1/ HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example: HTTP/1.1\r\n\r\n", 400),
            ("CONNECT :443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT []:443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT [::1]x:443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\n", 400),
            ("CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n", 400),
            ("CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic !!!\r\n\r\n", 400),
            ("CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic bm9jb2xvbg==\r\n\r\n", 400),
            ("CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic YTpi\r\nProxy-Authorization: Basic YTpi\r\n\r\n", 400),
            ("GET http://a.example/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            ("GET http://a.example/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            ("GET http://a.example/ HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("TRACE http://a.example/ HTTP/1.1\r\n\r\n", 405),
            ("GET http://a.example/ HTTP/2.0\r\n\r\n", 400),
            ("GET http://a.example/ HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
            ("GET http://a.example/ HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        ];
        for (text, status) in cases {
            match head(text) {
                Err(e) => assert_eq!(e.status(), *status, "{text:?}: {e}"),
                Ok(h) => panic!("{text:?} accepted: {h:?}"),
            }
        }
    }

    #[test]
    fn identical_content_lengths_are_one() {
        let h = head(
            "PUT http://a.example/ HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok",
        )
        .unwrap()
        .unwrap();
        assert!(matches!(
            h.kind,
            Kind::Forward(Forward {
                content_length: 2,
                ..
            })
        ));
    }

    #[test]
    fn limits_size_and_header_count() {
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let e = head(&format!("CONNECT a.example:443 HTTP/1.1\r\n{many}\r\n")).unwrap_err();
        assert_eq!(e, RequestError::TooManyHeaders);
        let big = format!(
            "CONNECT a.example:443 HTTP/1.1\r\nX: {}",
            "v".repeat(MAX_HEAD)
        );
        assert_eq!(head(&big).unwrap_err(), RequestError::TooLarge);
        let big_complete = format!(
            "CONNECT a.example:443 HTTP/1.1\r\nX: {}\r\n\r\n",
            "v".repeat(MAX_HEAD)
        );
        assert_eq!(head(&big_complete).unwrap_err(), RequestError::TooLarge);
    }

    #[test]
    fn errors_never_carry_the_password() {
        let text = format!(
            "CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic {}x\r\n\r\n",
            basic("u", "hunter2")
        );
        let e = head(&text).unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse_head(&data);
        }

        #[test]
        fn never_panics_on_request_like_text(target in "[ -~]{0,80}", header in "[ -~]{0,80}") {
            let _ = parse_head(format!("CONNECT {target} HTTP/1.1\r\n{header}\r\n\r\n").as_bytes());
            let _ = parse_head(format!("GET {target} HTTP/1.1\r\n{header}\r\n\r\n").as_bytes());
        }
    }
}
