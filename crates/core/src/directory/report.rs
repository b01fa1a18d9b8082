//! Exchange migration reports read as batches (`--format migration-users`).
//!
//! Admins export the state of a migration with `Get-MigrationUser | Export-Csv` or
//! `Get-MoveRequest | Export-Csv`. Only users whose move has completed have their mailbox in
//! the target estate; mail for the others must stay where it goes now (flipping a failed
//! user sends their mail to Exchange Online, which bounces it). So a report becomes a batch
//! of its completed users (status `Completed`, `CompletedWithWarning` or
//! `CompletedWithWarnings`), and the others are counted by status, to be reported and left
//! as they are.
//!
//! The files come as Windows PowerShell writes them: a `#TYPE …` first line (a comment to
//! the CSV reader), maybe a UTF-8 byte order mark, CRLF line ends, every field quoted, commas
//! inside quoted fields. The address is the first non-empty of `EmailAddress` and
//! `PrimarySmtpAddress`, else `Identity` when it is an address (it may also be a GUID or
//! `domain\user`). The status is the `Status` column, else `StatusSummary`, else `State`.
//! A row without an address or a status refuses the whole file, naming file and line.

use super::batch::BatchRow;
use super::table::{names, CsvRows};
use super::{DirectoryError, StateId};
use crate::types::{Address, RouteName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Addresses listed per status in a [`StatusGroup`]; the others are only counted.
pub const LISTED_PER_STATUS: usize = 20;

/// Statuses (lower case) of a completed move: `Get-MoveRequest` says `CompletedWithWarning`,
/// `Get-MigrationUser` `CompletedWithWarnings`.
const COMPLETED: [&str; 3] = ["completed", "completedwithwarning", "completedwithwarnings"];

/// Address columns (lower case, and as PowerShell writes them), in order of preference.
const ADDRESS_COLUMNS: [(&str, &str); 3] = [
    ("emailaddress", "EmailAddress"),
    ("primarysmtpaddress", "PrimarySmtpAddress"),
    ("identity", "Identity"),
];

/// Status columns (lower case), in order of preference.
const STATUS_COLUMNS: [&str; 3] = ["status", "statussummary", "state"];

/// The users of a migration report with one status other than completed, left as they are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StatusGroup {
    /// The status as the report spells it (the first spelling seen), e.g. `Failed`.
    pub status: String,
    /// Users with this status.
    pub count: usize,
    /// The first [`LISTED_PER_STATUS`] of their addresses, as written.
    pub addresses: Vec<String>,
}

/// A migration report read as a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The completed users, each to the target state.
    pub rows: Vec<BatchRow>,
    /// The other users by status, sorted by status (case-insensitive).
    pub not_completed: Vec<StatusGroup>,
}

