#!/usr/bin/env bash
# Side by side: `prompter bench` of this checkout against another build of prompter (an older
# commit), alternating runs on the same machine, then the median throughput of each and the ratio.
#   bash scripts/bench-compare.sh OLD_CHECKOUT [RUNS] [ITERATIONS]
# OLD_CHECKOUT is a checkout of the older commit with its release binary built
# (`cargo build --release`); its own prompter.yaml and recordings are used.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: bench-compare.sh OLD_CHECKOUT [RUNS] [ITERATIONS]}
runs=${2:-5}
iterations=${3:-500}
cargo build --release --quiet -p prompter-cli
new_bin=$PWD/target/release/prompter
old_bin=$old/target/release/prompter
[ -x "$old_bin" ] || { echo "error: $old_bin not found: build the old checkout with cargo build --release" >&2; exit 1; }
throughput() { sed -n 's/^throughput: \([0-9]*\) events\/s.*/\1/p'; }
old_all=(); new_all=()
for i in $(seq "$runs"); do
  # A pause after each run: a process that just freed hundreds of MiB leaves the kernel
  # reclaiming and compacting memory, which slows whichever binary runs next (measured: the new
  # one ran at half speed right after the old one, at full speed after itself).
  o=$(cd "$old" && "$old_bin" bench --config prompter.yaml --iterations "$iterations" | throughput)
  sleep 3
  n=$("$new_bin" bench --config prompter.yaml --iterations "$iterations" | throughput)
  sleep 3
  echo "run $i: old $o events/s, new $n events/s"
  old_all+=("$o"); new_all+=("$n")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }
mo=$(median "${old_all[@]}"); mn=$(median "${new_all[@]}")
echo "median: old $mo events/s, new $mn events/s, ratio $(awk -v a="$mn" -v b="$mo" 'BEGIN {printf "%.1fx", a/b}')"
