#!/usr/bin/env bash
# `make test`: every stage runs whatever the others did, then one line per stage (result, seconds) and an
# exit status that is non-zero when any stage failed. Stages are Makefile targets; PY is the interpreter.
set -u
stages=(test-eager test-interpret test-cpu-isa compile-report ptxas-report)
declare -A rc secs
for s in "${stages[@]}"; do
    start=$(date +%s)
    make --no-print-directory "$s"
    rc[$s]=$?
    secs[$s]=$(( $(date +%s) - start ))
done
echo
echo "make test: stage results"
failed=0
for s in "${stages[@]}"; do
    if [ "${rc[$s]}" -eq 0 ]; then r=passed; else r="FAILED (exit ${rc[$s]})"; failed=1; fi
    printf '  %-16s %-18s %5d s\n' "$s" "$r" "${secs[$s]}"
done
exit $failed
