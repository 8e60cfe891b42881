//! What a stage hands to the stages after it: a [`StageOutput`], the JSON that templates read as
//! `stages.<id>`, plus, for the well-known outputs of the built-in stages (documents, a chat
//! request, a reply), the same value [`Typed`], so later stages read it without parsing JSON or
//! looking fields up by name.
//!
//! A typed output builds its JSON only when something reads it (a template naming the stage, a
//! stage calling [`StageOutput::value`]); on the usual path (retrieve → prompt → chat → notify)
//! the documents and the chat request never become JSON at all. A JSON-only output (a Wasm
//! plugin's, a user stage's) serves the same accessors by reading the well-known fields, so
//! either kind of stage can feed either kind.
//!
//! [`Outputs`] holds a run's outputs in order; its [`Outputs::template_value`] is the lazy
//! `stages` object of the template context: an output is converted for templates when one first
//! reads it, once per run, however many templates the later stages render.
//!
//! It does not own running stages (the engine does) or the template language
//! ([`crate::template`]).

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use minijinja::value::{Enumerator, Object, ObjectRepr};
use serde::{Deserialize, Serialize};

use crate::error::PluginError;
use crate::resource::{ChatReply, ChatRequest, ScoredDocument};

/// One stage's output: its JSON (what templates see as `stages.<id>`) and, for a well-known
/// output, the same value typed.
///
/// Two outputs are equal when their JSON is: that is all a template can tell apart.
#[derive(Debug, Clone)]
pub struct StageOutput {
    typed: Option<Typed>,
    /// The JSON; set at construction for a JSON output, built on first read for a typed one.
    json: OnceLock<serde_json::Value>,
    /// The JSON as a template value, built on first read (once per run: the pipeline shares one
    /// [`Outputs`] among its stages).
    template: OnceLock<minijinja::Value>,
}

/// A well-known stage output, typed. Its JSON form (what templates read) is fixed per variant
/// and documented there.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Typed {
    /// Documents found for the run (the `retrieve` stage).
    /// JSON: `{"query", "documents": [{"id", "text", "data", "score"}], "degraded"?}`.
    Documents {
        /// The search text.
        query: String,
        /// The documents, best first.
        documents: Arc<[ScoredDocument]>,
        /// Why the search is degraded (ranked by words when the embedder failed, say).
        degraded: Option<String>,
    },
    /// A chat request (the `prompt` stage). JSON: the [`ChatRequest`]'s fields.
    ChatRequest(Arc<ChatRequest>),
    /// A model's answer (the `chat` stage).
    /// JSON: `{"text", "provider", "model", "degraded"?, "output"?: {"id", "version"}}`.
    Reply {
        /// The answer.
        reply: ChatReply,
        /// Why the answer is degraded (a fallback answered), if it is.
        degraded: Option<String>,
        /// The output the answer was streamed to as drafts, if it was.
        drafted: Option<Drafted>,
    },
}

/// An output delivered as drafts, which a later stage completes under the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drafted {
    /// The output's id.
    pub id: String,
    /// The version of the last draft.
    pub version: u32,
}

impl Typed {
    /// The JSON form templates read.
    fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let (mut value, degraded) = match self {
            Typed::Documents {
                query,
                documents,
                degraded,
            } => (json!({"query": query, "documents": documents}), degraded),
            Typed::ChatRequest(request) => (json!(request), &None),
            Typed::Reply {
                reply,
                degraded,
                drafted,
            } => {
                let mut v = json!(reply);
                if let Some(d) = drafted {
                    v["output"] = json!(d);
                }
                (v, degraded)
            }
        };
        if let Some(why) = degraded {
            value["degraded"] = serde_json::Value::String(why.clone());
        }
        value
    }

    /// Whether the JSON form has a top-level `field` (without building it).
    fn has_field(&self, field: &str) -> bool {
        match self {
            Typed::Documents { degraded, .. } => match field {
                "query" | "documents" => true,
                "degraded" => degraded.is_some(),
                _ => false,
            },
            Typed::ChatRequest(_) => matches!(
                field,
                "system_prompt" | "messages" | "context" | "max_new_tokens" | "temperature"
            ),
            Typed::Reply {
                degraded, drafted, ..
            } => match field {
                "text" | "provider" | "model" => true,
                "degraded" => degraded.is_some(),
                "output" => drafted.is_some(),
                _ => false,
            },
        }
    }
}

impl StageOutput {
    /// An output that is only JSON (what [`Flow::Continue`](super::Flow::Continue) carries).
    pub fn json(value: serde_json::Value) -> Self {
        StageOutput {
            typed: None,
            json: OnceLock::from(value),
            template: OnceLock::new(),
        }
    }

