#![allow(clippy::unwrap_used, reason = "tests")]

use prompter_core::output::{Output, Status, Trigger};
use prompter_core::resource::ScoredDocument;

use super::*;

fn card(id: &str, pipeline: &str, kind: &str, title: &str, text: &str) -> Output {
    Output {
        id: format!("call/{pipeline}/{id}"),
        version: 1,
        status: Status::Final,
        kind: kind.into(),
        conversation_id: "call".into(),
        pipeline: pipeline.into(),
        title: Some(title.into()),
        text: text.into(),
        ..Default::default()
    }
}

fn budget() -> Output {
    let mut o = card(
        "k-budget-constraints",
        "rta",
        "suggestion",
        "Budget Constraints",
        "Acknowledge the constraint, then offer a phased rollout.",
    );
    o.trigger = Trigger {
        event: "tracker_response".into(),
        offset_ms: 22_250,
        tracker: Some("Budget Constraints".into()),
        phrases: vec!["don't have the budget".into()],
        is_final: Some(false),
        text: None,
    };
    o.sources = vec![ScoredDocument {
        id: "94f876f6e55c".into(),
        text: "Budget Constraints: we don't have the budget".into(),
        data: "Acknowledge the constraint".into(),
        score: 0.65,
    }];
    o.model = Some("offline".into());
    o
}

fn outputs() -> Vec<Output> {
    vec![
        budget(),
        card(
            "k-timing",
            "rta",
            "suggestion",
            "Timing",
            "Ask what is driving the timeline.",
        ),
        card(
            "e-1",
            "call_recap",
            "summary",
            "Call recap",
            "14 sentences, 75 s.\nObjections: Budget Constraints\nTopics: budget approval",
        ),
    ]
}

fn expectation(count: Option<usize>, checks: Vec<Check>) -> Expectation {
    let mut all = vec![Check::Status(StatusFilter::Is(Status::Final))];
    all.extend(checks);
    Expectation {
        at: "t.test.yaml:3:9".into(),
        count,
        checks: all,
    }
}

#[test]
fn every_check_holds_on_the_card_it_describes() {
    let o = budget();
    let checks = [
        Check::Id("call/rta/k-budget-constraints".into()),
        Check::ConversationId("call".into()),
        Check::Pipeline("rta".into()),
        Check::Kind("suggestion".into()),
        Check::Status(StatusFilter::Any),
        Check::Version(1),
        Check::Title(" Budget Constraints\n".into()),
        Check::TitleContains(vec!["Budget".into()]),
        Check::Text("Acknowledge the constraint, then offer a phased rollout.\n".into()),
        Check::TextContains(vec!["phased rollout".into(), "Acknowledge".into()]),
        Check::TextNotContains(vec!["ROI".into()]),
        Check::Sources(vec!["94f876f6e55c".into()]),
        Check::Sources(vec!["we don't have the budget".into()]),
        Check::TopSource("Budget Constraints:".into()),
        Check::Degraded(Degraded::No),
        Check::Model("offline".into()),
        Check::TriggerEvent("tracker_response".into()),
        Check::TriggerTracker("Budget Constraints".into()),
        Check::TriggerOffset(22_250),
        Check::TriggerIsFinal(false),
        Check::TriggerPhrases(vec!["don't have the budget".into()]),
    ];
    for c in &checks {
        assert!(c.holds(&o), "{c:?}");
        assert!(c.diff(&o).iter().all(|l| l.starts_with(['-', '+'])));
    }
    let fails = [
        Check::Status(StatusFilter::Is(Status::Withdrawn)),
        Check::Title("Budget".into()),
        Check::TextContains(vec!["ROI".into()]),
        Check::TextNotContains(vec!["phased".into()]),
        Check::Sources(vec!["Timing".into()]),
        Check::Degraded(Degraded::Yes),
        Check::Degraded(Degraded::Containing("deadline".into())),
        Check::TriggerIsFinal(true),
        Check::TriggerTextContains(vec!["x".into()]),
    ];
    for c in &fails {
        assert!(!c.holds(&o), "{c:?}");
    }
    let mut degraded = budget();
    degraded.degraded = Some("`nebula` would have missed the deadline".into());
    assert!(Check::Degraded(Degraded::Containing("missed the deadline".into())).holds(&degraded));
    assert!(!Check::Degraded(Degraded::No).holds(&degraded));
}

