//! Envelope parameters: what `MAIL FROM` and `RCPT TO` say about a message besides its
//! addresses (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 DSN).
//!
//! The inbound parser fills them in, the spool stores them with the message (their serde
//! form is part of the on-disk envelope, so it must keep reading older spool files),
//! delivery passes them on to next hops that offer the extension, and bounces obey them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Body type declared with `BODY=` (RFC 6152).
///
/// Stored in the spool's envelope as `"SevenBit"` or `"EightBitMime"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BodyType {
    /// 7-bit (the default).
    #[default]
    SevenBit,
    /// 8BITMIME.
    EightBitMime,
}

/// What a DSN returns of the original message: `RET=FULL` or `RET=HDRS` (RFC 3461 4.3).
///
/// Stored in the spool's envelope as `"FULL"` or `"HDRS"`, the keyword as sent on the wire,
/// which is also how spool files written before this type existed spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// The whole message.
    #[serde(rename = "FULL")]
    Full,
    /// Its header section only.
    #[serde(rename = "HDRS")]
    Hdrs,
}

impl Ret {
    /// The keyword `FULL` or `HDRS` in any case; `None` for anything else.
    pub fn parse(keyword: &str) -> Option<Ret> {
        if keyword.eq_ignore_ascii_case("FULL") {
            Some(Ret::Full)
        } else if keyword.eq_ignore_ascii_case("HDRS") {
            Some(Ret::Hdrs)
        } else {
            None
        }
    }

    /// The keyword as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

impl fmt::Display for Ret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parameters of `MAIL FROM`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// Declared size (RFC 1870).
    pub size: Option<u64>,
    /// Declared body type.
    pub body: BodyType,
    /// SMTPUTF8 requested (RFC 6531).
    pub smtputf8: bool,
    /// DSN `RET=` (RFC 3461).
    pub ret: Option<Ret>,
    /// DSN `ENVID=` (xtext, as sent).
    pub envid: Option<String>,
}

/// DSN parameters of one recipient (RFC 3461 4.1, 4.2).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptDsn {
    /// `NOTIFY=` value in upper case: `NEVER` or a list of SUCCESS, FAILURE, DELAY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// `ORCPT=` value as sent (`addr-type;xtext`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl RcptDsn {
    /// Whether a failure DSN is wanted (the default when NOTIFY is absent).
    pub fn wants_failure(&self) -> bool {
        self.notify
            .as_deref()
            .is_none_or(|n| n.split(',').any(|x| x == "FAILURE"))
    }

    /// Whether a delay DSN is wanted (the default when NOTIFY is absent).
    pub fn wants_delay(&self) -> bool {
        self.notify
            .as_deref()
            .is_none_or(|n| n.split(',').any(|x| x == "DELAY"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ret_keywords() {
        assert_eq!(Ret::parse("full"), Some(Ret::Full));
        assert_eq!(Ret::parse("HDRS"), Some(Ret::Hdrs));
        assert_eq!(Ret::parse("Hdrs"), Some(Ret::Hdrs));
        assert_eq!(Ret::parse("ALL"), None);
        assert_eq!(Ret::parse(""), None);
        assert_eq!(Ret::Full.to_string(), "FULL");
        assert_eq!(Ret::Hdrs.as_str(), "HDRS");
    }

    #[test]
    fn ret_serde_form_is_the_keyword() {
        // The spool's envelope JSON has always held the upper-case keyword.
        assert_eq!(serde_json::to_string(&Ret::Full).unwrap(), r#""FULL""#);
        assert_eq!(serde_json::to_string(&Ret::Hdrs).unwrap(), r#""HDRS""#);
        assert_eq!(serde_json::from_str::<Ret>(r#""FULL""#).unwrap(), Ret::Full);
        assert_eq!(serde_json::from_str::<Ret>(r#""HDRS""#).unwrap(), Ret::Hdrs);
        assert!(serde_json::from_str::<Ret>(r#""ALL""#).is_err());
    }

    #[test]
    fn notify_defaults_and_lists() {
        let none = RcptDsn::default();
        assert!(none.wants_failure() && none.wants_delay());
        let never = RcptDsn {
            notify: Some("NEVER".into()),
            orcpt: None,
        };
        assert!(!never.wants_failure() && !never.wants_delay());
        let some = RcptDsn {
            notify: Some("SUCCESS,DELAY".into()),
            orcpt: None,
        };
        assert!(!some.wants_failure() && some.wants_delay());
    }
}
