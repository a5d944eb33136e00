//! containerd's filter expressions, as `List` receives them.
//!
//! One expression is a comma-separated list of selectors that must all match; a request's several
//! expressions match when any of them does, and no expression (or an empty one) matches everything. A
//! selector is `<fieldpath>[<operator><value>]`:
//!
//! - fieldpath: fields joined by `.`; a field is `[A-Za-z0-9_-]+` or quoted, so label keys with dots read
//!   `labels."containerd.io/gc.root"`;
//! - operator: `==` (present and equal), `!=` (not equal; an absent field counts as empty), `~=` (the value
//!   is a regular expression that must match somewhere in the field); no operator tests presence;
//! - value: quoted, or everything up to the next comma or white space;
//! - quoted: between `"`, `/` or `|`, with Go's escapes (`\n`, `\t`, `\\`, `\"`, `\x41`, `\101`, `\u00e9`, …).
//!
//! Fields of a snapshot: `name`, `parent` (empty when there is none), `kind` (`active`, `view`, `committed`)
//! and `labels.<key>`.

use std::borrow::Cow;
use std::fmt;

use regex::{Regex, RegexBuilder};

use super::Info;

/// Compiled regular expressions are capped at this size (the pattern comes from the caller).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Parsed filter expressions of one `List` request.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Alternatives (OR) of conjunctions (AND); `None` matches everything.
    any: Option<Vec<Vec<Selector>>>,
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// A filter expression that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}, at byte {pos}: {message}")]
pub struct FilterError {
    input: String,
    pos: usize,
    message: String,
}

impl Filter {
    /// A filter that matches every snapshot.
    pub fn all() -> Self {
        Self { any: None }
    }

    /// Parses the expressions of one request (OR of each).
    pub fn parse_all<S: AsRef<str>>(expressions: &[S]) -> Result<Self, FilterError> {
        let mut any = Vec::with_capacity(expressions.len());
        for expression in expressions {
            let expression = expression.as_ref();
            if expression.is_empty() {
                // An empty expression matches everything, and so does any OR including it; keep parsing so
                // that a malformed sibling is still reported.
                any.push(Vec::new());
                continue;
            }
            any.push(Parser::new(expression).selectors()?);
        }
        if any.is_empty() || any.iter().any(Vec::is_empty) {
            return Ok(Self::all());
        }
        Ok(Self { any: Some(any) })
    }

    /// Whether `info` matches.
    pub fn matches(&self, info: &Info) -> bool {
        match &self.any {
            None => true,
            Some(any) => any.iter().any(|all| all.iter().all(|s| s.matches(info))),
        }
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value.is_some_and(|v| v == *want),
            Op::NotEqual(want) => value.unwrap_or_default() != *want,
            Op::Matches(re) => re.is_match(&value.unwrap_or_default()),
        }
    }
}