/// Reads a `Get-MigrationUser` or `Get-MoveRequest` export (`file` names it in errors):
/// completed users move to `target`, the others are grouped by status. A bad row refuses
/// the whole file with its line.
pub fn parse(
    text: &[u8],
    file: &str,
    states: &[RouteName],
    target: &str,
) -> Result<Report, DirectoryError> {
    let err = |line: u64, reason: String| DirectoryError::Row {
        file: file.to_string(),
        line: line as usize,
        reason,
    };
    let state = StateId::find(states, target).ok_or_else(|| {
        err(
            0,
            format!(
                "unknown state {target:?} (routes: {}); a migration report moves its completed users to --state, `cloud` when not given",
                names(states)
            ),
        )
    })?;
    if text.starts_with(b"\xFF\xFE") || text.starts_with(b"\xFE\xFF") {
        return Err(err(
            1,
            "the file is UTF-16 (Export-Csv -Encoding Unicode): export it again with -Encoding UTF8"
                .into(),
        ));
    }
    let mut records = CsvRows::new(text);
    let (header_line, cols) = records.header().map_err(|(l, r)| err(l, r))?;
    let address_cols: Vec<(usize, &str)> = ADDRESS_COLUMNS
        .iter()
        .filter_map(|&(lower, name)| Some((cols.iter().position(|c| c == lower)?, name)))
        .collect();
    if address_cols.is_empty() {
        return Err(err(
            header_line,
            format!(
                "no `EmailAddress`, `PrimarySmtpAddress` or `Identity` column in header {:?} (is this a Get-MigrationUser or Get-MoveRequest export?)",
                cols.join(",")
            ),
        ));
    }
    let status_col = STATUS_COLUMNS
        .iter()
        .find_map(|s| cols.iter().position(|c| c == s))
        .ok_or_else(|| {
        err(
            header_line,
            format!(
                "no `Status`, `StatusSummary` or `State` column in header {:?} (is this a Get-MigrationUser or Get-MoveRequest export?)",
                cols.join(",")
            ),
        )
    })?;
    let identity_col = cols.iter().position(|c| c == "identity");
    let mut report = Report::default();
    // Lower-case status -> its group.
    let mut groups: BTreeMap<String, StatusGroup> = BTreeMap::new();
    while let Some(row) = records.next_row() {
        let (line, rec) = row.map_err(|(l, r)| err(l, r))?;
        let field = |c: usize| -> Result<&str, DirectoryError> {
            std::str::from_utf8(rec.get(c).unwrap_or_default())
                .map_err(|_| err(line, format!("column {} is not UTF-8", cols[c])))
        };
        // The first non-empty address column; Identity only when it holds an address.
        let mut address = None;
        for &(c, _) in &address_cols {
            let text = field(c)?;
            if text.is_empty() || (Some(c) == identity_col && !text.contains('@')) {
                continue;
            }
            let addr = Address::parse(text, true)
                .map_err(|e| err(line, format!("bad address {text:?} in {}: {e}", cols[c])))?;
            address = Some((text, addr));
            break;
        }
        let Some((text, addr)) = address else {
            // Say what each address column held: empty, or an Identity that is no address.
            let mut why = Vec::new();
            for &(c, name) in &address_cols {
                match field(c)? {
                    "" => why.push(format!("{name} is empty")),
                    i => why.push(format!("{name} {i:?} is not an address")),
                }
            }
            return Err(err(line, format!("no address: {}", why.join(", "))));
        };
        let status = field(status_col)?;
        if status.is_empty() {
            return Err(err(
                line,
                format!("no status for {text} (column {})", cols[status_col]),
            ));
        }
        let key = status.to_ascii_lowercase();
        if COMPLETED.contains(&key.as_str()) {
            report.rows.push(BatchRow {
                line,
                address: text.to_string(),
                key: addr.key(),
                state,
            });
            continue;
        }
        let group = groups.entry(key).or_insert_with(|| StatusGroup {
            status: status.to_string(),
            ..StatusGroup::default()
        });
        group.count += 1;
        if group.addresses.len() < LISTED_PER_STATUS {
            group.addresses.push(text.to_string());
        }
    }
    report.not_completed = groups.into_values().collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    /// `Get-MigrationUser | Export-Csv -Encoding UTF8` from Windows PowerShell 5: BOM,
    /// `#TYPE`, CRLF, every field quoted, commas inside fields.
    const MIGRATION_USERS: &str = "\u{feff}#TYPE Microsoft.Exchange.Data.Storage.Management.MigrationUser\r\n\
        \"Identity\",\"BatchId\",\"EmailAddress\",\"RecipientType\",\"SkippedItemCount\",\"SyncedItemCount\",\"Status\",\"StatusSummary\",\"State\",\"ErrorSummary\"\r\n\
        \"John.Doe@nhs.test\",\"Evening 14\",\"John.Doe@nhs.test\",\"UserMailbox\",\"0\",\"1523\",\"Completed\",\"Completed\",\"Completed\",\"\"\r\n\
        \"mary@nhs.test\",\"Evening 14\",\"mary@nhs.test\",\"UserMailbox\",\"3\",\"870\",\"CompletedWithWarnings\",\"Completed\",\"Completed\",\"\"\r\n\
        \"ann@nhs.test\",\"Evening 14\",\"ann@nhs.test\",\"UserMailbox\",\"0\",\"12\",\"Failed\",\"Failed\",\"Failed\",\"Error: TooManyBadItemsPermanentException, the limit is 10, 12 were found\"\r\n\
        \"bob@nhs.test\",\"Evening 14\",\"bob@nhs.test\",\"UserMailbox\",\"0\",\"400\",\"Syncing\",\"Active\",\"Active\",\"\"\r\n\
        \"carl@nhs.test\",\"Evening 14\",\"carl@nhs.test\",\"UserMailbox\",\"0\",\"0\",\"failed\",\"Failed\",\"Failed\",\"Error: MigrationTransientException, \"\"retry\"\"\"\r\n";

    /// `Get-MoveRequest | Export-Csv` from Windows PowerShell 5 (no BOM): no EmailAddress
    /// column; Identity is an address or not, PrimarySmtpAddress selected in.
    const MOVE_REQUESTS: &str = "#TYPE Selected.Microsoft.Exchange.Management.RecipientTasks.MoveRequest\r\n\
        \"DisplayName\",\"Status\",\"TargetDatabase\",\"Identity\",\"PrimarySmtpAddress\",\"BatchName\"\r\n\
        \"Doe, John\",\"Completed\",\"EURPR01DG123-db045\",\"John.Doe@nhs.test\",\"\",\"MigrationService:Evening 14\"\r\n\
        \"Smith, Mary\",\"CompletedWithWarning\",\"EURPR01DG123-db045\",\"NHS\\msmith\",\"mary@nhs.test\",\"MigrationService:Evening 14\"\r\n\
        \"Jones, Ann\",\"Failed\",\"EURPR01DG123-db046\",\"ann@nhs.test\",\"\",\"MigrationService:Evening 14\"\r\n\
        \"Brown, Bob\",\"InProgress\",\"\",\"bob@nhs.test\",\"\",\"MigrationService:Evening 14\"\r\n";

    #[test]
    fn a_get_migration_user_export_moves_only_completed_users() {
        let r = parse(MIGRATION_USERS.as_bytes(), "users.csv", &states(), "cloud").unwrap();
        assert_eq!(
            r.rows
                .iter()
                .map(|r| (r.line, r.key.as_str(), r.state.index()))
                .collect::<Vec<_>>(),
            vec![(3, "john.doe@nhs.test", 0), (4, "mary@nhs.test", 0)]
        );
        assert_eq!(r.rows[0].address, "John.Doe@nhs.test");
        assert_eq!(
            r.not_completed,
            vec![
                StatusGroup {
                    status: "Failed".into(),
                    count: 2,
                    addresses: vec!["ann@nhs.test".into(), "carl@nhs.test".into()],
                },
                StatusGroup {
                    status: "Syncing".into(),
                    count: 1,
                    addresses: vec!["bob@nhs.test".into()],
                },
            ]
        );
    }

    #[test]
    fn a_get_move_request_export_takes_the_address_from_primary_smtp_or_identity() {
        // Off-boarding: completed moves go back on premises.
        let r = parse(MOVE_REQUESTS.as_bytes(), "moves.csv", &states(), "onprem").unwrap();
        assert_eq!(
            r.rows
                .iter()
                .map(|r| (r.line, r.address.as_str(), r.state.index()))
                .collect::<Vec<_>>(),
            vec![(3, "John.Doe@nhs.test", 1), (4, "mary@nhs.test", 1)]
        );
        let groups: Vec<(&str, usize)> = r
            .not_completed
            .iter()
            .map(|g| (g.status.as_str(), g.count))
            .collect();
        assert_eq!(groups, vec![("Failed", 1), ("InProgress", 1)]);
    }

    #[test]
    fn a_row_without_an_address_refuses_the_file_with_its_line() {
        let text = MIGRATION_USERS.replace(
            "\"bob@nhs.test\",\"Evening 14\",\"bob@nhs.test\"",
            "\"8f1c2a3e-5b6d-4e7f-9a0b-1c2d3e4f5a6b\",\"Evening 14\",\"\"",
        );
        let e = parse(text.as_bytes(), "users.csv", &states(), "cloud")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "users.csv:6: no address: EmailAddress is empty, \
             Identity \"8f1c2a3e-5b6d-4e7f-9a0b-1c2d3e4f5a6b\" is not an address"
        );
        let text =
            MOVE_REQUESTS.replace("\"NHS\\msmith\",\"mary@nhs.test\"", "\"NHS\\msmith\",\"\"");
        let e = parse(text.as_bytes(), "moves.csv", &states(), "cloud")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("moves.csv:4: no address") && e.contains("\"NHS\\\\msmith\""),
            "{e}"
        );
    }

    #[test]
    fn bad_rows_and_headers_are_refused() {
        let e = parse(
            b"#TYPE x\r\n\"EmailAddress\",\"Status\"\r\n\"a@nhs.test\",\"\"\r\n",
            "r.csv",
            &states(),
            "cloud",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "r.csv:3: no status for a@nhs.test (column status)");
        let e = parse(
            b"\"EmailAddress\",\"Status\"\r\n\"not an address\",\"Failed\"\r\n",
            "r.csv",
            &states(),
            "cloud",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("r.csv:2: bad address \"not an address\" in emailaddress"),
            "{e}"
        );
        // A New-MigrationBatch CSV has no status: it is not a report.
        let e = parse(
            b"EmailAddress\r\na@nhs.test\r\n",
            "r.csv",
            &states(),
            "cloud",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("r.csv:1: no `Status`"), "{e}");
        let e = parse(
            b"\"Name\",\"Status\"\r\n\"x\",\"Completed\"\r\n",
            "r.csv",
            &states(),
            "cloud",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("r.csv:1: no `EmailAddress`"), "{e}");
        let e = parse(b"EmailAddress,Status\r\n", "r.csv", &states(), "exo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown state \"exo\""), "{e}");
        let e = parse(b"\xFF\xFEE\x00", "r.csv", &states(), "cloud")
            .unwrap_err()
            .to_string();
        assert!(e.contains("UTF-16"), "{e}");
    }

    #[test]
    fn at_most_twenty_addresses_are_listed_per_status() {
        let mut text = String::from("EmailAddress,Status\n");
        for i in 0..25 {
            text.push_str(&format!("u{i}@nhs.test,Syncing\n"));
        }
        let r = parse(text.as_bytes(), "r.csv", &states(), "cloud").unwrap();
        assert!(r.rows.is_empty());
        assert_eq!(r.not_completed[0].count, 25);
        assert_eq!(r.not_completed[0].addresses.len(), LISTED_PER_STATUS);
    }
}
