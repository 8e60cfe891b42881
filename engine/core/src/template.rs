//! The one expression and template language of Prompter (Jinja, via minijinja).
//!
//! Stage templates and pipeline `when:` filters are compiled once, at load time, into
//! self-contained [`Template`]s and [`Expr`]s, so a syntax error is a load-time diagnostic and
//! rendering costs no parsing. Every template sees the same context:
//!
//! - `event`: the triggering event (`kind`, `conversation_id`, `offset_ms`, `detail`, `raw`, and
//!   the shortcuts `tracker`, `message`, `insight`, `topic`, `caption`);
//! - `conversation`: the conversation state (`transcript`, `caption`, `trackers`, `insights`,
//!   `topics`, ...);
//! - `stages`: the outputs of the earlier stages of the pipeline, by stage id (in JSON form; a
//!   lazy object, each output converted once per run when first read: see
//!   [`Outputs::template_value`](crate::plugin::Outputs::template_value));
//! - `pipeline`: the pipeline name.
//!
//! Extra filters: `transcript` formats transcript lines as `Speaker: text` lines.
//! Extra tests: `text is question` is true for a sentence that asks something (see
//! [`is_question`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, UndefinedBehavior, Value};

use crate::conversation::ConversationState;
use crate::error::PluginError;
use crate::event::{Detail, Event};

const NAME: &str = "t";

/// Instructions one render or filter evaluation may run. The shipped prompt templates use a few
/// hundred; a template that loops over loops (`{% for a in x %}{% for b in x %}...`) stops here,
/// in a few milliseconds, instead of holding a worker thread: a stage's timeout cannot interrupt
/// synchronous code.
pub const FUEL: u64 = 1_000_000;

/// A fresh environment with Prompter's settings and filters.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    // Chainable: `event.tracker.name` is empty (not an error) on a non-tracker event, which is
    // what filters like `when: event.tracker.name == "Budget"` want.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(false);
    env.add_filter("transcript", transcript_filter);
    env.add_test("question", |v: Value| v.as_str().is_some_and(is_question));
    env
}

/// Words that open a question when a subject follows them ("can you", "is there").
const AUXILIARIES: &[&str] = &[
    "am", "are", "can", "could", "did", "do", "does", "has", "have", "is", "may", "might", "shall",
    "should", "was", "were", "will", "would", "isn't", "aren't", "can't", "couldn't", "didn't",
    "don't", "doesn't", "won't", "wouldn't", "hasn't", "haven't",
];

/// Subjects after an auxiliary that make it a question ("do you ..." but not "do it now");
/// the first six are people, the only ones that count after "do".
const SUBJECTS: &[&str] = &[
    "i", "you", "we", "they", "she", "he", "it", "there", "this", "that", "these", "those", "your",
    "our", "my", "their", "the", "a", "an", "any", "anyone", "someone", "somebody",
];

/// Words that open a question on their own.
const INTERROGATIVES: &[&str] = &[
    "what", "what's", "how", "how's", "why", "when", "where", "where's", "which", "who", "who's",
    "whom", "whose",
];

/// Words after an interrogative that make it a question ("how long", "what about"), beside the
/// auxiliaries ("where is", "why did"): "when we moved ..." and "what a day" are not questions.
const AFTER_INTERROGATIVE: &[&str] = &[
    "much", "many", "long", "often", "soon", "far", "about", "if", "else", "happens", "happened",
    "kind", "sort", "type", "exactly", "not", "come", "time",
];

/// Openings of indirect questions ("I was wondering if ...").
const INDIRECT: &[&str] = &[
    "i was wondering",
    "i'm wondering",
    "i wonder",
    "do you know",
    "any idea",
    "is there a way",
    "is there any way",
    "can you tell me",
    "could you tell me",
    "tell me how",
];

/// Whether an English text asks something: it has a `?`, or (as speech-to-text often drops
/// the mark) one of its sentences or clauses opens like a question: an interrogative word
/// followed by an auxiliary or a word such as "long" or "about" and one more word ("how do
/// refunds work", "what about our data", not "when we moved" or "what a day"), an auxiliary
/// followed by a subject and one more word ("do you integrate with ...", not "do it now"), or
/// an indirect question ("I was wondering if ..."). A cheap heuristic over the first words,
/// for `when:` filters: `event.message.text is question`.
pub fn is_question(text: &str) -> bool {
    // A text of several sentences or clauses asks something when one of them does ("Great.
    // Also, can our data stay in Europe.", "We just signed up, and I was wondering whether").
    text.contains('?') || text.split(['.', '!', ';', ',']).any(opens_like_a_question)
}

