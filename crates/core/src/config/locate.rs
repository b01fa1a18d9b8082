//! Finding where a key is in the TOML text, so that errors name its line: from a byte
//! offset (serde's errors) or from a table and key name (the checks in `validate`).

/// Line (1-based) and dotted key path at a byte offset of TOML text.
pub(super) fn locate(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let mut table = String::new();
    for l in before.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let key = match line.split_once('=') {
        Some((k, _)) if !line.trim_start().starts_with('[') => k.trim().to_string(),
        _ => String::new(),
    };
    let path = match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    };
    (line_no, path)
}

/// Line (1-based) of `key` inside `[table]`, or of the table header; 0 if absent.
pub(super) fn find_key(text: &str, table: &str, key: &str) -> usize {
    let mut in_table = false;
    let mut header_line = 0;
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = name == table;
            if in_table {
                header_line = i + 1;
            }
            if name.starts_with(&format!("{table}.")) && header_line == 0 {
                header_line = i + 1;
            }
        } else if in_table && !key.is_empty() {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == key {
                    return i + 1;
                }
            }
        }
    }
    header_line
}
