//! A deliberately misbehaving stage for the engine's sandbox tests.
//!
//! The event's text picks the misbehaviour:
//!
//! | text     | behaviour |
//! | -------- | --------- |
//! | `loop`   | spins forever (the engine must interrupt it: epoch/fuel deadline) |
//! | `memory` | allocates 1 MiB blocks without bound until allocation fails (memory limit) |
//! | `trap`   | panics, which is a trap on wasm |
//! | `http`   | fetches `http://forbidden.example/` and returns what it got (the host must deny) |
//! | `fetch URL` | fetches URL and returns `{"fetched", "status", "body"}` or the error (grants) |
//! | `huge`   | returns an 8 MiB output (output size limit) |
//! | `kv`     | increments kv `count` and returns `{"count": n}` |
//! | `search STORE` | searches knowledge store STORE; returns `{"searched", "texts"}` or the error (grants) |
//! | `ask PROVIDER` | asks LLM provider PROVIDER; returns `{"asked", "answer"}` or the error (grants) |
//! | other    | returns `{"ok": true, "text": text}` |
//!
//! Config `{}`; `{"reject": true}` makes `init` fail with a config error at field `mode`.

use prompter_sdk::http::{self, Request};
use prompter_sdk::prelude::*;
use prompter_sdk::{knowledge, llm};
use serde_json::json;

/// `{}`, or `{"reject": true}` to fail `init`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Fail `init` with a config error.
    pub reject: bool,
}

/// The hostile stage.
pub struct Hostile;

/// Spins forever.
fn spin() -> ! {
    let mut i: u64 = 0;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
    }
}

/// Allocates 1 MiB blocks, touching every page, until an allocation fails. A failed allocation
/// aborts, which on wasm is a trap right after the host refused to grow the memory.
fn exhaust_memory() -> ! {
    const BLOCK: usize = 1 << 20;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; BLOCK];
        for i in (0..BLOCK).step_by(4096) {
            block[i] = (i % 251) as u8;
        }
        blocks.push(std::hint::black_box(block));
    }
}

impl Plugin for Hostile {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.reject {
            return Err(Error::config_at(
                "mode",
                "the hostile plugin was told to reject its config",
            ));
        }
        Ok(Hostile)
    }

    fn process(&mut self, event: &Event, _conversation: &Conversation) -> Result<Outcome, Error> {
        let text = event.message().map_or("", |m| m.text.as_str());
        Ok(match text {
            "loop" => spin(),
            "memory" => exhaust_memory(),
            "trap" => panic!("hostile plugin trapped on purpose"),
            "http" => match http::fetch(&Request::get("http://forbidden.example/")) {
                Ok(r) => {
                    Outcome::next(json!({ "fetched": true, "status": r.status, "body": r.text() }))
                }
                Err(e) => Outcome::next(json!({ "fetched": false, "error": e })),
            },
            fetch if fetch.starts_with("fetch ") => {
                match http::fetch(&Request::get(fetch.trim_start_matches("fetch ").trim())) {
                    Ok(r) => Outcome::next(
                        json!({ "fetched": true, "status": r.status, "body": r.text() }),
                    ),
                    Err(e) => Outcome::next(json!({ "fetched": false, "error": e })),
                }
            }
            search if search.starts_with("search ") => {
                match knowledge::search(search.trim_start_matches("search ").trim(), "budget", 2) {
                    Ok(docs) => {
                        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
                        Outcome::next(json!({ "searched": true, "texts": texts }))
                    }
                    Err(e) => Outcome::next(json!({ "searched": false, "error": e })),
                }
            }
            ask if ask.starts_with("ask ") => {
                match llm::ask(ask.trim_start_matches("ask ").trim(), "Be brief.", "Hello?") {
                    Ok(answer) => Outcome::next(json!({ "asked": true, "answer": answer })),
                    Err(e) => Outcome::next(json!({ "asked": false, "error": e })),
                }
            }
            "huge" => Outcome::next(json!({ "blob": "x".repeat(8 * 1024 * 1024) })),
            "kv" => {
                let n = kv::get_json::<u64>("count").unwrap_or(0) + 1;
                kv::set_json("count", &n).map_err(Error::external)?;
                Outcome::next(json!({ "count": n }))
            }
            other => Outcome::next(json!({ "ok": true, "text": other })),
        })
    }
}

export_plugin!(Hostile);

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_sdk::testing::{self, Harness};

    fn say(h: &mut Harness<Hostile>, text: &str) -> Outcome {
        h.say(1_000, "Tester", None, text, None).unwrap()
    }

    #[test]
    fn benign_paths() {
        let mut h = Harness::<Hostile>::new(json!({})).unwrap();
        assert_eq!(
            say(&mut h, "hello").output(),
            Some(&json!({"ok": true, "text": "hello"}))
        );
        assert_eq!(say(&mut h, "kv").output(), Some(&json!({"count": 1})));
        h.recycle().unwrap();
        assert_eq!(say(&mut h, "kv").output(), Some(&json!({"count": 2})));
        let out = say(&mut h, "http");
        assert_eq!(out.output().unwrap()["fetched"], false);
        let out = say(&mut h, "huge");
        assert_eq!(
            out.output().unwrap()["blob"].as_str().unwrap().len(),
            8 << 20
        );
    }

    #[test]
    fn knowledge_and_chat_answers_and_errors_reach_the_output() {
        let mut h = Harness::<Hostile>::new(json!({})).unwrap();
        testing::mock_knowledge(|store, _query, _k| match store {
            "sales" => Ok(vec![knowledge::Document::new(
                "1",
                "No budget: offer a pilot.",
                0.9,
            )]),
            other => Err(format!("no grant for `{other}`")),
        });
        testing::mock_chat(|provider, _system, _messages| Ok(format!("hi from {provider}")));
        assert_eq!(
            say(&mut h, "search sales").output(),
            Some(&json!({"searched": true, "texts": ["No budget: offer a pilot."]}))
        );
        assert_eq!(
            say(&mut h, "search hr").output(),
            Some(&json!({"searched": false, "error": "no grant for `hr`"}))
        );
        assert_eq!(
            say(&mut h, "ask nebula").output(),
            Some(&json!({"asked": true, "answer": "hi from nebula"}))
        );
    }

    #[test]
    fn rejects_config() {
        let e = testing::init::<Hostile>(json!({"reject": true}))
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Config);
        assert_eq!(e.field.as_deref(), Some("mode"));
        assert!(testing::init::<Hostile>(json!({"reject": false})).is_ok());
        assert!(testing::init::<Hostile>(serde_json::Value::Null).is_ok());
    }

    #[test]
    #[should_panic(expected = "hostile plugin trapped on purpose")]
    fn traps() {
        let mut h = Harness::<Hostile>::new(json!({})).unwrap();
        say(&mut h, "trap");
    }
}
