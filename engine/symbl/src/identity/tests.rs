//! Tests of the parent module.
use serde_json::{Value, json};

use super::*;

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn id(text: &str) -> u64 {
    frame_identity(&parse(text))
}

#[test]
fn canonical_json_sorts_keys_at_every_level_and_drops_whitespace() {
    let v = parse(r#"{ "b": [ {"z": 1, "a": "x y"} ], "a": null, "é": true, "A": 1.5 }"#);
    assert_eq!(
        canonical_json(&v),
        r#"{"A":1.5,"a":null,"b":[{"a":"x y","z":1}],"é":true}"#
    );
}

#[test]
fn the_same_frame_with_other_spacing_and_key_order_has_the_same_identity() {
    // One of each kind, including frames identified only by their canonical JSON.
    let pairs = [
        (
            r#"{"type":"message_response","messages":[{"id":"m1","payload":{"content":"Hello world."}}]}"#,
            r#"{
                 "messages" : [ { "payload" : { "content" : "Hello world." }, "id" : "m1" } ],
                 "type" : "message_response"
               }"#,
        ),
        (
            r#"{"type":"message_response","messages":[{"payload":{"content":"no id"}}]}"#,
            r#"{ "messages": [ { "payload": { "content": "no id" } } ], "type": "message_response" }"#,
        ),
        (
            r#"{"type":"message","message":{"type":"recognition_result","isFinal":false,"punctuated":{"transcript":"Hel"}}}"#,
            r#"{"message":{"punctuated":{"transcript":"Hel"},"isFinal":false,"type":"recognition_result"},"type":"message"}"#,
        ),
        (
            r#"{"type":"tracker_response","isFinal":true,"trackers":[{"name":"Goodness","matches":[{"type":"vocabulary","value":"Hello world","messageRefs":[{"id":"r1","text":"Hello world.","offset":0}]}]}]}"#,
            r#"{"trackers":[{"matches":[{"messageRefs":[{"offset":0,"text":"Hello world.","id":"r1"}],"value":"Hello world","type":"vocabulary"}],"name":"Goodness"}],"isFinal":true,"type":"tracker_response"}"#,
        ),
        (
            r#"{"type":"error","message":"bad","details":"none"}"#,
            "{\n\t\"details\": \"none\",\n\t\"message\": \"bad\",\n\t\"type\": \"error\"\n}",
        ),
    ];
    for (a, b) in pairs {
        assert_eq!(id(a), id(b), "{a}\n{b}");
    }
}

#[test]
fn two_different_sentences_have_different_identities() {
    let with_ids = |id: &str, text: &str| {
        json!({"type": "message_response",
               "messages": [{"id": id, "payload": {"content": text}}]})
    };
    assert_ne!(
        frame_identity(&with_ids("m1", "Hello.")),
        frame_identity(&with_ids("m2", "Goodbye."))
    );
    // Without ids: told apart by their content.
    let without_ids = |text: &str| json!({"type": "message_response", "messages": [{"payload": {"content": text}}]});
    assert_ne!(
        frame_identity(&without_ids("Hello.")),
        frame_identity(&without_ids("Goodbye."))
    );
}

#[test]
fn a_message_response_is_its_set_of_message_ids() {
    let a = json!({"type": "message_response", "sequenceNumber": 3,
                   "messages": [{"id": "m1"}, {"id": "m2"}]});
    // Redelivered in another order, with another sequence number.
    let b = json!({"type": "message_response", "sequenceNumber": 9,
                   "messages": [{"id": "m2"}, {"id": "m1"}]});
    let c = json!({"type": "message_response", "messages": [{"id": "m1"}]});
    assert_eq!(frame_identity(&a), frame_identity(&b));
    assert_ne!(frame_identity(&a), frame_identity(&c));
}

#[test]
fn interim_and_final_tracker_results_have_different_identities() {
    let tracker = |is_final: bool| {
        json!({"type": "tracker_response", "isFinal": is_final, "sequenceNumber": 1,
               "trackers": [{"name": "Goodness", "matches": [{"type": "vocabulary",
                   "value": "This is awesome",
                   "messageRefs": [{"id": "fa93", "text": "This is awesome.", "offset": 0}],
                   "insightRefs": []}]}]})
    };
    assert_ne!(
        frame_identity(&tracker(false)),
        frame_identity(&tracker(true))
    );
    // The same result again (another sequence number) is the same frame.
    let mut again = tracker(true);
    again["sequenceNumber"] = json!(2);
    assert_eq!(frame_identity(&tracker(true)), frame_identity(&again));
    // A match on another message is a different result.
    let mut other = tracker(true);
    other["trackers"][0]["matches"][0]["messageRefs"][0]["id"] = json!("8e72");
    assert_ne!(frame_identity(&tracker(true)), frame_identity(&other));
}

