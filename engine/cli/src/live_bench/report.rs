//! The live bench's report: the run reduced to figures (one JSON object) and the same as text.

use std::sync::atomic::Ordering;

use prompter_core::output::fnv1a;
use serde_json::{Value, json};

use super::fakes::{NebulaSide, SymblSide};
use super::script::Script;
use super::{IN_FLIGHT, Run, SETTLE};
use crate::bench_child::{Figures, clock_ticks, spread, spread_text};

/// Latencies in microseconds: engine and wall time, over the window and over the whole run.
#[derive(Default)]
struct Latencies {
    engine_steady: Vec<u64>,
    engine_all: Vec<u64>,
    wall_steady: Vec<u64>,
    wall_all: Vec<u64>,
}

impl Latencies {
    fn sort(&mut self) {
        for v in [
            &mut self.engine_steady,
            &mut self.engine_all,
            &mut self.wall_steady,
            &mut self.wall_all,
        ] {
            v.sort_unstable();
        }
    }

    fn figures(&self) -> Value {
        json!({"engine": {"steady": spread(&self.engine_steady), "whole_run": spread(&self.engine_all)},
            "wall": {"steady": spread(&self.wall_steady), "whole_run": spread(&self.wall_all)}})
    }
}

/// What the frames sent amount to: (frames, events the engine must count).
fn frames_and_events(run: &Run, script: &Script) -> (u64, u64) {
    let (mut frames, mut events) = (0, 0);
    for call in &run.placed {
        let recording = &script.recordings[call.recording];
        for (f, sent) in recording.frames.iter().zip(call.sent_ns.iter()) {
            if sent.load(Ordering::Relaxed) != 0 {
                frames += 1;
                events += u64::from(f.events);
            }
        }
    }
    (frames, events)
}

/// Engine and wall time of every final output, overall and by pipeline; and how many finals
/// matched no frame sent.
fn latencies(run: &Run, script: &Script) -> (Latencies, Vec<Latencies>, u64) {
    let log = &run.outputs;
    let mut all = Latencies::default();
    let mut by: Vec<Latencies> = log.pipelines.iter().map(|_| Latencies::default()).collect();
    let mut unmatched = 0;
    let steady = |ns: u64| (run.window.0..=run.window.1).contains(&ns);
    for f in &log.finals {
        let sent = run.placed.get(f.call as usize).and_then(|call| {
            let frames = &script.recordings[call.recording].frames;
            frames
                .iter()
                .zip(call.sent_ns.iter())
                .filter(|(frame, _)| frame.triggers.contains(&f.trigger))
                .map(|(_, sent)| sent.load(Ordering::Relaxed))
                .filter(|sent| *sent != 0 && *sent <= f.read_ns)
                .max()
        });
        for l in [&mut all, &mut by[f.pipeline]] {
            l.engine_all.push(f.engine_us);
            if let Some(sent) = sent {
                let wall = (f.read_ns - sent) / 1000;
                l.wall_all.push(wall);
                if steady(sent) {
                    l.engine_steady.push(f.engine_us);
                    l.wall_steady.push(wall);
                }
            }
        }
        unmatched += u64::from(sent.is_none());
    }
    all.sort();
    by.iter_mut().for_each(Latencies::sort);
    (all, by, unmatched)
}

/// Final cards expected (from the calibration), ended final, lost and unexpected; for an engine
/// stopped under load, of the calls whose recording it received whole.
fn cards(run: &Run) -> (u64, u64, u64, u64) {
    let finals = run.outputs.final_cards();
    let (mut expected, mut got, mut lost, mut unexpected) = (0, 0, 0, 0);
    for (number, call) in run.placed.iter().enumerate() {
        if run.terminated && !call.done() {
            continue;
        }
        let want = &run.expected[call.recording];
        let have = u32::try_from(number)
            .ok()
            .and_then(|n| finals.get(&n))
            .cloned()
            .unwrap_or_default();
        expected += want.len() as u64;
        got += have.len() as u64;
        lost += want.difference(&have).count() as u64;
        unexpected += have.difference(want).count() as u64;
    }
    (expected, got, lost, unexpected)
}

