//! The SMTP command parser: one command line (without CRLF) in, a [`Command`] or an error reply out.
//!
//! Written by hand rather than with smtp-proto: we need the exact reply for every malformed
//! line (RFC 3463 codes), must see source routes to refuse them, and the parser is small.

use crate::proto::{BodyType, MailParams, RcptDsn, Reply, Ret};
use crate::types::{Address, AddressError};

/// True for RFC 3461 xtext: printable ASCII except `+` and `=`, with `+XX` hex escapes.
fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// EHLO with the client's name.
    Ehlo(String),
    /// HELO with the client's name.
    Helo(String),
    /// MAIL FROM; `None` is the null reverse path `<>`.
    Mail {
        /// Reverse path.
        from: Option<Address>,
        /// Parameters.
        params: MailParams,
    },
    /// RCPT TO.
    Rcpt {
        /// Forward path.
        to: Address,
        /// DSN parameters.
        dsn: RcptDsn,
    },
    /// DATA.
    Data,
    /// BDAT chunk of `size` octets.
    Bdat {
        /// Chunk size.
        size: u64,
        /// LAST given.
        last: bool,
    },
    /// RSET.
    Rset,
    /// NOOP.
    Noop,
    /// QUIT.
    Quit,
    /// HELP.
    Help,
    /// VRFY (answered 252).
    Vrfy,
    /// EXPN (refused).
    Expn,
    /// STARTTLS.
    StartTls,
}

const fn err(code: u16, status: &'static str, text: &'static str) -> Reply {
    Reply::new(code, status, text)
}

/// Parses one command line. `smtputf8` says whether the transaction asked for SMTPUTF8
/// (RCPT addresses may then be UTF-8).
pub fn parse(line: &[u8], smtputf8: bool) -> Result<Command, Reply> {
    let line = std::str::from_utf8(line)
        .map_err(|_| err(500, "5.5.2", "Syntax error: command is not valid UTF-8"))?;
    if line.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
        return Err(err(
            500,
            "5.5.2",
            "Syntax error: control characters in command",
        ));
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(err(501, "5.5.4", "Syntax error: no parameters allowed"))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let name = rest.split_whitespace().next().unwrap_or("");
            if name.is_empty() {
                return Err(err(
                    501,
                    "5.5.4",
                    "Syntax error: EHLO/HELO needs a host name",
                ));
            }
            let name = name.to_string();
            Ok(if verb == "EHLO" {
                Command::Ehlo(name)
            } else {
                Command::Helo(name)
            })
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest, smtputf8),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "HELP" => Ok(Command::Help),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_args(Command::StartTls),
        _ => Err(err(500, "5.5.2", "Syntax error: command unrecognized")),
    }
}

/// Strips `PREFIX:` (case-insensitive, optional space after the colon as many clients send).
fn strip_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let head = rest.get(..keyword.len())?;
    if head.eq_ignore_ascii_case(keyword) {
        Some(rest[keyword.len()..].trim_start_matches(' '))
    } else {
        None
    }
}

/// Splits `<path> params` into the path (without brackets) and the parameter text.
fn split_path(arg: &str) -> Result<(&str, &str), Reply> {
    let inner = arg.strip_prefix('<').ok_or(err(
        501,
        "5.1.7",
        "Syntax error: address must be in <angle brackets>",
    ))?;
    // A quoted local part may contain '>', so find the closing bracket outside quotes.
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in inner.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' && in_quote {
            escaped = true;
        } else if c == '"' {
            in_quote = !in_quote;
        } else if c == '>' && !in_quote {
            let params = &inner[i + 1..];
            if !params.is_empty() && !params.starts_with(' ') {
                return Err(err(
                    501,
                    "5.5.4",
                    "Syntax error: space needed before parameters",
                ));
            }
            return Ok((&inner[..i], params.trim()));
        }
    }
    Err(err(501, "5.1.7", "Syntax error: missing closing '>'"))
}