#[test]
fn a_redelivered_insight_has_the_same_identity() {
    let first = parse(
        r#"{"type":"insight_response","sequenceNumber":0,"insights":[{"id":"9402","type":"action_item",
            "confidence":0.99,"payload":{"content":"Perhaps John can submit the report today."}}]}"#,
    );
    let again = parse(
        r#"{ "insights": [ { "payload": { "content": "Perhaps John can submit the report today." },
              "confidence": 0.99, "type": "action_item", "id": "9402" } ],
             "sequenceNumber": 4, "type": "insight_response" }"#,
    );
    assert_eq!(frame_identity(&first), frame_identity(&again));
    let other = json!({"type": "insight_response", "insights": [{"id": "9403"}]});
    assert_ne!(frame_identity(&first), frame_identity(&other));
    // Legacy insights have no id: their content tells them apart.
    let legacy = |text: &str| json!({"type": "insight_response", "insights": [{"type": "question", "text": text}]});
    assert_ne!(
        frame_identity(&legacy("Why?")),
        frame_identity(&legacy("When?"))
    );
}

#[test]
fn a_topic_with_a_new_message_reference_is_a_new_frame() {
    let topic = |refs: &[&str]| {
        let refs: Vec<Value> = refs
            .iter()
            .map(|r| json!({"id": r, "relation": "text instance"}))
            .collect();
        json!({"type": "topic_response", "topics": [{"id": "t1", "phrases": "auto insurance",
               "messageReferences": refs, "score": 0.9}]})
    };
    assert_eq!(
        frame_identity(&topic(&["a", "b"])),
        frame_identity(&topic(&["b", "a"]))
    );
    assert_ne!(
        frame_identity(&topic(&["a"])),
        frame_identity(&topic(&["a", "b"]))
    );
}

#[test]
fn interim_captions_that_differ_are_never_merged() {
    let caption = |text: &str, is_final: bool| {
        json!({"type": "message", "message": {"type": "recognition_result", "isFinal": is_final,
               "punctuated": {"transcript": text}, "user": {"id": "u1"}}})
    };
    assert_ne!(
        frame_identity(&caption("Hel", false)),
        frame_identity(&caption("Hello", false))
    );
    assert_ne!(
        frame_identity(&caption("Hello.", false)),
        frame_identity(&caption("Hello.", true))
    );
    // With a sequence number shared by the interim results of one utterance: still apart.
    let numbered = |text: &str| {
        let mut c = caption(text, false);
        c["message"]["sequenceNumber"] = json!(5);
        c
    };
    assert_ne!(
        frame_identity(&numbered("Hel")),
        frame_identity(&numbered("Hello"))
    );
    assert_eq!(
        frame_identity(&numbered("Hello")),
        frame_identity(&numbered("Hello"))
    );
}

#[test]
fn platform_messages_are_their_type_and_sequence_number() {
    let a = json!({"type": "message", "sequenceNumber": 2,
                   "message": {"type": "session_modified", "data": {"x": 1}}});
    let b = json!({"type": "message", "sequenceNumber": 2,
                   "message": {"type": "session_modified", "data": {"x": 2}}});
    let c = json!({"type": "message", "sequenceNumber": 3,
                   "message": {"type": "session_modified", "data": {"x": 1}}});
    assert_eq!(frame_identity(&a), frame_identity(&b));
    assert_ne!(frame_identity(&a), frame_identity(&c));
    // Without a number: the whole frame counts (two different errors stay apart).
    let error = |m: &str| json!({"type": "message", "message": {"type": "error", "message": m}});
    assert_ne!(frame_identity(&error("a")), frame_identity(&error("b")));
}

#[test]
fn identified_and_canonical_keys_do_not_coincide_for_look_alike_frames() {
    // A frame missing one message id falls back to its canonical hash; it must not collide
    // with the frame whose every message has that id.
    let with = json!({"type": "message_response", "messages": [{"id": "m1"}]});
    let without = json!({"type": "message_response", "messages": [{"id": ""}]});
    assert_ne!(frame_identity(&with), frame_identity(&without));
    // Lists are delimited: ["ab"] and ["a","b"] differ.
    let one = json!({"type": "insight_response", "insights": [{"id": "ab"}]});
    let two = json!({"type": "insight_response", "insights": [{"id": "a"}, {"id": "b"}]});
    assert_ne!(frame_identity(&one), frame_identity(&two));
    // A number and a string id differ; so do frames of different kinds with the same ids.
    let num = json!({"type": "insight_response", "insights": [{"id": 1}]});
    let text = json!({"type": "insight_response", "insights": [{"id": "1"}]});
    assert_ne!(frame_identity(&num), frame_identity(&text));
    let msg = json!({"type": "message_response", "messages": [{"id": "ab"}]});
    assert_ne!(frame_identity(&one), frame_identity(&msg));
}
