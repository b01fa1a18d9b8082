//! Migration batch files: our CSV (`address,state`) or the CSV Exchange admins feed to
//! `New-MigrationBatch` (header `EmailAddress`, other columns ignored).

use super::table::{names, CsvRows};
use super::{DirectoryError, StateId};
use crate::types::{Address, RouteName};

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