/// What the fault did, what the engine says it did about it, and whether that adds up: for the
/// sink stall, every output that went final reached the webhook or its dead letters; for
/// SIGTERM, every output the engine says it printed was read. `Null` and true without a fault.
fn fault_figures(run: &Run, symbl: &SymblSide, nebula: &NebulaSide) -> (Value, bool) {
    let Some(fault) = run.fault else {
        return (Value::Null, true);
    };
    let switch = &symbl.fault;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let secs = |ns: u64| ns as f64 / 1e9;
    let (start, end) = run.fault_ns.unwrap_or_default();
    let mut engine = serde_json::Map::new();
    if let Ok(s) = &run.scraped {
        for (key, value) in &s.outcomes {
            engine.insert((*key).to_owned(), (*value).into());
        }
    }
    let mut ok = run.fault_ns.is_some();
    let mut out = json!({"kind": fault.name(), "what": fault.what(),
        "started_s_into_window": secs(start.saturating_sub(run.window.0)),
        "lasted_s": secs(end.saturating_sub(start)),
        "injected": {"sockets_dropped_or_frozen": n(&switch.sockets_hit),
            "requests_failed_held_or_stalled": n(&switch.requests_hit),
            "frames_sent_again": n(&switch.frames_replayed),
            "token_requests_refused": n(&switch.tokens_refused),
            "tokens_issued": n(&switch.tokens_issued),
            "subscribes_refused": n(&symbl.counts.refused)},
        "engine_says": engine});
    if fault == super::Fault::SinkStall {
        let delivered = super::faults::delivered_ids(&nebula.webhook);
        let dead: std::collections::HashSet<u64> = run
            .dead_letters
            .iter()
            .map(|(id, _)| fnv1a(id.as_bytes()))
            .collect();
        let taken = run.outputs.finalized();
        let reached = run
            .outputs
            .count_finalized(|id| delivered.contains(&id) || dead.contains(&id));
        let missing = taken.saturating_sub(reached);
        ok &= missing == 0;
        out["sink"] = json!({"outputs_final": taken, "delivered": delivered.len(),
            "dead_lettered": run.dead_letters.len(), "missing": missing});
    }
    if run.terminated {
        let said = run
            .stderr
            .stopped
            .as_deref()
            .and_then(super::stopped_counts);
        let calls_cut = run.placed.iter().filter(|c| !c.done()).count();
        let printed = said.map(|(_, outputs)| outputs);
        ok &= printed == Some(run.outputs.lines);
        out["stopped"] = json!({"line": run.stderr.stopped, "events": said.map(|(e, _)| e),
            "outputs_printed": printed, "outputs_read": run.outputs.lines,
            "calls_cut": calls_cut});
    }
    (out, ok)
}

