#!/usr/bin/env bash
# Regenerates the bridge tests' call audio (tests/fixtures/audio): two tracks of real speech,
# synthesised by espeak-ng and converted by sox to what Twilio Media Streams carry (raw 8 kHz
# mono mu-law, no header). The customer speaks first, then the agent; each track is silent
# while the other speaks, and both last as long. The files are committed: the tests do not
# need espeak-ng or sox, only this script does (apt-get install espeak-ng sox).
set -euo pipefail
cd "$(dirname "$0")/.."
out=tests/fixtures/audio
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

espeak-ng -v en-us -s 165 -w "$tmp/customer.wav" \
  "Hi, I am calling about our renewal. Honestly, it is too expensive, we have no budget this year."
espeak-ng -v en-us+f3 -s 165 -w "$tmp/agent.wav" \
  "I understand. Let me look at the options we have for a smaller plan."

to_ulaw() { sox "$1" -t raw -e mu-law -b 8 -r 8000 -c 1 "$2"; }
to_ulaw "$tmp/customer.wav" "$tmp/customer.raw"
to_ulaw "$tmp/agent.wav" "$tmp/agent.raw"

# Whole 20 ms frames (160 bytes), 0.2 s of silence between the turns; mu-law silence is 0xFF.
frames() { echo $(( ($(stat -c %s "$1") + 159) / 160 )); }
silence() { head -c "$(( $1 * 160 ))" /dev/zero | tr '\0' '\377'; }
pad_to_frames() { cat "$1"; head -c "$(( $2 * 160 - $(stat -c %s "$1") ))" /dev/zero | tr '\0' '\377'; }
c=$(frames "$tmp/customer.raw"); a=$(frames "$tmp/agent.raw"); gap=10
{ pad_to_frames "$tmp/customer.raw" "$c"; silence $(( gap + a )); } > "$out/customer.ulaw"
{ silence $(( c + gap )); pad_to_frames "$tmp/agent.raw" "$a"; } > "$out/agent.ulaw"
ls -l "$out"
