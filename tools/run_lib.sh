# Shared by the experiment scripts (tools/few_labels.sh, tools/esvit_results.sh,
# tools/bf16_accuracy.sh); source it after setting OUT (the output directory):
#   log MSG...      prints MSG with the time and appends it to $OUT/log.txt
#   run DIR CMD...  runs CMD (output appended to $OUT/log.txt) unless DIR holds
#                   a finished run (summary.json): reruns of a script resume
#                   where it stopped; with TABLE_ONLY=1 nothing runs (the
#                   scripts then only rebuild their tables from what exists)
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
run() {
    local dir=$1
    shift
    if [ -f "$dir/summary.json" ] || [ "${TABLE_ONLY:-0}" = 1 ]; then return 0; fi
    rm -rf "$dir"
    log "$*"
    "$@" >>"$OUT/log.txt" 2>&1
}
