#!/usr/bin/env bash
# gpu-smoke.sh: onecard on the lab's real NVIDIA GPU with CUDA vLLM: what CI can only simulate.
#
#   scripts/gpu-smoke.sh [MODEL]
#
# Steps (STEPS, default "basic pair level2 judge lease"); each prints PASS or FAIL and its seconds:
#
#   basic   one small model (MODEL, default Qwen/Qwen2.5-0.5B-Instruct) in a one-model registry:
#           cold start, decode tokens/s of a streamed 256-token request, level-1 sleep (the GPU memory
#           it frees) and wake, the gateway's NVML readings, and no engine left after the gateway stops.
#   pair    with the lab's registry (LAB_REGISTRY, default the repository's model_registry.yaml): two
#           engines side by side on the card (PAIR, default "llama-3.1-8b-fp8 phi-3-mini-fp8"), both answer.
#   level2  the first of the pair put to sleep at level 2 and woken through the admin routes; a greedy
#           probe's token ids before and after must be the same (the weights were reloaded).
#   judge   the 70B judge (JUDGE, default llama-3.1-70b-awq) started alone with its CPU offload; it
#           answers, and the card's used memory stays within the budget.
#   lease   `onecard lease --gib LEASE_GIB` (default 16) evicts what it must; the lease holder sees
#           that much free memory; after it ends the pair answers again.
#
# The lab steps need the lab registry's models in the Hugging Face cache (or the network: about
# 60 GB to download) and take 10-40 minutes, mostly the judge's start. Exit status 0 when every
# check passed.
#
# Environment:
#   ONECARD        the onecard command (default: the repository's .venv/bin/onecard, else PATH)
#   VLLM           the CUDA vllm command (default: /opt/vllm/bin/vllm, else PATH)
#   STEPS          which steps to run, in this order (e.g. STEPS=basic for the quick check)
#   LAB_REGISTRY   the registry for pair, level2, judge and lease; its vllm.executable is replaced by VLLM
#   PAIR, JUDGE, LEASE_GIB   as above
#   PARAMS_B       billions of parameters, needed for a hub id other than the default (planner input)
#   MAX_MODEL_LEN  context per sequence in the basic step (default 4096)
#   KEEP_WORK=1    keep the work folder (registries, gateway and engine logs) even after success
#   SMOKE_TIMEOUT_S  the run's limit (default 470 for STEPS=basic, else 3600); the cleanup then has 110 s
set -euo pipefail
export LC_ALL=C  # EPOCHREALTIME and awk with a '.' decimal point

# One wall-clock limit for everything. At the limit, SIGTERM: the EXIT trap runs once the current
# request returns (each has --max-time 60 at most, but the first) and stops the gateway (40 s at most).
if [[ -z ${_ONECARD_SMOKE_GUARD:-} ]]; then
  export _ONECARD_SMOKE_GUARD=1
  STEPS=${STEPS:-basic pair level2 judge lease}
  export STEPS
  if [[ $STEPS == basic ]]; then limit=${SMOKE_TIMEOUT_S:-470}; else limit=${SMOKE_TIMEOUT_S:-3600}; fi
  exec timeout --kill-after=110 "$limit" "$BASH" "$0" "$@"
fi

DEFAULT_MODEL=Qwen/Qwen2.5-0.5B-Instruct
MODEL=${1:-$DEFAULT_MODEL}
NAME=smoke
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
DECODE_TOKENS=256
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

