//! What a plugin instance's store holds, and the host functions plugins import: logging, the
//! per-conversation key-value space (kept by the engine: see `kv.rs`), mediated HTTP,
//! knowledge search and chat.
//!
//! Secrets never cross into the guest: HTTP goes through the engine's client (only to granted
//! hosts), and knowledge stores and LLM providers (only the granted ones) keep their keys on the
//! host side.

use std::sync::Arc;
use std::time::Instant;

use prompter_core::plugin::Resources;
use prompter_core::resource::{ChatMessage, ChatRequest, Role};
use wasmtime::{ResourceLimiter, component::ResourceTable};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::host::{
    self, ChatMessage as WitChatMessage, Document, HttpRequest, HttpResponse, LogLevel,
};
use super::kv::Kv;
use super::plugin::{Grants, Metrics};

/// Largest HTTP response body handed to a plugin.
const HTTP_MAX_BODY_BYTES: usize = 1024 * 1024;
/// What a guest may write to stderr (panic messages) before it is cut.
pub(crate) const STDERR_CAPACITY: usize = 16 * 1024;

/// What the host knows about the call in progress.
#[derive(Debug, Default, Clone)]
pub(crate) struct CallInfo {
    pub(crate) conversation: String,
    pub(crate) deadline: Option<Instant>,
}

/// The sandbox's memory limiter: records the high-water mark and whether growth was refused.
#[derive(Debug)]
pub(crate) struct Limiter {
    pub(crate) max_bytes: usize,
    pub(crate) peak_bytes: usize,
    pub(crate) denied: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.peak_bytes = self.peak_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The data of one plugin instance's store.
pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) stderr: MemoryOutputPipe,
    /// How much of `stderr` was written before the current call.
    pub(crate) stderr_mark: usize,
    pub(crate) stage: Arc<str>,
    /// The key-value space of the call in progress; `None` outside `process` (during `init`
    /// there is no conversation).
    pub(crate) kv: Option<Kv>,
    pub(crate) allow_hosts: Arc<Vec<String>>,
    pub(crate) grants: Arc<Grants>,
    /// The stage's metrics (refused host calls are counted here).
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) resources: Resources,
    pub(crate) http: reqwest::Client,
    pub(crate) call: CallInfo,
    /// Set when the plugin tried something its grants do not allow; the call then fails.
    pub(crate) violation: Option<String>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl super::bindings::types::Host for HostState {}

/// Whether `host` (and port) is granted by `allow`: exact host, `host:port`, or `*.domain`.
pub(crate) fn host_allowed(allow: &[String], host: &str, port: Option<u16>) -> bool {
    let host = host.to_ascii_lowercase();
    allow.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        if let Some(suffix) = a.strip_prefix("*.") {
            return host.ends_with(&format!(".{suffix}"));
        }
        match (a.rsplit_once(':'), port) {
            (Some((h, p)), Some(port)) if p.parse::<u16>().ok() == Some(port) => h == host,
            (Some((_, p)), _) if p.parse::<u16>().is_ok() => false,
            _ => a == host,
        }
    })
}

/// A grant key of a wasm stage, for refusals.
#[derive(Debug, Clone, Copy)]
enum Grant {
    Knowledge,
    Llm,
}

impl Grant {
    fn key(self) -> &'static str {
        match self {
            Grant::Knowledge => "allow_knowledge",
            Grant::Llm => "allow_llm",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Grant::Knowledge => "knowledge store",
            Grant::Llm => "llm provider",
        }
    }
}

impl HostState {
    /// Refuses a call to `name`, which the stage was not granted: counts and logs it (the name
    /// only; never the query or the prompt) and returns the error the guest gets.
    ///
    /// The name is checked against the grant before anything else, so an ungranted plugin
    /// learns nothing about which stores or providers exist.
    fn deny(&self, grant: Grant, name: &str) -> String {
        let name: String = name.chars().take(64).collect();
        let stage = &*self.stage;
        let conversation = &self.call.conversation;
        let (key, what) = (grant.key(), grant.what());
        if self.metrics.grant_denied() {
            tracing::warn!(stage, conversation, grant = key, name = %name, "Refused a plugin call to a {what} the stage is not granted; later refusals are logged at debug.");
        } else {
            tracing::debug!(stage, conversation, grant = key, name = %name, "Refused a plugin call to a {what} the stage is not granted.");
        }
        format!("stage `{stage}` has no grant for {what} `{name}`: add it to the stage's `{key}`")
    }
}

