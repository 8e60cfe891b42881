//! Reading a knowledge-base CSV into rows, and the rows' stable ids.
//!
//! The rules are the embedded store's (`prompter-plugin-retrieve`), whose reader is private:
//! a header with at least two columns, then one document per row, the first column the text
//! (objection), the second the data (guidance), fields trimmed, extra columns ignored. The id
//! rule is the same too, so a row has the same id in both stores.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::AtlasError;

/// One knowledge-base row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// [`document_id`] of text and data.
    pub id: String,
    /// The text that is embedded and searched (first column).
    pub text: String,
    /// The data returned with it (second column).
    pub data: String,
}

/// The distinct rows of the CSV at `path`, in file order (a repeated row is kept once).
///
/// # Errors
/// The file cannot be read, the CSV is malformed (naming the file and line), or has no rows.
pub fn read_csv(path: &Path) -> Result<Vec<Row>, AtlasError> {
    let bytes = fs::read(path).map_err(|e| AtlasError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    read_rows(path, &bytes)
}

/// Like [`read_csv`] over bytes already read; `path` names them in errors.
///
/// # Errors
/// The CSV is malformed (naming `path` and the line) or has no rows.
pub fn read_rows(path: &Path, bytes: &[u8]) -> Result<Vec<Row>, AtlasError> {
    let csv_error = |line: u64, message: String, source: Option<csv::Error>| AtlasError::Csv {
        path: path.to_owned(),
        line,
        message,
        source,
    };
    let parse_error = |e: csv::Error| {
        let line = e.position().map_or(1, csv::Position::line);
        csv_error(line, format!("malformed CSV: {e}"), Some(e))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let header = reader.headers().map_err(parse_error)?;
    if header.len() < 2 {
        return Err(csv_error(
            1,
            format!(
                "expected a header with at least 2 columns (`objection,guidance`), found {}",
                header.len()
            ),
            None,
        ));
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for record in reader.records() {
        let record = record.map_err(parse_error)?;
        let line = record.position().map_or(0, csv::Position::line);
        let text = record.get(0).unwrap_or_default();
        match record.get(1) {
            None => {
                return Err(csv_error(
                    line,
                    format!(
                        "expected 2 columns (text, data), found {}; quote fields that contain commas",
                        record.len()
                    ),
                    None,
                ));
            }
            Some(_) if text.is_empty() => {
                return Err(csv_error(
                    line,
                    "the first column (text) is empty".into(),
                    None,
                ));
            }
            Some(data) => {
                let id = document_id(text, data);
                if seen.insert(id.clone()) {
                    rows.push(Row {
                        id,
                        text: text.to_owned(),
                        data: data.to_owned(),
                    });
                }
            }
        }
    }
    if rows.is_empty() {
        return Err(AtlasError::EmptyKnowledgeBase {
            path: path.to_owned(),
        });
    }
    Ok(rows)
}

/// A stable id for a row: the first 12 hex characters of sha256 of its text, the byte 0x1f and
/// its data, so ids survive reordering the CSV (the embedded store's rule).
///
/// # Examples
/// ```
/// assert_eq!(prompter_store_atlas::document_id("a", "b"), "f04cdced9736");
/// ```
pub fn document_id(text: &str, data: &str) -> String {
    use std::fmt::Write as _;
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    // A separator that cannot appear in trimmed CSV text, so ("ab", "c") and ("a", "bc") differ.
    h.update([0x1f]);
    h.update(data.as_bytes());
    h.finalize()[..6]
        .iter()
        .fold(String::with_capacity(12), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(csv: &str) -> Result<Vec<Row>, AtlasError> {
        read_rows(Path::new("kb.csv"), csv.as_bytes())
    }

    #[test]
    fn rows_are_trimmed_deduplicated_and_extra_columns_ignored() {
        let r = rows("objection,guidance,notes\n Budget: too expensive ,\"Offer a pilot, phased.\",x\nTiming,Agree on a date.\nTiming,Agree on a date.\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].text, "Budget: too expensive");
        assert_eq!(r[0].data, "Offer a pilot, phased.");
        assert_eq!(r[0].id, document_id(&r[0].text, &r[0].data));
        assert_eq!(r[1].text, "Timing");
    }

    #[test]
    fn ids_match_the_embedded_store_rule() {
        // sha256("a\x1fb") = f04cdced9736...; the separator keeps ("ab","c") != ("a","bc").
        assert_eq!(document_id("a", "b"), "f04cdced9736");
        assert_ne!(document_id("ab", "c"), document_id("a", "bc"));
        assert_eq!(document_id("x", "y").len(), 12);
    }

    #[test]
    fn malformed_csvs_are_errors_naming_file_and_line() {
        let err = rows("objection,guidance\n\"Budget\",\"Offer a pilot.\"\nonly one column\n")
            .unwrap_err();
        assert!(matches!(err, AtlasError::Csv { line: 3, .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("`kb.csv` line 3: expected 2 columns"),
            "{err}"
        );
        let err = rows("objection,guidance\n\"\",\"Offer a pilot.\"\n").unwrap_err();
        assert!(matches!(err, AtlasError::Csv { line: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("text) is empty"), "{err}");
        let err = rows("objection\nBudget\n").unwrap_err();
        assert!(
            err.to_string().contains("line 1: expected a header"),
            "{err}"
        );
        let err = rows("a,b\n\"unterminated,x\n").unwrap_err();
        assert!(matches!(err, AtlasError::Csv { .. }), "{err:?}");
        let err = rows("objection,guidance\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`kb.csv` has no documents: add rows below the header"
        );
        let err = read_csv(Path::new("/nonexistent/kb.csv")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read `/nonexistent/kb.csv`"),
            "{err}"
        );
    }
}