fn address_reply(e: AddressError, status: &'static str) -> Reply {
    match e {
        AddressError::NeedsUtf8 => err(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"),
        AddressError::TooLong => err(501, status, "Syntax error: address too long"),
        _ => Reply::owned(501, status, format!("Syntax error in address: {e}")),
    }
}

fn parse_mail(rest: &str) -> Result<Command, Reply> {
    let arg = strip_keyword(rest, "FROM:").ok_or(err(
        501,
        "5.5.4",
        "Syntax error: use MAIL FROM:<address>",
    ))?;
    let (path, params_text) = split_path(arg)?;
    let mut params = MailParams::default();
    for p in params_text.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        match (k.to_ascii_uppercase().as_str(), v) {
            ("SIZE", Some(v)) => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| err(501, "5.5.4", "Syntax error: SIZE needs a number"))?;
                params.size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => params.body = BodyType::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                params.body = BodyType::EightBitMime
            }
            ("BODY", _) => {
                return Err(err(
                    501,
                    "5.5.4",
                    "Syntax error: BODY must be 7BIT or 8BITMIME",
                ))
            }
            ("SMTPUTF8", None) => params.smtputf8 = true,
            ("RET", Some(v)) if Ret::parse(v).is_some() => params.ret = Ret::parse(v),
            ("RET", _) => return Err(err(501, "5.5.4", "Syntax error: RET must be FULL or HDRS")),
            ("ENVID", Some(v)) if !v.is_empty() && v.len() <= 100 && is_xtext(v) => {
                params.envid = Some(v.to_string())
            }
            ("ENVID", _) => {
                return Err(err(
                    501,
                    "5.5.4",
                    "Syntax error: ENVID must be xtext of at most 100 characters",
                ))
            }
            _ => {
                return Err(err(
                    555,
                    "5.5.4",
                    "MAIL parameter not recognized or not implemented",
                ))
            }
        }
    }
    // RFC 5321 3.3 / C: a source route in the reverse path is accepted and ignored.
    let path = strip_source_route(path).unwrap_or(path);
    if path.is_empty() {
        return Ok(Command::Mail { from: None, params });
    }
    let from = Address::parse(path, params.smtputf8).map_err(|e| address_reply(e, "5.1.7"))?;
    Ok(Command::Mail {
        from: Some(from),
        params,
    })
}

/// Returns the mailbox after an `@a,@b:` source route, if there is one.
fn strip_source_route(path: &str) -> Option<&str> {
    if path.starts_with('@') {
        path.find(':').map(|i| &path[i + 1..])
    } else {
        None
    }
}

fn parse_rcpt(rest: &str, smtputf8: bool) -> Result<Command, Reply> {
    let arg = strip_keyword(rest, "TO:").ok_or(err(
        501,
        "5.5.4",
        "Syntax error: use RCPT TO:<address>",
    ))?;
    let (path, params_text) = split_path(arg)?;
    let mut dsn = RcptDsn::default();
    for p in params_text.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        if k.eq_ignore_ascii_case("NOTIFY") {
            let v = v.to_ascii_uppercase();
            let items: Vec<&str> = v.split(',').collect();
            let ok = v == "NEVER"
                || (!v.is_empty()
                    && items
                        .iter()
                        .all(|i| matches!(*i, "SUCCESS" | "FAILURE" | "DELAY")));
            if !ok {
                return Err(err(
                    501,
                    "5.5.4",
                    "Syntax error: NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY",
                ));
            }
            dsn.notify = Some(v);
        } else if k.eq_ignore_ascii_case("ORCPT") {
            let ok = v
                .split_once(';')
                .is_some_and(|(t, x)| !t.is_empty() && !x.is_empty() && is_xtext(x))
                && v.len() <= 500;
            if !ok {
                return Err(err(
                    501,
                    "5.5.4",
                    "Syntax error: ORCPT must be addr-type;xtext",
                ));
            }
            dsn.orcpt = Some(v.to_string());
        } else {
            return Err(err(
                555,
                "5.5.4",
                "RCPT parameter not recognized or not implemented",
            ));
        }
    }
    if strip_source_route(path).is_some() {
        return Err(err(550, "5.7.1", "Source routes are not accepted"));
    }
    if path.is_empty() {
        return Err(err(501, "5.1.3", "Syntax error: empty recipient address"));
    }
    if path.eq_ignore_ascii_case("postmaster") {
        return Err(err(
            550,
            "5.1.1",
            "Unqualified <postmaster> is not accepted here; use postmaster@domain",
        ));
    }
    let to = Address::parse(path, smtputf8).map_err(|e| address_reply(e, "5.1.3"))?;
    Ok(Command::Rcpt { to, dsn })
}

