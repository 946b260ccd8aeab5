#!/usr/bin/env bash
# gpu-smoke.sh: onecard on a real NVIDIA GPU with CUDA vLLM, in under 10 minutes.
#
#   scripts/gpu-smoke.sh [MODEL]
#
# MODEL is a local model folder or a hub id (default Qwen/Qwen2.5-0.5B-Instruct). It writes a registry
# for that one model (budget: the card's memory from nvidia-smi), starts `onecard serve` on a free port
# and prints: the cold start (time of the first request), decode tokens/s (a streamed 256-token
# request, timed chunk by chunk), sleep (level 1) and wake-from-sleep times, the GPU memory the sleep
# freed, the gateway's NVML readings (onecard_gpu_* in /metrics). Then it stops the gateway and checks
# that no engine process is left. Exit status 0 when every check passed.
#
# Environment:
#   ONECARD        the onecard command (default: the repository's .venv/bin/onecard, else PATH)
#   VLLM           the CUDA vllm command (default: /opt/vllm/bin/vllm, else PATH)
#   PARAMS_B       billions of parameters, needed for a hub id other than the default (planner input)
#   MAX_MODEL_LEN  context per sequence (default 4096)
#   KEEP_WORK=1    keep the work folder (registry, gateway and engine logs) even after success
#   SMOKE_TIMEOUT_S  the run's limit (default 470); then the cleanup has 110 s: 580 s in all
set -euo pipefail
export LC_ALL=C  # EPOCHREALTIME and awk with a '.' decimal point

# One wall-clock limit for everything. At the limit, SIGTERM: the EXIT trap runs once the current
# request returns (each has --max-time 60 at most, but the first) and stops the gateway (40 s at most).
if [[ -z ${_ONECARD_SMOKE_GUARD:-} ]]; then
  export _ONECARD_SMOKE_GUARD=1
  exec timeout --kill-after=110 "${SMOKE_TIMEOUT_S:-470}" "$BASH" "$0" "$@"
fi

DEFAULT_MODEL=Qwen/Qwen2.5-0.5B-Instruct
MODEL=${1:-$DEFAULT_MODEL}
NAME=smoke
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
DECODE_TOKENS=256
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

FAILED=()
GW_PID=""
CLIENT_PID=""   # a request running in the background
ENGINE_PIDS=()  # engines start in their own process group: pid = process group id

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
check() {  # check NAME CONDITION-EXIT-STATUS MESSAGE
  if [[ $2 == 0 ]]; then log "ok:   $1"; else log "FAIL: $1: $3"; FAILED+=("$1"); fi
}
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

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
REGISTRY=$WORK/model_registry.yaml

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
engine_groups() {  # the engines this run's gateway started: what it reported, and its state file
  local state=$WORK/run/state/engines.json
  printf '%s\n' "${ENGINE_PIDS[@]}"
  [[ -f $state ]] && grep -o '"pgid": *[0-9]*' "$state" | grep -o '[0-9]*$'
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

# --- the registry -------------------------------------------------------------------------------------

if [[ -d $MODEL ]]; then
  SOURCE=$(cd "$MODEL" && pwd)
  FIGURES=""  # the planner reads the folder's config.json
elif [[ $MODEL == "$DEFAULT_MODEL" ]]; then
  SOURCE=$MODEL
  FIGURES="    architecture: {num_hidden_layers: 24, hidden_size: 896, intermediate_size: 4864,
                   num_attention_heads: 14, num_key_value_heads: 2, vocab_size: 151936,
                   tie_word_embeddings: true, max_position_embeddings: 32768}"
else
  SOURCE=$MODEL
  FIGURES="    params_b: ${PARAMS_B:?set PARAMS_B (billions of parameters) for a hub id other than $DEFAULT_MODEL}"
fi

cat >"$REGISTRY" <<EOF
# Written by scripts/gpu-smoke.sh
version: 1
gpu: {budget_gib: $BUDGET_GIB, headroom_gib: 1, platform: cuda, host_ram_for_sleep_gib: 16}
vllm: {executable: "$VLLM"}
models:
  - name: $NAME
    source: "$SOURCE"
    max_model_len: $MAX_MODEL_LEN
    concurrent_seqs: 4
    sleep_level: 1
    start_timeout_s: 420
$FIGURES
EOF
timeout 60 "$ONECARD" check "$REGISTRY" >&2 || die "onecard check rejected $REGISTRY"

# --- start the gateway ----------------------------------------------------------------------------------

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
# No keys: this gateway listens on 127.0.0.1 only and lives for this run.
env -u ONECARD_API_KEYS -u ONECARD_ADMIN_KEYS \
  "$ONECARD" serve --registry "$REGISTRY" --host 127.0.0.1 --port "$PORT" --run-dir "$WORK/run" \
  >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
log "gateway pid $GW_PID on $BASE (log: $WORK/gateway.log)"

deadline=$((SECONDS + 60))
until curl -fsS --max-time 2 "$BASE/health" >/dev/null 2>&1; do
  kill -0 "$GW_PID" 2>/dev/null || { tail -n 30 "$WORK/gateway.log" >&2; die "the gateway exited at start"; }
  ((SECONDS < deadline)) || die "no /health within 60 s"
  sleep 0.5
done

