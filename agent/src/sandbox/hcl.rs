//! Just enough of HCL (and its JSON form) to answer one question: does a root-module file declare
//! a `backend` or `cloud` block inside `terraform {}`?
//!
//! This is a tokenizer that skips comments, quoted strings (with `${ }` templates) and heredocs,
//! and a block tracker; it is not a parser and never rejects input. A file it cannot make sense of
//! counts as declaring nothing, and tofu itself then reports the syntax error.

/// Whether HCL source declares `terraform { backend "…" {} }` or `terraform { cloud {} }`.
pub fn declares_backend_hcl(src: &str) -> bool {
    #[derive(PartialEq)]
    enum Block {
        Terraform,
        Other,
    }
    let mut stack: Vec<Block> = Vec::new();
    // Tokens since the last newline or brace: a block header is `ident (ident|string)* {`.
    let mut line: Vec<Tok<'_>> = Vec::new();
    for tok in Lexer::new(src) {
        match tok {
            Tok::Newline => line.clear(),
            Tok::Open => {
                let kind = match header(&line) {
                    Some(name) if stack.is_empty() && name == "terraform" => Block::Terraform,
                    Some(name)
                        if stack.len() == 1
                            && stack[0] == Block::Terraform
                            && (name == "backend" || name == "cloud") =>
                    {
                        return true;
                    }
                    _ => Block::Other,
                };
                stack.push(kind);
                line.clear();
            }
            Tok::Close => {
                stack.pop();
                line.clear();
            }
            other => line.push(other),
        }
    }
    false
}

/// Whether a `.tf.json` file declares a backend or cloud block in its `terraform` object(s).
pub fn declares_backend_json(src: &str) -> bool {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(src) else {
        return false;
    };
    let has = |v: &serde_json::Value| {
        v.as_object()
            .is_some_and(|o| o.contains_key("backend") || o.contains_key("cloud"))
    };
    match value.get("terraform") {
        Some(serde_json::Value::Array(items)) => items.iter().any(has),
        Some(v) => has(v),
        None => false,
    }
}

