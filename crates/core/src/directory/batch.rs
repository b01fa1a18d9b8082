//! Migration batch files: our CSV (`address,state`) or the CSV Exchange admins feed to
//! `New-MigrationBatch` (header `EmailAddress`, other columns ignored), or with
//! [`BatchFormat::MigrationUsers`] an Exchange migration report (see [`super::report`]).

use super::report::{self, StatusGroup};
use super::table::{names, CsvRows};
use super::{DirectoryError, StateId};
use crate::types::{Address, RouteName};
use serde::{Deserialize, Serialize};

/// How a batch file is read (`--format`, the API's `format=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchFormat {
    /// Our CSV or a `New-MigrationBatch` CSV: every row moves ([`parse`]).
    #[default]
    Auto,
    /// A `Get-MigrationUser` or `Get-MoveRequest` export: only completed users move, to
    /// the target state or [`BatchFormat::DEFAULT_REPORT_TARGET`] ([`report::parse`]).
    MigrationUsers,
}

impl BatchFormat {
    /// Where a migration report moves its completed users when no target state is given.
    pub const DEFAULT_REPORT_TARGET: &'static str = "cloud";

    /// The name used on the command line and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchFormat::Auto => "auto",
            BatchFormat::MigrationUsers => "migration-users",
        }
    }
}

impl std::fmt::Display for BatchFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A batch format name that is none of [`BatchFormat`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown batch format {0:?} (formats: auto, migration-users)")]
pub struct UnknownFormat(pub String);

impl std::str::FromStr for BatchFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<BatchFormat, UnknownFormat> {
        match s {
            "auto" => Ok(BatchFormat::Auto),
            "migration-users" => Ok(BatchFormat::MigrationUsers),
            _ => Err(UnknownFormat(s.to_string())),
        }
    }
}

/// A batch file read in some [`BatchFormat`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// The rows to apply.
    pub rows: Vec<BatchRow>,
    /// For a migration report: the users not completed, by status, left as they are
    /// (`None` for other formats).
    pub not_completed: Option<Vec<StatusGroup>>,
}

/// Reads a batch file in `format`. `target` as for [`parse`]; a migration report moves its
/// completed users to `target`, else to [`BatchFormat::DEFAULT_REPORT_TARGET`].
pub fn read(
    format: BatchFormat,
    text: &[u8],
    file: &str,
    states: &[RouteName],
    target: Option<&str>,
) -> Result<Batch, DirectoryError> {
    match format {
        BatchFormat::Auto => Ok(Batch {
            rows: parse(text, file, states, target)?,
            not_completed: None,
        }),
        BatchFormat::MigrationUsers => {
            let target = target.unwrap_or(BatchFormat::DEFAULT_REPORT_TARGET);
            let r = report::parse(text, file, states, target)?;
            Ok(Batch {
                rows: r.rows,
                not_completed: Some(r.not_completed),
            })
        }
    }
}

/// One row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// 1-based line in the file.
    pub line: u64,
    /// The address as written.
    pub address: String,
    /// Lower-case directory key.
    pub key: String,
    /// Target state.
    pub state: StateId,
}