/// Whether one sentence or clause (without its final mark) opens like a question.
fn opens_like_a_question(sentence: &str) -> bool {
    let lower = sentence.to_lowercase().replace('\u{2019}', "'");
    let mut words = lower
        .split(|c: char| c.is_whitespace() || c == ',')
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\''))
        .filter(|w| !w.is_empty())
        // Leading fillers: "so", "and", "okay so", "um".
        .skip_while(|w| {
            matches!(
                *w,
                "so" | "and" | "but" | "okay" | "ok" | "um" | "uh" | "well" | "also" | "oh"
            )
        });
    let Some(first) = words.next() else {
        return false;
    };
    let second = words.next();
    let third = words.next();
    if INTERROGATIVES.contains(&first) {
        let Some(second) = second else {
            return false;
        };
        // "what's the price", "how's the rollout going".
        if first.ends_with("'s") {
            return true;
        }
        let Some(third) = third else {
            return false;
        };
        // "how long does it take", "where is our data", "why did the price change".
        if AUXILIARIES.contains(&second) || AFTER_INTERROGATIVE.contains(&second) {
            return true;
        }
        // "which country are your servers in", "what plan are we on"; not "what we need is".
        return matches!(first, "what" | "which" | "whose")
            && !SUBJECTS[..6].contains(&second)
            && !matches!(second, "a" | "an")
            && AUXILIARIES.contains(&third);
    }
    if AUXILIARIES.contains(&first) {
        // "do" and "have" also open orders and wishes ("do it now", "have a great day"): after
        // "do" only a person counts, after "have" no "a"/"an".
        let subject = |w: &str| match first {
            "do" | "don't" => SUBJECTS[..6].contains(&w),
            "have" | "has" => SUBJECTS.contains(&w) && !matches!(w, "a" | "an"),
            _ => SUBJECTS.contains(&w),
        };
        return second.is_some_and(subject) && third.is_some();
    }
    let opening = [Some(first), second, third, words.next()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    // Whole words, and something after them: "i wonder if", not "i wonder" or "i wonderful".
    INDIRECT.iter().any(|p| {
        opening
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with(' '))
    })
}

/// `{{ conversation.transcript[-6:] | transcript }}` → "Speaker: text" lines.
fn transcript_filter(lines: Value) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    for line in lines.try_iter()? {
        let speaker = line.get_attr("speaker")?;
        let text = line.get_attr("text")?;
        if !out.is_empty() {
            out.push('\n');
        }
        if speaker.is_undefined() || speaker.is_none() {
            out.push_str(&text.to_string());
        } else {
            out.push_str(&format!("{speaker}: {text}"));
        }
    }
    Ok(out)
}

/// A compiled template.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
    source: String,
}