    /// A well-known output; its JSON is built when something reads it.
    pub fn typed(typed: Typed) -> Self {
        StageOutput {
            typed: Some(typed),
            json: OnceLock::new(),
            template: OnceLock::new(),
        }
    }

    /// The typed value, when the stage gave one.
    pub fn as_typed(&self) -> Option<&Typed> {
        self.typed.as_ref()
    }

    /// The JSON form, as templates read it (built now for a typed output, then kept).
    pub fn value(&self) -> &serde_json::Value {
        self.json.get_or_init(|| match &self.typed {
            Some(t) => t.to_json(),
            None => serde_json::Value::Null,
        })
    }

    /// The JSON form, by value.
    pub fn into_value(mut self) -> serde_json::Value {
        match self.json.take() {
            Some(v) => v,
            None => self
                .typed
                .as_ref()
                .map_or(serde_json::Value::Null, Typed::to_json),
        }
    }

    /// Whether the JSON form has a top-level `field`; a typed output answers without building
    /// its JSON.
    pub fn has_field(&self, field: &str) -> bool {
        match &self.typed {
            Some(t) => t.has_field(field),
            None => self.value().get(field).is_some(),
        }
    }

    /// The model that answered, for a reply (`provider:model`, or the provider alone when it
    /// names no model); `None` for other outputs.
    pub fn model_label(&self) -> Option<String> {
        let (provider, model) = match &self.typed {
            Some(Typed::Reply { reply, .. }) => (reply.provider.as_str(), reply.model.as_deref()),
            Some(_) => return None,
            None => {
                let v = self.value();
                (
                    v.get("provider")?.as_str()?,
                    v.get("model").and_then(|m| m.as_str()),
                )
            }
        };
        Some(match model {
            Some(m) if !m.is_empty() => format!("{provider}:{m}"),
            _ => provider.to_owned(),
        })
    }

    /// The documents this output carries: `None` when it has no `documents`.
    ///
    /// # Errors
    /// When a JSON output's `documents` is not a list of documents.
    pub fn documents(&self) -> Result<Option<Arc<[ScoredDocument]>>, PluginError> {
        match &self.typed {
            Some(Typed::Documents { documents, .. }) => Ok(Some(documents.clone())),
            Some(_) => Ok(None),
            None => match self.value().get("documents") {
                None => Ok(None),
                Some(d) => Vec::<ScoredDocument>::deserialize(d)
                    .map(|d| Some(d.into()))
                    .map_err(|e| {
                        PluginError::input("the documents stage output is not a document list")
                            .with_source(e)
                    }),
            },
        }
    }

    /// This output as a chat request.
    ///
    /// # Errors
    /// When it is neither a typed chat request nor JSON of one.
    pub fn chat_request(&self) -> Result<Arc<ChatRequest>, PluginError> {
        match &self.typed {
            Some(Typed::ChatRequest(r)) => Ok(r.clone()),
            Some(_) => Err(PluginError::input(
                "the prompt stage output is not a chat request",
            )),
            None => ChatRequest::deserialize(self.value())
                .map(Arc::new)
                .map_err(|e| {
                    PluginError::input("the prompt stage output is not a chat request")
                        .with_source(e)
                }),
        }
    }

    /// The output's `text`, when it is a string (a reply's text).
    pub fn text(&self) -> Option<&str> {
        match &self.typed {
            Some(Typed::Reply { reply, .. }) => Some(&reply.text),
            Some(_) => None,
            None => self.value().get("text")?.as_str(),
        }
    }

    /// Why the output is degraded, if it says so (`degraded`).
    pub fn degraded(&self) -> Option<&str> {
        match &self.typed {
            Some(Typed::Documents { degraded, .. } | Typed::Reply { degraded, .. }) => {
                degraded.as_deref()
            }
            Some(_) => None,
            None => self.value().get("degraded")?.as_str(),
        }
    }

    /// The id of the output this one's answer was streamed to as drafts (`output.id`).
    pub fn drafted(&self) -> Option<&str> {
        match &self.typed {
            Some(Typed::Reply { drafted, .. }) => drafted.as_ref().map(|d| d.id.as_str()),
            Some(_) => None,
            None => self.value().get("output")?.get("id")?.as_str(),
        }
    }

    /// The JSON form as a template value, converted once.
    fn template_value(&self) -> minijinja::Value {
        self.template
            .get_or_init(|| minijinja::Value::from_serialize(self.value()))
            .clone()
    }
}