#[test]
fn count_is_exact_and_absent_means_at_least_one() {
    let outs = outputs();
    let suggestions = |count| expectation(count, vec![Check::Kind("suggestion".into())]);
    assert_eq!(suggestions(None).evaluate(&outs), None);
    assert_eq!(suggestions(Some(2)).evaluate(&outs), None);
    let too_few = suggestions(Some(3)).evaluate(&outs).unwrap();
    assert_eq!(
        too_few[0],
        "t.test.yaml:3:9: expected exactly 3 matching outputs, found 2"
    );
    let none = expectation(Some(0), vec![Check::Pipeline("rta".into())])
        .evaluate(&outs)
        .unwrap();
    assert_eq!(
        none[..4],
        [
            "t.test.yaml:3:9: expected no matching output, found 2",
            "  want: pipeline \"rta\"",
            "  matched: call/rta/k-budget-constraints (v1 final; rta suggestion \"Budget Constraints\")",
            "    text: \"Acknowledge the constraint, then offer a phased rollout.\"",
        ]
    );
    // Withdrawn cards are not what the agent sees: not matched unless asked for.
    let mut withdrawn = outputs();
    withdrawn[1].status = Status::Withdrawn;
    assert!(suggestions(Some(1)).evaluate(&withdrawn).is_none());
}

#[test]
fn a_miss_shows_the_closest_output_with_the_differing_fields() {
    let e = expectation(
        None,
        vec![
            Check::Pipeline("rta".into()),
            Check::Title("Budget Constraints".into()),
            Check::TextContains(vec!["ROI".into(), "phased rollout".into()]),
            Check::Degraded(Degraded::No),
        ],
    );
    let lines = e.evaluate(&outputs()).unwrap();
    assert_eq!(
        lines,
        [
            "t.test.yaml:3:9: expected at least one matching output, found 0",
            "  want: pipeline \"rta\", title \"Budget Constraints\", text contains \"ROI\", \"phased rollout\", not degraded",
            "  closest (1 of 3): call/rta/k-budget-constraints (v1 final; rta suggestion \"Budget Constraints\")",
            "    same: status, pipeline, title, degraded",
            "    - expected text to contain \"ROI\"",
            "    + actual text: \"Acknowledge the constraint, then offer a phased rollout.\"",
        ]
    );
}

#[test]
fn outputs_as_close_as_the_closest_are_shown_too() {
    let e = expectation(
        None,
        vec![
            Check::Kind("suggestion".into()),
            Check::TextContains(vec!["ROI".into()]),
        ],
    );
    let lines = e.evaluate(&outputs()).unwrap();
    assert_eq!(
        lines[2..],
        [
            "  closest (1 of 3): call/rta/k-budget-constraints (v1 final; rta suggestion \"Budget Constraints\")",
            "    same: status, kind",
            "    - expected text to contain \"ROI\"",
            "    + actual text: \"Acknowledge the constraint, then offer a phased rollout.\"",
            "  as close (2 of 3): call/rta/k-timing (v1 final; rta suggestion \"Timing\")",
            "    same: status, kind",
            "    - expected text to contain \"ROI\"",
            "    + actual text: \"Ask what is driving the timeline.\"",
        ]
    );
}

#[test]
fn multi_line_texts_are_shown_line_by_line() {
    let e = expectation(
        None,
        vec![
            Check::Kind("summary".into()),
            Check::Text("14 sentences, 75 s.".into()),
        ],
    );
    let lines = e.evaluate(&outputs()).unwrap();
    assert_eq!(
        lines[3..],
        [
            "    same: status, kind",
            "    - expected text: \"14 sentences, 75 s.\"",
            "    + actual text: \"14 sentences, 75 s.\"",
            "                   \"Objections: Budget Constraints\"",
            "                   \"Topics: budget approval\"",
        ]
    );
}

#[test]
fn no_outputs_at_all_is_said_plainly() {
    let e = expectation(None, vec![Check::Kind("summary".into())]);
    let lines = e.evaluate(&[]).unwrap();
    assert_eq!(lines[2], "  closest: none (the run delivered no outputs)");
}

#[test]
fn the_current_output_is_the_last_version_of_each_id() {
    let mut v1 = card(
        "k-questions",
        "open_questions",
        "open_questions",
        "Q (1)",
        "- a",
    );
    v1.trigger.offset_ms = 10;
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.title = Some("Q (2)".into());
    v2.trigger.offset_ms = 20;
    let mut early = card("k-timing", "rta", "suggestion", "Timing", "t");
    early.trigger.offset_ms = 15;
    // Delivered out of order (a sink's queue may coalesce, pipelines overlap).
    let current = current(vec![v2.clone(), early.clone(), v1]);
    assert_eq!(current, [early, v2]);
}