impl Template {
    /// Compiles `source`.
    ///
    /// # Errors
    /// A syntax error, with minijinja's line and byte range inside the template.
    pub fn compile(source: &str) -> Result<Template, minijinja::Error> {
        let mut env = environment();
        env.add_template_owned(NAME, source.to_owned())?;
        Ok(Template {
            env,
            source: source.to_owned(),
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with `ctx`.
    ///
    /// # Errors
    /// A runtime template error (a failing filter, say).
    pub fn render(&self, ctx: &Value) -> Result<String, PluginError> {
        let t = self.env.get_template(NAME)?;
        Ok(t.render(ctx)?)
    }

    /// The stage ids this template reads through `stages.<id>`.
    pub fn stage_refs(&self) -> BTreeSet<String> {
        match self.env.get_template(NAME) {
            Ok(t) => stage_refs(t.undeclared_variables(true)),
            Err(_) => BTreeSet::new(),
        }
    }
}

/// A compiled filter expression (`when:`), true or false for an event.
#[derive(Debug)]
pub struct Expr {
    env: Environment<'static>,
    source: String,
}

impl Expr {
    /// Compiles `source`.
    ///
    /// # Errors
    /// A syntax error.
    pub fn compile(source: &str) -> Result<Expr, minijinja::Error> {
        let mut env = environment();
        // Validate as an expression first so errors read as expression errors.
        env.compile_expression(source)?;
        env.add_template_owned(NAME, format!("{{% if ({source}) %}}1{{% endif %}}"))?;
        Ok(Expr {
            env,
            source: source.to_owned(),
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to Jinja truthiness.
    ///
    /// # Errors
    /// A runtime error (comparing incompatible values, say).
    pub fn is_true(&self, ctx: &Value) -> Result<bool, PluginError> {
        let t = self.env.get_template(NAME)?;
        Ok(t.render(ctx)? == "1")
    }

    /// The stage ids the expression reads.
    pub fn stage_refs(&self) -> BTreeSet<String> {
        self.env
            .compile_expression(&self.source)
            .map(|e| stage_refs(e.undeclared_variables(true)))
            .unwrap_or_default()
    }
}

fn stage_refs(vars: std::collections::HashSet<String>) -> BTreeSet<String> {
    vars.iter()
        .filter_map(|v| v.strip_prefix("stages."))
        .map(|rest| rest.split('.').next().unwrap_or(rest).to_owned())
        .collect()
}

/// The `event` seen by templates: the event's fields plus a shortcut per detail kind
/// (`event.tracker`, `event.message`, `event.insight`, `event.topic`, `event.caption`), and the
/// raw frame as `event.raw`. Lazy: each field is built when a template reads it.
pub fn event_value(event: &Arc<Event>) -> Value {
    Value::from_object(EventObject(event.clone()))
}

/// The `conversation` seen by templates: the fields of [`ConversationState`]. Lazy, and
/// `transcript` is a sequence that reads only the lines a template touches
/// (`conversation.transcript[-6:]` costs six lines, not the whole call).
pub fn conversation_value(state: &Arc<ConversationState>) -> Value {
    Value::from_object(ConversationObject(state.clone()))
}

#[derive(Debug)]
struct EventObject(Arc<Event>);

const EVENT_FIELDS: &[&str] = &["kind", "conversation_id", "offset_ms", "raw"];

impl Object for EventObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let e = &self.0;
        let key = key.as_str()?;
        Some(match (key, &e.detail) {
            ("kind", _) => Value::from(e.kind.as_str()),
            ("conversation_id", _) => Value::from(e.conversation_id.as_ref()),
            ("offset_ms", _) => Value::from(e.offset_ms),
            ("raw", _) => Value::from_serialize(e.raw.value()),
            ("tracker", Detail::Tracker(t)) => Value::from_serialize(t),
            ("message", Detail::Message(m)) => Value::from_serialize(m),
            ("insight", Detail::Insight(i)) => Value::from_serialize(i),
            ("topic", Detail::Topic(t)) => Value::from_serialize(t),
            ("caption", Detail::Caption(c)) => Value::from_serialize(c),
            ("entity", Detail::Entity(v)) => Value::from_serialize(v),
            ("feedback", Detail::Feedback(f)) => Value::from_serialize(f),
            ("error", Detail::Error { message, details }) => {
                minijinja::context! { message => message, details => details }
            }
            (
                "lifecycle",
                Detail::Lifecycle {
                    symbl_conversation_id,
                    summary_url,
                },
            ) => minijinja::context! {
                symbl_conversation_id => symbl_conversation_id,
                summary_url => summary_url,
            },
            _ => return None,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let detail = match &self.0.detail {
            Detail::Tracker(_) => "tracker",
            Detail::Message(_) => "message",
            Detail::Insight(_) => "insight",
            Detail::Topic(_) => "topic",
            Detail::Caption(_) => "caption",
            Detail::Entity(_) => "entity",
            Detail::Feedback(_) => "feedback",
            Detail::Error { .. } => "error",
            Detail::Lifecycle { .. } => "lifecycle",
            Detail::None => return Enumerator::Str(EVENT_FIELDS),
        };
        let mut keys: Vec<Value> = EVENT_FIELDS.iter().map(|k| Value::from(*k)).collect();
        keys.push(Value::from(detail));
        Enumerator::Values(keys)
    }
}

#[derive(Debug)]
struct ConversationObject(Arc<ConversationState>);

const CONVERSATION_FIELDS: &[&str] = &[
    "id",
    "symbl_conversation_id",
    "transcript",
    "caption",
    "trackers",
    "insights",
    "topics",
    "last_offset_ms",
    "events_seen",
    "completed",
];

impl Object for ConversationObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let c = &self.0;
        Some(match key.as_str()? {
            "id" => Value::from(c.id.as_str()),
            "symbl_conversation_id" => Value::from(c.symbl_conversation_id.clone()),
            "transcript" => Value::from_object(TranscriptObject(self.0.clone())),
            "caption" => Value::from_serialize(&c.caption),
            "trackers" => Value::from_serialize(&c.trackers),
            "insights" => Value::from_serialize(&c.insights),
            "topics" => Value::from_serialize(&c.topics),
            "last_offset_ms" => Value::from(c.last_offset_ms),
            "events_seen" => Value::from(c.events_seen),
            "completed" => Value::from(c.completed),
            _ => return None,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(CONVERSATION_FIELDS)
    }
}

/// `conversation.transcript`: a sequence whose items are built on demand.
#[derive(Debug)]
struct TranscriptObject(Arc<ConversationState>);

impl Object for TranscriptObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let len = self.0.transcript.len() as i64;
        let i = key.as_i64()?;
        let i = if i < 0 { len + i } else { i };
        if !(0..len).contains(&i) {
            return None;
        }
        self.0.transcript.get(i as usize).map(Value::from_serialize)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Iter(Box::new(Lines {
            state: self.0.clone(),
            next: 0,
            end: self.0.transcript.len(),
        }))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.transcript.len())
    }
}

/// Iterates transcript lines; skipping (as slicing does) jumps instead of walking.
struct Lines {
    state: Arc<ConversationState>,
    next: usize,
    end: usize,
}

impl Iterator for Lines {
    type Item = Value;

    fn next(&mut self) -> Option<Value> {
        if self.next >= self.end {
            return None;
        }
        let v = self
            .state
            .transcript
            .get(self.next)
            .map(Value::from_serialize);
        self.next += 1;
        v
    }

    fn nth(&mut self, n: usize) -> Option<Value> {
        self.next = self.next.saturating_add(n).min(self.end);
        self.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn renders_and_lists_stage_refs() {
        let t = Template::compile(
            "{{ stages.kb.documents[0].data }} / {{ conversation.transcript[-2:] | transcript }}",
        )
        .unwrap();
        assert_eq!(
            t.stage_refs().into_iter().collect::<Vec<_>>(),
            vec!["kb".to_string()]
        );
        let ctx = context! {
            stages => context!{ kb => context!{ documents => vec![context!{ data => "Offer a pilot." }] } },
            conversation => context!{ transcript => vec![
                context!{ speaker => "A", text => "one" },
                context!{ speaker => "B", text => "two" },
                context!{ speaker => "C", text => "three" }] },
        };
        assert_eq!(t.render(&ctx).unwrap(), "Offer a pilot. / B: two\nC: three");
    }

    #[test]
    fn expressions_use_jinja_truthiness_and_chain_undefined() {
        let e = Expr::compile("event.tracker.name == 'Budget' and event.tracker.is_final").unwrap();
        let yes = context! { event => context!{ tracker => context!{ name => "Budget", is_final => true } } };
        let no = context! { event => context!{ kind => "message_response" } };
        assert!(e.is_true(&yes).unwrap());
        assert!(!e.is_true(&no).unwrap());
        assert!(Expr::compile("event.kind == ").is_err());
        assert!(Template::compile("{{ x(").is_err());
    }

    #[test]
    fn questions_are_told_from_statements_and_small_talk() {
        for q in [
            "Can your tool talk to our CRM?",
            "do you integrate with Salesforce",
            "How do I export my data to a spreadsheet",
            "So what happens to our data if we cancel",
            "Is there a way to add more seats mid-contract.",
            "I was wondering whether you support single sign-on.",
            "Um, where is our data stored",
            "Any idea when the refund shows up",
            "It works, right?",
            "Don\u{2019}t you offer an annual discount",
            "Great. Also, can our data stay in Europe. Legal is strict about it.",
            "We just signed up, and I was wondering whether people can use Okta.",
            "What plan are we on",
            "Which country are your servers in",
            "How long does a rollout take",
            "Why did the price change",
            "What's the price for ten seats",
            "What about our historical data",
        ] {
            assert!(is_question(q), "a question: {q:?}");
        }
        for s in [
            "Thanks, have a great weekend.",
            "How nice.",
            "Do it now.",
            "We need single sign-on.",
            "The weather has been lovely this week.",
            "",
            "   ",
            "What.",
            "I wonder.",
            "Fine. How nice. Do it now!",
            "When we moved to the new plan, billing broke.",
            "What a great idea.",
            "Who knows what happened.",
            "What we need is a quote.",
            "I wonderful it works.",
        ] {
            assert!(!is_question(s), "not a question: {s:?}");
        }
        // In a `when:` filter; a number or a missing text is not a question.
        let e = Expr::compile("event.message.text is question").unwrap();
        let ctx =
            |text: Value| context! { event => context!{ message => context!{ text => text } } };
        assert!(
            e.is_true(&ctx(Value::from("Does it support SSO?")))
                .unwrap()
        );
        assert!(!e.is_true(&ctx(Value::from("Great, thanks."))).unwrap());
        assert!(!e.is_true(&ctx(Value::from(3))).unwrap());
        assert!(!e.is_true(&context! { event => context!{} }).unwrap());
    }
}

/// Property tests: no template, however odd, panics the engine or holds a thread.
#[cfg(test)]
mod props {
    use super::*;
    use minijinja::context;
    use proptest::prelude::*;

    /// Pieces of Jinja that fit together often enough to make templates that compile, loops
    /// and big multiplications included.
    const PIECES: &[&str] = &[
        "{{ ",
        " }}",
        "{% for x in range(100000) %}",
        "{% for y in conversation.transcript %}",
        "{% endfor %}",
        "{% if event.tracker.name %}",
        "{% else %}",
        "{% endif %}",
        "event.tracker.name",
        "conversation.transcript",
        "stages.kb.documents[0].data",
        " | transcript",
        " | upper",
        " | length",
        " * ",
        "100000000",
        "'x'",
        "x",
        "loop.index",
        " ~ ",
        "(",
        ")",
        "[-3:]",
        "text",
        "{#",
        "#}",
        "{% set z = ",
        "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    ];

    fn context() -> minijinja::Value {
        context! {
            event => context!{ kind => "tracker_response", tracker => context!{ name => "Budget" } },
            conversation => context!{ transcript => vec![
                context!{ speaker => "A", text => "we have no budget" },
                context!{ speaker => "B", text => "what would help?" }] },
            stages => context!{ kb => context!{ documents => vec![context!{ data => "Offer a pilot." }] } },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            // The same cases on every machine: CI never meets a case nobody ran here.
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5EED),
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_text_compiles_or_fails_cleanly(source in "\\PC{0,80}") {
            if let Ok(t) = Template::compile(&source) {
                let _ = t.render(&context());
            }
            let _ = Expr::compile(&source).map(|e| e.is_true(&context()));
        }

        #[test]
        fn templates_made_of_jinja_pieces_render_or_fail_within_their_fuel(
            picks in proptest::collection::vec(0..PIECES.len(), 0..24)
        ) {
            let source: String = picks.iter().map(|i| PIECES[*i]).collect();
            if let Ok(t) = Template::compile(&source) {
                let started = std::time::Instant::now();
                let _ = t.render(&context());
                // Fuel bounds the work: far under a second even unoptimized.
                prop_assert!(started.elapsed() < std::time::Duration::from_secs(5), "{source}");
            }
        }
    }

    #[test]
    fn a_loop_over_a_loop_runs_out_of_fuel_with_a_clear_error() {
        let t = Template::compile(
            "{% for a in range(100000) %}{% for b in range(100000) %}.{% endfor %}{% endfor %}",
        )
        .unwrap();
        let e = t.render(&context()).unwrap_err();
        assert!(
            e.to_string()
                .contains("ran past its budget of 1000000 instructions"),
            "{e}"
        );
        // A real prompt is far inside the budget.
        let prompt = Template::compile(
            "{% for line in conversation.transcript %}{{ line.speaker }}: {{ line.text }}\n{% endfor %}{{ stages.kb.documents[0].data }}",
        )
        .unwrap();
        assert!(prompt.render(&context()).is_ok());
    }
}