fn header<'a>(line: &[Tok<'a>]) -> Option<&'a str> {
    let (first, labels) = line.split_first()?;
    let Tok::Ident(name) = first else { return None };
    labels
        .iter()
        .all(|t| matches!(t, Tok::Ident(_) | Tok::Str))
        .then_some(*name)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok<'a> {
    Ident(&'a str),
    Str,
    Open,
    Close,
    Newline,
    Other,
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer { src, pos: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self, off: usize) -> Option<u8> {
        self.bytes().get(self.pos + off).copied()
    }

    /// Skip to (not past) the next newline.
    fn skip_line(&mut self) {
        while let Some(b) = self.peek(0) {
            if b == b'\n' {
                return;
            }
            self.pos += 1;
        }
    }

    fn skip_block_comment(&mut self) {
        self.pos += 2;
        while self.pos < self.bytes().len() {
            if self.peek(0) == Some(b'*') && self.peek(1) == Some(b'/') {
                self.pos += 2;
                return;
            }
            self.pos += 1;
        }
    }

    /// Skip a quoted string whose opening quote is at `pos`.
    fn skip_string(&mut self) {
        self.pos += 1;
        while let Some(b) = self.peek(0) {
            match b {
                b'\\' => self.pos += 2,
                b'"' => {
                    self.pos += 1;
                    return;
                }
                b'$' | b'%' if self.peek(1) == Some(b'{') => {
                    self.pos += 2;
                    self.skip_template();
                }
                _ => self.pos += 1,
            }
        }
    }

    /// Skip a `${ … }` template body (the opening is consumed): nested braces and strings.
    fn skip_template(&mut self) {
        let mut depth = 1usize;
        while let Some(b) = self.peek(0) {
            match b {
                b'"' => self.skip_string(),
                b'{' => {
                    depth += 1;
                    self.pos += 1;
                }
                b'}' => {
                    self.pos += 1;
                    depth -= 1;
                    if depth == 0 {
                        return;
                    }
                }
                _ => self.pos += 1,
            }
        }
    }

    /// `<<EOF` or `<<-EOF` at `pos`: skip through the closing marker line. Returns false when
    /// this is not a heredoc (then the caller treats `<` as an ordinary character).
    fn skip_heredoc(&mut self) -> bool {
        let bytes = self.bytes();
        let mut i = self.pos + 2;
        if bytes.get(i) == Some(&b'-') {
            i += 1;
        }
        let start = i;
        while bytes
            .get(i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        {
            i += 1;
        }
        if i == start {
            return false;
        }
        let marker = &self.src[start..i];
        // The body starts on the next line; it ends at a line holding only the marker.
        let mut rest = match self.src[i..].find('\n') {
            Some(nl) => i + nl + 1,
            None => {
                self.pos = bytes.len();
                return true;
            }
        };
        loop {
            let end = self.src[rest..]
                .find('\n')
                .map_or(bytes.len(), |n| rest + n);
            if self.src[rest..end].trim() == marker {
                self.pos = end;
                return true;
            }
            if end >= bytes.len() {
                self.pos = bytes.len();
                return true;
            }
            rest = end + 1;
        }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        loop {
            let b = self.peek(0)?;
            match b {
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'\n' => {
                    self.pos += 1;
                    return Some(Tok::Newline);
                }
                b'#' => self.skip_line(),
                b'/' if self.peek(1) == Some(b'/') => self.skip_line(),
                b'/' if self.peek(1) == Some(b'*') => self.skip_block_comment(),
                b'"' => {
                    self.skip_string();
                    return Some(Tok::Str);
                }
                b'<' if self.peek(1) == Some(b'<') => {
                    if self.skip_heredoc() {
                        return Some(Tok::Str);
                    }
                    self.pos += 2;
                    return Some(Tok::Other);
                }
                b'{' => {
                    self.pos += 1;
                    return Some(Tok::Open);
                }
                b'}' => {
                    self.pos += 1;
                    return Some(Tok::Close);
                }
                b if b.is_ascii_alphabetic() || b == b'_' => {
                    let start = self.pos;
                    while self
                        .peek(0)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                    {
                        self.pos += 1;
                    }
                    return Some(Tok::Ident(&self.src[start..self.pos]));
                }
                _ => {
                    // Advance by a whole UTF-8 character so slicing stays on boundaries.
                    let len = self.src[self.pos..]
                        .chars()
                        .next()
                        .map_or(1, char::len_utf8);
                    self.pos += len;
                    return Some(Tok::Other);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_backend_and_cloud_blocks() {
        assert!(declares_backend_hcl(
            "terraform {\n  backend \"s3\" {\n    bucket = \"b\"\n  }\n}\n"
        ));
        assert!(declares_backend_hcl(
            "terraform {\n  required_version = \">= 1.0\"\n  cloud {\n organization = \"o\"\n }\n}"
        ));
        assert!(declares_backend_hcl("terraform { backend local {} }"));
        assert!(declares_backend_hcl(
            "# c\nvariable \"x\" {}\nterraform {\n required_providers {\n a = { source = \"x/y\" }\n }\n backend \"http\" {}\n}"
        ));
    }

    #[test]
    fn ignores_lookalikes() {
        // Not inside terraform {}.
        assert!(!declares_backend_hcl("backend \"s3\" {}\n"));
        assert!(!declares_backend_hcl(
            "resource \"x\" \"y\" {\n  backend \"s3\" {}\n}"
        ));
        // Nested one level too deep.
        assert!(!declares_backend_hcl(
            "terraform {\n required_providers {\n backend = {}\n }\n}"
        ));
        // An attribute, not a block.
        assert!(!declares_backend_hcl("terraform {\n  backend = {}\n}"));
        // Comments and strings.
        assert!(!declares_backend_hcl(
            "terraform {\n # backend \"s3\" {}\n // cloud {}\n /* backend \"x\" {} */\n}"
        ));
        assert!(!declares_backend_hcl(
            "locals {\n  a = \"terraform { backend \\\"s3\\\" {} }\"\n}"
        ));
        assert!(!declares_backend_hcl(
            "locals {\n  a = \"${jsonencode({ b = \"}\" })} terraform {\"\n}\nbackend \"x\" {}"
        ));
        assert!(!declares_backend_hcl(
            "locals {\n  a = <<-EOT\n    terraform {\n      backend \"s3\" {}\n    }\n  EOT\n}\n"
        ));
        assert!(!declares_backend_hcl("terraform {}\n"));
        assert!(!declares_backend_hcl(""));
    }

    #[test]
    fn heredoc_then_backend_is_found() {
        assert!(declares_backend_hcl(
            "locals {\n a = <<EOT\nhello }\nEOT\n}\nterraform {\n backend \"http\" {}\n}\n"
        ));
    }

    #[test]
    fn garbage_never_panics() {
        for s in [
            "\"",
            "${",
            "<<",
            "<<-",
            "<<EOF",
            "/*",
            "}}}}",
            "terraform {{{",
            "é{ü}\"\\",
        ] {
            let _ = declares_backend_hcl(s);
        }
    }

    #[test]
    fn json_form() {
        assert!(declares_backend_json(
            r#"{"terraform": {"backend": {"s3": {}}}}"#
        ));
        assert!(declares_backend_json(
            r#"{"terraform": [{"required_version": "1"}, {"cloud": {}}]}"#
        ));
        assert!(!declares_backend_json(
            r#"{"terraform": {"required_version": "1"}}"#
        ));
        assert!(!declares_backend_json(r#"{"resource": {}}"#));
        assert!(!declares_backend_json("not json"));
    }
}
