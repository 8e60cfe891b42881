#!/usr/bin/env bash
# The engine's times with notifier sinks that fail (a webhook answering 500, Slack answering 429
# with Retry-After, an SMTP server that is down) against the same bench without sinks, alternating.
#   bash scripts/bench-failing-sinks.sh [RUNS] [ITERATIONS]
# Everything stays on 127.0.0.1; dead letters go to a temporary folder and are counted.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
iterations=${2:-200}
cargo build --release --quiet -p prompter-cli
bin=$PWD/target/release/prompter
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
smtp=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 scripts/failing-services.py "$port" &
stand_in=$!
trap 'kill $stand_in 2>/dev/null; rm -rf "$work"' EXIT
sed -e "s#pipelines/#$PWD/pipelines/#g" -e 's/^engine:$/engine:\n  sink_drain_ms: 2000/' prompter.yaml > "$work/prompter.yaml"
cat >> "$work/prompter.yaml" <<YAML
sinks:
  hook:
    type: webhook
    config: { url: "http://127.0.0.1:$port/hook", secret_env: BENCH_WEBHOOK_SECRET, retry_schedule_ms: [100, 200, 400] }
    take: { kinds: [suggestion] }
    dead_letter: $work/dead/hook.jsonl
  team:
    type: slack
    config: { channel: C0BENCH, token_env: BENCH_SLACK_TOKEN, api_base: "http://127.0.0.1:$port/api", retry_schedule_ms: [1000, 1000] }
    take: { kinds: [suggestion] }
    dead_letter: $work/dead/team.jsonl
  mail:
    type: email
    config: { host: 127.0.0.1, port: $smtp, security: none, from: prompter@example.com, to: team@example.com, retry_schedule_ms: [100] }
    dead_letter: $work/dead/mail.jsonl
YAML
export BENCH_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" BENCH_SLACK_TOKEN=xoxb-bench
sleep 1
for i in $(seq "$runs"); do
  rm -rf "$work/dead"
  echo "== run $i, failing sinks"
  "$bin" bench --config "$work/prompter.yaml" --iterations "$iterations" pipelines/recordings/*.jsonl 2>&1 \
    | grep -E '^(per-event|per-suggestion|sink )'
  echo "dead letters: $(cat "$work"/dead/*.jsonl | wc -l)"
  sleep 2
  echo "== run $i, no sinks"
  "$bin" bench --config prompter.yaml --iterations "$iterations" | grep -E '^(per-event|per-suggestion)'
  sleep 2
done
