# Shared by the GPU scripts (sourced): log helpers over $LOG (everything) and $SUMMARY (the figures).
say() { echo "$*" | tee -a "$SUMMARY" "$LOG"; }
stage() {  # stage NAME SECONDS CMD...: run with a timeout, log everything, report the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "### $name: $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  say "[$name] exit $rc in $((SECONDS - t0)) s"
  return $rc
}