/// Parses a batch file. With `target`, every row moves to that state; without it, the file
/// needs a `state` column. A bad row refuses the whole file with its line.
pub fn parse(
    text: &[u8],
    file: &str,
    states: &[RouteName],
    target: Option<&str>,
) -> Result<Vec<BatchRow>, DirectoryError> {
    let err = |line: u64, reason: String| DirectoryError::Row {
        file: file.to_string(),
        line: line as usize,
        reason,
    };
    let state_index = |name: &str, line: u64| {
        StateId::find(states, name).ok_or_else(|| {
            err(
                line,
                format!("unknown state {name:?} (routes: {})", names(states)),
            )
        })
    };
    let target = target.map(|t| state_index(t, 0)).transpose()?;
    // Exchange exports may start with a UTF-8 byte order mark (CsvRows skips it).
    let mut records = CsvRows::new(text);
    let (_, cols) = records.header().map_err(|(l, r)| err(l, r))?;
    let addr_col = cols
        .iter()
        .position(|c| c == "emailaddress" || c == "address")
        .ok_or_else(|| {
            err(
                1,
                format!(
                    "no `EmailAddress` or `address` column in header {:?}",
                    cols.join(",")
                ),
            )
        })?;
    let state_col = cols.iter().position(|c| c == "state");
    if target.is_none() && state_col.is_none() {
        return Err(err(
            1,
            "no target state: give --state or a `state` column".into(),
        ));
    }
    let mut rows = Vec::new();
    while let Some(row) = records.next_row() {
        let (line, rec) = row.map_err(|(l, r)| err(l, r))?;
        let field = rec
            .get(addr_col)
            .ok_or_else(|| err(line, format!("missing address column {}", addr_col + 1)))?;
        let text =
            std::str::from_utf8(field).map_err(|_| err(line, "address is not UTF-8".into()))?;
        let addr = Address::parse(text, true)
            .map_err(|e| err(line, format!("bad address {text:?}: {e}")))?;
        let state = match target {
            Some(t) => t,
            None => {
                let f = state_col.and_then(|c| rec.get(c)).unwrap_or_default();
                state_index(&String::from_utf8_lossy(f), line)?
            }
        };
        rows.push(BatchRow {
            line,
            address: text.to_string(),
            key: addr.key(),
            state,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    #[test]
    fn reads_exchange_migration_csv() {
        let text = "\u{feff}EmailAddress,BadItemLimit,Notes\r\nJohn@NHS.test,10,\"Doe, John\"\r\nmary@nhs.test,,\r\n";
        let rows = parse(text.as_bytes(), "b.csv", &states(), Some("cloud")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key, "john@nhs.test");
        assert_eq!((rows[1].line, rows[1].state.index()), (3, 0));
        let rows = parse(
            b"EmailAddress\r\n\r\n# note\r\na@nhs.test\r\nbad\r\n",
            "b.csv",
            &states(),
            Some("cloud"),
        );
        assert!(rows
            .unwrap_err()
            .to_string()
            .starts_with("b.csv:5: bad address"));
    }

    #[test]
    fn the_format_decides_how_a_file_is_read() {
        let text = b"#TYPE Microsoft.Exchange.Data.Storage.Management.MigrationUser\r\n\
            \"EmailAddress\",\"Status\"\r\n\"a@nhs.test\",\"Completed\"\r\n\"b@nhs.test\",\"Failed\"\r\n";
        // Today's reading moves everyone listed, failed or not.
        let all = read(BatchFormat::Auto, text, "r.csv", &states(), Some("cloud")).unwrap();
        assert_eq!((all.rows.len(), all.not_completed), (2, None));
        // A report moves the completed users, to `cloud` unless told otherwise.
        let r = read(BatchFormat::MigrationUsers, text, "r.csv", &states(), None).unwrap();
        assert_eq!(r.rows.len(), 1);
        assert_eq!(
            (r.rows[0].key.as_str(), r.rows[0].state.index()),
            ("a@nhs.test", 0)
        );
        assert_eq!(r.not_completed.unwrap()[0].status, "Failed");
        let r = read(
            BatchFormat::MigrationUsers,
            text,
            "r.csv",
            &states(),
            Some("onprem"),
        )
        .unwrap();
        assert_eq!(r.rows[0].state.index(), 1);
        for f in [BatchFormat::Auto, BatchFormat::MigrationUsers] {
            assert_eq!(f.as_str().parse::<BatchFormat>(), Ok(f));
        }
        assert!("csv".parse::<BatchFormat>().is_err());
    }

    #[test]
    fn reads_our_csv_and_refuses_bad_rows() {
        let rows = parse(
            b"address,state\na@nhs.test,onprem\n",
            "b.csv",
            &states(),
            None,
        )
        .unwrap();
        assert_eq!(rows[0].state.index(), 1);
        let e = parse(
            b"EmailAddress\na@nhs.test\nnot-an-address\n",
            "b.csv",
            &states(),
            Some("cloud"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("b.csv:3: bad address"), "{e}");
        let e = parse(b"EmailAddress\na@nhs.test\n", "b.csv", &states(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no target state"), "{e}");
        let e = parse(b"Name\nx\n", "b.csv", &states(), Some("cloud"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("b.csv:1: no `EmailAddress`"), "{e}");
        let e = parse(
            b"EmailAddress\na@nhs.test\n",
            "b.csv",
            &states(),
            Some("mars"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown state \"mars\""), "{e}");
    }
}
