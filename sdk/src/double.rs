//! The native test doubles behind the host functions.
//!
//! On `wasm32` the host functions call the engine; everywhere else they land here: an in-memory
//! kv, logs to stderr (and a capture for tests), and mockable HTTP, knowledge and chat that fail
//! by default. The storage is thread-local, so parallel tests do not see each other's state.
#![cfg_attr(target_arch = "wasm32", allow(dead_code))]

use std::cell::RefCell;
use std::collections::HashMap;

use crate::http::{Request, Response};
use crate::knowledge::Document;
use crate::llm::ChatMessage;
use crate::log::Level;

pub(crate) type HttpMock = Box<dyn FnMut(&Request) -> Result<Response, String>>;
pub(crate) type KnowledgeMock = Box<dyn FnMut(&str, &str, u32) -> Result<Vec<Document>, String>>;
pub(crate) type ChatMock = Box<dyn FnMut(&str, &str, &[ChatMessage]) -> Result<String, String>>;

thread_local! {
    static KV: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static HTTP: RefCell<Option<HttpMock>> = const { RefCell::new(None) };
    static KNOWLEDGE: RefCell<Option<KnowledgeMock>> = const { RefCell::new(None) };
    static CHAT: RefCell<Option<ChatMock>> = const { RefCell::new(None) };
}

fn unavailable(what: &str) -> String {
    format!("not available outside the engine: {what} (install a mock with prompter_sdk::testing)")
}

pub(crate) fn log(level: Level, message: &str) {
    eprintln!("[{}] {message}", level.as_str());
    LOGS.with(|l| l.borrow_mut().push((level, message.to_owned())));
}

pub(crate) fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

pub(crate) fn kv_get(key: &str) -> Option<String> {
    KV.with(|kv| kv.borrow().get(key).cloned())
}

pub(crate) fn kv_set(key: &str, value: &str) -> Result<(), String> {
    KV.with(|kv| kv.borrow_mut().insert(key.to_owned(), value.to_owned()));
    Ok(())
}

pub(crate) fn kv_delete(key: &str) {
    KV.with(|kv| kv.borrow_mut().remove(key));
}

pub(crate) fn kv_reset() {
    KV.with(|kv| kv.borrow_mut().clear());
}

pub(crate) fn kv_snapshot() -> HashMap<String, String> {
    KV.with(|kv| kv.borrow().clone())
}

pub(crate) fn http_fetch(request: &Request) -> Result<Response, String> {
    HTTP.with(|m| match m.borrow_mut().as_mut() {
        Some(f) => f(request),
        None => Err(unavailable(&format!(
            "http fetch {} {}",
            request.method, request.url
        ))),
    })
}

pub(crate) fn knowledge_search(store: &str, query: &str, k: u32) -> Result<Vec<Document>, String> {
    KNOWLEDGE.with(|m| match m.borrow_mut().as_mut() {
        Some(f) => f(store, query, k),
        None => Err(unavailable(&format!("knowledge search in `{store}`"))),
    })
}

pub(crate) fn chat(
    provider: &str,
    system: &str,
    messages: &[ChatMessage],
) -> Result<String, String> {
    CHAT.with(|m| match m.borrow_mut().as_mut() {
        Some(f) => f(provider, system, messages),
        None => Err(unavailable(&format!("chat with `{provider}`"))),
    })
}

pub(crate) fn set_http(mock: Option<HttpMock>) {
    HTTP.with(|m| *m.borrow_mut() = mock);
}

pub(crate) fn set_knowledge(mock: Option<KnowledgeMock>) {
    KNOWLEDGE.with(|m| *m.borrow_mut() = mock);
}

pub(crate) fn set_chat(mock: Option<ChatMock>) {
    CHAT.with(|m| *m.borrow_mut() = mock);
}

pub(crate) fn reset() {
    kv_reset();
    take_logs();
    set_http(None);
    set_knowledge(None);
    set_chat(None);
}