impl host::Host for HostState {
    async fn log(&mut self, level: LogLevel, message: String) {
        let stage = &*self.stage;
        let conversation = &self.call.conversation;
        let message: String = message.chars().take(4096).collect();
        match level {
            LogLevel::Trace => {
                tracing::trace!(stage, conversation, plugin_message = %message, "Plugin log.")
            }
            LogLevel::Debug => {
                tracing::debug!(stage, conversation, plugin_message = %message, "Plugin log.")
            }
            LogLevel::Info => {
                tracing::info!(stage, conversation, plugin_message = %message, "Plugin log.")
            }
            LogLevel::Warn => {
                tracing::warn!(stage, conversation, plugin_message = %message, "Plugin log.")
            }
            LogLevel::Error => {
                tracing::error!(stage, conversation, plugin_message = %message, "Plugin log.")
            }
        }
    }

    async fn kv_get(&mut self, key: String) -> Option<String> {
        self.kv.as_ref()?.get(&key)
    }

    async fn kv_set(&mut self, key: String, value: String) -> Result<(), String> {
        self.kv
            .as_mut()
            .ok_or_else(|| "kv is only available while processing an event".to_owned())?
            .set(key, value)
    }

    async fn kv_delete(&mut self, key: String) {
        if let Some(kv) = self.kv.as_mut() {
            kv.delete(key);
        }
    }

    async fn http_fetch(&mut self, request: HttpRequest) -> Result<HttpResponse, String> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| format!("bad url `{}`: {e}", request.url))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "scheme `{}` is not allowed (http and https only)",
                url.scheme()
            ));
        }
        if !host_allowed(&self.allow_hosts, &host, url.port_or_known_default()) {
            let msg = format!("host `{host}` is not in this stage's `allow_hosts`");
            self.violation = Some(format!("called {host}, which is not in `allow_hosts`"));
            return Err(msg);
        }
        let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("bad method `{}`", request.method))?;
        let mut req = self.http.request(method, url);
        for (k, v) in &request.headers {
            req = req.header(k, v);
        }
        if let Some(body) = request.body {
            req = req.body(body);
        }
        if let Some(deadline) = self.call.deadline {
            req = req.timeout(deadline.saturating_duration_since(Instant::now()));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| format!("request to `{host}` failed: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading the response from `{host}` failed: {e}"))?
        {
            if body.len() + chunk.len() > HTTP_MAX_BODY_BYTES {
                return Err(format!(
                    "response from `{host}` exceeds {HTTP_MAX_BODY_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    async fn knowledge_search(
        &mut self,
        store: String,
        query: String,
        k: u32,
    ) -> Result<Vec<Document>, String> {
        if !self.grants.knowledge.contains(&store) {
            return Err(self.deny(Grant::Knowledge, &store));
        }
        let s = self
            .resources
            .knowledge
            .get(&store)
            .cloned()
            .ok_or_else(|| format!("unknown knowledge store `{store}`"))?;
        let docs = s
            .search(&query, k.clamp(1, 50) as usize)
            .await
            .map_err(|e| e.to_string())?;
        Ok(docs
            .into_iter()
            .map(|d| Document {
                id: d.id,
                text: d.text,
                data: d.data,
                score: d.score,
            })
            .collect())
    }

    async fn chat(
        &mut self,
        provider: String,
        system_prompt: String,
        messages: Vec<WitChatMessage>,
    ) -> Result<String, String> {
        if !self.grants.llm.contains(&provider) {
            return Err(self.deny(Grant::Llm, &provider));
        }
        let p = self
            .resources
            .chat
            .get(&provider)
            .cloned()
            .ok_or_else(|| format!("unknown llm provider `{provider}`"))?;
        let messages = messages
            .into_iter()
            .map(|m| ChatMessage {
                role: if m.role == "assistant" {
                    Role::Assistant
                } else {
                    Role::Human
                },
                text: m.text,
            })
            .collect();
        let request = ChatRequest {
            system_prompt,
            messages,
            context: Vec::new(),
            max_new_tokens: 1024,
            temperature: 0.0,
        };
        p.chat(&request, None)
            .await
            .map(|r| r.text)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn grants_match_hosts_ports_and_subdomains() {
        let allow = vec![
            "api.example.com".to_string(),
            "*.hooks.example".to_string(),
            "127.0.0.1:8080".to_string(),
        ];
        assert!(host_allowed(&allow, "api.example.com", Some(443)));
        assert!(host_allowed(&allow, "API.example.com", None));
        assert!(!host_allowed(&allow, "evil.example.com", Some(443)));
        assert!(host_allowed(&allow, "a.hooks.example", Some(443)));
        assert!(!host_allowed(&allow, "hooks.example", Some(443)));
        assert!(host_allowed(&allow, "127.0.0.1", Some(8080)));
        assert!(!host_allowed(&allow, "127.0.0.1", Some(9090)));
        assert!(!host_allowed(&[], "api.example.com", Some(443)));
    }
}
