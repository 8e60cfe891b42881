//! Errors of the `atlas` store, and scrubbing credentials out of driver error texts.
//!
//! The connection string carries the password. The driver may quote it (or the whole URI) in an
//! error, so driver errors are turned into text, scrubbed, and only that text is kept: the
//! driver's error is deliberately NOT kept as `#[source]`, whose `Display` would bypass the
//! scrubbing in any error chain printer.

use std::path::PathBuf;

use prompter_core::error::PluginError;

/// Why an `atlas` store could not be opened, searched or filled.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum AtlasError {
    /// A config value cannot work.
    #[error("knowledge store `{store}`: {message}")]
    Config {
        /// The store.
        store: String,
        /// The key in the store's `config:` map.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A MongoDB operation failed.
    #[error("knowledge store `{store}`: {operation} failed: {message}")]
    Mongo {
        /// The store.
        store: String,
        /// What was being done (`connecting`, `the \`$vectorSearch\` aggregation`, ...).
        operation: String,
        /// The driver's error text, with credentials removed.
        message: String,
    },
    /// The embedder failed to embed a query.
    #[error("knowledge store `{store}`: embedding the query with `{embedder}` failed: {source}")]
    QueryEmbedding {
        /// The store.
        store: String,
        /// The embedder's name.
        embedder: String,
        /// The embedder's error.
        #[source]
        source: PluginError,
    },
    /// The embedder failed during an ingest; rows written before stay written (a re-run
    /// resumes).
    #[error(
        "knowledge store `{store}`: embedding failed after {saved} new rows were saved (a re-run resumes): {source}"
    )]
    Embedding {
        /// The store.
        store: String,
        /// Rows embedded and written before the failure.
        saved: usize,
        /// The embedder's error.
        #[source]
        source: PluginError,
    },
    /// The embedder answered vectors of different lengths (or none).
    #[error(
        "the embedder `{embedder}` answered {got}-dimensional vectors where {want} were expected"
    )]
    DimsMismatch {
        /// The embedder's id.
        embedder: String,
        /// Expected length.
        want: usize,
        /// Received length.
        got: usize,
    },
    /// The knowledge-base file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CSV is malformed.
    #[error("`{}` line {line}: {message}", path.display())]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The 1-based line of the CSV where the problem is.
        line: u64,
        /// What is wrong.
        message: String,
        /// The parser's error, when the parser found it.
        #[source]
        source: Option<csv::Error>,
    },
    /// The CSV has a header but no rows.
    #[error("`{}` has no documents: add rows below the header", path.display())]
    EmptyKnowledgeBase {
        /// The CSV file.
        path: PathBuf,
    },
    /// The Vector Search index did not become queryable in time.
    #[error(
        "knowledge store `{store}`: Vector Search index `{index}` is not queryable after {waited_secs} s (status `{status}`)"
    )]
    IndexNotReady {
        /// The store.
        store: String,
        /// The index name.
        index: String,
        /// How long was waited.
        waited_secs: u64,
        /// The last status Atlas reported (`missing` when the index does not exist).
        status: String,
    },
}

impl AtlasError {
    /// The `config:` key an error is about, for pointing at it in the engine config: the
    /// problem's key for [`AtlasError::Config`], `uri` for connection failures, else `None`.
    pub fn config_key(&self) -> Option<&'static str> {
        match self {
            AtlasError::Config { key, .. } => Some(key),
            AtlasError::Mongo { operation, .. } if operation == OP_CONNECT => Some("uri"),
            _ => None,
        }
    }
}

/// The `operation` of a failure to build the client (resolving `mongodb+srv://`, parsing).
pub(crate) const OP_CONNECT: &str = "connecting";

impl From<AtlasError> for PluginError {
    fn from(e: AtlasError) -> Self {
        match e {
            AtlasError::Config { .. } => PluginError::config(e.to_string()),
            AtlasError::Csv { .. } | AtlasError::EmptyKnowledgeBase { .. } => {
                PluginError::input(e.to_string()).with_source(e)
            }
            AtlasError::Io { .. } => PluginError::input(e.to_string()).with_source(e),
            _ => PluginError::external(e.to_string()).with_source(e),
        }
    }
}

