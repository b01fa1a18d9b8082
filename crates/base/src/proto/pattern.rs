//! Reply patterns: which replies of a next hop mean something special, as an admin writes
//! them in the config (`"421 4.3.2"`, `"451 4.7.500-699"`, `"4.4.62"`).
//!
//! A pattern is an optional reply code, then an enhanced status whose detail may be a range.
//! It matches a [`Reply`], or the first `code status` pair in a line of text (what a
//! connection error carries when the greeting or EHLO was refused).

use super::reply::{EnhancedStatus, Reply};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What is wrong with a reply pattern; every variant names the pattern as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The part before the space is no reply code from 400 to 599.
    #[error("{pattern:?}: {code:?} is not a reply code from 400 to 599")]
    Code {
        /// The pattern.
        pattern: String,
        /// Its code part.
        code: String,
    },
    /// The status part is no enhanced status code.
    #[error("{pattern:?}: {status:?} is not an enhanced status code like 4.7.500")]
    Status {
        /// The pattern.
        pattern: String,
        /// Its status part.
        status: String,
    },
    /// A 2.x.x status.
    #[error("{0:?}: a 2.x.x status is a success, not a failure")]
    Success(String),
    /// A 4xx code with a 5.x.x status, or the other way round.
    #[error("{0:?}: the code and the status class disagree (4xx goes with 4.x.x)")]
    Disagree(String),
    /// The end of the detail range is below its start or above 999.
    #[error("{pattern:?}: the range must end in a number from {first} to 999")]
    Range {
        /// The pattern.
        pattern: String,
        /// The range's first detail.
        first: u16,
    },
}

/// One reply pattern (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyPattern {
    /// The reply code, or any code.
    code: Option<u16>,
    class: u8,
    subject: u16,
    /// First and last detail that match.
    detail: (u16, u16),
}

impl ReplyPattern {
    /// Parses `[CODE ]CLASS.SUBJECT.DETAIL[-LAST]`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<ReplyPattern, PatternError> {
        let s = s.trim();
        let (code, status) = match s.split_once(' ') {
            Some((c, rest)) => {
                let code: u16 = c
                    .parse()
                    .ok()
                    .filter(|c| (400..600).contains(c))
                    .ok_or_else(|| PatternError::Code {
                        pattern: s.to_string(),
                        code: c.to_string(),
                    })?;
                (Some(code), rest.trim())
            }
            None => (None, s),
        };
        let (first, last) = match status.rsplit_once('-') {
            Some((f, l)) => (f, Some(l)),
            None => (status, None),
        };
        let e = EnhancedStatus::parse(first).ok_or_else(|| PatternError::Status {
            pattern: s.to_string(),
            status: first.to_string(),
        })?;
        if e.class() == 2 {
            return Err(PatternError::Success(s.to_string()));
        }
        if code.is_some_and(|c| (c / 100) as u8 != e.class()) {
            return Err(PatternError::Disagree(s.to_string()));
        }
        let last = match last {
            None => e.detail(),
            Some(l) => l
                .parse::<u16>()
                .ok()
                .filter(|l| *l >= e.detail() && *l <= 999)
                .ok_or_else(|| PatternError::Range {
                    pattern: s.to_string(),
                    first: e.detail(),
                })?,
        };
        Ok(ReplyPattern {
            code,
            class: e.class(),
            subject: e.subject(),
            detail: (e.detail(), last),
        })
    }

    /// The status class the pattern matches (4 or 5).
    pub fn class(&self) -> u8 {
        self.class
    }

    /// True when `code` and `status` fall under the pattern.
    pub fn matches_parts(&self, code: u16, status: Option<EnhancedStatus>) -> bool {
        let Some(s) = status else { return false };
        self.code.is_none_or(|c| c == code)
            && s.class() == self.class
            && s.subject() == self.subject
            && (self.detail.0..=self.detail.1).contains(&s.detail())
    }

    /// True when the reply falls under the pattern.
    pub fn matches(&self, r: &Reply) -> bool {
        self.matches_parts(r.code, r.status)
    }

    /// True when the first `code status` pair found in `text` falls under the pattern.
    pub fn matches_text(&self, text: &str) -> bool {
        first_code(text).is_some_and(|(c, s)| self.matches_parts(c, Some(s)))
    }
}

/// The first `NNN x.y.z` pair in `text` (a reply quoted in an error message).
pub fn first_code(text: &str) -> Option<(u16, EnhancedStatus)> {
    let words: Vec<&str> = text.split_ascii_whitespace().take(64).collect();
    words.windows(2).find_map(|w| {
        let code = w[0]
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse::<u16>()
            .ok()
            .filter(|c| (200..600).contains(c))?;
        let status = EnhancedStatus::parse(w[1].trim_end_matches([',', ';', ':']))?;
        Some((code, status))
    })
}

impl fmt::Display for ReplyPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = self.code {
            write!(f, "{c} ")?;
        }
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail.0)?;
        if self.detail.1 != self.detail.0 {
            write!(f, "-{}", self.detail.1)?;
        }
        Ok(())
    }
}

impl Serialize for ReplyPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReplyPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ReplyPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// True when any pattern of `list` matches `r`.
pub fn any_matches(list: &[ReplyPattern], r: &Reply) -> bool {
    list.iter().any(|p| p.matches(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, status: &str) -> Reply {
        Reply::multiline(code, EnhancedStatus::parse(status), ["x"])
    }

    #[test]
    fn patterns_parse_and_match() {
        let p = ReplyPattern::parse("451 4.7.500-699").unwrap();
        assert!(p.matches(&reply(451, "4.7.500")));
        assert!(p.matches(&reply(451, "4.7.650")));
        assert!(!p.matches(&reply(451, "4.7.700")));
        assert!(!p.matches(&reply(421, "4.7.500")));
        assert_eq!(p.to_string(), "451 4.7.500-699");
        let any = ReplyPattern::parse("4.4.62").unwrap();
        assert!(any.matches(&reply(451, "4.4.62")));
        assert!(any.matches(&reply(421, "4.4.62")));
        assert!(!any.matches(&reply(451, "4.4.6")));
        assert!(ReplyPattern::parse("421 4.3.2")
            .unwrap()
            .matches_text("refused by 127.0.0.1:25: 421 4.3.2 The maximum number of concurrent server connections has exceeded a limit"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (bad, why) in [
            ("42 4.3.2", "reply code"),
            ("421 4.3", "enhanced status"),
            ("421 5.3.2", "disagree"),
            ("250 2.0.0", "reply code"),
            ("2.0.0", "success"),
            ("451 4.7.600-500", "range"),
        ] {
            let e = ReplyPattern::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