FAILED=()
RESULTS=()      # one "PASS|FAIL step seconds detail" line per step, for the summary
GW_PID=""
CLIENT_PID=""   # a request running in the background
ENGINE_PIDS=()  # engines start in their own process group: pid = process group id

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
check() {  # check NAME CONDITION-EXIT-STATUS MESSAGE
  if [[ $2 == 0 ]]; then log "ok:   $1"; else log "FAIL: $1: $3"; FAILED+=("$1"); fi
}
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# step NAME FUNCTION: run one step, print PASS or FAIL with its seconds (a step fails on its first error)
step() {
  local name=$1 t0=$EPOCHREALTIME rc=0 before=${#FAILED[@]}
  log "--- step $name"
  "$2" || rc=$?
  local took
  took=$(seconds_since "$t0")
  if ((rc == 0 && ${#FAILED[@]} == before)); then
    RESULTS+=("PASS $name ${took}s")
    log "PASS $name (${took} s)"
  else
    ((rc == 0)) || FAILED+=("$name")
    RESULTS+=("FAIL $name ${took}s")
    log "FAIL $name (${took} s)"
  fi
}

# --- preflight ----------------------------------------------------------------------------------------

[[ -n ${EPOCHREALTIME:-} ]] || die "bash 5 or newer is needed (EPOCHREALTIME)"
for tool in nvidia-smi curl timeout awk; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH"
done
if [[ -z ${ONECARD:-} ]]; then
  if [[ -x $REPO/.venv/bin/onecard ]]; then ONECARD=$REPO/.venv/bin/onecard; else ONECARD=$(command -v onecard || true); fi
fi
if [[ -z ${VLLM:-} ]]; then
  if [[ -x /opt/vllm/bin/vllm ]]; then VLLM=/opt/vllm/bin/vllm; else VLLM=$(command -v vllm || true); fi
fi
[[ -n $ONECARD && -x $ONECARD ]] || die "no onecard command: set ONECARD=/path/to/venv/bin/onecard"
[[ -n $VLLM && -x $VLLM ]] || die "no vllm command: set VLLM=/path/to/vllm-venv/bin/vllm"
PY=$(dirname "$ONECARD")/python
[[ -x $PY ]] || PY=$(command -v python3) || die "no python3 to pick a free port"

GPU_NAME=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
GPU_MIB=$(timeout 20 nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
BUDGET_GIB=$((GPU_MIB / 1024))
log "GPU 0: $GPU_NAME, $GPU_MIB MiB (budget $BUDGET_GIB GiB); onecard: $ONECARD; vllm: $VLLM"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/onecard-smoke.XXXXXX")

# --- cleanup: whatever happens, the gateway and its engines go ------------------------------------------

stop_gateway() {  # SIGTERM (drain, stop engines), wait up to $1 s, then SIGKILL
  [[ -n $GW_PID ]] && kill -0 "$GW_PID" 2>/dev/null || return 0
  kill -TERM "$GW_PID" 2>/dev/null || true
  local deadline=$((SECONDS + $1))
  while kill -0 "$GW_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
  if kill -0 "$GW_PID" 2>/dev/null; then
    log "the gateway did not exit $1 s after SIGTERM; sending SIGKILL"
    kill -KILL "$GW_PID" 2>/dev/null || true
    return 1
  fi
}
engine_field() {  # engine_field FIELD JSON: a number from this model's row in /admin/engines
  grep -o "{\"model\":\"$NAME\"[^}]*" <<<"$2" | grep -o "\"$1\":[0-9][0-9]*" | cut -d: -f2
}
engine_groups() {  # the engines this run's gateways started: what they reported, and their state files
  local state
  printf '%s\n' "${ENGINE_PIDS[@]}"
  for state in "$WORK"/run/state/engines.json "$WORK"/lab-run/state/engines.json; do
    [[ -f $state ]] && grep -o '"pgid": *[0-9]*' "$state" | grep -o '[0-9]*$'
  done
  return 0
}
cleanup() {
  local rc=$?
  [[ -n $CLIENT_PID ]] && { kill "$CLIENT_PID" 2>/dev/null || true; }
  stop_gateway 40 || true
  for pgid in $(engine_groups | sort -u); do
    if pgrep -g "$pgid" >/dev/null 2>&1; then kill -KILL -- "-$pgid" 2>/dev/null || true; fi
  done
  if ((rc == 0 && ${#FAILED[@]} == 0)) && [[ -z ${KEEP_WORK:-} ]]; then
    rm -rf "$WORK"
  else
    log "registry and logs kept in $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the gateway: one at a time, on a free port, no keys (127.0.0.1 only, for this run) --------------------

start_gateway() {  # start_gateway REGISTRY RUN_DIR LOG: sets GW_PID and BASE, waits for /health
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  BASE=http://127.0.0.1:$PORT
  GW_LOG=$3
  env -u ONECARD_API_KEYS -u ONECARD_ADMIN_KEYS \
    "$ONECARD" serve --registry "$1" --host 127.0.0.1 --port "$PORT" --run-dir "$2" >"$GW_LOG" 2>&1 &
  GW_PID=$!
  log "gateway pid $GW_PID on $BASE (log: $GW_LOG)"
  local deadline=$((SECONDS + 60))
  until curl -fsS --max-time 2 "$BASE/health" >/dev/null 2>&1; do
    kill -0 "$GW_PID" 2>/dev/null || { tail -n 30 "$GW_LOG" >&2; die "the gateway exited at start"; }
    ((SECONDS < deadline)) || die "no /health within 60 s"
    sleep 0.5
  done
}

diagnose() {  # diagnose [MODEL]: the engine's log tail and the gateway's, to stderr
  log "engine log (tail):"
  curl -sS --max-time 10 "$BASE/admin/engines/${1:-$NAME}/log?lines=60" >&2 || true
  log "gateway log (tail):"
  tail -n 30 "$GW_LOG" >&2 || true
}

# complete MAX_TOKENS MAX_TIME [MODEL]: a non-streamed completion; fails unless HTTP 200 with x-onecard-model.
complete() {
  local code model=${3:-$NAME}
  code=$(curl -sS --max-time "$2" -o "$WORK/body.json" -D "$WORK/headers.txt" -w '%{http_code}' \
    -H 'Content-Type: application/json' "$BASE/v1/completions" \
    -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": $1, \"temperature\": 0}") || code=000
  [[ $code == 200 ]] || { log "HTTP $code: $(head -c 400 "$WORK/body.json" 2>/dev/null)"; diagnose "$model"; return 1; }
  grep -qi '^x-onecard-model:' "$WORK/headers.txt" || { log "no x-onecard-model header"; return 1; }
}

gpu_used_mib() { timeout 20 nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }

stop_and_check_leftovers() {  # stop this gateway, then fail if any engine process it started is left
  log "stopping the gateway (SIGTERM)"
  local t0=$EPOCHREALTIME stopped=0 left="" pgid pid gpu_pids
  # the engines running now, as the gateway reports them (evicted ones it already stopped)
  mapfile -t -O "${#ENGINE_PIDS[@]}" ENGINE_PIDS < <(curl -fsS --max-time 10 "$BASE/admin/engines" 2>/dev/null |
    grep -o '"pid":[0-9][0-9]*' | cut -d: -f2)
  stop_gateway 60 || stopped=$?
  check "gateway exited on SIGTERM" "$stopped" "killed after 60 s"
  STOP_S=$(seconds_since "$t0")
  GW_PID=""
  for pgid in $(engine_groups | sort -u); do
    left+=$(pgrep -g "$pgid" 2>/dev/null | tr '\n' ' ' || true)
    kill -0 "$pgid" 2>/dev/null && left+="$pgid "
  done
  if [[ -n ${ENGINE_PORT:-} ]]; then left+=$(pgrep -f -- "--port $ENGINE_PORT( |$)" 2>/dev/null | tr '\n' ' ' || true); fi
  gpu_pids=$(timeout 20 nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null || true)
  for pid in "${ENGINE_PIDS[@]}"; do grep -qx "$pid" <<<"$gpu_pids" && left+="gpu:$pid "; done
  check "no engine process left" "$([[ -z ${left// /} ]]; echo $?)" "still running: $left"
}

# --- step basic: one small model, its own registry -------------------------------------------------------

basic() {
  local registry=$WORK/model_registry.yaml source figures
  if [[ -d $MODEL ]]; then
    source=$(cd "$MODEL" && pwd)
    figures=""  # the planner reads the folder's config.json
  elif [[ $MODEL == "$DEFAULT_MODEL" ]]; then
    source=$MODEL
    figures="    architecture: {num_hidden_layers: 24, hidden_size: 896, intermediate_size: 4864,
                   num_attention_heads: 14, num_key_value_heads: 2, vocab_size: 151936,
                   tie_word_embeddings: true, max_position_embeddings: 32768}"
  else
    source=$MODEL
    figures="    params_b: ${PARAMS_B:?set PARAMS_B (billions of parameters) for a hub id other than $DEFAULT_MODEL}"
  fi
  cat >"$registry" <<REGISTRY
# Written by scripts/gpu-smoke.sh
version: 1
gpu: {budget_gib: $BUDGET_GIB, headroom_gib: 1, platform: cuda, host_ram_for_sleep_gib: 16}
vllm: {executable: "$VLLM"}
models:
  - name: $NAME
    source: "$source"
    max_model_len: $MAX_MODEL_LEN
    concurrent_seqs: 4
    sleep_level: 1
    start_timeout_s: 420
$figures
REGISTRY
  timeout 60 "$ONECARD" check "$registry" >&2 || die "onecard check rejected $registry"
  start_gateway "$registry" "$WORK/run" "$WORK/gateway.log"

  # cold start
  log "cold start: the first request starts the engine (weights may download first)"
  local t0=$EPOCHREALTIME engines
  complete 8 400 &
  CLIENT_PID=$!
  # Watch the start: note the engine's pid as soon as it has one, fail fast when it fails.
  while kill -0 "$CLIENT_PID" 2>/dev/null; do
    engines=$(curl -fsS --max-time 5 "$BASE/admin/engines" 2>/dev/null || true)
    ((${#ENGINE_PIDS[@]} > 0)) || mapfile -t ENGINE_PIDS < <(engine_field pid "$engines")
    if [[ $engines == *'"state":"failed"'* ]]; then diagnose; die "the engine failed to start"; fi
    kill -0 "$GW_PID" 2>/dev/null || { diagnose; die "the gateway exited"; }
    sleep 1
  done
  wait "$CLIENT_PID" || die "the first request failed"
  CLIENT_PID=""
  COLD_S=$(seconds_since "$t0")
  log "cold start: ${COLD_S} s"
  engines=$(curl -fsS --max-time 10 "$BASE/admin/engines")
  mapfile -t ENGINE_PIDS < <(engine_field pid "$engines")
  ENGINE_PORT=$(engine_field port "$engines")
  [[ ${#ENGINE_PIDS[@]} == 1 && -n $ENGINE_PORT ]] || die "/admin/engines shows no running engine: $engines"
  log "engine pid ${ENGINE_PIDS[*]} on port $ENGINE_PORT"
  log "record: $(curl -fsS --max-time 10 "$BASE/v1/models/$NAME")"

  # decode rate
  local first="" last="" chunks=0 tokens="" line now
  t0=$EPOCHREALTIME
  while IFS= read -r line; do
    now=$EPOCHREALTIME
    [[ $line == 'data: [DONE]'* ]] && break
    if [[ $line == *'"completion_tokens":'* ]]; then
      tokens=${line##*\"completion_tokens\":}
      tokens=${tokens%%[,\}]*}
    fi
    if [[ $line == 'data: '*'"text":"'* && $line != *'"text":""'* ]]; then
      [[ -z $first ]] && first=$now
      last=$now
      chunks=$((chunks + 1))
    fi
  done < <(curl -sSN --max-time 60 -H 'Content-Type: application/json' "$BASE/v1/completions" -d "{
    \"model\": \"$NAME\", \"prompt\": \"Write a long story about a lighthouse keeper.\",
    \"max_tokens\": $DECODE_TOKENS, \"temperature\": 0, \"ignore_eos\": true, \"stream\": true,
    \"stream_options\": {\"include_usage\": true}}")
  ((chunks > 1)) || { diagnose; die "the streamed request returned $chunks text chunks"; }
  tokens=${tokens:-$chunks}
  TTFT_S=$(awk -v a="$t0" -v b="$first" 'BEGIN { printf "%.3f", b - a }')
  DECODE_TPS=$(awk -v a="$first" -v b="$last" -v n="$tokens" 'BEGIN { printf "%.1f", (n - 1) / (b - a) }')
  DECODED=$tokens
  log "decode: $tokens tokens in $chunks chunks, time to first token ${TTFT_S} s, ${DECODE_TPS} tokens/s"
  check "streamed $DECODE_TOKENS tokens" "$([[ $tokens == "$DECODE_TOKENS" ]]; echo $?)" "got $tokens"

  # sleep (level 1) and wake
  local used_awake used_asleep
  used_awake=$(gpu_used_mib)
  t0=$EPOCHREALTIME
  curl -fsS --max-time 60 -X POST "$BASE/admin/engines/$NAME/sleep?level=1" >"$WORK/sleep.json" ||
    { diagnose; die "POST /admin/engines/$NAME/sleep?level=1 failed"; }
  SLEEP_S=$(seconds_since "$t0")
  used_asleep=$(gpu_used_mib)
  FREED_MIB=$((used_awake - used_asleep))
  log "sleep (level 1): ${SLEEP_S} s; GPU memory used ${used_awake} -> ${used_asleep} MiB (freed ${FREED_MIB} MiB)"
  check "engine asleep" "$(grep -q '"state":"sleeping"' "$WORK/sleep.json"; echo $?)" "$(cat "$WORK/sleep.json")"
  check "sleep freed GPU memory" "$( ((FREED_MIB > 256)); echo $?)" "only ${FREED_MIB} MiB"
  t0=$EPOCHREALTIME
  complete 8 60 || die "the request after sleep failed"
  WAKE_S=$(seconds_since "$t0")
  log "wake from sleep (time of the next request): ${WAKE_S} s"

  # NVML readings
  local nvml
  nvml=$(curl -fsS --max-time 10 "$BASE/metrics" | grep '^onecard_gpu_' || true)
  if [[ -n $nvml ]]; then printf '%s\n' "$nvml" | head -n 40 >&2; fi
  check "onecard_gpu_* in /metrics" "$([[ -n $nvml ]]; echo $?)" "no NVML series (is nvidia-ml-py installed?)"

  stop_and_check_leftovers
  ENGINE_PIDS=()
  ENGINE_PORT=""
}

# --- the lab steps: the lab's registry, one gateway for all of them ---------------------------------------

LAB_UP=""
lab_gateway() {  # start the lab gateway once, for the first lab step that runs
  [[ -n $LAB_UP ]] && return 0
  local registry=$WORK/lab_registry.yaml
  sed -E "s|^(  executable: ).*|\\1\"$VLLM\"|" "${LAB_REGISTRY:-$REPO/model_registry.yaml}" >"$registry"
  timeout 60 "$ONECARD" check "$registry" >&2 || die "onecard check rejected $registry"
  start_gateway "$registry" "$WORK/lab-run" "$WORK/lab-gateway.log"
  LAB_UP=1
}
engine_state() {  # engine_state MODEL: its state in /admin/engines
  curl -fsS --max-time 10 "$BASE/admin/engines" | grep -o "{\"model\":\"$1\"[^}]*" | grep -o '"state":"[a-z]*"' |
    cut -d'"' -f4
}
admin() {  # admin POST-PATH MAX_TIME: an admin route; fails with the answer shown
  local code
  code=$(curl -sS --max-time "$2" -o "$WORK/admin.json" -w '%{http_code}' -X POST "$BASE/admin/$1") || code=000
  [[ $code == 200 ]] || { log "POST /admin/$1: HTTP $code: $(head -c 400 "$WORK/admin.json")"; return 1; }
}
# fingerprint MODEL: the token ids of a fixed greedy completion (vLLM's return_tokens_as_token_ids)
fingerprint() {
  curl -fsS --max-time 120 -H 'Content-Type: application/json' "$BASE/v1/completions" -d "{
    \"model\": \"$1\", \"prompt\": \"The three primary colours are\", \"max_tokens\": 16, \"temperature\": 0,
    \"logprobs\": 1, \"return_tokens_as_token_ids\": true}" | grep -o '"tokens":\[[^]]*\]'
}
read -r -a PAIR_MODELS <<<"${PAIR:-llama-3.1-8b-fp8 phi-3-mini-fp8}"
JUDGE=${JUDGE:-llama-3.1-70b-awq}
LEASE_GIB=${LEASE_GIB:-16}

pair() {
  lab_gateway
  local m
  for m in "${PAIR_MODELS[@]}"; do  # one at a time: two starting together miscount each other's memory
    admin "engines/$m/load" 1200 || { diagnose "$m"; return 1; }
    log "$m loaded; GPU memory used $(gpu_used_mib) MiB"
  done
  for m in "${PAIR_MODELS[@]}"; do
    check "$m ready beside the other" "$([[ $(engine_state "$m") == ready ]]; echo $?)" "state $(engine_state "$m")"
    complete 8 120 "$m" || { check "$m answers" 1 "no answer"; continue; }
    check "$m answers" 0 ""
  done
}

level2() {
  lab_gateway
  local m=${PAIR_MODELS[0]} before after t0
  admin "engines/$m/load" 1200 || { diagnose "$m"; return 1; }
  before=$(fingerprint "$m") || { diagnose "$m"; return 1; }
  log "$m fingerprint before: $before"
  t0=$EPOCHREALTIME
  admin "engines/$m/sleep?level=2" 300 || { diagnose "$m"; return 1; }
  log "sleep (level 2): $(seconds_since "$t0") s; GPU memory used $(gpu_used_mib) MiB"
  check "$m asleep" "$([[ $(engine_state "$m") == sleeping ]]; echo $?)" "state $(engine_state "$m")"
  t0=$EPOCHREALTIME
  admin "engines/$m/wake" 600 || { diagnose "$m"; return 1; }
  log "wake from level 2 (reload included): $(seconds_since "$t0") s"
  after=$(fingerprint "$m") || { diagnose "$m"; return 1; }
  log "$m fingerprint after:  $after"
  check "same greedy token ids after a level-2 wake" "$([[ -n $before && $before == "$after" ]]; echo $?)" \
    "before $before, after $after"
}

judge() {
  lab_gateway
  local used budget_gib budget_mib flags m
  admin "engines/$JUDGE/load" 2400 || { diagnose "$JUDGE"; return 1; }
  complete 8 600 "$JUDGE" || return 1
  used=$(gpu_used_mib)
  budget_gib=$(grep -oE '^  budget_gib: *[0-9]+' "$WORK/lab_registry.yaml" | grep -oE '[0-9]+$' || true)
  budget_mib=$((${budget_gib:-$((GPU_MIB / 1024))} * 1024))  # budget_gib: auto is the card
  flags=$(curl -fsS --max-time 10 "$BASE/v1/models/$JUDGE")
  log "$JUDGE answers; GPU memory used $used MiB of a $budget_mib MiB budget"
  check "$JUDGE runs with --cpu-offload-gb" "$([[ $flags == *'"--cpu-offload-gb"'* ]]; echo $?)" "flags: $flags"
  check "$JUDGE stays within the budget" "$( ((used <= budget_mib)); echo $?)" "$used MiB used"
  for m in "${PAIR_MODELS[@]}"; do
    check "$m not resident beside the judge" "$([[ $(engine_state "$m") != ready ]]; echo $?)" "state ready"
  done
}

lease() {
  lab_gateway
  local m out free_mib
  for m in "${PAIR_MODELS[@]}"; do admin "engines/$m/load" 1200 || { diagnose "$m"; return 1; }; done
  out=$WORK/lease-free.txt
  # The lease holder reads the card's free memory while it holds the lease, like a fine-tune would.
  env -u ONECARD_ADMIN_KEYS "$ONECARD" lease --gib "$LEASE_GIB" --url "$BASE" -- \
    bash -c "nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits -i 0 >'$out'; sleep 5" \
    2>"$WORK/lease.log" || { cat "$WORK/lease.log" >&2; return 1; }
  cat "$WORK/lease.log" >&2
  free_mib=$(tr -dc '0-9' <"$out")
  check "the lease holder had $LEASE_GIB GiB free" "$( ((free_mib >= LEASE_GIB * 1024)); echo $?)" \
    "${free_mib:-no} MiB free"
  check "the lease evicted a model" "$(grep -q 'evicted' "$WORK/lease.log"; echo $?)" "nothing evicted"
  for m in "${PAIR_MODELS[@]}"; do
    complete 8 600 "$m" || { check "$m answers after the lease" 1 "no answer"; continue; }
    check "$m answers after the lease" 0 ""
  done
}

# --- run the steps ------------------------------------------------------------------------------------------

STOP_S=""
COLD_S="" TTFT_S="" DECODE_TPS="" DECODED="" SLEEP_S="" FREED_MIB="" WAKE_S=""
if wants basic; then step basic basic; fi
for s in pair level2 judge lease; do
  if wants "$s"; then step "$s" "$s"; fi
done
if [[ -n $LAB_UP ]]; then step stop stop_and_check_leftovers; fi

# --- summary ---------------------------------------------------------------------------------------------

printf '\nonecard GPU smoke on %s (%s MiB)\n' "$GPU_NAME" "$GPU_MIB"
if [[ -n $COLD_S ]]; then
  cat <<SUMMARY
  basic: $MODEL
    cold start (first request)   ${COLD_S} s
    time to first token (warm)   ${TTFT_S} s
    decode                       ${DECODE_TPS} tokens/s ($DECODED tokens, one stream)
    sleep, level 1               ${SLEEP_S} s (freed ${FREED_MIB} MiB)
    wake (next request)          ${WAKE_S} s
SUMMARY
fi
if [[ -n $STOP_S ]]; then
  printf '  last gateway stop: %s s\n' "$STOP_S"
fi
printf '  %s\n' "${RESULTS[@]}"
printf '  checks failed: %s%s\n' "${#FAILED[@]}" "${FAILED[*]:+$(printf '; %s' "${FAILED[@]}")}"
((${#FAILED[@]} == 0))