fn parse_bdat(rest: &str) -> Result<Command, Reply> {
    let mut parts = rest.split(' ').filter(|p| !p.is_empty());
    let size = parts.next().and_then(|s| s.parse::<u64>().ok()).ok_or(err(
        501,
        "5.5.4",
        "Syntax error: BDAT needs a chunk size",
    ))?;
    let last = match parts.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(err(501, "5.5.4", "Syntax error: BDAT size [LAST]")),
    };
    if parts.next().is_some() {
        return Err(err(501, "5.5.4", "Syntax error: BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, Reply> {
        parse(s.as_bytes(), false)
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            p("ehlo client.test"),
            Ok(Command::Ehlo("client.test".into()))
        );
        assert_eq!(p("DATA"), Ok(Command::Data));
        assert_eq!(
            p("BDAT 100 LAST"),
            Ok(Command::Bdat {
                size: 100,
                last: true
            })
        );
        assert_eq!(
            p("BDAT 0"),
            Ok(Command::Bdat {
                size: 0,
                last: false
            })
        );
        match p("MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME").unwrap() {
            Command::Mail { from, params } => {
                assert_eq!(from.unwrap().to_string(), "a@b.test");
                assert_eq!(params.size, Some(100));
                assert_eq!(params.body, BodyType::EightBitMime);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p("MAIL FROM:<>"),
            Ok(Command::Mail {
                from: None,
                params: MailParams::default()
            })
        );
        match p("mail from: <@relay.test:a@b.test>").unwrap() {
            Command::Mail { from, .. } => assert_eq!(from.unwrap().to_string(), "a@b.test"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_with_precise_codes() {
        assert_eq!(p("FOO").unwrap_err().code, 500);
        let status = |line: &str| p(line).unwrap_err().status.map(|s| s.to_string());
        assert_eq!(status("MAIL FROM:a@b").as_deref(), Some("5.1.7"));
        assert_eq!(p("MAIL FROM:<a@b> FOO=1").unwrap_err().code, 555);
        assert_eq!(
            status("RCPT TO:<@x.test:u@nhs.test>").as_deref(),
            Some("5.7.1")
        );
        assert_eq!(status("RCPT TO:<u@nhs.test").as_deref(), Some("5.1.7"));
        assert_eq!(status("RCPT TO:<jö@nhs.test>").as_deref(), Some("5.6.7"));
        assert_eq!(p("BDAT x").unwrap_err().code, 501);
        assert_eq!(p("EHLO").unwrap_err().code, 501);
        assert_eq!(parse(b"NOOP\xff", false).unwrap_err().code, 500);
        assert_eq!(p("DATA x").unwrap_err().code, 501);
    }

    #[test]
    fn dsn_parameters() {
        match p("MAIL FROM:<a@b.test> RET=hdrs ENVID=QQ+2B1").unwrap() {
            Command::Mail { params, .. } => {
                assert_eq!(params.ret, Some(Ret::Hdrs));
                assert_eq!(params.envid.as_deref(), Some("QQ+2B1"));
            }
            other => panic!("{other:?}"),
        }
        match p("RCPT TO:<u@nhs.test> NOTIFY=success,failure ORCPT=rfc822;u@nhs.test").unwrap() {
            Command::Rcpt { dsn, .. } => {
                assert_eq!(dsn.notify.as_deref(), Some("SUCCESS,FAILURE"));
                assert!(dsn.wants_failure() && !dsn.wants_delay());
                assert_eq!(dsn.orcpt.as_deref(), Some("rfc822;u@nhs.test"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p("RCPT TO:<u@nhs.test> NOTIFY=SOMETIMES").unwrap_err().code,
            501
        );
        assert_eq!(p("MAIL FROM:<a@b.test> RET=ALL").unwrap_err().code, 501);
        assert_eq!(p("MAIL FROM:<a@b.test> ENVID=a=b").unwrap_err().code, 501);
        assert_eq!(
            p("RCPT TO:<u@nhs.test> ORCPT=rfc822").unwrap_err().code,
            501
        );
    }

    #[test]
    fn quoted_local_part_with_bracket() {
        match p("RCPT TO:<\"a>b\"@nhs.test>").unwrap() {
            Command::Rcpt { to, .. } => assert_eq!(to.local(), "\"a>b\""),
            other => panic!("{other:?}"),
        }
    }
}