/// Removes a connection string's credentials from texts: the URI itself, its user-info part,
/// its password (as written and percent-decoded), and the user-info of any other
/// `mongodb://` / `mongodb+srv://` URI in the text.
#[derive(Clone, Default)]
pub(crate) struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    /// A scrubber for `uri`.
    pub(crate) fn new(uri: &str) -> Self {
        let mut secrets = vec![uri.to_owned()];
        if let Some((_, rest)) = uri.split_once("://") {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                secrets.push(userinfo.to_owned());
                if let Some((_, password)) = userinfo.split_once(':') {
                    secrets.push(password.to_owned());
                    secrets.push(percent_decode(password));
                }
            }
        }
        // Longest first, so a password inside the user-info does not break its replacement;
        // very short strings would mangle ordinary words and are covered by the URI rule.
        secrets.retain(|s| s.len() >= 4);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Scrubber { secrets }
    }

    /// `text` without the credentials.
    pub(crate) fn clean(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        scrub_uris(&out)
    }
}

/// Replaces the user-info of every `mongodb[+srv]://user:pass@host` in `text` with `***`.
fn scrub_uris(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("mongodb") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let scheme_len = if from.starts_with("mongodb+srv://") {
            "mongodb+srv://".len()
        } else if from.starts_with("mongodb://") {
            "mongodb://".len()
        } else {
            out.push_str("mongodb");
            rest = &from["mongodb".len()..];
            continue;
        };
        let (scheme, after) = from.split_at(scheme_len);
        out.push_str(scheme);
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '`' | '"' | '\''))
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(i) => {
                out.push_str("***");
                out.push_str(&authority[i..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_scrubbed_from_any_text() {
        let uri =
            "mongodb+srv://rta-app:p%40ss%3Aw0rd!@cluster0.ab12c.mongodb.net/?retryWrites=true";
        let s = Scrubber::new(uri);
        let texts = [
            format!("failed to connect to {uri}"),
            "SCRAM failure for rta-app:p%40ss%3Aw0rd! at host".to_owned(),
            "bad password p@ss:w0rd! given".to_owned(),
            "see mongodb://other:Secret99@h1:27017,h2/db and `mongodb+srv://x:y@z`".to_owned(),
        ];
        let cleaned: Vec<String> = texts.iter().map(|t| s.clean(t)).collect();
        for c in &cleaned {
            for secret in ["p%40ss", "p@ss", "w0rd", "Secret99", "x:y@"] {
                assert!(!c.contains(secret), "{c}");
            }
        }
        assert_eq!(cleaned[0], "failed to connect to ***");
        assert_eq!(cleaned[2], "bad password *** given");
        assert_eq!(
            cleaned[3],
            "see mongodb://***@h1:27017,h2/db and `mongodb+srv://***@z`"
        );
        // Texts without credentials are left alone.
        let plain = "mongodb://localhost:27017: connection refused (mongodb is down)";
        assert_eq!(s.clean(plain), plain);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%zz"), "A%zz");
    }

    #[test]
    fn errors_map_to_plugin_errors_by_kind() {
        let e = AtlasError::Mongo {
            store: "sales".into(),
            operation: OP_CONNECT.into(),
            message: "no such host".into(),
        };
        assert_eq!(e.config_key(), Some("uri"));
        let p = PluginError::from(e);
        assert_eq!(p.kind, prompter_core::error::ErrorKind::External);
        assert_eq!(
            p.message,
            "knowledge store `sales`: connecting failed: no such host"
        );
        let e = AtlasError::Config {
            store: "sales".into(),
            key: "num_candidates",
            message: "`num_candidates` must be between 1 and 10000, got 0".into(),
        };
        assert_eq!(e.config_key(), Some("num_candidates"));
        assert_eq!(
            PluginError::from(e).kind,
            prompter_core::error::ErrorKind::Config
        );
    }
}