diagnose() {  # the engine's log tail and the gateway's, to stderr
  log "engine log (tail):"
  curl -sS --max-time 10 "$BASE/admin/engines/$NAME/log?lines=60" >&2 || true
  log "gateway log (tail):"
  tail -n 30 "$WORK/gateway.log" >&2 || true
}

# complete MAX_TOKENS MAX_TIME: a non-streamed completion; fails unless HTTP 200 with x-onecard-model.
complete() {
  local code
  code=$(curl -sS --max-time "$2" -o "$WORK/body.json" -D "$WORK/headers.txt" -w '%{http_code}' \
    -H 'Content-Type: application/json' "$BASE/v1/completions" \
    -d "{\"model\": \"$NAME\", \"prompt\": \"The capital of France is\", \"max_tokens\": $1, \"temperature\": 0}") || code=000
  [[ $code == 200 ]] || { log "HTTP $code: $(head -c 400 "$WORK/body.json" 2>/dev/null)"; diagnose; return 1; }
  grep -qi '^x-onecard-model:' "$WORK/headers.txt" || { log "no x-onecard-model header"; return 1; }
}

# --- 1. cold start ---------------------------------------------------------------------------------------

log "cold start: the first request starts the engine (weights may download first)"
t0=$EPOCHREALTIME
complete 8 400 &
CLIENT_PID=$!
# Watch the start: note the engine's pid as soon as it has one, fail fast when it fails.
while kill -0 "$CLIENT_PID" 2>/dev/null; do
  ENGINES=$(curl -fsS --max-time 5 "$BASE/admin/engines" 2>/dev/null || true)
  ((${#ENGINE_PIDS[@]} > 0)) || mapfile -t ENGINE_PIDS < <(engine_field pid "$ENGINES")
  if [[ $ENGINES == *'"state":"failed"'* ]]; then diagnose; die "the engine failed to start"; fi
  kill -0 "$GW_PID" 2>/dev/null || { diagnose; die "the gateway exited"; }
  sleep 1
done
wait "$CLIENT_PID" || die "the first request failed"
CLIENT_PID=""
COLD_S=$(seconds_since "$t0")
log "cold start: ${COLD_S} s"
ENGINES=$(curl -fsS --max-time 10 "$BASE/admin/engines")
mapfile -t ENGINE_PIDS < <(engine_field pid "$ENGINES")
ENGINE_PORT=$(engine_field port "$ENGINES")
[[ ${#ENGINE_PIDS[@]} == 1 && -n $ENGINE_PORT ]] || die "/admin/engines shows no running engine: $ENGINES"
log "engine pid ${ENGINE_PIDS[*]} on port $ENGINE_PORT"
log "record: $(curl -fsS --max-time 10 "$BASE/v1/models/$NAME")"

# --- 2. decode rate ------------------------------------------------------------------------------------

first="" last="" chunks=0 tokens=""
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
log "decode: $tokens tokens in $chunks chunks, time to first token ${TTFT_S} s, ${DECODE_TPS} tokens/s"
check "streamed $DECODE_TOKENS tokens" "$([[ $tokens == "$DECODE_TOKENS" ]]; echo $?)" "got $tokens"

# --- 3. sleep and wake -----------------------------------------------------------------------------------

gpu_used_mib() { timeout 20 nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }
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

# --- 4. NVML readings ------------------------------------------------------------------------------------

NVML=$(curl -fsS --max-time 10 "$BASE/metrics" | grep '^onecard_gpu_' || true)
if [[ -n $NVML ]]; then printf '%s\n' "$NVML" | head -n 40 >&2; fi
check "onecard_gpu_* in /metrics" "$([[ -n $NVML ]]; echo $?)" "no NVML series (is nvidia-ml-py installed?)"

# --- 5. stop: nothing may be left -------------------------------------------------------------------------

log "stopping the gateway (SIGTERM)"
t0=$EPOCHREALTIME
stopped=0
stop_gateway 60 || stopped=$?
check "gateway exited on SIGTERM" "$stopped" "killed after 60 s"
STOP_S=$(seconds_since "$t0")
GW_PID=""
left=""
for pgid in $(engine_groups | sort -u); do
  left+=$(pgrep -g "$pgid" 2>/dev/null | tr '\n' ' ' || true)
  kill -0 "$pgid" 2>/dev/null && left+="$pgid "
done
left+=$(pgrep -f -- "--port $ENGINE_PORT( |$)" 2>/dev/null | tr '\n' ' ' || true)
gpu_pids=$(timeout 20 nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null || true)
for pid in "${ENGINE_PIDS[@]}"; do grep -qx "$pid" <<<"$gpu_pids" && left+="gpu:$pid "; done
check "no engine process left" "$([[ -z ${left// /} ]]; echo $?)" "still running: $left"

# --- summary ---------------------------------------------------------------------------------------------

cat <<EOF

onecard GPU smoke: $MODEL on $GPU_NAME
  cold start (first request)   ${COLD_S} s
  time to first token (warm)   ${TTFT_S} s
  decode                       ${DECODE_TPS} tokens/s ($tokens tokens, one stream)
  sleep, level 1               ${SLEEP_S} s (freed ${FREED_MIB} MiB)
  wake (next request)          ${WAKE_S} s
  gateway stop                 ${STOP_S} s
  checks failed                ${#FAILED[@]}${FAILED[*]:+$(printf '; %s' "${FAILED[@]}")}
EOF
((${#FAILED[@]} == 0))