/// The value of a field path of a snapshot, `None` when the snapshot has no such field.
fn field<'a>(info: &'a Info, path: &[String]) -> Option<Cow<'a, str>> {
    match path.first().map(String::as_str)? {
        "name" => Some(Cow::Borrowed(&info.name)),
        "parent" => Some(Cow::Borrowed(info.parent.as_deref().unwrap_or(""))),
        "kind" => Some(Cow::Borrowed(info.kind.as_str())),
        "labels" => match path {
            [_, key] => info.labels.get(key).map(|v| Cow::Borrowed(v.as_str())),
            _ => None,
        },
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A bare field name.
    Field(String),
    /// A quoted string, unquoted.
    Quoted(String),
    /// A bare value (after an operator).
    Value(String),
    Dot,
    Comma,
    Operator(String),
    End,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Field(s) | Self::Value(s) => write!(f, "{s:?}"),
            Self::Quoted(s) => write!(f, "quoted {s:?}"),
            Self::Dot => f.write_str("\".\""),
            Self::Comma => f.write_str("\",\""),
            Self::Operator(s) => write!(f, "operator {s:?}"),
            Self::End => f.write_str("the end"),
        }
    }
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote_char(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

/// Tokenizes and parses one expression.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
    /// Set after an operator: the next bare word is a value, which may hold any graphic character.
    want_value: bool,
    /// One token of lookahead with the position it started at.
    peeked: Option<(usize, Token)>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Self { input, pos: 0, want_value: false, peeked: None }
    }

    fn error(&self, pos: usize, message: impl Into<String>) -> FilterError {
        FilterError { input: self.input.to_owned(), pos, message: message.into() }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn peek(&mut self) -> Result<&Token, FilterError> {
        if self.peeked.is_none() {
            let token = self.scan()?;
            self.peeked = Some(token);
        }
        match &self.peeked {
            Some((_, token)) => Ok(token),
            None => Err(self.error(self.pos, "internal: no token")),
        }
    }

    fn next(&mut self) -> Result<(usize, Token), FilterError> {
        match self.peeked.take() {
            Some(token) => Ok(token),
            None => self.scan(),
        }
    }

    fn scan(&mut self) -> Result<(usize, Token), FilterError> {
        let skipped = self.rest().len() - self.rest().trim_start().len();
        self.pos += skipped;
        let start = self.pos;
        let Some(c) = self.rest().chars().next() else {
            return Ok((start, Token::End));
        };
        if is_quote_char(c) {
            self.want_value = false;
            return self.scan_quoted(c).map(|s| (start, Token::Quoted(s)));
        }
        if c == ',' || c == '.' {
            self.pos += 1;
            self.want_value = false;
            return Ok((start, if c == ',' { Token::Comma } else { Token::Dot }));
        }
        if is_operator_char(c) {
            let len = self.rest().find(|c| !is_operator_char(c)).unwrap_or(self.rest().len());
            let op = self.rest()[..len].to_owned();
            self.pos += len;
            self.want_value = true;
            return Ok((start, Token::Operator(op)));
        }
        if self.want_value {
            let len = self.rest().find(|c: char| c == ',' || c.is_whitespace()).unwrap_or(self.rest().len());
            let value = self.rest()[..len].to_owned();
            self.pos += len;
            self.want_value = false;
            return Ok((start, Token::Value(value)));
        }
        if is_field_char(c) {
            let len = self.rest().find(|c| !is_field_char(c)).unwrap_or(self.rest().len());
            let field = self.rest()[..len].to_owned();
            self.pos += len;
            return Ok((start, Token::Field(field)));
        }
        Err(self.error(start, format!("unexpected character {c:?}")))
    }

    /// Reads a literal between two `quote` characters (the cursor is on the opening one) and unescapes it.
    fn scan_quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let start = self.pos;
        let mut bytes: Vec<u8> = Vec::new();
        let mut chars = self.input[start + 1..].char_indices().peekable();
        let mut utf8 = [0u8; 4];
        loop {
            let Some((at, c)) = chars.next() else {
                return Err(self.error(start, "quoted literal is not terminated"));
            };
            let at = start + 1 + at;
            match c {
                '\n' => return Err(self.error(start, "quoted literal is not terminated")),
                c if c == quote => {
                    self.pos = at + c.len_utf8();
                    break;
                }
                '\\' => {
                    let Some((_, e)) = chars.next() else {
                        return Err(self.error(start, "quoted literal is not terminated"));
                    };
                    match e {
                        'a' => bytes.push(0x07),
                        'b' => bytes.push(0x08),
                        'f' => bytes.push(0x0c),
                        'n' => bytes.push(b'\n'),
                        'r' => bytes.push(b'\r'),
                        't' => bytes.push(b'\t'),
                        'v' => bytes.push(0x0b),
                        '\\' => bytes.push(b'\\'),
                        e if e == quote => bytes.extend_from_slice(e.encode_utf8(&mut utf8).as_bytes()),
                        '0'..='7' => {
                            let mut value = e.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                match chars.next().and_then(|(_, d)| d.to_digit(8)) {
                                    Some(d) => value = value * 8 + d,
                                    None => return Err(self.error(at, "octal escape needs three digits")),
                                }
                            }
                            let byte = u8::try_from(value).map_err(|_| self.error(at, "octal escape above \\377"))?;
                            bytes.push(byte);
                        }
                        'x' | 'u' | 'U' => {
                            let digits = match e {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let mut value: u32 = 0;
                            for _ in 0..digits {
                                match chars.next().and_then(|(_, d)| d.to_digit(16)) {
                                    Some(d) => value = value * 16 + d,
                                    None => {
                                        return Err(self.error(at, format!("\\{e} escape needs {digits} hex digits")));
                                    }
                                }
                            }
                            if e == 'x' {
                                bytes.push(u8::try_from(value).map_err(|_| self.error(at, "bad \\x escape"))?);
                            } else {
                                let c = char::from_u32(value)
                                    .ok_or_else(|| self.error(at, format!("\\{e}{value:x} is not a character")))?;
                                bytes.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                            }
                        }
                        other => return Err(self.error(at, format!("unknown escape \\{other}"))),
                    }
                }
                c => bytes.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes()),
            }
        }
        String::from_utf8(bytes).map_err(|_| self.error(start, "quoted literal is not valid UTF-8"))
    }

    /// `selector ("," selector)* end`
    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        if let Some(at) = self.input.find('\0') {
            return Err(self.error(at, "unexpected NUL character"));
        }
        let mut all = vec![self.selector()?];
        loop {
            let (pos, token) = self.next()?;
            match token {
                Token::End => return Ok(all),
                Token::Comma => all.push(self.selector()?),
                other => return Err(self.error(pos, format!("expected \",\" or the end, found {other}"))),
            }
        }
    }

    /// `fieldpath [operator value]`
    fn selector(&mut self) -> Result<Selector, FilterError> {
        let path = self.fieldpath()?;
        if matches!(self.peek()?, Token::Comma | Token::End) {
            return Ok(Selector { path, op: Op::Present });
        }
        let (pos, token) = self.next()?;
        let Token::Operator(op) = token else {
            return Err(self.error(pos, format!("expected an operator (==, !=, ~=), found {token}")));
        };
        let (value_pos, value) = match self.next()? {
            (pos, Token::Value(v) | Token::Field(v) | Token::Quoted(v)) => (pos, v),
            (pos, other) => return Err(self.error(pos, format!("expected a value, found {other}"))),
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            "~=" => Op::Matches(
                RegexBuilder::new(&value)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| self.error(value_pos, format!("invalid regular expression: {e}")))?,
            ),
            other => return Err(self.error(pos, format!("unsupported operator {other:?} (==, !=, ~=)"))),
        };
        Ok(Selector { path, op })
    }

    /// `field ("." field)*`
    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while matches!(self.peek()?, Token::Dot) {
            self.next()?;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.next()? {
            (_, Token::Field(f) | Token::Quoted(f)) => Ok(f),
            (pos, other) => Err(self.error(pos, format!("expected a field name, found {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::snapshot::{Kind, Labels};

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Labels>(),
        }
    }

    fn sample() -> Vec<Info> {
        vec![
            info("base", None, Kind::Committed, &[("containerd.io/gc.root", "1"), ("tier", "gold")]),
            info("top", Some("base"), Kind::Committed, &[("tier", "silver")]),
            info("work", Some("top"), Kind::Active, &[]),
            info("look", Some("top"), Kind::View, &[("tier", "")]),
        ]
    }

    fn names(filters: &[&str]) -> Vec<String> {
        let filter = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        sample().into_iter().filter(|i| filter.matches(i)).map(|i| i.name).collect()
    }

    #[test]
    fn no_filter_or_an_empty_one_matches_everything() {
        assert_eq!(names(&[]), ["base", "top", "work", "look"]);
        assert_eq!(names(&[""]), ["base", "top", "work", "look"]);
        assert_eq!(names(&["name==base", ""]), ["base", "top", "work", "look"]);
    }

    #[test]
    fn equality_inequality_and_presence() {
        assert_eq!(names(&["name==top"]), ["top"]);
        assert_eq!(names(&["kind==committed"]), ["base", "top"]);
        assert_eq!(names(&["kind!=committed"]), ["work", "look"]);
        assert_eq!(names(&["parent==top"]), ["work", "look"]);
        // An absent parent is the empty string.
        assert_eq!(names(&["parent==\"\""]), ["base"]);
        assert_eq!(names(&["labels.tier"]), ["base", "top", "look"]);
        assert_eq!(names(&["labels.tier==gold"]), ["base"]);
        // != holds for snapshots without the label.
        assert_eq!(names(&["labels.tier!=gold"]), ["top", "work", "look"]);
        // `labels` alone and unknown fields are never present.
        assert!(names(&["labels"]).is_empty());
        assert!(names(&["size"]).is_empty());
    }

    #[test]
    fn commas_are_and_and_several_expressions_are_or() {
        assert_eq!(names(&["kind==committed,labels.tier==silver"]), ["top"]);
        assert_eq!(names(&["name==base", "name==work"]), ["base", "work"]);
        assert_eq!(names(&["kind==view,parent==top", "labels.tier==gold"]), ["base", "look"]);
    }

    #[test]
    fn quoted_label_keys_and_values() {
        assert_eq!(names(&[r#"labels."containerd.io/gc.root""#]), ["base"]);
        assert_eq!(names(&[r#"labels."containerd.io/gc.root"=="1""#]), ["base"]);
        assert_eq!(names(&["labels.|containerd.io/gc.root|==/1/"]), ["base"]);
        assert_eq!(names(&[r#"name=="\x74op""#]), ["top"]);
        assert_eq!(names(&[r#"name=="\164op""#]), ["top"]);
        assert_eq!(names(&[r#"name=="\u0074op""#]), ["top"]);
        assert_eq!(names(&[" name == top , kind == committed "]), ["top"]);
    }

    #[test]
    fn regular_expressions() {
        assert_eq!(names(&["name~=^t"]), ["top"]);
        assert_eq!(names(&["name~=o"]), ["top", "work", "look"]);
        assert_eq!(names(&["labels.tier~=\"^(gold|silver)$\""]), ["base", "top"]);
        // A bare value runs to the next comma; dots and slashes are part of it.
        assert_eq!(names(&["name~=b.se,kind==committed"]), ["base"]);
    }

    #[test]
    fn malformed_expressions_are_rejected_with_a_position() {
        for bad in [
            "name=",
            "name===top",
            "name=top",
            "=top",
            "name==top,",
            ",name==top",
            "labels.",
            "name==top kind==view",
            r#"labels."unterminated"#,
            r#"name=="\q""#,
            "name~=(",
            "name<top",
            "name==a\0",
        ] {
            let err = Filter::parse_all(&[bad]).expect_err(bad);
            assert!(err.to_string().contains("at byte"), "{bad}: {err}");
        }
        // One bad expression fails the request even beside an empty one.
        assert!(Filter::parse_all(&["", "name=="]).is_err());
    }
}
