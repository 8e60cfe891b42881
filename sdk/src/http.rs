//! Outbound HTTP through the engine.
//!
//! The engine performs the request, and only to hosts listed in the stage's `allow_hosts`;
//! anything else fails with the engine's reason. Outside the engine every fetch fails unless a
//! test installs a mock with [`testing::mock_http`](crate::testing::mock_http).
//!
//! ```no_run
//! use prompter_sdk::http::{self, Request};
//! use serde_json::json;
//!
//! let response = http::fetch(
//!     &Request::post("https://crm.example.com/api/notes")
//!         .header("accept", "application/json")
//!         .json(&json!({ "note": "customer asked for a callback" })),
//! )?;
//! if !response.is_success() {
//!     return Err(format!("CRM answered {}", response.status));
//! }
//! let body: serde_json::Value = response.json()?;
//! # let _ = body;
//! # Ok::<(), String>(())
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bindings::prompter::plugin::host;

/// An HTTP request: `method`, `url`, `headers`, optional `body`. Build one with [`Request::get`],
/// [`Request::post`] or [`Request::new`].
pub use host::HttpRequest as Request;

/// An HTTP response: `status`, `headers`, `body`.
pub use host::HttpResponse as Response;

impl Request {
    /// A request with `method` (`GET`, `POST`, ...) to `url`.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Request {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Request::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Request::new("POST", url)
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets a JSON body and the `content-type: application/json` header.
    #[must_use]
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Self {
        // Serializing plain data (maps with string keys, numbers, ...) cannot fail; a type whose
        // Serialize impl fails gets an empty body rather than a panic.
        let body = serde_json::to_vec(value).unwrap_or_default();
        self.header("content-type", "application/json").body(body)
    }
}

impl Response {
    /// A response with `status` and `body` (for mocks).
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header (for mocks).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    ///
    /// # Errors
    /// The parse error, as text.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("response is not the JSON expected: {e}"))
    }
}

/// Performs `request` through the engine.
///
/// # Errors
/// The engine's reason: a host not in `allow_hosts`, a network failure, a timeout, ... (an HTTP
/// error status is a successful fetch: check [`Response::is_success`]).
pub fn fetch(request: &Request) -> Result<Response, String> {
    crate::sys::http_fetch(request)
}

/// `GET url`.
///
/// # Errors
/// As [`fetch`].
pub fn get(url: &str) -> Result<Response, String> {
    fetch(&Request::get(url))
}