/// The report, as one JSON object, and whether the run passed: no call failed, every event
/// received, no output lost or duplicated, the engine exited with 0.
pub(super) fn figures(
    run: &Run,
    script: &Script,
    symbl: &SymblSide,
    nebula: &NebulaSide,
) -> (Value, bool) {
    let n = run.calls;
    let log = &run.outputs;
    let (frames_sent, events_expected) = frames_and_events(run, script);
    let scraped = run.scraped.as_ref().ok();
    let received = scraped.map(|s| s.events);
    let events_lost = received.map(|r| events_expected.saturating_sub(r));
    let events_extra = received.map(|r| r.saturating_sub(events_expected));
    let (cards_expected, cards_final, cards_lost, cards_unexpected) = cards(run);
    let (lat, by_pipeline, unmatched) = latencies(run, script);
    let calls_completed = symbl.counts.completed.load(Ordering::Relaxed);
    let sockets = symbl.counts.sockets.load(Ordering::Relaxed);
    let samples = run.rss_samples.len().max(1) as u64;
    let rss_loaded = run.rss_samples.iter().sum::<u64>() / samples;
    let rss_max = run.rss_samples.iter().copied().max().unwrap_or(0);
    let live_min = run.live_samples.iter().copied().min().unwrap_or(0);
    let live_mean = run.live_samples.iter().sum::<u64>() as f64 / samples as f64;
    let (hz, hz_read) = clock_ticks();
    let secs = |ticks: u64| ticks as f64 / hz;
    let share = |ticks: u64| 100.0 * secs(ticks) / run.window_s.max(1e-9);
    let (c0, c1) = &run.cpu;
    let engine_cpu = c1.child.saturating_sub(c0.child);
    let thread = |i: usize| share(c1.threads[i].saturating_sub(c0.threads[i]));
    let exit_ok = run.exit.as_ref().is_ok_and(|s| s.code() == Some(0));
    let (fault, fault_ok) = fault_figures(run, symbl, nebula);
    let unfinished = log.unfinished();
    let ok = exit_ok
        && fault_ok
        && unfinished == 0
        && run.errors.count == 0
        && events_lost == Some(0)
        && events_extra == Some(0)
        && log.duplicates == 0
        && cards_lost == 0
        && log.unreadable == 0;
    let recordings: Vec<Value> = script
        .recordings
        .iter()
        .zip(&run.calibration)
        .map(|(r, cal)| {
            json!({"name": r.name, "frames": r.frames.len(), "length_s": r.length.as_secs_f64(),
                "final_cards": cal.iter().map(|(p, k)| json!({"pipeline": p, "cards": k})).collect::<Vec<_>>()})
        })
        .collect();
    // Split in parts: one `json!` this size exceeds the macro recursion limit.
    let setup = json!({"calls": n, "seconds": run.seconds, "speed": script.speed,
        "interim_words": run.interim_words, "frames_per_s_per_call": script.frames_per_second(), "stagger_s": run.stagger.as_secs_f64(),
        "settle_s": SETTLE.as_secs_f64(), "in_flight_max": IN_FLIGHT, "window_s": run.window_s,
        "cores": std::thread::available_parallelism().map_or(1, |c| c.get()),
        "open_files_limit": run.open_files, "clock_ticks_per_s": hz,
        "clock_ticks_assumed": !hz_read, "recordings": recordings});
    let calls = json!({"placed": run.placed.len(), "completed": calls_completed,
        "failed": run.errors.count, "first_errors": run.errors.first,
        "live_in_window": {"min": live_min, "mean": live_mean},
        "subscribe_sockets": sockets, "reconnects": sockets.saturating_sub(run.placed.len() as u64),
        "sockets_dropped": symbl.counts.dropped.load(Ordering::Relaxed),
        "refused": symbl.counts.refused.load(Ordering::Relaxed), "unknown": symbl.counts.unknown.load(Ordering::Relaxed)});
    let events = json!({"frames_sent": frames_sent, "expected": events_expected,
        "received": received, "lost": events_lost, "unexpected": events_extra,
        "metrics_error": run.scraped.as_ref().err()});
    let overload = json!({"waits": scraped.map(|s| s.overload_waits),
        "runs_shed": scraped.map(|s| s.runs_shed)});
    let outputs = json!({"lines": log.lines, "drafts": log.drafts, "finals": log.finals.len(),
        "unfinished": unfinished,
        "withdrawn": log.withdrawn, "duplicated": log.duplicates, "unreadable": log.unreadable,
        "foreign": log.foreign, "finals_matching_no_frame": unmatched,
        "cards": {"expected": cards_expected, "final": cards_final, "lost": cards_lost,
            "unexpected": cards_unexpected}});
    let mut latency = lat.figures();
    latency["by_pipeline"] = log
        .pipelines
        .iter()
        .zip(&by_pipeline)
        .map(|(p, l)| (p.clone(), l.figures()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let exit = match &run.exit {
        Ok(s) => s.to_string(),
        Err(e) => e.clone(),
    };
    let cpu = json!({"window_s": secs(engine_cpu), "pct_of_core": share(engine_cpu),
        "pct_of_core_per_call": share(engine_cpu) / n as f64,
        "whole_run_s": secs(run.engine_cpu_total)});
    let rss = json!({"idle_kib": run.rss_idle, "after_calibration_kib": run.rss_warm,
        "loaded_mean_kib": rss_loaded, "loaded_max_kib": rss_max, "vmhwm_kib": run.hwm,
        "per_call_kib": rss_loaded.saturating_sub(run.rss_idle) as f64 / n as f64,
        "per_live_call_kib": rss_loaded.saturating_sub(run.rss_idle) as f64 / live_mean.max(1.0)});
    let engine = json!({"pid": run.pid, "startup_s": run.startup_s, "ingest_s": run.ingest_s,
        "cpu": cpu, "rss": rss, "exit": exit, "stderr_lines": run.stderr.total,
        "warnings": run.stderr.complaints, "first_warnings": run.stderr.first_complaints});
    let nebula = json!({"embeds": nebula.embeds.load(Ordering::Relaxed),
        "chats": nebula.chats.load(Ordering::Relaxed),
        "streamed_whole": nebula.streamed.load(Ordering::Relaxed),
        "streams_cut": nebula.cut.load(Ordering::Relaxed),
        "refused": nebula.refused.load(Ordering::Relaxed),
        "malformed": nebula.malformed.load(Ordering::Relaxed)});
    let bench = json!({"cpu_pct_of_core": share(c1.bench.saturating_sub(c0.bench)),
        "fake_symbl_cpu_pct_of_core": thread(0), "fake_nebula_cpu_pct_of_core": thread(1),
        "output_reader_cpu_pct_of_core": thread(2)});
    let report = json!({"setup": setup, "calls": calls, "events": events, "overload": overload,
        "outputs": outputs, "fault": fault,
        "latency": latency, "engine": engine, "nebula": nebula, "bench": bench, "ok": ok});
    (report, ok)
}

/// The fault's lines of the text report (none without a fault).
fn fault_text(f: &Value) -> Vec<String> {
    if f.is_null() {
        return Vec::new();
    }
    let pairs = |v: &Value| -> String {
        v.as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut lines = vec![
        format!(
            "fault `{}`: {}; from {:.1} s into the window for {:.1} s",
            f["kind"].as_str().unwrap_or(""),
            f["what"].as_str().unwrap_or(""),
            f["started_s_into_window"].as_f64().unwrap_or(0.0),
            f["lasted_s"].as_f64().unwrap_or(0.0)
        ),
        format!("  injected: {}", pairs(&f["injected"])),
        format!("  the engine's metrics: {}", pairs(&f["engine_says"])),
    ];
    if !f["sink"].is_null() {
        lines.push(format!("  webhook sink: {}", pairs(&f["sink"])));
    }
    if !f["stopped"].is_null() {
        lines.push(format!("  SIGTERM: {}", pairs(&f["stopped"])));
    }
    lines
}

/// The report as text, one line per figure.
pub(super) fn text(r: &Value) -> Vec<String> {
    let v = Figures(r);
    let n = v.u("/setup/calls");
    let mut lines = vec![
        format!(
            "live bench: {n} call(s) at a time, back to back, over a {:.1} s steady window (from {} s after every slot's first call went live); recordings at {:.2}x real time with an interim caption every {} words (0: none) = {:.2} frames/s per call; first calls spread over {:.0} s",
            v.f("/setup/window_s"),
            v.f("/setup/settle_s"),
            v.f("/setup/speed"),
            v.u("/setup/interim_words"),
            v.f("/setup/frames_per_s_per_call"),
            v.f("/setup/stagger_s")
        ),
        format!(
            "engine = child `prompter run` (pid {}), up in {:.2} s; knowledge base ingested through the fake Nebula in {:.2} s; open files limit {}",
            v.u("/engine/pid"),
            v.f("/engine/startup_s"),
            v.f("/engine/ingest_s"),
            r["setup"]["open_files_limit"]
        ),
        format!(
            "calls: {} placed ({} for calibration), {} completed, {} failed; live in the window: min {}, mean {:.0}; {} Subscribe socket(s), {} reconnect(s), {} dropped, {} refused, {} unknown",
            v.u("/calls/placed"),
            r["setup"]["recordings"].as_array().map_or(0, Vec::len),
            v.u("/calls/completed"),
            v.u("/calls/failed"),
            v.u("/calls/live_in_window/min"),
            v.f("/calls/live_in_window/mean"),
            v.u("/calls/subscribe_sockets"),
            v.u("/calls/reconnects"),
            v.u("/calls/sockets_dropped"),
            v.u("/calls/refused"),
            v.u("/calls/unknown")
        ),
    ];
    let calibration: Vec<String> = r["setup"]["recordings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|rec| {
            let cards: Vec<String> = rec["final_cards"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| format!("{} {}", c["pipeline"].as_str().unwrap_or(""), c["cards"]))
                .collect();
            format!(
                "{} ({} frames, {:.1} s): {}",
                rec["name"].as_str().unwrap_or(""),
                rec["frames"],
                rec["length_s"].as_f64().unwrap_or(0.0),
                cards.join(", ")
            )
        })
        .collect();
    lines.push(format!(
        "final cards per call, calibrated: {}",
        calibration.join("; ")
    ));
    lines.extend([
        format!(
            "events: {} frames sent -> {} events expected, {} received by the engine (prompter_events_received_total, source symbl): {} lost, {} unexpected",
            v.u("/events/frames_sent"),
            v.u("/events/expected"),
            r["events"]["received"],
            r["events"]["lost"],
            r["events"]["unexpected"]
        ),
        format!(
            "engine overload (engine.overload): {} run(s) waited for a run slot, {} shed",
            r["overload"]["waits"], r["overload"]["runs_shed"]
        ),
        format!(
            "outputs: {} line(s): {} draft, {} final, {} withdrawn; {} duplicated (id, version), {} unreadable, {} of other conversations",
            v.u("/outputs/lines"),
            v.u("/outputs/drafts"),
            v.u("/outputs/finals"),
            v.u("/outputs/withdrawn"),
            v.u("/outputs/duplicated"),
            v.u("/outputs/unreadable"),
            v.u("/outputs/foreign")
        ),
        format!(
            "final cards: {} expected, {} final, {} lost, {} unexpected",
            v.u("/outputs/cards/expected"),
            v.u("/outputs/cards/final"),
            v.u("/outputs/cards/lost"),
            v.u("/outputs/cards/unexpected")
        ),
    ]);
    for (key, what) in [
        (
            "engine",
            "engine time (trigger received -> output, less LLM and embedder waits)",
        ),
        (
            "wall",
            "wall time (fake Symbl's send of the trigger -> output line read here)",
        ),
    ] {
        let l = &r["latency"][key];
        lines.push(format!(
            "{what}, steady window: {}",
            spread_text(&l["steady"], "finals")
        ));
        lines.push(format!(
            "  whole run: {}",
            spread_text(&l["whole_run"], "finals")
        ));
    }
    for (p, l) in r["latency"]["by_pipeline"]
        .as_object()
        .into_iter()
        .flatten()
    {
        lines.push(format!(
            "  {p}, steady window: engine {}; wall {}",
            spread_text(&l["engine"]["steady"], "finals"),
            spread_text(&l["wall"]["steady"], "finals")
        ));
    }
    lines.extend([
        format!(
            "engine CPU over the window: {:.2} s user+sys = {:.1}% of one core, {:.3}% per call ({} ticks/s{})",
            v.f("/engine/cpu/window_s"),
            v.f("/engine/cpu/pct_of_core"),
            v.f("/engine/cpu/pct_of_core_per_call"),
            v.f("/setup/clock_ticks_per_s"),
            if r["setup"]["clock_ticks_assumed"] == true {
                ", assumed: getconf CLK_TCK failed"
            } else {
                ""
            }
        ),
        format!(
            "engine memory: RSS {:.1} MiB idle, {:.1} MiB after the calibration, {:.1} MiB mean / {:.1} MiB max in the window -> {:.1} KiB per call ({:.1} KiB per call live on average); peak (VmHWM) {:.1} MiB",
            v.mib("/engine/rss/idle_kib"),
            v.mib("/engine/rss/after_calibration_kib"),
            v.mib("/engine/rss/loaded_mean_kib"),
            v.mib("/engine/rss/loaded_max_kib"),
            v.f("/engine/rss/per_call_kib"),
            v.f("/engine/rss/per_live_call_kib"),
            v.mib("/engine/rss/vmhwm_kib")
        ),
        format!(
            "fake Nebula: {} embedding(s), {} streamed answer(s): {} whole, {} cut short; {} refused, {} malformed",
            v.u("/nebula/embeds"),
            v.u("/nebula/chats"),
            v.u("/nebula/streamed_whole"),
            v.u("/nebula/streams_cut"),
            v.u("/nebula/refused"),
            v.u("/nebula/malformed")
        ),
        format!(
            "bench process CPU over the window: {:.1}% of one core (fake Symbl {:.1}%, fake Nebula {:.1}%, output reader {:.1}%); {} cores shared with the engine",
            v.f("/bench/cpu_pct_of_core"),
            v.f("/bench/fake_symbl_cpu_pct_of_core"),
            v.f("/bench/fake_nebula_cpu_pct_of_core"),
            v.f("/bench/output_reader_cpu_pct_of_core"),
            v.u("/setup/cores")
        ),
        format!(
            "engine: {}; {} stderr line(s), {} warning/error line(s)",
            v.s("/engine/exit"),
            v.u("/engine/stderr_lines"),
            v.u("/engine/warnings")
        ),
    ]);
    for (pointer, what) in [
        ("/engine/first_warnings", "stderr"),
        ("/calls/first_errors", "call error"),
    ] {
        for l in r
            .pointer(pointer)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            lines.push(format!("  {what}: {}", l.as_str().unwrap_or("")));
        }
    }
    if let Some(e) = r["events"]["metrics_error"].as_str() {
        lines.push(format!("  metrics: {e}"));
    }
    lines.extend(fault_text(&r["fault"]));
    lines.push(format!(
        "outputs begun and never finished (latest version a draft): {}",
        r["outputs"]["unfinished"]
    ));
    if r["ok"] != true {
        lines.push(
            "FAILED: see failed calls, lost or unexpected events, lost or duplicated outputs, or the engine's exit above".into(),
        );
    }
    lines
}
