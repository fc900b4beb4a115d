#!/usr/bin/env bash
# The real-size figures on one CUDA GPU: the gpu-marked tests, then `pictoprompt bench real_size` at the native
# resolution in float16 for SD 1.5 + Llama 1B, SD 1.5 + Llama 3B and SD 2.1 + Llama 1B. Run from the checkout's
# root; the sets are built on the machine itself (about 10 GB under $PICTOPROMPT_REAL_SIZE_DIR, a few minutes).
#
#   lab/benchmarks/real_size_gpu.sh [OUTPUT_DIR]          # tables on stdout, one JSON per run in OUTPUT_DIR
#
# A machine without diffusers, open_clip or this package (torch and transformers present, no internet) takes them
# as wheels in .whl/ (pure Python; download them here with `pip download --no-deps -d .whl diffusers open_clip_torch
# ftfy ...` and the package's own with `pip wheel --no-deps -w .whl .`): they are installed into /tmp/site first.
set -euo pipefail

out="${1:-${OUT:-real-size-gpu}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PICTOPROMPT_REAL_SIZE_DIR="${PICTOPROMPT_REAL_SIZE_DIR:-/tmp/pictoprompt-real-size}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

# One failing step is reported and the others still run: each gives its own figures.
status=0
run() {
    local name="$1"
    shift
    "$@" 2>&1 | tee "$out/$name.log" || { echo "$name FAILED" >&2; status=1; }
}

run gpu-tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_real_size.py
bench=(python3 -m pictoprompt.cli bench real_size --device cuda --dtype fp16)
run sd15-1b "${bench[@]}" --set sd15 --llm 1b --json "$out/sd15-1b.json"
run sd21-1b "${bench[@]}" --set sd21 --llm 1b --json "$out/sd21-1b.json"
run sd15-3b "${bench[@]}" --set sd15 --llm 3b --only "invert, vgd" --json "$out/sd15-3b.json"
exit $status
