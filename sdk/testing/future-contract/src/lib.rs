//! A plugin built against a future contract version (`prompter:plugin@0.2.0`, a different shape
//! too). The engine must refuse it at load time with a message naming both versions, not with a
//! link error. Used by the engine's tests only.

#![allow(unsafe_code, reason = "generated bindings")]

wit_bindgen::generate!({ path: "wit", world: "stage" });

struct Future;

impl Guest for Future {
    fn init(_config_json: String) -> Result<(), String> {
        prompter::plugin::host::log("init");
        Ok(())
    }

    fn process(event_json: String) -> Result<String, String> {
        Ok(event_json)
    }
}

export!(Future);
