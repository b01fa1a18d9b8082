//! The SMTP vocabulary that every stage shares: envelope parameters and replies.
//!
//! Mail crosses coexist in one direction (smtp → policy → spool → queue → route → deliver),
//! but the words it is described in are the same at both ends. The inbound session parses
//! `BODY=`, `RET=` and `NOTIFY=` and answers with replies; the spool writes those
//! parameters to disk; delivery passes them on to the next hop and reads that hop's
//! replies; a bounce quotes them. If this vocabulary lived in the inbound module, every
//! later stage would import `smtp`, and the data flow would loop back on itself. So it lives
//! here, owned by neither side:
//!
//! - [`envelope`]: the parameters of `MAIL FROM` and `RCPT TO` that travel with a message
//!   ([`BodyType`], [`Ret`], [`MailParams`], [`RcptDsn`]);
//! - [`reply`]: an SMTP reply as a value ([`Reply`]: code, enhanced status, lines), the
//!   replies used in several places ([`reply::canned`]), and the conversion of a next hop's
//!   reply as mail-send parses it into the same type;
//! - [`outcome`]: what became of a recipient ([`RcptOutcome`], [`Failure`], [`LocalError`])
//!   and what the spool keeps of it ([`LastReply`]): delivery produces them, the queue and
//!   the spool record them, bounces read them;
//! - [`pattern`]: reply patterns an admin configures ([`ReplyPattern`]: `"451 4.7.500-699"`),
//!   e.g. the replies that mean a next hop is throttling us.
//!
//! The command *parser* is not here: only the inbound side reads commands, so it stays in
//! `smtp::command`. This module has no I/O and depends only on [`crate::types`].

pub mod envelope;
pub mod outcome;
pub mod pattern;
pub mod reply;

pub use envelope::{BodyType, MailParams, RcptDsn, Ret};
pub use outcome::{Failure, LastReply, LocalError, RcptOutcome};
pub use pattern::ReplyPattern;
pub use reply::{EnhancedStatus, Reply};