impl PartialEq for StageOutput {
    fn eq(&self, other: &Self) -> bool {
        self.value() == other.value()
    }
}

/// Serializes as its JSON form.
impl Serialize for StageOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

impl From<serde_json::Value> for StageOutput {
    fn from(value: serde_json::Value) -> Self {
        StageOutput::json(value)
    }
}

impl From<Typed> for StageOutput {
    fn from(typed: Typed) -> Self {
        StageOutput::typed(typed)
    }
}

/// The outputs of a run's stages so far, in stage order. Cloning shares them (the `stages`
/// template object holds a clone); [`Outputs::push`] copies only if such a clone is still alive.
#[derive(Debug, Clone, Default)]
pub struct Outputs(Option<Arc<Vec<(String, StageOutput)>>>);

impl Outputs {
    /// No outputs (allocates nothing).
    pub const fn new() -> Self {
        Outputs(None)
    }

    /// Adds stage `stage`'s output.
    pub fn push(&mut self, stage: impl Into<String>, output: StageOutput) {
        Arc::make_mut(self.0.get_or_insert_with(Default::default)).push((stage.into(), output));
    }

    /// The outputs, in stage order.
    pub fn as_slice(&self) -> &[(String, StageOutput)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The output of stage `stage` (the latest, should two stages share an id).
    pub fn get(&self, stage: &str) -> Option<&StageOutput> {
        self.as_slice()
            .iter()
            .rev()
            .find(|(k, _)| k == stage)
            .map(|(_, o)| o)
    }

    /// The latest output that has a top-level `field`, with its stage id.
    pub fn latest_with(&self, field: &str) -> Option<(&str, &StageOutput)> {
        self.as_slice()
            .iter()
            .rev()
            .find(|(_, o)| o.has_field(field))
            .map(|(k, o)| (k.as_str(), o))
    }

    /// How many outputs there are.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// `stages` for templates: a lazy map from stage id to output. An output is converted when
    /// a template first reads it, and once per run (see [`StageOutput`]).
    pub fn template_value(&self) -> minijinja::Value {
        minijinja::Value::from_object(StagesObject(self.clone()))
    }
}

impl FromIterator<(String, StageOutput)> for Outputs {
    fn from_iter<I: IntoIterator<Item = (String, StageOutput)>>(iter: I) -> Self {
        let v: Vec<_> = iter.into_iter().collect();
        Outputs((!v.is_empty()).then(|| Arc::new(v)))
    }
}

/// JSON-only outputs, as tests and tools write them.
impl From<&[(String, serde_json::Value)]> for Outputs {
    fn from(outputs: &[(String, serde_json::Value)]) -> Self {
        outputs
            .iter()
            .map(|(k, v)| (k.clone(), StageOutput::json(v.clone())))
            .collect()
    }
}

/// The `stages` template object over a run's outputs.
#[derive(Debug)]
struct StagesObject(Outputs);

impl Object for StagesObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        self.0.get(key.as_str()?).map(StageOutput::template_value)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        // Sorted and once each, as the map this object stands for lists its keys.
        let ids: BTreeSet<&str> = self.0.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        Enumerator::Values(ids.into_iter().map(minijinja::Value::from).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        let ids: BTreeSet<&str> = self.0.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        Some(ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{ChatMessage, Role};
    use crate::template::Template;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn doc(id: &str, score: f32) -> ScoredDocument {
        ScoredDocument {
            id: id.into(),
            text: "Budget".into(),
            data: "Offer a pilot.".into(),
            score,
        }
    }

    fn request() -> ChatRequest {
        ChatRequest {
            system_prompt: "Be brief.".into(),
            messages: vec![ChatMessage {
                role: Role::Human,
                text: "Budget".into(),
            }],
            context: vec![doc("d1", 0.8)],
            max_new_tokens: 64,
            temperature: 0.7,
        }
    }

    fn every_variant() -> Vec<Typed> {
        let reply = ChatReply {
            text: "Offer a pilot.".into(),
            provider: "offline".into(),
            model: None,
        };
        vec![
            Typed::Documents {
                query: "Budget".into(),
                documents: vec![doc("d1", 0.8), doc("d2", 0.3)].into(),
                degraded: None,
            },
            Typed::Documents {
                query: "Budget".into(),
                documents: Vec::new().into(),
                degraded: Some("ranked by words".into()),
            },
            Typed::ChatRequest(Arc::new(request())),
            Typed::Reply {
                reply: reply.clone(),
                degraded: None,
                drafted: None,
            },
            Typed::Reply {
                reply,
                degraded: Some("`nebula` failed".into()),
                drafted: Some(Drafted {
                    id: "c/p/x".into(),
                    version: 3,
                }),
            },
        ]
    }

    #[test]
    fn typed_and_json_outputs_answer_the_accessors_alike() {
        for t in every_variant() {
            let typed = StageOutput::typed(t.clone());
            let json = StageOutput::json(typed.value().clone());
            let fields = typed.value().as_object().unwrap();
            for f in fields.keys() {
                assert!(typed.has_field(f), "{t:?} lacks `{f}`");
            }
            for f in [
                "query",
                "documents",
                "text",
                "degraded",
                "output",
                "system_prompt",
            ] {
                assert_eq!(typed.has_field(f), json.has_field(f), "{t:?} `{f}`");
            }
            assert_eq!(
                typed.documents().unwrap(),
                json.documents().unwrap(),
                "{t:?}"
            );
            assert_eq!(typed.text(), json.text(), "{t:?}");
            assert_eq!(typed.degraded(), json.degraded(), "{t:?}");
            assert_eq!(typed.drafted(), json.drafted(), "{t:?}");
            if let Typed::ChatRequest(r) = &t {
                assert_eq!(typed.chat_request().unwrap(), *r);
                assert_eq!(json.chat_request().unwrap(), *r);
            } else {
                assert!(typed.chat_request().is_err());
            }
            assert_eq!(typed, json);
            assert_eq!(typed.clone().into_value(), *json.value());
        }
    }

    #[test]
    fn a_typed_output_builds_no_json_until_read() {
        let out = StageOutput::typed(Typed::ChatRequest(Arc::new(request())));
        assert!(out.has_field("system_prompt"));
        assert!(out.chat_request().is_ok());
        assert!(out.json.get().is_none());
        assert_eq!(out.value()["temperature"], json!(0.7));
        assert_eq!(
            serde_json::to_string(&out.value()["temperature"]).unwrap(),
            "0.7"
        );
    }

    /// What templates saw before `stages` was lazy: a map built from every output's JSON.
    fn eager(outputs: &Outputs) -> minijinja::Value {
        let map: BTreeMap<&str, &serde_json::Value> = outputs
            .as_slice()
            .iter()
            .map(|(k, o)| (k.as_str(), o.value()))
            .collect();
        minijinja::Value::from_serialize(&map)
    }

    #[test]
    fn lazy_stages_render_like_the_eager_map() {
        let mut outputs: Outputs = every_variant()
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("s{i}"), StageOutput::typed(t)))
            .collect();
        outputs.push(
            "wasm",
            StageOutput::json(json!({"b": 1, "a": [true, null]})),
        );
        outputs.push("failed", StageOutput::json(serde_json::Value::Null));
        for source in [
            "{{ stages }}",
            "{{ stages | tojson }}",
            "{{ stages | length }}",
            "{% for k, v in stages | items %}{{ k }}={{ v }};{% endfor %}",
            "{% for k in stages %}{{ k }},{% endfor %}",
            "{{ stages.s0.documents[0].score }} {{ stages.s0.documents | map(attribute='data') | join }}",
            "{{ stages.s2.temperature }} {{ stages.s2.messages[0].role }}",
            "{{ stages.s4.output.id }} {{ stages.s4.degraded }} {{ stages['s3'].text }}",
            "{{ stages.wasm.a[0] }} {{ stages.failed is none }} {{ stages.nope is defined }}",
            "{{ stages.nope.deeper }}|{{ stages is mapping }}",
        ] {
            let t = Template::compile(source).unwrap();
            let lazy = t
                .render(&minijinja::context! { stages => outputs.template_value() })
                .unwrap();
            let eager = t
                .render(&minijinja::context! { stages => eager(&outputs) })
                .unwrap();
            assert_eq!(lazy, eager, "{source}");
        }
    }

    #[test]
    fn each_output_is_converted_once_per_run() {
        let mut outputs = Outputs::new();
        outputs.push("kb", StageOutput::json(json!({"x": 1})));
        let t = Template::compile("{{ stages.kb.x }}").unwrap();
        for _ in 0..3 {
            let ctx = minijinja::context! { stages => outputs.template_value() };
            assert_eq!(t.render(&ctx).unwrap(), "1");
        }
        let cached = outputs.get("kb").unwrap().template.get().cloned();
        assert!(cached.is_some());
        // A later stage's push keeps the earlier conversions (no template value is alive).
        outputs.push("answer", StageOutput::json(json!({"text": "hi"})));
        assert_eq!(outputs.get("kb").unwrap().template.get().cloned(), cached);
    }
}
