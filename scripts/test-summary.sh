#!/usr/bin/env bash
# Prints the totals of a `cargo test` log and every SKIP line with its reason.
log=${1:?usage: test-summary.sh LOG}
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .*; ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
skips=$(grep -E '^SKIP: ' "$log" | sort | uniq -c)
nskip=$(grep -cE '^SKIP: ' "$log")
echo
echo "==== cairn test summary ===="
if [ "$nskip" -gt 0 ]; then
  echo "skipped tests and why:"
  echo "$skips"
fi
echo "$passed passed, $failed failed, $nskip skipped"
